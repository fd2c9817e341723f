"""Tokenize a corpus once into a memory-mapped token file, cached and reused across runs.

Layout under cache_dir, per (dataset, jsonl_field, tokenizer):
  <key>-<fp>.bin   the token stream, uint16 (vocab <= 65535) or uint32: doc0 eos doc1 eos ...
  <key>-<fp>.json  index: fingerprint, dtype, n_tokens, document start offsets, token counts
`fp` hashes the source (paths, sizes, mtimes; Python version for built-ins) and the tokenizer,
so a changed source or tokenizer gets a new entry and the stale one is deleted.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from moe_dist.data.corpus import BUILTIN_PREFIX, DataError, iter_documents, python_identity, source_files
from moe_dist.data.tokenizer import Tokenizer

FORMAT_VERSION = 2  # bump when the file layout changes, so old caches are rebuilt (2: unigram counts)
_ENCODE_CHARS = 1 << 20  # encode documents in batches of about this many characters


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def fingerprint(dataset: str, jsonl_field: str, tokenizer: Tokenizer) -> dict:
    """Everything that decides the token stream; equal fingerprints mean equal token files."""
    fp: dict = {"format": FORMAT_VERSION, "tokenizer": tokenizer.identity, "jsonl_field": jsonl_field}
    if dataset.startswith(BUILTIN_PREFIX):
        fp.update(dataset=dataset, python=python_identity())
        return fp
    root = Path(dataset)
    files = []
    for path in source_files(dataset):
        st = path.stat()
        name = path.relative_to(root).as_posix() if root.is_dir() else path.name
        files.append([name, st.st_size, st.st_mtime_ns])
    fp.update(dataset=str(root.resolve()), files=files)
    return fp


@dataclass
class TokenFile:
    """A tokenized corpus: `tokens` is a read-only memmap [n_tokens]; `reused` is False if just built."""

    bin_path: Path
    index: dict
    tokens: np.ndarray
    reused: bool

    @property
    def n_tokens(self) -> int:
        return self.index["n_tokens"]

    @property
    def doc_starts(self) -> list[int]:
        return self.index["doc_starts"]

    def split(self, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """(train, val): the last `val_fraction` of the token stream is validation."""
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"data.val_fraction: {val_fraction} must be in (0, 1)")
        n_val = max(1, round(self.n_tokens * val_fraction))
        n_train = self.n_tokens - n_val
        return self.tokens[:n_train], self.tokens[n_train:]


def _open(bin_path: Path, index: dict, reused: bool) -> TokenFile:
    tokens = np.memmap(bin_path, dtype=np.dtype(index["dtype"]), mode="r", shape=(index["n_tokens"],))
    return TokenFile(bin_path, index, tokens, reused)


def _load_if_current(index_path: Path, bin_path: Path, fp: dict) -> TokenFile | None:
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        return None  # absent or unreadable: rebuild
    if index.get("fingerprint") != fp:
        return None
    expected = index["n_tokens"] * np.dtype(index["dtype"]).itemsize
    if not bin_path.is_file() or bin_path.stat().st_size != expected:
        return None
    return _open(bin_path, index, reused=True)


def _batches(documents: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if chars >= _ENCODE_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _atomic_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def _write_tokens(documents: Iterator[str], tokenizer: Tokenizer, dtype: np.dtype, out: Path) -> tuple[int, list[int], np.ndarray]:
    """Stream doc0 eos doc1 eos ... into `out`; returns (n_tokens, document start offsets, count of each id)."""
    n_tokens, doc_starts = 0, []
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    with open(out, "wb") as f:
        for batch in _batches(documents):
            for ids in tokenizer.encode_batch(batch):
                doc_starts.append(n_tokens)
                arr = np.asarray(ids, dtype=dtype)
                f.write(arr.tobytes())
                f.write(eos.tobytes())
                counts += np.bincount(arr, minlength=len(counts))[:len(counts)]
                n_tokens += len(arr) + 1
        counts[tokenizer.eos_id] += len(doc_starts)
        f.flush()
        os.fsync(f.fileno())
    return n_tokens, doc_starts, counts


@contextlib.contextmanager
def _build_lock(lock_path: Path):
    """Let one process (say dp rank 0) build while the others wait, then reuse its file.

    Correctness does not depend on it: writes are atomic, so racing builders write equal files.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: every process may build; still correct
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_token_file(dataset: str, tokenizer: Tokenizer, cache_dir: str | os.PathLike,
                     jsonl_field: str = "text") -> TokenFile:
    """Tokenize `dataset` into cache_dir, or reuse the cached file when its fingerprint matches."""
    fp = fingerprint(dataset, jsonl_field, tokenizer)
    source = dataset if dataset.startswith(BUILTIN_PREFIX) else str(Path(dataset).resolve())
    key = _hash([source, jsonl_field, tokenizer.name])[:16]
    stem = f"{key}-{_hash(fp)[:16]}"
    cache = Path(cache_dir)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"data.cache_dir '{cache}': cannot create it ({e.strerror}); "
                        f"point data.cache_dir at a writable directory") from None
    index_path, bin_path = cache / f"{stem}.json", cache / f"{stem}.bin"

    with _build_lock(cache / f"{key}.lock"):
        found = _load_if_current(index_path, bin_path, fp)
        if found is not None:
            return found

        dtype = token_dtype(tokenizer.vocab_size)
        tmp_bin, tmp_index = _atomic_path(bin_path), _atomic_path(index_path)
        try:
            n_tokens, doc_starts, counts = _write_tokens(iter_documents(dataset, jsonl_field), tokenizer, dtype, tmp_bin)
            index = {"fingerprint": fp, "dtype": dtype.name, "n_tokens": n_tokens,
                     "n_documents": len(doc_starts), "doc_starts": doc_starts,
                     "eos_id": tokenizer.eos_id, "vocab_size": tokenizer.vocab_size,
                     "unigram_counts": counts.tolist()}
            tmp_index.write_text(json.dumps(index))
            # Tokens first, index last: an index on disk always describes a complete token file.
            os.replace(tmp_bin, bin_path)
            os.replace(tmp_index, index_path)
        finally:
            tmp_bin.unlink(missing_ok=True)
            tmp_index.unlink(missing_ok=True)

        for stale in cache.glob(f"{key}-*"):  # older versions of this source; open memmaps survive unlink
            if stale.stem != stem:
                stale.unlink(missing_ok=True)
    return _open(bin_path, index, reused=False)


_COUNT_CHUNK = 1 << 24  # tokens counted at a time: bincount widens to int64, so never the whole file at once


def token_counts(tokens, minlength: int = 0) -> np.ndarray:
    """How often each id occurs in `tokens` (any int array, e.g. a memmap slice), read a chunk at a time."""
    counts = np.zeros(minlength, dtype=np.int64)
    for start in range(0, len(tokens), _COUNT_CHUNK):
        part = np.bincount(np.asarray(tokens[start:start + _COUNT_CHUNK]), minlength=len(counts))
        if len(part) > len(counts):
            counts = np.concatenate([counts, np.zeros(len(part) - len(counts), dtype=np.int64)])
        counts += part
    return counts


def entropy_of_counts(counts: np.ndarray) -> float:
    """Entropy in NATS of the unigram distribution with these counts.

    With the byte tokenizer the tokens are the corpus bytes (plus eos), so this is the loss, in
    nats per byte, of the best model that ignores context: a validation loss (nats) below it shows
    the model learned more than byte frequencies. Divide by ln 2 for bits.
    """
    counts = counts[counts > 0]
    if counts.size == 0:
        raise DataError("unigram entropy: no tokens")
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def byte_unigram_entropy(tokens) -> float:
    """entropy_of_counts of `tokens`."""
    return entropy_of_counts(token_counts(tokens))
