"""`OffloadConfig`: every knob of the runtime, validated once at construction.

Precedence: keyword arguments > `OFFLOAD_*` environment variables > defaults.
Checks that depend on the model or the batch (is the device budget large enough for the sinks
and tails of every layer?) happen in `OffloadCache.reserve`, at the start of `generate`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

import psutil

from offload import envs, policies
from offload.crosslayer.sharing import parse_sharing
from offload.sizes import parse_bytes

MODES = ("exact", "sparse")
SPARSE_MISSES = ("host", "skip")
CPU_KERNELS = ("auto", "cpp", "numba", "torch")
REMOTE_ATTENTION = ("auto", "pull", "remote")
REMOTE_ADDRESS = re.compile(r"auto|(ray://)?[\w.\-\[\]:]+:\d+")


def _default_cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _default_host_budget() -> int:
    return int(psutil.virtual_memory().available)


def _name(field_name: str) -> str:
    var = envs.var_for_field(field_name)
    return f"{field_name} ({var})" if var else field_name


@dataclass
class OffloadConfig:
    """Runtime configuration. Sizes are bytes (strings like "64MiB" are accepted), counts are tokens."""

    device_budget: int | str = "512MiB"
    host_budget: int | str | None = None  # None: psutil's available memory
    page_size: int = 16
    mode: str = "exact"
    token_budget: int | None = None  # None: the tokens of pages the device budget holds at once
    sink_tokens: int = 16
    recent_tokens: int = 128
    cpu_threads: int = field(default_factory=_default_cpu_threads)
    cpu_kernel: str = "auto"
    emulate_link_gbps: float = 0.0
    emulate_link_latency_us: float = 5.0  # per contiguous transfer, only with emulate_link_gbps
    prefill_chunk: int = 512
    prefetch: bool | None = None  # None: speculate in sparse mode only (see `speculates`)
    sparse_misses: str = "host"
    promote_pages: int = 4
    score_decay: float = 0.9
    sticky_margin: float = 4.0  # nats a page off the device must out-bound a resident one by (QuestPolicy)
    prefix_cache: bool = True
    selector: str = "quest"
    scorer: str = "attention_mass"
    device_eviction: str = "criticality"
    prefix_eviction: str = "lru"
    policy: str = "quest"
    policy_effect: str = "demote"
    observation_window: int = 32
    pyramid_beta: float = 20.0
    sparq_rank: int = 0  # 0: head_dim / 8, at least 4
    fastgen_recovery: float = 0.95
    merge_threshold: float = 0.5
    disk_dir: str | None = None  # None: no disk tier
    disk_budget: int | str | None = None  # None: 90% of the free space of disk_dir
    remote_lenders: int = 0
    remote_budget: int | str = "1GiB"
    remote_address: str | None = None
    remote_attention: str = "auto"
    kv_sharing: str | dict | None = None  # consumer layer -> producer layer, "1:0,3:2" (docs/crosslayer.md)

    def __post_init__(self) -> None:
        self.device_budget = parse_bytes(self.device_budget, _name("device_budget"))
        if self.host_budget is None:
            self.host_budget = _default_host_budget()
        self.host_budget = parse_bytes(self.host_budget, _name("host_budget"))
        if self.device_budget <= 0:
            raise ValueError(f"{_name('device_budget')}={self.device_budget!r} must be a positive byte size")
        if self.host_budget <= 0:
            raise ValueError(f"{_name('host_budget')}={self.host_budget!r} must be a positive byte size")
        self._check_int("page_size", minimum=1)
        if self.token_budget is not None:
            self._check_int("token_budget", minimum=1)
        self._check_int("sink_tokens", minimum=0)
        self._check_int("recent_tokens", minimum=0)
        self._check_int("cpu_threads", minimum=1)
        self._check_int("prefill_chunk", minimum=1)
        self._check_int("promote_pages", minimum=0)
        if isinstance(self.mode, str):
            self.mode = self.mode.lower()
        if self.mode not in MODES:
            raise ValueError(f"{_name('mode')}={self.mode!r} is not a mode; expected one of {', '.join(MODES)}")
        if isinstance(self.cpu_kernel, str):
            self.cpu_kernel = self.cpu_kernel.lower()
        if self.cpu_kernel not in CPU_KERNELS:
            raise ValueError(
                f"{_name('cpu_kernel')}={self.cpu_kernel!r} is not a kernel; expected one of {', '.join(CPU_KERNELS)}"
            )
        if self.prefetch is not None and not isinstance(self.prefetch, bool):
            raise ValueError(f"{_name('prefetch')}={self.prefetch!r} must be True, False or None (auto)")
        if not isinstance(self.prefix_cache, bool):
            raise ValueError(f"{_name('prefix_cache')}={self.prefix_cache!r} must be True or False")
        self._check_policy("selector", policies.SELECTORS)
        self._check_policy("scorer", policies.SCORERS)
        self._check_policy("device_eviction", policies.EVICTION_ORDERS)
        self._check_policy("prefix_eviction", policies.EVICTION_ORDERS)
        self._check_policy("policy", policies.POLICIES)
        if isinstance(self.policy_effect, str):
            self.policy_effect = self.policy_effect.lower()
        if self.policy_effect not in policies.EFFECTS:
            raise ValueError(f"{_name('policy_effect')}={self.policy_effect!r} is not an effect; expected one of "
                             f"{', '.join(policies.EFFECTS)}")
        if self.policy_effect == "drop":
            if self.mode != "sparse":
                raise ValueError(f"{_name('policy_effect')}='drop' frees pages for good, which exact mode cannot do; "
                                 f"use mode='sparse' (OFFLOAD_MODE=sparse) or policy_effect='demote'")
            if not policies.POLICIES[self.policy].evicts:
                evicting = sorted(n for n, c in policies.POLICIES.items() if c.evicts)
                raise ValueError(f"{_name('policy_effect')}='drop': policy {self.policy!r} selects per query and "
                                 f"never evicts; use policy_effect='demote' or one of {', '.join(evicting)}")
        self._check_int("observation_window", minimum=1)
        self._check_int("sparq_rank", minimum=0)
        self._check_float("pyramid_beta", minimum=1.0)
        self._check_float("fastgen_recovery", minimum=0.0, maximum=1.0)
        self._check_float("merge_threshold", minimum=-1.0, maximum=1.0)
        if isinstance(self.sparse_misses, str):
            self.sparse_misses = self.sparse_misses.lower()
        if self.sparse_misses not in SPARSE_MISSES:
            raise ValueError(
                f"{_name('sparse_misses')}={self.sparse_misses!r} is not accepted; expected one of {', '.join(SPARSE_MISSES)}"
            )
        self._check_float("emulate_link_gbps", minimum=0.0)
        self._check_float("emulate_link_latency_us", minimum=0.0)
        if self.disk_dir is not None:
            if not isinstance(self.disk_dir, (str, os.PathLike)) or not str(self.disk_dir).strip():
                raise ValueError(f"{_name('disk_dir')}={self.disk_dir!r} must be a directory path")
            self.disk_dir = os.fspath(self.disk_dir)
            if os.path.exists(self.disk_dir) and not os.path.isdir(self.disk_dir):
                raise ValueError(f"{_name('disk_dir')}={self.disk_dir!r} exists and is not a directory")
        if self.disk_budget is not None:
            self.disk_budget = parse_bytes(self.disk_budget, _name("disk_budget"))
            if self.disk_budget <= 0:
                raise ValueError(f"{_name('disk_budget')}={self.disk_budget!r} must be a positive byte size")
            if self.disk_dir is None:
                raise ValueError(f"{_name('disk_budget')} is set but {_name('disk_dir')} is not: "
                                 "name the directory for the disk tier's page files")
        self._check_int("remote_lenders", minimum=0)
        self.remote_budget = parse_bytes(self.remote_budget, _name("remote_budget"))
        if self.remote_budget <= 0:
            raise ValueError(f"{_name('remote_budget')}={self.remote_budget!r} must be a positive byte size")
        if self.remote_address is not None and not (
                isinstance(self.remote_address, str) and REMOTE_ADDRESS.fullmatch(self.remote_address.strip())):
            raise ValueError(f"{_name('remote_address')}={self.remote_address!r} is not a Ray address; expected "
                             "'auto', host:port or ray://host:port")
        if isinstance(self.remote_attention, str):
            self.remote_attention = self.remote_attention.lower()
        if self.remote_attention not in REMOTE_ATTENTION:
            raise ValueError(f"{_name('remote_attention')}={self.remote_attention!r} is not accepted; expected one of "
                             f"{', '.join(REMOTE_ATTENTION)}")
        self._check_float("score_decay", minimum=0.0, maximum=1.0)
        self._check_float("sticky_margin", minimum=0.0)
        self.kv_sharing = parse_sharing(self.kv_sharing, _name("kv_sharing"))

    @property
    def speculates(self) -> bool:
        """Whether decode steps prefetch speculatively. By default only in sparse mode: in exact mode
        the host part attends every page that is not resident anyway, so speculation only adds
        copies (measured: bench/results/decode_8k.md, exact 21.4 tokens/s without it, 16.5 with)."""
        return self.prefetch if self.prefetch is not None else self.mode == "sparse"

    def _check_int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{_name(name)}={value!r} must be an integer >= {minimum}")
        if value < minimum:
            raise ValueError(f"{_name(name)}={value!r} is out of range; expected an integer >= {minimum}")

    def _check_policy(self, name: str, registry: dict) -> None:
        value = getattr(self, name)
        if isinstance(value, str):
            value = value.lower()
            setattr(self, name, value)
        if value not in registry:
            raise ValueError(f"{_name(name)}={value!r} is not a policy; expected one of {', '.join(sorted(registry))}")

    def _check_float(self, name: str, minimum: float, maximum: float | None = None) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ValueError(f"{_name(name)}={value!r} must be a number")
        if value < minimum or (maximum is not None and value > maximum):
            allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise ValueError(f"{_name(name)}={value!r} is out of range; expected a number {allowed}")
        setattr(self, name, float(value))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "OffloadConfig":
        """Defaults, then `OFFLOAD_*` variables, then `overrides` (keyword arguments win)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown OffloadConfig field(s) {', '.join(unknown)}; fields are: {', '.join(sorted(names))}")
        values = envs.read(environ)
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> "OffloadConfig":
        return dataclasses.replace(self, **changes)


def env_table_markdown() -> str:
    """The README's table of `OFFLOAD_*` variables (a test keeps the README equal to this)."""
    defaults = {f.name: f.default for f in dataclasses.fields(OffloadConfig)}
    defaults["host_budget"] = "available memory (psutil)"
    defaults["cpu_threads"] = "cores this process may use"
    defaults["token_budget"] = "what the device budget holds"
    defaults["prefetch"] = "auto: sparse mode only"
    defaults["disk_dir"] = "unset (no disk tier)"
    defaults["disk_budget"] = "90% of the free space"
    defaults["remote_address"] = "unset (local or running Ray)"
    defaults["kv_sharing"] = "unset (every layer keeps its own KV)"
    rows = ["| variable | field | default | example | meaning |", "|---|---|---|---|---|"]
    for var in envs.ENV_VARS.values():
        default = defaults[var.field]
        shown = default if isinstance(default, str) and " " in default else f"`{default}`"
        rows.append(f"| `{var.name}` | `{var.field}` | {shown} | `{var.example}` | {var.doc} |")
    return "\n".join(rows) + "\n"
