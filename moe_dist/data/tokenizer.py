"""Tokenizers behind one small interface: bytes (default) or a local Hugging Face tokenizer.json."""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Iterable

from moe_dist.data.corpus import DataError

EOS_TOKEN = "<|endoftext|>"
# Tried in order when a tokenizer.json has no <|endoftext|> (Llama, T5 style files).
_EOS_FALLBACKS = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>")


class Tokenizer:
    """What the data pipeline and the trainer need from a tokenizer."""

    vocab_size: int
    eos_id: int  # separates documents in the token stream
    name: str  # "byte" or the tokenizer.json path: which cache entry this tokenizer owns
    identity: str  # changes whenever the text -> ids mapping changes (part of the cache key)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255. Byte 0 (NUL) is the end-of-document id: the corpus rejects NUL."""

    vocab_size = 256
    eos_id = 0
    name = "byte"
    identity = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # A model may emit a cut multi-byte character; show it as U+FFFD rather than fail.
        return bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json loaded from a local file."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _HFTok

        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer '{path}': no such file; give a tokenizer.json "
                            f"(make one with `moe-dist tokenize`) or use byte")
        try:
            self._tok = _HFTok.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception with a serde message
            raise DataError(f"tokenizer '{path}': not a Hugging Face tokenizer.json ({e}); "
                            f"make one with `moe-dist tokenize` or use byte") from None
        self.path = path
        self.name = str(path.resolve())
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos = next((i for i in map(self._tok.token_to_id, _EOS_FALLBACKS) if i is not None), None)
        if eos is None:
            raise DataError(f"tokenizer '{path}': no end-of-text token ({', '.join(_EOS_FALLBACKS)}); "
                            f"documents need one between them, add {EOS_TOKEN} as a special token "
                            f"or retrain with `moe-dist tokenize`")
        self.eos_id = eos
        self.identity = "hf:" + hashlib.sha256(path.read_bytes()).hexdigest()

    def encode(self, text: str) -> list[int]:
        # No post-processor BOS/EOS: the token file inserts eos itself, once per document.
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(spec: str) -> Tokenizer:
    """`byte`, or a path to a tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def train_tokenizer(documents: Iterable[str], vocab_size: int, out_path: str | os.PathLike) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style, offline) on `documents`; save tokenizer.json atomically."""
    from tokenizers import Tokenizer as _HFTok, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 byte symbols: any text stays encodable
    if vocab_size < len(alphabet) + 1:
        raise DataError(f"vocab_size {vocab_size} is too small for a byte-level BPE; "
                        f"use at least {len(alphabet) + 1} (256 bytes + {EOS_TOKEN})")
    tok = _HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(documents, trainer=trainer)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tok.save(str(tmp))
        os.replace(tmp, out_path)  # a crash never leaves a half-written tokenizer.json
    finally:
        tmp.unlink(missing_ok=True)
    return HFTokenizer(out_path)
