"""Attention variants by name, a validated choice of one (AttentionSpec), and `attend` for the model."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from freeatten_lightning.attention.reference import (
    attention_weights,
    causal_mask,
    document_causal_mask,
    lssa,
    lssar,
    relu,
    sigmoid,
    softmax,
    softmax_reweight,
    ssa,
)
from freeatten_lightning.errors import FreeattenError

VARIANTS: dict[str, Callable[..., torch.Tensor]] = {
    "softmax": softmax,
    "lssa": lssa,
    "lssar": lssar,
    "ssa": ssa,
    "sigmoid": sigmoid,
    "relu": relu,
    "softmax-reweight": softmax_reweight,
}
REWEIGHTED = frozenset({"lssar", "softmax-reweight"})


@dataclass(frozen=True)
class AttentionSpec:
    """Which attention variant to use and its re-weighting power p (used only by REWEIGHTED variants)."""

    name: str = "lssar"
    p: float = 15.0

    def __post_init__(self) -> None:
        if self.name not in VARIANTS:
            raise FreeattenError(f"unknown attention '{self.name}': choose one of {', '.join(VARIANTS)}")
        valid_number = isinstance(self.p, (int, float)) and not isinstance(self.p, bool)
        if not (valid_number and math.isfinite(self.p) and self.p >= 1):
            raise FreeattenError(
                f"attention power p must be a finite number >= 1 (below 1 the gradient of (g/m)^p at 0 is "
                f"infinite), got {self.p!r}: set p to e.g. 15 (the paper's default) or 3"
            )

    @property
    def label(self) -> str:
        """Human-readable name: 'lssar (p=15)' for re-weighted variants, else the bare name."""
        return f"{self.name} (p={self.p:g})" if self.name in REWEIGHTED else self.name


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Run the variant named by `spec` (q: (B, H, Nq, D), k, v: (B, H, Nk, D); mask None = causal)."""
    if spec.name in REWEIGHTED:
        return VARIANTS[spec.name](q, k, v, mask, p=spec.p)
    return VARIANTS[spec.name](q, k, v, mask)


__all__ = [
    "REWEIGHTED",
    "VARIANTS",
    "AttentionSpec",
    "attend",
    "attention_weights",
    "causal_mask",
    "document_causal_mask",
    "lssa",
    "lssar",
    "relu",
    "sigmoid",
    "softmax",
    "softmax_reweight",
    "ssa",
]
