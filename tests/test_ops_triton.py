"""The `triton` backend of the op (forced with op="triton") on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before Triton decorates the kernels and must not leak into other test files, so the
checks run in ONE subprocess (this file as a script, TRITON_INTERPRET=1) and the tests assert on its results:
forward and gradients against the fp64 reference (fp32 only: the interpreter has no bf16 dot), the custom ops
under torch.library.opcheck, and the dispatcher's choices while the interpreter is on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 5e-5  # max |triton fp32 - reference fp64| / max |reference|, output and gradients
CASES = {  # name: (variant, p, Nq, Nk, bias)
    "lssa-causal": ("lssa", 15.0, 40, 40, "causal"),
    "lssar-p15-causal": ("lssar", 15.0, 40, 40, "causal"),
    "lssar-p3-decode-5of40": ("lssar", 3.0, 5, 40, "decode"),
    "lssa-top-left-5of40": ("lssa", 15.0, 5, 40, "top-left"),
    "lssar-p15-packed": ("lssar", 15.0, 40, 40, "packed"),
}


def _bias(name: str):
    from freeatten_lightning.ops import BlockDiagonalCausalMask, LowerTriangularFromBottomRightMask, LowerTriangularMask

    return {
        "causal": LowerTriangularMask(),
        "top-left": LowerTriangularMask(),
        "decode": LowerTriangularFromBottomRightMask(),
        "packed": BlockDiagonalCausalMask.from_seqlens([10, 3, 1, 26]),
    }[name]


def run_checks() -> dict:
    """Every check, in the interpreter; returns {check: result} (errors as floats, messages as strings)."""
    import torch

    from freeatten_lightning.attention import AttentionSpec
    from freeatten_lightning.errors import FreeattenError
    from freeatten_lightning.kernels import triton_op
    from freeatten_lightning.ops import BACKENDS, Inputs, memory_efficient_attention
    from freeatten_lightning.ops.dispatch import choose_backend

    results: dict = {}
    for name, (variant, p, nq, nk, bias) in CASES.items():
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, n, 2, 16, generator=gen, dtype=torch.float64) for n in (nq, nk, nk))
        grad_out = torch.randn(2, nq, 2, 16, generator=gen, dtype=torch.float64)
        errors = {}
        outs = {}
        for op, dtype in (("triton", torch.float32), ("reference", torch.float64)):
            leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
            out = memory_efficient_attention(*leaves, _bias(bias), variant=variant, p=p, op=op)
            outs[op] = [out, *torch.autograd.grad(out, leaves, grad_out.to(dtype))]
        for label, a, b in zip(("out", "dq", "dk", "dv"), outs["triton"], outs["reference"], strict=True):
            errors[label] = ((a.double() - b).abs().max() / b.abs().max()).item()
        results[name] = errors

    q, k, v = (torch.randn(1, 2, 24, 16) for _ in range(3))
    g = torch.randn(1, 2, 24, 16)
    for variant in ("lssa", "lssar"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        torch.library.opcheck(triton_op.triton_attention_forward, (*leaves, variant, 15.0, 0, None, True))
        out, stats, u = triton_op.triton_attention_forward(q, k, v, variant, 15.0, 0, None, True)
        args = (g, q, k, v, out, stats, u, variant, 15.0, 0, None)
        torch.library.opcheck(triton_op.triton_attention_backward, args)
        results[f"opcheck-{variant}"] = "ok"

    spec = AttentionSpec("lssar", 15.0)
    x = torch.randn(1, 2, 8, 16)
    results["auto-choice-cpu-fp32"] = choose_backend(BACKENDS, Inputs(x, x, x, _bias("causal"), spec)).name
    try:
        y = x.to(torch.bfloat16).transpose(1, 2)
        memory_efficient_attention(y, y, y, _bias("causal"), variant="lssar", op="triton")
        results["forced-bf16"] = "accepted"
    except FreeattenError as err:
        results["forced-bf16"] = str(err)
    return results


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    from freeatten_lightning.ops.backends import TritonBackend

    if "kernels missing" in TritonBackend().available()[1]:
        pytest.skip("Triton backend: not available: kernels missing")
    pytest.importorskip("triton", reason="triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], capture_output=True, text=True, env=env, cwd=REPO, timeout=900
    )
    assert proc.returncode == 0, f"interpreter subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_triton_backend_matches_reference(interpreter_results: dict, case: str) -> None:
    errors = interpreter_results[case]
    assert set(errors) == {"out", "dq", "dk", "dv"}
    assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.parametrize("variant", ["lssa", "lssar"])
def test_triton_custom_ops_pass_opcheck(interpreter_results: dict, variant: str) -> None:
    assert interpreter_results[f"opcheck-{variant}"] == "ok"


def test_interpreter_does_not_steal_cpu_dispatch(interpreter_results: dict) -> None:
    """With TRITON_INTERPRET=1, CPU tensors still go to the fused C++ backend unless op='triton' forces Triton."""
    assert interpreter_results["auto-choice-cpu-fp32"] == "cpu"


def test_interpreter_refuses_bf16(interpreter_results: dict) -> None:
    assert "op='triton' cannot run" in interpreter_results["forced-bf16"]
    assert "interpreter runs float32 only" in interpreter_results["forced-bf16"]


if __name__ == "__main__":
    print(json.dumps(run_checks()))
