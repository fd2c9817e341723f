"""Sample text from a model (moe_dist.train.model_dir.load_model loads one from any directory)."""
from __future__ import annotations

from typing import Optional

import torch

from moe_dist.config import Config
from moe_dist.data import Tokenizer, load_tokenizer
from moe_dist.model import MoETransformerLM, build_model
from moe_dist.model.transformer import KVCache


@torch.no_grad()
def sample(model: MoETransformerLM, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
           top_k: Optional[int] = None, vocab_limit: Optional[int] = None,
           generator: Optional[torch.Generator] = None) -> list[int]:
    """New token ids after `prompt_ids` (temperature 0 = greedy; top_k keeps the k likeliest).

    vocab_limit masks ids the tokenizer cannot decode (a model vocab padded beyond the tokenizer's).
    """
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, S]
    window = model.config.max_seq_len
    cache, fed = KVCache(len(model.layers)), 0  # fed: tokens of ids the cache has seen
    for _ in range(max_new_tokens):
        if ids.shape[1] <= window:  # each token computed once
            logits = model(ids[:, fed:], cache)[:, -1, :].float()  # [1, V]
            fed = ids.shape[1]
        else:  # past the context: a sliding window of the last max_seq_len tokens, recomputed
            logits = model(ids[:, -window:])[:, -1, :].float()
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[0, len(prompt_ids):].tolist()


def generate_text(model: MoETransformerLM, tokenizer: Tokenizer, prompt: str, max_new_tokens: int,
                  temperature: float = 1.0, top_k: Optional[int] = None, seed: int = 0) -> str:
    prompt_ids = tokenizer.encode(prompt) or [tokenizer.eos_id]  # an empty prompt starts a new document
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    new = sample(model, prompt_ids, max_new_tokens, temperature, top_k, tokenizer.vocab_size, gen)
    return tokenizer.decode(new)


def tokenizer_of(cfg: Config) -> Tokenizer:
    return load_tokenizer(cfg.data.tokenizer)
