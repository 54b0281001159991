"""Attention biases named like xformers' (`xformers.ops.fmha.attn_bias`): which keys each query row attends.

The bias also fixes n_i, the number of keys row i attends, which LSSA's length scale ln(d) ln(n_i) and LSSAR's
first-three-rows guard use (DESIGN.md section 2):

- None: every query attends every key, n_i = Nk.
- `LowerTriangularMask()`: causal, query i sits at position i (top-left aligned), n_i = i + 1.
- `LowerTriangularFromBottomRightMask()`: causal for KV-cache decoding, query i sits at position Nk - Nq + i,
  n_i = Nk - Nq + i + 1.
- `BlockDiagonalCausalMask.from_seqlens([...])`: documents packed along the sequence axis (the same packing for
  every batch element, Nq = Nk = sum of the lengths); causal inside each document, n_i counts from its start.
- a bool tensor broadcastable to (B, H, Nq, Nk), True = may attend (reference and SDPA backends only).

xformers' own instances of the first three classes are accepted and converted (xformers is never imported).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor

from freeatten_lightning.attention import causal_mask, document_causal_mask
from freeatten_lightning.errors import FreeattenError


class AttentionBias:
    """Base class: a structured mask that the fused kernels understand without materialising it."""

    def check(self, n_q: int, n_k: int) -> None:
        """Raise FreeattenError if the bias cannot apply to Nq queries and Nk keys."""

    def query_offset(self, n_q: int, n_k: int) -> int:
        """Absolute position of query 0 (queries i sit at offset + i)."""
        return 0

    def materialize(self, n_q: int, n_k: int, device: torch.device) -> Tensor:
        """Bool mask broadcastable to (B, H, Nq, Nk), True = may attend (for the eager backends)."""
        raise NotImplementedError


def _check_causal(name: str, n_q: int, n_k: int) -> None:
    if n_q > n_k:
        raise FreeattenError(
            f"{name} needs at most as many queries as keys, got {n_q} queries and {n_k} keys: pass the full key "
            "sequence (with the KV cache) or use attn_bias=None"
        )


@dataclass(frozen=True)
class LowerTriangularMask(AttentionBias):
    """Causal, top-left aligned: query i attends keys 0..i (n_i = i + 1)."""

    def check(self, n_q: int, n_k: int) -> None:
        _check_causal("LowerTriangularMask", n_q, n_k)

    def materialize(self, n_q: int, n_k: int, device: torch.device) -> Tensor:
        return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(0)


@dataclass(frozen=True)
class LowerTriangularFromBottomRightMask(AttentionBias):
    """Causal, bottom-right aligned (KV cache): query i sits at position Nk - Nq + i and attends keys up to it."""

    def check(self, n_q: int, n_k: int) -> None:
        _check_causal("LowerTriangularFromBottomRightMask", n_q, n_k)

    def query_offset(self, n_q: int, n_k: int) -> int:
        return n_k - n_q

    def materialize(self, n_q: int, n_k: int, device: torch.device) -> Tensor:
        return causal_mask(n_q, n_k, device)


@dataclass(frozen=True)
class BlockDiagonalCausalMask(AttentionBias):
    """Packed documents along the sequence axis: causal inside each, no attention across (n_i from its start)."""

    seqstarts: tuple[int, ...]  # document offsets [0, len_0, len_0 + len_1, ..., N]

    def __post_init__(self) -> None:
        starts = self.seqstarts
        if len(starts) < 2 or starts[0] != 0 or any(b <= a for a, b in pairwise(starts)):
            raise FreeattenError(f"document offsets must rise strictly from 0, got {list(starts)[:8]}")

    @classmethod
    def from_seqlens(cls, q_seqlen: Sequence[int], kv_seqlen: Sequence[int] | None = None) -> BlockDiagonalCausalMask:
        """From the document lengths (queries and keys share the packing; kv_seqlen, if given, must be the same)."""
        lengths = [int(n) for n in q_seqlen]
        if kv_seqlen is not None and [int(n) for n in kv_seqlen] != lengths:
            raise FreeattenError("BlockDiagonalCausalMask: different query and key packings are not supported")
        if not lengths or any(n < 1 for n in lengths):
            raise FreeattenError(f"document lengths must be positive integers, got {lengths[:8]}")
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        return cls(tuple(starts))

    @property
    def seqlens(self) -> list[int]:
        return [b - a for a, b in pairwise(self.seqstarts)]

    def check(self, n_q: int, n_k: int) -> None:
        total = self.seqstarts[-1]
        if not n_q == n_k == total:
            raise FreeattenError(
                f"BlockDiagonalCausalMask packs {total} tokens ({len(self.seqlens)} documents) but got {n_q} queries "
                f"and {n_k} keys: the document lengths must sum to the sequence length"
            )

    def cu_seqlens(self, device: torch.device) -> Tensor:
        """int32 (num_docs + 1,) document offsets, the kernels' form."""
        return torch.tensor(self.seqstarts, dtype=torch.int32, device=device)

    def materialize(self, n_q: int, n_k: int, device: torch.device) -> Tensor:
        lengths = torch.tensor(self.seqlens, device=device)
        doc_ids = torch.repeat_interleave(torch.arange(len(self.seqlens), device=device), lengths)
        return document_causal_mask(doc_ids)


@dataclass(frozen=True, eq=False)
class TensorMask(AttentionBias):
    """An explicit bool mask (True = may attend), broadcastable to (B, H, Nq, Nk); n_i = its row sums."""

    mask: Tensor

    def check(self, n_q: int, n_k: int) -> None:
        if self.mask.dtype != torch.bool:
            raise FreeattenError(
                f"a tensor attn_bias must be a bool mask (True = may attend), got {self.mask.dtype}; additive float "
                "biases are not supported"
            )
        if self.mask.dim() < 2 or tuple(self.mask.shape[-2:]) not in ((n_q, n_k), (1, n_k), (n_q, 1), (1, 1)):
            raise FreeattenError(f"mask of shape {tuple(self.mask.shape)} does not broadcast to (B, H, {n_q}, {n_k})")

    def materialize(self, n_q: int, n_k: int, device: torch.device) -> Tensor:
        return self.mask.to(device)


_XFORMERS_NAMES = ("LowerTriangularMask", "LowerTriangularFromBottomRightMask", "BlockDiagonalCausalMask")


def as_bias(attn_bias: object) -> AttentionBias | None:
    """Our bias for None, our own classes, a bool tensor, or an xformers instance (converted by class name)."""
    if attn_bias is None or isinstance(attn_bias, AttentionBias):
        return attn_bias
    if isinstance(attn_bias, Tensor):
        return TensorMask(attn_bias)
    cls = type(attn_bias)
    if cls.__module__.startswith("xformers") and cls.__name__ in _XFORMERS_NAMES:
        if cls.__name__ == "LowerTriangularMask":
            return LowerTriangularMask()
        if cls.__name__ == "LowerTriangularFromBottomRightMask":
            return LowerTriangularFromBottomRightMask()
        q_starts, k_starts = attn_bias.q_seqinfo.seqstart_py, attn_bias.k_seqinfo.seqstart_py
        if list(q_starts) != list(k_starts):
            raise FreeattenError("BlockDiagonalCausalMask: different query and key packings are not supported")
        return BlockDiagonalCausalMask(tuple(int(s) for s in q_starts))
    raise FreeattenError(
        f"unsupported attn_bias {cls.__module__}.{cls.__name__}: use None, LowerTriangularMask(), "
        "LowerTriangularFromBottomRightMask(), BlockDiagonalCausalMask.from_seqlens([...]) or a bool mask tensor"
    )
