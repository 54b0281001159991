"""Turn text into llm.c token shards (`freeatten prepare`), and the cached shards of the embedded corpus."""

from __future__ import annotations

import argparse
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from freeatten_lightning.data.corpus import embedded_corpus_id, embedded_documents
from freeatten_lightning.data.shards import (
    HEADER_BYTES,
    MAGIC,
    MAX_SHARD_TOKENS,
    MAX_TOKEN_ID,
    VERSION,
    write_shard,
)
from freeatten_lightning.data.tokenizers import TOKENIZER_CHOICES, ByteTokenizer, Tokenizer, load_tokenizer
from freeatten_lightning.errors import FreeattenError

META_FILE = "meta.json"
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
EMBEDDED_NAME = "pydocs"
DEFAULT_CACHE = "~/.cache/freeatten_lightning"
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_SEED = 1337
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class OutputExistsError(FreeattenError):
    """The output folder of prepare_shards already holds files."""


def _exists_error(out: Path) -> OutputExistsError:
    return OutputExistsError(
        f"output folder {out} already exists and is not empty; delete it, choose another --output, or pass "
        "--overwrite to replace it"
    )


def _sibling(out: Path, tag: str) -> Path:
    """A unique hidden folder next to `out`, on the same file system so renames are atomic."""
    return out.parent / f".{out.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished folder `tmp` to `out` in one rename (replacing `out` only when `overwrite`)."""
    if overwrite and out.exists():
        old = _sibling(out, "old")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise _exists_error(out) from e
        raise


def _validate_args(tokenizer: Tokenizer, name: str, val_fraction: float, shard_tokens: int) -> None:
    if not _NAME_RE.fullmatch(name):
        raise FreeattenError(
            f"shard name {name!r} must be letters, digits, '.', '_' or '-' (it prefixes the file names); "
            "pass e.g. --name mydata"
        )
    if not 0.0 < val_fraction < 1.0:
        raise FreeattenError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}; e.g. 0.05")
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise FreeattenError(f"shard_tokens must lie in [1, {MAX_SHARD_TOKENS}], got {shard_tokens}")
    if tokenizer.vocab_size > MAX_TOKEN_ID + 1:
        raise FreeattenError(
            f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size:,} tokens but shards store uint16 ids "
            f"(at most {MAX_TOKEN_ID + 1:,}); use a smaller vocabulary"
        )


def _encode_all(documents: list[str], tokenizer: Tokenizer, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle the documents with `seed`, encode each with end-of-text before it, and concatenate.

    Returns the token stream (uint16) and the start offset of every document in it.
    """
    order = np.random.default_rng(seed).permutation(len(documents))
    pieces, lengths = [], []
    for index in tqdm(order, desc="tokenizing", unit="doc", leave=False):
        ids = np.asarray([tokenizer.eot_id, *tokenizer.encode(documents[index])], dtype=np.int64)
        if ids.min() < 0 or ids.max() >= tokenizer.vocab_size:
            raise FreeattenError(
                f"tokenizer {tokenizer.name!r} produced ids outside [0, {tokenizer.vocab_size}); its "
                "vocab_size is wrong"
            )
        pieces.append(ids.astype(np.uint16))
        lengths.append(ids.size)
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)
    starts = np.cumsum([0, *lengths[:-1]], dtype=np.int64)
    return stream, starts


def _val_start(total: int, starts: np.ndarray, val_fraction: float) -> int:
    """Where the validation tail begins: at the document start nearest the exact cut if it is within half the
    target size (so no document straddles the splits), else exactly at the cut."""
    target_val = max(1, round(total * val_fraction))
    cut = total - target_val
    if cut < 1:
        raise FreeattenError(
            f"the corpus has only {total} tokens: too few to give both train and val tokens at val_fraction "
            f"{val_fraction}; add more text"
        )
    nearest = int(starts[np.argmin(np.abs(starts - cut))])
    return nearest if 0 < nearest < total and abs(nearest - cut) <= target_val // 2 else cut


def prepare_shards(
    documents: Iterable[str],
    output_dir: str | os.PathLike,
    *,
    tokenizer: Tokenizer,
    name: str,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    seed: int = DEFAULT_SEED,
    source: str = "documents",
    overwrite: bool = False,
) -> dict:
    """Tokenize `documents` into llm.c shards in `output_dir` and return the meta.json dict.

    The documents are shuffled with `seed` and each is preceded by end-of-text (llm.c's convention). The
    last `val_fraction` of the tokens (moved to the nearest document start when close) form
    `<name>_val_000000.bin`; the rest fill `<name>_train_000001.bin`, ... of at most `shard_tokens` each.
    Everything is written into a hidden sibling folder, meta.json last, and renamed into place, so a folder
    with meta.json is complete. The whole token stream is held in memory (2 bytes a token).
    """
    out = Path(output_dir).expanduser().absolute()
    _validate_args(tokenizer, name, val_fraction, shard_tokens)
    if not overwrite and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise _exists_error(out)
    documents = [doc for doc in documents if doc]
    if not documents:
        raise FreeattenError(f"no text to prepare from {source}: every document is empty")
    stream, starts = _encode_all(documents, tokenizer, seed)
    val_start = _val_start(stream.size, starts, val_fraction)
    if stream.size - val_start > MAX_SHARD_TOKENS:
        raise FreeattenError(f"the val split ({stream.size - val_start:,} tokens) is too big; lower the val fraction")
    train, val = stream[:val_start], stream[val_start:]
    train_files = [f"{name}_train_{i + 1:06d}.bin" for i in range(-(-train.size // shard_tokens))]
    val_files = [f"{name}_val_000000.bin"]
    meta = {
        "format": f"llm.c token shards: {HEADER_BYTES // 4} int32 header (magic {MAGIC}, version {VERSION}, "
        "count), then uint16 tokens; end-of-text before every document",
        "name": name,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "tokens": {"train": int(train.size), "val": int(val.size)},
        "documents": {"train": int(np.sum(starts < val_start)), "val": int(np.sum(starts >= val_start))},
        "files": {"train": train_files, "val": val_files},
        "seed": seed,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "source": source,
        "sha256": hashlib.sha256(stream.astype("<u2", copy=False).tobytes()).hexdigest(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    tmp.mkdir()
    try:
        for i, file_name in enumerate(train_files):
            write_shard(tmp / file_name, train[i * shard_tokens : (i + 1) * shard_tokens])
        write_shard(tmp / val_files[0], val)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _publish(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def read_text_files(pattern_or_dir: str | os.PathLike) -> list[str]:
    """Documents from text files: a folder (all *.txt, *.md, *.jsonl below it), a glob, or a file. A .txt or .md
    file is one document; a .jsonl file holds one per line in its "text" field (FineWeb's rows, exported)."""
    spec = os.path.expanduser(os.fspath(pattern_or_dir))
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise FreeattenError(f"folder {spec} holds no *.txt, *.md or *.jsonl files; point --input at text files")
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise FreeattenError(
                f"no files match {spec}; pass an existing folder, file or glob (quoted, e.g. 'texts/*.txt')"
            )
    documents = []
    for file in tqdm(files, desc="reading", unit="file", leave=False, disable=len(files) < 100):
        try:
            data = file.read_bytes()
        except OSError as e:
            raise FreeattenError(f"cannot read {file}: {e.strerror}; check its permissions") from e
        if b"\x00" in data:
            raise FreeattenError(f"{file} contains NUL bytes: it looks binary, not text; pass text files")
        text = data.decode("utf-8", errors="replace")
        documents.extend(_jsonl_documents(file, text) if file.suffix == ".jsonl" else [text])
    return documents


def _jsonl_documents(file: Path, text: str) -> list[str]:
    """The "text" field of every non-empty line of a JSON Lines file."""
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FreeattenError(
                f"{file}:{number} is not valid JSON ({e.msg}); a .jsonl file holds one object per line"
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise FreeattenError(f'{file}:{number} has no string "text" field: each line must be {{"text": "..."}}')
        documents.append(row["text"])
    return documents


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir or os.environ.get("FREEATTEN_CACHE") or DEFAULT_CACHE).expanduser()


def ensure_embedded_shards(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of byte-level shards of the embedded corpus, prepared on first use.

    It lives under `cache_dir` (default $FREEATTEN_CACHE or ~/.cache/freeatten_lightning) in a subfolder named
    after the corpus and tokenizer. Two racing processes both prepare it; the first rename wins and the other
    uses the winner's folder.
    """
    tokenizer = ByteTokenizer()
    folder = _cache_root(cache_dir) / f"{embedded_corpus_id()}-{tokenizer.name}"
    if (folder / META_FILE).is_file():
        return folder
    try:
        prepare_shards(
            embedded_documents(),
            folder,
            tokenizer=tokenizer,
            name=EMBEDDED_NAME,
            val_fraction=DEFAULT_VAL_FRACTION,
            source=f"embedded corpus {embedded_corpus_id()} (pydoc topics + standard library docstrings)",
        )
    except OutputExistsError:
        if not (folder / META_FILE).is_file():
            raise FreeattenError(
                f"cache folder {folder} exists without {META_FILE} (not written by freeatten); delete it"
            ) from None
    return folder


def _summary(meta: dict, folder: Path) -> str:
    tokens, files = meta["tokens"], meta["files"]
    lines = [
        f"{meta['tokens']['train'] + meta['tokens']['val']:,} tokens ({meta['tokenizer']} tokenizer, vocab "
        f"{meta['vocab_size']:,}, end-of-text {meta['eot_id']}) from {meta['source']}",
        f"  train: {tokens['train']:,} tokens in {len(files['train'])} shard(s)",
        f"  val:   {tokens['val']:,} tokens in {len(files['val'])} shard(s)",
        f"written to {folder}:",
    ]
    lines += [f"  {name}" for name in [*files["train"], *files["val"], META_FILE]]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freeatten prepare",
        description=(
            "Tokenize text into llm.c / modded-nanogpt token shards (256 int32 header, uint16 tokens), the "
            "format the trainer reads. Documents are shuffled, each is preceded by end-of-text, the last "
            "--val-fraction of the tokens becomes <name>_val_000000.bin and the rest "
            "<name>_train_000001.bin, ...; meta.json describes the result. Nothing is downloaded."
        ),
        epilog=(
            "examples:\n"
            "  freeatten prepare --input texts/ --output data/mytexts\n"
            "  freeatten prepare --input 'books/**/*.txt' --output data/books --tokenizer gpt2 "
            "--tokenizer-path gpt2_files/\n"
            "  freeatten prepare --embedded   # Python's own docs, cached for training offline"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input",
        metavar="PATH_OR_GLOB",
        help="a folder (all *.txt, *.md, *.jsonl below it), a single file, or a quoted glob; one document per text "
        'file, one per line of a .jsonl file (its "text" field, as in FineWeb)',
    )
    source.add_argument(
        "--embedded",
        action="store_true",
        help="prepare the built-in corpus (Python's documentation topics and standard-library docstrings, "
        "byte tokenizer) in the cache, as training does on first use",
    )
    parser.add_argument(
        "--output",
        metavar="DIR",
        help="folder to create for the shards (required with --input); with --embedded, the cache folder "
        f"(default $FREEATTEN_CACHE or {DEFAULT_CACHE})",
    )
    parser.add_argument(
        "--tokenizer",
        choices=TOKENIZER_CHOICES,
        help="byte: UTF-8 bytes, vocab 257, no files (default); gpt2/bpe: byte-level BPE, --tokenizer-path",
    )
    parser.add_argument(
        "--tokenizer-path",
        metavar="DIR",
        help="local folder with tokenizer.json or vocab.json + merges.txt (for gpt2/bpe; needs `tokenizers`)",
    )
    parser.add_argument("--name", help="prefix of the shard file names (default: the output folder's name)")
    parser.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help=f"share of the tokens held out for validation (default {DEFAULT_VAL_FRACTION})",
    )
    parser.add_argument(
        "--shard-tokens",
        type=int,
        metavar="N",
        help=f"most tokens per train shard (default {DEFAULT_SHARD_TOKENS:,})",
    )
    parser.add_argument("--seed", type=int, metavar="S", help=f"seed of the document shuffle (default {DEFAULT_SEED})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return parser


def prepare_main(argv: list[str] | None = None) -> int:
    """The `freeatten prepare` command: tokenize text files (or the embedded corpus) into shards."""
    parser = _parser()
    args = parser.parse_args(argv)
    options = ("tokenizer", "tokenizer_path", "name", "val_fraction", "shard_tokens", "seed", "overwrite")
    if args.embedded:
        given = [f"--{opt.replace('_', '-')}" for opt in options if getattr(args, opt) not in (None, False)]
        if given:
            raise FreeattenError(
                f"--embedded uses fixed settings (byte tokenizer, val fraction {DEFAULT_VAL_FRACTION}); "
                f"drop {', '.join(given)}, or prepare your own text with --input"
            )
        folder = ensure_embedded_shards(args.output)
        meta = json.loads((folder / META_FILE).read_text())
    else:
        if not args.output:
            raise FreeattenError("--input needs --output DIR: the folder to create for the shards")
        folder = Path(args.output).expanduser().absolute()
        given = {opt: getattr(args, opt) for opt in ("val_fraction", "shard_tokens", "seed")}
        meta = prepare_shards(
            read_text_files(args.input),
            folder,
            tokenizer=load_tokenizer(args.tokenizer or "byte", args.tokenizer_path),
            name=args.name or re.sub(r"[^A-Za-z0-9._-]", "_", folder.name).lstrip("._-") or "data",
            **{opt: value for opt, value in given.items() if value is not None},
            source=f"text files {args.input}",
            overwrite=args.overwrite,
        )
    print(_summary(meta, folder))
    return 0
