"""The data layer: llm.c token shards, tokenizers, the embedded corpus and `freeatten prepare`."""

from freeatten_lightning.data.corpus import embedded_corpus_id, embedded_documents
from freeatten_lightning.data.prepare import (
    ensure_embedded_shards,
    prepare_main,
    prepare_shards,
    read_text_files,
)
from freeatten_lightning.data.shards import (
    HEADER_INTS,
    MAGIC,
    VERSION,
    ShardError,
    open_shard,
    shard_num_tokens,
    write_shard,
)
from freeatten_lightning.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
    vocab_size_of,
)

__all__ = [
    "HEADER_INTS",
    "MAGIC",
    "VERSION",
    "BPETokenizer",
    "ByteTokenizer",
    "ShardError",
    "Tokenizer",
    "embedded_corpus_id",
    "embedded_documents",
    "ensure_embedded_shards",
    "load_tokenizer",
    "open_shard",
    "prepare_main",
    "prepare_shards",
    "read_text_files",
    "shard_num_tokens",
    "vocab_size_of",
    "write_shard",
]
