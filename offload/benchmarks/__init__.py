"""Benchmarks that ship with the package (`offload bench NAME`); results go to bench/results/."""

import os


def machine() -> str:
    """The cores and the 1-minute load average now, as the benchmarks' headers quote them."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} cores, load {load:.1f} at the start"


def command_line(name: str, argv: list[str]) -> str:
    """How a benchmark was run, as its results quote it: the OFFLOAD_* settings in the environment
    (they change what runs), then `offload bench NAME` and its arguments."""
    settings = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("OFFLOAD_")]
    return " ".join([*settings, f"offload bench {name}", *argv])
