"""The Triton kernels (`kernels/triton_attention.py`) as torch custom ops with autograd, for `torch.compile`.

The custom ops are opaque to the compiler, so it never traces the kernels' Python launch code (autotuning,
argument checks); their fake implementations give it the output shapes. Same contract as `triton_attention`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _kernels():
    from freeatten_lightning.kernels import triton_attention

    return triton_attention


@torch.library.custom_op("freeatten::triton_attention_forward", mutates_args=())
def triton_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, variant: str, p: float, q_offset: int, cu_seqlens: Tensor | None, save_u: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, row statistics, LSSAR's U or an empty tensor) from `triton_forward`."""
    out, stats, u = _kernels().triton_forward(
        q, k, v, variant=variant, p=p, q_offset=q_offset, cu_seqlens=cu_seqlens, needs_grad=save_u
    )
    return out, stats, stats.new_empty(0) if u is None else u


@triton_attention_forward.register_fake
def _(q, k, v, variant, p, q_offset, cu_seqlens, save_u):
    b, h, n_q, d = q.shape
    reweight = variant == "lssar"
    stats = q.new_empty((4 if reweight else 1, b, h, n_q), dtype=torch.float32)
    u = q.new_empty((b, h, n_q, d), dtype=torch.float32) if reweight and save_u else stats.new_empty(0)
    return torch.empty_like(q, memory_format=torch.contiguous_format), stats, u


@torch.library.custom_op("freeatten::triton_attention_backward", mutates_args=())
def triton_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    stats: Tensor,
    u: Tensor,
    variant: str,
    p: float,
    q_offset: int,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from `triton_backward`."""
    saved_u = u if u.numel() else None
    dq, dk, dv = _kernels().triton_backward(
        grad_out, q, k, v, out, stats, saved_u, variant=variant, p=p, q_offset=q_offset, cu_seqlens=cu_seqlens
    )
    return dq, dk, dv


@triton_attention_backward.register_fake
def _(grad_out, q, k, v, out, stats, u, variant, p, q_offset, cu_seqlens):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, variant, p, q_offset, cu_seqlens, _save_u = inputs
    out, stats, u = output
    ctx.save_for_backward(q, k, v, out, stats, u, cu_seqlens)
    ctx.args = (variant, p, q_offset)


def _backward(ctx, grad_out: Tensor, _grad_stats: Tensor, _grad_u: Tensor):
    q, k, v, out, stats, u, cu_seqlens = ctx.saved_tensors
    variant, p, q_offset = ctx.args
    dq, dk, dv = triton_attention_backward(grad_out, q, k, v, out, stats, u, variant, p, q_offset, cu_seqlens)
    return dq, dk, dv, None, None, None, None, None


triton_attention_forward.register_autograd(_backward, setup_context=_setup_context)


def triton_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    variant: str,
    p: float = 15.0,
    q_offset: int | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """`triton_attention` through the custom ops: (B, H, Nq, D) out in the input dtype, differentiable."""
    offset = k.shape[-2] - q.shape[-2] if q_offset is None else q_offset
    save_u = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    out, _, _ = triton_attention_forward(q, k, v, variant, float(p), offset, cu_seqlens, save_u)
    return out
