"""Triton LSSA / LSSAR attention: causal, KV-cache query offset and packed documents, differentiable.

`triton_attention` validates its inputs, launches the kernels of `triton_lssa_kernels` (imported on first use,
so this module imports without triton) and wraps forward and backward in a `torch.autograd.Function`.
`triton_forward` / `triton_backward` are the two halves, for callers that register their own autograd.

QK-norm: the inverse norms 1/||q_i||, 1/||k_j|| are computed here in PyTorch (one cheap pass); the kernels scale
the raw dot products by them and apply the norm's backward in their epilogues, so no normalised copy of q, k is
materialised. Backward, FlashAttention-2 style without atomics (deterministic): a preprocess kernel per row
(D_i = dO_i . O_i and LSSAR's beta_i = o_i H_i / n_i from the forward's U, G accumulators), one kernel over key
blocks for dk, dv and one over query blocks for dq; both recompute the score tiles.
"""

from __future__ import annotations

import math
import os
from functools import cache
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from freeatten_lightning.errors import FreeattenError

TRITON_SUPPORTED_HEAD_DIMS = frozenset({16, 32, 64, 128})
TRITON_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_VARIANTS = ("lssa", "lssar")
NORM_EPS = 1e-12  # F.normalize's eps: x / max(||x||, eps)

# The interpreter runs one config; these small blocks (BLOCK_M != BLOCK_N) exercise multi-tile paths at small N.
_INTERPRETER_BLOCKS = {"fwd": (32, 16), "dq": (32, 16), "dkdv": (16, 32), "pre": 32}


def _interpreting() -> bool:
    """Whether Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_is_available() -> tuple[bool, str]:
    """(True, what runs the kernels) or (False, why not): triton importable and a CUDA device or the interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return False, f"triton is not importable ({err}): pip install triton"
    if _interpreting():
        return True, "Triton CPU interpreter (TRITON_INTERPRET=1): fp32 only, slow, for tests"
    if not torch.cuda.is_available():
        return False, "no CUDA device (TRITON_INTERPRET=1 runs the kernels on the CPU interpreter, fp32 only)"
    return True, f"CUDA device {torch.cuda.get_device_name()}"


def _configs(pairs: list[tuple[int, int, int, int]]) -> list:
    """Autotune configs from (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    import triton

    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in pairs]


# Autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, for head dims <= 64 and for 128:
# chosen from sm_90 builds (ptxas register / spill counts, see benchmarks/bench_triton.py --compile-only);
# for dkdv, BLOCK_N is the key block each program owns and BLOCK_M the query tile it sweeps.
_GPU_CONFIGS = {
    "fwd": ([(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
            [(64, 32, 4, 3), (64, 32, 4, 2), (128, 32, 8, 3), (128, 64, 8, 3)]),
    "dq": ([(128, 32, 8, 3), (64, 32, 4, 3), (128, 16, 8, 3), (32, 64, 4, 3)],
           [(32, 32, 4, 3), (32, 16, 4, 3), (64, 32, 4, 3), (64, 16, 4, 3)]),
    "dkdv": ([(32, 128, 8, 2), (16, 128, 8, 3), (16, 64, 4, 3), (32, 64, 4, 3)],
             [(32, 32, 4, 3), (16, 32, 4, 3), (64, 32, 4, 2), (16, 64, 4, 3)]),
}  # fmt: skip


@cache
def _kernels(wide_heads: bool = False) -> SimpleNamespace:
    """The jit kernels, autotuned on a GPU (the interpreter runs a single fixed config instead).

    Built once per process: interpreter or GPU is decided by TRITON_INTERPRET at the first call."""
    import triton

    from freeatten_lightning.kernels import triton_lssa_kernels as kern

    if _interpreting():
        return SimpleNamespace(fwd=kern._fwd_kernel, dq=kern._bwd_dq_kernel, dkdv=kern._bwd_dkdv_kernel,
                               pre=kern._bwd_preprocess, tuned=False)  # fmt: skip
    key = ["TUNE_NQ", "TUNE_NK", "HEAD_DIM", "REWEIGHT", "PACKED", "PRECISION"]
    configs = {name: _configs(pairs[wide_heads]) for name, pairs in _GPU_CONFIGS.items()}
    return SimpleNamespace(
        fwd=triton.autotune(configs["fwd"], key=[*key, "STORE_UG"])(kern._fwd_kernel),
        dq=triton.autotune(configs["dq"], key=key)(kern._bwd_dq_kernel),
        dkdv=triton.autotune(configs["dkdv"], key=key)(kern._bwd_dkdv_kernel),
        pre=kern._bwd_preprocess,
        tuned=True,
    )


def _check(
    q: Tensor, k: Tensor, v: Tensor, variant: str, p: float, q_offset: int | None, cu_seqlens: Tensor | None
) -> int:
    """Raise FreeattenError for anything the kernels cannot compute exactly; return the resolved query offset."""
    if variant not in TRITON_VARIANTS:
        raise FreeattenError(
            f"the Triton kernels implement {' and '.join(TRITON_VARIANTS)}, not '{variant}': "
            "use the reference or CPU backend for other variants"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise FreeattenError(f"{name} must be a 4-D tensor (B, H, N, D), got {getattr(x, 'shape', type(x))}")
        if x.dtype not in TRITON_SUPPORTED_DTYPES:
            raise FreeattenError(f"{name} has dtype {x.dtype}: the Triton kernels take float16, bfloat16 or float32")
        if x.stride(-1) != 1:
            raise FreeattenError(f"{name} has stride {x.stride(-1)} in its last dim: pass {name}.contiguous()")
    b, h, n_q, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, h) or k.shape[-1] != d:
        raise FreeattenError(
            f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match: expected q (B, H, Nq, D) "
            "and k, v (B, H, Nk, D)"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise FreeattenError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}): cast them to one dtype")
    if not q.device == k.device == v.device:
        raise FreeattenError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if q.device.type != "cuda" and not (_interpreting() and q.device.type == "cpu"):
        raise FreeattenError(
            f"the Triton kernels run on CUDA tensors, got {q.device}: move q, k, v to a GPU "
            "(or set TRITON_INTERPRET=1 for CPU tensors in fp32)"
        )
    if d not in TRITON_SUPPORTED_HEAD_DIMS:
        raise FreeattenError(
            f"head dim {d} is not supported by the Triton kernels: use one of {sorted(TRITON_SUPPORTED_HEAD_DIMS)}"
        )
    n_k = k.shape[2]
    if n_q < 1 or n_k < 1:
        raise FreeattenError(f"empty attention: {n_q} queries and {n_k} keys (both must be >= 1)")
    if not (isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) and p >= 1):
        raise FreeattenError(f"attention power p must be a finite number >= 1, got {p!r}: e.g. 15 or 3")
    offset = n_k - n_q if q_offset is None else q_offset
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= n_k - n_q:
        raise FreeattenError(
            f"q_offset {q_offset!r} puts queries outside the {n_k} keys: it must be an int in [0, Nk - Nq] = "
            f"[0, {n_k - n_q}] (None = Nk - Nq, the KV-cache case)"
        )
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, n_k, q.device)
    return offset


def _check_cu_seqlens(cu_seqlens: Tensor, n_k: int, device: torch.device) -> None:
    """Document offsets: 1-D integer tensor on the inputs' device, 0 = cu[0] <= cu[1] <= ... <= cu[-1] = Nk."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise FreeattenError("cu_seqlens must be a 1-D tensor of document offsets [0, ..., N] (num_docs + 1 values)")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise FreeattenError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise FreeattenError(f"cu_seqlens is on {cu_seqlens.device} but q, k, v are on {device}: move it there")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != n_k or any(b < a for a, b in zip(offsets, offsets[1:], strict=False)):
        raise FreeattenError(
            f"cu_seqlens must rise from 0 to the sequence length {n_k} without decreasing, got {offsets[:8]}"
            f"{' ...' if len(offsets) > 8 else ''}"
        )


def _documents(cu_seqlens: Tensor | None, n_k: int) -> tuple[Tensor, Tensor] | None:
    """Per key position: start and end (exclusive) of its document, int32; None without packing."""
    if cu_seqlens is None:
        return None
    cu = cu_seqlens.to(torch.int64)
    doc = torch.searchsorted(cu, torch.arange(n_k, device=cu.device), right=True) - 1
    return cu[doc].to(torch.int32).contiguous(), cu[doc + 1].to(torch.int32).contiguous()


def _inv_norms(x: Tensor) -> Tensor:
    """1 / max(||x_i||, eps) in fp32, contiguous (B, H, N)."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).clamp_min(NORM_EPS).reciprocal().contiguous()


def _common(q: Tensor, k: Tensor, variant: str, p: float, q_offset: int, docs: tuple[Tensor, Tensor] | None) -> dict:
    """Scalar and constexpr kernel arguments shared by every launch (TUNE_*: autotune keys, lengths rounded up to a
    power of two so that growing KV caches re-tune once per octave, not at every step)."""
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    return {
        "H": h, "N_Q": n_q, "N_K": n_k, "Q_OFFSET": q_offset, "STAT_STRIDE": b * h * n_q,
        "LOG_D": math.log(d), "P": float(p), "TUNE_NQ": 1 << (n_q - 1).bit_length(),
        "TUNE_NK": 1 << (n_k - 1).bit_length(), "HEAD_DIM": d, "REWEIGHT": variant == "lssar",
        "PACKED": docs is not None, "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }  # fmt: skip


def _launch(name: str, n_rows: int, batch_heads: int, args: tuple, meta: dict, row_block: str) -> None:
    """Launch over (row blocks, B*H): autotuned configs pick the blocks on a GPU, fixed blocks in the interpreter."""
    kern = _kernels(meta["HEAD_DIM"] > 64)
    kernel = getattr(kern, name)
    if kern.tuned:
        kernel[lambda cfg: (-(-n_rows // cfg[row_block]), batch_heads)](*args, **meta)
        return
    block_m, block_n = _INTERPRETER_BLOCKS[name]
    rows = block_m if row_block == "BLOCK_M" else block_n
    kernel[(-(-n_rows // rows), batch_heads)](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n)


def triton_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    variant: str,
    p: float = 15.0,
    q_offset: int | None = None,
    cu_seqlens: Tensor | None = None,
    needs_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(out, row statistics, LSSAR's U or None): the forward; `needs_grad=False` skips LSSAR's U/G accumulators."""
    offset = _check(q, k, v, variant, p, q_offset, cu_seqlens)
    b, h, n_q, d = q.shape
    docs = _documents(cu_seqlens, k.shape[2])
    meta = _common(q, k, variant, p, offset, docs)
    reweight = meta["REWEIGHT"]
    store_ug = reweight and needs_grad
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    stats = torch.empty((4 if reweight else 1, b, h, n_q), dtype=torch.float32, device=q.device)
    u = torch.empty((b, h, n_q, d), dtype=torch.float32, device=q.device) if store_ug else None
    rq, rk = _inv_norms(q), _inv_norms(k)
    doc_start = docs[0] if docs else rq
    args = (q, k, v, out, rq, rk, stats, stats if u is None else u, doc_start,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])  # fmt: skip
    _launch("fwd", n_q, b * h, args, {**meta, "STORE_UG": store_ug}, "BLOCK_M")
    return out, stats, u


def triton_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    stats: Tensor,
    u: Tensor | None,
    *,
    variant: str,
    p: float = 15.0,
    q_offset: int | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from the forward's out, statistics and U (see `triton_forward`)."""
    offset = _check(q, k, v, variant, p, q_offset, cu_seqlens)
    if variant == "lssar" and u is None:
        raise FreeattenError("LSSAR's backward needs the forward's U accumulators: run triton_forward(needs_grad=True)")
    if grad_out.shape != q.shape:
        raise FreeattenError(f"grad_out has shape {tuple(grad_out.shape)}, expected the output's {tuple(q.shape)}")
    if grad_out.stride(-1) != 1 or grad_out.dtype != q.dtype:
        grad_out = grad_out.to(q.dtype).contiguous()
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    docs = _documents(cu_seqlens, n_k)
    meta = _common(q, k, variant, p, offset, docs)
    rq, rk = _inv_norms(q), _inv_norms(k)
    doc_start, doc_end = docs if docs else (rq, rq)
    u_arg = stats if u is None else u
    kern = _kernels(d > 64)

    delta = torch.empty((3, b, h, n_q), dtype=torch.float32, device=q.device)
    pre_block = _INTERPRETER_BLOCKS["pre"] if not kern.tuned else 64
    kern.pre[(-(-n_q // pre_block), b * h)](
        out, grad_out, rq, stats, u_arg, delta, doc_start, *out.stride()[:3], *grad_out.stride()[:3],
        h, n_q, offset, meta["STAT_STRIDE"], meta["LOG_D"], float(p), HEAD_DIM=d, BLOCK_M=pre_block,
        REWEIGHT=meta["REWEIGHT"], PACKED=meta["PACKED"],
    )  # fmt: skip

    dq = torch.empty((b, h, n_q, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, h, n_k, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, h, n_k, d), dtype=v.dtype, device=q.device)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3])
    _launch("dq", n_q, b * h, (q, k, v, grad_out, dq, rq, rk, stats, delta, doc_start, *strides),
            meta, "BLOCK_M")  # fmt: skip
    _launch("dkdv", n_k, b * h,
            (q, k, v, grad_out, dk, dv, rk, stats, delta, doc_start, doc_end, *strides), meta, "BLOCK_N")  # fmt: skip
    return dq, dk, dv


class _TritonAttention(torch.autograd.Function):
    """Autograd around triton_forward / triton_backward (first-order gradients only)."""

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        variant: str,
        p: float,
        q_offset: int | None,
        cu_seqlens: Tensor | None,
    ) -> Tensor:
        needs_grad = any(ctx.needs_input_grad[:3])
        out, stats, u = triton_forward(
            q, k, v, variant=variant, p=p, q_offset=q_offset, cu_seqlens=cu_seqlens, needs_grad=needs_grad
        )
        ctx.save_for_backward(q, k, v, out, stats, u, cu_seqlens)
        ctx.options = {"variant": variant, "p": p, "q_offset": q_offset}
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, stats, u, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = triton_backward(grad_out, q, k, v, out, stats, u, cu_seqlens=cu_seqlens, **ctx.options)
        return dq, dk, dv, None, None, None, None


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    variant: str,
    p: float = 15.0,
    q_offset: int | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Causal LSSA / LSSAR on (B, H, N, D) tensors with the Triton kernels, differentiable in q, k, v.

    Query i sits at absolute position q_offset + i (None: Nk - Nq) and attends keys j <= it; `cu_seqlens`
    (num_docs + 1 offsets along the key axis, shared by the batch) restricts rows to their own document, with n_i
    counted from the document's start. Returns (B, H, Nq, D) in the input dtype (fp32 accumulation).
    """
    return _TritonAttention.apply(q, k, v, variant, p, q_offset, cu_seqlens)
