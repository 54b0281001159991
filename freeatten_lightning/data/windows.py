"""How token shards become training and validation examples.

An example is a window of seq_len + 1 consecutive tokens (inputs and shifted targets). Training windows are
the non-overlapping windows of every shard, visited in a seeded random order that is reshuffled each pass
over the data. Example number s of the whole run is a pure function of (seed, s), so a run resumes exactly
by skipping to the number of examples already consumed: no iterator state needs saving.
"""

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info


class WindowIndex:
    """Maps a global example number to (shard, token offset) over non-overlapping windows of all shards."""

    def __init__(self, shard_lengths: Sequence[int], seq_len: int, seed: int, shuffle: bool) -> None:
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        per_shard = np.array([max(0, (n - 1) // seq_len) for n in shard_lengths], dtype=np.int64)
        self.first_window = np.concatenate(([0], np.cumsum(per_shard)))
        self.num_windows = int(self.first_window[-1])
        self._order_pass: int | None = None
        self._order: np.ndarray | None = None

    def _window_of(self, example: int) -> int:
        data_pass, index = divmod(example, self.num_windows)
        if not self.shuffle:
            return index
        if self._order_pass != data_pass:
            dtype = np.int32 if self.num_windows < 2**31 else np.int64
            self._order = np.random.default_rng([self.seed, data_pass]).permutation(self.num_windows).astype(dtype)
            self._order_pass = data_pass
        return int(self._order[index])

    def locate(self, example: int) -> tuple[int, int]:
        """(shard number, first token) of the window that example number `example` reads."""
        window = self._window_of(example)
        shard = int(np.searchsorted(self.first_window, window, side="right")) - 1
        return shard, int(window - self.first_window[shard]) * self.seq_len


class TrainStream(IterableDataset):
    """Endless batches (batch_size, seq_len + 1) for one rank, starting after `start_example` global examples.

    Micro-batch k of rank r holds examples start + (k * world_size + r) * batch_size + [0, batch_size), so the
    ranks read disjoint examples and the union over ranks is the same stream for any world size. DataLoader
    workers take every num_workers-th micro-batch, which keeps the order.
    """

    def __init__(
        self,
        shards: Sequence[np.ndarray],
        index: WindowIndex,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        start_example: int = 0,
    ) -> None:
        self.shards = shards
        self.index = index
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.start_example = start_example

    def batch(self, micro_batch: int) -> torch.Tensor:
        """Micro-batch number `micro_batch` of this rank."""
        first = self.start_example + (micro_batch * self.world_size + self.rank) * self.batch_size
        length = self.index.seq_len + 1
        rows = np.empty((self.batch_size, length), dtype=np.int64)
        for row, example in enumerate(range(first, first + self.batch_size)):
            shard, offset = self.index.locate(example)
            rows[row] = self.shards[shard][offset : offset + length]
        return torch.from_numpy(rows)

    def __iter__(self) -> Iterator[torch.Tensor]:
        worker = get_worker_info()
        micro_batch, step = (0, 1) if worker is None else (worker.id, worker.num_workers)
        while True:
            yield self.batch(micro_batch)
            micro_batch += step


class EvalWindows(Dataset):
    """The first `num_windows` non-overlapping windows (seq_len + 1 tokens, sharing one boundary token) of a
    token array, in order: every validation run scores the same tokens."""

    def __init__(self, tokens: np.ndarray, seq_len: int, max_tokens: int | None = None) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        usable = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
        self.num_windows = max(0, (usable - 1) // seq_len)

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num_windows:
            raise IndexError(i)
        start = i * self.seq_len
        return torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
