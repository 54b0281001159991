"""Callbacks that every run gets: a clean stop with a checkpoint, and an end-of-run summary."""

from freeatten_lightning.callbacks.graceful_stop import GracefulStop, last_checkpoint_path
from freeatten_lightning.callbacks.run_summary import RunSummary

__all__ = ["GracefulStop", "RunSummary", "last_checkpoint_path"]
