"""Micro-benchmarks of the hot paths (pytest-benchmark). Run with `make bench`; `make test` skips
them (they live outside tests/ and the suite disables benchmarking).

Each benchmark states the size it measures; compare medians between runs on the same machine.
"""

from __future__ import annotations

import pytest
import torch

from offload import OffloadConfig
from offload.kernels import available_kernels, merge_partials, paged_attention
from offload.policies.quest import page_upper_bounds
from offload.store.layout import KVLayout
from offload.store.kv_store import KVStore

# Llama-3-8B-like attention: 32 query heads, 8 KV heads, head_dim 128; 8k tokens of bf16 KV in 16-token pages.
H, HKV, D, PAGE, TOKENS = 32, 8, 128, 16, 8192


@pytest.fixture(scope="module")
def pages():
    gen = torch.Generator().manual_seed(0)
    num_pages = TOKENS // PAGE
    keys = torch.randn(num_pages, PAGE, HKV, D, generator=gen).to(torch.bfloat16)
    values = torch.randn(num_pages, PAGE, HKV, D, generator=gen).to(torch.bfloat16)
    table = torch.randperm(num_pages, generator=gen)[None].to(torch.int32)
    return keys, values, table


@pytest.mark.parametrize("kernel", available_kernels())
def test_kernel_decode_8k_bf16(benchmark, pages, kernel):
    keys, values, table = pages
    query = torch.randn(1, H, 1, D)
    num, last = torch.tensor([table.shape[1]]), torch.tensor([PAGE])
    benchmark(paged_attention, query, keys, values, table, num, last, D**-0.5, kernel=kernel, validate=False)


def test_merge_partials_32_heads(benchmark):
    out_a, out_b = torch.randn(4, H, 1, D), torch.randn(4, H, 1, D)
    lse_a, lse_b = torch.randn(4, H, 1), torch.randn(4, H, 1)
    benchmark(merge_partials, out_a, lse_a, out_b, lse_b)


def test_page_selection_quest_bounds_512_pages(benchmark):
    query = torch.randn(1, H, 1, D)
    kmin, kmax = torch.randn(1, TOKENS // PAGE, HKV, D), torch.randn(1, TOKENS // PAGE, HKV, D)
    benchmark(lambda: torch.topk(page_upper_bounds(query, kmin, kmax)[0], 32))


@pytest.fixture(scope="module")
def filled_store():
    config = OffloadConfig.from_env({}, page_size=PAGE, device_budget="64MiB", cpu_kernel="auto")
    layout = KVLayout(1, HKV, D, PAGE, torch.bfloat16)
    store = KVStore(config, layout, "cpu")
    request, _ = store.open(1, TOKENS + 4096)
    gen = torch.Generator().manual_seed(1)
    for _ in range(TOKENS // 1024):
        q = torch.randn(1, H, 1024, D, generator=gen).to(torch.bfloat16)
        k = torch.randn(1, HKV, 1024, D, generator=gen).to(torch.bfloat16)
        store.attend(request, 0, q, k, k.clone(), torch.ones(1, 1024, dtype=torch.bool), D**-0.5)
    yield store, request
    store.close()


def test_one_layer_decode_step_8k(benchmark, filled_store):
    store, request = filled_store
    gen = torch.Generator().manual_seed(2)

    def step():
        q = torch.randn(1, H, 1, D, generator=gen).to(torch.bfloat16)
        k = torch.randn(1, HKV, 1, D, generator=gen).to(torch.bfloat16)
        store.attend(request, 0, q, k, k.clone(), torch.ones(1, 1, dtype=torch.bool), D**-0.5)

    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)
