"""The fused attention op, in the style of `xformers.ops.memory_efficient_attention`.

    out = memory_efficient_attention(q, k, v, attn_bias=LowerTriangularMask(), variant="lssar", p=15.0)

Layout (the one xformers calls BMHK): query (batch, seq_q, heads, head_dim), key and value (batch, seq_k, heads,
head_dim); the output has the query's shape and dtype. Biases: `freeatten_lightning.ops.bias` (None = no mask).
A dispatcher picks the first backend of `BACKENDS` that supports the inputs (cpu, triton, sdpa, reference) or runs
the one forced with `op="name"`; `python -m freeatten_lightning.info` prints what each supports.

`attend_op(q, k, v, spec, mask=None)` is the drop-in for `freeatten_lightning.attention.attend`: (B, H, N, D)
layout, mask None = bottom-right causal.
"""

from __future__ import annotations

from torch import Tensor

from freeatten_lightning.attention import AttentionSpec
from freeatten_lightning.errors import FreeattenError
from freeatten_lightning.ops.backends import BACKENDS
from freeatten_lightning.ops.bias import (
    AttentionBias,
    BlockDiagonalCausalMask,
    LowerTriangularFromBottomRightMask,
    LowerTriangularMask,
    TensorMask,
    as_bias,
)
from freeatten_lightning.ops.dispatch import Backend, Inputs, backend_table, choose_backend

BMHK = ("batch", "seq", "heads", "head_dim")
BHMK = ("batch", "heads", "seq", "head_dim")


def _check_tensors(query: Tensor, key: Tensor, value: Tensor, layout: tuple[str, ...]) -> None:
    """Raise FreeattenError for anything no backend could run: ranks, shapes, dtypes, devices, empty sequences."""
    names = ("query", "key", "value")
    text = f"({', '.join(layout)})"
    for name, x in zip(names, (query, key, value), strict=True):
        if not isinstance(x, Tensor):
            raise FreeattenError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise FreeattenError(f"{name} must be a 4-D tensor {text}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise FreeattenError(f"{name} must be floating point, got {x.dtype}")
    if not query.dtype == key.dtype == value.dtype:
        raise FreeattenError(f"query, key, value dtypes differ ({query.dtype}, {key.dtype}, {value.dtype}): cast them")
    if not query.device == key.device == value.device:
        raise FreeattenError(
            f"query, key, value are on different devices: {query.device}, {key.device}, {value.device}"
        )
    seq, heads = layout.index("seq"), layout.index("heads")
    shapes = f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
    for dim in (0, heads):
        if not query.shape[dim] == key.shape[dim] == value.shape[dim]:
            raise FreeattenError(f"{layout[dim]} sizes differ ({shapes}); the layout is {text}")
    if key.shape[seq] != value.shape[seq]:
        raise FreeattenError(f"key and value lengths differ ({shapes}); the layout is {text}")
    if query.shape[-1] != key.shape[-1]:
        raise FreeattenError(f"query and key head_dims differ ({shapes}); the layout is {text}")
    if query.shape[seq] < 1 or key.shape[seq] < 1:
        raise FreeattenError(f"empty sequence ({shapes}): need at least one query and one key")


def _spec(variant: str | AttentionSpec, p: float) -> AttentionSpec:
    return variant if isinstance(variant, AttentionSpec) else AttentionSpec(variant, p)


def _run(inputs: Inputs, op: str | Backend | None) -> Tensor:
    if inputs.attn_bias is not None:
        inputs.attn_bias.check(inputs.query.shape[2], inputs.key.shape[2])
    return choose_backend(BACKENDS, inputs, op).forward(inputs)


def memory_efficient_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_bias: AttentionBias | Tensor | object | None = None,
    variant: str | AttentionSpec = "lssar",
    p: float = 15.0,
    op: str | Backend | None = None,
) -> Tensor:
    """Attention of `variant` (name + p, or an AttentionSpec) over BMHK tensors; returns (batch, seq_q, heads, D).

    attn_bias: None (no mask), LowerTriangularMask() (causal), LowerTriangularFromBottomRightMask() (KV cache),
    BlockDiagonalCausalMask.from_seqlens([...]) (packed documents), a bool mask, or xformers' instances of these.
    op: None picks the first backend that fits; a name ("cpu", "triton", "sdpa", "reference") forces one.
    """
    _check_tensors(query, key, value, BMHK)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    return _run(Inputs(q, k, v, as_bias(attn_bias), _spec(variant, p)), op).transpose(1, 2)


def attend_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: AttentionSpec,
    mask: Tensor | AttentionBias | None = None,
    op: str | Backend | None = None,
) -> Tensor:
    """Drop-in for `attention.attend` via the dispatcher: q (B, H, Nq, D), k, v (B, H, Nk, D); mask None = causal."""
    _check_tensors(q, k, v, BHMK)
    bias = LowerTriangularFromBottomRightMask() if mask is None else as_bias(mask)
    return _run(Inputs(q, k, v, bias, spec), op)


__all__ = [
    "BACKENDS",
    "AttentionBias",
    "Backend",
    "BlockDiagonalCausalMask",
    "Inputs",
    "LowerTriangularFromBottomRightMask",
    "LowerTriangularMask",
    "TensorMask",
    "attend_op",
    "backend_table",
    "memory_efficient_attention",
]
