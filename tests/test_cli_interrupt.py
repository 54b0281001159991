"""The real `freeatten` process stopped by SIGTERM mid-run, then resumed with `--ckpt_path last`."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 80
ARGS = [
    "fit",
    "--config",
    str(REPO / "configs" / "experiment" / "smoke.yaml"),
    "--trainer.enable_progress_bar=false",
    f"--trainer.max_steps={STEPS}",
    f"--trainer.val_check_interval={STEPS}",
    "--trainer.log_every_n_steps=1",
    "--checkpoint.every_n_train_steps=5",
    "--data.seq_len=32",
    "--data.batch_size=4",
    "--data.val_tokens=512",
    "--model.n_layer=1",
]


def freeatten(root: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "freeatten_lightning.cli", *ARGS, f"--trainer.default_root_dir={root}", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ)


def train_loss_by_step(root: Path) -> dict[int, float]:
    losses = {}
    for metrics in sorted(root.glob("lightning_logs/version_*/metrics.csv")):
        with metrics.open() as handle:
            for row in csv.DictReader(handle):
                if row.get("train/loss"):
                    losses[int(row["step"])] = float(row["train/loss"])
    return losses


@pytest.mark.slow
def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(tmp_path: Path, embedded_dir: Path) -> None:
    straight = freeatten(tmp_path / "straight")
    output = straight.communicate(timeout=600)[0]
    assert straight.returncode == 0, output

    run = freeatten(tmp_path / "stopped")
    deadline = time.monotonic() + 300
    while not list((tmp_path / "stopped" / "checkpoints").glob("*step=5*.ckpt")):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0]
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 128 + signal.SIGTERM, output
    assert "SIGTERM received" in output and "resume with --ckpt_path last" in output
    stopped_at = max(train_loss_by_step(tmp_path / "stopped"))
    assert stopped_at < STEPS - 1, "the signal arrived too late to test anything"
    assert (tmp_path / "stopped" / "checkpoints" / "last.ckpt").is_file()

    resumed = freeatten(tmp_path / "stopped", "--ckpt_path=last")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert "Resuming the training stream after" in output

    expected, got = train_loss_by_step(tmp_path / "straight"), train_loss_by_step(tmp_path / "stopped")
    assert set(got) == set(expected)
    for step in (stopped_at + 1, STEPS - 1):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step
