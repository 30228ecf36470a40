"""The plain-torch dense kernel the device part uses: its fused prefill path against the plain one."""

from __future__ import annotations

import pytest
import torch

from offload.kernels.torch_ref import dense_attention_scores


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("q_len,kv_len,rows", [(40, 70, 8), (17, 17, 1), (64, 200, 32)])
def test_fused_prefill_path_matches_the_plain_one(q_len, kv_len, rows, per_head):
    """Only the last `score_rows` rows' scores wanted: out/lse of every row from the fused kernel,
    equal to the plain path, including rows that see no key (zeros, -inf) and per-head masks."""
    gen = torch.Generator().manual_seed(q_len + kv_len)
    bsz, heads, kv_heads, dim = 2, 4, 2, 8
    query = torch.randn(bsz, heads, q_len, dim, generator=gen)
    keys = torch.randn(bsz, kv_heads, kv_len, dim, generator=gen)
    values = torch.randn(bsz, kv_heads, kv_len, dim, generator=gen)
    visible = torch.rand(bsz, q_len, kv_len, generator=gen) < 0.6
    visible[1, :3] = False  # padding rows: no key at all
    if per_head:
        visible = visible[:, None].expand(-1, kv_heads, -1, -1) & (torch.rand(bsz, kv_heads, q_len, kv_len, generator=gen) < 0.8)
    out, lse, scores = dense_attention_scores(query, keys, values, visible, 0.3)
    f_out, f_lse, f_scores = dense_attention_scores(query, keys, values, visible, 0.3, score_rows=rows)
    torch.testing.assert_close(f_out, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_lse, lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_scores, scores[:, :, q_len - rows :])


def test_score_rows_with_softcap_takes_the_plain_path_and_the_last_rows():
    gen = torch.Generator().manual_seed(9)
    query, keys, values = torch.randn(1, 2, 30, 8, generator=gen), torch.randn(1, 1, 30, 8, generator=gen), \
        torch.randn(1, 1, 30, 8, generator=gen)
    visible = torch.ones(1, 30, 30, dtype=torch.bool).tril()
    out, lse, scores = dense_attention_scores(query, keys, values, visible, 0.3, softcap=5.0)
    f_out, f_lse, f_scores = dense_attention_scores(query, keys, values, visible, 0.3, softcap=5.0, score_rows=4)
    assert torch.equal(f_out, out) and torch.equal(f_lse, lse) and torch.equal(f_scores, scores[:, :, -4:])


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_attend_seen_equals_the_masked_fused_path(num_kv_heads):
    """Keys each sequence's rows all see, attended per sequence without a mask (the GPU's path
    for a prefill chunk whose earlier keys are partly absent), against the masked CPU flash path;
    a sequence that sees no key gets zeros and -inf."""
    from offload.kernels.torch_ref import _attend_seen, _fused_attention

    gen = torch.Generator().manual_seed(3)
    query = torch.randn(3, 4, 9, 16, generator=gen)
    keys = torch.randn(3, num_kv_heads, 21, 16, generator=gen)
    values = torch.randn(3, num_kv_heads, 21, 16, generator=gen)
    seen = torch.rand(3, 21, generator=gen) < 0.5
    seen[0, 5] = True
    seen[2] = False
    out, lse = _attend_seen(query, keys, values, seen, 0.25)
    ref_out, ref_lse = _fused_attention(query, keys, values, seen[:, None, :].expand(-1, 9, -1), 0.25)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-5)
    assert bool((out[2] == 0).all()) and bool(torch.isneginf(lse[2]).all())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [16, 256])
def test_rows_matmul_equals_the_fused_kernel(causal, head_dim):
    """The matmul fallback of the fused rows (a GPU kernel that refuses a shape) gives the CPU
    flash kernel's out and lse, causal or not, for head sizes such kernels may lack."""
    from offload.kernels.torch_ref import _fused_rows, _rows_matmul

    gen = torch.Generator().manual_seed(head_dim)
    q = torch.randn(2, 3, 19, head_dim, generator=gen)
    k = torch.randn(2, 3, 19, head_dim, generator=gen)
    v = torch.randn(2, 3, 19, head_dim, generator=gen)
    out, lse = _rows_matmul(q, k, v, causal, head_dim ** -0.5)
    ref_out, ref_lse = _fused_rows(q, k, v, causal, head_dim ** -0.5)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-5)
