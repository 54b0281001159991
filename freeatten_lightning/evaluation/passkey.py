"""Passkey retrieval (Mohtashami & Jaggi 2023, as in the paper): a random number hidden at a chosen depth of
filler text, the model asked to repeat it; accuracy over a grid of context lengths x depths.

An example of `length` tokens is end-of-text (the document start the model was trained with), the intro,
filler, the needle holding the key, more filler, the question, then the answer (" 12345"). The model sees
everything before the answer and decodes greedily with the KV cache; a trial is correct when the number its
answer starts with is the key. The filler is cut at token level, so the lengths are exact for any tokenizer.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from freeatten_lightning.data.tokenizers import Tokenizer
from freeatten_lightning.errors import FreeattenError
from freeatten_lightning.evaluation.generate import generate
from freeatten_lightning.evaluation.lengths import parse_lengths, scaled_lengths
from freeatten_lightning.evaluation.loading import (
    add_checkpoint_arguments,
    checkpoint_tokenizer,
    load_checkpoint,
    resolve_device,
)
from freeatten_lightning.evaluation.report import markdown_table, plot_heatmaps, text_table, write_csv
from freeatten_lightning.model.gpt import GPT

FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass(frozen=True)
class PasskeyTemplate:
    """The text around the key; `{key}` in the needle and the answer is replaced by the number.

    `landmark` is the paper's text; `compact` drops the intro for short byte-level contexts; `copy` is the
    bare synthetic copy task (key, '#', key; filler only beyond its own length), which a tiny model learns in
    a few hundred CPU steps, for checking a pipeline end to end.
    """

    name: str
    intro: str
    needle: str
    question: str
    answer: str = " {key}"
    filler: str = FILLER


TEMPLATES = {
    "landmark": PasskeyTemplate(
        "landmark",
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.",
        " The pass key is {key}. Remember it. {key} is the pass key.",
        " What is the pass key? The pass key is",
    ),
    "compact": PasskeyTemplate("compact", "", " The pass key is {key}.", " What is the pass key? The pass key is"),
    "copy": PasskeyTemplate("copy", "", "{key}", "#", "{key}"),
}
_FIRST_NUMBER = re.compile(r"\s*(\d+)")


@dataclass(frozen=True)
class PasskeyExample:
    """Token ids of one example: the prompt (everything before the answer) and the answer."""

    prompt: list[int]
    answer: list[int]
    key: str


def fixed_tokens(tokenizer: Tokenizer, template: PasskeyTemplate, digits: int = 5) -> int:
    """Tokens of an example other than filler (end-of-text, intro, needle, question, answer), for a key of
    nines (BPE may split other keys differently: `passkey_example` checks each example's own length)."""
    key = "9" * digits
    parts = (template.intro, template.needle.format(key=key), template.question, template.answer.format(key=key))
    return 1 + sum(len(tokenizer.encode(part)) if part else 0 for part in parts)


def choose_template(name: str, tokenizer: Tokenizer, shortest: int, digits: int = 5) -> PasskeyTemplate:
    """The named template; 'auto' = landmark when its fixed text takes at most half the shortest length, else
    the compact one (byte-level models at short lengths)."""
    if name == "auto":
        landmark = TEMPLATES["landmark"]
        name = "landmark" if 2 * fixed_tokens(tokenizer, landmark, digits) <= shortest else "compact"
    if name not in TEMPLATES:
        raise FreeattenError(f"unknown passkey template {name!r}: choose auto, {', '.join(TEMPLATES)}")
    template = TEMPLATES[name]
    fixed = fixed_tokens(tokenizer, template, digits)
    if fixed > shortest:
        raise FreeattenError(
            f"length {shortest} is too short for the {name} passkey template ({fixed} tokens without filler): "
            "use longer --lengths or --template compact"
        )
    return template


def passkey_example(
    tokenizer: Tokenizer, length: int, depth: float, key: str, template: PasskeyTemplate
) -> PasskeyExample:
    """An example of exactly `length` tokens with the needle after `depth` (0..1) of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise FreeattenError(f"passkey depth must lie in [0, 1], got {depth}")
    intro = tokenizer.encode(template.intro) if template.intro else []
    needle = tokenizer.encode(template.needle.format(key=key))
    question = tokenizer.encode(template.question)
    answer = tokenizer.encode(template.answer.format(key=key))
    filler_count = length - 1 - len(intro) - len(needle) - len(question) - len(answer)
    if filler_count < 0:
        raise FreeattenError(
            f"length {length} is too short for the {template.name} passkey template: use longer --lengths"
        )
    piece = tokenizer.encode(template.filler)
    filler = (piece * (filler_count // max(1, len(piece)) + 1))[:filler_count]
    before = round(depth * filler_count)
    prompt = [tokenizer.eot_id, *intro, *filler[:before], *needle, *filler[before:], *question]
    return PasskeyExample(prompt, answer, key)


def random_keys(count: int, digits: int, rng: np.random.Generator) -> list[str]:
    """`count` random keys of exactly `digits` decimal digits (no leading zero), as text."""
    first = rng.integers(1, 10, size=count)
    rest = rng.integers(0, 10, size=(count, digits - 1))
    return ["".join(map(str, [f, *r])) for f, r in zip(first, rest, strict=True)]


def passkey_documents(
    tokenizer: Tokenizer,
    length: int,
    count: int,
    seed: int = 0,
    template: str = "compact",
    digits: int = 5,
    depths: Sequence[float] | None = None,
) -> list[str]:
    """Texts of `count` examples of `length` tokens without their leading end-of-text: training data for the
    synthetic copy task (`prepare_shards` puts end-of-text back before each). Random keys; the needle at a
    uniformly random depth, or at one of `depths`."""
    rng = np.random.default_rng(seed)
    chosen = choose_template(template, tokenizer, length, digits)
    docs = []
    for key in random_keys(count, digits, rng):
        depth = float(rng.uniform()) if depths is None else float(rng.choice(depths))
        example = passkey_example(tokenizer, length, depth, key, chosen)
        docs.append(tokenizer.decode(example.prompt[1:] + example.answer))
    return docs


def answered_key(text: str) -> str | None:
    """The number the model's answer starts with (after blanks), or None."""
    match = _FIRST_NUMBER.match(text)
    return match.group(1) if match else None


@dataclass(frozen=True)
class Trial:
    """One decoded key: the cell, the key, the model's decoded answer and whether it starts with the key."""

    length: int
    depth: float
    key: str
    answer: str
    correct: bool


def run_passkey(
    model: GPT,
    tokenizer: Tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    *,
    template: PasskeyTemplate,
    digits: int = 5,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "passkey",
) -> list[Trial]:
    """Greedy-decode the key for `trials` random keys at every (length, depth); prompts of equal token length
    are decoded as one batch."""
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    cells = [(length, depth) for length in lengths for depth in depths]
    out = []
    bar = tqdm(total=len(cells) * trials, desc=desc, unit="trial", leave=False, disable=not progress)
    with bar:
        for length, depth in cells:
            bar.set_postfix(length=length, depth=depth)
            groups: dict[int, list[PasskeyExample]] = defaultdict(list)
            for key in random_keys(trials, digits, rng):
                example = passkey_example(tokenizer, length, depth, key, template)
                groups[len(example.prompt)].append(example)
            for examples in groups.values():
                for start in range(0, len(examples), batch_size):
                    batch = examples[start : start + batch_size]
                    prompts = torch.tensor([e.prompt for e in batch], device=device)
                    new = generate(model, prompts, len(batch[0].answer) + 1).tolist()
                    for example, ids in zip(batch, new, strict=True):
                        text = tokenizer.decode(ids)
                        correct = answered_key(text) == example.key
                        out.append(Trial(length, depth, example.key, text, correct))
                    bar.update(len(batch))
    return out


def accuracy_grid(trials: Sequence[Trial], lengths: Sequence[int], depths: Sequence[float]) -> np.ndarray:
    """Accuracy (depths x lengths)."""
    grid = np.zeros((len(depths), len(lengths)))
    for i, depth in enumerate(depths):
        for j, length in enumerate(lengths):
            cell = [t.correct for t in trials if t.length == length and t.depth == depth]
            grid[i, j] = float(np.mean(cell))
    return grid


def parse_depths(text: str) -> list[float]:
    """Comma-separated fractions in [0, 1] ("0,0.5,1"), with a clear error otherwise."""
    try:
        depths = [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise FreeattenError(f"--depths takes comma-separated fractions such as 0,0.25,0.5; got {text!r}") from None
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise FreeattenError(f"--depths must be fractions in [0, 1] (0 = start, 1 = end), got {text!r}")
    return depths


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freeatten passkey",
        description=(
            "Passkey retrieval: a random number hidden at a chosen depth of filler text, the model asked to "
            "repeat it (greedy decoding with the KV cache). Prints the accuracy per context length and depth "
            "and writes passkey.csv (every trial), passkey.md and passkey.png (heatmap) into --out."
        ),
        epilog="example:\n  freeatten passkey --ckpt runs/smoke/checkpoints/last.ckpt --multiples 1,2,4 --trials 10",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_checkpoint_arguments(parser, several=True)
    lengths = parser.add_mutually_exclusive_group()
    lengths.add_argument("--lengths", help="context lengths in tokens (example + answer), e.g. 1024,1536,4096")
    lengths.add_argument("--multiples", default="1,2,4", help="multiples of the training length (default 1,2,4)")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1] (default %(default)s)")
    parser.add_argument("--trials", type=int, default=10, help="random keys per cell (default %(default)s)")
    parser.add_argument("--digits", type=int, default=5, help="digits of the key (default %(default)s)")
    parser.add_argument(
        "--template",
        default="auto",
        choices=["auto", *TEMPLATES],
        help="landmark (the paper's text), compact (no intro, for short byte-level contexts), copy (the bare "
        "synthetic copy task) or auto (landmark where it fits in half the shortest length, else compact)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the keys (default 0)")
    parser.add_argument("--out", default="runs/passkey", help="folder for the table and heatmap (default %(default)s)")
    return parser


def passkey_main(argv: list[str] | None = None) -> int:
    """The `freeatten passkey` command."""
    args = _parser().parse_args(argv)
    if args.trials < 1 or args.batch_size < 1 or args.digits < 1:
        raise FreeattenError("--trials, --batch-size and --digits must be >= 1")
    device = resolve_device(args.device)
    depths = parse_depths(args.depths)
    out = Path(args.out)
    panels, rows, summary, grids, lengths = [], [], [], [], None
    for path in args.ckpt:
        checkpoint = load_checkpoint(path, args.attention, args.p, device=device)
        tokenizer = checkpoint_tokenizer(checkpoint, args.tokenizer_path)
        if lengths is None:
            lengths = (
                parse_lengths(args.lengths)
                if args.lengths
                else scaled_lengths(checkpoint.seq_len, parse_lengths(args.multiples, "--multiples"))
            )
        template = choose_template(args.template, tokenizer, min(lengths), args.digits)
        trials = run_passkey(
            checkpoint.model,
            tokenizer,
            lengths,
            depths,
            args.trials,
            template=template,
            digits=args.digits,
            seed=args.seed,
            batch_size=args.batch_size,
            desc=checkpoint.label,
        )
        grid = accuracy_grid(trials, lengths, depths)
        panels.append((f"{checkpoint.label}\n(trained at {checkpoint.seq_len:,}, {template.name} template)", grid))
        rows += [[checkpoint.label, t.length, t.depth, t.key, t.answer, int(t.correct)] for t in trials]
        summary.append([checkpoint.label, *[f"{a:.0%}" for a in grid.mean(0)]])
        header = ["depth", *[f"{n:,}" for n in lengths]]
        table = [[f"{d:.0%}", *[f"{a:.0%}" for a in grid[i]]] for i, d in enumerate(depths)]
        grids.append(f"{checkpoint.label}, accuracy by depth:\n\n{markdown_table(header, table)}")
        print(f"\n{checkpoint.label}: passkey accuracy over {args.trials} keys per cell")
        print(text_table(header, table))
    write_csv(out / "passkey.csv", ["checkpoint", "length", "depth", "key", "answer", "correct"], rows)
    header = ["checkpoint", *[f"{n:,}" for n in lengths]]
    caption = f"Passkey retrieval accuracy by context length (mean over depths {args.depths}, {args.trials} keys each)"
    (out / "passkey.md").write_text("\n".join([f"{caption}\n", markdown_table(header, summary), *grids]))
    plot_heatmaps(out / "passkey.png", panels, lengths, depths)
    print(f"\n{caption}\n{text_table(header, summary)}\nwritten to {out}: passkey.csv, passkey.md, passkey.png")
    return 0
