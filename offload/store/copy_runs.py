"""Coalescing a batch of page copies into contiguous transfers.

Every transfer over the link pays a fixed cost (a DMA descriptor, a PCIe round trip: a few
microseconds) besides its bytes, and 8-72 KB per-page copies waste most of the link on it (vLLM
measured 4-5x from moving 0.5-2 MB blocks instead). So the copies of a batch (source slot ->
destination slot, one per page) are ordered by destination and grouped into runs of consecutive
destination slots: one transfer per run. A run whose sources are consecutive too is a plain
slice-to-slice copy; otherwise its sources are gathered first (into the pinned staging buffer on
CUDA, into a temporary on the CPU), then sent as one transfer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass(slots=True)
class CopyRun:
    """Copies into the consecutive destination slots `dst`, `dst + 1`, ... (one per page)."""

    dst: int  # first destination slot
    index: list[int] = field(default_factory=list)  # positions of its copies in the batch, in destination order
    src: list[int] = field(default_factory=list)  # their source slots (-1: no source slot, e.g. a page on disk)

    @property
    def length(self) -> int:
        return len(self.index)

    @property
    def dst_slice(self) -> slice:
        return slice(self.dst, self.dst + self.length)

    @property
    def src_slice(self) -> slice | None:
        """The sources as one slice when they are consecutive slots, else None (gather them)."""
        first = self.src[0]
        if first < 0 or any(s != first + i for i, s in enumerate(self.src)):
            return None
        return slice(first, first + self.length)


def copy_runs(src: Sequence[int], dst: Sequence[int]) -> list[CopyRun]:
    """The copies src[i] -> dst[i] as runs of consecutive destination slots, in destination order.

    Destination slots are distinct (each was allocated for one copy). An empty batch has no runs."""
    if len(src) != len(dst):
        raise ValueError(f"{len(src)} source slots for {len(dst)} destination slots")
    runs: list[CopyRun] = []
    for i in sorted(range(len(dst)), key=dst.__getitem__):
        if not runs or dst[i] != runs[-1].dst + runs[-1].length:
            runs.append(CopyRun(int(dst[i])))
        runs[-1].index.append(i)
        runs[-1].src.append(int(src[i]))
    return runs
