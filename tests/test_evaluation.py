"""Loss at growing context lengths: the core against a direct computation, the training callback (numbers,
files, no effect on training, DDP), and `freeatten eval-lengths` with its overrides and errors."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
from matplotlib.image import imread

import freeatten_lightning.evaluation.lengths as lengths_module
from freeatten_lightning.attention import AttentionSpec
from freeatten_lightning.data.datamodule import TokenDataModule
from freeatten_lightning.data.tokenizers import ByteTokenizer
from freeatten_lightning.errors import FreeattenError
from freeatten_lightning.evaluation import (
    LengthExtrapolationEval,
    LengthResult,
    evaluate_lengths,
    parse_lengths,
    scaled_lengths,
    scored_token_count,
)
from freeatten_lightning.evaluation.generate import generate
from freeatten_lightning.evaluation.lengths import _rank_batches, evaluation_mode
from freeatten_lightning.evaluation.loading import load_checkpoint, override_attention
from freeatten_lightning.evaluation.report import plot_lengths
from freeatten_lightning.language_model import LanguageModel
from freeatten_lightning.model.gpt import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_gpt(attention: str = "lssar") -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(seq_len=SEQ_LEN, n_layer=2, n_head=2, d_model=32, attention=AttentionSpec(attention))
    return GPT(config).double()


def direct_loss(model: GPT, tokens: np.ndarray, length: int, scored: int) -> float:
    """Mean NLL over the non-overlapping windows of `length`, computed with the full logits."""
    windows = torch.from_numpy(tokens[: scored + 1].astype(np.int64))
    losses = []
    with torch.no_grad():
        for start in range(0, scored, length):
            window = windows[start : start + length + 1][None]
            losses.append(F.cross_entropy(model(window[:, :-1])[0].float(), window[0, 1:], reduction="none"))
    return float(torch.cat(losses).double().mean())


def test_scored_tokens_are_whole_windows_of_every_length() -> None:
    assert scaled_lengths(128) == [128, 256, 512, 1024, 2048]
    assert scored_token_count([128, 256, 2048], available=10_000) == 8192
    assert scored_token_count([128, 256, 2048], available=10_000, budget=5000) == 4096
    assert scored_token_count([96, 64], available=1000) == 960
    assert parse_lengths("1024, 2048,4096") == [1024, 2048, 4096]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: scored_token_count([], 100), "empty"),
        (lambda: parse_lengths(" , "), "empty"),
        (lambda: parse_lengths("1k"), "comma-separated integers"),
        (lambda: scored_token_count([0, 16], 100), "positive"),
        (lambda: scored_token_count([16, 256], 100), "longer than the validation data"),
        (lambda: scored_token_count([16, 64], 1000, budget=32), "shorter than the longest length"),
        (lambda: scored_token_count([48, 64], 150), "least common multiple"),
        (lambda: scored_token_count([16, 64], 1000, stride=6), "stride 6"),
    ],
)
def test_bad_lengths_get_clear_errors(call, message: str) -> None:
    with pytest.raises(FreeattenError, match=message):
        call()


@pytest.mark.parametrize("attention", ["softmax", "lssar"])
def test_losses_equal_a_direct_computation_with_equal_token_counts(attention: str, monkeypatch) -> None:
    """Tiny logit chunks force the chunked cross-entropy through many slices; the numbers must not change."""
    monkeypatch.setattr(lengths_module, "LOGITS_PER_CHUNK", 3 * 257)
    model = tiny_gpt(attention)
    tokens = np.random.default_rng(0).integers(0, 257, 700)
    lengths = [16, 32, 64, 128]
    scored = scored_token_count(lengths, len(tokens) - 1)
    results = evaluate_lengths(model, tokens, lengths, scored, batch_tokens=48, position_curve=True, progress=False)
    assert scored == 640 and [r.tokens for r in results] == [640] * 4
    assert [r.windows for r in results] == [40, 20, 10, 5]
    for result in results:
        assert result.loss == pytest.approx(direct_loss(model, tokens, result.length, scored), rel=1e-6)
        assert result.ppl == pytest.approx(math.exp(result.loss))
        assert np.mean(result.position_loss) == pytest.approx(result.loss, rel=1e-9)


def test_sliding_windows_score_every_target_once_with_its_context() -> None:
    model = tiny_gpt("lssa")
    tokens = np.random.default_rng(1).integers(0, 257, 200)
    length, stride, scored = 32, 8, 64
    (result,) = evaluate_lengths(model, tokens, [length], scored, stride=stride, batch_tokens=64, progress=False)
    expected = []
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        for target in range(1, scored + 1):
            start = 0 if target <= length else math.ceil((target - length) / stride) * stride
            logits = model(ids[start:target][None])[0, -1]
            expected.append(float(F.cross_entropy(logits[None].float(), ids[target : target + 1])))
    assert result.tokens == scored and result.windows == 1 + (scored - length) // stride
    assert result.loss == pytest.approx(np.mean(expected), rel=1e-6)
    (plain,) = evaluate_lengths(model, tokens, [length], scored, stride=length, progress=False)
    assert plain.loss == pytest.approx(direct_loss(model, tokens, length, scored), rel=1e-6)


@pytest.mark.parametrize(("windows", "world_size", "batch_size"), [(5, 2, 2), (7, 3, 1), (2, 4, 3)])
def test_ranks_score_disjoint_windows_in_equally_many_equal_batches(windows, world_size, batch_size) -> None:
    plans = [_rank_batches(windows, batch_size, rank, world_size) for rank in range(world_size)]
    assert len({tuple(len(batch) for batch in plan) for plan in plans}) == 1
    real = sorted(i for plan in plans for batch in plan for i in batch if i >= 0)
    assert real == list(range(windows))


def test_per_rank_sums_combine_to_the_single_process_result() -> None:
    """Each rank's share (padded slots weighted 0) recombines to the one-process loss."""
    model = tiny_gpt()
    tokens = np.random.default_rng(2).integers(0, 257, 600)
    single = evaluate_lengths(model, tokens, [16, 64], 448, progress=False)
    shares = [evaluate_lengths(model, tokens, [16, 64], 448, rank=r, world_size=3, progress=False) for r in range(3)]
    for i, result in enumerate(single):
        total = sum(share[i].loss * share[i].tokens for share in shares)
        assert sum(share[i].tokens for share in shares) == result.tokens
        assert total / result.tokens == pytest.approx(result.loss, rel=1e-9)


def test_evaluation_restores_every_module_mode() -> None:
    model = tiny_gpt().train()
    model.blocks[0].eval()
    before = [m.training for m in model.modules()]
    with evaluation_mode(model):
        assert not any(m.training for m in model.modules()) and not torch.is_grad_enabled()
    assert [m.training for m in model.modules()] == before


def test_length_plot_has_one_line_per_run() -> None:
    runs = [(f"run {i}", [LengthResult(n, 3.0 + i + n / 1000, 64, 1) for n in (16, 32, 64)]) for i in range(3)]
    fig = plot_lengths(Path(os.devnull), runs, "test", train_length=16)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 4 and [line.get_label() for line in lines[:3]] == ["run 0", "run 1", "run 2"]
    assert list(lines[1].get_ydata()) == [r.loss for r in runs[1][1]]


# --- the callback in the real Lightning Trainer ---


def lm(attention: str = "lssar") -> LanguageModel:
    return LanguageModel(n_layer=1, n_head=2, d_model=32, seq_len=SEQ_LEN, attention=attention, warmup_steps=2)


def data() -> TokenDataModule:
    return TokenDataModule(seq_len=SEQ_LEN, batch_size=4, val_tokens=2048)


def fit(root: Path, callbacks: list[L.Callback], steps: int = 4, attention: str = "lssar") -> LanguageModel:
    L.seed_everything(0)
    model = lm(attention)
    trainer = L.Trainer(
        default_root_dir=root,
        max_steps=steps,
        accelerator="cpu",
        logger=CSVLogger(root),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data())
    return model


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.read_text().splitlines()))


def logged(root: Path) -> dict[int, dict[str, float]]:
    """metrics.csv of a CSVLogger run: step -> {metric: value}."""
    rows = {}
    for row in read_csv(next(root.rglob("metrics.csv"))):
        rows.setdefault(int(row["step"]), {}).update({k: float(v) for k, v in row.items() if v and k != "step"})
    return rows


def test_callback_logs_the_direct_losses_and_writes_its_report(tmp_path: Path, embedded_dir: Path, capsys) -> None:
    callback = LengthExtrapolationEval(every_n_steps=2, tokens=1024, position_curve=True)
    model = fit(tmp_path, [callback])
    metrics = logged(tmp_path)
    assert [step for step, _ in callback.history] == [2, 4]
    val = TokenDataModule(seq_len=SEQ_LEN, val_tokens=2048)
    val.setup("fit")
    gpt = model.model
    for length in scaled_lengths(SEQ_LEN):
        expected = direct_loss(gpt, val.val_tokens_array, length, 1024)
        assert metrics[4][f"val/loss@{length}"] == pytest.approx(expected, rel=1e-5)
        assert metrics[4][f"val/ppl@{length}"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert {r.tokens for r in callback.history[-1][1]} == {1024}
    log_dir = Path(model.trainer.log_dir)
    table = read_csv(log_dir / "length_eval.csv")
    assert len(table) == 10 and {row["scored_tokens"] for row in table} == {"1024"}
    assert "| step 4 |" in (log_dir / "length_eval.md").read_text()
    for name in ("length_eval.png", "length_eval_positions.png"):
        assert (log_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert imread(log_dir / name).shape[:2] == (495, 770)
    assert "lssar (p=15): validation loss" in capsys.readouterr().out


def test_evaluation_never_changes_training(tmp_path: Path, embedded_dir: Path) -> None:
    """Evaluating after every step leaves the weights bit-identical to a run without the callback."""
    with_eval = fit(tmp_path / "a", [LengthExtrapolationEval(every_n_steps=1, tokens=256)], steps=3)
    without = fit(tmp_path / "b", [], steps=3)
    for (name, a), (_, b) in zip(with_eval.state_dict().items(), without.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert with_eval.model.training


def test_callback_refuses_lengths_beyond_the_validation_data_before_training(tmp_path: Path, embedded_dir) -> None:
    callback = LengthExtrapolationEval(lengths=[16, 4096])
    with pytest.raises(FreeattenError, match="longer than the validation data"):
        fit(tmp_path, [callback])
    with pytest.raises(FreeattenError, match="empty"):
        LengthExtrapolationEval(multiples=[])


# --- offline comparison ---


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, embedded_dir) -> dict[str, Path]:
    """Checkpoints of short softmax and lssa runs (with their data config), like `freeatten fit` writes."""
    paths = {}
    for attention in ("softmax", "lssa"):
        root = tmp_path_factory.mktemp(attention, numbered=False)
        model = fit(root, [], steps=3, attention=attention)
        paths[attention] = root / "checkpoints" / "last.ckpt"
        model.trainer.save_checkpoint(paths[attention])
    return paths


def test_eval_lengths_compares_checkpoints_side_by_side(checkpoints, tmp_path: Path, freeatten) -> None:
    out = tmp_path / "out"
    args = ["eval-lengths", "--ckpt", str(checkpoints["softmax"]), "--ckpt", str(checkpoints["lssa"])]
    code, stdout, _ = freeatten([*args, "--multiples", "1,4,16", "--tokens", "512", "--out", str(out)])
    assert code == 0
    assert "softmax: softmax" in stdout and "lssa: lssa" in stdout and "512 scored tokens" in stdout
    rows = read_csv(out / "eval_lengths.csv")
    assert [(r["attention"], int(r["length"])) for r in rows] == [
        (a, n) for a in ("softmax", "lssa") for n in (16, 64, 256)
    ]
    tokens = TokenDataModule(seq_len=SEQ_LEN, val_tokens=512)
    tokens.setup("fit")
    for row in rows:
        model = load_checkpoint(checkpoints[row["attention"]]).model
        expected = direct_loss(model, tokens.val_tokens_array, int(row["length"]), 512)
        assert float(row["loss"]) == pytest.approx(expected, rel=1e-5)
        assert int(row["tokens"]) == 512
    assert (out / "eval_lengths.md").read_text().count("\n| ") == 4
    assert imread(out / "eval_lengths.png").shape[:2] == (495, 770)


def test_inference_time_reweighting_is_labelled_and_changes_the_numbers(checkpoints, tmp_path: Path, freeatten) -> None:
    args = ["eval-lengths", "--ckpt", str(checkpoints["lssa"]), "--attention", "lssar", "--p", "15", "--with-trained"]
    code, stdout, _ = freeatten([*args, "--lengths", "16,64", "--tokens", "256", "--out", str(tmp_path)])
    assert code == 0
    assert "lssa -> lssar (p=15), inference-time" in stdout
    rows = read_csv(tmp_path / "eval_lengths.csv")
    assert [r["attention"] for r in rows] == ["lssa", "lssa", "lssar (p=15)", "lssar (p=15)"]
    assert rows[0]["loss"] != rows[2]["loss"]


def test_generate_continues_the_prompt_with_the_cache(checkpoints, freeatten) -> None:
    args = ["generate", "--ckpt", str(checkpoints["lssa"]), "--prompt", "The list", "-n", "24", "--temperature", "0"]
    code, stdout, _ = freeatten(args)
    assert code == 0
    header, text = stdout.split("\n", 1)
    assert header == "# lssa: lssa, 33 tokens (trained at 16)"
    model = load_checkpoint(checkpoints["lssa"]).model
    prompt = torch.tensor([[256, *b"The list"]])
    expected = generate(model, prompt, 24)[0].tolist()
    assert text == "The list" + ByteTokenizer().decode(expected) + "\n"


def test_attention_override_rules() -> None:
    assert override_attention(AttentionSpec("lssa"), "lssar", 3.0) == AttentionSpec("lssar", 3.0)
    assert override_attention(AttentionSpec("lssar", 3.0), None, None) == AttentionSpec("lssar", 3.0)
    assert override_attention(AttentionSpec("lssar", 3.0), "lssa", None).name == "lssa"
    assert override_attention(AttentionSpec("softmax"), "softmax-reweight", None) == AttentionSpec("softmax-reweight")
    with pytest.raises(FreeattenError, match="cannot be evaluated as lssar"):
        override_attention(AttentionSpec("softmax"), "lssar", None)
    with pytest.raises(FreeattenError, match="choose one of sigmoid"):
        override_attention(AttentionSpec("sigmoid"), "softmax", None)
    with pytest.raises(FreeattenError, match="--p sets the re-weighting power"):
        override_attention(AttentionSpec("lssar"), "lssa", 3.0)


def altered(path: Path, folder: Path, change) -> Path:
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, folder / "altered.ckpt")
    return folder / "altered.ckpt"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lengths", "16,100000"], "longer than the validation data"),
        (["--lengths", ""], "empty"),
        (["--attention", "lssa"], "cannot be evaluated as lssa"),
        (["--stride", "5"], "stride 5"),
        (["--ckpt", "{missing}"], "does not exist"),
        (["--ckpt", "{other_tokenizer}"], "trained on the same tokenization"),
        (["--ckpt", "{other_shape}"], "do not match the model its config describes"),
        (["--ckpt", "{other_length}"], "trained at different lengths"),
    ],
)
def test_eval_lengths_bad_input(checkpoints, tmp_path: Path, extra: list[str], message: str, freeatten) -> None:
    softmax = checkpoints["softmax"]
    variants = {
        "missing": tmp_path / "nope.ckpt",
        "other_tokenizer": lambda c: c["datamodule_hyper_parameters"].update(tokenizer="gpt2"),
        "other_shape": lambda c: c["hyper_parameters"].update(n_layer=3),
        "other_length": lambda c: c["hyper_parameters"].update(seq_len=32),
    }
    for name, value in variants.items():
        if "{" + name + "}" in extra:
            path = value if isinstance(value, Path) else altered(softmax, tmp_path, value)
            extra = [str(path) if e == "{" + name + "}" else e for e in extra]
    code, _, err = freeatten(["eval-lengths", "--ckpt", str(softmax), "--tokens", "512", *extra])
    assert code == 2 and err.startswith("error: ") and message in err, err


# --- DDP through the real CLI ---


STRATEGIES = {
    "ddp": ["--trainer.strategy", "ddp"],
    "deepspeed-zero3": [
        "--trainer.strategy", "tests.cpu_deepspeed.CPUDeepSpeedStrategy",
        "--trainer.strategy.config", str(REPO / "configs" / "deepspeed" / "zero3.json"),
    ],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_distributed_runs_log_the_single_process_values(strategy: str, tmp_path: Path, embedded_dir: Path) -> None:
    """Two gloo processes split the windows (unevenly: 3 windows at 4L), and under ZeRO-3 every rank takes part
    in every forward; the logged losses equal a one-process evaluation of the same final weights, and every
    length scores the same tokens."""
    extra = tmp_path / "eval.yaml"
    callback = {"class_path": "freeatten_lightning.evaluation.LengthExtrapolationEval"}
    callback["init_args"] = {"every_n_steps": 2, "multiples": [1, 2, 4], "tokens": 192}
    extra.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    args = [
        sys.executable, "-m", "freeatten_lightning.cli", "fit",
        "--config", str(REPO / "configs" / "experiment" / "smoke.yaml"), "--config", str(extra),
        "--trainer.devices", "2", "--trainer.accelerator", "cpu", *STRATEGIES[strategy],
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path), "--data.seq_len", str(SEQ_LEN), "--data.batch_size", "2",
        "--data.val_tokens", "1024", "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2",
    ]  # fmt: skip
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".ci-cache" / "torch_extensions"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TORCH_EXTENSIONS_DIR": extensions}
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = logged(tmp_path)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    if checkpoint.is_dir():
        convert_zero_checkpoint_to_fp32_state_dict(str(checkpoint), str(tmp_path / "fp32.ckpt"))
        checkpoint = tmp_path / "fp32.ckpt"
    model = load_checkpoint(checkpoint).model
    tokens = TokenDataModule(seq_len=SEQ_LEN, val_tokens=1024)
    tokens.setup("fit")
    single = evaluate_lengths(model, tokens.val_tokens_array, [16, 32, 64], 192, progress=False)
    for result in single:
        assert result.tokens == 192
        assert metrics[2][f"val/loss@{result.length}"] == pytest.approx(result.loss, rel=1e-5)
    assert "length_eval.png" in os.listdir(next(tmp_path.rglob("length_eval.csv")).parent)
    assert done.stdout.count("validation loss (perplexity)") == 1
