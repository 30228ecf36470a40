"""Tiny random-init Llamas for the cross-layer tests (exactness holds whatever the weights)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def tiny_llama(num_layers: int = 4, kv_heads: int = 2, heads: int = 4, head_dim: int = 16, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=heads * head_dim, intermediate_size=128,
                         num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=1024, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def token_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
