"""`freeatten reproduce` end to end at toy scale (trains, evaluates, writes the results page, resumes), and the
paper-scale recipe started on the CPU with the nano model and FineWeb-like shards."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from freeatten_lightning.reproduce import reproduce_main

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIG = "configs/experiment/gpt2-small-fineweb.yaml"
PAPER_ON_CPU = [  # the paper's recipe as it is, except for the hardware and the model size
    "--trainer.accelerator=cpu",
    "--trainer.precision=32-true",
    "--trainer.max_steps=3",
    "--trainer.enable_progress_bar=false",
    "--model.preset=nano",
    "--data.batch_size=2",
    "--data.val_tokens=32768",
    "--data.num_workers=0",
]
TOY = [
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=4",
    "--model.preset=nano",
    "--model.n_layer=1",
    "--data.seq_len=128",
    "--data.batch_size=4",
    "--data.val_tokens=1024",
]


@pytest.mark.slow
def test_reproduce_writes_the_results_page_and_skips_finished_variants(tmp_path: Path, embedded_dir: Path) -> None:
    out, page = tmp_path / "runs", tmp_path / "docs" / "results.md"
    args = [
        f"--out={out}",
        f"--config={REPO / 'configs' / 'experiment' / 'reproduce.yaml'}",
        "--variants",
        "softmax",
        "lssar-p15",
        f"--docs={page}",
        "--tokens=4096",
        "--passkey-trials=1",
        *TOY,
    ]
    assert reproduce_main(args) == 0
    text = page.read_text()
    for label in ("| Softmax |", "| LSSAR p=15 |", "expected at or below 1.05", "3.3171", f"reproduce --out={out}"):
        assert label in text
    for image in ("loss_vs_length.png", "passkey.png"):
        assert (page.parent / "results" / image).stat().st_size > 5000
    first = (out / "softmax" / "done.json").stat().st_mtime
    assert reproduce_main(args) == 0
    assert (out / "softmax" / "done.json").stat().st_mtime == first, "a finished variant was trained again"


@pytest.mark.slow
def test_paper_recipe_starts_on_cpu(tmp_path: Path, fineweb_like_dir: Path) -> None:
    """configs/experiment/gpt2-small-fineweb.yaml trains a few steps at context 1,024 on llm.c-named GPT-2 shards
    and its length evaluation reaches 16K (16 x 1,024) at the end."""
    command = [sys.executable, "-m", "freeatten_lightning.cli", "fit", f"--config={PAPER_CONFIG}", *PAPER_ON_CPU]
    command += ["--trainer.devices=1", "--trainer.strategy=auto", f"--data.data_dir={fineweb_like_dir}"]
    command += [f"--trainer.default_root_dir={tmp_path}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3
    hparams = checkpoint["hyper_parameters"]
    assert (hparams["seq_len"], hparams["vocab_size"], hparams["attention"], hparams["p"]) == (1024, 50257, "lssar", 15)
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    final = {key: float(value) for row in rows for key, value in row.items() if key.startswith("val/loss@") and value}
    assert sorted(int(key.split("@")[1]) for key in final) == [1024, 2048, 4096, 8192, 16384]
    assert all(10.0 < loss < 11.5 for loss in final.values()), final  # random ids: about ln(50,257) = 10.8
