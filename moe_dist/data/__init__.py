"""Data: corpus -> tokenizer -> cached token file -> packed windows -> dp-sharded batches.

    data = build_data(cfg.data, seq_len, seed, rank=dp_rank, world=dp, micro_batch_size=mbs)
    inputs, targets = data.train.next_batch()   # LongTensor [mbs, seq_len] each
    for inputs, targets in data.eval_batches(8): ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from moe_dist.config import DataConfig
from moe_dist.data.corpus import DataError, iter_documents
from moe_dist.data.dataset import BatchSampler, EvalSet, TokenDataset
from moe_dist.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer, train_tokenizer
from moe_dist.data.tokens import TokenFile, build_token_file, byte_unigram_entropy, entropy_of_counts, token_counts

__all__ = [
    "Data", "build_data", "DataError", "iter_documents", "load_tokenizer", "train_tokenizer",
    "byte_unigram_entropy", "Tokenizer", "ByteTokenizer", "HFTokenizer", "TokenDataset",
    "BatchSampler", "EvalSet", "TokenFile", "build_token_file",
]


@dataclass
class Data:
    tokenizer: Tokenizer
    vocab_size: int
    seq_len: int
    train: BatchSampler  # this rank's training batches; checkpoint train.state_dict()
    val: EvalSet
    token_file: TokenFile
    micro_batch_size: int

    def eval_batches(self, n: int, batch_size: Optional[int] = None):
        """n fixed validation batches for this rank (same every call); batch_size defaults to the micro batch."""
        return self.val.eval_batches(n, batch_size or self.micro_batch_size)

    def unigram_entropy(self) -> float:
        """Unigram entropy (nats) of the training tokens: the loss of a context-free model. From the counts
        stored with the token file, less those of the validation tokens (counted here, a chunk at a time)."""
        counts = np.asarray(self.token_file.index["unigram_counts"], dtype=np.int64)
        return entropy_of_counts(counts - token_counts(self.val.dataset.tokens, len(counts))[:len(counts)])


def build_data(data_cfg: DataConfig, seq_len: int, seed: int, rank: int = 0, world: int = 1,
               micro_batch_size: int = 8) -> Data:
    """Load the tokenizer, tokenize data_cfg.dataset once (cached in data_cfg.cache_dir), split, shard.

    `rank`/`world` are the data-parallel rank and size (not the global ones when tp/ep > 1).
    """
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    token_file = build_token_file(data_cfg.dataset, tokenizer, data_cfg.cache_dir, data_cfg.jsonl_field)
    train_tokens, val_tokens = token_file.split(data_cfg.val_fraction)
    train = BatchSampler(TokenDataset(train_tokens, seq_len), micro_batch_size, seed, rank, world)
    val = EvalSet(TokenDataset(val_tokens, seq_len), rank, world)
    return Data(tokenizer, tokenizer.vocab_size, seq_len, train, val, token_file, micro_batch_size)
