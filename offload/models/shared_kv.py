"""A Llama whose layers attend the KV of a "KV layer": the cross-layer sharing framework of Wu, Wu
and Tu, "A Systematic Study of Cross-Layer KV Sharing for Efficient LLM Inference" (NAACL 2025).

Every layer keeps its own queries; only the KV layers have key and value projections and a KV
cache. `kv_source_layers[i]` is the layer whose KV layer i attends (itself for a KV layer).
`framework_map` builds the framework's configurations: a partition of the layers into groups of
consecutive layers (pizza, sandwich, lasagna) and, in each group, the position of the KV layer the
group attends (bottom, top, middle).

- **pizza**: the K-1 lowest layers keep their own KV (the crust); the rest are one group.
- **sandwich**: the lowest ceil((K-1)/2) and the highest floor((K-1)/2) layers keep their own KV
  (the bread); the layers between are one group. It needs K >= 3.
- **lasagna**: K groups of consecutive layers, as equal in size as possible (larger ones first).
- **bottom / top / middle**: the group's lowest layer, its highest, or its layer (n-1)//2 from the
  bottom (n layers; with n = 2 that is the bottom one, so lasagna-middle is lasagna-bottom when
  the groups are pairs).

Known methods are special cases: CLA is lasagna-bottom, YOCO (without its efficient self-attention)
is pizza-bottom, LCKV with its warm-up layers is sandwich-top.

A layer that attends a *later* layer's KV (top and middle targets) sees that layer's KV of the
tokens before its own, never of its own token (the diagonal is masked; a first token with no
earlier one gets a zero attention output). Decoding one token at a time that is exact: the later
layer's KV of every earlier token is in the cache. A prompt of many tokens is computed as the
paper does, by iteration: the layers from the lowest one that attends upwards to the highest layer
attended from below run `forward_passes` times without gradients (each pass attends the KV the
previous pass computed, the first none), then `backward_passes` times with gradients, the last of
which continues to the layers above. Training uses the same plan. `forward_passes` and
`backward_passes` are the paper's m and b.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import (
    ALL_ATTENTION_FUNCTIONS,
    LlamaAttention,
    LlamaForCausalLM,
    LlamaModel,
    eager_attention_forward,
)

from offload.crosslayer.xkv import rotate

PARTITIONS = ("pizza", "sandwich", "lasagna")
TARGETS = ("bottom", "top", "middle")


def framework_map(num_layers: int, partition: str, target: str, kv_layers: int) -> list[int]:
    """`kv_source_layers` of the configuration `partition`-`target` with `kv_layers` KV layers.

    >>> framework_map(6, "sandwich", "middle", 3)
    [0, 2, 2, 2, 2, 5]
    """
    if partition not in PARTITIONS:
        raise ValueError(f"partition={partition!r}; expected one of {', '.join(PARTITIONS)}")
    if target not in TARGETS:
        raise ValueError(f"target={target!r}; expected one of {', '.join(TARGETS)}")
    if not 1 <= kv_layers <= num_layers:
        raise ValueError(f"kv_layers={kv_layers} with {num_layers} layers; expected 1 to {num_layers}")
    if partition == "pizza":
        groups = [[i] for i in range(kv_layers - 1)] + [list(range(kv_layers - 1, num_layers))]
    elif partition == "sandwich":
        if kv_layers < 3:
            raise ValueError(f"sandwich with kv_layers={kv_layers}: a sandwich keeps a layer below and above the "
                             "shared group, so it needs at least 3 KV layers")
        below, above = kv_layers // 2, (kv_layers - 1) // 2
        groups = ([[i] for i in range(below)] + [list(range(below, num_layers - above))]
                  + [[i] for i in range(num_layers - above, num_layers)])
    else:
        size, extra = divmod(num_layers, kv_layers)
        groups, start = [], 0
        for g in range(kv_layers):
            n = size + (g < extra)
            groups.append(list(range(start, start + n)))
            start += n
    sources = []
    for group in groups:
        kv = {"bottom": group[0], "top": group[-1], "middle": group[(len(group) - 1) // 2]}[target]
        sources += [kv] * len(group)
    return sources


def parse_configuration(name: str) -> tuple[str, str]:
    """("sandwich", "middle") from "sandwich-middle"; ValueError naming what is accepted."""
    partition, _, target = name.partition("-")
    if partition not in PARTITIONS or target not in TARGETS:
        raise ValueError(f"kv sharing configuration {name!r}; expected PARTITION-TARGET with PARTITION one of "
                         f"{', '.join(PARTITIONS)} and TARGET one of {', '.join(TARGETS)} (e.g. sandwich-middle)")
    return partition, target


def check_sources(sources, num_layers: int) -> list[int]:
    """`sources` as a list, checked: one entry per layer, each a layer index whose own entry is itself."""
    sources = list(sources)
    if len(sources) != num_layers:
        raise ValueError(f"kv_source_layers has {len(sources)} entries for {num_layers} layers; expected one per layer")
    for i, j in enumerate(sources):
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < num_layers:
            raise ValueError(f"kv_source_layers[{i}]={j!r}: expected a layer index 0..{num_layers - 1}")
        if sources[j] != j:
            raise ValueError(f"kv_source_layers[{i}]={j}, but layer {j} attends layer {sources[j]}'s KV and keeps none "
                             "of its own; a layer can only attend a KV layer (one whose entry is itself)")
    return sources


@strict
class SharedKVLlamaConfig(LlamaConfig):
    model_type = "offload_shared_kv_llama"

    kv_source_layers: list[int] | None = None  # per layer, the layer whose KV it attends (None: its own)
    forward_passes: int = 3  # m: passes without gradients when a prompt needs iteration
    backward_passes: int = 1  # b: passes with gradients after them

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.kv_source_layers is None:
            self.kv_source_layers = list(range(self.num_hidden_layers))
        self.kv_source_layers = check_sources(self.kv_source_layers, self.num_hidden_layers)
        if self.forward_passes < 0 or self.backward_passes < 1:
            raise ValueError(f"forward_passes={self.forward_passes}, backward_passes={self.backward_passes}; expected "
                             ">= 0 and >= 1")

    @property
    def kv_sharing_modes(self) -> list[str | None]:
        """transformers' marking of cross-layer sharing: "reuse" layers keep no cache of their own."""
        return ["store" if j == i else "reuse" for i, j in enumerate(self.kv_source_layers)]

    def iteration_span(self) -> tuple[int, int] | None:
        """(lowest layer attending a later layer's KV, highest layer so attended), or None."""
        upward = [(i, j) for i, j in enumerate(self.kv_source_layers) if j > i]
        if not upward:
            return None
        return min(i for i, _ in upward), max(j for _, j in upward)


def past_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The KV `cache` holds for `layer` (before this forward's update of it), or None."""
    if cache is None or layer >= len(cache.layers):
        return None
    keys = getattr(cache.layers[layer], "keys", None)
    if keys is None or keys.numel() == 0:
        return None
    return keys, cache.layers[layer].values


def attend_upward(query: torch.Tensor, keys: torch.Tensor | None, values: torch.Tensor | None, past: int,
                  padding: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Attention of `query` [B, H, T, D] (tokens at cache indices past..past+T-1) over `keys`/`values`
    [B, H_kv, S, D] at cache indices 0..S-1, each query seeing only keys at earlier indices (the
    diagonal masked); `padding` [B, >= S] marks real tokens. Rows with no key get zeros.
    Returns [B, T, H, D]."""
    batch, heads, length, dim = query.shape
    if keys is None or keys.shape[2] == 0:
        return query.new_zeros(batch, length, heads, dim)
    size = keys.shape[2]
    groups = heads // keys.shape[1]
    if length == 1 and past == size and (padding is None or bool(padding[:, :size].all())):
        # one decode step over earlier tokens only, none padded: every key is visible
        out = torch.nn.functional.scaled_dot_product_attention(
            query, keys, values, scale=scaling, enable_gqa=groups > 1)
        return out.transpose(1, 2)
    rows = torch.arange(past, past + length, device=query.device).unsqueeze(1)
    allowed = (torch.arange(size, device=query.device).unsqueeze(0) < rows).expand(batch, 1, length, size)
    if padding is not None:
        allowed = allowed & padding[:, None, None, :size].bool()
    empty = ~allowed.any(-1, keepdim=True)
    allowed = allowed | (empty & (torch.arange(size, device=query.device) == 0))  # a harmless key; zeroed below
    out = torch.nn.functional.scaled_dot_product_attention(
        query, keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1),
        attn_mask=allowed, scale=scaling)
    return out.masked_fill(empty, 0.0).transpose(1, 2)


class SharedKVAttention(LlamaAttention):
    """LlamaAttention that attends its KV layer's keys and values; only KV layers project and store them."""

    def __init__(self, config: SharedKVLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.kv_layer = config.kv_source_layers[layer_idx]
        if self.kv_layer != layer_idx:
            del self.k_proj, self.v_proj

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                shared_kv=None, pass_state=None, padding_mask=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        cos, sin = position_embeddings
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        query = rotate(query, cos, sin)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        dropout = 0.0 if not self.training else self.attention_dropout
        store = past_key_values if hasattr(past_key_values, "attend_outside") else None  # offload's cache
        if self.kv_layer == self.layer_idx:
            keys = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            values = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            keys = rotate(keys, cos, sin)
            if pass_state is not None:
                pass_state.provisional[self.layer_idx] = (keys, values)
        if self.kv_layer > self.layer_idx:  # a later layer's KV: of the earlier tokens only
            chunk = pass_state.provisional.get(self.kv_layer) if pass_state is not None else None
            if store is not None:
                out = store.attend_outside(self.kv_layer, query, chunk, padding_mask, self.scaling, diagonal=False)
            else:
                past = past_kv(past_key_values, self.kv_layer)
                past_len = 0 if past is None else past[0].shape[2]
                parts = [kv for kv in (past, chunk) if kv is not None]
                if len(parts) == 2:
                    keys, values = torch.cat([past[0], chunk[0]], dim=2), torch.cat([past[1], chunk[1]], dim=2)
                else:  # (no copy of the cache per decode step)
                    keys, values = parts[0] if parts else (None, None)
                out = attend_upward(query, keys, values, past_len, padding_mask, self.scaling)
        elif store is not None and pass_state is not None and not pass_state.final:
            # A pass before the last under offload: the store keeps only what the last pass computes.
            out = store.attend_outside(self.kv_layer, query, pass_state.provisional[self.kv_layer], padding_mask,
                                       self.scaling, diagonal=True)
        else:
            if self.kv_layer == self.layer_idx:
                if pass_state is None or pass_state.final:
                    if past_key_values is not None:
                        keys, values = past_key_values.update(keys, values, self.layer_idx)
                else:  # an iteration before the last: attend what is cached, store nothing
                    past = past_kv(past_key_values, self.layer_idx)
                    if past is not None:
                        keys, values = torch.cat([past[0], keys], dim=2), torch.cat([past[1], values], dim=2)
                shared_kv[self.layer_idx] = (keys, values)
            else:  # an earlier layer's KV, exactly as that layer attended it
                keys, values = shared_kv[self.kv_layer]
            out, _ = interface(self, query, keys, values, attention_mask, dropout=dropout, scaling=self.scaling,
                               **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), None


class _PassState:
    """What one iteration over the span hands the next: the KV layers' keys and values of this
    forward's tokens (`provisional`: a layer below reads the previous pass's, a layer above this
    pass's), and whether this is the last pass (which writes the cache)."""

    def __init__(self):
        self.provisional: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.final = False


class SharedKVLlamaModel(LlamaModel):
    config_class = SharedKVLlamaConfig

    def __init__(self, config: SharedKVLlamaConfig):
        super().__init__(config)
        for i, layer in enumerate(self.layers):
            layer.self_attn = SharedKVAttention(config, i)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + seen).unsqueeze(0)
        causal_mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                         past_key_values=past_key_values, position_ids=position_ids)
        padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        common = dict(attention_mask=causal_mask, position_embeddings=position_embeddings, position_ids=position_ids,
                      past_key_values=past_key_values, use_cache=use_cache, padding_mask=padding, **kwargs)
        layers = self.layers[: self.config.num_hidden_layers]
        span = self.config.iteration_span()
        shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        hidden = inputs_embeds
        if span is None or inputs_embeds.shape[1] == 1:
            for layer in layers:  # one token at a time, a later layer's KV is the cache's: exact
                hidden = layer(hidden, shared_kv=shared_kv, **common)
        else:
            low, high = span
            for layer in layers[:low]:
                hidden = layer(hidden, shared_kv=shared_kv, **common)
            state = _PassState()
            passes = self.config.forward_passes + self.config.backward_passes
            entry, below = hidden, dict(shared_kv)
            for p in range(passes):
                state.final = p == passes - 1
                shared_kv = dict(below)
                with torch.set_grad_enabled(torch.is_grad_enabled() and p >= self.config.forward_passes):
                    hidden = entry
                    for layer in layers[low:high + 1]:
                        hidden = layer(hidden, shared_kv=shared_kv, pass_state=state, **common)
            for layer in layers[high + 1:]:
                hidden = layer(hidden, shared_kv=shared_kv, **common)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), past_key_values=past_key_values)


class SharedKVLlamaForCausalLM(LlamaForCausalLM):
    config_class = SharedKVLlamaConfig

    def __init__(self, config: SharedKVLlamaConfig):
        super().__init__(config)
        self.model = SharedKVLlamaModel(config)
        self.post_init()


AutoConfig.register(SharedKVLlamaConfig.model_type, SharedKVLlamaConfig)
AutoModelForCausalLM.register(SharedKVLlamaConfig, SharedKVLlamaForCausalLM)
