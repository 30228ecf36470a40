"""xKV: RoPE undone and redone exactly, full rank is the plain cache, a low rank equals a slow
reference (pre-RoPE keys captured from k_proj, truncated SVD in float64), and the bytes counted."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from offload.crosslayer.xkv import XKVCache, rotate, unrotate
from tests.crosslayer.conftest import tiny_llama, token_ids


def test_unrotate_inverts_transformers_rope_with_and_without_attention_scaling():
    model = tiny_llama(num_layers=2)
    x = torch.randn(2, 3, 9, 16, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(9)[None].expand(2, -1)
    cos, sin = model.model.rotary_emb(x, positions)
    rotated, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(rotate(x, cos, sin), rotated)
    torch.testing.assert_close(unrotate(rotated, cos, sin), x, rtol=0, atol=1e-5)
    scaled = rotate(x, 1.3 * cos, 1.3 * sin)  # YaRN-style attention scaling multiplies cos and sin
    torch.testing.assert_close(unrotate(scaled, 1.3 * cos, 1.3 * sin), x, rtol=0, atol=1e-5)


def _decode(model, ids, cache, prompt: int, mask=None):
    logits = [model(ids[:, :prompt], past_key_values=cache, attention_mask=None if mask is None else mask[:, :prompt])
              .logits[:, -1]]
    for i in range(prompt, ids.shape[1]):
        logits.append(model(ids[:, i:i + 1], past_key_values=cache,
                            attention_mask=None if mask is None else mask[:, :i + 1]).logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("group_size, pre_rope", [(1, True), (2, True), (3, True), (4, False)])
@torch.inference_mode()
def test_full_rank_is_the_plain_cache(group_size, pre_rope):
    model = tiny_llama(num_layers=4)
    ids = token_ids(2, 27, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row
    expected = _decode(model, ids, DynamicCache(config=model.config), 23, mask)
    cache = XKVCache.for_model(model, 32, 32, group_size=group_size, pre_rope=pre_rope)  # 2 KV heads x 16
    torch.testing.assert_close(_decode(model, ids, cache, 23, mask), expected, rtol=0, atol=1e-4)
    width = 2 * 16
    assert [len(g.layers) for g in cache.groups] == {1: [1] * 4, 2: [2, 2], 3: [3, 1], 4: [4]}[group_size]
    assert cache.ranks() == [(min(23, width * len(g.layers)),) * 2 for g in cache.groups]
    assert cache.get_seq_length() == 27


@torch.inference_mode()
def test_a_low_rank_matches_a_slow_reference():
    """Ranks below full: the cache's decode step equals one over a DynamicCache whose layers hold
    the reference reconstruction: pre-RoPE keys captured at k_proj, grouped, truncated SVD in float64,
    RoPE applied by transformers; values the same without RoPE."""
    model = tiny_llama(num_layers=4)
    ids = token_ids(1, 40, seed=2)
    prompt, rank, group = 36, 5, 2
    cache = XKVCache.for_model(model, rank, rank + 2, group_size=group, start_layer=1)  # groups (1, 2), (3)
    got = _decode(model, ids, cache, prompt)

    captured = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, i, o, n=n: captured.setdefault(n, o))
             for n, layer in enumerate(model.model.layers)]
    full = DynamicCache(config=model.config)
    logits = [model(ids[:, :prompt], past_key_values=full).logits[:, -1]]
    for hook in hooks:
        hook.remove()
    cos, sin = model.model.rotary_emb(captured[0], torch.arange(prompt)[None])
    for members in ((1, 2), (3,)):
        keys = torch.cat([captured[n][0].double() for n in members], dim=-1)  # [N, g * H * D] before RoPE
        values = torch.cat([full.layers[n].values[0].transpose(0, 1).reshape(prompt, -1).double() for n in members], -1)
        for x, r, is_key in ((keys, rank * len(members), True), (values, (rank + 2) * len(members), False)):
            u, s, vh = torch.linalg.svd(x, full_matrices=False)
            approx = (u[:, :r] * s[:r]) @ vh[:r]
            for i, n in enumerate(members):
                part = approx[:, i * 32:(i + 1) * 32].float().view(1, prompt, 2, 16).transpose(1, 2)
                if is_key:
                    full.layers[n].keys = apply_rotary_pos_emb(part, part, cos, sin)[1]
                else:
                    full.layers[n].values = part
    for i in range(prompt, ids.shape[1]):
        logits.append(model(ids[:, i:i + 1], past_key_values=full).logits[:, -1])
    torch.testing.assert_close(got, torch.stack(logits, 1), rtol=0, atol=1e-4)

    # bytes (float32): layer 0 whole for 40 tokens; per group a factor [N, r] and a basis [r, 32] per
    # layer for keys and values; the 4 decode tokens of layers 1-3 whole
    whole_layer0 = 2 * 40 * 32 * 4
    groups = sum(4 * (prompt * r + r * 32 * g) for g in (2, 1) for r in (rank * g, (rank + 2) * g))
    tails = 3 * 2 * 4 * 32 * 4
    assert cache.kv_bytes() == whole_layer0 + groups + tails


@torch.inference_mode()
def test_generate_runs_with_the_cache():
    model = tiny_llama(num_layers=4)
    ids = token_ids(1, 20, seed=3)
    plain = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cache = XKVCache.for_model(model, 32, 32)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, past_key_values=cache),
                       plain)


@pytest.mark.parametrize("kwargs, message", [
    (dict(key_rank=0, value_rank=4), "key_rank"), (dict(key_rank=4, value_rank=2.5), "value_rank"),
    (dict(key_rank=4, value_rank=4, group_size=0), "group_size"),
    (dict(key_rank=4, value_rank=4, start_layer=4), "start_layer"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        XKVCache(4, **kwargs)


def test_a_rope_convention_other_than_llamas_is_refused_unless_keys_stay_rotated(monkeypatch):
    """The unrotation assumes features p and p + D/2 pair up; the check runs the model's own RoPE."""
    import transformers.models.llama.modeling_llama as llama

    def interleaved(q, k, cos, sin, *args, **kwargs):  # GPT-J style: features 2i and 2i + 1 pair up
        def rotate_pairs(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + rotate_pairs(q) * sin, k * cos + rotate_pairs(k) * sin

    model = tiny_llama(num_layers=2)
    monkeypatch.setattr(llama, "apply_rotary_pos_emb", interleaved)
    with pytest.raises(ValueError, match="pre_rope=False"):
        XKVCache.for_model(model, 4, 4)
    assert XKVCache.for_model(model, 4, 4, pre_rope=False).groups[0].rotary is None
