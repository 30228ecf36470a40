"""Page copies between the host tier and the device tier, with byte accounting.

On CUDA, host pages are pinned and copies are non-blocking on the current stream. Without an
accelerator the "device" is CPU memory, and `emulate_link_gbps` makes every copy take the time
a link of that bandwidth would (bytes / bandwidth), so that moving fewer bytes shows as time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from offload.store.pools import PagePool


@dataclass(slots=True)
class TransferCounters:
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    h2d_pages: int = 0
    d2h_pages: int = 0
    link_s: float = 0.0  # time spent in (emulated) link waits


class TransferEngine:
    def __init__(self, emulate_link_gbps: float = 0.0) -> None:
        self.emulate_link_gbps = emulate_link_gbps
        self.counters = TransferCounters()

    def _link_wait(self, num_bytes: int) -> None:
        if self.emulate_link_gbps > 0 and num_bytes > 0:
            seconds = num_bytes / (self.emulate_link_gbps * 1e9)
            start = time.perf_counter()
            # sleep for the bulk, spin for the remainder: sleep alone overshoots short waits.
            if seconds > 2e-3:
                time.sleep(seconds - 1e-3)
            while time.perf_counter() - start < seconds:
                pass
            self.counters.link_s += time.perf_counter() - start

    def host_to_device(self, host: PagePool, host_ids: list[int], device: PagePool, slots: list[int]) -> None:
        """Copy host pages `host_ids` into device slots `slots` (same length)."""
        if not host_ids:
            return
        src = torch.tensor(host_ids, dtype=torch.long)
        dst = torch.tensor(slots, dtype=torch.long, device=device.device)
        non_blocking = device.device.type == "cuda"
        for src_pool, dst_pool in ((host.keys, device.keys), (host.values, device.values)):
            dst_pool.index_copy_(0, dst, src_pool.index_select(0, src).to(device.device, non_blocking=non_blocking))
        num_bytes = len(host_ids) * host.layout.page_bytes
        self._link_wait(num_bytes)
        self.counters.h2d_bytes += num_bytes
        self.counters.h2d_pages += len(host_ids)

    def to_host(self, keys: torch.Tensor, values: torch.Tensor, host: PagePool, host_ids: list[int]) -> None:
        """Write whole pages (keys/values: [n, page_size, H_kv, D], on the device) to host pages."""
        if not host_ids:
            return
        dst = torch.tensor(host_ids, dtype=torch.long)
        host.keys.index_copy_(0, dst, keys.to(host.device))
        host.values.index_copy_(0, dst, values.to(host.device))
        num_bytes = len(host_ids) * host.layout.page_bytes
        self._link_wait(num_bytes)
        self.counters.d2h_bytes += num_bytes
        self.counters.d2h_pages += len(host_ids)
