"""`OffloadedModel`: wrap a transformers causal LM so its KV cache lives in the tiered store.

    om = OffloadedModel(model, device_budget="64MiB", mode="exact")
    out = om.generate(input_ids, attention_mask=mask, max_new_tokens=128)
    logits = om(input_ids, attention_mask=mask).logits
    print(om.stats)

Wrapping registers the "offload" attention and mask functions with transformers and switches
the model's `config._attn_implementation` to it; `unwrap()` (or leaving a `with` block) undoes
both exactly. Keyword arguments override `OFFLOAD_*` environment variables, which override
defaults.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from offload.config import OffloadConfig
from offload.hf import attention as hf_attention
from offload.hf.cache import OffloadCache, layout_from_model_config
from offload.hf.speculation import QueryPredictor, decoder_layers
from offload.stats import OffloadStats
from offload.store.tiered import device_slots_per_seq, minimum_device_budget

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(OffloadConfig)}


class OffloadedModel:
    def __init__(self, model: torch.nn.Module, config: OffloadConfig | None = None, **overrides: Any) -> None:
        if not hasattr(model, "config") or not hasattr(model, "generate"):
            raise TypeError(f"OffloadedModel wraps a transformers causal LM; got {type(model).__name__}")
        if getattr(model.config, "is_encoder_decoder", False):
            raise TypeError("OffloadedModel supports decoder-only causal LMs, not encoder-decoder models")
        if hasattr(model, "_can_set_attn_implementation") and not model._can_set_attn_implementation():
            raise TypeError(
                f"{type(model).__name__} does not route attention through transformers' AttentionInterface, "
                "so offload cannot take over its attention"
            )
        self.model = model
        self.config = config.replace(**overrides) if config is not None else OffloadConfig.from_env(**overrides)
        self.last_cache: OffloadCache | None = None
        self._user_cache: OffloadCache | None = None
        self._saved_attn: str | None = None
        self._predictor: QueryPredictor | None = None
        self._wrapped = False
        self.wrap()

    # wrapping ----------------------------------------------------------------------------------
    def wrap(self) -> "OffloadedModel":
        if not self._wrapped:
            hf_attention.register()
            self._saved_attn = self.model.config._attn_implementation
            self.model.config._attn_implementation = hf_attention.ATTN_NAME
            layers = decoder_layers(self.model)
            self._predictor = QueryPredictor(layers) if layers is not None else None
            self._wrapped = True
        return self

    def unwrap(self) -> torch.nn.Module:
        """Restore the model exactly as it was and return it."""
        if self._wrapped:
            self._release_last()
            if self._predictor is not None:
                self._predictor.remove()
                self._predictor = None
            self.model.config._attn_implementation = self._saved_attn
            hf_attention.unregister()
            self._wrapped = False
        return self.model

    def __enter__(self) -> "OffloadedModel":
        return self.wrap()

    def __exit__(self, *exc) -> None:
        self.unwrap()

    def _require_wrapped(self) -> None:
        if not self._wrapped:
            raise RuntimeError("this OffloadedModel was unwrapped; call wrap() before using it again")

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> "OffloadedModel":
        """Load a local transformers model directory and wrap it. OffloadConfig fields go to the
        wrapper, everything else (dtype=..., ...) to `AutoModelForCausalLM.from_pretrained`."""
        from transformers import AutoModelForCausalLM

        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in _CONFIG_FIELDS}
        config = kwargs.pop("offload_config", None)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        model.eval()
        return cls(model, config, **overrides)

    # caches ------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int | None = None, max_tokens: int = 0) -> OffloadCache:
        """A fresh cache for up to `max_tokens` tokens per sequence (padding included).

        With `batch_size`, the store is reserved now, so budget errors surface here."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r} must be >= 1")
        cache = OffloadCache(self.config, self.model.config, max_tokens, self._predictor)
        if batch_size is not None:
            cache.reserve(batch_size, self._kv_dtype(), self.model.device)
        return cache

    def minimum_device_budget(self, batch_size: int, max_tokens: int) -> int:
        """Smallest `device_budget` in bytes that holds sinks, recent windows, tails and page
        summaries of every layer for this batch (what `generate` checks before it starts)."""
        layout = layout_from_model_config(self.model.config, self.config.page_size, self._kv_dtype())
        return minimum_device_budget(self.config, layout, batch_size, max_tokens)

    def device_token_capacity(self, batch_size: int, max_tokens: int) -> int:
        """Tokens of complete pages the device budget holds per layer and sequence (beside the
        tail page): the largest `token_budget` whose pages can all be resident at once."""
        layout = layout_from_model_config(self.model.config, self.config.page_size, self._kv_dtype())
        slots = min(device_slots_per_seq(self.config, layout, batch_size, max_tokens), max_tokens // layout.page_size + 1)
        return max(0, slots - 1) * layout.page_size

    def _kv_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def stats(self) -> OffloadStats:
        """Stats of the last forward or generate call."""
        if self.last_cache is None:
            return OffloadStats(device_budget_bytes=self.config.device_budget)
        return self.last_cache.stats()

    # running -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """Forward pass with the same contract as the model's, prefilled in chunks of `prefill_chunk` tokens.

        Returns the model output with logits for every position; `past_key_values` is the OffloadCache.
        """
        self._require_wrapped()
        cache: OffloadCache | None = kwargs.pop("past_key_values", None)
        if cache is None:
            self._release_last()
            cache = self.new_cache(input_ids.shape[0], input_ids.shape[1])
        elif not isinstance(cache, OffloadCache):
            raise TypeError(f"past_key_values must be an OffloadCache from new_cache(); got {type(cache).__name__}")
        else:
            self._user_cache = cache
        position_ids = kwargs.pop("position_ids", None)
        self.last_cache = cache
        past = cache.get_seq_length()
        outputs, logits = None, []
        for start in range(0, input_ids.shape[1], self.config.prefill_chunk):
            end = min(start + self.config.prefill_chunk, input_ids.shape[1])
            chunk_kwargs = dict(kwargs)
            if attention_mask is not None:
                chunk_kwargs["attention_mask"] = attention_mask[:, : past + end]
            if position_ids is not None:
                chunk_kwargs["position_ids"] = position_ids[..., start:end]
            outputs = self.model(input_ids[:, start:end], past_key_values=cache, use_cache=True, **chunk_kwargs)
            logits.append(outputs.logits)
        outputs.logits = torch.cat(logits, dim=1)
        outputs.past_key_values = cache
        return outputs

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """`model.generate` with the KV cache in the tiered store. Budgets are checked before any token."""
        self._require_wrapped()
        if kwargs.get("past_key_values") is not None:
            raise ValueError("OffloadedModel.generate creates its own cache; do not pass past_key_values")
        generation_config = kwargs.get("generation_config") or self.model.generation_config
        max_new_tokens = kwargs.get("max_new_tokens", generation_config.max_new_tokens)
        if max_new_tokens is None:
            max_length = kwargs.get("max_length", generation_config.max_length)
            max_new_tokens = max(0, max_length - input_ids.shape[1])
        expand = max(
            kwargs.get("num_beams", generation_config.num_beams) or 1,
            kwargs.get("num_return_sequences", generation_config.num_return_sequences) or 1,
        )
        batch_size = input_ids.shape[0] * expand
        self._release_last()
        cache = self.new_cache(batch_size, input_ids.shape[1] + max_new_tokens)
        self.last_cache = cache
        kwargs.setdefault("prefill_chunk_size", self.config.prefill_chunk)
        start = time.perf_counter()
        out = self.model.generate(input_ids, attention_mask=attention_mask, past_key_values=cache, **kwargs)
        elapsed = time.perf_counter() - start
        sequences = out.sequences if hasattr(out, "sequences") else out
        cache.generated_tokens = (sequences.shape[1] - input_ids.shape[1]) * sequences.shape[0]
        cache.generate_s = elapsed
        cache.release()  # generate's cache is done: free its memory and threads, keep its stats
        return out

    def _release_last(self) -> None:
        """Free the cache of the previous call if this wrapper created it (a user's own cache is theirs)."""
        if self.last_cache is not None and self.last_cache is not self._user_cache:
            self.last_cache.release()
