"""Shared fixtures: tiny random-init transformers models (exact mode must match whatever the weights)."""

from __future__ import annotations

import functools

import pytest
import torch

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=4096,
)

# family name -> (config class, model class, num_key_value_heads)
FAMILIES = {
    "llama-mha": ("LlamaConfig", "LlamaForCausalLM", 4),
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", 2),
    "mistral": ("MistralConfig", "MistralForCausalLM", 2),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", 1),
}


@functools.lru_cache(maxsize=None)
def tiny_model(family: str, dtype: torch.dtype = torch.float32):
    import transformers

    config_cls, model_cls, num_kv_heads = FAMILIES[family]
    torch.manual_seed(1234)
    config = getattr(transformers, config_cls)(num_key_value_heads=num_kv_heads, **TINY)
    model = getattr(transformers, model_cls)(config).eval().to(dtype)
    return model


def make_batch(batch_size: int, length: int, seed: int = 0):
    """Token ids [B, length] and a left-padded mask: row b > 0 has b * length // 4 padding tokens (at least one real)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY["vocab_size"], (batch_size, length), generator=gen)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    for b in range(1, batch_size):
        mask[b, : min(length - 1, b * length // 4)] = 0
    return ids, mask


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray session on loopback for one test module (the `distributed` extra, installed by make)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             logging_level="warning")
    yield
    ray.shutdown()


@pytest.fixture
def llama():
    return tiny_model("llama-gqa")
