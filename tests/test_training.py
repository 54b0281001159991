"""Training through the real Lightning Trainer: every variant learns, and an interrupted run resumes exactly."""

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from freeatten_lightning.attention import VARIANTS
from freeatten_lightning.callbacks import GracefulStop
from freeatten_lightning.data.datamodule import TokenDataModule
from freeatten_lightning.language_model import LanguageModel

SEQ_LEN = 64


def tiny_model(attention: str = "lssar", **overrides) -> LanguageModel:
    settings = dict(preset="nano", n_layer=2, d_model=64, n_head=2, seq_len=SEQ_LEN, lr=3e-3, warmup_steps=5)
    return LanguageModel(attention=attention, **(settings | overrides))


def tiny_data(**overrides) -> TokenDataModule:
    return TokenDataModule(**({"seq_len": SEQ_LEN, "batch_size": 8, "val_tokens": 4096} | overrides))


def trainer(root: Path, max_steps: int, callbacks: list[L.Callback] = (), **overrides) -> L.Trainer:
    settings = dict(
        default_root_dir=root,
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=1.0,
    )
    return L.Trainer(callbacks=[*callbacks, GracefulStop()], **(settings | overrides))


class LossRecorder(L.Callback):
    """Training loss at every optimizer step."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


class SignalAtStep(L.Callback):
    """Sends this process a real signal after a given optimizer step, as Ctrl-C or a scheduler would."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("attention", list(VARIANTS))
def test_every_variant_learns(attention: str, tmp_path: Path, embedded_dir: Path) -> None:
    """60 steps on the embedded corpus take the validation loss well below the uniform ln(257) = 5.55."""
    L.seed_everything(0)
    model, data = tiny_model(attention), tiny_data()
    run = trainer(tmp_path, max_steps=60, limit_val_batches=None)
    before = run.validate(model, datamodule=data, verbose=False)[0]["val/loss"]
    run.fit(model, datamodule=data)
    after = run.validate(model, datamodule=data, verbose=False)[0]["val/loss"]
    assert before > 5.0
    assert after < before - 2.0, f"{attention}: val loss {before:.3f} -> {after:.3f}"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_run_resumes_where_it_stopped(signum: int, tmp_path: Path, embedded_dir: Path) -> None:
    """A run signalled at step k and resumed from last.ckpt has the same loss at step 2k as an uninterrupted run."""
    k = 6
    L.seed_everything(0)
    straight = LossRecorder()
    trainer(tmp_path / "straight", 2 * k, [straight]).fit(tiny_model(), datamodule=tiny_data())

    L.seed_everything(0)
    first = LossRecorder()
    interrupted = trainer(tmp_path / "resumed", 2 * k, [first, SignalAtStep(k, signum)])
    interrupted.fit(tiny_model(), datamodule=tiny_data())
    stop = next(cb for cb in interrupted.callbacks if isinstance(cb, GracefulStop))
    assert interrupted.global_step == k and stop.received == signum
    assert stop.saved_path is not None and stop.saved_path.is_file()

    L.seed_everything(123)
    second = LossRecorder()
    resumed = trainer(tmp_path / "resumed", 2 * k, [second])
    resumed.fit(tiny_model(), datamodule=tiny_data(), ckpt_path=str(stop.saved_path))
    assert sorted(second.losses) == list(range(k + 1, 2 * k + 1))
    for step in range(1, k + 1):
        assert first.losses[step] == pytest.approx(straight.losses[step], abs=1e-6)
    for step in range(k + 1, 2 * k + 1):
        assert second.losses[step] == pytest.approx(straight.losses[step], abs=1e-5), f"step {step}"


def test_resume_with_gradient_accumulation(tmp_path: Path, embedded_dir: Path) -> None:
    """With accumulation, the saved data position counts whole optimizer steps of micro-batches."""
    L.seed_everything(0)
    straight = LossRecorder()
    trainer(tmp_path / "a", 6, [straight], accumulate_grad_batches=2).fit(tiny_model(), datamodule=tiny_data())
    L.seed_everything(0)
    interrupted = trainer(tmp_path / "b", 6, [SignalAtStep(3, signal.SIGTERM)], accumulate_grad_batches=2)
    interrupted.fit(tiny_model(), datamodule=tiny_data())
    data = tiny_data()
    resumed_run = LossRecorder()
    checkpoint = tmp_path / "b" / "checkpoints" / "last.ckpt"
    trainer(tmp_path / "b", 6, [resumed_run], accumulate_grad_batches=2).fit(
        tiny_model(), datamodule=data, ckpt_path=str(checkpoint)
    )
    assert data.examples_consumed() == 6 * 2 * 8
    assert resumed_run.losses[6] == pytest.approx(straight.losses[6], abs=1e-5)


def test_validation_logs_token_weighted_loss_and_perplexity(tmp_path: Path, embedded_dir: Path) -> None:
    L.seed_everything(0)
    model, data = tiny_model(), tiny_data(val_tokens=SEQ_LEN * 5, val_batch_size=2)
    metrics = trainer(tmp_path, 1, limit_val_batches=None).validate(model, datamodule=data, verbose=False)[0]
    model.configure_model()
    model.eval()
    data.setup("validate")
    windows = torch.stack([data.val_dataloader().dataset[i] for i in range(5)])
    with torch.no_grad():
        logits = model(windows[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    assert metrics["val/loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(expected.exp().item(), rel=1e-5)


@pytest.mark.parametrize(
    ("model_options", "trainer_options"),
    [
        pytest.param({}, {"precision": "bf16-mixed"}, id="bf16-mixed"),
        pytest.param({"compile": True}, {}, id="torch.compile", marks=pytest.mark.slow),
    ],
)
def test_precision_and_compile_options_train(
    model_options: dict, trainer_options: dict, tmp_path: Path, embedded_dir: Path
) -> None:
    """bf16 autocast and torch.compile give finite, falling losses close to the fp32 eager run."""
    losses = []
    for run, (model_kwargs, trainer_kwargs) in enumerate((({}, {}), (model_options, trainer_options))):
        L.seed_everything(0)
        recorder = LossRecorder()
        trainer(tmp_path / str(run), 8, [recorder], **trainer_kwargs).fit(
            tiny_model(**model_kwargs), datamodule=tiny_data()
        )
        losses.append(recorder.losses)
    eager, option = losses
    assert option[8] < option[1]
    for step in (1, 8):
        assert option[step] == pytest.approx(eager[step], rel=0.02)


def test_stop_before_the_first_periodic_checkpoint_resumes_from_last(tmp_path: Path, embedded_dir: Path) -> None:
    """With ModelCheckpoint present, the stop leaves one last.ckpt (no end-of-epoch `last-v1`) and
    `ckpt_path="last"` resumes at the stopped step with the uninterrupted losses."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def checkpointed(root: Path, *callbacks: L.Callback) -> L.Trainer:
        periodic = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=100, save_last=True)
        options = {"enable_checkpointing": True, "limit_val_batches": None, "val_check_interval": 4}
        return trainer(root, 8, [periodic, *callbacks], **options)

    L.seed_everything(0)
    straight, resumed = LossRecorder(), LossRecorder()
    checkpointed(tmp_path / "a", straight).fit(tiny_model(), datamodule=tiny_data())
    L.seed_everything(0)
    checkpointed(tmp_path / "b", SignalAtStep(3, signal.SIGTERM)).fit(tiny_model(), datamodule=tiny_data())
    assert sorted(path.name for path in (tmp_path / "b" / "checkpoints").iterdir()) == ["last.ckpt"]
    checkpointed(tmp_path / "b", resumed).fit(tiny_model(), datamodule=tiny_data(), ckpt_path="last")
    assert sorted(resumed.losses) == [4, 5, 6, 7, 8]
    assert resumed.losses[8] == pytest.approx(straight.losses[8], abs=1e-5)
