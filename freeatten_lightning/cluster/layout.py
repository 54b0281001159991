"""How many nodes, and how many processes per node, a run asks for: read from its resolved trainer config and
checked against the SLURM request before anything is queued.

SLURM starts one task per device (`--ntasks-per-node` = devices per node) and Lightning checks, once the job
runs, that `trainer.num_nodes` and `trainer.devices` agree with SLURM's numbers. A mismatch found there costs a
trip through the queue; found here it costs nothing.
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from freeatten_lightning.errors import FreeattenError

_ALL_DEVICES = ("auto", "-1", -1)
_SINGLE_PROCESS_STRATEGIES = ("single_device", "single_xla")


@dataclass(frozen=True)
class Layout:
    """The processes of a job: `nodes` x `devices_per_node`, on GPUs unless the config trains on CPUs."""

    nodes: int
    devices_per_node: int
    uses_gpus: bool

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    def trainer_args(self) -> list[str]:
        """The overrides that make the trainer config say exactly what SLURM will start."""
        return ["--trainer.num_nodes", str(self.nodes), "--trainer.devices", str(self.devices_per_node)]


def resolve_config(subcommand: str, args: list[str]) -> Namespace:
    """The run's config exactly as `freeatten <subcommand> <args>` parses it (links and checkpoint
    hyperparameters included), without building the model, data or trainer."""
    from freeatten_lightning.cli import FreeattenCLI  # the CLI imports this package: import it on use

    class ParseOnlyCLI(FreeattenCLI):
        def parse_arguments(self, parser, args) -> None:
            self.config = parser.parse_args(args)

        def _set_seed(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

        def _run_subcommand(self, subcommand: str) -> None:
            pass

    return ParseOnlyCLI(args=[subcommand, *args]).config[subcommand]


def count_devices(devices: Any, requested: int) -> int:
    """Devices per node that `trainer.devices` asks for; "auto" / -1 (all of the node's) take the request."""
    if devices in _ALL_DEVICES:
        return requested
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([part for part in text.split(",") if part.strip()])
    try:
        return int(text)
    except ValueError:
        raise FreeattenError(f"trainer.devices={devices!r} is not a device count, list or 'auto'") from None


def check_layout(trainer: Any, nodes: int, devices_per_node: int) -> Layout:
    """The Layout of `nodes` x `devices_per_node`, after checking that the trainer config asks for the same;
    raises FreeattenError naming both numbers and how to make them agree."""
    if nodes < 1 or devices_per_node < 1:
        raise FreeattenError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {devices_per_node}")
    configured = count_devices(trainer.devices, devices_per_node)
    if configured != devices_per_node:
        raise FreeattenError(
            f"the trainer config asks for trainer.devices={trainer.devices} ({configured} per node) but the job "
            f"would start {devices_per_node} tasks per node (--gpus-per-node / GPUS_PER_NODE): submit with "
            f"--gpus-per-node {configured}, or override the config with --trainer.devices {devices_per_node}"
        )
    if trainer.num_nodes not in (1, nodes):
        raise FreeattenError(
            f"the trainer config asks for trainer.num_nodes={trainer.num_nodes} but the job requests {nodes} "
            f"node(s) (--nodes / NODES): submit with --nodes {trainer.num_nodes}, or override the config with "
            f"--trainer.num_nodes {nodes}"
        )
    strategy = trainer.strategy if isinstance(trainer.strategy, str) else None
    if nodes * devices_per_node > 1 and strategy in _SINGLE_PROCESS_STRATEGIES:
        raise FreeattenError(
            f"trainer.strategy={strategy!r} runs one process but the job starts {nodes * devices_per_node}: use "
            "--trainer.strategy ddp or a config under configs/strategy/"
        )
    check_strategy_files(trainer.strategy)
    return Layout(nodes, devices_per_node, uses_gpus=str(trainer.accelerator) != "cpu")


def check_strategy_files(strategy: Any) -> None:
    """A DeepSpeed JSON named by the config must exist where the job will run (relative to the working dir)."""
    init_args = getattr(strategy, "init_args", None)
    config = getattr(init_args, "config", None) if init_args is not None else None
    if isinstance(config, str) and not Path(config).is_file():
        raise FreeattenError(
            f"the strategy's DeepSpeed config {config!r} does not exist (relative to {os.getcwd()}): submit from "
            "the repository root, or give an absolute path with --trainer.strategy.config"
        )


def freeatten_command() -> list[str]:
    """The `freeatten` of this environment, by absolute path, so the job runs the same installation."""
    script = Path(sys.executable).parent / "freeatten"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "freeatten_lightning.cli"]
