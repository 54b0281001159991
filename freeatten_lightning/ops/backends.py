"""The attention backends, in dispatch priority order: cpu (fused C++), triton (CUDA), sdpa (softmax), reference."""

from __future__ import annotations

from types import NoneType

import torch
import torch.nn.functional as F
from torch import Tensor

from freeatten_lightning.attention import VARIANTS, attend
from freeatten_lightning.ops.bias import (
    AttentionBias,
    BlockDiagonalCausalMask,
    LowerTriangularFromBottomRightMask,
    LowerTriangularMask,
    TensorMask,
)
from freeatten_lightning.ops.dispatch import Backend, Inputs

CAUSAL_BIASES = (LowerTriangularMask, LowerTriangularFromBottomRightMask, BlockDiagonalCausalMask)
ALL_BIASES = (NoneType, *CAUSAL_BIASES, TensorMask)
FUSED_VARIANTS = ("lssa", "lssar")


def _kernel_arguments(bias: AttentionBias | None, n_q: int, n_k: int, device: torch.device) -> dict:
    """The fused kernels' form of a structured bias: causal flag, query offset and document offsets."""
    if bias is None:
        return {"causal": False, "q_offset": 0, "cu_seqlens": None}
    cu_seqlens = bias.cu_seqlens(device) if isinstance(bias, BlockDiagonalCausalMask) else None
    return {"causal": True, "q_offset": bias.query_offset(n_q, n_k), "cu_seqlens": cu_seqlens}


def _reference_mask(inputs: Inputs) -> Tensor | None:
    """The reference's bool mask for the bias (None = bottom-right causal, its default and fast path)."""
    n_q, n_k = inputs.query.shape[2], inputs.key.shape[2]
    bias = inputs.attn_bias
    if bias is None:
        return torch.ones(n_q, n_k, dtype=torch.bool, device=inputs.query.device)
    if isinstance(bias, LowerTriangularFromBottomRightMask) or (isinstance(bias, LowerTriangularMask) and n_q == n_k):
        return None
    return bias.materialize(n_q, n_k, inputs.query.device)


class ReferenceBackend(Backend):
    """The eager math of `freeatten_lightning.attention.reference`: every variant and mask, O(N^2) memory."""

    name = "reference"
    devices = None
    biases = ALL_BIASES
    variants = tuple(VARIANTS)

    def forward(self, inputs: Inputs) -> Tensor:
        return attend(inputs.query, inputs.key, inputs.value, inputs.spec, _reference_mask(inputs))


class SdpaBackend(Backend):
    """torch's scaled_dot_product_attention (softmax only): FlashAttention on CUDA, its flash kernel on the CPU."""

    name = "sdpa"
    biases = ALL_BIASES
    variants = ("softmax",)

    def forward(self, inputs: Inputs) -> Tensor:
        q, k, v, bias = inputs.query, inputs.key, inputs.value, inputs.attn_bias
        if bias is None:
            return F.scaled_dot_product_attention(q, k, v)
        if isinstance(bias, LowerTriangularMask):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # torch's causal is top-left aligned
        n_q, n_k = q.shape[2], k.shape[2]
        if isinstance(bias, LowerTriangularFromBottomRightMask) and n_q == n_k:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.materialize(n_q, n_k, q.device))


class CpuBackend(Backend):
    """The memory-efficient C++ kernel (`kernels/cpu/attention.cpp`): tiled, O(N) memory, fp32 accumulation."""

    name = "cpu"
    devices = ("cpu",)
    biases = (NoneType, *CAUSAL_BIASES)
    variants = FUSED_VARIANTS
    needs_last_dim_contiguous = True
    needs_equal_value_dim = True

    def available(self) -> tuple[bool, str]:
        from freeatten_lightning.kernels.cpu_attention import cpu_kernel_status

        return cpu_kernel_status()

    def forward(self, inputs: Inputs) -> Tensor:
        from freeatten_lightning.kernels.cpu_attention import cpu_attention

        q, k, v = inputs.query, inputs.key, inputs.value
        args = _kernel_arguments(inputs.attn_bias, q.shape[2], k.shape[2], q.device)
        return cpu_attention(q, k, v, variant=inputs.spec.name, p=inputs.spec.p, **args)


_TRITON: dict[str, object] = {}


@torch.compiler.assume_constant_result  # constants to torch.compile, computed once per process
def _triton_interpreting() -> bool:
    """Whether Triton runs kernels on its CPU interpreter (TRITON_INTERPRET=1), which makes CPU tensors valid."""
    if "interpreting" not in _TRITON:
        kernels = _triton_kernels()
        _TRITON["interpreting"] = kernels is not None and kernels._interpreting()
    return _TRITON["interpreting"]


@torch.compiler.assume_constant_result
def _triton_status() -> tuple[bool, str]:
    if "status" not in _TRITON:
        kernels = _triton_kernels()
        missing = (False, "kernels missing (freeatten_lightning/kernels/triton_attention.py)")
        _TRITON["status"] = missing if kernels is None else kernels.triton_is_available()
    return _TRITON["status"]


class TritonBackend(Backend):
    """The Triton kernels (`kernels/triton_attention.py`): CUDA; on CPU tensors only with TRITON_INTERPRET=1."""

    name = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    biases = CAUSAL_BIASES
    variants = FUSED_VARIANTS
    needs_last_dim_contiguous = True
    needs_equal_value_dim = True

    @property
    def head_dims(self) -> frozenset[int] | None:
        kernels = _triton_kernels()
        return kernels.TRITON_SUPPORTED_HEAD_DIMS if kernels else None

    def available(self) -> tuple[bool, str]:
        return _triton_status()

    def supported_devices(self) -> tuple[str, ...]:
        return ("cuda", "cpu") if _triton_interpreting() else ("cuda",)

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        if inputs.device_type == "cpu" and inputs.dtype != torch.float32 and _triton_interpreting():
            reasons.append("the Triton interpreter runs float32 only")
        return reasons

    def forward(self, inputs: Inputs) -> Tensor:
        from freeatten_lightning.kernels.triton_op import triton_attention_op

        q, k, v = inputs.query, inputs.key, inputs.value
        args = _kernel_arguments(inputs.attn_bias, q.shape[2], k.shape[2], q.device)
        del args["causal"]
        return triton_attention_op(q, k, v, variant=inputs.spec.name, p=inputs.spec.p, **args)


def _triton_kernels():
    """Part B's kernel module, or None when it is not there."""
    try:
        from freeatten_lightning.kernels import triton_attention
    except ImportError:
        return None
    return triton_attention


BACKENDS: tuple[Backend, ...] = (CpuBackend(), TritonBackend(), SdpaBackend(), ReferenceBackend())
