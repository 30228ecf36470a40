"""Benchmarks that ship with the package (`offload bench NAME`); results go to bench/results/."""

import os


def machine() -> str:
    """The cores and the 1-minute load average now, as the benchmarks' headers quote them."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} cores, load {load:.1f} at the start"
