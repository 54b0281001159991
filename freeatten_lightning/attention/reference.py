"""Reference math of every attention variant (DESIGN.md section 2): the single source of truth.

Shapes: q (B, H, Nq, D); k, v (B, H, Nk, D) with Nq <= Nk; mask bool, broadcastable to (B, H, Nq, Nk),
True = may attend, None = bottom-right aligned causal. Row i attends n_i = mask.sum(-1) keys (>= 1).
fp16/bf16 inputs are computed in fp32 and cast back; fp32 and fp64 are computed as they are.
Each explicit variant is a private weight function ``(q, k, mask, n, p) -> (B, H, Nq, Nk)`` followed by
``weights @ v``; ``attention_weights`` exposes those weights for tests and plots.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from freeatten_lightning.errors import FreeattenError

WeightFn = Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]


def causal_mask(n_queries: int, n_keys: int, device: torch.device | str | None = None) -> Tensor:
    """Bool (Nq, Nk): query i sits at absolute position Nk - Nq + i and sees keys j <= it (KV cache)."""
    if n_queries > n_keys:
        raise FreeattenError(f"causal_mask needs n_queries <= n_keys, got {n_queries} > {n_keys}")
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(n_keys - n_queries)


def document_causal_mask(doc_ids: Tensor) -> Tensor:
    """Bool (..., 1, N, N) from doc_ids (..., N): causal AND same document (packed, contiguous documents)."""
    n = doc_ids.shape[-1]
    same_doc = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)
    return (same_doc & causal_mask(n, n, doc_ids.device)).unsqueeze(-3)


def _scaled_scores(q: Tensor, k: Tensor) -> Tensor:
    """Dot-product scores q.k / sqrt(d) used by softmax, ssa, sigmoid and relu."""
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])


def _lssa_f(q: Tensor, k: Tensor, mask: Tensor, n: Tensor) -> Tensor:
    """LSSA steps 1-3: f_ij = softplus(ln(d) ln(n_i) q^_i.k^_j) with QK-norm, multiplied by the mask."""
    s = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
    c = math.log(q.shape[-1]) * torch.log(n)
    return F.softplus(c * s) * mask


def _reweight(f: Tensor, mask: Tensor, n: Tensor, p: float) -> Tensor:
    """LSSAR re-weighting in the overflow-free streaming form: w = (ReLU(f - t) / m)^p, l1-normalised.

    t_i = 0 for rows with n_i <= 3, else the row mean mu_i = Z_i / n_i. Flat-row fallback: a row with
    m_i = max_j ReLU(f_ij - t_i) = 0 (every f at the threshold) gets the stage-1 weights f / Z instead.
    """
    z = f.sum(-1, keepdim=True)
    t = torch.where(n > 3, z / n, torch.zeros_like(z))
    g = torch.relu(f - t).masked_fill(~mask, 0.0)
    m = g.amax(-1, keepdim=True)
    flat = m == 0
    w = (g / torch.where(flat, torch.ones_like(m), m)) ** p
    w_sum = w.sum(-1, keepdim=True)
    return torch.where(flat, f / z, w / torch.where(flat, torch.ones_like(w_sum), w_sum))


def _softmax_weights(q: Tensor, k: Tensor, mask: Tensor, n: Tensor, p: float) -> Tensor:
    """Softmax: A_ij = softmax_j(q.k / sqrt(d)) over the unmasked keys."""
    return torch.softmax(_scaled_scores(q, k).masked_fill(~mask, -math.inf), dim=-1)


def _lssa_weights(q: Tensor, k: Tensor, mask: Tensor, n: Tensor, p: float) -> Tensor:
    """LSSA step 4: A_ij = f_ij / Z_i."""
    f = _lssa_f(q, k, mask, n)
    return f / f.sum(-1, keepdim=True)


def _lssar_weights(q: Tensor, k: Tensor, mask: Tensor, n: Tensor, p: float) -> Tensor:
    """LSSAR: LSSA's f, then the re-weighting with power p."""
    return _reweight(_lssa_f(q, k, mask, n), mask, n, p)


def _softmax_reweight_weights(q: Tensor, k: Tensor, mask: Tensor, n: Tensor, p: float) -> Tensor:
    """Softmax followed by the LSSAR re-weighting; f = exp(s - rowmax) (re-weighting is scale invariant)."""
    s = _scaled_scores(q, k).masked_fill(~mask, -math.inf)
    return _reweight(torch.exp(s - s.amax(-1, keepdim=True)), mask, n, p)


def _ssa_weights(q: Tensor, k: Tensor, mask: Tensor, n: Tensor, p: float) -> Tensor:
    """SSA: softplus(q.k / sqrt(d)), masked and l1-normalised (no QK-norm, no length scale)."""
    f = F.softplus(_scaled_scores(q, k)) * mask
    return f / f.sum(-1, keepdim=True)


def _sigmoid_weights(q: Tensor, k: Tensor, mask: Tensor, n: Tensor, p: float) -> Tensor:
    """Sigmoid attention: sigmoid(q.k / sqrt(d) - ln n_i), masked to 0, not normalised."""
    return torch.sigmoid(_scaled_scores(q, k) - torch.log(n)) * mask


def _relu_weights(q: Tensor, k: Tensor, mask: Tensor, n: Tensor, p: float) -> Tensor:
    """ReLU attention: ReLU(q.k / sqrt(d)) / n_i, masked."""
    return torch.relu(_scaled_scores(q, k)) * mask / n


_WEIGHTS: dict[str, WeightFn] = {
    "softmax": _softmax_weights,
    "lssa": _lssa_weights,
    "lssar": _lssar_weights,
    "ssa": _ssa_weights,
    "sigmoid": _sigmoid_weights,
    "relu": _relu_weights,
    "softmax-reweight": _softmax_reweight_weights,
}


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp16/bf16 are computed in fp32; every other floating dtype as it is."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _resolve_mask(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """The given bool mask, or the bottom-right causal mask when None."""
    if mask is None:
        return causal_mask(q.shape[-2], k.shape[-2], q.device)
    if mask.dtype != torch.bool:
        raise FreeattenError(f"attention mask must be bool (True = may attend), got {mask.dtype}")
    return mask


def _weights(name: str, q: Tensor, k: Tensor, mask: Tensor | None, p: float) -> Tensor:
    """Weights of variant `name` in the compute dtype, with n_i = mask.sum(-1) keys per row."""
    mask = _resolve_mask(q, k, mask)
    dtype = _compute_dtype(q)
    n = mask.sum(-1, keepdim=True).to(dtype)
    return _WEIGHTS[name](q.to(dtype), k.to(dtype), mask, n, p)


def _attend_explicit(name: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: float = 15.0) -> Tensor:
    """O = weights @ v in the compute dtype, cast back to the input dtype."""
    weights = _weights(name, q, k, mask, p)
    return (weights @ v.to(weights.dtype)).to(q.dtype)


def attention_weights(name: str, q: Tensor, k: Tensor, mask: Tensor | None = None, p: float = 15.0) -> Tensor:
    """The (B, H, Nq, Nk) weight matrix of any variant (softmax included), in the input dtype."""
    if name not in _WEIGHTS:
        raise FreeattenError(f"unknown attention '{name}': choose one of {', '.join(_WEIGHTS)}")
    return _weights(name, q, k, mask, p).to(q.dtype)


def softmax(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softmax baseline through torch's scaled_dot_product_attention (is_causal fast path when possible)."""
    dtype = _compute_dtype(q)
    q32, k32, v32 = q.to(dtype), k.to(dtype), v.to(dtype)
    if mask is None and q.shape[-2] == k.shape[-2]:
        out = F.scaled_dot_product_attention(q32, k32, v32, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=_resolve_mask(q, k, mask))
    return out.to(q.dtype)


def lssa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Length-Scaled Softplus Attention (stage 1): A = softplus(ln(d) ln(n_i) q^.k^) / Z."""
    return _attend_explicit("lssa", q, k, v, mask)


def lssar(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *, p: float = 15.0) -> Tensor:
    """LSSA with re-weighting (stage 2): ReLU(n A - o)^p, l1-normalised; flat rows fall back to LSSA."""
    return _attend_explicit("lssar", q, k, v, mask, p)


def softmax_reweight(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *, p: float = 15.0) -> Tensor:
    """Softmax weights followed by the LSSAR re-weighting with power p."""
    return _attend_explicit("softmax-reweight", q, k, v, mask, p)


def ssa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softplus attention: softplus(q.k / sqrt(d)), l1-normalised, no QK-norm or length scale."""
    return _attend_explicit("ssa", q, k, v, mask)


def sigmoid(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Sigmoid attention: sigmoid(q.k / sqrt(d) - ln n_i), unnormalised."""
    return _attend_explicit("sigmoid", q, k, v, mask)


def relu(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """ReLU attention: ReLU(q.k / sqrt(d)) / n_i."""
    return _attend_explicit("relu", q, k, v, mask)
