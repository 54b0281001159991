"""`freeatten eval-lengths`: several checkpoints on the same validation tokens at the same context lengths."""

from __future__ import annotations

import argparse
from pathlib import Path

from freeatten_lightning.errors import FreeattenError
from freeatten_lightning.evaluation.lengths import (
    DEFAULT_MULTIPLES,
    LengthResult,
    evaluate_lengths,
    parse_lengths,
    scaled_lengths,
    scored_token_count,
)
from freeatten_lightning.evaluation.loading import (
    Checkpoint,
    add_checkpoint_arguments,
    autocast_context,
    check_same_data,
    load_checkpoint,
    resolve_device,
    validation_tokens,
)
from freeatten_lightning.evaluation.report import (
    length_table,
    markdown_table,
    plot_lengths,
    plot_positions,
    text_table,
    write_csv,
)

DEFAULT_TOKENS = 65_536


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freeatten eval-lengths",
        description=(
            "Validation loss of one or more checkpoints at growing context lengths, all on the same validation "
            "tokens (the same number scored at every length), like the paper's Figure 1. Prints a side-by-side "
            "table and writes eval_lengths.csv / .md / .png into --out."
        ),
        epilog=(
            "examples:\n"
            "  freeatten eval-lengths --ckpt runs/softmax/checkpoints/last.ckpt --ckpt runs/lssar/checkpoints/last.ckpt"
            "\n"
            "  freeatten eval-lengths --ckpt runs/lssa/checkpoints/last.ckpt --attention lssar --p 15 --with-trained\n"
            "  freeatten eval-lengths --ckpt A.ckpt --lengths 1024,4096,16384 --stride 512"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_checkpoint_arguments(parser, several=True)
    parser.add_argument(
        "--with-trained",
        action="store_true",
        help="with --attention/--p: also evaluate each checkpoint as trained, for a side-by-side comparison",
    )
    lengths = parser.add_mutually_exclusive_group()
    lengths.add_argument("--lengths", help="context lengths in tokens, e.g. 1024,2048,4096")
    lengths.add_argument(
        "--multiples",
        default=",".join(map(str, DEFAULT_MULTIPLES)),
        help="lengths as multiples of the training length (default %(default)s)",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=DEFAULT_TOKENS,
        help="validation tokens scored at every length, rounded down to whole windows of every length "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--stride",
        type=int,
        help="sliding-window mode: a window every STRIDE tokens scoring only its last STRIDE tokens "
        "(default: non-overlapping windows)",
    )
    parser.add_argument("--batch-tokens", type=int, default=16_384, help="tokens per forward (default %(default)s)")
    parser.add_argument("--data-dir", help="validation shards to use instead of the first checkpoint's data")
    parser.add_argument("--position-curve", action="store_true", help="also plot the loss at each window position")
    parser.add_argument(
        "--precision",
        choices=["32", "bf16"],
        default="32",
        help="bf16: autocast on GPU (default fp32; the attention math runs in fp32 either way)",
    )
    parser.add_argument(
        "--out", default="runs/eval-lengths", help="folder for the table and plot (default %(default)s)"
    )
    return parser


def _checkpoints(args: argparse.Namespace, device: str) -> list[Checkpoint]:
    if args.with_trained and args.attention is None and args.p is None:
        raise FreeattenError("--with-trained compares against an override: add --attention and/or --p, or drop it")
    checkpoints = []
    for path in args.ckpt:
        if args.with_trained:
            checkpoints.append(load_checkpoint(path, device=device))
        checkpoints.append(load_checkpoint(path, args.attention, args.p, device=device))
    check_same_data(checkpoints)
    labels = [c.label for c in checkpoints]
    for i, checkpoint in enumerate(checkpoints):
        if labels.count(checkpoint.label) > 1:
            checkpoint.run_name = f"{checkpoint.run_name} [{i + 1}]"
    return checkpoints


def _lengths(args: argparse.Namespace, checkpoints: list[Checkpoint]) -> list[int]:
    if args.lengths is not None:
        return parse_lengths(args.lengths)
    train_lengths = sorted({c.seq_len for c in checkpoints})
    if len(train_lengths) > 1:
        raise FreeattenError(
            f"the checkpoints were trained at different lengths {train_lengths}: pass --lengths explicitly so "
            "they are compared at the same context lengths"
        )
    return scaled_lengths(train_lengths[0], parse_lengths(args.multiples, "--multiples"))


def eval_lengths_main(argv: list[str] | None = None) -> int:
    """The `freeatten eval-lengths` command."""
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    checkpoints = _checkpoints(args, device)
    lengths = _lengths(args, checkpoints)
    if args.tokens < 1:
        raise FreeattenError(f"--tokens must be positive, got {args.tokens}")
    tokens = validation_tokens(checkpoints[0].data_hparams, args.tokens, args.data_dir)
    vocab = checkpoints[0].model.config.vocab_size
    if int(tokens.max()) >= vocab:
        raise FreeattenError(
            f"the validation tokens reach id {int(tokens.max()):,} but the models' vocabulary has {vocab:,}: the "
            "data was made with another tokenizer; pass --data-dir with shards of the checkpoints' tokenizer"
        )
    scored = scored_token_count(lengths, len(tokens) - 1, args.tokens, args.stride)
    labelled: list[tuple[str, list[LengthResult]]] = []
    for checkpoint in checkpoints:
        results = evaluate_lengths(
            checkpoint.model,
            tokens,
            lengths,
            scored,
            stride=args.stride,
            batch_tokens=args.batch_tokens,
            position_curve=args.position_curve,
            autocast=autocast_context(device, args.precision),
            desc=checkpoint.label,
        )
        labelled.append((checkpoint.label, results))
    _report(Path(args.out), labelled, checkpoints, scored, args.stride)
    return 0


def _report(
    out: Path,
    labelled: list[tuple[str, list[LengthResult]]],
    checkpoints: list[Checkpoint],
    scored: int,
    stride: int | None,
) -> None:
    mode = "non-overlapping windows" if stride is None else f"sliding windows, stride {stride}"
    train_lengths = sorted({c.seq_len for c in checkpoints})
    header = ["checkpoint", "attention", "trained_attention", "train_length", "length", "loss", "ppl", "tokens"]
    rows = [
        [
            str(c.path),
            c.attention.label,
            c.trained.label,
            c.seq_len,
            r.length,
            f"{r.loss:.6f}",
            f"{r.ppl:.4f}",
            r.tokens,
        ]
        for c, (_, results) in zip(checkpoints, labelled, strict=True)
        for r in results
    ]
    write_csv(out / "eval_lengths.csv", header, rows)
    table_header, table_rows = length_table(labelled, "checkpoint")
    caption = (
        f"Validation loss (perplexity) at each context length: {scored:,} scored tokens per length, {mode}; "
        f"training length {', '.join(f'{n:,}' for n in train_lengths)}."
    )
    (out / "eval_lengths.md").write_text(f"{caption}\n\n{markdown_table(table_header, table_rows)}")
    train_length = train_lengths[0] if len(train_lengths) == 1 else None
    plot_lengths(out / "eval_lengths.png", labelled, f"Loss vs context length ({mode})", train_length)
    files = ["eval_lengths.csv", "eval_lengths.md", "eval_lengths.png"]
    if any(r.position_loss for _, results in labelled for r in results):
        for n, (label, results) in enumerate(labelled):
            name = f"eval_positions_{n + 1}.png"
            plot_positions(out / name, results, f"{label}: loss by position", train_length)
            files.append(name)
    print(f"{caption}\n{text_table(table_header, table_rows)}")
    print(f"written to {out}: {', '.join(files)}")
