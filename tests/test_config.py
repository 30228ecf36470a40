"""Every OFFLOAD_* variable: parsing, precedence, and errors that name the variable."""

from __future__ import annotations

import pytest

from offload import OffloadConfig
from offload.envs import ENV_VARS
from offload.sizes import parse_bytes

# variable -> values that must be rejected
BAD_VALUES = {
    "OFFLOAD_DEVICE_BUDGET": ["12 parsecs", "-1", "0", "1.5"],
    "OFFLOAD_HOST_BUDGET": ["12 parsecs", "-1", "0", "lots"],
    "OFFLOAD_PAGE_SIZE": ["0", "-1", "sixteen", "1.5"],
    "OFFLOAD_MODE": ["fast", "EXACTLY", "1"],
    "OFFLOAD_TOKEN_BUDGET": ["0", "-1", "many"],
    "OFFLOAD_SINK_TOKENS": ["-1", "four"],
    "OFFLOAD_RECENT_TOKENS": ["-1", "1e3x"],
    "OFFLOAD_CPU_THREADS": ["0", "-1", "two"],
    "OFFLOAD_CPU_KERNEL": ["fastest", "cuda"],
    "OFFLOAD_EMULATE_LINK_GBPS": ["-1", "fast", "nan"],
    "OFFLOAD_EMULATE_LINK_LATENCY_US": ["-1", "slow", "nan"],
    "OFFLOAD_PREFILL_CHUNK": ["0", "-1", "big"],
    "OFFLOAD_PROMOTE_PAGES": ["-1", "x"],
    "OFFLOAD_PREFETCH": ["maybe", "2"],
    "OFFLOAD_SPARSE_MISSES": ["drop", "device"],
    "OFFLOAD_SCORE_DECAY": ["-0.1", "1.5", "slow"],
    "OFFLOAD_STICKY_MARGIN": ["-1", "nan", "wide"],
    "OFFLOAD_PREFIX_CACHE": ["sometimes", "2"],
    "OFFLOAD_SELECTOR": ["oracle-ish", "1"],
    "OFFLOAD_SCORER": ["h3o"],
    "OFFLOAD_DEVICE_EVICTION": ["fifo", "lfu"],
    "OFFLOAD_PREFIX_EVICTION": ["random"],
    "OFFLOAD_POLICY": ["h3o", "kvpress"],
    "OFFLOAD_POLICY_EFFECT": ["evict", "1"],
    "OFFLOAD_OBSERVATION_WINDOW": ["0", "-1", "wide"],
    "OFFLOAD_PYRAMID_BETA": ["0.5", "steep", "nan"],
    "OFFLOAD_SPARQ_RANK": ["-1", "r"],
    "OFFLOAD_FASTGEN_RECOVERY": ["-0.1", "1.5", "most"],
    "OFFLOAD_MERGE_THRESHOLD": ["-1.5", "2", "similar"],
    "OFFLOAD_DISK_DIR": ["/proc/version"],  # a file, not a directory
    "OFFLOAD_DISK_BUDGET": ["12 parsecs", "0", "-1"],
    "OFFLOAD_REMOTE_LENDERS": ["-1", "two", "1.5"],
    "OFFLOAD_REMOTE_BUDGET": ["0", "lots"],
    "OFFLOAD_REMOTE_ADDRESS": ["nowhere", "ray://head", "head:port"],
    "OFFLOAD_REMOTE_ATTENTION": ["sometimes"],
    "OFFLOAD_KV_SHARING": ["1", "1:1", "0:1", "a:b", "2:1,1:0", "1:0,1:0", "1:-1", "1:0:2"],
}


def test_every_variable_has_bad_value_cases():
    assert set(BAD_VALUES) == set(ENV_VARS)


@pytest.mark.parametrize("var,value", [(var, value) for var, values in BAD_VALUES.items() for value in values])
def test_bad_env_value_names_the_variable(var, value):
    with pytest.raises(ValueError) as err:
        OffloadConfig.from_env({var: value})
    message = str(err.value)
    assert var in message
    assert repr(value.strip().lower()) in message.lower() or value in message


@pytest.mark.parametrize(
    "field,value",
    [("page_size", 0), ("mode", "fast"), ("device_budget", "12 parsecs"), ("device_budget", -1),
     ("token_budget", 0), ("cpu_threads", 0), ("emulate_link_gbps", -1.0), ("sink_tokens", -1)],
)
def test_bad_keyword_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        OffloadConfig.from_env({}, **{field: value})


def test_precedence_keyword_over_env_over_default():
    assert OffloadConfig.from_env({}).page_size == 16
    assert OffloadConfig.from_env({"OFFLOAD_PAGE_SIZE": "32"}).page_size == 32
    assert OffloadConfig.from_env({"OFFLOAD_PAGE_SIZE": "32"}, page_size=8).page_size == 8


def test_env_values_parse():
    cfg = OffloadConfig.from_env({
        "OFFLOAD_DEVICE_BUDGET": "64MiB", "OFFLOAD_HOST_BUDGET": "2GB", "OFFLOAD_MODE": "Sparse",
        "OFFLOAD_EMULATE_LINK_GBPS": "25", "OFFLOAD_CPU_KERNEL": "torch", "OFFLOAD_SCORE_DECAY": "0.5",
    })
    assert cfg.device_budget == 64 * 2**20
    assert cfg.host_budget == 2 * 10**9
    assert cfg.mode == "sparse"
    assert cfg.emulate_link_gbps == 25.0
    assert cfg.cpu_kernel == "torch"


def test_unknown_variable_is_an_error():
    with pytest.raises(ValueError, match="OFFLOAD_PAGESIZE"):
        OffloadConfig.from_env({"OFFLOAD_PAGESIZE": "16"})


def test_unknown_keyword_is_an_error():
    with pytest.raises(TypeError, match="page_sise"):
        OffloadConfig.from_env({}, page_sise=16)


@pytest.mark.parametrize(
    "text,expected",
    [("1073741824", 2**30), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1.5 GiB", 3 * 2**29), ("64kib", 65536), ("7B", 7)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text, "x") == expected


def test_host_budget_defaults_to_available_memory():
    assert OffloadConfig.from_env({}).host_budget > 0


def test_readme_documents_every_variable():
    from pathlib import Path

    from offload.config import env_table_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for var in ENV_VARS:
        assert f"`{var}`" in readme, f"{var} is missing from the README's table"
    assert env_table_markdown() in readme, "README's OFFLOAD_* table is stale: paste offload.config.env_table_markdown()"


@pytest.mark.parametrize("mode,prefetch,speculates", [
    ("exact", None, False), ("sparse", None, True), ("exact", True, True), ("sparse", False, False),
])
def test_prefetch_defaults_to_sparse_mode_only(mode, prefetch, speculates):
    assert OffloadConfig.from_env({}, mode=mode, prefetch=prefetch).speculates is speculates


def test_prefetch_env_accepts_auto():
    assert OffloadConfig.from_env({"OFFLOAD_PREFETCH": "auto"}).prefetch is None
    assert OffloadConfig.from_env({"OFFLOAD_PREFETCH": "1"}).prefetch is True
