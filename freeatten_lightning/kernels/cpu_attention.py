"""The memory-efficient CPU attention kernel (`kernels/cpu/attention.cpp`) as torch custom ops with autograd.

The C++ source is compiled on first use with torch's extension builder (about a minute, once per machine and CPU
capability; cached under torch's extension directory, `TORCH_EXTENSIONS_DIR`). C++ rather than a tiled pure-PyTorch
version by measurement: see the README's "Fused attention op" section.

`cpu_attention(q, k, v, variant=...)` QK-normalises in PyTorch (autograd handles the norm's backward) and calls the
custom op `freeatten::cpu_attention_forward`, whose registered backward is `freeatten::cpu_attention_backward`;
both have fake implementations, so `torch.compile` and `torch.library.opcheck` see through them.
"""

from __future__ import annotations

import os
import shutil
import sys
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from freeatten_lightning.errors import FreeattenError

SOURCE = Path(__file__).parent / "cpu" / "attention.cpp"
CPU_VARIANTS = ("lssa", "lssar")
BLOCK_Q, BLOCK_K = 64, 512  # query rows per task x keys per tile; the best of 32..256 x 256..1024 at N = 4,096
N_STATS = 5  # per-row statistics saved for the backward: Z, t, m, W, G (see attention.cpp)

# Compiler flags per CPU capability, matching how ATen builds its own vectorised kernels.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
}


def _capability() -> str:
    """ATen's CPU capability ('AVX512', 'AVX2', 'DEFAULT', ...): selects the vector width compiled in."""
    return torch.backends.cpu.get_cpu_capability()


def _extension_name() -> str:
    return f"freeatten_cpu_attention_{_capability().lower()}"


def _build_dir() -> Path:
    """TORCH_EXTENSIONS_DIR (or torch's default) / torch version / name: a torch upgrade never loads a stale build."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return root / f"freeatten-torch-{torch.__version__}" / _extension_name()


_STATUS: dict[str, tuple[bool, str]] = {}


@torch.compiler.assume_constant_result  # a constant to torch.compile: it never traces the file-system checks
def cpu_kernel_status() -> tuple[bool, str]:
    """(True, how it runs) or (False, why not): a C++ compiler is needed unless the kernel is already built."""
    if "status" not in _STATUS:
        _STATUS["status"] = _probe()
    return _STATUS["status"]


def _probe() -> tuple[bool, str]:
    if (_build_dir() / f"{_extension_name()}.so").exists():
        return True, f"C++ kernel ({_capability()}, built)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return False, f"no C++ compiler ('{compiler}' not on PATH): install g++ (or set CXX) to build the CPU kernel"
    return True, f"C++ kernel ({_capability()}, compiled on first use)"


@cache
def kernels():
    """The compiled kernels (`torch.ops.freeatten_cpu_kernels`), building them on the first call."""
    from torch.utils.cpp_extension import load

    available, why = cpu_kernel_status()
    if not available:
        raise FreeattenError(f"the CPU attention kernel cannot be built: {why}; or pass op='reference'")
    name = _extension_name()
    built = _build_dir() / f"{name}.so"
    if not built.exists() or built.stat().st_mtime < SOURCE.stat().st_mtime:
        print(
            f"freeatten: compiling the CPU attention kernel ({_capability()}) once, about a minute; "
            f"cached in {_build_dir()}",
            file=sys.stderr,
            flush=True,
        )
    flags = ["-O3", "-fopenmp", "-DCPU_CAPABILITY=" + _capability(), *_CAPABILITY_FLAGS.get(_capability(), [])]
    _build_dir().mkdir(parents=True, exist_ok=True)
    try:
        load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(_build_dir()),
            is_python_module=False,
        )
    except (RuntimeError, OSError, ImportError) as err:
        raise FreeattenError(
            f"building the CPU attention kernel failed ({err}): check that g++ works, or pass op='reference'"
        ) from err
    return torch.ops.freeatten_cpu_kernels


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _no_docs(q: Tensor) -> Tensor:
    return torch.empty(0, dtype=torch.int32, device=q.device)


@torch.library.custom_op("freeatten::cpu_attention_forward", mutates_args=())
def cpu_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    reweight: bool,
    p: float,
    causal: bool,
    q_offset: int,
    cu_seqlens: Tensor | None,
    save_u: bool,
    block_q: int,
    block_k: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, stats, u) from unit-norm q^, k^ (B, H, N, D), fp32/fp64; u is LSSAR's U accumulator when saved."""
    docs = _no_docs(q) if cu_seqlens is None else cu_seqlens
    out, stats, u = kernels().forward(q, k, v, reweight, p, causal, q_offset, docs, save_u, block_q, block_k)
    return out, stats, u


@cpu_attention_forward.register_fake
def _(q, k, v, reweight, p, causal, q_offset, cu_seqlens, save_u, block_q, block_k):
    out = q.new_empty(q.shape)
    u = q.new_empty(q.shape) if save_u and reweight else q.new_empty(0)
    return out, q.new_empty((*q.shape[:-1], N_STATS)), u


@torch.library.custom_op("freeatten::cpu_attention_backward", mutates_args=())
def cpu_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    stats: Tensor,
    u: Tensor,
    reweight: bool,
    p: float,
    causal: bool,
    q_offset: int,
    cu_seqlens: Tensor | None,
    block_q: int,
    block_k: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq^, dk^, dv) by recomputing the tiles; grad_out must have a contiguous last dimension."""
    docs = _no_docs(q) if cu_seqlens is None else cu_seqlens
    dq, dk, dv = kernels().backward(
        grad_out, q, k, v, out, stats, u, reweight, p, causal, q_offset, docs, block_q, block_k
    )
    return dq, dk, dv


@cpu_attention_backward.register_fake
def _(grad_out, q, k, v, out, stats, u, reweight, p, causal, q_offset, cu_seqlens, block_q, block_k):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, reweight, p, causal, q_offset, cu_seqlens, save_u, block_q, block_k = inputs
    out, stats, u = output
    ctx.save_for_backward(q, k, v, out, stats, u, cu_seqlens)
    ctx.args = (reweight, p, causal, q_offset, save_u, block_q, block_k)


def _backward(ctx, grad_out: Tensor, _grad_stats: Tensor, _grad_u: Tensor):
    q, k, v, out, stats, u, cu_seqlens = ctx.saved_tensors
    reweight, p, causal, q_offset, save_u, block_q, block_k = ctx.args
    if reweight and not save_u:
        raise FreeattenError("cpu_attention_forward ran with save_u=False: pass save_u=True to differentiate LSSAR")
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dq, dk, dv = cpu_attention_backward(
        grad_out, q, k, v, out, stats, u, reweight, p, causal, q_offset, cu_seqlens, block_q, block_k
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


cpu_attention_forward.register_autograd(_backward, setup_context=_setup_context)


def cpu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    variant: str,
    p: float = 15.0,
    causal: bool = True,
    q_offset: int | None = None,
    cu_seqlens: Tensor | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> Tensor:
    """LSSA / LSSAR of q (B, H, Nq, D), k, v (B, H, Nk, D), last dim contiguous; returns (B, H, Nq, D) in q's dtype.

    causal: query i sits at absolute position q_offset + i (None: Nk - Nq) and sees keys up to it; cu_seqlens
    (num_docs + 1 offsets, Nq == Nk) restricts each row to its own document. causal=False: every row sees all keys.
    fp16/bf16 are computed in fp32, like the reference. block_q x block_k: the tile (default BLOCK_Q x BLOCK_K).
    """
    if variant not in CPU_VARIANTS:
        raise FreeattenError(f"the CPU kernel runs {', '.join(CPU_VARIANTS)}, not '{variant}'")
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_hat, k_hat = (_last_dim_contiguous(F.normalize(x.to(compute), dim=-1)) for x in (q, k))
    v = _last_dim_contiguous(v.to(compute))
    offset = k.shape[-2] - q.shape[-2] if q_offset is None else q_offset
    save_u = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    out, _, _ = cpu_attention_forward(
        q_hat, k_hat, v, variant == "lssar", float(p), causal, offset, cu_seqlens, save_u,
        block_q or BLOCK_Q, block_k or BLOCK_K,
    )  # fmt: skip
    return out.to(q.dtype)
