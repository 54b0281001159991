"""Distributed training on CPU through the real CLI in subprocesses.

DDP over two "nodes" (the hostfile + torchrun recipe, on loopback) follows the single-process run with the same
global batch step by step; DeepSpeed ZeRO-2 and ZeRO-3 (Lightning's strategy minus its CUDA checks,
tests/cpu_deepspeed.py) follow it too, save sharded checkpoints, and `freeatten convert-ckpt` turns those into
one fp32 file on which `freeatten validate` gives the training run's own validation loss.
"""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from freeatten_lightning.cluster import convert_main, resolve_config
from freeatten_lightning.cluster.convert import default_output
from freeatten_lightning.errors import FreeattenError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMOKE = "configs/experiment/smoke.yaml"
STEPS = 6
GLOBAL_BATCH = 8
LOSS_TOLERANCE = 1e-4  # measured: <= 2e-5 after 8 steps (reduction order differs between DDP and one process)
TRAIN = (
    f"fit --config {SMOKE} --trainer.max_steps {STEPS} --trainer.val_check_interval {STEPS // 2} "
    "--trainer.log_every_n_steps 1 --trainer.enable_progress_bar false --data.val_tokens 4096 "
    "--model.lr 5e-4 --model.warmup_steps 2 --trainer.callbacks tests.probes.LossLog "
    "--trainer.callbacks+=tests.probes.RankReport"
).split()  # `--trainer.callbacks X` replaces the smoke config's length evaluation (tested elsewhere; ~8 CPU-s a run)


def environment() -> dict[str, str]:
    """The tests' environment plus the repository on PYTHONPATH (for tests.probes / tests.cpu_deepspeed) and a
    persistent cache for DeepSpeed's compiled C++ op (about 40 s to build the first time)."""
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".ci-cache" / "torch_extensions"))
    return dict(os.environ, PYTHONPATH=str(REPO), TORCH_EXTENSIONS_DIR=extensions)


def run(command: list[str], returncode: int = 0, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=environment() | env, capture_output=True, text=True)
    assert result.returncode == returncode, f"{' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def step_losses(run_dir: Path) -> dict[int, float]:
    """Loss of the global batch at every step: the mean over ranks of their (equal-sized) micro-batch losses."""
    lines = [line for path in run_dir.glob("losses-rank*.jsonl") for line in path.read_text().splitlines()]
    records = [json.loads(line) for line in lines]
    assert sum(r["examples"] for r in records if r["step"] == 1) == GLOBAL_BATCH
    by_step: dict[int, list[float]] = {}
    for record in records:
        by_step.setdefault(record["step"], []).append(record["loss"])
    return {step: sum(losses) / len(losses) for step, losses in sorted(by_step.items())}


def val_losses(run_dir: Path) -> dict[int, float]:
    """Validation loss by step from the run's CSV logs (a resumed run logs to a new version folder)."""
    losses = {}
    for path in sorted((run_dir / "lightning_logs").glob("version_*/metrics.csv")):
        rows = csv.DictReader(path.open())
        losses |= {int(row["step"]): float(row["val/loss"]) for row in rows if row.get("val/loss")}
    return losses


def assert_same_curve(run_dir: Path, reference: Path) -> None:
    got, expected = step_losses(run_dir), step_losses(reference)
    assert list(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(expected[step], abs=LOSS_TOLERANCE), f"train loss at step {step}"
    final_val = list(val_losses(run_dir).values())[-1]  # by order: a resumed run's logged steps may be shifted
    assert final_val == pytest.approx(list(val_losses(reference).values())[-1], abs=LOSS_TOLERANCE)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    batch = ["--data.batch_size", str(GLOBAL_BATCH)]
    run([str(BIN / "freeatten"), *TRAIN, *batch, "--trainer.default_root_dir", str(run_dir)])
    return run_dir


@pytest.mark.slow
def test_ddp_on_two_nodes_follows_one_process(single_process: Path, tmp_path: Path) -> None:
    """recipes/multinode/launch.sh with two localhost "nodes" x 1 process, half the batch each."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes on loopback\nlocalhost slots=1\nlocalhost slots=1\n")
    launch = [str(REPO / "recipes" / "multinode" / "launch.sh"), str(hostfile)]
    args = [*TRAIN, "--data.batch_size", str(GLOBAL_BATCH // 2), "--trainer.default_root_dir", str(tmp_path)]
    run([*launch, *args], MASTER_PORT=str(free_port()), PATH=f"{BIN}:{os.environ['PATH']}")

    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "ranks").glob("*.json"))]
    assert [(r["global_rank"], r["node_rank"], r["local_rank"], r["world_size"]) for r in reports] == [
        (0, 0, 0, 2),
        (1, 1, 0, 2),
    ]
    assert {r["cluster_environment"] for r in reports} == {"TorchElasticEnvironment"}
    assert_same_curve(tmp_path, single_process)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_trains_resumes_and_its_checkpoint_converts_for_evaluation(
    stage: int, single_process: Path, tmp_path: Path
) -> None:
    """Two ranks, SIGTERM after step 3 (sharded last.ckpt saved), resumed to the end with `--ckpt_path last`."""
    strategy = ["--trainer.strategy", "tests.cpu_deepspeed.CPUDeepSpeedStrategy"]
    strategy += ["--trainer.strategy.config", f"configs/deepspeed/zero{stage}.json", "--trainer.devices", "2"]
    args = [*TRAIN, *strategy, "--data.batch_size", str(GLOBAL_BATCH // 2), "--trainer.default_root_dir", str(tmp_path)]
    stop = ["--trainer.callbacks+=tests.probes.SignalAt", "--trainer.callbacks.step", str(STEPS // 2)]
    run([str(BIN / "freeatten"), *args, *stop], returncode=128 + 15, MASTER_PORT=str(free_port()))
    run([str(BIN / "freeatten"), *args, "--ckpt_path", "last"], MASTER_PORT=str(free_port()))
    assert_same_curve(tmp_path, single_process)

    sharded = tmp_path / "checkpoints" / "last.ckpt"
    assert (sharded / "latest").is_file(), "DeepSpeed saves a folder of shards"
    converted = default_output(sharded)
    assert converted == tmp_path / "last-fp32.ckpt"
    assert convert_main([str(sharded)]) == 0

    checkpoint = torch.load(converted, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == STEPS
    assert all(t.dtype == torch.float32 for t in checkpoint["state_dict"].values())
    evaluation = tmp_path / "evaluation"
    validate = ["validate", "--config", SMOKE, "--ckpt_path", str(converted), "--data.val_tokens", "4096"]
    run([str(BIN / "freeatten"), *validate, "--trainer.default_root_dir", str(evaluation)])
    trained = list(val_losses(tmp_path).values())[-1]  # validated at the last step, under DeepSpeed
    assert list(val_losses(evaluation).values()) == [pytest.approx(trained, abs=1e-5)]


def test_converting_a_file_or_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    single_file = tmp_path / "last.ckpt"
    single_file.write_bytes(b"")
    with pytest.raises(FreeattenError, match="single file already"):
        convert_main([str(single_file)])
    with pytest.raises(FreeattenError, match="not a DeepSpeed checkpoint folder"):
        convert_main([str(tmp_path / "missing")])


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs" / "strategy").glob("*.yaml")))
def test_strategy_configs_compose_with_an_experiment(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--trainer configs/strategy/<name>.yaml` merges into the experiment's trainer settings (later files win)."""
    monkeypatch.chdir(REPO)
    trainer = resolve_config("fit", ["--config", SMOKE, "--trainer", f"configs/strategy/{name}.yaml"]).trainer
    assert trainer.max_steps == 300 and trainer.accelerator == "cpu"  # the experiment's values are kept
    if name == "ddp":
        assert trainer.strategy == "ddp"
        return
    assert trainer.strategy.class_path == "lightning.pytorch.strategies.DeepSpeedStrategy"
    deepspeed = json.loads(Path(trainer.strategy.init_args.config).read_text())
    assert f"deepspeed_zero{deepspeed['zero_optimization']['stage']}" in name
    assert "gradient_accumulation_steps" not in deepspeed  # Lightning sets it from trainer.accumulate_grad_batches
    assert ("offload_param" in deepspeed["zero_optimization"]) == name.endswith("offload")
