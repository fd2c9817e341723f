"""Tokenizers, the cached token file and its split."""
import json
import os

import numpy as np
import pytest

from moe_dist.data import (ByteTokenizer, DataError, build_token_file, byte_unigram_entropy, iter_documents,
                           load_tokenizer, train_tokenizer)

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
        "def square(x):\n    return x * x  # héllo wörld, naïve café 🙂\n")


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256 and tok.eos_id == 0
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode()) and tok.decode(ids) == TEXT


def test_hf_tokenizer_trained_offline_round_trips(tmp_path):
    out = tmp_path / "tok" / "tokenizer.json"
    tok = train_tokenizer([TEXT] * 20 + ["another document about foxes and dogs"], 300, out)
    assert out.is_file() and not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    assert tok.vocab_size == 300
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"
    ids = tok.encode(TEXT)
    assert len(ids) < len(TEXT.encode())  # merges were learned
    assert tok.decode(ids) == TEXT
    unseen = "Zebra QUARTZ 12345 ∑ ← never in training"
    assert tok.decode(tok.encode(unseen)) == unseen  # byte-level: nothing is out of vocabulary
    again = load_tokenizer(str(out))
    assert again.encode(TEXT) == ids and again.identity == tok.identity


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="missing.json.: no such file"):
        load_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(DataError, match="bad.json.: not a Hugging Face tokenizer.json"):
        load_tokenizer(str(bad))
    with pytest.raises(DataError, match="vocab_size 100 is too small"):
        train_tokenizer([TEXT], 100, tmp_path / "t.json")


def write_corpus(path):
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["ab", "cde", "f"]) + "\n")


def test_token_file_layout_and_cache(tmp_path):
    src, cache = tmp_path / "c.jsonl", tmp_path / "cache"
    write_corpus(src)
    tf = build_token_file(str(src), ByteTokenizer(), cache)
    assert not tf.reused and tf.tokens.dtype == np.uint16
    # Every document is followed by eos (0).
    assert tf.tokens.tolist() == [97, 98, 0, 99, 100, 101, 0, 102, 0]
    assert tf.doc_starts == [0, 3, 7] and tf.index["n_documents"] == 3
    assert isinstance(tf.tokens, np.memmap)
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp files left

    again = build_token_file(str(src), ByteTokenizer(), cache)
    assert again.reused and again.bin_path == tf.bin_path

    # Change the source: size and mtime differ, so the fingerprint does; stale entry is removed.
    src.write_text(json.dumps({"text": "xyz!"}) + "\n")
    os.utime(src, ns=(1, 1))
    rebuilt = build_token_file(str(src), ByteTokenizer(), cache)
    assert not rebuilt.reused and rebuilt.tokens.tolist() == [120, 121, 122, 33, 0]
    assert sorted(p.suffix for p in cache.iterdir()) == [".bin", ".json", ".lock"]

    # A half-written / corrupt token file is never trusted.
    with open(rebuilt.bin_path, "ab") as f:
        f.write(b"\x01")
    assert not build_token_file(str(src), ByteTokenizer(), cache).reused


def test_cache_keyed_by_tokenizer(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text(TEXT * 5)
    tok = train_tokenizer([TEXT], 280, tmp_path / "tok.json")
    a = build_token_file(str(src), ByteTokenizer(), tmp_path / "cache")
    b = build_token_file(str(src), tok, tmp_path / "cache")
    assert not b.reused and b.bin_path != a.bin_path
    assert build_token_file(str(src), ByteTokenizer(), tmp_path / "cache").reused  # both kept
    assert tok.decode(b.tokens[:-1].tolist()) == TEXT * 5 and b.tokens[-1] == tok.eos_id


def test_split_is_last_fraction(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("x" * 99)
    tf = build_token_file(str(src), ByteTokenizer(), tmp_path / "cache")  # 100 tokens
    train, val = tf.split(0.1)
    assert len(train) == 90 and len(val) == 10
    assert np.array_equal(np.concatenate([train, val]), tf.tokens)
    with pytest.raises(DataError, match="val_fraction"):
        tf.split(1.0)


def test_bad_data_error_surfaces_from_build(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'text'"):
        build_token_file(str(src), ByteTokenizer(), tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.bin"))  # nothing half-written left behind


def test_unigram_entropy_in_nats():
    assert byte_unigram_entropy(np.array([7, 7, 7])) == 0.0
    assert byte_unigram_entropy(np.array([1, 2, 1, 2], dtype=np.uint16)) == pytest.approx(np.log(2))
    assert byte_unigram_entropy(np.arange(256)) == pytest.approx(np.log(256))


def test_builtin_corpus_tokenizes(tmp_path):
    tf = build_token_file("builtin:pydoc", ByteTokenizer(), tmp_path)
    text = next(iter_documents("builtin:pydoc"))
    assert tf.n_tokens == len(text.encode()) + 1
    assert 2.0 < byte_unigram_entropy(tf.tokens) < 5.0  # English text: ~3.3 nats per byte


def test_counts_are_stored_with_the_token_file_and_the_stream_stays_in_its_dtype(tmp_path, monkeypatch):
    """The unigram counts are taken while the file is built; at start a run counts only the validation
    tokens, a chunk at a time, and never widens the whole stream (the memmap stays uint16)."""
    import moe_dist.data.tokens as T
    from moe_dist.config import DataConfig
    from moe_dist.data import build_data

    src = tmp_path / "corpus.txt"
    src.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    tf = build_token_file(str(src), ByteTokenizer(), tmp_path / "cache")
    assert tf.tokens.dtype == np.uint16 and tf.index["unigram_counts"] == np.bincount(np.asarray(tf.tokens), minlength=256).tolist()
    monkeypatch.setattr(T, "_COUNT_CHUNK", 97)  # many chunks
    data = build_data(DataConfig(dataset=str(src), cache_dir=str(tmp_path / "cache"), val_fraction=0.2), 16, 0)
    train = np.asarray(data.train.dataset.tokens)
    assert data.train.dataset.tokens.dtype == np.uint16
    assert data.unigram_entropy() == pytest.approx(byte_unigram_entropy(train.astype(np.int64)), rel=1e-12)
