"""Host page-pool memory: zeroed, the asked shape and dtype, usable through any view, and on
transparent huge pages where the OS gives them."""

import gc

import pytest
import torch

from offload.store.host_memory import HUGE_PAGE_BYTES, host_zeros, huge_pages_supported
from offload.store.layout import KVLayout
from offload.store.pools import PagePool


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3,), (1, 8, 16, 128), (300, 8, 16, 128)])  # below and above one huge page
def test_host_zeros(shape, dtype):
    t = host_zeros(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
    assert not t.any()
    t.fill_(1.5)
    assert bool((t == 1.5).all())


def test_large_buffers_sit_on_huge_page_boundaries_and_outlive_the_first_tensor():
    if not huge_pages_supported():
        pytest.skip("no madvise(MADV_HUGEPAGE) on this OS: host_zeros is torch.zeros here")
    t = host_zeros((2 * HUGE_PAGE_BYTES // 4,), torch.float32)
    assert t.data_ptr() % HUGE_PAGE_BYTES == 0
    view = t[10:20]
    del t
    gc.collect()
    view.fill_(2.0)  # the mapping lives as long as a view of it does
    assert float(view.sum()) == 20.0


def test_cpu_pools_use_host_memory_and_grow_with_their_contents():
    layout = KVLayout(num_layers=1, num_kv_heads=8, head_dim=128, page_size=16, dtype=torch.bfloat16)
    pool = PagePool(layout, 64, "cpu", max_capacity=256)  # 64 pages x 32 KiB: above one huge page
    if huge_pages_supported():
        assert pool.keys.data_ptr() % HUGE_PAGE_BYTES == 0
    slots = [pool.allocate() for _ in range(64)]
    pool.keys[slots[5]] = 1.0
    pool.allocate()  # grows into a new buffer, the old contents copied
    assert pool.capacity == 128 and float(pool.keys[slots[5]].float().mean()) == 1.0
    assert not pool.keys[64:].any()
