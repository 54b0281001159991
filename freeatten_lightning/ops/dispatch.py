"""Backends and the dispatcher, in the style of xformers' fmha: each backend declares what it supports and says
why it refuses given inputs; the dispatcher runs the first that fits, or the one forced with `op=`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from freeatten_lightning.attention import AttentionSpec
from freeatten_lightning.errors import FreeattenError
from freeatten_lightning.ops.bias import AttentionBias


@dataclass(frozen=True, eq=False)
class Inputs:
    """One validated attention call in the backends' layout: query (B, H, Nq, D), key and value (B, H, Nk, D)."""

    query: Tensor
    key: Tensor
    value: Tensor
    attn_bias: AttentionBias | None
    spec: AttentionSpec

    @property
    def device_type(self) -> str:
        return self.query.device.type

    @property
    def dtype(self) -> torch.dtype:
        return self.query.dtype

    @property
    def head_dim(self) -> int:
        return self.query.shape[-1]

    @property
    def requires_grad(self) -> bool:
        return torch.is_grad_enabled() and any(x.requires_grad for x in (self.query, self.key, self.value))

    def describe(self) -> str:
        bias = "none" if self.attn_bias is None else type(self.attn_bias).__name__
        b, h, n_q, d = self.query.shape
        return (
            f"batch {b}, heads {h}, {n_q} queries, {self.key.shape[2]} keys, head_dim {d}, {self.dtype} on "
            f"{self.device_type}, {self.spec.label}, bias {bias}"
        )


def bias_name(bias: type | None) -> str:
    return "none" if bias is type(None) else bias.__name__


class Backend:
    """What an attention implementation supports, why it refuses given inputs, and how it runs them."""

    name: str = ""
    devices: tuple[str, ...] | None = ("cpu", "cuda")  # None: any
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    head_dims: Sequence[int] | None = None  # None: any
    biases: tuple[type, ...] = ()
    variants: tuple[str, ...] = ()
    supports_backward: bool = True
    needs_last_dim_contiguous: bool = False
    needs_equal_value_dim: bool = False

    def available(self) -> tuple[bool, str]:
        """(True, how it runs) or (False, why it cannot run on this machine)."""
        return True, ""

    def supported_devices(self) -> tuple[str, ...] | None:
        return self.devices

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        """Every reason this backend cannot run `inputs` (empty when it can)."""
        reasons = []
        ok, why = self.available()
        if not ok:
            reasons.append(f"not available: {why}")
        devices = self.supported_devices()
        if devices is not None and inputs.device_type not in devices:
            reasons.append(f"device '{inputs.device_type}' not supported ({', '.join(devices)})")
        if inputs.dtype not in self.dtypes:
            reasons.append(f"dtype {inputs.dtype} not supported ({', '.join(map(str, self.dtypes))})")
        if self.head_dims is not None and inputs.head_dim not in self.head_dims:
            reasons.append(f"head_dim {inputs.head_dim} not supported ({format_head_dims(self.head_dims)})")
        if self.needs_equal_value_dim and inputs.value.shape[-1] != inputs.head_dim:
            reasons.append(f"value head_dim {inputs.value.shape[-1]} differs from the query's {inputs.head_dim}")
        if type(inputs.attn_bias) not in self.biases:
            reasons.append(
                f"attn_bias {bias_name(type(inputs.attn_bias))} not supported "
                f"({', '.join(bias_name(b) for b in self.biases)})"
            )
        if inputs.spec.name not in self.variants:
            reasons.append(f"variant '{inputs.spec.name}' not supported ({', '.join(self.variants)})")
        if inputs.requires_grad and not self.supports_backward:
            reasons.append("no backward: inputs require grad")
        if self.needs_last_dim_contiguous:
            for name, x in (("query", inputs.query), ("key", inputs.key), ("value", inputs.value)):
                if x.stride(-1) != 1:
                    reasons.append(f"{name} is not contiguous in its last dim (stride {x.stride(-1)}): .contiguous()")
        return reasons

    def forward(self, inputs: Inputs) -> Tensor:
        """The attention output (B, H, Nq, D) in the query's dtype."""
        raise NotImplementedError


def format_head_dims(head_dims: Sequence[int] | None) -> str:
    if head_dims is None:
        return "any"
    if isinstance(head_dims, range):
        return f"{head_dims.start}-{head_dims.stop - 1}"
    return ", ".join(str(d) for d in sorted(head_dims))


def choose_backend(backends: Sequence[Backend], inputs: Inputs, op: str | Backend | None = None) -> Backend:
    """The forced backend `op` if it fits, else the first that fits; one FreeattenError with every reason if none."""
    if op is not None:
        backend = _find(backends, op)
        reasons = backend.not_supported_reasons(inputs)
        if reasons:
            raise FreeattenError(
                f"op='{backend.name}' cannot run this attention ({inputs.describe()}): {'; '.join(reasons)}"
            )
        return backend
    refusals = []
    for backend in backends:
        reasons = backend.not_supported_reasons(inputs)
        if not reasons:
            return backend
        refusals.append(f"  {backend.name}: {'; '.join(reasons)}")
    raise FreeattenError(f"no attention backend can run this attention ({inputs.describe()}):\n" + "\n".join(refusals))


def _find(backends: Sequence[Backend], op: str | Backend) -> Backend:
    if isinstance(op, Backend):
        return op
    for backend in backends:
        if backend.name == op:
            return backend
    raise FreeattenError(f"unknown op '{op}': choose one of {', '.join(b.name for b in backends)} (or None)")


def backend_table(backends: Sequence[Backend]) -> list[dict[str, str]]:
    """One row per backend: name, availability, devices, dtypes, head dims, biases, variants, backward."""
    rows = []
    for backend in backends:
        ok, why = backend.available()
        rows.append(
            {
                "backend": backend.name,
                "available": f"yes: {why}" if ok and why else ("yes" if ok else f"no: {why}"),
                "devices": ", ".join(backend.supported_devices() or ("any",)),
                "dtypes": ", ".join(str(d).removeprefix("torch.") for d in backend.dtypes),
                "head dims": format_head_dims(backend.head_dims),
                "biases": ", ".join(bias_name(b) for b in backend.biases),
                "variants": ", ".join(backend.variants),
                "backward": "yes" if backend.supports_backward else "no",
            }
        )
    return rows
