"""Projected decode speed on real hardware, from bytes counted on this machine (issue 13, item 6).

A decode step of offload reads KV in three places at once: the device part reads resident pages
from device memory (with the model's weights), the host part reads the other pages from host
DRAM on the CPU, and the copy engine moves promoted pages over the link. The three overlap (the
host part runs on a worker thread, copies on a side stream), so a step takes as long as the
slowest of them. Whole-layer offload moves every layer's KV over the link each step and reads it
again from device memory; its copies overlap the compute.

The bytes are counted per generated token by the benchmark (`OffloadStats.device_read_bytes`,
`host_read_bytes`, `h2d_bytes`), as shares of the KV cache, and scaled to a model layout and a
context: the shares stay those measured (the same device budget fraction), the KV grows with the
context. This is a projection (bandwidth-bound, no launch overheads, no contention), printed
beside measured CPU numbers, never instead of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    name: str
    hbm_gbps: float  # device memory read bandwidth
    link_gbps: float  # host -> device copies, achieved
    dram_gbps: float  # host memory read bandwidth available to the CPU kernel
    cpu_kernel_share: float  # share of dram_gbps the CPU attention kernel reaches (measured here)


# H100 SXM (3.35 TB/s HBM3), PCIe 5.0 x16 (~55 GB/s achieved of 64), one server socket of DDR5
# (8 channels x 4800 MT/s = 307 GB/s); the CPU kernel's share is the one measured on this machine
# (bench/results/cpu_attention.md: 0.34 of the read bandwidth, bf16, 32k).
H100_PCIE5 = Hardware("H100 SXM + PCIe 5.0 x16 + one DDR5 socket", hbm_gbps=3350.0, link_gbps=55.0,
                      dram_gbps=307.0, cpu_kernel_share=0.34)


@dataclass(frozen=True)
class Layout:
    name: str
    num_layers: int
    kv_bytes_per_token_layer: int  # keys + values of one token in one layer
    weight_bytes: int  # read once per decode step


LLAMA3_8B = Layout("Llama-3-8B (32 layers, 8 KV heads x 128, bf16)", 32, 2 * 8 * 128 * 2, 16 * 10**9)


def step_seconds(device_bytes: float, host_bytes: float, link_bytes: float, hw: Hardware) -> float:
    """One decode step: the device part, the host part and the link overlap; the slowest sets it."""
    device = device_bytes / (hw.hbm_gbps * 1e9)
    host = host_bytes / (hw.dram_gbps * 1e9 * hw.cpu_kernel_share)
    link = link_bytes / (hw.link_gbps * 1e9)
    return max(device, host, link)


def project(shares: dict[str, float], context: int, layout: Layout = LLAMA3_8B, hw: Hardware = H100_PCIE5) -> float:
    """Projected tokens/s. `shares`: bytes per generated token divided by the KV cache's bytes at
    the measured context, for "device", "host" and "link" (whole-layer offload: 1, 0, 1)."""
    kv = context * layout.num_layers * layout.kv_bytes_per_token_layer
    return 1.0 / step_seconds(shares["device"] * kv + layout.weight_bytes, shares["host"] * kv, shares["link"] * kv, hw)
