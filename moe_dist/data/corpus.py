"""Where text comes from: the built-in corpus, or the user's text / JSON-lines files.

A file is JSON lines, one record per line with the document in data.jsonl_field, when it ends in
.jsonl, .ndjson or .json (.json as Hugging Face datasets write it: JSON lines; one JSON array is
refused with the command that converts it); any other file is one plain-text document.

`iter_documents(dataset)` yields documents (strings). Bad data raises DataError with the file,
the line or byte offset, and a fix, so users never see a traceback from deep inside a parser.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator


class DataError(ValueError):
    """Unusable data or tokenizer; the message names the file (and line) and the fix."""


JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
BUILTIN_PREFIX = "builtin:"
BUILTINS = ("pydoc",)


def builtin_text(name: str) -> str:
    """The text of a built-in corpus; `pydoc` is CPython's bundled documentation (~0.5 MB)."""
    if name != "pydoc":
        raise DataError(f"dataset '{BUILTIN_PREFIX}{name}': unknown built-in corpus; "
                        f"use one of {', '.join(BUILTIN_PREFIX + b for b in BUILTINS)} or a file path")
    from pydoc_data.topics import topics  # dict: topic name -> English text

    # Sorted keys so the corpus (and its tokens) are identical on every run of one Python version.
    return "\n\n".join(topics[key] for key in sorted(topics))


def source_files(dataset: str) -> list[Path]:
    """The files behind `dataset` in reading order: [] for a built-in, one file, or a sorted tree."""
    if dataset.startswith(BUILTIN_PREFIX):
        return []
    path = Path(dataset)
    if not path.exists():
        raise DataError(f"dataset '{dataset}': no such file or directory; "
                        f"give a text/JSONL file, a directory of them, or {BUILTIN_PREFIX}pydoc")
    if path.is_file():
        return [path]
    # Hidden files and folders (.git, .DS_Store) are never training data.
    files = [p for p in path.rglob("*")
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


def _decode(path: Path, raw: bytes) -> str:
    """UTF-8 text of `raw`, or DataError naming the first bad byte."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path}: binary data (NUL byte at byte offset {nul}); "
                        f"only UTF-8 text and JSONL files can be used, remove or convert this file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (bad byte 0x{raw[e.start]:02x} at byte offset {e.start}); "
                        f"convert it to UTF-8 (for example `iconv -t utf-8`) or remove it") from None


def _jsonl_documents(path: Path, text: str, field: str) -> Iterator[str]:
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        raise DataError(f"{path}: one JSON array, but a {path.suffix} file is read as JSON lines (one object per line); "
                        f"convert it with `jq -c '.[]' {path} > {path.with_suffix('.jsonl')}`")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                            f"each line of a {path.suffix} file must be one JSON object like {{\"{field}\": \"...\"}} "
                            f"(JSON lines)") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}; "
                            f"write each line as {{\"{field}\": \"...\"}}")
        if field not in record:
            keys = ", ".join(sorted(record)) or "none"
            raise DataError(f"{where}: missing field '{field}' (keys: {keys}); "
                            f"add it, or set data.jsonl_field to the field that holds the text")
        doc = record[field]
        if not isinstance(doc, str):
            raise DataError(f"{where}: field '{field}' is {type(doc).__name__}, not a string; "
                            f"store the document text as a JSON string")
        if "\x00" in doc:
            # NUL is the byte tokenizer's end-of-document token, so it may not appear in text.
            raise DataError(f"{where}: field '{field}' contains a NUL character (\\u0000); remove it")
        if doc:
            yield doc


def _file_documents(path: Path, field: str) -> Iterator[str]:
    text = _decode(path, path.read_bytes())
    if path.suffix.lower() in JSONL_SUFFIXES:
        yield from _jsonl_documents(path, text, field)
    elif text.strip():
        yield text  # a plain text file is one document


def iter_documents(dataset: str, jsonl_field: str = "text") -> Iterator[str]:
    """Documents of `dataset`: `builtin:pydoc`, a text or JSON-lines file, or a directory of them (recursive).

    Path problems raise DataError at once; content problems raise it while iterating.
    """
    files = source_files(dataset)  # checks the path now, not at the first next()
    return _documents(dataset, files, jsonl_field)


def _documents(dataset: str, files: list[Path], field: str) -> Iterator[str]:
    if not files:
        if dataset.startswith(BUILTIN_PREFIX):
            yield builtin_text(dataset[len(BUILTIN_PREFIX):])
            return
        raise DataError(f"dataset '{dataset}': directory has no files; put .txt or .jsonl files in it")
    count = 0
    for path in files:
        for doc in _file_documents(path, field):
            count += 1
            yield doc
        if count == 0 and len(files) == 1:
            raise DataError(f"{path}: empty file (no text{' documents' if path.suffix.lower() in JSONL_SUFFIXES else ''}); "
                            f"put text in it or point data.dataset at another file")
    if count == 0:
        raise DataError(f"dataset '{dataset}': no documents in {len(files)} file(s) (all empty); "
                        f"add text to the files or point data.dataset elsewhere")


def python_identity() -> str:
    """Identifies the built-in corpus: its text is fixed for one Python build."""
    return f"{sys.implementation.name}-{sys.version}"
