"""Watch length extrapolation while training: validation loss at L, 2L, 4L, 8L, 16L every N steps."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.seed import isolate_rng

from freeatten_lightning.errors import FreeattenError
from freeatten_lightning.evaluation.lengths import (
    DEFAULT_MULTIPLES,
    LengthResult,
    check_lengths,
    evaluate_lengths,
    scaled_lengths,
    scored_token_count,
)
from freeatten_lightning.evaluation.report import (
    length_table,
    markdown_table,
    plot_lengths,
    plot_positions,
    text_table,
    write_csv,
)


class LengthExtrapolationEval(L.Callback):
    """Every `every_n_steps` optimizer steps and at the end of training, the validation loss at several
    context lengths on the same `tokens` validation tokens; logs `val/loss@<len>` and `val/ppl@<len>`.

    Runs on every rank (windows split across ranks, sums reduced), so it is correct under DDP and DeepSpeed
    ZeRO-3. At the end of training rank 0 writes `length_eval.csv` (every evaluation), `length_eval.md` and
    `length_eval.png` (loss against length, a line per evaluation) into the log dir, and prints the table.
    Evaluation leaves training untouched: RNG states and every module's train/eval mode are restored, and the
    training data stream is not read.

    Args:
        every_n_steps: evaluate every this many optimizer steps; 0 = only at the end of training.
        multiples: lengths as multiples of the training length (data.seq_len), used when `lengths` is unset.
        lengths: explicit context lengths in tokens.
        tokens: scored tokens per length (rounded down to whole windows of every length); None = all the
            validation tokens the data module holds (data.val_tokens).
        stride: sliding-window mode: a window every `stride` tokens scoring its last `stride`; None =
            non-overlapping windows (the paper's protocol).
        batch_tokens: tokens per forward (at least one window); None = the training micro-batch's tokens.
        position_curve: also plot the mean loss at each position of the final evaluation's windows.
        final: evaluate at the end of training (skipped after a Ctrl-C / SIGTERM stop).
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        multiples: list[int] | None = None,
        lengths: list[int] | None = None,
        tokens: int | None = None,
        stride: int | None = None,
        batch_tokens: int | None = None,
        position_curve: bool = False,
        final: bool = True,
    ) -> None:
        if every_n_steps < 0:
            raise FreeattenError(f"every_n_steps must be >= 0 (0 = only at the end), got {every_n_steps}")
        if lengths is not None:
            check_lengths(lengths, "LengthExtrapolationEval lengths")
        self.every_n_steps = every_n_steps
        self.multiples = list(DEFAULT_MULTIPLES if multiples is None else multiples)
        check_lengths(self.multiples, "LengthExtrapolationEval multiples")
        self.lengths = lengths
        self.tokens = tokens
        self.stride = stride
        self.batch_tokens = batch_tokens
        self.position_curve = position_curve
        self.final = final
        self.history: list[tuple[int, list[LengthResult]]] = []
        self._scored = 0
        self._train_length = 0
        self._resolved: list[int] = []
        self._attention = "model"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve the lengths and token budget before training starts, so bad settings fail at once."""
        if stage != "fit":
            return
        self._train_length = int(pl_module.hparams.seq_len)
        self._attention = pl_module.config.attention.label
        self._resolved = list(self.lengths or scaled_lengths(self._train_length, self.multiples))
        self._scored = scored_token_count(self._resolved, len(self._val_tokens(trainer)) - 1, self.tokens, self.stride)
        self.history.clear()
        rank_zero_info(
            f"Length evaluation: {self._scored:,} validation tokens at each length "
            f"{', '.join(f'{n:,}' for n in self._resolved)}"
            + (f" every {self.every_n_steps} steps" if self.every_n_steps else "")
            + (" and at the end of training" if self.final else "")
        )

    @staticmethod
    def _val_tokens(trainer: L.Trainer) -> np.ndarray:
        tokens = getattr(trainer.datamodule, "val_tokens_array", None)
        if tokens is None:
            raise FreeattenError(
                "LengthExtrapolationEval reads the validation tokens of freeatten's TokenDataModule "
                "(data.val_tokens_array); train with that data module or remove the callback"
            )
        return tokens

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int):
        if not self.every_n_steps or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        if trainer.global_step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.final and not _stopped_by_signal(trainer):
            self.evaluate(trainer, pl_module)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a broadcast: every rank must ask
        if trainer.is_global_zero and self.history:
            self.write_report(log_dir)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[LengthResult]:
        """Evaluate at the current step (once per step) on every rank, and log the results."""
        step = trainer.global_step
        if self.history and self.history[-1][0] == step:
            return self.history[-1][1]
        micro_batch = trainer.datamodule.hparams.batch_size * self._train_length
        with isolate_rng():
            results = evaluate_lengths(
                pl_module.model,
                self._val_tokens(trainer),
                self._resolved,
                self._scored,
                stride=self.stride,
                batch_tokens=self.batch_tokens or micro_batch,
                position_curve=self.position_curve,
                rank=trainer.global_rank,
                world_size=trainer.world_size,
                reduce=lambda t: trainer.strategy.reduce(t, reduce_op="sum"),
                autocast=trainer.precision_plugin.val_step_context,
                progress=trainer.is_global_zero,
                desc=f"length eval (step {step})",
            )
        metrics = {}
        for r in results:
            metrics[f"val/loss@{r.length}"] = r.loss
            metrics[f"val/ppl@{r.length}"] = r.ppl
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        self.history.append((step, results))
        return results

    def write_report(self, log_dir: Path) -> dict[str, Path]:
        """Write the CSV of every evaluation, the Markdown table and the plots; print the table."""
        rows = [
            [step, r.length, r.length / self._train_length, f"{r.loss:.6f}", f"{r.ppl:.4f}", r.tokens, r.windows]
            for step, results in self.history
            for r in results
        ]
        header = ["step", "length", "multiple", "loss", "ppl", "scored_tokens", "windows"]
        files = {"csv": write_csv(log_dir / "length_eval.csv", header, rows)}
        attention = self._attention
        labelled = [(f"step {step}", results) for step, results in self.history]
        table_header, table_rows = length_table(labelled, "step")
        mode = "non-overlapping windows" if self.stride is None else f"sliding windows, stride {self.stride}"
        title = f"{attention}: validation loss (perplexity), training length {self._train_length:,}"
        caption = f"{title}; {self._scored:,} scored tokens per length, {mode}.\n\n"
        files["md"] = log_dir / "length_eval.md"
        files["md"].write_text(f"{caption}{markdown_table(table_header, table_rows)}")
        plot_lengths(
            log_dir / "length_eval.png",
            labelled,
            f"{attention}: loss vs context length ({mode})",
            self._train_length,
            highlight_last=True,
        )
        files["png"] = log_dir / "length_eval.png"
        final = self.history[-1][1]
        if self.position_curve:
            files["positions"] = log_dir / "length_eval_positions.png"
            plot_positions(files["positions"], final, f"{attention}: loss by position", self._train_length)
        print(f"\n{title}\n{text_table(table_header, table_rows)}", flush=True)
        print("  " + "\n  ".join(f"{kind}: {path}" for kind, path in files.items()), flush=True)
        return files

    def state_dict(self) -> dict:
        return {"history": [(step, [vars(r) for r in results]) for step, results in self.history]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [(step, [LengthResult(**r) for r in results]) for step, results in state_dict["history"]]


def _stopped_by_signal(trainer: L.Trainer) -> bool:
    """True when GracefulStop ended the run on SIGINT / SIGTERM (the user wants out: skip the final eval)."""
    from freeatten_lightning.callbacks import GracefulStop

    return any(isinstance(cb, GracefulStop) and cb.received is not None for cb in trainer.callbacks)
