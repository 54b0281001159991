"""At the end of `fit`, say what happened and where everything went, and plot the loss curves."""

import math
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure

from freeatten_lightning.callbacks.graceful_stop import GracefulStop


class RunSummary(L.Callback):
    """Collects train / validation loss per step and, on rank 0, prints a summary and writes `loss.png`."""

    def __init__(self, plot: bool = True) -> None:
        self.plot = plot
        self.train_curve: list[tuple[int, float]] = []
        self.val_curve: list[tuple[int, float]] = []
        self._start = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self.train_curve.clear()
        self.val_curve.clear()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.train_curve.append((trainer.global_step, float(loss)))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None and not trainer.sanity_checking:
            self.val_curve.append((trainer.global_step, float(loss)))

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        minutes = (time.perf_counter() - self._start) / 60
        lines = [f"Trained {trainer.global_step} steps in {minutes:.1f} min"]
        stop = next((cb for cb in trainer.callbacks if isinstance(cb, GracefulStop)), None)
        if stop is not None and stop.received is not None:
            lines[0] += f" (stopped early by {stop.received.name}; resume with --ckpt_path last)"
        if self.train_curve:
            lines.append(f"  final train loss: {self.train_curve[-1][1]:.4f}")
        if self.val_curve:
            step, loss = self.val_curve[-1]
            lines.append(f"  final val loss:   {loss:.4f} (perplexity {math.exp(loss):.2f}) at step {step}")
        checkpoint = trainer.checkpoint_callback
        if stop is not None and stop.saved_path is not None:
            lines.append(f"  checkpoint:       {stop.saved_path}")
        elif checkpoint is not None and getattr(checkpoint, "last_model_path", ""):
            lines.append(f"  checkpoint:       {checkpoint.last_model_path}")
        log_dir = Path(getattr(trainer.logger, "log_dir", None) or trainer.default_root_dir)  # no broadcast on rank 0
        lines.append(f"  logs:             {log_dir}")
        if self.plot and self.train_curve:
            lines.append(f"  loss plot:        {self.write_plot(log_dir / 'loss.png')}")
        print("\n".join(lines), flush=True)

    def write_plot(self, path: Path) -> Path:
        """Training and validation loss against step."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        ax.plot(*zip(*self.train_curve, strict=True), label="train", alpha=0.7)
        if self.val_curve:
            ax.plot(*zip(*self.val_curve, strict=True), "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return path
