"""How shards become examples: coverage, determinism, rank splitting and exact resume of the training stream."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from freeatten_lightning.data.windows import EvalWindows, TrainStream, WindowIndex

SHARD_LENGTHS = [1001, 37, 513]
SEQ_LEN = 16


@pytest.fixture
def shards() -> list[np.ndarray]:
    """Shards whose token at position t of shard s is 10_000 * s + t (decodable back to its source)."""
    return [(10_000 * s + np.arange(n)).astype(np.int64) for s, n in enumerate(SHARD_LENGTHS)]


def window_starts(batches: list[torch.Tensor]) -> list[int]:
    return [int(row[0]) for batch in batches for row in batch]


@pytest.mark.parametrize("shuffle", [True, False])
def test_one_pass_reads_every_window_exactly_once(shuffle: bool) -> None:
    index = WindowIndex(SHARD_LENGTHS, SEQ_LEN, seed=3, shuffle=shuffle)
    assert index.num_windows == sum((n - 1) // SEQ_LEN for n in SHARD_LENGTHS)
    seen = [index.locate(example) for example in range(index.num_windows)]
    expected = [(s, w * SEQ_LEN) for s, n in enumerate(SHARD_LENGTHS) for w in range((n - 1) // SEQ_LEN)]
    assert sorted(seen) == expected
    assert (seen == expected) is (not shuffle)


def test_windows_hold_consecutive_tokens_inside_one_shard(shards: list[np.ndarray]) -> None:
    index = WindowIndex(SHARD_LENGTHS, SEQ_LEN, seed=0, shuffle=True)
    batch = TrainStream(shards, index, batch_size=8).batch(0)
    assert batch.shape == (8, SEQ_LEN + 1) and batch.dtype == torch.int64
    assert torch.all(batch.diff(dim=1) == 1)


def test_order_is_reshuffled_each_pass_and_fixed_by_the_seed() -> None:
    index = WindowIndex(SHARD_LENGTHS, SEQ_LEN, seed=5, shuffle=True)
    n = index.num_windows
    first, second = [index.locate(e) for e in range(n)], [index.locate(e) for e in range(n, 2 * n)]
    assert first != second and sorted(first) == sorted(second)
    again = WindowIndex(SHARD_LENGTHS, SEQ_LEN, seed=5, shuffle=True)
    assert [again.locate(e) for e in range(n)] == first
    other = WindowIndex(SHARD_LENGTHS, SEQ_LEN, seed=6, shuffle=True)
    assert [other.locate(e) for e in range(n)] != first


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_the_single_process_stream(shards: list[np.ndarray], world_size: int) -> None:
    """Micro-batch k of all ranks together is micro-batches of the one-rank stream with the global batch."""
    index = WindowIndex(SHARD_LENGTHS, SEQ_LEN, seed=1, shuffle=True)
    single = TrainStream(shards, index, batch_size=2 * world_size)
    ranks = [TrainStream(shards, index, batch_size=2, rank=r, world_size=world_size) for r in range(world_size)]
    for k in range(5):
        assert torch.equal(torch.cat([rank.batch(k) for rank in ranks]), single.batch(k))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_the_stream_exactly(shards: list[np.ndarray], num_workers: int) -> None:
    index = WindowIndex(SHARD_LENGTHS, SEQ_LEN, seed=9, shuffle=True)
    full = DataLoader(TrainStream(shards, index, batch_size=4), batch_size=None, num_workers=num_workers)
    uninterrupted = [batch for _, batch in zip(range(12), full, strict=False)]
    resumed_stream = TrainStream(shards, index, batch_size=4, start_example=7 * 4)
    resumed = DataLoader(resumed_stream, batch_size=None, num_workers=num_workers)
    after = [batch for _, batch in zip(range(5), resumed, strict=False)]
    assert window_starts(after) == window_starts(uninterrupted[7:])


def test_eval_windows_are_contiguous_and_respect_the_token_limit() -> None:
    tokens = np.arange(100, dtype=np.uint16)
    windows = EvalWindows(tokens, seq_len=10, max_tokens=45)
    assert len(windows) == 4
    assert [int(windows[i][0]) for i in range(4)] == [0, 10, 20, 30]
    assert torch.equal(windows[3], torch.arange(30, 41))
    with pytest.raises(IndexError):
        windows[4]
    assert len(EvalWindows(tokens, seq_len=10)) == 9
