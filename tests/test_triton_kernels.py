"""Numerics of the Triton LSSA / LSSAR kernels on the CPU through Triton's interpreter, against the fp64 reference.

TRITON_INTERPRET must be set before the kernels are jit-decorated and must not leak into other test files, so
every kernel check runs in ONE subprocess (this file run as a script with TRITON_INTERPRET=1) started by a
module-scoped fixture; the parametrized tests then assert on its per-case errors. fp32 only: the interpreter
has no bf16 tl.dot. Input validation runs in-process (it raises before any kernel is imported).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch

from freeatten_lightning.attention import reference
from freeatten_lightning.errors import FreeattenError
from freeatten_lightning.kernels import triton_attention as ta

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 5e-5  # max |triton fp32 - reference fp64| / max |reference|; observed <= 6e-6


@dataclass(frozen=True)
class Case:
    """One kernel check: shapes, variant, masking and how the inputs are built."""

    name: str
    variant: str
    b: int = 1
    h: int = 2
    nq: int = 17
    nk: int = 17
    d: int = 16
    p: float = 15.0
    q_offset: int | None = None
    cu_seqlens: list[int] | None = None
    inputs: str = "randn"  # randn | flat (integer q, identical integer keys: every row exactly flat)
    layout: str = "bhnd"  # bhnd (contiguous) | bnhd (transposed views: non-trivial strides)
    grad: bool = True
    expect: str = ""  # reference variant when it differs from `variant` (flat rows: stage 1)


CASES = [
    Case("lssa-causal-N100-D32", "lssa", b=2, nq=100, nk=100, d=32),
    Case("lssar-p15-causal-N100-D32", "lssar", b=2, nq=100, nk=100, d=32),
    Case("lssar-p3-causal-N64", "lssar", p=3.0, nq=64, nk=64),
    Case("lssar-p1-causal-N17", "lssar", p=1.0),
    Case("lssa-N17-strided", "lssa", layout="bnhd"),
    Case("lssar-p15-N17-strided", "lssar", layout="bnhd"),
    Case("lssar-p15-N1", "lssar", nq=1, nk=1),
    Case("lssa-decode-5of70", "lssa", nq=5, nk=70),
    Case("lssar-p15-decode-5of70", "lssar", nq=5, nk=70),
    Case("lssar-p3-offset14-30of70", "lssar", p=3.0, nq=30, nk=70, q_offset=14),
    Case("lssa-packed", "lssa", nq=64, nk=64, cu_seqlens=[0, 3, 20, 21, 50, 64]),
    Case("lssar-p15-packed", "lssar", b=2, nq=64, nk=64, cu_seqlens=[0, 3, 20, 21, 50, 64]),
    Case("lssar-p3-packed-d32", "lssar", p=3.0, nq=64, nk=64, d=32, cu_seqlens=[0, 33, 35, 64]),
    Case("lssar-p15-nograd", "lssar", nq=100, nk=100, grad=False),
    Case("lssar-flat-rows-fallback", "lssar", nq=8, nk=40, inputs="flat", expect="lssa"),
]


CIRCLE = torch.tensor([(3, 4), (4, 3), (5, 0), (0, 5), (-3, 4), (4, -3), (-5, 0), (0, -5), (-3, -4), (-4, -3)])


def _inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp64 q, k, v and an output gradient for `case`.

    "flat": integer q in dims 0-1 and keys sharing dims 0-1, differing only by a point of norm 5 in dims 2-3, so
    every q.k and ||k|| is exact and the same for all keys of a row (exactly flat rows), yet dq, dk are not 0.
    """
    gen = torch.Generator().manual_seed(0)
    shape_q, shape_k = (case.b, case.h, case.nq, case.d), (case.b, case.h, case.nk, case.d)
    randn = lambda shape: torch.randn(shape, generator=gen, dtype=torch.float64)
    if case.inputs == "flat":
        q, k = torch.zeros(shape_q, dtype=torch.float64), torch.zeros(shape_k, dtype=torch.float64)
        q[..., 0] = torch.randint(1, 4, shape_q[:-1], generator=gen).double()
        q[..., 1] = torch.randint(-3, 4, shape_q[:-1], generator=gen).double()
        k[..., :2] = torch.randint(-3, 4, (case.b, case.h, 1, 2), generator=gen).double()
        k[..., 2:4] = CIRCLE[torch.randint(0, len(CIRCLE), shape_k[:-1], generator=gen)].double()
    else:
        q, k = randn(shape_q), randn(shape_k)
    return q, k, randn(shape_k), randn(shape_q)


def _mask(case: Case) -> torch.Tensor:
    """The reference's bool mask for the case: document-causal, or causal with the query offset."""
    if case.cu_seqlens is not None:
        lengths = torch.tensor(case.cu_seqlens).diff()
        return reference.document_causal_mask(torch.repeat_interleave(torch.arange(len(lengths)), lengths))
    offset = case.nk - case.nq if case.q_offset is None else case.q_offset
    return torch.ones(case.nq, case.nk, dtype=torch.bool).tril(offset)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x (B, H, N, D) as it is, or as a (B, H, N, D) view of a contiguous (B, N, H, D) tensor."""
    return x if layout == "bhnd" else x.transpose(1, 2).contiguous().transpose(1, 2)


def run_case(case: Case) -> dict[str, float]:
    """Max error (relative to the reference's max) of the output and, with case.grad, of dq, dk, dv."""
    q, k, v, grad_out = _inputs(case)
    leaves_ref = [x.clone().requires_grad_(case.grad) for x in (q, k, v)]
    expect = case.expect or case.variant
    ref_fn = reference.lssar if expect == "lssar" else reference.lssa
    kwargs = {"p": case.p} if expect == "lssar" else {}
    out_ref = ref_fn(*leaves_ref, _mask(case), **kwargs)
    leaves = [_layout(x.float(), case.layout).requires_grad_(case.grad) for x in (q, k, v)]
    cu = None if case.cu_seqlens is None else torch.tensor(case.cu_seqlens, dtype=torch.int32)
    with torch.set_grad_enabled(case.grad):
        out = ta.triton_attention(*leaves, variant=case.variant, p=case.p, q_offset=case.q_offset, cu_seqlens=cu)
    pairs = {"out": (out, out_ref)}
    if case.expect:  # the stage-2 reference must agree on the forward too (flat rows: uniform either way)
        pairs["out_vs_" + case.variant] = (out, reference.lssar(q, k, v, _mask(case), p=case.p))
    if case.grad:
        out.backward(grad_out.float())
        out_ref.backward(grad_out)
        pairs |= {f"d{n}": (x.grad, r.grad) for n, x, r in zip("qkv", leaves, leaves_ref, strict=True)}
    return {
        name: ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-3)).item() for name, (a, b) in pairs.items()
    }


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict]:
    """Run every case once in a TRITON_INTERPRET=1 subprocess; {case name: {'errors': ..., 'failure': ...}}."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cases = json.dumps([asdict(c) for c in CASES])
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), cases], capture_output=True, text=True, env=env, cwd=REPO,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"interpreter subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernels_match_reference(case: Case, interpreter_results: dict[str, dict]) -> None:
    """Forward and q, k, v gradients of the fp32 kernels match the fp64 reference (causal, offset, packed, flat)."""
    result = interpreter_results[case.name]
    assert result["failure"] is None, result["failure"]
    errors = result["errors"]
    assert set(errors) >= ({"out", "dq", "dk", "dv"} if case.grad else {"out"})
    assert all(err <= TOLERANCE for err in errors.values()), f"errors above {TOLERANCE}: {errors}"


def test_package_imports_without_triton() -> None:
    """Importing the kernels package and the op module does not import triton (it is loaded on first call)."""
    code = "import sys, freeatten_lightning.kernels.triton_attention as t; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "TRITON_INTERPRET": "0"})


def test_availability_reports_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CUDA and without the interpreter the kernels are unavailable, with a reason naming the fix."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = ta.triton_is_available()
    if torch.cuda.is_available():
        assert ok and "CUDA" in reason
    else:
        assert not ok and "TRITON_INTERPRET" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ta.triton_is_available()[0]


def _qkv(nq: int = 8, nk: int = 8, d: int = 16, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.randn(1, 2, n, d, dtype=dtype) for n in (nq, nk, nk)]


BAD_INPUTS = {
    "variant": (lambda: (_qkv(), {"variant": "softmax"}), "lssa and lssar"),
    "rank": (lambda: ([x[0] for x in _qkv()], {}), "4-D"),
    "head dim": (lambda: (_qkv(d=48), {}), "head dim 48"),
    "dtype": (lambda: (_qkv(dtype=torch.float64), {}), "float64"),
    "mixed dtypes": (lambda: ([*_qkv()[:2], _qkv(dtype=torch.float16)[2]], {}), "dtypes differ"),
    "last-dim stride": (lambda: ([x.transpose(-1, -2) for x in _qkv()], {}), "contiguous"),
    "shapes": (lambda: ([*_qkv()[:2], torch.randn(1, 2, 9, 16)], {}), "do not match"),
    "p": (lambda: (_qkv(), {"p": 0.5}), "p must be"),
    "q_offset": (lambda: (_qkv(nq=4), {"q_offset": 5}), "q_offset"),
    "more queries than keys": (lambda: (_qkv(nq=9), {}), "q_offset"),
    "cu_seqlens end": (lambda: (_qkv(), {"cu_seqlens": torch.tensor([0, 3, 7], dtype=torch.int32)}), "cu_seqlens"),
    "cu_seqlens order": (lambda: (_qkv(), {"cu_seqlens": torch.tensor([0, 5, 3, 8])}), "cu_seqlens"),
    "cu_seqlens dtype": (lambda: (_qkv(), {"cu_seqlens": torch.tensor([0.0, 8.0])}), "int32"),
}


@pytest.mark.parametrize("problem", list(BAD_INPUTS))
def test_bad_input_raises_clear_error(problem: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every input the kernels cannot compute exactly raises FreeattenError naming the problem (before any launch)."""
    monkeypatch.setattr(ta, "_interpreting", lambda: True)  # CPU tensors pass the device check; nothing launches
    make, message = BAD_INPUTS[problem]
    tensors, kwargs = make()
    with pytest.raises(FreeattenError, match=message):
        ta.triton_attention(*tensors, **{"variant": "lssar", **kwargs})


def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors outside the interpreter are refused with the fix in the message."""
    monkeypatch.setattr(ta, "_interpreting", lambda: False)
    with pytest.raises(FreeattenError, match="CUDA tensors"):
        ta.triton_attention(*_qkv(), variant="lssa")


def _worker(cases_json: str) -> None:
    """Subprocess entry: run each case, print {name: {'errors', 'failure'}} as the last stdout line."""
    results = {}
    for spec in json.loads(cases_json):
        case = Case(**spec)
        try:
            results[case.name] = {"errors": run_case(case), "failure": None}
        except Exception:  # reported per case by the parametrized test
            results[case.name] = {"errors": {}, "failure": traceback.format_exc()}
    print(json.dumps(results))


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through pytest (the fixture sets TRITON_INTERPRET=1)"
    _worker(sys.argv[1])
