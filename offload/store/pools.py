"""Page pools: fixed-size page slots with reference counts.

A slot is referenced by every sequence whose page table points at it (beam search and prefix
sharing share complete pages) and pinned while a copy or a kernel uses it; it returns to the
free list only when its count drops to zero, so nothing in use or in flight is ever reused.
The device pool is allocated once at its budget; the host pool grows (doubling) up to its budget
(`PageHome` decides what it holds when it is full).
"""

from __future__ import annotations

from typing import Callable

import torch

from offload.sizes import format_bytes
from offload.store.host_memory import host_zeros
from offload.store.layout import KVLayout


class PoolExhausted(RuntimeError):
    """No free slot and no room to grow within the budget."""


class PagePool:
    """Slots of `[H_kv, page_size, D]` keys and values on one device.

    keys, values: [capacity, H_kv, page_size, D]
    """

    def __init__(
        self,
        layout: KVLayout,
        capacity: int,
        device: torch.device | str,
        *,
        max_capacity: int | None = None,
        pin_memory: bool = False,
        name: str = "pool",
    ) -> None:
        self.layout = layout
        self.device = torch.device(device)
        self.max_capacity = capacity if max_capacity is None else max_capacity
        self.pin_memory = pin_memory
        self.name = name
        self.keys = self._alloc(capacity)
        self.values = self._alloc(capacity)
        self.refcount = [0] * capacity
        # Stack of free slots, lowest id on top, so allocation order is deterministic.
        self._free = list(range(capacity - 1, -1, -1))
        # Called before growing reallocates keys/values (the host's `PageHome` settles copies into them).
        self.before_grow: Callable[[], None] | None = None

    def _alloc(self, capacity: int) -> torch.Tensor:
        shape = (capacity, *self.layout.page_shape)
        # Zeroed, not empty: masked keys get probability 0, and 0 * (NaN garbage) would still be NaN.
        if self.device.type == "cpu" and not self.pin_memory:
            return host_zeros(shape, self.layout.dtype)  # huge pages where the OS has them
        tensor = torch.zeros(shape, dtype=self.layout.dtype, device=self.device)
        return tensor.pin_memory() if self.pin_memory else tensor

    @property
    def capacity(self) -> int:
        return len(self.refcount)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free) + (self.max_capacity - self.capacity)

    @property
    def used_bytes(self) -> int:
        return self.num_used * self.layout.page_bytes

    @property
    def reserved_bytes(self) -> int:
        return self.capacity * self.layout.page_bytes

    def allocate(self) -> int:
        """A free slot with reference count 1."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self.refcount[slot] = 1
        return slot

    def allocate_many(self, num: int) -> list[int]:
        """`num` free slots (reference count 1 each), ascending: copies into them coalesce where
        free slots are consecutive (slots freed together come back in reverse order)."""
        slots: list[int] = []
        try:
            for _ in range(num):
                slots.append(self.allocate())
        except BaseException:
            for slot in slots:
                self.decref(slot)
            raise
        return sorted(slots)

    def incref(self, slot: int) -> None:
        if self.refcount[slot] <= 0:
            raise RuntimeError(f"{self.name}: incref of free slot {slot}")
        self.refcount[slot] += 1

    def decref(self, slot: int) -> None:
        count = self.refcount[slot]
        if count <= 0:
            raise RuntimeError(f"{self.name}: decref of free slot {slot}")
        self.refcount[slot] = count - 1
        if count == 1:
            self._free.append(slot)

    def _grow(self) -> None:
        old = self.capacity
        new = min(max(2 * old, 16), self.max_capacity)
        if new <= old:
            raise PoolExhausted(
                f"{self.name} is full: {old} pages of {format_bytes(self.layout.page_bytes)} "
                f"({format_bytes(old * self.layout.page_bytes)}) are in use and the budget allows no more"
            )
        if self.before_grow is not None:
            self.before_grow()
        keys, values = self._alloc(new), self._alloc(new)
        keys[:old].copy_(self.keys)
        values[:old].copy_(self.values)
        self.keys, self.values = keys, values
        self.refcount.extend([0] * (new - old))
        self._free = list(range(new - 1, old - 1, -1)) + self._free
