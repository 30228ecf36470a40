"""The only reader of `os.environ`: every `OFFLOAD_*` variable, its config field and its parser.

Values are read lazily, when a config is built, so a variable set after import still counts.
A malformed value raises `ValueError` naming the variable, the value and what is accepted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from offload.sizes import ACCEPTED_SIZES, parse_bytes


def _int(name: str, raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


def _float(name: str, raw: str) -> float:
    try:
        return float(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean; expected one of 1, 0, true, false, yes, no, on, off")


def _bytes(name: str, raw: str) -> int:
    return parse_bytes(raw, name)


def _bool_or_auto(name: str, raw: str) -> bool | None:
    if raw.strip().lower() == "auto":
        return None
    try:
        return _bool(name, raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a boolean or auto; expected one of auto, 1, 0, true, false, yes, no, on, off") from None


def _str(name: str, raw: str) -> str:
    return raw.strip().lower()


def _text(name: str, raw: str) -> str:
    """A path or an address: kept as written (not lowercased)."""
    return raw.strip()


@dataclass(frozen=True)
class EnvVar:
    name: str
    field: str
    parse: Callable[[str, str], Any]
    doc: str
    example: str


# One entry per variable; README's table is checked against this list in tests.
ENV_VARS: dict[str, EnvVar] = {
    v.name: v
    for v in [
        EnvVar("OFFLOAD_DEVICE_BUDGET", "device_budget", _bytes,
               "Bytes of accelerator memory for the KV cache of the whole model (pages + page summaries), split evenly over layers.", "64MiB"),
        EnvVar("OFFLOAD_HOST_BUDGET", "host_budget", _bytes,
               "Bytes of host memory for the home copy of every page. Default: the memory psutil reports available.", "16GiB"),
        EnvVar("OFFLOAD_PAGE_SIZE", "page_size", _int, "Tokens per page.", "16"),
        EnvVar("OFFLOAD_MODE", "mode", _str,
               "`exact` attends every needed page (device part + host part); `sparse` attends sinks, recent window and the top pages only.", "sparse"),
        EnvVar("OFFLOAD_TOKEN_BUDGET", "token_budget", _int,
               "Tokens the query selects per layer and sequence (sinks + recent window + top pages): what sparse mode attends and prefetch recall counts as needed.", "2048"),
        EnvVar("OFFLOAD_SINK_TOKENS", "sink_tokens", _int,
               "First tokens of each sequence kept on the device (rounded up to whole pages).", "16"),
        EnvVar("OFFLOAD_RECENT_TOKENS", "recent_tokens", _int,
               "Most recent tokens of each sequence kept on the device (rounded up to whole pages).", "128"),
        EnvVar("OFFLOAD_CPU_THREADS", "cpu_threads", _int,
               "Threads for the host-part attention kernels. Default: the cores this process may run on.", "2"),
        EnvVar("OFFLOAD_CPU_KERNEL", "cpu_kernel", _str,
               "Host-part attention kernel: auto, cpp, numba or torch. An unavailable choice is an error.", "numba"),
        EnvVar("OFFLOAD_EMULATE_LINK_GBPS", "emulate_link_gbps", _float,
               "Without CUDA: make each host<->device copy take bytes / (this many GB/s), plus the per-transfer latency below. 0 copies at memory speed.", "25"),
        EnvVar("OFFLOAD_EMULATE_LINK_LATENCY_US", "emulate_link_latency_us", _float,
               "With OFFLOAD_EMULATE_LINK_GBPS: the fixed cost of each contiguous transfer (DMA setup, PCIe round trip), in microseconds, so coalesced copies of consecutive pages cost less than per-page ones.", "5"),
        EnvVar("OFFLOAD_PREFILL_CHUNK", "prefill_chunk", _int,
               "Prompt tokens per prefill forward pass. Each chunk reads every stored page again: larger chunks prefill faster (an 8k prompt on the CPU: 1.33x the unwrapped model's time with 2048 against 1.46x with 512 in one run, bench/results/step_prefill_chunk*.md; a 32k prompt on a GPU: 4x faster with 4096) and take more activation memory; policies that score pages by observed rows observe the last rows of each chunk.", "2048"),
        EnvVar("OFFLOAD_PREFETCH", "prefetch", _bool_or_auto,
               "Speculative prefetch: predict the next layer's query and copy its likely pages ahead. `auto`: in sparse mode only (exact mode reads every non-resident page on the host anyway); 1 forces it, 0 disables it.", "1"),
        EnvVar("OFFLOAD_SPARSE_MISSES", "sparse_misses", _str,
               "Sparse mode: needed pages not on the device are read on the `host` (default) or `skip`ped (counted).", "skip"),
        EnvVar("OFFLOAD_PROMOTE_PAGES", "promote_pages", _int,
               "Most pages promoted to the device per layer and sequence between decode steps (bounds h2d traffic).", "4"),
        EnvVar("OFFLOAD_SCORE_DECAY", "score_decay", _float,
               "Decay of the accumulated per-page attention mass each step (H2O-style criticality), in [0, 1].", "0.9"),
        EnvVar("OFFLOAD_STICKY_MARGIN", "sticky_margin", _float,
               "`quest` selection hysteresis, in nats: a page not on the device replaces a resident (or incoming) one only when its bound on q.k x scale is this much higher; keeps the selection, and so the copies, stable. 0 turns it off.", "1.0"),
        EnvVar("OFFLOAD_PREFIX_CACHE", "prefix_cache", _bool,
               "Keep the pages of finished requests in a prefix tree and reuse them for prompts that share a prefix (0 disables).", "0"),
        EnvVar("OFFLOAD_SELECTOR", "selector", _str,
               "Page selector: which pages a query needs, from page summaries (`quest`).", "quest"),
        EnvVar("OFFLOAD_SCORER", "scorer", _str,
               "Criticality scorer: page scores from observed attention (`attention_mass`).", "attention_mass"),
        EnvVar("OFFLOAD_DEVICE_EVICTION", "device_eviction", _str,
               "Which cached pages leave the device first (`criticality`, `lru`).", "criticality"),
        EnvVar("OFFLOAD_PREFIX_EVICTION", "prefix_eviction", _str,
               "Which cached prefix pages leave the host first when the host budget needs room (`lru`, `criticality`).", "lru"),
        EnvVar("OFFLOAD_POLICY", "policy", _str,
               "KV policy: which pages a decode query attends within the token budget (`quest`, `window`, `streaming`, `h2o`, `tova`, `snapkv`, `pyramidkv`, `fastgen`, `sparq`, `kvmerger`, `d2o`, `oracle`; docs/policies.md). In exact mode it only decides residency.", "tova"),
        EnvVar("OFFLOAD_POLICY_EFFECT", "policy_effect", _str,
               "What an eviction policy does to pages it leaves out: `demote` (off the device and out of attention, home copy kept, may return) or `drop` (freed in every tier; sparse mode only).", "drop"),
        EnvVar("OFFLOAD_OBSERVATION_WINDOW", "observation_window", _int,
               "`snapkv` / `pyramidkv`: the prompt's last tokens whose attention votes for the pages kept (always kept themselves).", "32"),
        EnvVar("OFFLOAD_PYRAMID_BETA", "pyramid_beta", _float,
               "`pyramidkv`: the top layer's budget beyond the window is (budget - window) / beta; >= 1.", "20"),
        EnvVar("OFFLOAD_SPARQ_RANK", "sparq_rank", _int,
               "`sparq`: query components used to approximate attention (0: head_dim / 8, at least 4).", "4"),
        EnvVar("OFFLOAD_FASTGEN_RECOVERY", "fastgen_recovery", _float,
               "`fastgen`: share of a head's prompt attention its profile must recover, in [0, 1].", "0.9"),
        EnvVar("OFFLOAD_DISK_DIR", "disk_dir", _text,
               "Directory for the disk tier's page files (unset: no disk tier). When the host budget is full, the coldest pages spill there and the host caches the hot ones.", "/mnt/nvme/offload"),
        EnvVar("OFFLOAD_DISK_BUDGET", "disk_budget", _bytes,
               "Bytes of page files the disk tier may use, all layers. Default: 90% of the free space of OFFLOAD_DISK_DIR.", "200GiB"),
        EnvVar("OFFLOAD_REMOTE_LENDERS", "remote_lenders", _int,
               "Lender actors to start on the Ray cluster, each lending memory for pages below the host (0: no remote tier; needs `offload[distributed]`, docs/remote.md).", "2"),
        EnvVar("OFFLOAD_REMOTE_BUDGET", "remote_budget", _bytes,
               "Bytes of pages each lender holds, all layers.", "32GiB"),
        EnvVar("OFFLOAD_REMOTE_ADDRESS", "remote_address", _text,
               "Ray cluster address to connect to (unset: the running Ray session, or a local one).", "ray://head:10001"),
        EnvVar("OFFLOAD_REMOTE_ATTENTION", "remote_attention", _str,
               "Remote pages: `remote` (the lender attends them and returns only (out, lse)), `pull` (bring the pages over the wire) or `auto` (per step, whichever moves fewer bytes).", "remote"),
        EnvVar("OFFLOAD_MERGE_THRESHOLD", "merge_threshold", _float,
               "`d2o`: least cosine similarity between a leaving page and a kept one for it to be merged (else it is dropped), in [-1, 1].", "0.7"),
        EnvVar("OFFLOAD_KV_SHARING", "kv_sharing", _text,
               "Cross-layer KV sharing for a model that does not declare it: `consumer:producer` pairs (layer 1 attends layer 0's KV with its own queries, and stores none). An approximation unless the model was trained that way (docs/crosslayer.md).", "1:0,3:2"),
    ]
}

_FIELD_TO_VAR = {v.field: v.name for v in ENV_VARS.values()}


def var_for_field(field: str) -> str | None:
    """The `OFFLOAD_*` variable that sets a config field, if any."""
    return _FIELD_TO_VAR.get(field)


def read(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Parsed values of the `OFFLOAD_*` variables that are set, keyed by config field."""
    environ = os.environ if environ is None else environ
    known = set(ENV_VARS)
    unknown = sorted(k for k in environ if k.startswith("OFFLOAD_") and k not in known)
    if unknown:
        raise ValueError(
            f"unknown environment variable(s) {', '.join(unknown)}; offload reads only: {', '.join(sorted(known))}"
        )
    values: dict[str, Any] = {}
    for name, var in ENV_VARS.items():
        raw = environ.get(name)
        if raw is None or raw.strip() == "":
            continue
        values[var.field] = var.parse(name, raw)
    return values


__all__ = ["ENV_VARS", "EnvVar", "read", "var_for_field", "ACCEPTED_SIZES"]
