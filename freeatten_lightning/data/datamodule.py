"""The LightningDataModule: token shards on disk -> training stream and validation windows.

With no `data_dir` it trains on the embedded corpus (Python's own documentation, tokenized to bytes on first
use), so a fresh machine needs no download. The training position is saved in every checkpoint and restored
on resume, so a resumed run sees exactly the examples an uninterrupted run would have seen.
"""

import json
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from freeatten_lightning.data.prepare import ensure_embedded_shards
from freeatten_lightning.data.shards import open_shard
from freeatten_lightning.data.windows import EvalWindows, TrainStream, WindowIndex
from freeatten_lightning.errors import FreeattenError


class TokenDataModule(L.LightningDataModule):
    """Random non-overlapping windows of token shards (llm.c / modded-nanogpt format) for training, the first
    `val_tokens` tokens of the validation shards for validation.

    Args:
        data_dir: folder with `*train*.bin` and `*val*.bin` shards (e.g. FineWeb-10B from llm.c, or the output
            of `freeatten prepare`); None = the embedded corpus, prepared under `cache_dir` on first use.
        tokenizer: the tokenizer the shards were made with (`byte`: 257 ids; `gpt2`: 50,257); it fixes the
            model's vocabulary.
        seq_len: training context length (the model's, linked by the CLI).
        batch_size: sequences per micro-batch on each device.
        val_tokens: validation tokens scored per validation run (None = all).
        seed: seed of the training order; shuffle=False reads windows in file order.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        tokenizer: Literal["byte", "gpt2"] = "byte",
        seq_len: int = 256,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        val_tokens: int | None = 131_072,
        train_pattern: str = "*train*.bin",
        val_pattern: str = "*val*.bin",
        seed: int = 1337,
        shuffle: bool = True,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if seq_len < 1 or batch_size < 1:
            raise FreeattenError(f"data.seq_len and data.batch_size must be >= 1, got {seq_len} and {batch_size}")
        if val_tokens is not None and val_tokens < seq_len:
            raise FreeattenError(
                f"data.val_tokens={val_tokens} is shorter than one window of data.seq_len={seq_len} tokens: "
                "raise val_tokens or set it to null (all validation tokens)"
            )
        self.train_shards: list[np.ndarray] = []
        self.val_tokens_array: np.ndarray | None = None
        self._resume_example = 0

    def prepare_data(self) -> None:
        """Build the embedded corpus's shards once per machine (called on local rank 0 only)."""
        if self.hparams.data_dir is None:
            ensure_embedded_shards(self.hparams.cache_dir)

    @property
    def shard_dir(self) -> Path:
        if self.hparams.data_dir is None:
            return ensure_embedded_shards(self.hparams.cache_dir)
        return Path(self.hparams.data_dir).expanduser()

    def setup(self, stage: str) -> None:
        if self.train_shards and self.val_tokens_array is not None:
            return
        folder = self.shard_dir
        if not folder.is_dir():
            raise FreeattenError(
                f"data.data_dir {str(folder)!r} does not exist: point it at a folder of token shards, or make "
                "one with `freeatten prepare --input <text files> --output <folder>`"
            )
        self._check_tokenizer(folder)
        self.train_shards = [open_shard(path) for path in self._find(folder, self.hparams.train_pattern)]
        val_shards = [open_shard(path) for path in self._find(folder, self.hparams.val_pattern)]
        window = self.hparams.seq_len + 1
        if not any(len(shard) >= window for shard in self.train_shards):
            longest = max(len(shard) for shard in self.train_shards)
            raise FreeattenError(
                f"data.seq_len={self.hparams.seq_len} needs windows of {window} tokens but the longest training "
                f"shard in {folder} has {longest}: lower data.seq_len or use more data"
            )
        limit = None if self.hparams.val_tokens is None else self.hparams.val_tokens + 1
        self.val_tokens_array = np.concatenate([np.asarray(shard[:limit]) for shard in val_shards])[:limit]
        if len(self.val_tokens_array) < window:
            raise FreeattenError(
                f"data.seq_len={self.hparams.seq_len} needs windows of {window} tokens but the validation shards "
                f"in {folder} hold {len(self.val_tokens_array)}: lower data.seq_len or use more validation data"
            )

    def _find(self, folder: Path, pattern: str) -> list[Path]:
        paths = sorted(folder.glob(pattern))
        if not paths:
            raise FreeattenError(
                f"no shards matching {pattern!r} in {folder}: make them with `freeatten prepare --input <text> "
                f"--output {folder}`, or set data.train_pattern / data.val_pattern to match your file names"
            )
        return paths

    def _check_tokenizer(self, folder: Path) -> None:
        """Shards made by `freeatten prepare` record their tokenizer; refuse a mismatch with the config."""
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            return
        recorded = json.loads(meta_path.read_text()).get("tokenizer")
        if recorded is not None and recorded != self.hparams.tokenizer:
            raise FreeattenError(
                f"the shards in {folder} were made with the {recorded!r} tokenizer but data.tokenizer is "
                f"{self.hparams.tokenizer!r}: set --data.tokenizer {recorded}"
            )

    def train_dataloader(self) -> DataLoader:
        index = WindowIndex(
            [len(shard) for shard in self.train_shards],
            self.hparams.seq_len,
            seed=self.hparams.seed,
            shuffle=self.hparams.shuffle,
        )
        stream = TrainStream(
            self.train_shards,
            index,
            self.hparams.batch_size,
            rank=self.trainer.global_rank if self.trainer else 0,
            world_size=self.trainer.world_size if self.trainer else 1,
            start_example=self._resume_example,
        )
        if self._resume_example:
            rank_zero_info(f"Resuming the training stream after {self._resume_example:,} examples")
        return DataLoader(stream, batch_size=None, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        windows = EvalWindows(self.val_tokens_array, self.hparams.seq_len)
        return DataLoader(
            windows,
            batch_size=self.hparams.val_batch_size or self.hparams.batch_size,
            shuffle=False,
            num_workers=self.hparams.num_workers,
        )

    def examples_consumed(self) -> int:
        """Global training examples behind the optimizer steps taken so far (a partial accumulation is redone)."""
        trainer = self.trainer
        if trainer is None:
            return self._resume_example
        steps = trainer.global_step
        return steps * trainer.accumulate_grad_batches * self.hparams.batch_size * trainer.world_size

    def state_dict(self) -> dict[str, Any]:
        return {
            "examples_consumed": self.examples_consumed(),
            "seq_len": self.hparams.seq_len,
            "seed": self.hparams.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seq_len") != self.hparams.seq_len or state_dict.get("seed") != self.hparams.seed:
            rank_zero_info(
                "The checkpoint's data order (seq_len, seed) differs from this run's: the training stream "
                "continues at the same example count, but in the new order"
            )
        self._resume_example = int(state_dict["examples_consumed"])
