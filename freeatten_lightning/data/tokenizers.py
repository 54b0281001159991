"""Tokenizers: UTF-8 bytes (no files, no dependencies) and GPT-2 style byte-level BPE from local files."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from freeatten_lightning.errors import FreeattenError

EOT_TOKEN = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257
TOKENIZER_CHOICES = ("byte", "gpt2", "bpe")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data layer needs from a tokenizer: name, vocabulary size, end-of-text id, encode/decode."""

    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255 plus end-of-text 256: works on any text with no files to load."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text` (unencodable lone surrogates become '?')."""
        return list(text.encode("utf-8", errors="replace"))

    def decode(self, ids: Iterable[int]) -> str:
        """Text from byte ids; end-of-text ids are dropped and invalid UTF-8 becomes U+FFFD."""
        array = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).ravel()
        array = array[array != self.eot_id]
        if array.size and (array.min() < 0 or array.max() > 255):
            raise FreeattenError(
                f"byte tokenizer: ids must lie in [0, {self.eot_id}], got min {array.min()} and max "
                f"{array.max()}; were these ids produced by another tokenizer?"
            )
        return array.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class BPETokenizer:
    """GPT-2 style byte-level BPE loaded with the optional `tokenizers` package from local files only.

    `path` is a folder holding `tokenizer.json`, or `vocab.json` + `merges.txt` (GPT-2's files); nothing is
    downloaded. With vocab.json + merges.txt a literal "<|endoftext|>" in the text is encoded as ordinary text
    (like llm.c's encode_ordinary); a tokenizer.json applies its own added-token rules.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        try:
            import tokenizers
        except ImportError as e:
            raise FreeattenError(
                "the BPE tokenizer needs the optional `tokenizers` package: pip install tokenizers "
                "(or pip install 'freeatten-lightning[bpe]'), or use --tokenizer byte"
            ) from e
        folder = Path(path).expanduser()
        if folder.is_file() and folder.name == "tokenizer.json":
            folder = folder.parent
        if not folder.is_dir():
            raise FreeattenError(
                f"BPE tokenizer folder {folder} does not exist; pass a local folder holding tokenizer.json "
                "or vocab.json + merges.txt (nothing is downloaded)"
            )
        tokenizer_json = folder / "tokenizer.json"
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        try:
            if tokenizer_json.is_file():
                self._tok = tokenizers.Tokenizer.from_file(str(tokenizer_json))
            elif vocab.is_file() and merges.is_file():
                from tokenizers import decoders, models, pre_tokenizers

                self._tok = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
                self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                self._tok.decoder = decoders.ByteLevel()
            else:
                raise FreeattenError(
                    f"BPE tokenizer folder {folder} holds neither tokenizer.json nor vocab.json + "
                    "merges.txt; copy GPT-2's vocab.json and merges.txt (or a tokenizer.json) there "
                    "(nothing is downloaded)"
                )
        except FreeattenError:
            raise
        except Exception as e:
            raise FreeattenError(
                f"could not load the BPE tokenizer files in {folder}: {e}; check that they are intact"
            ) from e
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        eot = self._tok.token_to_id(EOT_TOKEN)
        if eot is None:
            raise FreeattenError(
                f"BPE tokenizer in {folder} has no {EOT_TOKEN} token, which separates documents; add it to "
                "the vocabulary (as a special token when training it)"
            )
        self.eot_id: int = eot
        self.name: str = "gpt2" if self.vocab_size == GPT2_VOCAB_SIZE else "bpe"
        self.path = folder

    def encode(self, text: str) -> list[int]:
        """The BPE ids of `text`, without any post-processing template."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text from BPE ids."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(name: str, path: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer called `name` ("byte", "gpt2" or "bpe"); the BPE ones load from the local `path`."""
    if name == "byte":
        return ByteTokenizer()
    if name in ("gpt2", "bpe"):
        if path is None:
            raise FreeattenError(
                f"tokenizer {name!r} needs a local folder with tokenizer.json or vocab.json + merges.txt: "
                "pass --tokenizer-path DIR (nothing is downloaded), or use --tokenizer byte"
            )
        tokenizer = BPETokenizer(path)
        if name == "gpt2" and tokenizer.vocab_size != GPT2_VOCAB_SIZE:
            raise FreeattenError(
                f"tokenizer 'gpt2' expects {GPT2_VOCAB_SIZE} tokens but {path} has {tokenizer.vocab_size}; "
                "use --tokenizer bpe for other BPE vocabularies"
            )
        return tokenizer
    raise FreeattenError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZER_CHOICES)}")


def vocab_size_of(name: str) -> int:
    """The vocabulary size of a named tokenizer without loading files (links the model to the data config)."""
    sizes = {"byte": ByteTokenizer.vocab_size, "gpt2": GPT2_VOCAB_SIZE}
    if name in sizes:
        return sizes[name]
    if name == "bpe":
        raise FreeattenError(
            "the vocabulary size of a 'bpe' tokenizer depends on its files; set the model's vocab_size to "
            "the vocab_size in the data folder's meta.json"
        )
    raise FreeattenError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZER_CHOICES)}")
