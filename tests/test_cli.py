"""The `freeatten` command: overrides, config round trip, validate from a checkpoint, and clear errors."""

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from freeatten_lightning.cli import FreeattenCLI
from freeatten_lightning.data import write_shard

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "experiment" / "smoke.yaml")
QUICK = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.seq_len=32",
    "--data.batch_size=4",
    "--data.val_tokens=512",
    "--model.n_layer=1",
]


def test_overrides_land_in_the_model_and_data(tmp_path: Path) -> None:
    args = ["--config", SMOKE, "--model.attention", "lssa", "--model.d_model", "64"]
    cli = FreeattenCLI(args=[*args, "--data.seq_len", "96", "--trainer.default_root_dir", str(tmp_path)], run=False)
    config = cli.model.config
    assert (config.attention.name, config.d_model, config.seq_len, config.vocab_size) == ("lssa", 64, 96, 257)
    assert cli.datamodule.hparams.seq_len == 96
    checkpoint = cli.trainer.checkpoint_callback
    assert Path(checkpoint.dirpath) == tmp_path / "checkpoints"


def test_print_config_round_trips(tmp_path: Path, embedded_dir: Path, freeatten) -> None:
    """The printed config, fed back, prints the same config and trains to the same loss."""
    root = ["--trainer.default_root_dir", str(tmp_path / "a")]
    overrides = ["--model.attention", "relu", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3"]
    args = ["fit", "--config", SMOKE, *QUICK, *overrides, *root]
    code, printed, _ = freeatten([*args, "--print_config"])
    assert code == 0
    assert yaml.safe_load(printed)["model"]["attention"] == "relu"
    dumped = tmp_path / "run.yaml"
    dumped.write_text(printed)
    code, printed_again, _ = freeatten(["fit", "--config", str(dumped), "--print_config"])
    assert code == 0 and printed_again == printed

    original = FreeattenCLI(args=args)
    replayed = FreeattenCLI(args=["fit", "--config", str(dumped), "--trainer.default_root_dir", str(tmp_path / "b")])
    assert replayed.model.hparams == original.model.hparams
    for metric in ("train/loss", "val/loss"):
        assert float(replayed.trainer.callback_metrics[metric]) == float(original.trainer.callback_metrics[metric])


def test_fit_then_validate_from_the_checkpoint_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture, embedded_dir: Path
) -> None:
    """`validate --ckpt_path` rebuilds model and data from the checkpoint and gets fit's last val loss."""
    run = ["--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "4", "--trainer.val_check_interval", "4"]
    fit = FreeattenCLI(args=["fit", "--config", SMOKE, *QUICK, *run, "--model.attention", "lssa"])
    fit_loss = float(fit.trainer.callback_metrics["val/loss"])
    out = capsys.readouterr().out
    assert "final val loss" in out and "checkpoint:" in out
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    assert (tmp_path / "lightning_logs" / "version_0" / "loss.png").stat().st_size > 1000

    validate = FreeattenCLI(args=["validate", "--ckpt_path", str(checkpoint), "--trainer.logger=false"])
    assert validate.model.config.attention.name == "lssa" and validate.model.config.n_layer == 1
    assert validate.datamodule.hparams.seq_len == 32
    assert float(validate.trainer.callback_metrics["val/loss"]) == pytest.approx(fit_loss, rel=1e-6)


def write_folder(folder: Path, train_tokens: int = 4000, val_tokens: int = 1000) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    write_shard(folder / "toy_train_000001.bin", rng.integers(0, 256, train_tokens))
    write_shard(folder / "toy_val_000000.bin", rng.integers(0, 256, val_tokens))
    return folder


def corrupt_magic(folder: Path) -> None:
    path = folder / "toy_train_000001.bin"
    raw = bytearray(path.read_bytes())
    raw[0:4] = (12345).to_bytes(4, "little")
    path.write_bytes(bytes(raw))


def truncate(folder: Path) -> None:
    path = folder / "toy_train_000001.bin"
    path.write_bytes(path.read_bytes()[:-100])


BAD_INPUTS = {
    "unknown attention": (["--model.attention", "lsar"], "Expected a typing.Literal"),
    "config typo": (["--model.atention", "lssa"], "unrecognized arguments: --model.atention"),
    "head dim not dividing width": (["--model.n_head", "3"], "is not divisible by model.n_head=3"),
    "unknown preset": (["--model.preset", "gpt5"], "unknown model preset 'gpt5'"),
    "missing data folder": (["--data.data_dir", "{tmp}/nowhere"], "does not exist: point it at a folder"),
    "no shards": (["--data.data_dir", "{tmp}/empty"], "no shards matching '*train*.bin'"),
    "wrong magic": (["--data.data_dir", "{tmp}/magic"], "magic"),
    "truncated shard": (["--data.data_dir", "{tmp}/truncated"], "truncated"),
    "context longer than the data": (
        ["--data.data_dir", "{tmp}/small", "--data.seq_len", "2000", "--data.val_tokens", "null"],
        "needs windows of 2001 tokens but the validation shards",
    ),
    "tokenizer mismatch": (["--data.data_dir", "{tmp}/bytes", "--data.tokenizer", "gpt2"], "set --data.tokenizer byte"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_clear_error(case: str, tmp_path: Path, embedded_dir: Path, freeatten) -> None:
    (tmp_path / "empty").mkdir()
    corrupt_magic(write_folder(tmp_path / "magic"))
    truncate(write_folder(tmp_path / "truncated"))
    write_folder(tmp_path / "small", train_tokens=5000, val_tokens=1500)
    bytes_dir = write_folder(tmp_path / "bytes")
    (bytes_dir / "meta.json").write_text('{"tokenizer": "byte"}')
    args, expected = BAD_INPUTS[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    run = ["--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "1"]
    code, _, err = freeatten(["fit", "--config", SMOKE, *QUICK, *run, *args])
    assert code == 2
    assert expected in err, err
    assert "Traceback" not in err
    assert len(re.findall(r"^error:", err, flags=re.M)) == 1


def test_prepare_then_train_on_the_prepared_shards(tmp_path: Path, freeatten) -> None:
    """`freeatten prepare` on a folder of text files, then `freeatten fit --data.data_dir` on its output."""
    from freeatten_lightning.data import embedded_documents

    texts = tmp_path / "texts"
    texts.mkdir()
    for number, document in enumerate(embedded_documents()[:30]):
        (texts / f"doc{number:02d}.txt").write_text(document)
    code, out, err = freeatten(["prepare", "--input", str(texts), "--output", str(tmp_path / "shards")])
    assert code == 0, err
    run = ["--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "2"]
    fit = FreeattenCLI(args=["fit", "--config", SMOKE, *QUICK, *run, "--data.data_dir", str(tmp_path / "shards")])
    assert fit.trainer.global_step == 2
    assert fit.datamodule.shard_dir == tmp_path / "shards"
