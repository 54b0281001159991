"""CPU attention benchmark: the fused CPU backend against torch SDPA (softmax) and the eager reference.

For each length N (B=1, H=12, D=64, causal, fp32 by default): forward and forward+backward wall time and peak extra
memory of every backend, as ratios to SDPA softmax timed in the same round (the speed floor: same FLOPs) and to the
eager reference of the same variant. Rounds interleave the backends and ratios are medians of per-round ratios, so
load from other processes hits numerator and denominator alike. Peak extra memory: the process's peak resident set
(Linux VmHWM, reset before each call, after malloc_trim) minus its resident set before the call. The reference
runs only where its memory, extrapolated as N^2 from its smallest measured length, fits in the available memory.

    python benchmarks/bench_attention.py          # N = 1K..16K, 3 rounds: results/attention_cpu.{md,csv,png}
    python benchmarks/bench_attention.py --lengths 1024 2048 --repeats 2
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from freeatten_lightning.attention import AttentionSpec
from freeatten_lightning.info import format_table
from freeatten_lightning.ops import attend_op

_LIBC = ctypes.CDLL(None)
RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [("sdpa", "softmax"), ("cpu", "lssa"), ("cpu", "lssar"), ("reference", "lssa"), ("reference", "lssar")]
BARS = {"lssa": 1.2, "lssar": 1.6}  # fused forward+backward / SDPA forward+backward at N = 4,096 (issue 3)


def _proc_status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024


def _available_memory() -> int:
    return int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1)) * 1024


def _reset_peak() -> bool:
    """VmHWM := VmRSS (Linux); False where /proc/self/clear_refs cannot be written."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], backward: bool) -> tuple[float, int | None]:
    """(seconds, peak extra bytes or None if unmeasurable) of one call of fn, with out's backward when `backward`."""
    _LIBC.malloc_trim(0)  # hand freed heap pages back, so reusing them shows up in the peak again
    can_measure = _reset_peak()
    before = _proc_status("VmRSS")
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))
    seconds = time.perf_counter() - start
    peak = _proc_status("VmHWM") - before if can_measure else None
    for x in leaves:
        x.grad = None
    return seconds, peak


def attention_fn(backend: str, variant: str, q, k, v) -> Callable[[], torch.Tensor]:
    if backend == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    spec = AttentionSpec(variant, 15.0)
    return lambda: attend_op(q, k, v, spec, op=backend)


def run(lengths: list[int], repeats: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype) -> list[dict]:
    """One row per (N, backend, variant) with median times, peaks and ratios."""
    rows, reference_peak_per_n2 = [], {}
    bar = tqdm(total=len(lengths) * repeats * len(CONFIGS) * 2, desc="attention bench", unit="call")
    for n in lengths:
        q, k, v = (torch.randn(batch, heads, n, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
        configs = [c for c in CONFIGS if c[0] != "reference" or _reference_fits(reference_peak_per_n2, c[1], n)]
        samples = {(c, mode): [] for c in configs for mode in ("fwd", "fwd+bwd")}
        for _ in range(repeats):
            for config in configs:
                fn = attention_fn(*config, q, k, v)
                for mode in ("fwd", "fwd+bwd"):
                    samples[(config, mode)].append(measure(fn, [q, k, v], backward=mode == "fwd+bwd"))
                    bar.update()
            bar.update(2 * (len(CONFIGS) - len(configs)))
        for config in configs:
            row = {"N": n, "backend": config[0], "variant": config[1]}
            for mode in ("fwd", "fwd+bwd"):
                times = [t for t, _ in samples[(config, mode)]]
                base = [t for t, _ in samples[(CONFIGS[0], mode)]]
                row[f"{mode} s"] = statistics.median(times)
                row[f"{mode} x sdpa"] = statistics.median(t / b for t, b in zip(times, base, strict=True))
                peaks = [p for _, p in samples[(config, mode)] if p is not None]
                row[f"{mode} peak MiB"] = max(peaks) / 2**20 if peaks else None
            if config[0] == "reference" and row["fwd+bwd peak MiB"] is not None:
                reference_peak_per_n2[config[1]] = row["fwd+bwd peak MiB"] * 2**20 / n**2
            rows.append(row)
    bar.close()
    for row in rows:
        ref = next((r for r in rows if r["N"] == row["N"] and r["backend"] == "reference"
                    and r["variant"] == row["variant"]), None)  # fmt: skip
        row["fwd+bwd x reference"] = row["fwd+bwd s"] / ref["fwd+bwd s"] if ref else None
        measured = ref and ref["fwd+bwd peak MiB"] and row["fwd+bwd peak MiB"] is not None
        row["peak x reference"] = row["fwd+bwd peak MiB"] / ref["fwd+bwd peak MiB"] if measured else None
    return rows


def _reference_fits(peak_per_n2: dict[str, float], variant: str, n: int) -> bool:
    """Whether the reference's extrapolated peak (N^2 times its measured bytes per N^2) fits in half the free memory."""
    if variant not in peak_per_n2:
        return True
    return peak_per_n2[variant] * n**2 < 0.5 * _available_memory()


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def write_outputs(rows: list[dict], out_dir: Path, header: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    with (out_dir / "attention_cpu.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    table = format_table([{c: _fmt(r[c]) for c in columns} for r in rows])
    (out_dir / "attention_cpu.md").write_text(f"{header}\n\n{table}\n\n{verdict(rows)}\n")
    fig = Figure(figsize=(11, 4.2))
    ax_time, ax_mem = fig.subplots(1, 2)
    for backend, variant in CONFIGS:
        pts = [r for r in rows if (r["backend"], r["variant"]) == (backend, variant)]
        if pts:
            label = f"{backend} {variant}"
            ax_time.plot([r["N"] for r in pts], [r["fwd+bwd s"] for r in pts], marker="o", label=label)
            measured = [r for r in pts if r["fwd+bwd peak MiB"] is not None]
            ax_mem.plot([r["N"] for r in measured], [r["fwd+bwd peak MiB"] for r in measured], marker="o", label=label)
    for ax, title in ((ax_time, "forward + backward time (s)"), (ax_mem, "peak extra memory, fwd+bwd (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_time.legend()
    fig.suptitle(header.splitlines()[0].lstrip("# "), fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "attention_cpu.png", dpi=120)


def verdict(rows: list[dict]) -> str:
    """The issue's bar: N = 4,096 speed ratios and N = 16,384 memory, where those lengths were run."""
    lines = []
    for variant, bar in BARS.items():
        row = next((r for r in rows if (r["N"], r["backend"], r["variant"]) == (4096, "cpu", variant)), None)
        if row:
            ok = "meets" if row["fwd+bwd x sdpa"] <= bar else "MISSES"
            lines.append(f"- N=4096 cpu {variant} fwd+bwd = {row['fwd+bwd x sdpa']:.2f}x SDPA: {ok} the {bar}x bar")
    for variant in BARS:
        fused = next((r for r in rows if (r["N"], r["backend"], r["variant"]) == (16384, "cpu", variant)), None)
        if fused is None or fused["fwd+bwd peak MiB"] is None:
            continue
        ref = next((r for r in rows if (r["N"], r["backend"], r["variant"]) == (16384, "reference", variant)), None)
        if ref and ref["fwd+bwd peak MiB"]:
            ratio = fused["fwd+bwd peak MiB"] / ref["fwd+bwd peak MiB"]
            ok = "meets" if ratio < 0.1 else "MISSES"
            lines.append(f"- N=16384 cpu {variant} peak = {ratio:.3f}x the reference's: {ok} the 0.1x bar")
        else:
            lines.append(
                f"- N=16384 cpu {variant} peak = {fused['fwd+bwd peak MiB']:.0f} MiB; the reference cannot run there "
                "(its extrapolated peak exceeds half the available memory)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: usable cores")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    warm = [torch.randn(1, 2, 64, 64, requires_grad=True) for _ in range(3)]
    for backend, variant in CONFIGS:
        measure(attention_fn(backend, variant, *warm), warm, backward=True)  # builds the CPU kernel if needed
    load_before = os.getloadavg()
    rows = run(sorted(args.lengths), args.repeats, args.batch, args.heads, args.head_dim, dtype)
    load_after = os.getloadavg()
    header = (
        f"# CPU attention, B={args.batch} H={args.heads} D={args.head_dim} causal {args.dtype}: torch "
        f"{torch.__version__}, {args.threads} threads of {os.cpu_count()} cores, {args.repeats} rounds (medians)\n"
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (other processes share the cores)"
    )
    write_outputs(rows, args.out_dir, header)
    print(header)
    print(format_table([{c: _fmt(r[c]) for c in rows[0]} for r in rows]))
    print(verdict(rows))
    print(f"wrote {args.out_dir / 'attention_cpu.md'}, .csv and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
