"""The llm.c / modded-nanogpt token shard format, so FineWeb-10B shards from those projects work unchanged.

A shard is a header of 256 little-endian int32 ([0] = magic 20240520, [1] = version 1, [2] = token count,
the rest zero) followed by the tokens as little-endian uint16.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from freeatten_lightning.errors import FreeattenError

HEADER_INTS = 256
MAGIC = 20240520
VERSION = 1
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKEN_ID = 65535
MAX_SHARD_TOKENS = 2**31 - 1
TOKEN_DTYPE = np.dtype("<u2")

PREPARE_HINT = "create shards with `freeatten prepare --input TEXT --output DIR` (or `--embedded`)"


class ShardError(FreeattenError):
    """A token shard file is missing, corrupt or not in the llm.c format."""


def write_shard(path: str | os.PathLike, tokens: Iterable[int] | np.ndarray) -> None:
    """Write `tokens` as an llm.c shard; the file appears atomically (temp file + os.replace)."""
    path = Path(path)
    array = np.asarray(tokens if isinstance(tokens, np.ndarray) else list(tokens))
    if array.ndim != 1:
        raise FreeattenError(f"write_shard({path}): tokens must be a 1-D sequence, got shape {array.shape}")
    if array.size and array.dtype.kind not in "iub":
        raise FreeattenError(f"write_shard({path}): tokens must be integers, got dtype {array.dtype}")
    if array.size and (int(array.min()) < 0 or int(array.max()) > MAX_TOKEN_ID):
        raise FreeattenError(
            f"write_shard({path}): token ids must lie in [0, {MAX_TOKEN_ID}] (uint16 holds vocabularies "
            f"up to 65,536), got min {int(array.min())} and max {int(array.max())}; use a tokenizer with a "
            "smaller vocabulary"
        )
    if array.size > MAX_SHARD_TOKENS:
        raise FreeattenError(
            f"write_shard({path}): {array.size:,} tokens exceed the int32 header count; split them into several shards"
        )
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, array.size
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(array.astype(TOKEN_DTYPE, copy=False).tobytes())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _describe_foreign(path: Path, head: bytes, size: int) -> str:
    """Guess what a file without the shard magic is, for the error message."""
    if head.startswith(b"\x93NUMPY"):
        return "it is a NumPy .npy file; convert it with write_shard(path, np.load(npy_file))"
    if int.from_bytes(head[:4], "big") == MAGIC:
        return "its header is big-endian; shards are little-endian: rewrite it with write_shard"
    sample = head[:512]
    if sample and b"\x00" not in sample:
        try:
            sample.decode("utf-8")
            return f"it looks like text; tokenize it with `freeatten prepare --input {path} --output DIR`"
        except UnicodeDecodeError:
            pass
    if size % 2 == 0:
        return (
            "it looks like a headerless raw uint16 token file (e.g. nanoGPT's train.bin); add the header "
            "with write_shard(new_path, np.fromfile(path, dtype=np.uint16))"
        )
    return f"it is not an llm.c token shard (unknown format); {PREPARE_HINT}"


def _validated_count(path: str | os.PathLike) -> int:
    """Check the header and file size of a shard and return its token count."""
    path = Path(path)
    if not path.exists():
        raise ShardError(f"token shard {path} does not exist; check the data path, or {PREPARE_HINT}")
    if not path.is_file():
        raise ShardError(f"token shard {path} is not a regular file; point the data path at .bin shard files")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(
            f"token shard {path} is {size} bytes, smaller than the {HEADER_BYTES}-byte llm.c header: it is "
            f"truncated or not a shard; re-download it or {PREPARE_HINT}"
        )
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    header = np.frombuffer(head, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != MAGIC:
        raise ShardError(
            f"token shard {path} does not start with the llm.c magic {MAGIC} (found {int(header[0])}): "
            + _describe_foreign(path, head, size)
        )
    if int(header[1]) != VERSION:
        raise ShardError(
            f"token shard {path} has format version {int(header[1])}, but only version {VERSION} (uint16 "
            "tokens) is supported; regenerate it with llm.c's version-1 writer or {PREPARE_HINT}"
        )
    count = int(header[2])
    if count < 0:
        raise ShardError(f"token shard {path} has a negative token count ({count}) in its header: corrupt")
    expected = HEADER_BYTES + TOKEN_DTYPE.itemsize * count
    if size < expected:
        present = (size - HEADER_BYTES) // TOKEN_DTYPE.itemsize
        raise ShardError(
            f"token shard {path} is truncated: its header says {count:,} tokens but the file holds only "
            f"{present:,} ({count - present:,} tokens missing, {expected - size:,} bytes); the download or "
            f"write was interrupted: re-download it or {PREPARE_HINT}"
        )
    if size > expected:
        raise ShardError(
            f"token shard {path} does not match its header: {count:,} tokens need {expected:,} bytes but the "
            f"file has {size:,} ({size - expected:,} extra bytes); the file is corrupt or not a "
            f"version-{VERSION} shard: re-download it or {PREPARE_HINT}"
        )
    return count


def open_shard(path: str | os.PathLike) -> np.memmap:
    """Validate a shard and memory-map its tokens (read-only uint16, length = the header's count)."""
    count = _validated_count(path)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))


def shard_num_tokens(path: str | os.PathLike) -> int:
    """The token count of a shard, read from its header (validated like open_shard)."""
    return _validated_count(path)
