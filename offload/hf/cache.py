"""`OffloadCache`: a transformers `Cache` whose layers are one request's page tables in a `KVStore`.

Positions are logical: `get_seq_length()` counts every token seen, padding included, exactly as
transformers' DynamicCache does, whether the token's page is on the device, on the host or both.
A cache outlives the `generate` call that filled it: passed back as `past_key_values`, it
continues (multi-turn); `crop` removes its last tokens (assisted decoding). It holds its pages
until `release()` or until it is garbage collected.
"""

from __future__ import annotations

import time
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DummyLayer

from offload.config import OffloadConfig
from offload.hf.layers import STORE_KINDS, cache_layer_types, kv_sources
from offload.hf.attention import set_active_cache
from offload.kernels.merge import merge_partials
from offload.kernels.torch_ref import dense_attention
from offload.stats import OffloadStats
from offload.store.kv_store import KVStore
from offload.store.planner import MAX_DECODE_QUERY, new_positions
from offload.store.request import Request


class OffloadLayer(CacheLayerMixin):
    """One layer's view of the cache, for transformers' bookkeeping."""

    is_compileable = False
    is_sliding = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, cache: "OffloadCache", layer_idx: int) -> None:
        super().__init__()
        self._cache = weakref.ref(cache)  # no cycle: a dropped cache is freed at once
        self.layer_idx = layer_idx
        self.seen = 0  # tokens this layer has processed, padding included

    @property
    def cache(self) -> "OffloadCache":
        return self._cache()

    def lazy_initialization(self, key_states, value_states) -> None:  # pragma: no cover - nothing to do
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.cache.stage(self.layer_idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.cache.reorder_layer(self.layer_idx, beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove; got {tokens_to_remove}")
        removed = min(-tokens_to_remove, self.seen)
        if removed:
            self.cache.crop_layer(self.layer_idx, removed)
            self.seen -= removed

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("OffloadCache cannot change its batch size after prefill")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("OffloadCache cannot change its batch size after prefill")

    def reset(self) -> None:
        raise NotImplementedError("OffloadCache cannot be reset; create a new one with OffloadedModel.new_cache")


class ConsumerLayer(DummyLayer):
    """A layer that reads another layer's KV by `kv_sharing`: it keeps nothing. The model's attention
    still computes this layer's keys and values and hands them to `update`, which returns them
    untouched; the attention function then attends the producer's stored KV instead."""

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states


class OffloadCache(Cache):
    """KV cache of one batch in a model's `KVStore`: opened on first use (or by `open`), then
    prefilled and decoded; parked between calls, released when done or garbage collected."""

    def __init__(self, store: KVStore, model_config, max_tokens: int, predictor=None) -> None:
        self.store = store
        self.config: OffloadConfig = store.config
        self.predictor = predictor  # QueryPredictor, or None: speculate from the previous step's queries
        self.model_config = model_config
        self.max_tokens = max_tokens
        self.request: Request | None = None
        # Attention layers are views of the store; recurrent, conv and attention-free layers keep
        # their state in transformers' own layer classes, as DynamicCache would.
        from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING

        sharing = self.config.kv_sharing  # configured sharing (a model that declares none)
        types, kwargs = cache_layer_types(model_config, sharing)
        self.store_index: dict[int, int] = {}  # decoder layer -> store layer
        layers = []
        for i, (kind, kw) in enumerate(zip(types, kwargs)):
            if kind in STORE_KINDS:
                self.store_index[i] = len(self.store_index)
                layers.append(OffloadLayer(self, i))
            elif sharing and i in sharing:
                layers.append(ConsumerLayer())
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kw))
        self.attention_idx = sorted(self.store_index)
        self.kv_source = kv_sources(model_config, sharing)  # consumer layer -> producer layer (cross-layer KV sharing)
        # Declared sharing hands a consumer its producer's keys; configured sharing its own (unused) ones.
        self.consumers_compute_kv = bool(sharing)
        self._produced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # producer -> (its new keys, their positions)
        super().__init__(layers=layers)
        self._staged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._last_query: dict[int, torch.Tensor] = {}
        self._speculating = False  # this forward is a decode step that speculates
        self.pending_input_ids: torch.Tensor | None = None  # set by OffloadedModel's forward hook
        # True while every stored token sits at its index among the real tokens (generate's
        # positions): only then may its pages enter the prefix cache.
        self.positions_from_mask = True
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self.tokens_prefilled = 0
        self.generated_tokens = 0  # set by OffloadedModel.generate from its output
        self._final_stats: OffloadStats | None = None
        self._forward_start = 0.0

    # transformers' Cache API ------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        if layer_idx not in self.store_index:  # a state layer: the attention layers count positions
            layer_idx = self.attention_idx[0]
        return self.layers[layer_idx].seen

    @property
    def batch_size(self) -> int:
        return self.request.batch_size if self.request is not None else -1

    # lifetime ----------------------------------------------------------------------------
    def open(self, batch_size: int, rows=None, pads=None, crop_margin: int | None = None) -> int:
        """Open this cache's request in the store (budgets are checked here); with `rows`/`pads`,
        from the longest cached prefix. `crop_margin`: tokens sliding and chunked layers keep for
        `crop` beyond what they attend (assisted decoding: its lookahead). Returns how many
        leading positions are already stored."""
        if self.request is not None:
            if self.request.batch_size != batch_size:
                raise ValueError(f"this cache was reserved for batch size {self.request.batch_size}, got {batch_size}")
            return 0
        self.request, skip = self.store.open(batch_size, self.max_tokens, rows, pads, crop_margin)
        weakref.finalize(self, self.store.release_later, self.request)
        for i in self.attention_idx:
            self.layers[i].seen = skip
        return skip

    def adopt(self, request: Request, stored: int) -> None:
        """Serve an open request of this store that already holds `stored` positions per sequence
        (recomputing lost pages: a request holding the pages before them)."""
        if self.request is not None:
            raise RuntimeError("this cache already serves a request")
        self.request = request
        for i in self.attention_idx:
            self.layers[i].seen = stored

    def resume(self, max_tokens: int) -> None:
        """Continue this cache for up to `max_tokens` tokens per sequence (its device memory back)."""
        self._require_open()
        self.max_tokens = max(self.max_tokens, max_tokens)
        self.store.activate(self.request, self.max_tokens)

    def park(self, keep_cached: bool = False) -> None:
        """Give the device memory back between calls; the pages stay, on the host (and, with
        `keep_cached`, the device copies of prefix-cached pages stay for the next request)."""
        if self.request is not None and not self.request.released:
            self.store.park(self.request, keep_cached)

    def release(self) -> None:
        """Give every page back; `stats()` keeps answering from a snapshot."""
        if self.request is not None and self._final_stats is None:
            self._final_stats = self.stats()
            with torch.inference_mode():  # the pools were made under it; may be called outside it
                self.request.release()

    def _require_open(self) -> None:
        if self.request is None:
            raise RuntimeError("this cache holds no tokens yet")
        if self.request.released:
            raise RuntimeError("this cache was released; its pages are gone (create a new one)")

    # the two halves of a layer's step ----------------------------------------------------------
    def stage(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        first = layer_idx == self.attention_idx[0]
        if self.request is None:
            self.open(key_states.shape[0])
        elif first:
            self._require_open()
            if self.store.active is not self.request:
                self.store.activate(self.request)
        if first:
            self._forward_start = time.perf_counter()
        self._staged[layer_idx] = (key_states, value_states)
        set_active_cache(self)
        return key_states, value_states

    def has_staged(self, layer_idx: int) -> bool:
        return layer_idx in self._staged

    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scale: float,
        window: int | None = None,
        chunk: int | None = None,
        softcap: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of the new queries over everything stored and the new tokens, then store them.
        Returns out [B, H, T, D] float32 and lse [B, H, T] float32."""
        staged, _ = self._staged.pop(layer_idx)
        if key_states is not staged and (key_states.shape[0] != staged.shape[0] or key_states.shape[2] != staged.shape[2]):
            raise RuntimeError(
                f"layer {layer_idx}: attention was given keys for {tuple(key_states.shape)} tokens, but update() stored "
                f"{tuple(staged.shape)}; offload stores per token what attention receives, and these do not correspond"
            )
        # What attention receives is what the store keeps (multi-head latent attention caches latents
        # in update() and expands them per token before attention).
        query, keys, values, value_dim = self._fit_head_dim(query, key_states, value_states)
        layer = self.layers[layer_idx]
        q_len = keys.shape[2]
        store_layer = self.store_index[layer_idx]
        table = self.request.tables[store_layer]
        self._check_window(store_layer, window, layer.seen + q_len, chunk)
        valid = self._new_token_mask(attention_mask, keys.shape[0], q_len, layer.seen, table.length)
        last = layer_idx == self.attention_idx[-1]
        if layer_idx in self.kv_source.values():  # a later layer reads these keys: remember where they went
            self._produced[layer_idx] = (key_states, new_positions(table, valid))
        if layer_idx == self.attention_idx[0]:
            if not self.positions_from_mask:  # (then pages lost by a lower tier cannot be recomputed)
                self.request.positions_known = False
            ids = self.pending_input_ids
            self.request.record_tokens(valid, ids if ids is not None and ids.shape == valid.shape else None)
        speculate = self.config.speculates and q_len <= MAX_DECODE_QUERY
        self._speculating = speculate
        if speculate:
            self._last_query[layer_idx] = query
            if self.predictor is None or not self.predictor.after_attention:
                self._speculate_next(layer_idx)  # (else once this layer's attention is done: after_attention)
        out, lse = self.store.attend(self.request, store_layer, query, keys, values, valid, scale, return_lse=True,
                                     softcap=softcap, has_readers=layer_idx in self._produced)
        if speculate and last:
            # The next step's first layer: its query now is the best guess for its query then.
            if self.store.speculation_due(self.request, 0):
                self.store.speculate(self.request, 0, self._last_query[self.attention_idx[0]])
        layer.seen += q_len
        if value_dim is not None:
            out = out[..., :value_dim]
        if last:
            self.pending_input_ids = None
            elapsed = time.perf_counter() - self._forward_start
            if q_len > 1:
                self.prefill_s += elapsed
                self.tokens_prefilled += int(valid.sum())
            else:
                self.decode_s += elapsed
        return out, lse

    def is_consumer(self, layer_idx: int) -> bool:
        return layer_idx in self.kv_source

    def attend_shared(self, layer_idx: int, query: torch.Tensor, key_states: torch.Tensor, scale: float,
                      window: int | None = None, chunk: int | None = None,
                      softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of a layer that reads another layer's KV (cross-layer sharing): over the
        producer's stored pages, at the positions the producer stored its new tokens, appending
        nothing. Returns out [B, H, T, D] and lse [B, H, T] float32."""
        producer = self.kv_source[layer_idx]
        produced = self._produced.get(producer)
        if self.consumers_compute_kv:  # its own new keys: they must be this step's tokens, as the producer's
            same_step = produced is not None and key_states.shape[0] == produced[0].shape[0] and \
                key_states.shape[2] == produced[0].shape[2]
        else:
            same_step = produced is not None and produced[0] is key_states
        if not same_step:
            raise RuntimeError(
                f"layer {layer_idx} shares layer {producer}'s KV, but the keys it attends are not the ones layer "
                f"{producer} stored in this forward pass"
            )
        store_layer = self.store_index[producer]
        positions = produced[1]
        self._check_window(store_layer, window, self.layers[producer].seen, chunk)
        return self.store.attend_stored(self.request, store_layer, query, positions, scale, softcap)

    def attend_outside(self, kv_layer: int, query: torch.Tensor, chunk: tuple[torch.Tensor, torch.Tensor] | None,
                       padding: torch.Tensor | None, scale: float, diagonal: bool) -> torch.Tensor:
        """Attention over `kv_layer`'s KV from outside the store's own step: a layer attending a later
        layer's KV (`diagonal=False`), or a pass of a prompt's iteration that must not store
        (offload.models.shared_kv). Every stored token of `kv_layer` precedes these queries; `chunk`
        (keys, values [B, H_kv, T, D]) are this forward's tokens of `kv_layer`, not stored, attended
        causally, with or without the diagonal. `padding` [B, seen + T] marks real tokens (None:
        all). The two parts merge by log-sum-exp. Returns [B, T, H, D] in the query's dtype."""
        batch, _, length, _ = query.shape
        if self.request is None:  # (the model's first layer reads a later one's KV)
            self.open(batch)
        else:
            self._require_open()
        valid = (padding[:, -length:].to(device="cpu", dtype=torch.bool) if padding is not None
                 else torch.ones(batch, length, dtype=torch.bool))
        store_layer = self.store_index[kv_layer]
        stored = torch.tensor(self.request.tables[store_layer].length, dtype=torch.long)
        last = (stored - 1)[:, None].expand(batch, length)  # every stored token is visible; -1: none stored
        query_pos = torch.where(valid & (last >= 0), last, torch.full_like(last, -1))
        out, lse = self.store.attend_stored(self.request, store_layer, query, query_pos.to(query.device), scale)
        if chunk is not None:
            rows = torch.arange(length, device=query.device)
            causal = (rows[None, :] <= rows[:, None]) if diagonal else (rows[None, :] < rows[:, None])
            visible = causal[None] & valid.to(query.device)[:, None, :]
            chunk_out, chunk_lse = dense_attention(query, *chunk, visible, scale)
            out, lse = merge_partials(out.float(), lse.float(), chunk_out, chunk_lse)
        return out.transpose(1, 2).to(query.dtype)

    def _fit_head_dim(self, query, keys, values):
        """Zero-pad query, keys and values to the store's head size (keys and values of different
        sizes: multi-head latent attention). Returns them and the value size to cut the output back
        to (None when nothing was padded)."""
        dim = self.store.layout.head_dim
        if keys.shape[-1] == dim and values.shape[-1] == dim:
            return query, keys, values, None
        if max(keys.shape[-1], values.shape[-1]) > dim or query.shape[-1] != keys.shape[-1]:
            raise RuntimeError(
                f"attention head sizes (query {query.shape[-1]}, keys {keys.shape[-1]}, values {values.shape[-1]}) do "
                f"not fit the store's {dim}"
            )
        pad = torch.nn.functional.pad
        return (pad(query, (0, dim - query.shape[-1])), pad(keys, (0, dim - keys.shape[-1])),
                pad(values, (0, dim - values.shape[-1])), values.shape[-1])

    def _check_window(self, store_layer: int, window: int | None, tokens: int, chunk: int | None = None) -> None:
        """The window (chunk) this call asks for must be the one the store keeps for the layer
        (they only differ harmlessly while every key fits both)."""
        layer_idx = self.attention_idx[store_layer]
        for kind, asked_for, kept in (("sliding_window", window, self.store.windows[store_layer]),
                                      ("attention_chunk_size", chunk, self.store.chunks[store_layer])):
            asked = asked_for if asked_for is not None and tokens > asked_for else None
            applied = kept if kept is not None and tokens > kept else None
            if asked != applied:
                raise NotImplementedError(
                    f"layer {layer_idx} attends with {kind}={asked_for} but the model's config declares {kept} for it "
                    f"(layer_types / {kind}), and {tokens} tokens make the difference matter; offload sizes each layer's "
                    "store from the config, so it refuses rather than attend the wrong span"
                )

    def after_attention(self, layer_idx: int) -> None:
        """Layer l's attention is done and its residual captured (`LayerInputs`): speculate layer l+1
        from it, so the copies overlap layer l's MLP."""
        if self._speculating and self.request is not None and layer_idx in self.store_index:
            self._speculate_next(layer_idx)

    def _speculate_next(self, layer_idx: int) -> None:
        """Issue layer l+1's likely pages now, so the copies overlap layer l's compute."""
        position = self.attention_idx.index(layer_idx) + 1
        if position >= len(self.attention_idx):
            return
        nxt = self.attention_idx[position]  # the next attention layer
        if not self.store.speculation_due(self.request, position):
            return
        predicted = self.predictor.predict(layer_idx, nxt) if self.predictor is not None else None
        if predicted is None:
            predicted = self._last_query.get(nxt)  # no predictor: that layer's query one step ago
        if predicted is not None:
            self.store.speculate(self.request, position, predicted)

    def reorder_layer(self, layer_idx: int, beam_idx: torch.Tensor) -> None:
        if self.request is not None:
            table = self.request.tables[self.store_index[layer_idx]]
            self.store.residency.complete_copies(table)
            table.select(beam_idx)
            if layer_idx == self.attention_idx[0]:  # the token ids follow their pages (once per reorder)
                self.request.token_ids = self.request.token_ids[beam_idx.long().cpu()]

    def crop_layer(self, layer_idx: int, removed: int) -> None:
        """Drop the last `removed` positions of one layer (padding only ever leads, so they are stored tokens)."""
        table = self.request.tables[self.store_index[layer_idx]]
        if table.on_device:
            self.store.residency.complete_copies(table)
        for b in range(table.batch_size):
            table.crop(b, max(0, table.length[b] - removed))

    @staticmethod
    def _new_token_mask(attention_mask, bsz: int, q_len: int, seen: int, stored: list[int]) -> torch.Tensor:
        """[B, T] bool: which new tokens are real. Only left padding is supported."""
        if attention_mask is None or attention_mask.numel() == 0:
            return torch.ones(bsz, q_len, dtype=torch.bool)
        if attention_mask.dim() != 2:
            raise NotImplementedError(
                f"this model builds its own {attention_mask.dim()}D attention mask (shape {tuple(attention_mask.shape)}) "
                "instead of transformers' mask functions (e.g. Doge's dynamic mask); offload takes a 2D padding mask "
                "and causal attention, so it refuses rather than ignore the model's mask"
            )
        if attention_mask.shape != (bsz, seen + q_len):
            raise ValueError(
                f"attention_mask must cover all {seen + q_len} tokens seen so far for {bsz} sequences; "
                f"got shape {tuple(attention_mask.shape)}"
            )
        valid = attention_mask[:, -q_len:].to(device="cpu", dtype=torch.bool)
        started = torch.tensor([n > 0 for n in stored], dtype=torch.bool)
        after_real = torch.cat([started[:, None], valid[:, :-1]], dim=1).cummax(dim=1).values
        if bool((after_real & ~valid).any()):
            raise ValueError(
                "attention_mask has a padding token after a real token; OffloadCache supports left padding only "
                "(each row: zeros, then ones)"
            )
        return valid

    # results ---------------------------------------------------------------------------------
    def stats(self, flush: bool = True) -> OffloadStats:
        """Counters of this cache's request (`Request.stats`; flush: wait for copies still running)."""
        if self._final_stats is not None:
            return self._final_stats
        if self.request is None:
            return OffloadStats(device_budget_bytes=self.config.device_budget)
        stats = self.request.stats(flush)
        stats.tokens_prefilled = self.tokens_prefilled
        stats.tokens_generated = self.generated_tokens
        stats.decode_s = self.decode_s
        stats.prefill_s = self.prefill_s
        return stats
