"""Tests of the reference attention math (DESIGN.md section 2): scalar Python references and structure."""

from __future__ import annotations

import math

import pytest
import torch

from freeatten_lightning.attention import (
    REWEIGHTED,
    VARIANTS,
    AttentionSpec,
    attend,
    attention_weights,
    causal_mask,
    document_causal_mask,
)
from freeatten_lightning.attention.reference import _reweight
from freeatten_lightning.errors import FreeattenError

NAMES = list(VARIANTS)
NORMALISING = ["softmax", "lssa", "lssar", "ssa", "softmax-reweight"]
ALL_NAMES_TEXT = "softmax, lssa, lssar, ssa, sigmoid, relu, softmax-reweight"


def make_qkv(b: int, h: int, nq: int, nk: int, d: int, dtype=torch.float64, seed: int = 0, grad: bool = False):
    """Random q (b, h, nq, d) and k, v (b, h, nk, d) from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for n in (nq, nk, nk))
    return tuple(x.to(dtype).requires_grad_(grad) for x in (q, k, v))


def run(name: str, q, k, v, mask=None, p: float = 3.0):
    """Call a registered variant, passing p only to the re-weighted ones."""
    return attend(q, k, v, AttentionSpec(name, p if name in REWEIGHTED else 15.0), mask)


# ---------------------------------------------------------------- scalar (math module) reference


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def scalar_row_weights(name: str, qi: list[float], keys: list[list[float]], p: float) -> list[float]:
    """Weights of one query over the keys it attends, from the paper's formulas (not the streaming form)."""
    d, n = len(qi), len(keys)
    raw = [_dot(qi, kj) / math.sqrt(d) for kj in keys]
    if name in ("softmax", "softmax-reweight"):
        top = max(raw)
        e = [math.exp(x - top) for x in raw]
        a = [x / sum(e) for x in e]
    elif name in ("lssa", "lssar"):
        c = math.log(d) * math.log(n)
        f = [_softplus(c * _dot(qi, kj) / math.sqrt(_dot(qi, qi) * _dot(kj, kj))) for kj in keys]
        a = [x / sum(f) for x in f]
    elif name == "ssa":
        f = [_softplus(x) for x in raw]
        a = [x / sum(f) for x in f]
    elif name == "sigmoid":
        a = [1.0 / (1.0 + math.exp(-(x - math.log(n)))) for x in raw]
    else:
        a = [max(x, 0.0) / n for x in raw]
    if name in REWEIGHTED:
        offset = 0.0 if n <= 3 else 1.0
        r = [max(n * x - offset, 0.0) ** p for x in a]
        a = [x / sum(r) for x in r]
    return a


def scalar_attention(name: str, q, k, v, mask, p: float) -> list[list[float]]:
    """O_i = sum_j A_ij v_j with loops over nested lists (one batch element, one head)."""
    out = []
    for i, qi in enumerate(q):
        cols = [j for j in range(len(k)) if mask[i][j]]
        a = scalar_row_weights(name, qi, [k[j] for j in cols], p)
        out.append([sum(a[t] * v[j][e] for t, j in enumerate(cols)) for e in range(len(v[0]))])
    return out


MASK_KINDS = {
    # name: (n_queries, n_keys, mask or None); rows with n_i >= 4 exist in every kind
    "causal": (6, 6, None),
    "offset": (3, 7, None),
    "document": (7, 7, document_causal_mask(torch.tensor([0, 0, 0, 0, 0, 1, 1]))),
}


@pytest.mark.parametrize("kind", list(MASK_KINDS))
@pytest.mark.parametrize("name", NAMES)
def test_matches_scalar_reference(name: str, kind: str) -> None:
    nq, nk, mask = MASK_KINDS[kind]
    q, k, v = make_qkv(1, 1, nq, nk, 4, seed=1)
    p = 3.0
    full = causal_mask(nq, nk) if mask is None else mask[0]
    expected = scalar_attention(name, q[0, 0].tolist(), k[0, 0].tolist(), v[0, 0].tolist(), full.tolist(), p)
    got = run(name, q, k, v, mask, p)
    torch.testing.assert_close(got[0, 0], torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_lssa_hand_values() -> None:
    """Hand-derived: s_ij = +-1 by construction: rows 0, 1 are uniform, row 2 is softplus(+-ln 4 ln 3)."""
    q = torch.ones(1, 1, 3, 4, dtype=torch.float64)
    k = torch.tensor([[1.0, 1, 1, 1], [2, 2, 2, 2], [-1, -1, -1, -1]], dtype=torch.float64)[None, None]
    v = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.float64)[None, None]
    c3 = math.log(4) * math.log(3)
    row2 = [_softplus(c3), _softplus(c3), _softplus(-c3)]
    expected = [[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [x / sum(row2) for x in row2] + [0.0]]
    torch.testing.assert_close(VARIANTS["lssa"](q, k, v)[0, 0], torch.tensor(expected, dtype=torch.float64))


# ---------------------------------------------------------------- structure of the weights


def _mask_case(kind: str):
    """(q, k, mask passed to the variant, explicit full mask) for a structural test."""
    if kind == "causal":
        q, k, _ = make_qkv(2, 2, 9, 9, 8, seed=2)
        return q, k, None, causal_mask(9, 9)
    if kind == "offset":
        q, k, _ = make_qkv(2, 2, 4, 9, 8, seed=3)
        return q, k, None, causal_mask(4, 9)
    q, k, _ = make_qkv(2, 2, 9, 9, 8, seed=4)
    mask = document_causal_mask(torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 2, 2]]))
    return q, k, mask, mask


@pytest.mark.parametrize("kind", ["causal", "offset", "document"])
@pytest.mark.parametrize("name", NAMES)
def test_weights_zero_on_masked_keys_and_rows_sum_to_one(name: str, kind: str) -> None:
    q, k, mask, full = _mask_case(kind)
    w = attention_weights(name, q, k, mask, p=15.0)
    assert w.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    assert torch.all(w.masked_fill(full, 0.0) == 0)
    assert torch.all(w >= 0)
    if name in NORMALISING:
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))


@pytest.mark.parametrize("name", NAMES)
def test_weights_times_v_is_the_variant(name: str) -> None:
    """attention_weights (explicit, softmax included) agrees with the function the model runs."""
    q, k, v = make_qkv(2, 2, 4, 9, 8, seed=5)
    for mask in (None, causal_mask(4, 9)):
        torch.testing.assert_close(attention_weights(name, q, k, mask, p=3.0) @ v, run(name, q, k, v, mask))


@pytest.mark.parametrize("name", NAMES)
def test_causality(name: str) -> None:
    q, k, v = make_qkv(1, 2, 10, 10, 8, seed=6)
    cut = 4
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, cut + 1 :] = torch.randn_like(x[:, :, cut + 1 :]) * 5
    before, after = run(name, q, k, v), run(name, q2, k2, v2)
    torch.testing.assert_close(before[:, :, : cut + 1], after[:, :, : cut + 1], rtol=0, atol=1e-13)
    assert not torch.allclose(before[:, :, cut + 1 :], after[:, :, cut + 1 :])


@pytest.mark.parametrize("name", NAMES)
def test_packed_documents_equal_documents_alone(name: str) -> None:
    lengths = [5, 6, 3]
    q, k, v = make_qkv(1, 2, sum(lengths), sum(lengths), 8, seed=7)
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    packed = run(name, q, k, v, document_causal_mask(doc_ids[None]))
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        alone = run(name, q[:, :, part], k[:, :, part], v[:, :, part])
        torch.testing.assert_close(packed[:, :, part], alone, rtol=1e-10, atol=1e-12)
        start += n


@pytest.mark.parametrize("name", NAMES)
def test_decode_offset_matches_full_forward(name: str) -> None:
    q, k, v = make_qkv(2, 2, 10, 10, 8, seed=8)
    full = run(name, q, k, v)
    for n_new in (1, 3):
        last = run(name, q[:, :, -n_new:], k, v)
        torch.testing.assert_close(last, full[:, :, -n_new:], rtol=1e-10, atol=1e-12)


def test_masks() -> None:
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert torch.equal(causal_mask(3, 3), torch.ones(3, 3, dtype=torch.bool).tril())
    with pytest.raises(FreeattenError, match="n_queries <= n_keys"):
        causal_mask(5, 4)
    m = document_causal_mask(torch.tensor([[0, 0, 1, 1, 1]]))
    assert m.shape == (1, 1, 5, 5)
    assert m[0, 0].sum(-1).tolist() == [1, 2, 1, 2, 3]
    assert not m[0, 0, 2:, :2].any()


# ---------------------------------------------------------------- LSSAR re-weighting


def test_lssar_first_three_rows_offset_zero_then_mean_threshold() -> None:
    q, k, _ = make_qkv(1, 2, 12, 12, 8, seed=9)
    p = 3.0
    a = attention_weights("lssa", q, k)  # proportional to f in every row
    w = attention_weights("lssar", q, k, p=p)
    early = a[:, :, :3] ** p
    torch.testing.assert_close(w[:, :, :3], early / early.sum(-1, keepdim=True))
    n = torch.arange(1, 13, dtype=torch.float64).view(12, 1)
    below_mean = (a <= 1.0 / n) & causal_mask(12, 12)
    late = below_mean[:, :, 3:]
    assert late.any(-1).all(), "every row n_i >= 4 should have keys at or below its mean"
    assert torch.all(w[:, :, 3:][late] == 0)
    assert torch.all(w[:, :, 3:][~late & causal_mask(12, 12)[3:]] > 0)


def test_lssar_approaches_argmax_as_p_grows() -> None:
    q, k, _ = make_qkv(1, 4, 16, 16, 8, seed=10)
    a = attention_weights("lssa", q, k)
    n = torch.arange(1, 17, dtype=torch.float64).view(16, 1)
    top2 = (n * a - 1).topk(2, dim=-1).values
    rows = (n.view(16) > 3) & (top2[..., 1] < 0.99 * top2[..., 0])  # n_i > 3 with a clear, unique max
    assert rows.sum() > 20
    at_max = [
        attention_weights("lssar", q, k, p=p).gather(-1, a.argmax(-1, keepdim=True))[..., 0][rows]
        for p in (1.0, 3.0, 15.0, 100.0, 3000.0)
    ]
    for lo, hi in zip(at_max, at_max[1:], strict=False):
        assert torch.all(hi >= lo - 1e-12)
    torch.testing.assert_close(at_max[-1], torch.ones_like(at_max[-1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(REWEIGHTED))
def test_flat_row_falls_back_to_stage_one(name: str) -> None:
    """Identical keys make every f of a row equal: the output is the plain average of the attended values."""
    q, _, v = make_qkv(1, 2, 8, 8, 4, seed=11, grad=True)
    k = torch.ones(1, 2, 8, 4, dtype=torch.float64, requires_grad=True)
    out = run(name, q, k, v, p=15.0)
    n = torch.arange(1, 9, dtype=torch.float64).view(8, 1)
    torch.testing.assert_close(out, v.cumsum(-2) / n)
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_reweight_exactly_flat_row_uses_stage_one_weights() -> None:
    """The m_i == 0 branch itself: f = 1 on every attended key gives mu_i = 1 exactly, so g = 0."""
    mask = causal_mask(6, 6)
    f = mask.double().expand(1, 1, 6, 6).clone().requires_grad_(True)
    n = mask.sum(-1, keepdim=True).double()
    w = _reweight(f, mask, n, 15.0)
    torch.testing.assert_close(w, (mask / n).expand_as(w))
    w.pow(2).sum().backward()
    assert torch.isfinite(f.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_finite_at_16k_keys(name: str, dtype: torch.dtype) -> None:
    """n = 16,384 with p = 15: the naive ReLU(n A - 1)^p would reach ~1e63 and overflow fp32."""
    q, k, v = make_qkv(1, 1, 4, 16384, 64, dtype=dtype, seed=12, grad=True)
    out = run(name, q, k, v, p=15.0)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    out.float().square().sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    if name in NORMALISING:
        w = attention_weights(name, q.detach().float(), k.detach().float(), causal_mask(4, 16384), p=15.0)
        torch.testing.assert_close(w.sum(-1), torch.ones(1, 1, 4))


# ---------------------------------------------------------------- gradients and precision


@pytest.mark.parametrize(("name", "p"), [(n, 3.0) for n in NAMES] + [("lssar", 15.0)], ids=[*NAMES, "lssar-p15"])
def test_gradcheck_fp64(name: str, p: float) -> None:
    q, k, v = make_qkv(1, 2, 5, 5, 4, seed=13, grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: run(name, q, k, v, p=p), (q, k, v))


def test_gradcheck_fp64_offset_and_documents() -> None:
    q, k, v = make_qkv(1, 2, 3, 6, 4, seed=14, grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: run("lssar", q, k, v), (q, k, v))
    q, k, v = make_qkv(1, 2, 7, 7, 4, seed=15, grad=True)
    mask = document_causal_mask(torch.tensor([[0, 0, 0, 0, 1, 1, 1]]))
    assert torch.autograd.gradcheck(lambda q, k, v: run("lssar", q, k, v, mask), (q, k, v))


# Unit roundoff of each half type: the result is computed in fp32 and rounded once on the way out.
HALF_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("dtype", list(HALF_ROUNDOFF))
@pytest.mark.parametrize("name", NAMES)
def test_half_inputs_are_computed_in_fp32(name: str, dtype: torch.dtype) -> None:
    q, k, v = make_qkv(2, 2, 12, 12, 16, dtype=dtype, seed=16)
    out = run(name, q, k, v, p=15.0)
    assert out.dtype == dtype
    reference = run(name, q.float(), k.float(), v.float(), p=15.0)
    torch.testing.assert_close(out.float(), reference, rtol=HALF_ROUNDOFF[dtype], atol=1e-6)


# Stated end-to-end tolerance of bf16 against fp32 inputs, as relative error ||out - ref|| / ||ref||
# (measured over 20 seeds: <= 0.004 plain, <= 0.015 re-weighted): p = 15 sharpens the weights, so the
# rounding of q and k to bf16 moves a re-weighted output further than a plain weighted average.
BF16_REL_ERROR = {"lssar": 0.03, "softmax-reweight": 0.03}


@pytest.mark.parametrize("name", NAMES)
def test_bf16_agrees_with_fp32(name: str) -> None:
    q, k, v = make_qkv(2, 2, 32, 32, 64, dtype=torch.float32, seed=17)
    reference = run(name, q, k, v, p=15.0)
    out = run(name, q.bfloat16(), k.bfloat16(), v.bfloat16(), p=15.0).float()
    assert (out - reference).norm() / reference.norm() < BF16_REL_ERROR.get(name, 0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_full_precision_dtypes_are_kept(name: str, dtype: torch.dtype) -> None:
    q, k, v = make_qkv(1, 1, 3, 5, 8, dtype=dtype)
    assert run(name, q, k, v).dtype == dtype
    assert attention_weights(name, q, k).dtype == dtype


def test_non_bool_mask_is_refused() -> None:
    q, k, v = make_qkv(1, 1, 3, 3, 4)
    with pytest.raises(FreeattenError, match="must be bool"):
        VARIANTS["lssa"](q, k, v, causal_mask(3, 3).double())


# ---------------------------------------------------------------- registry and AttentionSpec


def test_registry_names() -> None:
    assert ", ".join(VARIANTS) == ALL_NAMES_TEXT
    assert set(REWEIGHTED) == {"lssar", "softmax-reweight"}
    assert AttentionSpec() == AttentionSpec("lssar", 15.0)


@pytest.mark.parametrize("bad", ["lsar", "LSSAR", "softmax_reweight", ""])
def test_unknown_attention_lists_the_choices(bad: str) -> None:
    with pytest.raises(FreeattenError, match=f"unknown attention '{bad}': choose one of {ALL_NAMES_TEXT}"):
        AttentionSpec(bad)
    q, k, _ = make_qkv(1, 1, 2, 2, 4)
    with pytest.raises(FreeattenError, match=ALL_NAMES_TEXT):
        attention_weights(bad, q, k)


@pytest.mark.parametrize("bad_p", [0, 0.5, -1.0, math.inf, math.nan, "15", True])
def test_bad_power_is_refused(bad_p) -> None:
    with pytest.raises(FreeattenError, match="p must be a finite number >= 1"):
        AttentionSpec("lssar", bad_p)


def test_labels() -> None:
    assert AttentionSpec().label == "lssar (p=15)"
    assert AttentionSpec("softmax-reweight", 3).label == "softmax-reweight (p=3)"
    assert AttentionSpec("lssar", 2.5).label == "lssar (p=2.5)"
    assert AttentionSpec("lssa", 3.0).label == "lssa"


def test_attend_passes_p_only_to_reweighted() -> None:
    q, k, v = make_qkv(1, 2, 8, 8, 4, seed=18)
    for name in REWEIGHTED:
        p3 = attend(q, k, v, AttentionSpec(name, 3.0))
        torch.testing.assert_close(p3, VARIANTS[name](q, k, v, p=3.0))
        assert not torch.allclose(p3, attend(q, k, v, AttentionSpec(name, 15.0)))
    for name in set(VARIANTS) - REWEIGHTED:
        torch.testing.assert_close(attend(q, k, v, AttentionSpec(name, 3.0)), VARIANTS[name](q, k, v))
