"""SLURM submission: the rendered job script and its checks (fast, no cluster), then the project's own sbatch
template on a real SLURM cluster on loopback with two fake nodes (slow): 2 nodes x 2 tasks train and save a
checkpoint, a preempted job checkpoints, is requeued and ends where an uninterrupted one does, and inconsistent
submissions are refused before anything is queued."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from freeatten_lightning.cluster import submit_main
from freeatten_lightning.cluster.submit import render
from freeatten_lightning.errors import FreeattenError
from tests.slurm_cluster import LocalSlurm, missing_binaries
from tests.test_reproduce import PAPER_CONFIG, PAPER_ON_CPU

REPO = Path(__file__).resolve().parents[1]
FREEATTEN = str(Path(sys.executable).parent / "freeatten")
SMOKE = "configs/experiment/smoke.yaml"
MAX_STEPS = 16
TASKS_PER_NODE = 2
LOSS_TOLERANCE = 1e-4  # a requeued job's first step reduces gradients in another order: ~1e-5 after 16 steps
RUN_ARGS = (
    f"--trainer.devices {TASKS_PER_NODE} --trainer.max_steps {MAX_STEPS} --trainer.val_check_interval 8 "
    "--trainer.log_every_n_steps 1 --trainer.enable_progress_bar false --data.batch_size 4 --data.val_tokens 4096 "
    "--model.lr 5e-4 --model.warmup_steps 2 --checkpoint.every_n_train_steps 2 "
    "--trainer.callbacks tests.probes.RankReport --trainer.callbacks+=tests.probes.LossLog "
    "--trainer.callbacks+=tests.probes.Pace"
).split()  # `--trainer.callbacks X` replaces the smoke config's length evaluation (tested elsewhere; ~8 CPU-s a run)


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # configs and DeepSpeed JSONs are relative to the repository root


def dry_run(capsys: pytest.CaptureFixture, argv: str) -> str:
    assert submit_main(["--dry-run", *argv.split()]) == 0
    return capsys.readouterr().out


# ---------------------------------------------------------------- the job script (no cluster needed)


def test_dry_run_renders_a_checked_job_script(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    script = dry_run(
        capsys,
        f"--nodes 2 --gpus-per-node 2 --config {SMOKE} --time 0:10:00 --partition debug --log-dir {tmp_path} "
        "-- --trainer.devices 2 --model.attention lssa",
    )
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --time=0:10:00",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --partition=debug",
        f"#SBATCH --output={tmp_path}/%x-%j.out",
    ):
        assert line in script.splitlines()
    assert "--gpus-per-node" not in script  # accelerator: cpu requests no GPUs
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert f"{FREEATTEN} fit --config {SMOKE} --trainer.devices 2 --model.attention lssa" in srun
    assert srun.endswith('--trainer.num_nodes 2 --trainer.devices 2 "${resume[@]}" &')
    assert "resume=(--ckpt_path last)" in script
    assert "{{" not in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid bash


def test_gpu_config_requests_gpus_and_keeps_a_given_checkpoint(capsys: pytest.CaptureFixture) -> None:
    script = dry_run(
        capsys,
        f"--nodes 4 --gpus-per-node 8 --config {SMOKE} -- --trainer configs/trainer/gpu.yaml "
        "--trainer configs/strategy/deepspeed_zero2.yaml --ckpt_path runs/x/checkpoints/last.ckpt",
    )
    assert "#SBATCH --gpus-per-node=8" in script.splitlines()
    assert "--trainer.num_nodes 4 --trainer.devices 8" in script
    assert "resume=()" in script  # the user's checkpoint first; `last` only once the job is requeued


def test_evaluation_template(capsys: pytest.CaptureFixture) -> None:
    script = dry_run(capsys, f"validate --nodes 1 --gpus-per-node 1 --config {SMOKE}")
    assert f"srun --kill-on-bad-exit=1 {FREEATTEN} validate --config {SMOKE}" in script
    assert "--requeue" not in script and "{{" not in script


@pytest.mark.parametrize(
    ("nodes", "per_node", "extra", "expected"),
    [
        (2, 2, [], "trainer.devices=1 (1 per node) but the job would start 2 tasks per node"),
        (2, 1, ["--trainer.num_nodes", "4"], "trainer.num_nodes=4 but the job requests 2 node(s)"),
        (1, 2, ["--trainer.devices", "0,1,2"], "(3 per node) but the job would start 2 tasks per node"),
        (1, 2, ["--trainer.devices", "2", "--trainer.strategy", "single_device"], "runs one process but the job"),
        (
            1,
            1,
            ["--trainer", "configs/strategy/deepspeed_zero3.yaml", "--trainer.strategy.config", "nope.json"],
            "DeepSpeed config 'nope.json' does not exist",
        ),
    ],
)
def test_inconsistent_submissions_are_refused(nodes: int, per_node: int, extra: list[str], expected: str) -> None:
    with pytest.raises(FreeattenError, match=re.escape(expected)):
        submit_main([*f"--dry-run --nodes {nodes} --gpus-per-node {per_node} --config {SMOKE} --".split(), *extra])


def test_template_fields_must_all_be_filled() -> None:
    assert render("#SBATCH --nodes={{nodes}}", {"nodes": "2"}) == "#SBATCH --nodes=2"
    with pytest.raises(FreeattenError, match="time"):
        render("{{nodes}} {{time}}", {"nodes": "2"})


# ---------------------------------------------------------------- a real cluster (slow)

needs_slurm = pytest.mark.skipif(
    bool(missing_binaries()) or os.geteuid() != 0,
    reason=f"a local SLURM cluster needs root and {', '.join(missing_binaries()) or 'the SLURM binaries'} "
    "(apt-get install slurmctld slurmd slurm-client munge)",
)


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="freeatten-slurm-"))  # not under pytest's 0700 folder: munged must enter it
    root.chmod(0o755)
    slurm = LocalSlurm(root)
    slurm.env |= {"MASTER_ADDR": "127.0.0.1", "PYTHONPATH": str(REPO)}  # fake node names do not resolve
    slurm.start()
    yield slurm
    slurm.stop()
    shutil.rmtree(root, ignore_errors=True)


def submit(cluster: LocalSlurm, run_dir: Path) -> tuple[str, Path]:
    """Queue the smoke run on 2 nodes x 2 tasks through `freeatten submit`; (job id, its SLURM log)."""
    submit_args = f"--nodes 2 --gpus-per-node {TASKS_PER_NODE} --cpus-per-task 1 --time 0:15:00 --config {SMOKE}"
    command = [FREEATTEN, "submit", *submit_args.split(), "--log-dir", str(run_dir / "slurm"), "--", *RUN_ARGS]
    command += ["--trainer.default_root_dir", str(run_dir)]
    result = subprocess.run(command, env=cluster.env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    job_id = re.search(r"Submitted job (\d+)", result.stdout).group(1)
    return job_id, run_dir / "slurm" / f"freeatten-fit-{job_id}.out"


def finish(cluster: LocalSlurm, job_id: str, log: Path, timeout: float) -> None:
    """Wait for the job to complete; any other end fails with the log's tail in the message."""
    try:
        state = cluster.wait_until(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout)
    except TimeoutError as error:
        raise AssertionError(f"{error}\n{log.read_text()[-4000:] if log.exists() else 'no log'}") from None
    assert state == "COMPLETED", log.read_text()[-4000:]


def global_losses(run_dir: Path) -> dict[int, float]:
    """Loss of the global batch at every optimizer step: the mean of the ranks' equal-sized micro-batch losses."""
    records = [
        json.loads(line) for path in run_dir.glob("losses-rank*.jsonl") for line in path.read_text().splitlines()
    ]
    by_step: dict[int, list[float]] = {}
    for record in records:
        by_step.setdefault(record["step"], []).append(record["loss"])
    world = 2 * TASKS_PER_NODE
    assert all(len(losses) == world for losses in by_step.values()), "a step logged by other than every rank once"
    return {step: sum(losses) / world for step, losses in by_step.items()}


@pytest.fixture(scope="module")
def straight_run(cluster: LocalSlurm, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2 x 2 job through the project's template."""
    run_dir = tmp_path_factory.mktemp("straight")
    job_id, log = submit(cluster, run_dir)
    finish(cluster, job_id, log, timeout=300)
    return run_dir


@needs_slurm
@pytest.mark.slow
def test_paper_recipe_runs_as_a_slurm_job(cluster: LocalSlurm, fineweb_like_dir: Path, tmp_path: Path) -> None:
    """The paper's run as users submit it (`make submit CONFIG=configs/experiment/gpt2-small-fineweb.yaml`), here
    on one node x 2 CPU tasks with the nano model: DDP over SLURM, a checkpoint at the last step."""
    submit_args = f"--nodes 1 --gpus-per-node 2 --cpus-per-task 1 --time 0:15:00 --config {PAPER_CONFIG}"
    command = [FREEATTEN, "submit", *submit_args.split(), "--log-dir", str(tmp_path / "slurm"), "--", *PAPER_ON_CPU]
    command += ["--trainer.devices=2", f"--data.data_dir={fineweb_like_dir}", f"--trainer.default_root_dir={tmp_path}"]
    result = subprocess.run(command, env=cluster.env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    job_id = re.search(r"Submitted job (\d+)", result.stdout).group(1)
    finish(cluster, job_id, tmp_path / "slurm" / f"freeatten-fit-{job_id}.out", timeout=400)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3
    assert checkpoint["TokenDataModule"]["examples_consumed"] == 3 * 2 * 2  # steps x batch x world


@needs_slurm
@pytest.mark.slow
def test_template_trains_on_two_nodes(straight_run: Path) -> None:
    reports = [json.loads(path.read_text()) for path in sorted((straight_run / "ranks").glob("*.json"))]
    assert sorted(r["global_rank"] for r in reports) == [0, 1, 2, 3]
    for report in reports:
        assert report["world_size"] == 4 and report["num_nodes"] == 2
        assert report["cluster_environment"] == "SLURMEnvironment"
        assert report["node_rank"] == {"n1": 0, "n2": 1}[report["slurm_node"]]
        assert report["global_rank"] == report["node_rank"] * TASKS_PER_NODE + report["local_rank"]
    checkpoint = torch.load(straight_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == MAX_STEPS
    assert checkpoint["TokenDataModule"]["examples_consumed"] == MAX_STEPS * 4 * 4  # steps x batch x world
    assert sorted(global_losses(straight_run)) == list(range(1, MAX_STEPS + 1))


@needs_slurm
@pytest.mark.slow
def test_preempted_job_is_requeued_and_ends_like_an_uninterrupted_one(
    cluster: LocalSlurm, straight_run: Path, tmp_path: Path
) -> None:
    job_id, log = submit(cluster, tmp_path)
    checkpoints = tmp_path / "checkpoints"
    cluster.wait_until(job_id, {"RUNNING"}, timeout=60)
    waited = _wait_for_file(checkpoints, "epoch=*", timeout=180)
    assert waited is None, f"{waited}: {log.read_text()[-3000:] if log.exists() else ''}"
    cluster.run(["scancel", "--batch", "--signal=USR1", job_id])  # what SLURM sends --signal seconds before the end
    finish(cluster, job_id, log, timeout=360)

    text = log.read_text()
    assert cluster.job_field(job_id, "Restarts") == "1"
    stopped = int(re.search(r"Stopped at step (\d+)", text).group(1))
    assert 0 < stopped < MAX_STEPS
    assert f"Resuming the training stream after {stopped * 4 * 4} examples" in text
    assert len(list((tmp_path / "ranks").glob("*-restart1.json"))) == 4

    straight, resumed = global_losses(straight_run), global_losses(tmp_path)
    assert sorted(resumed) == list(range(1, MAX_STEPS + 1))  # each step once: resumed exactly after `stopped`
    for step in range(1, MAX_STEPS + 1):
        assert resumed[step] == pytest.approx(straight[step], abs=LOSS_TOLERANCE), f"step {step}"
    final = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == MAX_STEPS
    configs = sorted(path.parent.name for path in (tmp_path / "lightning_logs").glob("*/config.yaml"))
    assert configs == ["version_0", "version_1"]  # the requeued run saved its config too


def _wait_for_file(folder: Path, pattern: str, timeout: float) -> str | None:
    """None once a file matching `pattern` is in `folder`, else a message after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (folder.is_dir() and any(folder.glob(pattern))):
        if time.monotonic() > deadline:
            return f"no {pattern} in {folder} after {timeout} s"
        time.sleep(0.2)
    return None


@needs_slurm
@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--nodes", "2", "--gpus-per-node", "2", "--config", SMOKE], "trainer.devices=1"),
        (["--nodes", "2", "--gpus-per-node", "1", "--config", SMOKE, "--partition", "nosuch"], "sbatch refused"),
    ],
)
def test_submission_refused_before_anything_is_queued(
    cluster: LocalSlurm, tmp_path: Path, argv: list[str], expected: str
) -> None:
    def jobs() -> set[str]:
        return set(cluster.run(["squeue", "--noheader", "--states=all", "--format=%i"]).stdout.split())

    before = jobs()
    command = [FREEATTEN, "submit", "--log-dir", str(tmp_path), *argv]
    result = subprocess.run(command, env=cluster.env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and expected in result.stderr
    assert jobs() == before
