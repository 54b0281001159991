"""Stop cleanly on Ctrl-C or SIGTERM: finish the current optimizer step, save `last.ckpt`, then exit.

The checkpoint is taken at an optimizer-step boundary, exactly where ModelCheckpoint takes its own, so
`freeatten fit ... --ckpt_path last` resumes as if nothing had happened. A second Ctrl-C aborts at once.
The same checkpoint is written when training reaches max_steps, so the final weights are never lost.
"""

import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop(L.Callback):
    """Turns SIGINT / SIGTERM into "save last.ckpt at the next step boundary and stop"."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.saved_path: Path | None = None
        self._previous_handlers: dict[int, object] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        self.saved_path = None
        for signum in _SIGNALS:
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._request_stop)

    def _request_stop(self, signum: int, frame: object) -> None:
        if self.received is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = signal.Signals(signum)
        print(
            f"\n{self.received.name} received: finishing the current step (and validation, if running), then "
            "saving a checkpoint (press Ctrl-C again to abort without saving)",
            flush=True,
        )

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        local = self.received is not None
        if trainer.world_size > 1:
            return bool(trainer.strategy.reduce_boolean_decision(local, all=False))
        return local

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        stop = self._stop_requested(trainer)
        if stop or trainer.global_step >= trainer.max_steps > 0:
            self.saved_path = last_checkpoint_path(trainer)
            trainer.save_checkpoint(self.saved_path)
            _mark_saved(trainer, self.saved_path)
            if stop:
                trainer.should_stop = True
                rank_zero_info(f"Stopped at step {trainer.global_step}; checkpoint saved to {self.saved_path}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ModelCheckpoint keeps `last.ckpt` (so `--ckpt_path last` finds it), else the root dir."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


def _mark_saved(trainer: L.Trainer, path: Path) -> None:
    """Tell ModelCheckpoint that this step is saved as its last checkpoint, so it does not write another one
    (`last-v1.ckpt`) at the end of the stopped epoch, with a loop state that would resume in the next epoch."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint):
        callback.last_model_path = str(path)
        callback._last_global_step_saved = trainer.global_step
