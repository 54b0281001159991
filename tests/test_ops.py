"""The fused attention op (`freeatten_lightning.ops`): every backend against the reference math, the biases, the
dispatcher's choices and refusals, the custom ops (opcheck, torch.compile) and the CPU kernel's memory.

The CPU kernel runs with tiny tiles (8 query rows x 24 keys) in most tests, so that a few dozen tokens cross many
tiles, partial tiles, masked tiles and both its vector and scalar loops. Tolerances (max |error| / max |reference|,
reference in fp64 on the same rounded inputs): fp64 1e-9; fp32 2e-5 (LSSA) and 2e-4 (LSSAR, whose power p
amplifies rounding); bf16 outputs 2e-2 and gradients 5e-2 (bf16 keeps 8 bits).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from freeatten_lightning.attention import AttentionSpec, attend
from freeatten_lightning.errors import FreeattenError
from freeatten_lightning.kernels import cpu_attention as cpu_kernel
from freeatten_lightning.ops import (
    BACKENDS,
    BlockDiagonalCausalMask,
    Inputs,
    LowerTriangularFromBottomRightMask,
    LowerTriangularMask,
    attend_op,
    memory_efficient_attention,
)
from freeatten_lightning.ops.backends import CpuBackend, SdpaBackend
from freeatten_lightning.ops.bias import TensorMask, as_bias
from freeatten_lightning.ops.dispatch import choose_backend

REPO = Path(__file__).resolve().parents[1]
FUSED = [("lssa", 15.0), ("lssar", 15.0), ("lssar", 3.0), ("lssar", 1.0), ("lssar", 2.5)]
# name: (Nq, Nk, bias); n_i per row is checked in test_bias_row_counts
BIASES = {
    "none": (37, 37, lambda: None),
    "causal": (37, 37, LowerTriangularMask),
    "causal-top-left-5of70": (5, 70, LowerTriangularMask),
    "decode-5of70": (5, 70, LowerTriangularFromBottomRightMask),
    "packed": (50, 50, lambda: BlockDiagonalCausalMask.from_seqlens([20, 3, 1, 26])),
    "n1": (1, 1, LowerTriangularMask),
}
CAUSAL = LowerTriangularMask()
TOL_FP32 = {"lssa": 2e-5, "lssar": 2e-4, "softmax": 2e-5}


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """8 query rows x 24 keys per tile (24 = one AVX-512 fp32 vector + a scalar tail of 8)."""
    monkeypatch.setattr(cpu_kernel, "BLOCK_Q", 8)
    monkeypatch.setattr(cpu_kernel, "BLOCK_K", 24)


def bmhk(b: int, nq: int, nk: int, h: int, d: int, dtype=torch.float64, seed: int = 0, grad: bool = False):
    """Random query (b, nq, h, d), key and value (b, nk, h, d) and an output gradient, from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, generator=gen, dtype=torch.float64) for n in (nq, nk, nk))
    grad_out = torch.randn(b, nq, h, d, generator=gen, dtype=torch.float64)
    return *(x.to(dtype).requires_grad_(grad) for x in (q, k, v)), grad_out.to(dtype)


def out_and_grads(q, k, v, grad_out, **kwargs) -> list[torch.Tensor]:
    """The op's output and dq, dk, dv for grad_out (inputs must require grad)."""
    out = memory_efficient_attention(q, k, v, **kwargs)
    return [out, *torch.autograd.grad(out, (q, k, v), grad_out)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-6)).item()


# ---------------------------------------------------------------- every backend against the reference


@pytest.mark.parametrize("bias_name", list(BIASES))
@pytest.mark.parametrize(("variant", "p"), FUSED)
def test_cpu_matches_reference_fp64(small_tiles, variant: str, p: float, bias_name: str) -> None:
    nq, nk, bias = BIASES[bias_name]
    q, k, v, g = bmhk(2, nq, nk, 3, 16, grad=True)
    got = out_and_grads(q, k, v, g, attn_bias=bias(), variant=variant, p=p, op="cpu")
    want = out_and_grads(q, k, v, g, attn_bias=bias(), variant=variant, p=p, op="reference")
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert rel_err(a, b) < 1e-9, f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize(
    ("op", "variant", "p", "bias_name"),
    [
        ("cpu", "lssa", 15.0, "causal"),
        ("cpu", "lssar", 3.0, "causal"),
        ("cpu", "lssar", 15.0, "packed"),
        ("cpu", "lssar", 3.0, "decode-5of70"),
        ("cpu", "lssa", 15.0, "none"),
        ("sdpa", "softmax", 15.0, "causal"),
        ("sdpa", "softmax", 15.0, "packed"),
        ("reference", "lssar", 3.0, "decode-5of70"),
    ],
)
def test_gradcheck_fp64(small_tiles, op: str, variant: str, p: float, bias_name: str) -> None:
    nq, nk, bias = BIASES[bias_name]
    q, k, v, _ = bmhk(1, min(nq, 30), min(nk, 30) if nq == nk else nk, 2, 4, grad=True, seed=1)
    if bias_name == "packed":
        q, k, v = (x.detach()[:, :50].requires_grad_() for x in bmhk(1, 50, 50, 1, 4, seed=1)[:3])
    fn = lambda q, k, v: memory_efficient_attention(q, k, v, bias(), variant=variant, p=p, op=op)
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("op", "variant"), [("cpu", "lssa"), ("cpu", "lssar"), ("sdpa", "softmax")])
@pytest.mark.parametrize("bias_name", ["causal", "packed", "decode-5of70"])
def test_low_precision_within_tolerance(small_tiles, op: str, variant: str, dtype: torch.dtype, bias_name) -> None:
    nq, nk, bias = BIASES[bias_name]
    q, k, v, g = bmhk(2, nq, nk, 2, 32, dtype=dtype, grad=True)
    got = out_and_grads(q, k, v, g, attn_bias=bias(), variant=variant, op=op)
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = out_and_grads(*exact, g.double(), attn_bias=bias(), variant=variant, op="reference")
    assert all(x.dtype == dtype for x in got)
    tolerances = [TOL_FP32[variant]] * 4 if dtype == torch.float32 else [2e-2, 5e-2, 5e-2, 5e-2]
    for name, a, b, tol in zip(("out", "dq", "dk", "dv"), got, want, tolerances, strict=True):
        assert rel_err(a, b) < tol, f"{name}: {rel_err(a, b):.2e} >= {tol}"


@pytest.mark.parametrize("variant", ["lssa", "lssar"])
def test_cpu_default_tiles_many_blocks(variant: str) -> None:
    """The shipped tile sizes, with N beyond one key tile and not a multiple of either block size."""
    assert cpu_kernel.BLOCK_K < 600 and 600 % cpu_kernel.BLOCK_Q
    q, k, v, _ = bmhk(1, 600, 600, 2, 64, dtype=torch.float32)
    got = memory_efficient_attention(q, k, v, LowerTriangularMask(), variant=variant, op="cpu")
    want = memory_efficient_attention(*(x.double() for x in (q, k, v)), LowerTriangularMask(), variant=variant)
    assert rel_err(got, want) < TOL_FP32[variant]


@pytest.mark.parametrize("d", [1, 5, 80])
def test_cpu_odd_head_dims(small_tiles, d: int) -> None:
    q, k, v, g = bmhk(1, 29, 29, 2, d, grad=True)
    got = out_and_grads(q, k, v, g, attn_bias=LowerTriangularMask(), variant="lssar", op="cpu")
    want = out_and_grads(q, k, v, g, attn_bias=LowerTriangularMask(), variant="lssar", op="reference")
    assert max(rel_err(a, b) for a, b in zip(got, want, strict=True)) < 1e-9


def test_cpu_strided_inputs(small_tiles) -> None:
    """(B, N, H, D) views with non-trivial strides (the model's q, k, v) give the same numbers as contiguous ones."""
    q, k, v, g = bmhk(2, 40, 40, 3, 16, grad=True)
    wide = torch.randn(2, 40, 3, 3, 16, dtype=torch.float64)
    qs, ks, vs = (wide[:, :, i].clone().requires_grad_() for i in range(3))
    got = out_and_grads(qs, ks, vs, g, attn_bias=LowerTriangularMask(), variant="lssar", op="cpu")
    want = out_and_grads(
        *(x.detach().contiguous().requires_grad_() for x in (qs, ks, vs)), g, attn_bias=LowerTriangularMask(),
        variant="lssar", op="reference",
    )  # fmt: skip
    assert max(rel_err(a, b) for a, b in zip(got, want, strict=True)) < 1e-9


def test_cpu_flat_rows_fall_back_to_uniform(small_tiles) -> None:
    """All keys of a row identical: every f equal, the stage-1 weights (uniform) apply instead of 0/0."""
    q, k, v, _ = bmhk(1, 40, 40, 2, 8)
    k = k[:, :1].expand_as(k).contiguous()
    out = memory_efficient_attention(q, k, v, LowerTriangularMask(), variant="lssar", op="cpu")
    running_mean = v.cumsum(1) / torch.arange(1, 41, dtype=torch.float64).view(1, 40, 1, 1)
    torch.testing.assert_close(out, running_mean)


def test_long_rows_finite() -> None:
    """N = 16,384 keys, p = 15: LSSAR's naive form overflows fp32 ((n-1)^p ~ 1e63); the kernel stays finite."""
    n = 16_384
    q, k, v, g = bmhk(1, 6, n, 1, 16, dtype=torch.float32, grad=True)
    for variant in ("lssa", "lssar"):
        got = out_and_grads(q, k, v, g, attn_bias=LowerTriangularFromBottomRightMask(), variant=variant, op="cpu")
        want = out_and_grads(q, k, v, g, attn_bias=LowerTriangularFromBottomRightMask(), variant=variant,
                             op="reference")  # fmt: skip
        assert all(torch.isfinite(x).all() for x in got)
        assert max(rel_err(a, b) for a, b in zip(got, want, strict=True)) < TOL_FP32[variant]
    q, k, v, g = bmhk(1, n, n, 1, 16, dtype=torch.float32, grad=True)
    got = out_and_grads(q, k, v, g, attn_bias=LowerTriangularMask(), variant="lssar", op="cpu")
    assert all(torch.isfinite(x).all() for x in got)


# ---------------------------------------------------------------- biases


@pytest.mark.parametrize(
    ("bias", "nq", "nk", "counts"),
    [
        (LowerTriangularMask(), 4, 4, [1, 2, 3, 4]),
        (LowerTriangularMask(), 2, 5, [1, 2]),
        (LowerTriangularFromBottomRightMask(), 2, 5, [4, 5]),
        (BlockDiagonalCausalMask.from_seqlens([2, 1, 3]), 6, 6, [1, 2, 1, 1, 2, 3]),
    ],
)
def test_bias_row_counts(bias, nq: int, nk: int, counts: list[int]) -> None:
    """n_i (the keys row i attends, which sets the length scale) for each bias."""
    mask = bias.materialize(nq, nk, torch.device("cpu"))
    assert mask.sum(-1).flatten().tolist() == counts


def test_attend_op_is_attend() -> None:
    """attend_op is a drop-in for attention.attend: same layout, mask None = causal, bool masks work."""
    q, k, v, _ = bmhk(2, 30, 30, 3, 16)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    for spec in (AttentionSpec("lssar", 15.0), AttentionSpec("lssa"), AttentionSpec("softmax"), AttentionSpec("ssa")):
        torch.testing.assert_close(attend_op(q, k, v, spec), attend(q, k, v, spec))
    mask = torch.rand(30, 30, generator=torch.Generator().manual_seed(0)) < 0.5
    mask |= torch.eye(30, dtype=torch.bool)
    torch.testing.assert_close(
        attend_op(q, k, v, AttentionSpec("lssa"), mask), attend(q, k, v, AttentionSpec("lssa"), mask)
    )


class _StandInSeqinfo:
    def __init__(self, starts: list[int]) -> None:
        self.seqstart_py = starts


def _xformers_like(name: str, **attrs) -> object:
    """An object whose class looks like xformers' (module xformers.ops.fmha.attn_bias), without xformers."""
    cls = type(name, (), {"__module__": "xformers.ops.fmha.attn_bias"})
    obj = cls()
    obj.__dict__.update(attrs)
    return obj


def test_xformers_biases_are_converted() -> None:
    assert as_bias(_xformers_like("LowerTriangularMask")) == LowerTriangularMask()
    assert as_bias(_xformers_like("LowerTriangularFromBottomRightMask")) == LowerTriangularFromBottomRightMask()
    packed = _xformers_like("BlockDiagonalCausalMask", q_seqinfo=_StandInSeqinfo([0, 2, 5]),
                            k_seqinfo=_StandInSeqinfo([0, 2, 5]))  # fmt: skip
    assert as_bias(packed) == BlockDiagonalCausalMask.from_seqlens([2, 3])
    with pytest.raises(FreeattenError, match="unsupported attn_bias"):
        as_bias(_xformers_like("BlockDiagonalCausalLocalAttentionMask"))


def test_real_xformers_biases() -> None:
    attn_bias = pytest.importorskip("xformers.ops.fmha.attn_bias", reason="xformers is not installed")
    q, k, v, _ = bmhk(1, 12, 12, 2, 8)
    for theirs, ours, n_q in [
        (attn_bias.LowerTriangularMask(), LowerTriangularMask(), 12),
        (attn_bias.LowerTriangularFromBottomRightMask(), LowerTriangularFromBottomRightMask(), 3),
        (attn_bias.BlockDiagonalCausalMask.from_seqlens([5, 7]), BlockDiagonalCausalMask.from_seqlens([5, 7]), 12),
    ]:
        torch.testing.assert_close(
            memory_efficient_attention(q[:, -n_q:], k, v, theirs, variant="lssar"),
            memory_efficient_attention(q[:, -n_q:], k, v, ours, variant="lssar"),
        )


# ---------------------------------------------------------------- the dispatcher


def _inputs(variant: str = "lssar", dtype=torch.float32, bias=CAUSAL, strided: bool = False) -> Inputs:
    q, k, v, _ = bmhk(1, 8, 8, 2, 16, dtype=dtype)
    if strided:
        q = torch.randn(1, 8, 2, 32, dtype=dtype)[..., ::2]
    return Inputs(*(x.transpose(1, 2) for x in (q, k, v)), bias, AttentionSpec(variant))


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        (_inputs("lssar"), "cpu"),
        (_inputs("lssa", torch.bfloat16, None), "cpu"),
        (_inputs("softmax"), "sdpa"),
        (_inputs("ssa"), "reference"),
        (_inputs("lssar", bias=TensorMask(torch.ones(8, 8, dtype=torch.bool))), "reference"),
        (_inputs("lssar", strided=True), "reference"),
    ],
)
def test_dispatch_picks_first_fit(inputs: Inputs, expected: str) -> None:
    assert choose_backend(BACKENDS, inputs).name == expected


def test_fallback_on_strided_inputs_is_correct() -> None:
    q = torch.randn(1, 20, 2, 32, dtype=torch.float64)[..., ::2]
    k, v = torch.randn(2, 1, 20, 2, 16, dtype=torch.float64)
    got = memory_efficient_attention(q, k, v, LowerTriangularMask(), variant="lssar")
    want = memory_efficient_attention(q.contiguous(), k, v, LowerTriangularMask(), variant="lssar", op="cpu")
    torch.testing.assert_close(got, want)


def _call(*shapes, dtype=torch.float32, **kwargs):
    tensors = [torch.randn(s).to(dtype) if isinstance(s, tuple) else s for s in shapes]
    return memory_efficient_attention(*tensors, **kwargs)


S = (1, 8, 2, 16)  # BMHK
REFUSALS = {
    "rank": (lambda: _call((8, 2, 16), S, S), "query must be a 4-D tensor"),
    "head dims": (lambda: _call(S, (1, 8, 2, 8), (1, 8, 2, 8)), "head_dims differ"),
    "heads (BHMK passed as BMHK)": (lambda: _call((1, 2, 8, 16), (1, 2, 9, 16), (1, 2, 9, 16)), "heads sizes differ"),
    "batch": (lambda: _call(S, (2, 8, 2, 16), (2, 8, 2, 16)), "batch sizes differ"),
    "key/value lengths": (lambda: _call(S, S, (1, 9, 2, 16)), "key and value lengths differ"),
    "integer dtype": (lambda: _call(S, S, S, dtype=torch.int64), "floating point"),
    "mixed dtypes": (lambda: _call(S, S, torch.randn(S, dtype=torch.float64)), "dtypes differ"),
    "empty": (lambda: _call((1, 0, 2, 16), S, S), "empty sequence"),
    "float bias": (lambda: _call(S, S, S, attn_bias=torch.zeros(8, 8)), "bool mask"),
    "unknown bias": (lambda: _call(S, S, S, attn_bias="causal"), "unsupported attn_bias"),
    "packing length": (
        lambda: _call(S, S, S, attn_bias=BlockDiagonalCausalMask.from_seqlens([3, 4])),
        "sum to the sequence length",
    ),
    "causal with Nq > Nk": (
        lambda: _call(S, (1, 4, 2, 16), (1, 4, 2, 16), attn_bias=LowerTriangularMask()),
        "at most as many queries",
    ),
    "bad p": (lambda: _call(S, S, S, p=0.5), "power p must be"),
    "unknown op": (lambda: _call(S, S, S, op="flash"), "unknown op 'flash'"),
    "cpu: softmax": (lambda: _call(S, S, S, variant="softmax", op="cpu"), "variant 'softmax' not supported"),
    "cpu: bool mask": (
        lambda: _call(S, S, S, attn_bias=torch.ones(8, 8, dtype=torch.bool), op="cpu"),
        "attn_bias TensorMask not supported",
    ),
    "cpu: strides": (
        lambda: _call(torch.randn(1, 8, 2, 32)[..., ::2], S, S, op="cpu"),
        "query is not contiguous in its last dim",
    ),
    "cpu: value dim": (lambda: _call(S, S, (1, 8, 2, 8), op="cpu"), "value head_dim 8 differs"),
    "cpu: device": (lambda: _call(*(torch.randn(S, device="meta") for _ in "qkv"), op="cpu"), "device 'meta'"),
    "sdpa: lssa": (lambda: _call(S, S, S, variant="lssa", op="sdpa"), "variant 'lssa' not supported"),
    "triton: fp64 on cpu": (lambda: _call(S, S, S, dtype=torch.float64, op="triton"), "dtype torch.float64"),
    "triton: no bias": (lambda: _call(S, S, S, op="triton"), "attn_bias none not supported"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_problem(case: str) -> None:
    call, message = REFUSALS[case]
    with pytest.raises(FreeattenError, match=message):
        call()


def test_no_fit_lists_every_backend() -> None:
    with pytest.raises(FreeattenError) as err:
        choose_backend((CpuBackend(), SdpaBackend()), _inputs("ssa"))
    text = str(err.value)
    assert "no attention backend" in text and "  cpu: variant 'ssa'" in text and "  sdpa: variant 'ssa'" in text


def test_info_prints_the_backend_table() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "freeatten_lightning.info"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = lines[1]
    for column in ("backend", "available", "devices", "dtypes", "head dims", "biases", "variants", "backward"):
        assert column in header
    rows = {line.split("|")[1].strip(): line for line in lines[3:]}
    assert set(rows) == {b.name for b in BACKENDS}
    assert "| yes" in rows["reference"] and "softmax-reweight" in rows["reference"]


# ---------------------------------------------------------------- custom ops and torch.compile


@pytest.mark.parametrize("reweight", [False, True])
def test_opcheck_cpu_ops(reweight: bool) -> None:
    q, k, v, g = bmhk(2, 20, 20, 2, 16, dtype=torch.float32)
    q, k, v = (torch.nn.functional.normalize(x.transpose(1, 2), dim=-1).contiguous() for x in (q, k, v))
    g = g.transpose(1, 2).contiguous()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    forward_args = (*leaves, reweight, 15.0, True, 0, None, True, 8, 24)
    torch.library.opcheck(cpu_kernel.cpu_attention_forward, forward_args)
    out, stats, u = cpu_kernel.cpu_attention_forward(q, k, v, reweight, 15.0, True, 0, None, True, 8, 24)
    packed = torch.tensor([0, 7, 20], dtype=torch.int32)
    torch.library.opcheck(
        cpu_kernel.cpu_attention_backward, (g, q, k, v, out, stats, u, reweight, 15.0, True, 0, None, 8, 24)
    )
    torch.library.opcheck(cpu_kernel.cpu_attention_forward, (q, k, v, reweight, 3.0, True, 0, packed, False, 8, 24))


# ---------------------------------------------------------------- memory

_PEAK_SCRIPT = textwrap.dedent(
    """
    import ctypes, json, re, sys, torch
    from freeatten_lightning.ops import LowerTriangularMask, memory_efficient_attention
    def status(key):
        return int(re.search(rf"{key}:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    n, heads = int(sys.argv[1]), int(sys.argv[2])
    q, k, v = (torch.randn(1, n, heads, 64, requires_grad=True) for _ in range(3))
    warm = [x[:, :64].detach().requires_grad_() for x in (q, k, v)]
    memory_efficient_attention(*warm, LowerTriangularMask(), op="cpu").sum().backward()
    ctypes.CDLL(None).malloc_trim(0)  # freed heap pages back to the system, so reusing them counts again
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = status("VmRSS")
    except OSError:  # no clear_refs here: measure above the peak so far (a lower bound of the extra memory)
        before = status("VmHWM")
    memory_efficient_attention(q, k, v, LowerTriangularMask(), op="cpu").sum().backward()
    print(json.dumps(status("VmHWM") - before))
    """
)


def test_cpu_peak_memory_grows_linearly() -> None:
    """Peak extra RSS of LSSAR forward + backward: x4 in N gives about x4 in memory (x16 would be quadratic)."""
    heads, sizes = 4, (2048, 8192)
    peaks = {}
    for n in sizes:
        proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(n), str(heads)], capture_output=True,
                              text=True, cwd=REPO, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        peaks[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    one_score_matrix = heads * sizes[-1] ** 2 * 4  # what a single fp32 (H, N, N) tensor would take
    assert peaks[sizes[-1]] < one_score_matrix / 8, peaks
    assert peaks[sizes[-1]] / max(peaks[sizes[0]], 1) < 6, peaks
    assert math.isfinite(peaks[sizes[0]])
