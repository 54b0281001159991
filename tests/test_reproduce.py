"""`freeatten reproduce` end to end at toy scale: trains, evaluates, writes the results page, and resumes."""

from pathlib import Path

import pytest

from freeatten_lightning.reproduce import reproduce_main

REPO = Path(__file__).resolve().parents[1]
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
