"""`python -m freeatten_lightning.info`: the attention backends, what each supports, and whether it runs here."""

from __future__ import annotations

import platform

import torch

from freeatten_lightning.ops import BACKENDS, backend_table


def format_table(rows: list[dict[str, str]]) -> str:
    """A Markdown table (readable as plain text too) of the rows' values under their keys."""
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    line = lambda values: "| " + " | ".join(v.ljust(widths[c]) for c, v in zip(columns, values, strict=True)) + " |"
    return "\n".join(
        [line(columns), line(["-" * widths[c] for c in columns]), *(line([r[c] for c in columns]) for r in rows)]
    )


def main() -> int:
    print(
        f"freeatten attention backends (torch {torch.__version__}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, CUDA {'yes' if torch.cuda.is_available() else 'no'}, "
        f"{platform.machine()}); dispatch order: {', '.join(b.name for b in BACKENDS)}"
    )
    print(format_table(backend_table(BACKENDS)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
