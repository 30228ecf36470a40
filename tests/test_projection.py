"""The hardware projection of the decode benchmark, and the byte counters it reads."""

from __future__ import annotations

import pytest
import torch

from offload import OffloadedModel
from offload.benchmarks import projection
from tests.conftest import make_batch, tiny_model


def test_whole_layer_offload_is_link_bound_and_offload_is_bound_by_its_slowest_part():
    hw, layout = projection.H100_PCIE5, projection.LLAMA3_8B
    kv = 32768 * layout.num_layers * layout.kv_bytes_per_token_layer
    whole = projection.project({"device": 1.0, "host": 0.0, "link": 1.0}, 32768)
    assert whole == pytest.approx(hw.link_gbps * 1e9 / kv)  # the link is far slower than HBM
    split = projection.project({"device": 0.1, "host": 0.9, "link": 0.01}, 32768)
    assert split == pytest.approx(hw.dram_gbps * 1e9 * hw.cpu_kernel_share / (0.9 * kv))
    assert projection.project({"device": 0.1, "host": 0.9, "link": 0.01}, 4 * 32768) == pytest.approx(split / 4)


def test_exact_mode_reads_every_stored_key_once_per_step_in_one_part_or_the_other():
    model = tiny_model("llama-gqa")
    ids, mask = make_batch(1, 200)
    om = OffloadedModel(model, page_size=8, sink_tokens=8, recent_tokens=16, device_budget="96KiB")
    try:
        cache = om.new_cache(1, 210)
        om(ids, past_key_values=cache)
        before = cache.stats()
        om(ids[:, :1], past_key_values=cache)  # one decode step over 200 stored tokens
        after = cache.stats()
    finally:
        om.unwrap()
    token_bytes = 2 * 2 * 16 * 4  # keys + values, 2 KV heads x 16, float32
    read = (after.device_read_bytes - before.device_read_bytes) + (after.host_read_bytes - before.host_read_bytes)
    assert read == 2 * 201 * token_bytes  # 2 layers x (200 stored + the new token)
    assert after.host_read_bytes > before.host_read_bytes  # the budget keeps most pages off the device
