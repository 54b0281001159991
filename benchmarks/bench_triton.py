"""Triton LSSA / LSSAR kernels on a GPU: bf16 correctness against the reference, then TFLOP/s against SDPA (flash).

    python benchmarks/bench_triton.py                  # needs CUDA; writes benchmarks/results/attention_triton.md
    python benchmarks/bench_triton.py --quick          # one autotune config per kernel (much less compile time)
    python benchmarks/bench_triton.py --compile-only   # no GPU needed: sm_90 builds, registers and spills per config

TFLOP/s use the softmax-equivalent causal count for every kernel (forward 2 * 2 * B * H * N^2 * D / 2, forward +
backward 3.5x that, as FlashAttention reports it), so they compare times on the same work: LSSAR's second pass
and U accumulator show up as lower TFLOP/s. Forward runs without grad (inference: LSSAR skips U, G); forward +
backward with grad. Every configuration is timed in this run, ratios are to SDPA measured in the same run.
"""

from __future__ import annotations

import argparse
import inspect
import math
import platform
import re
import subprocess
import sys
import tempfile
import traceback
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from freeatten_lightning.attention import reference  # noqa: E402
from freeatten_lightning.kernels import triton_attention as ta  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "attention_triton.md"
KERNELS = [("lssa", 15.0), ("lssar", 15.0), ("lssar", 3.0)]


def _label(variant: str, p: float) -> str:
    return f"{variant} (p={p:g})" if variant == "lssar" else variant


def _document_mask(cu: list[int]) -> torch.Tensor:
    lengths = torch.tensor(cu).diff()
    return reference.document_causal_mask(torch.repeat_interleave(torch.arange(len(lengths)), lengths))


class Report:
    """Markdown lines printed as they come and rewritten to RESULTS each time (a cut-short run keeps its rows)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
            self.lines.append(line)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text("\n".join(self.lines) + "\n")


def check_correctness(device: torch.device, dims: list[int], report: Report) -> None:
    """bf16 kernels vs the fp64 reference on the same (bf16-rounded) inputs: forward and q, k, v gradients."""
    gen = torch.Generator().manual_seed(0)
    cases = [  # (name, B, H, Nq, Nk, D, q_offset, cu_seqlens)
        *[(f"causal N=1000 D={d}", 2, 4, 1000, 1000, d, None, None) for d in dims],
        ("decode 64 of 1000", 2, 4, 64, 1000, dims[0], None, None),
        ("offset 100, 300 of 1000", 1, 4, 300, 1000, dims[0], 100, None),
        ("packed 4 docs", 1, 4, 1024, 1024, dims[0], None, [0, 3, 300, 301, 1024]),
    ]
    report.add("| case | kernel | out | dq | dk | dv | verdict |", "|---|---|---|---|---|---|---|")
    for name, b, h, nq, nk, d, offset, cu in cases:
        for variant, p in KERNELS:
            try:
                q, k, v, do = (torch.randn(b, h, n, d, generator=gen).to(torch.bfloat16) for n in (nq, nk, nk, nq))
                leaves = [x.to(device).detach().requires_grad_() for x in (q, k, v)]
                cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
                out = ta.triton_attention(*leaves, variant=variant, p=p, q_offset=offset, cu_seqlens=cu_t)
                out.backward(do.to(device))
                ref_leaves = [x.to(device, torch.float64).detach().requires_grad_() for x in (q, k, v)]
                if cu:
                    mask = _document_mask(cu).to(device)
                else:
                    start = nk - nq if offset is None else offset
                    mask = torch.ones(nq, nk, dtype=torch.bool, device=device).tril(start)
                kwargs = {"p": p} if variant == "lssar" else {}
                ref_out = getattr(reference, variant)(*ref_leaves, mask, **kwargs)
                ref_out.backward(do.to(device, torch.float64))
                pairs = [(out, ref_out)] + [(x.grad, r.grad) for x, r in zip(leaves, ref_leaves, strict=True)]
                errs = [((a.double() - r).abs().max() / r.abs().max().clamp_min(1e-3)).item() for a, r in pairs]
                verdict = "ok" if all(math.isfinite(e) and e < 3e-2 for e in errs) else "FAIL"
                cells = " | ".join(f"{e:.1e}" for e in errs)
                report.add(f"| {name} | {_label(variant, p)} | {cells} | {verdict} |")
            except Exception as err:  # keep going: report the failure in the table
                traceback.print_exc()
                report.add(f"| {name} | {_label(variant, p)} | error: {type(err).__name__}: {str(err)[:80]} |||||")


def _flops(b: int, h: int, n: int, d: int, backward: bool) -> float:
    """Softmax-equivalent causal attention FLOPs (two matmuls, half the square); backward 2.5x the forward."""
    forward = 4 * b * h * n * n * d / 2
    return forward * (3.5 if backward else 1.0)


def _sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The baseline: torch SDPA forced onto its FlashAttention backend, causal."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _measure(attend, qkv: list[torch.Tensor], grad_out: torch.Tensor, backward: bool) -> float:
    """Median ms of attend(q, k, v) (and its backward), after one untimed call that compiles and autotunes."""
    from triton.testing import do_bench

    leaves = [x.detach().requires_grad_(backward) for x in qkv]

    def run() -> None:
        out = attend(*leaves)
        if backward:
            out.backward(grad_out)

    with torch.set_grad_enabled(backward):
        run()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return do_bench(run, warmup=5, rep=50, grad_to_none=leaves if backward else None, return_mode="median")


def benchmark(device: torch.device, seq_lens: list[int], tokens: int, heads: int, dim: int, report: Report) -> None:
    """Forward and forward+backward times, TFLOP/s and peak memory of every kernel and of SDPA (flash)."""
    report.add(
        "| N | B | kernel | fwd ms | fwd TFLOP/s | fwd vs SDPA | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd vs SDPA "
        "| peak GiB (fwd+bwd) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    )
    for n in seq_lens:
        b = max(1, tokens // n)
        sdpa_ms: dict[bool, float] = {}
        contenders = [("SDPA flash (softmax)", _sdpa_flash)]
        contenders += [(_label(v, p), partial(ta.triton_attention, variant=v, p=p)) for v, p in KERNELS]
        for index, (label, attend) in enumerate(contenders):
            try:
                qkv = [torch.randn(b, heads, n, dim, device=device, dtype=torch.bfloat16) for _ in range(3)]
                grad_out = torch.randn_like(qkv[0])
                cells = []
                for backward in (False, True):
                    ms = _measure(attend, qkv, grad_out, backward)
                    if index == 0:
                        sdpa_ms[backward] = ms
                    tflops = _flops(b, heads, n, dim, backward) / ms / 1e9
                    ratio = f"{ms / sdpa_ms[backward]:.2f}x" if backward in sdpa_ms else "n/a"
                    cells += [f"{ms:.2f}", f"{tflops:.0f}", ratio]
                peak = torch.cuda.max_memory_allocated() / 2**30
                report.add(f"| {n} | {b} | {label} | {' | '.join(cells)} | {peak:.2f} |")
            except Exception as err:  # one failing configuration must not end the run
                traceback.print_exc()
                report.add(f"| {n} | {b} | {label} | error: {type(err).__name__}: {str(err)[:100]} |||||||")
            finally:
                torch.cuda.empty_cache()


def compile_report(head_dims: list[int]) -> list[str]:
    """Build every autotune config for sm_90 without a GPU; registers, spill stack and shared memory from cuobjdump."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from freeatten_lightning.kernels import triton_lssa_kernels as kern

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    fns = {"fwd": kern._fwd_kernel, "dq": kern._bwd_dq_kernel, "dkdv": kern._bwd_dkdv_kernel}
    pointers = {"RQ": "*fp32", "RK": "*fp32", "STATS": "*fp32", "U": "*fp32", "DELTA": "*fp32", "DOC_START": "*i32",
                "DOC_END": "*i32"}  # fmt: skip
    rows = ["| kernel | D | variant | BLOCK_M | BLOCK_N | warps | stages | registers | spill stack B | shared B |",
            "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for d in head_dims:
        for name, fn in fns.items():
            for bm, bn, warps, stages in ta._GPU_CONFIGS[name][d > 64]:
                for variant in ("lssa", "lssar"):
                    constexprs = {"HEAD_DIM": d, "BLOCK_M": bm, "BLOCK_N": bn, "REWEIGHT": variant == "lssar",
                                  "PACKED": False, "PRECISION": "tf32"}  # fmt: skip
                    if name == "fwd":
                        constexprs["STORE_UG"] = True
                    signature = {}
                    for arg in inspect.signature(fn.fn).parameters:
                        if arg in constexprs:
                            signature[arg] = "constexpr"
                        elif arg in pointers:
                            signature[arg] = pointers[arg]
                        elif arg.isupper() and arg in ("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV"):
                            signature[arg] = "*bf16"
                        else:
                            signature[arg] = "fp32" if arg in ("LOG_D", "P") else "i32"
                    try:
                        compiled = triton.compile(
                            ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps, "num_stages": stages},
                        )  # fmt: skip
                        with tempfile.TemporaryDirectory() as tmp:
                            cubin = Path(tmp) / "kernel.cubin"
                            cubin.write_bytes(compiled.asm["cubin"])
                            usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True,
                                                   text=True).stdout  # fmt: skip
                        found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
                        regs, stack = found.groups() if found else ("?", "?")
                        result = f"{regs} | {stack} | {compiled.metadata.shared}"
                    except Exception as err:
                        result = f"error: {type(err).__name__}: {str(err)[:80]} ||"
                    rows.append(f"| {name} | {d} | {variant} | {bm} | {bn} | {warps} | {stages} | {result} |")
                    print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--tokens", type=int, default=16384, help="B = tokens // N (B=4, 2, 1 at 4K, 8K, 16K)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="one autotune config per kernel (less compile time)")
    parser.add_argument("--compile-only", action="store_true", help="no GPU: sm_90 builds and register use")
    parser.add_argument("--skip-check", action="store_true", help="skip the bf16 correctness check")
    parser.add_argument("--check-dims", type=int, nargs="+", default=[64], help="head dims of the correctness check")
    args = parser.parse_args(argv)

    if args.compile_only:
        compile_report([64, 128])
        return 0
    if not torch.cuda.is_available():
        print("bench_triton: no CUDA device, nothing to time (try --compile-only for the sm_90 builds)")
        return 0
    if args.quick:
        ta._GPU_CONFIGS = {name: (pairs[0][:1], pairs[1][:1]) for name, pairs in ta._GPU_CONFIGS.items()}
    device = torch.device("cuda")
    import triton

    report = Report()
    report.add(
        "# Triton LSSA / LSSAR kernels vs torch SDPA (flash)",
        "",
        f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"python {platform.python_version()}; causal, bf16, H={args.heads}, D={args.dim}, B = {args.tokens} // N"
        f"{', one autotune config per kernel (--quick)' if args.quick else ''}.",
        "TFLOP/s count softmax-equivalent causal FLOPs for every kernel (see benchmarks/bench_triton.py).",
        "",
    )
    if not args.skip_check:
        report.add("## Correctness (bf16 kernels vs fp64 reference, max err / max |ref|)", "")
        check_correctness(device, args.check_dims, report)
        report.add("")
    report.add("## Speed", "")
    benchmark(device, args.seq_lens, args.tokens, args.heads, args.dim, report)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
