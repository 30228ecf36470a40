"""`OffloadedModel`: wrap a transformers causal LM so its KV cache lives in a `KVStore`.

    om = OffloadedModel(model, device_budget="64MiB", mode="exact")
    out = om.generate(input_ids, attention_mask=mask, max_new_tokens=128)
    logits = om(input_ids, attention_mask=mask).logits
    print(om.stats)

The store lives as long as the wrapper: pages of finished requests stay cached by their token ids
(prefix reuse), a result's cache can be passed back as `past_key_values` (multi-turn), and
`close()` or `unwrap()` frees every pool. Wrapping registers the "offload" attention and mask
functions with transformers and switches the model's `config._attn_implementation` to it;
`unwrap()` (or leaving a `with` block) undoes both exactly. Keyword arguments override
`OFFLOAD_*` environment variables, which override defaults.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import threading
import time
import weakref
from typing import Any

import torch

from offload.config import OffloadConfig
from offload.hf import attention as hf_attention
from offload.hf import compat
from offload.hf.cache import OffloadCache
from offload.hf.layers import (
    prefills_whole,
    kv_sources,
    layer_chunks,
    layer_windows,
    layout_from_model_config,
    text_config,
)
from offload.hf.layer_inputs import LayerInputs, decoder_layers
from offload.prefetch.predictor import QueryPredictor
from offload.stats import OffloadStats
from offload.store import budget
from offload.store.kv_store import LOWER_TIERS_NEED_KV_ONLY, KVStore
from offload.store.page_table import CROP_MARGIN

logger = logging.getLogger("offload")
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(OffloadConfig)}
# model -> [its attention implementation before the first wrapper, live wrappers]: wrappers of one
# model may unwrap in any order; the last one restores the original.
_WRAPPED: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()
_NOT_COPYABLE = (
    "an OffloadedModel holds worker threads and memory pools, so it cannot be pickled or copied; "
    "save or copy the model itself (om.model, or om.unwrap()) and wrap the copy"
)


def _after_attention(layer_idx: int) -> None:
    """A decoder layer's attention is done (`LayerInputs`): the cache whose step this is may speculate."""
    cache = hf_attention.active_cache()
    if cache is not None:
        cache.after_attention(layer_idx)


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
        compat.check_config(model)
        self.model = model
        self.config = config.replace(**overrides) if config is not None else OffloadConfig.from_env(**overrides)
        if self.config.kv_sharing:
            kv_sources(model.config, self.config.kv_sharing)  # refuse a map this model cannot run, now
            logger.warning(
                "kv_sharing=%s: layers %s attend the KV of layers %s instead of their own. This model was not "
                "trained that way, so its outputs are an approximation of its own (docs/crosslayer.md)",
                self.config.kv_sharing, list(self.config.kv_sharing), list(self.config.kv_sharing.values()))
        # Recurrent and conv layers scan the prompt; chunking it changes their numerics (not their
        # math); a model whose layers attend a later layer's KV computes a prompt by iteration, which
        # chunking changes. Such models prefill in one pass, as their own forward does.
        self._chunked_prefill = not prefills_whole(model.config)
        if not self._chunked_prefill and (self.config.disk_dir is not None or self.config.remote_lenders):
            raise ValueError(LOWER_TIERS_NEED_KV_ONLY)
        self.store: KVStore | None = None
        self._lock = threading.RLock()  # one call at a time: the store serves one active request
        self._last_cache: weakref.ref[OffloadCache] | None = None
        self._last_stats: OffloadStats | None = None
        self._layer_inputs: LayerInputs | None = None
        self._predictor: QueryPredictor | None = None
        self._ids_hook = None
        self._wrapped = False
        self.wrap()
        if not model.training:  # (dropout would make any two runs differ; attention refuses it anyway)
            try:
                self._probe()
            except BaseException:
                self.unwrap()
                raise

    # wrapping ----------------------------------------------------------------------------------
    def wrap(self) -> "OffloadedModel":
        if not self._wrapped:
            hf_attention.register()
            entry = _WRAPPED.setdefault(self.model, [self.model.config._attn_implementation, 0])
            entry[1] += 1
            self.model.config._attn_implementation = hf_attention.ATTN_NAME
            layers = decoder_layers(self.model)
            if layers is not None:
                self._layer_inputs = LayerInputs(layers)
                self._layer_inputs.on_after_attention = _after_attention
                self._predictor = QueryPredictor(layers, self._layer_inputs)
            self._ids_hook = self.model.register_forward_pre_hook(_note_input_ids, with_kwargs=True)
            self._wrapped = True
        return self

    def _probe(self) -> None:
        """Refuse, now, a model whose outputs through offload would differ from its own (compat.probe)."""
        original = _WRAPPED[self.model][0]
        # Exact mode whatever the user's: the probe compares against the unwrapped model.
        config = self.config.replace(device_budget="1GiB", host_budget="1GiB", prefix_cache=False, mode="exact",
                                     token_budget=None, policy_effect="demote", disk_dir=None, disk_budget=None,
                                     remote_lenders=0, kv_sharing=None)
        store = self._new_store(config)

        def run_wrapped(ids: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                cache = OffloadCache(store, self.model.config, ids.shape[1], self._predictor)
                prefill = self._forward(cache, ids[:, :-1], None).logits
                decode = self._forward(cache, ids[:, -1:], None).logits  # one decode step too
                return torch.cat([prefill, decode], dim=1)

        try:
            compat.probe(self.model, run_wrapped,
                         unwrap=lambda: setattr(self.model.config, "_attn_implementation", original),
                         rewrap=lambda: setattr(self.model.config, "_attn_implementation", hf_attention.ATTN_NAME))
        finally:
            store.close()

    def unwrap(self) -> torch.nn.Module:
        """Free every pool, restore the model exactly as it was and return it."""
        if self._wrapped:
            self.close()
            if self._layer_inputs is not None:
                self._layer_inputs.remove()
                self._layer_inputs, self._predictor = None, None
            self._ids_hook.remove()
            entry = _WRAPPED[self.model]
            entry[1] -= 1
            if entry[1] == 0:  # the last wrapper of this model restores what the first one found
                self.model.config._attn_implementation = entry[0]
                del _WRAPPED[self.model]
            hf_attention.unregister()
            self._wrapped = False
        return self.model

    def close(self) -> None:
        """Release the KV store: every cache of this wrapper, the prefix cache, the worker threads.
        The wrapper stays usable; the next call starts an empty store."""
        with self._lock:
            if self.store is not None:
                if self._last_stats is None and self._last_cache is not None and self._last_cache() is not None:
                    self._last_stats = self._last_cache().stats()
                self.store.close()
                self.store = None

    def __reduce_ex__(self, protocol):
        raise TypeError(_NOT_COPYABLE)

    def __deepcopy__(self, memo):
        raise TypeError(_NOT_COPYABLE)

    def __copy__(self):
        raise TypeError(_NOT_COPYABLE)

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

    # the store and caches ----------------------------------------------------------------------
    def _store(self) -> KVStore:
        if self.store is None:
            self.store = self._new_store(self.config)
        return self.store

    def _new_store(self, config: OffloadConfig) -> KVStore:
        model_config = self.model.config
        sharing = config.kv_sharing
        store = KVStore(config, layout_from_model_config(model_config, config.page_size, self._kv_dtype(), sharing),
                        self.model.device, layer_windows(model_config, sharing), layer_chunks(model_config, sharing),
                        reusable_prefixes=not prefills_whole(model_config),
                        identity=model_identity(self.model) if config.disk_dir is not None else None)
        store.recompute = self._recompute
        return store

    def _recompute(self, request, b: int, first_page: int, end_page: int) -> None:
        """Recompute pages first_page..end_page - 1 of sequence b (a lower tier lost some): a
        forward over their tokens on top of the pages before them, whose results replace the lost
        pages in every layer. Pages before them that no longer exist (a sliding layer freed them)
        mean the forward starts from the first token."""
        ps = self.config.page_size
        if not request.positions_known:
            raise RuntimeError(
                f"sequence {b} lost pages {first_page}..{end_page - 1} in a lower tier, and they cannot be recomputed: "
                "its positions were not the tokens' indices (explicit position_ids or padding passed to the forward)")
        start = first_page if all(bool((t.page_ids[b, :first_page] >= 0).all()) for t in request.tables) else 0
        ids = request.token_ids[b, start * ps : end_page * ps]
        if bool((ids < 0).any()):
            raise RuntimeError(
                f"sequence {b} lost pages {first_page}..{end_page - 1} in a lower tier, and they cannot be recomputed: "
                "their token ids are unknown (the prompt was given as inputs_embeds)")
        store = self._store()
        scratch = store.recovery_request(request, b, start, end_page)
        try:
            cache = OffloadCache(store, self.model.config, end_page * ps, None)
            cache.adopt(scratch, start * ps)
            device = self.model.device
            positions = torch.arange(start * ps, end_page * ps, device=device)[None]
            extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}
            self._forward(cache, ids[None].to(device), None, logits=False, position_ids=positions, **extra)
            store.restore_from(request, b, scratch, first_page, end_page)
        finally:
            store.release(scratch)

    def new_cache(self, batch_size: int | None = None, max_tokens: int = 0) -> OffloadCache:
        """A fresh cache for up to `max_tokens` tokens per sequence (padding included).

        With `batch_size`, its pages are reserved now, so budget errors surface here."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r} must be >= 1")
        cache = OffloadCache(self._store(), self.model.config, max_tokens, self._predictor)
        if batch_size is not None:
            cache.open(batch_size)
        return cache

    def minimum_device_budget(self, batch_size: int, max_tokens: int) -> int:
        """Smallest `device_budget` in bytes that holds sinks, recent windows, tails and page
        summaries of every layer for this batch (what `generate` checks before it starts)."""
        sharing = self.config.kv_sharing
        layout = layout_from_model_config(self.model.config, self.config.page_size, self._kv_dtype(), sharing)
        return budget.minimum_device_budget(self.config, layout, batch_size, max_tokens,
                                            layer_windows(self.model.config, sharing),
                                            layer_chunks(self.model.config, sharing))

    def device_token_capacity(self, batch_size: int, max_tokens: int) -> int:
        """Tokens of complete pages the device budget holds per layer and sequence (beside the
        tail page): the largest `token_budget` whose pages can all be resident at once."""
        sharing = self.config.kv_sharing
        layout = layout_from_model_config(self.model.config, self.config.page_size, self._kv_dtype(), sharing)
        slots = min(budget.device_slots_per_seq(self.config, layout, batch_size, max_tokens,
                                                layer_windows(self.model.config, sharing),
                                                layer_chunks(self.model.config, sharing)),
                    max_tokens // layout.page_size + 1)
        return max(0, slots - 1) * layout.page_size

    def _kv_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def stats(self) -> OffloadStats:
        """Stats of the cache the last forward or generate call used (over that cache's life)."""
        cache = self._last_cache() if self._last_cache is not None else None
        if cache is not None and cache.request is not None and not cache.request.released:
            return cache.stats()
        if self._last_stats is not None:
            return self._last_stats
        return OffloadStats(device_budget_bytes=self.config.device_budget)

    def _track(self, cache: OffloadCache) -> None:
        self._last_cache = weakref.ref(cache)

    # running -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """Forward pass with the same contract as the model's, prefilled in chunks of `prefill_chunk` tokens.

        Returns the model output with logits for every position; `past_key_values` is the OffloadCache
        (pass it back to continue).
        """
        with self._lock:
            self._require_wrapped()
            _refuse_unsupported(kwargs)
            batch_size, length = _input_shape(input_ids, kwargs.get("inputs_embeds"))
            cache: OffloadCache | None = kwargs.pop("past_key_values", None)
            if cache is None:
                cache = self.new_cache(batch_size, length)
            else:
                self._check_own_cache(cache)
                if cache.request is None:
                    cache.open(batch_size)
                else:
                    cache.resume(cache.get_seq_length() + length)
            self._track(cache)
            if kwargs.get("position_ids") is not None or (attention_mask is not None and not bool(attention_mask.all())):
                # The model's own positions here count padding (or are the caller's): such pages are not
                # keyed by token ids alone, so they never enter the prefix cache.
                cache.positions_from_mask = False
            outputs = self._forward(cache, input_ids, attention_mask, **kwargs)
            # Answers once the caller drops the cache; without waiting for copies still running (a
            # decode loop's home copies overlap its next step; reading om.stats while the cache
            # lives waits for them).
            self._last_stats = cache.stats(flush=False)
            return outputs

    def _forward(self, cache: OffloadCache, input_ids, attention_mask, logits: bool = True, **kwargs):
        position_ids = kwargs.pop("position_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        kwargs.pop("use_cache", None)
        length = _input_shape(input_ids, embeds)[1]
        past = cache.get_seq_length()
        outputs, chunks = None, []
        step = self.config.prefill_chunk if self._chunked_prefill else max(1, length)
        for start in range(0, length, step):
            end = min(start + step, length)
            chunk_kwargs = dict(kwargs)
            if attention_mask is not None:
                chunk_kwargs["attention_mask"] = attention_mask[:, : past + end]
            if position_ids is not None:
                chunk_kwargs["position_ids"] = position_ids[..., start:end]
            if embeds is not None:
                chunk_kwargs["inputs_embeds"] = embeds[:, start:end]
            chunk_ids = input_ids[:, start:end] if input_ids is not None else None
            outputs = self.model(chunk_ids, past_key_values=cache, use_cache=True, **chunk_kwargs)
            if logits:
                chunks.append(outputs.logits)
        if logits:
            outputs.logits = torch.cat(chunks, dim=1)
        outputs.past_key_values = cache
        return outputs

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 past_key_values: OffloadCache | None = None, **kwargs: Any):
        """`model.generate` with the KV cache in the store. Budgets are checked before any token.

        Prompt pages already cached (an earlier request's, or another sequence's of this batch)
        are reused instead of prefilled. `past_key_values`: a cache an earlier call returned
        (`return_dict_in_generate=True`); `input_ids` then starts with that call's sequences.
        """
        with self._lock:
            self._require_wrapped()
            inputs = kwargs.pop("inputs", None)
            if inputs is not None:
                if input_ids is not None:
                    raise ValueError("pass the prompt as input_ids or as inputs, not both")
                input_ids = inputs
            _refuse_unsupported(kwargs)
            embeds = kwargs.get("inputs_embeds")
            prompt_batch, prompt_len = _input_shape(input_ids, embeds)
            generation_config = kwargs.get("generation_config") or self.model.generation_config
            max_new_tokens = self._max_new_tokens(generation_config, kwargs, prompt_len)
            expand = max(
                kwargs.get("num_beams", generation_config.num_beams) or 1,
                kwargs.get("num_return_sequences", generation_config.num_return_sequences) or 1,
            )
            batch_size = prompt_batch * expand
            # Assisted and prompt-lookup decoding verify candidates past the last kept token.
            lookahead = kwargs.get("prompt_lookup_num_tokens", generation_config.prompt_lookup_num_tokens) or 0
            if kwargs.get("assistant_model") is not None:
                lookahead = max(lookahead, kwargs.get("num_assistant_tokens", generation_config.num_assistant_tokens) or 20)
            max_tokens = prompt_len + max_new_tokens + (lookahead + 1 if lookahead else 0)
            if lookahead and past_key_values is not None:
                raise ValueError(
                    "assisted and prompt-lookup decoding re-forward the whole prompt on their first step, so they "
                    "cannot continue a cache (transformers' own caches give wrong results there too); call generate "
                    "without past_key_values"
                )
            if attention_mask is None:  # generate derives positions from it; a prefix hit slices by it
                attention_mask = torch.ones(prompt_batch, prompt_len, dtype=torch.long, device=self.model.device)
            if past_key_values is not None:
                cache = self._continued_cache(past_key_values, batch_size, max_tokens)
            elif embeds is not None or lookahead:
                # Embeddings: no token ids to match by. Assisted decoding: its first forward ignores a
                # cache that already holds the prompt's start, so nothing may be skipped.
                cache = self.new_cache(max_tokens=max_tokens)
                # A rejected lookahead is cropped: sliding and chunked layers keep that much beyond their span
                # (an assistant model's lookahead can grow up to the new tokens).
                margin = max_new_tokens + lookahead + 1 if kwargs.get("assistant_model") is not None else lookahead + 1
                cache.open(batch_size, crop_margin=CROP_MARGIN + margin)
            else:
                cache = self._open_cache(input_ids, attention_mask, expand, max_tokens)
            self._track(cache)
            if embeds is None and self._chunked_prefill:  # transformers' chunked prefill slices input_ids only
                kwargs.setdefault("prefill_chunk_size", self.config.prefill_chunk)
            start = time.perf_counter()
            out = self.model.generate(input_ids, attention_mask=attention_mask, past_key_values=cache, **kwargs)
            elapsed = time.perf_counter() - start
            sequences = out.sequences if hasattr(out, "sequences") else out
            returned_prompt = input_ids.shape[1] if input_ids is not None else 0  # embeds: new tokens only
            cache.generated_tokens = (sequences.shape[1] - returned_prompt) * sequences.shape[0]
            cache.generate_s = elapsed
            if cache.positions_from_mask:
                self.store.cache_prefix(cache.request)
            self._last_stats = cache.stats()  # before parking: the residency the run ended with
            cache.park(keep_cached=True)  # pages stay for a continuation; device copies of cached ones too
            return out

    def _max_new_tokens(self, generation_config, kwargs: dict, prompt_len: int) -> int:
        """How many tokens `generate` may add, resolved as transformers does (max_new_tokens, then
        max_length, then its model-agnostic default of max_length new tokens, capped by the positions)."""
        max_new_tokens = kwargs.get("max_new_tokens", generation_config.max_new_tokens)
        if max_new_tokens is not None:
            return max_new_tokens
        max_length = kwargs.get("max_length", generation_config.max_length)
        if max_length is not None:
            return max(0, max_length - prompt_len)
        defaults = getattr(generation_config, "_get_default_generation_params", lambda: {})()
        total = prompt_len + (defaults.get("max_length") or 20)
        positions = getattr(text_config(self.model.config), "max_position_embeddings", None)
        return max(0, (min(total, positions) if positions else total) - prompt_len)

    def _check_own_cache(self, cache) -> None:
        if not isinstance(cache, OffloadCache):
            raise TypeError(f"past_key_values must be an OffloadCache from this OffloadedModel; got {type(cache).__name__}")
        if cache.store is not self.store or self.store is None:
            raise ValueError("past_key_values belongs to another OffloadedModel or to a closed store")

    def _continued_cache(self, cache, batch_size: int, max_tokens: int) -> OffloadCache:
        self._check_own_cache(cache)
        if cache.request is None:
            cache.max_tokens = max(cache.max_tokens, max_tokens)
            cache.open(batch_size)
        elif cache.batch_size != batch_size:
            raise ValueError(
                f"past_key_values holds {cache.batch_size} sequences; this call generates {batch_size} "
                "(batch size x num_beams / num_return_sequences must match)"
            )
        else:
            cache.resume(max_tokens)
        return cache

    def _open_cache(self, input_ids, attention_mask, expand: int, max_tokens: int) -> OffloadCache:
        """A cache for this call, starting from the longest prompt prefix already stored."""
        cache = self.new_cache(max_tokens=max_tokens)
        if self.store.tree is None:  # prefix cache off
            cache.open(input_ids.shape[0] * expand)
            return cache
        rows = [input_ids[b][attention_mask[b].bool()].tolist() for b in range(input_ids.shape[0])]
        pads = [input_ids.shape[1] - len(row) for row in rows]
        self._prefill_shared_prefixes(rows, expand)
        cache.open(input_ids.shape[0] * expand, [r for r in rows for _ in range(expand)],
                   [p for p in pads for _ in range(expand)])
        return cache

    def _prefill_shared_prefixes(self, rows: list[list[int]], expand: int) -> None:
        """Prefill once, into the prefix cache, the whole pages of prompt that several sequences of
        this call share: each prompt's own when it is expanded (beams, num_return_sequences), and
        the common prefixes of different prompts."""
        ps = self.config.page_size
        tree = self._store().tree
        wanted: list[list[int]] = []
        for i, row in enumerate(rows):
            limit = (len(row) - 1) // ps * ps  # generate forwards at least the last token itself
            if expand > 1:
                shared = limit
            else:
                shared = max((_common_prefix(row, other) for j, other in enumerate(rows) if j != i), default=0)
                shared = min(shared // ps * ps, limit)
            if shared >= ps and len(tree.match(row[:shared])) * ps < shared:
                wanted.append(row[:shared])
        wanted.sort(key=len, reverse=True)
        distinct: list[list[int]] = []
        for prefix in wanted:
            if not any(kept[: len(prefix)] == prefix for kept in distinct):
                distinct.append(prefix)
        if not distinct:
            return
        length = max(len(p) for p in distinct)
        ids = torch.zeros(len(distinct), length, dtype=torch.long)
        mask = torch.zeros(len(distinct), length, dtype=torch.long)
        for b, prefix in enumerate(distinct):
            ids[b, length - len(prefix):] = torch.tensor(prefix)
            mask[b, length - len(prefix):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate uses: index among real tokens
        device = self.model.device
        cache = self.new_cache(max_tokens=length)
        try:
            cache.open(len(distinct))
        except ValueError:
            cache.release()
            return  # too big to share up front: each sequence prefills its own copy
        try:
            extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}
            self._forward(cache, ids.to(device), mask.to(device), logits=False, position_ids=positions.to(device), **extra)
            self.store.cache_prefix(cache.request)
        finally:
            cache.release()


def model_identity(model: torch.nn.Module) -> str:
    """A fingerprint of the model's config and weights (their names, shapes, dtypes and a strided
    sample of each tensor's values): pages written to disk by one model are never read by another."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            if tensor.device.type == "meta" or tensor.numel() == 0:
                continue
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)][:256]
            digest.update(sample.to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()


def _input_shape(input_ids, inputs_embeds) -> tuple[int, int]:
    """(batch, tokens) of the prompt, given as ids or embeddings."""
    if inputs_embeds is not None:
        return int(inputs_embeds.shape[0]), int(inputs_embeds.shape[1])
    if input_ids is None:
        raise ValueError("pass the prompt as input_ids (or inputs / inputs_embeds)")
    return int(input_ids.shape[0]), int(input_ids.shape[1])


def _refuse_unsupported(kwargs: dict) -> None:
    if kwargs.get("use_cache") is False:
        raise ValueError(
            "use_cache=False: OffloadedModel exists to keep the KV cache (in its store), so there is nothing to "
            "offload without one; call the unwrapped model (om.unwrap(), or a copy) for cache-free forwards"
        )
    if kwargs.get("output_attentions"):
        raise ValueError(
            "output_attentions=True is not supported: split attention never forms the attention matrix (the "
            "host part runs page by page); call the unwrapped model to inspect attention weights"
        )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _note_input_ids(module, args, kwargs) -> None:
    """Forward pre-hook: hand the step's token ids to the cache, which keeps them per page."""
    cache = kwargs.get("past_key_values")
    if isinstance(cache, OffloadCache):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache.pending_input_ids = ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
