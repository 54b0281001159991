"""Validation loss at growing context lengths on the same tokens (DESIGN.md section 4).

At every length the same first `scored_tokens` targets of the validation stream are scored, so the losses
differ only by how much context each prediction had. Two ways to cut the stream into windows:
- non-overlapping (default): windows of `length` tokens side by side; position t of a window has t tokens of
  context, so the mean is over contexts 0 .. length - 1, like the training loss (the paper's protocol);
- sliding (`stride`): a window every `stride` tokens, each scoring only its last `stride` tokens, so nearly
  every prediction has at least length - stride tokens of context.
The loss is the token-weighted mean NLL. Windows are split across ranks; every rank runs the same number of
forwards (ranks short of windows score a copy with weight 0), as DeepSpeed ZeRO-3 needs, and the sums are
reduced once per length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from freeatten_lightning.data.windows import EvalWindows
from freeatten_lightning.errors import FreeattenError
from freeatten_lightning.language_model import next_token_loss
from freeatten_lightning.model.gpt import GPT

LOGITS_PER_CHUNK = 2**24
DEFAULT_MULTIPLES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class LengthResult:
    """Token-weighted mean NLL at one context length, over `tokens` scored tokens in `windows` windows."""

    length: int
    loss: float
    tokens: int
    windows: int
    stride: int | None = None
    position_loss: tuple[float, ...] | None = None

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)


class SlidingWindows(Dataset):
    """Windows of `length` + 1 tokens starting every `stride` tokens, covering the first `max_tokens` targets.

    Window 0 scores all its positions; window i > 0 scores only its last `stride` (positions from
    `first_scored(i)` on), the targets no earlier window scored.
    """

    def __init__(self, tokens: np.ndarray, length: int, stride: int, max_tokens: int) -> None:
        self.tokens = tokens
        self.length = length
        self.stride = stride
        self.num_windows = 1 + (max_tokens - length) // stride

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> Tensor:
        if not 0 <= i < self.num_windows:
            raise IndexError(i)
        start = i * self.stride
        return torch.from_numpy(self.tokens[start : start + self.length + 1].astype(np.int64))

    def first_scored(self, i: int) -> int:
        """The first position window i scores."""
        return 0 if i == 0 else self.length - self.stride


def parse_lengths(text: str, option: str = "--lengths") -> list[int]:
    """Comma-separated positive integers ("128,256, 512") -> [128, 256, 512], with a clear error otherwise."""
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise FreeattenError(f"{option} takes comma-separated integers such as 1024,2048,4096; got {text!r}") from None
    check_lengths(values, option)
    return values


def check_lengths(lengths: Sequence[int], option: str = "lengths") -> None:
    """Refuse an empty list and non-positive lengths."""
    if not lengths:
        raise FreeattenError(f"{option} is empty: give at least one context length, e.g. 1024,2048,4096")
    bad = [n for n in lengths if not isinstance(n, int) or isinstance(n, bool) or n < 1]
    if bad:
        raise FreeattenError(f"{option} must be positive integers, got {bad}")


def scaled_lengths(seq_len: int, multiples: Sequence[int] = DEFAULT_MULTIPLES) -> list[int]:
    """The training length times each multiple (the default evaluation lengths L, 2L, 4L, 8L, 16L)."""
    check_lengths(list(multiples), "multiples")
    return [seq_len * m for m in multiples]


def scored_token_count(
    lengths: Sequence[int], available: int, budget: int | None = None, stride: int | None = None
) -> int:
    """Targets to score at every length: the budget (None = all `available`) rounded down to a multiple of
    every length, so each length cuts the same tokens into whole windows."""
    check_lengths(lengths)
    longest = max(lengths)
    if longest > available:
        raise FreeattenError(
            f"context length {longest:,} is longer than the validation data ({available:,} scorable tokens): "
            "lower the lengths, or use more validation tokens (data.val_tokens / --tokens, or more val shards)"
        )
    if budget is not None and budget < longest:
        raise FreeattenError(
            f"the budget of {budget:,} scored tokens is shorter than the longest length {longest:,}: raise it "
            f"to a multiple of {longest:,}"
        )
    if stride is not None and (stride < 1 or any(n % stride for n in lengths)):
        raise FreeattenError(
            f"stride {stride} must be a positive divisor of every length {list(lengths)} (e.g. "
            f"{math.gcd(*lengths) // 2 or 1}), so every token is scored exactly once"
        )
    unit = math.lcm(*lengths)
    limit = available if budget is None else min(budget, available)
    if unit > limit:
        raise FreeattenError(
            f"the lengths {list(lengths)} share no whole number of windows within {limit:,} tokens (least common "
            f"multiple {unit:,}): use lengths that divide each other, such as multiples 1, 2, 4, 8, 16"
        )
    return limit // unit * unit


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() and no gradients inside; every submodule's own train/eval mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def token_nll(model: GPT, inputs: Tensor, targets: Tensor) -> Tensor:
    """Per-token NLL (B, N) in fp32; the logits are made a slice of positions at a time (chunked
    cross-entropy), so a long window never holds its whole (N, vocab) logit matrix."""
    hidden = model.hidden_states(inputs)
    batch, length = targets.shape
    chunk = max(1, LOGITS_PER_CHUNK // (batch * model.config.vocab_size))
    losses = [
        next_token_loss(model.logits(hidden[:, start : start + chunk]), targets[:, start : start + chunk], "none")
        for start in range(0, length, chunk)
    ]
    return torch.cat([loss.view(batch, -1) for loss in losses], dim=1)


def _windows(tokens: np.ndarray, length: int, scored: int, stride: int | None) -> EvalWindows | SlidingWindows:
    if stride is None or stride == length:
        return EvalWindows(tokens, length, max_tokens=scored)
    return SlidingWindows(tokens, length, stride, scored)


def _rank_batches(num_windows: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's windows (every world_size-th), padded with -1 so every rank gets equally many batches of
    equal sizes (a padded slot scores window 0 with weight 0)."""
    per_rank = -(-num_windows // world_size)
    mine = list(range(rank, num_windows, world_size))
    mine += [-1] * (per_rank - len(mine))
    return [mine[i : i + batch_size] for i in range(0, per_rank, batch_size)]


def evaluate_lengths(
    model: GPT,
    tokens: np.ndarray,
    lengths: Sequence[int],
    scored_tokens: int,
    *,
    stride: int | None = None,
    batch_tokens: int = 16_384,
    position_curve: bool = False,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[Tensor], Tensor] | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    progress: bool = True,
    desc: str = "length eval",
) -> list[LengthResult]:
    """Mean NLL of the first `scored_tokens` targets of `tokens` at each length (see the module docstring).

    Each forward holds about `batch_tokens` tokens (at least one window). On several ranks, call it on every
    rank with `reduce` summing a tensor over the ranks; every rank gets the same results.
    """
    check_lengths(lengths)
    if len(tokens) < scored_tokens + 1:
        raise FreeattenError(f"{scored_tokens:,} scored tokens need {scored_tokens + 1:,} tokens, got {len(tokens):,}")
    plans = []
    for length in lengths:
        if scored_tokens % length or (stride is not None and (scored_tokens - length) % stride):
            raise FreeattenError(
                f"{scored_tokens:,} scored tokens are not whole windows of {length}: use scored_token_count"
            )
        windows = _windows(tokens, length, scored_tokens, stride)
        batches = _rank_batches(len(windows), max(1, batch_tokens // length), rank, world_size)
        plans.append((length, windows, batches))
    device = next(model.parameters()).device
    bar = tqdm(total=sum(len(b) for _, _, b in plans), desc=desc, unit="batch", leave=False, disable=not progress)
    results = []
    with evaluation_mode(model), bar:
        for length, windows, batches in plans:
            bar.set_postfix(length=length)
            sums = torch.zeros(2 + (2 * length if position_curve else 0), dtype=torch.float64, device=device)
            for batch in batches:
                rows = torch.stack([windows[max(i, 0)] for i in batch]).to(device)
                weights = torch.zeros(len(batch), length, dtype=torch.float64, device=device)
                for row, i in enumerate(batch):
                    if i >= 0:
                        weights[row, _first_scored(windows, i) :] = 1.0
                with autocast():
                    nll = token_nll(model, rows[:, :-1], rows[:, 1:]).double()
                sums[0] += (nll * weights).sum()
                sums[1] += weights.sum()
                if position_curve:
                    sums[2:] += torch.cat(((nll * weights).sum(0), weights.sum(0)))
                bar.update()
            if reduce is not None:
                sums = reduce(sums)
            positions = None
            if position_curve:
                positions = tuple((sums[2 : 2 + length] / sums[2 + length :]).tolist())
            results.append(
                LengthResult(length, float(sums[0] / sums[1]), round(float(sums[1])), len(windows), stride, positions)
            )
    return results


def _first_scored(windows: EvalWindows | SlidingWindows, i: int) -> int:
    return windows.first_scored(i) if isinstance(windows, SlidingWindows) else 0
