"""The data layer: llm.c shard I/O and its error messages, tokenizers, prepare_shards, the embedded corpus."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from freeatten_lightning.data import (
    HEADER_INTS,
    MAGIC,
    VERSION,
    BPETokenizer,
    ByteTokenizer,
    ShardError,
    Tokenizer,
    embedded_corpus_id,
    embedded_documents,
    ensure_embedded_shards,
    load_tokenizer,
    open_shard,
    prepare_main,
    prepare_shards,
    read_text_files,
    shard_num_tokens,
    vocab_size_of,
    write_shard,
)
from freeatten_lightning.errors import FreeattenError

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the tokens before it.",
    "Softplus attention normalises positive scores by their sum.",
    "Length extrapolation means evaluating on sequences longer than in training.",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, \u65e5\u672c\u8a9e, and emoji \U0001f600 are text too.",
]


def llmc_write(path, tokens, *, magic=MAGIC, version=VERSION, count=None):
    """An independent writer in llm.c's style (its data/common.py), optionally with a corrupted header."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1] = magic, version
    header[2] = len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens).astype("<u2").tobytes())


# ---------------------------------------------------------------- shards


def test_write_open_round_trip(tmp_path):
    tokens = np.array([0, 1, 255, 256, 50256, 65535, 7], dtype=np.int64)
    path = tmp_path / "x_train_000001.bin"
    write_shard(path, tokens)
    raw = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    assert raw[0] == MAGIC and raw[1] == VERSION and raw[2] == len(tokens) and not raw[3:].any()
    assert path.stat().st_size == 4 * HEADER_INTS + 2 * len(tokens)
    shard = open_shard(path)
    assert isinstance(shard, np.memmap) and shard.dtype == np.uint16 and not shard.flags.writeable
    np.testing.assert_array_equal(shard, tokens)
    assert shard_num_tokens(path) == len(tokens)
    assert not [p for p in tmp_path.iterdir() if p.name != path.name], "temp file left behind"
    write_shard(tmp_path / "list.bin", [3, 2, 1])
    np.testing.assert_array_equal(open_shard(tmp_path / "list.bin"), [3, 2, 1])


def test_reads_files_from_an_independent_llmc_writer(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, size=10_000)
    path = tmp_path / "fineweb_val_000000.bin"
    llmc_write(path, tokens)
    np.testing.assert_array_equal(open_shard(path), tokens)
    assert shard_num_tokens(path) == 10_000
    ours = tmp_path / "ours.bin"
    write_shard(ours, tokens)
    assert ours.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("bad", [[-1, 3], [65536], [0, 70000]])
def test_out_of_range_tokens_refused(tmp_path, bad):
    with pytest.raises(FreeattenError, match=r"\[0, 65535\]"):
        write_shard(tmp_path / "bad.bin", bad)
    assert not list(tmp_path.iterdir())


def test_missing_shard(tmp_path):
    path = tmp_path / "nope_train_000001.bin"
    for read in (open_shard, shard_num_tokens):
        with pytest.raises(ShardError, match="does not exist") as err:
            read(path)
        assert str(path) in str(err.value) and "freeatten prepare" in str(err.value)


def test_tiny_file(tmp_path):
    path = tmp_path / "tiny.bin"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ShardError, match="100 bytes, smaller than the 1024-byte") as err:
        open_shard(path)
    assert str(path) in str(err.value)


def test_wrong_magic_headerless_raw_file(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    with pytest.raises(ShardError, match="headerless raw uint16") as err:
        open_shard(path)
    assert str(path) in str(err.value) and str(MAGIC) in str(err.value)


def test_wrong_magic_other_formats(tmp_path):
    npy = tmp_path / "tokens.npy"
    np.save(npy, np.arange(1000, dtype=np.uint16))
    with pytest.raises(ShardError, match=r"\.npy file"):
        open_shard(npy)
    text = tmp_path / "notes.bin"
    text.write_text("hello world " * 200)
    with pytest.raises(ShardError, match="looks like text"):
        shard_num_tokens(text)
    odd = tmp_path / "odd.bin"
    llmc_write(odd, [1, 2, 3], magic=12345)
    with open(odd, "ab") as f:
        f.write(b"\x01")
    with pytest.raises(ShardError, match="unknown format"):
        open_shard(odd)


def test_wrong_version(tmp_path):
    path = tmp_path / "v2.bin"
    llmc_write(path, [1, 2, 3], version=2)
    with pytest.raises(ShardError, match="version 2, but only version 1") as err:
        open_shard(path)
    assert str(path) in str(err.value)


def test_truncated_file_says_how_many_tokens_are_missing(tmp_path):
    path = tmp_path / "cut.bin"
    llmc_write(path, np.arange(1000))
    with open(path, "r+b") as f:
        f.truncate(1024 + 2 * 990)
    with pytest.raises(ShardError, match=r"truncated.*1,000 tokens.*only 990 \(10 tokens missing") as err:
        open_shard(path)
    assert str(path) in str(err.value)


def test_extra_bytes_are_a_count_mismatch(tmp_path):
    path = tmp_path / "long.bin"
    llmc_write(path, np.arange(1000), count=900)
    with pytest.raises(ShardError, match=r"does not match its header: 900 tokens.*200 extra bytes") as err:
        shard_num_tokens(path)
    assert str(path) in str(err.value)


def test_shard_errors_are_freeatten_errors():
    assert issubclass(ShardError, FreeattenError) and issubclass(ShardError, ValueError)


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("byte", 257, 256)
    text = SENTENCES[-1]
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode([tok.eot_id, *ids, tok.eot_id]) == text
    assert tok.decode(np.array(ids, dtype=np.uint16)) == text
    assert tok.decode([0xE6, 0x97]) == "\ufffd"
    with pytest.raises(FreeattenError, match="ids must lie"):
        tok.decode([300])


def test_load_tokenizer_and_vocab_size_of(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert vocab_size_of("byte") == 257 and vocab_size_of("gpt2") == 50257
    for name in ("gpt2", "bpe"):
        with pytest.raises(FreeattenError, match="--tokenizer-path"):
            load_tokenizer(name)
    with pytest.raises(FreeattenError, match="byte, gpt2, bpe"):
        load_tokenizer("tiktoken")
    with pytest.raises(FreeattenError, match="byte, gpt2, bpe"):
        vocab_size_of("llama")
    with pytest.raises(FreeattenError, match="meta.json"):
        vocab_size_of("bpe")
    with pytest.raises(FreeattenError, match="neither tokenizer.json nor vocab.json"):
        load_tokenizer("bpe", tmp_path)
    with pytest.raises(FreeattenError, match="does not exist"):
        load_tokenizer("bpe", tmp_path / "missing")


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A tiny GPT-2 style byte-level BPE trained here, saved as vocab.json + merges.txt and tokenizer.json."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 20, trainer)
    folder = tmp_path_factory.mktemp("bpe")
    tok.model.save(str(folder))
    json_folder = tmp_path_factory.mktemp("bpe_json")
    tok.save(str(json_folder / "tokenizer.json"))
    return folder, json_folder


def test_bpe_tokenizer_round_trip(bpe_dir):
    folder, json_folder = bpe_dir
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "vocab.json"]
    tok = load_tokenizer("bpe", folder)
    assert isinstance(tok, BPETokenizer) and isinstance(tok, Tokenizer)
    assert tok.name == "bpe" and tok.eot_id == json.loads((folder / "vocab.json").read_text())["<|endoftext|>"]
    text = " ".join(SENTENCES)
    ids = tok.encode(text)
    assert len(ids) < len(text.encode()), "the merges should compress the training text"
    assert all(0 <= i < tok.vocab_size for i in ids) and tok.eot_id not in ids
    assert tok.decode(ids) == text
    from_json = BPETokenizer(json_folder)
    assert from_json.encode(text) == ids and from_json.eot_id == tok.eot_id
    with pytest.raises(FreeattenError, match="expects 50257 tokens"):
        load_tokenizer("gpt2", folder)


def test_bpe_needs_an_end_of_text_token(bpe_dir, tmp_path):
    folder, _ = bpe_dir
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab["<|notendoftext|>"] = vocab.pop("<|endoftext|>")
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_bytes((folder / "merges.txt").read_bytes())
    with pytest.raises(FreeattenError, match="has no <\\|endoftext\\|> token"):
        BPETokenizer(tmp_path)


def test_prepare_shards_with_bpe(bpe_dir, tmp_path):
    tok = load_tokenizer("bpe", bpe_dir[0])
    docs = SENTENCES * 4
    meta = prepare_shards(docs, tmp_path / "out", tokenizer=tok, name="tiny", val_fraction=0.2)
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == tok.vocab_size and meta["eot_id"] == tok.eot_id
    stream = np.concatenate([open_shard(tmp_path / "out" / f) for f in meta["files"]["train"] + meta["files"]["val"]])
    assert len(stream) == sum(len(tok.encode(d)) + 1 for d in docs)
    assert (stream == tok.eot_id).sum() == len(docs)
    pieces = np.split(stream, np.flatnonzero(stream == tok.eot_id)[1:])
    assert sorted(tok.decode(p[1:].tolist()) for p in pieces) == sorted(docs)


# ---------------------------------------------------------------- prepare_shards


def _docs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return [f"document {i}: " + " ".join(rng.choice(SENTENCES[:4], size=rng.integers(1, 6))) for i in range(n)]


def _stream(folder, meta):
    parts = [open_shard(folder / f) for f in meta["files"]["train"] + meta["files"]["val"]]
    return np.concatenate(parts)


def test_prepare_shards_layout_split_and_meta(tmp_path):
    docs, tok, out = _docs(), ByteTokenizer(), tmp_path / "data" / "toy"
    meta = prepare_shards(docs, out, tokenizer=tok, name="toy", val_fraction=0.1, shard_tokens=1000, seed=3)
    assert json.loads((out / "meta.json").read_text()) == meta
    total = sum(len(d.encode()) + 1 for d in docs)
    n_train, n_val = meta["tokens"]["train"], meta["tokens"]["val"]
    assert n_train + n_val == total and abs(n_val - 0.1 * total) <= 0.05 * total
    assert meta["files"]["val"] == ["toy_val_000000.bin"]
    assert meta["files"]["train"] == [f"toy_train_{i:06d}.bin" for i in range(1, -(-n_train // 1000) + 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted(meta["files"]["train"] + ["toy_val_000000.bin", "meta.json"])
    assert [shard_num_tokens(out / f) for f in meta["files"]["train"][:-1]] == [1000] * (
        len(meta["files"]["train"]) - 1
    )
    stream = _stream(out, meta)
    val = open_shard(out / "toy_val_000000.bin")
    np.testing.assert_array_equal(stream[-n_val:], val)
    assert val[0] == tok.eot_id, "val starts at a document boundary"
    assert hashlib.sha256(stream.astype("<u2").tobytes()).hexdigest() == meta["sha256"]
    assert (meta["seed"], meta["val_fraction"], meta["eot_id"], meta["vocab_size"]) == (3, 0.1, 256, 257)
    assert meta["documents"]["train"] + meta["documents"]["val"] == len(docs)
    # end-of-text before every document, and every document present exactly once
    assert stream[0] == tok.eot_id and (stream == tok.eot_id).sum() == len(docs)
    pieces = np.split(stream, np.flatnonzero(stream == tok.eot_id)[1:])
    assert sorted(tok.decode(p) for p in pieces) == sorted(docs)
    assert [tok.decode(p) for p in pieces] != docs, "documents are shuffled"
    assert not [p for p in out.parent.iterdir() if p.name != "toy"], "temporary folders left behind"


def test_prepare_shards_is_deterministic(tmp_path):
    kwargs = dict(tokenizer=ByteTokenizer(), name="d", val_fraction=0.05)
    a = prepare_shards(_docs(), tmp_path / "a", seed=7, **kwargs)
    b = prepare_shards(_docs(), tmp_path / "b", seed=7, **kwargs)
    c = prepare_shards(_docs(), tmp_path / "c", seed=8, **kwargs)
    assert a["sha256"] == b["sha256"] and a["tokens"] == b["tokens"]
    assert (tmp_path / "a" / "d_val_000000.bin").read_bytes() == (tmp_path / "b" / "d_val_000000.bin").read_bytes()
    assert c["sha256"] != a["sha256"]


def test_prepare_shards_cuts_inside_a_single_long_document(tmp_path):
    meta = prepare_shards(["x" * 999], tmp_path / "one", tokenizer=ByteTokenizer(), name="one", val_fraction=0.1)
    assert meta["tokens"] == {"train": 900, "val": 100}


def test_prepare_shards_errors(tmp_path):
    tok = ByteTokenizer()
    with pytest.raises(FreeattenError, match="too few"):
        prepare_shards(["a"], tmp_path / "small", tokenizer=tok, name="s", val_fraction=0.9)
    assert prepare_shards(["a"], tmp_path / "small", tokenizer=tok, name="s")["tokens"] == {
        "train": 1,
        "val": 1,
    }
    shutil.rmtree(tmp_path / "small")
    with pytest.raises(FreeattenError, match="every document is empty"):
        prepare_shards(["", ""], tmp_path / "empty", tokenizer=tok, name="s")
    with pytest.raises(FreeattenError, match="val_fraction"):
        prepare_shards(_docs(), tmp_path / "f", tokenizer=tok, name="s", val_fraction=1.0)
    with pytest.raises(FreeattenError, match="shard name"):
        prepare_shards(_docs(), tmp_path / "n", tokenizer=tok, name="../evil")
    prepare_shards(_docs(), tmp_path / "done", tokenizer=tok, name="s")
    with pytest.raises(FreeattenError, match="already exists.*--overwrite"):
        prepare_shards(_docs(), tmp_path / "done", tokenizer=tok, name="s")
    meta = prepare_shards(_docs(5), tmp_path / "done", tokenizer=tok, name="t", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == [
        "meta.json",
        "t_train_000001.bin",
        "t_val_000000.bin",
    ]
    assert meta["documents"]["train"] + meta["documents"]["val"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done"], "failed runs must leave nothing behind"


# ---------------------------------------------------------------- text files and the command


def _text_tree(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha " * 50)
    (root / "sub" / "b.md").write_text("# beta\n" + "beta " * 50)
    (root / "sub" / "c.txt").write_bytes(b"gamma \xff " * 50)
    (root / "skip.py").write_text("print('not text')")
    return root


def test_read_text_files_dir_glob_and_file(tmp_path):
    root = _text_tree(tmp_path / "texts")
    docs = read_text_files(root)
    assert [d[:5] for d in docs] == ["alpha", "# bet", "gamma"]
    assert "\ufffd" in docs[2]
    assert read_text_files(os.path.join(root, "**", "*.txt")) == [docs[0], docs[2]]
    assert read_text_files(root / "a.txt") == [docs[0]]
    with pytest.raises(FreeattenError, match="no files match"):
        read_text_files(tmp_path / "nothing" / "*.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FreeattenError, match=r"no \*\.txt, \*\.md or \*\.jsonl"):
        read_text_files(tmp_path / "empty")
    write_shard(tmp_path / "s.bin", [1, 2, 3])
    with pytest.raises(FreeattenError, match="looks binary"):
        read_text_files(tmp_path / "s.bin")


def test_read_jsonl_rows_as_documents(tmp_path):
    """FineWeb-style rows exported as JSON Lines: one document per line, from its "text" field."""
    rows = [{"text": "first doc", "id": "a"}, {"text": "second\ndoc", "url": "x"}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    (tmp_path / "note.txt").write_text("plain")
    assert read_text_files(tmp_path) == ["plain", "first doc", "second\ndoc"]
    bad_files = (('{"text": "ok"}\n{oops', "rows.jsonl:2 is not valid JSON"), ('{"body": "x"}', '"text" field'))
    for bad, message in bad_files:
        (tmp_path / "rows.jsonl").write_text(bad)
        with pytest.raises(FreeattenError, match=message):
            read_text_files(tmp_path / "rows.jsonl")


def test_prepare_main_end_to_end(tmp_path, capsys):
    root = _text_tree(tmp_path / "texts")
    out = tmp_path / "shards"
    assert prepare_main(["--input", str(root), "--output", str(out), "--val-fraction", "0.3", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["files"] == {"train": ["shards_train_000001.bin"], "val": ["shards_val_000000.bin"]}
    assert meta["seed"] == 1 and meta["val_fraction"] == 0.3 and meta["tokenizer"] == "byte"
    assert f"{meta['tokens']['train']:,}" in printed and str(out) in printed and "shards_val_000000.bin" in printed
    assert len(_stream(out, meta)) == sum(len(d.encode()) + 1 for d in read_text_files(root))
    with pytest.raises(FreeattenError, match="needs --output"):
        prepare_main(["--input", str(root)])
    with pytest.raises(FreeattenError, match="drop --tokenizer"):
        prepare_main(["--embedded", "--tokenizer", "gpt2"])
    with pytest.raises(SystemExit):
        prepare_main(["--output", str(out)])
    with pytest.raises(SystemExit) as help_exit:
        prepare_main(["--help"])
    assert help_exit.value.code == 0 and "--tokenizer-path" in capsys.readouterr().out


# ---------------------------------------------------------------- the embedded corpus


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, ensure_embedded_shards(cache)


def test_embedded_corpus_is_english_prose():
    docs = embedded_documents()
    text = "".join(docs)
    assert len(docs) > 100 and len(text.encode()) > 1_000_000
    assert embedded_documents() == docs, "deterministic"
    assert embedded_corpus_id().startswith("python-3.") and embedded_corpus_id().endswith("-docs")
    letters_and_spaces = sum(c.isascii() and (c.isalpha() or c == " ") for c in text)
    assert letters_and_spaces / len(text) > 0.75
    assert text.count(" the ") > 5000


def test_ensure_embedded_shards_prepares_once_and_reuses(embedded_cache, capsys):
    cache, folder = embedded_cache
    assert folder.parent == cache and folder.name == f"{embedded_corpus_id()}-byte"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["tokenizer"] == "byte" and meta["val_fraction"] == 0.05
    total = meta["tokens"]["train"] + meta["tokens"]["val"]
    assert total == sum(len(d.encode()) + 1 for d in embedded_documents())
    assert 0.04 < meta["tokens"]["val"] / total < 0.06
    assert sum(shard_num_tokens(folder / f) for f in meta["files"]["train"]) == meta["tokens"]["train"]
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert ensure_embedded_shards(cache) == folder
    assert prepare_main(["--embedded", "--output", str(cache)]) == 0
    assert str(folder) in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps, "reused, not rewritten"
    assert sorted(p.name for p in cache.iterdir()) == [folder.name]


def test_ensure_embedded_shards_respects_freeatten_cache(embedded_cache, monkeypatch):
    cache, folder = embedded_cache
    monkeypatch.setenv("FREEATTEN_CACHE", str(cache))
    assert ensure_embedded_shards() == folder


def test_ensure_embedded_shards_loser_of_a_race_uses_the_winners_folder(tmp_path, monkeypatch):
    import freeatten_lightning.data.prepare as prepare_module

    folder = tmp_path / f"{embedded_corpus_id()}-byte"

    def documents_while_another_process_finishes():
        winner = prepare_shards(_docs(), folder, tokenizer=ByteTokenizer(), name="winner")
        assert winner["files"]["val"] == ["winner_val_000000.bin"]
        yield from _docs(30)

    monkeypatch.setattr(prepare_module, "embedded_documents", documents_while_another_process_finishes)
    assert ensure_embedded_shards(tmp_path) == folder
    assert json.loads((folder / "meta.json").read_text())["name"] == "winner"
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name], "the loser's temp folder is removed"
