"""Test callbacks passed to the real CLI (`--trainer.callbacks+=tests.probes.<Name>`, with the repository on
PYTHONPATH): they record what each rank saw, or slow training down to a known pace."""

import json
import os
import signal
import time
from pathlib import Path

import lightning as L


class RankReport(L.Callback):
    """Writes <default_root_dir>/ranks/rank<r>-restart<k>.json at setup: the ranks Lightning assigned."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
        report = {
            "global_rank": trainer.global_rank,
            "local_rank": trainer.local_rank,
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "cluster_environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
            "slurm_node": os.environ.get("SLURMD_NODENAME"),
            "restart": restart,
        }
        folder = Path(trainer.default_root_dir) / "ranks"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{trainer.global_rank}-restart{restart}.json").write_text(json.dumps(report))


class LossLog(L.Callback):
    """Appends `{"rank", "step", "loss", "examples"}` per optimizer step to <default_root_dir>/losses-rank<r>.jsonl:
    the local micro-batch loss of every rank, where Lightning's log keeps rank 0's only."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        record = {
            "rank": trainer.global_rank,
            "step": trainer.global_step,
            "loss": float(outputs["loss"]),
            "examples": len(batch),
        }
        path = Path(trainer.default_root_dir) / f"losses-rank{trainer.global_rank}.jsonl"
        with path.open("a") as file:
            file.write(json.dumps(record) + "\n")


class Pace(L.Callback):
    """Sleeps after every training step, so a test can signal a job while it is surely still training."""

    def __init__(self, seconds: float = 0.25) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


class SignalAt(L.Callback):
    """Sends this process SIGTERM after optimizer step `step`, as a scheduler would: GracefulStop then saves
    last.ckpt on every rank and the run exits with 143."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
