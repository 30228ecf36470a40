"""Prefix pages on disk: a second process reuses a prompt the first one cached, with identical
tokens and without forwarding it; truncated, corrupted and other models' files are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offload import OffloadedModel
from offload.store import prefix_files
from tests.conftest import tiny_model

PAGE = 8
GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
PROMPT = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(21))

RUN = """
import json, sys, torch
from offload import OffloadedModel
from tests.conftest import tiny_model
prompt = torch.tensor(json.loads(sys.argv[2]))
om = OffloadedModel(tiny_model("llama-gqa"), page_size=8, disk_dir=sys.argv[1])
out = om.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
s = om.stats
print(json.dumps({"tokens": out.tolist(), "prefilled": s.tokens_prefilled, "hit": s.prefix_hit_tokens,
                  "from_disk": s.prefix_disk_pages, "rejected": s.prefix_rejected_files}))
"""


def _process(directory) -> dict:
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
    env["PYTHONPATH"] = str(root)
    done = subprocess.run([sys.executable, "-c", RUN, str(directory), json.dumps(PROMPT.tolist())],
                          capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_reuses_the_prefix_from_disk(tmp_path):
    with torch.no_grad():
        ref = tiny_model("llama-gqa").generate(PROMPT, **GREEDY)
    first = _process(tmp_path)
    second = _process(tmp_path)
    assert first["tokens"] == second["tokens"] == ref.tolist()
    assert first["from_disk"] == 0 and first["prefilled"] == PROMPT.shape[1]
    # (the last prompt token is always forwarded: its logits start generation)
    assert second["from_disk"] == (PROMPT.shape[1] - 1) // PAGE and second["rejected"] == 0
    assert second["prefilled"] == PROMPT.shape[1] - second["hit"] < PAGE + 1


def _write(directory, model=None) -> list[Path]:
    om = OffloadedModel(model or tiny_model("llama-gqa"), page_size=PAGE, disk_dir=str(directory))
    om.generate(PROMPT, **GREEDY)
    om.unwrap()
    return sorted((Path(directory) / "prefix").rglob("*.kvp"))


def _reuse(directory, model=None):
    model = model or tiny_model("llama-gqa")
    om = OffloadedModel(model, page_size=PAGE, disk_dir=str(directory))
    try:
        return om.generate(PROMPT, **GREEDY), om.stats
    finally:
        om.unwrap()


def _first_page_file(files: list[Path]) -> Path:
    """The file of the prompt's first page (its parent is the root hash)."""
    for path in files:
        data = path.read_bytes()
        (length,) = prefix_files._LENGTH.unpack_from(data, len(prefix_files.MAGIC))
        header = json.loads(data[len(prefix_files.MAGIC) + 4 : len(prefix_files.MAGIC) + 4 + length])
        if header["tokens"] == PROMPT[0, :PAGE].tolist():
            return path
    raise AssertionError("no file for the first page")


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "flip_header", "empty"])
def test_damaged_files_are_refused_and_the_prompt_is_forwarded(tmp_path, damage, caplog):
    with torch.no_grad():
        ref = tiny_model("llama-gqa").generate(PROMPT, **GREEDY)
    path = _first_page_file(_write(tmp_path))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "flip_payload":
        data[-5] ^= 0xFF
    elif damage == "flip_header":
        data[12] ^= 0xFF
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="offload"):
        out, stats = _reuse(tmp_path)
    assert torch.equal(out, ref)
    assert stats.prefix_rejected_files == 1 and stats.prefix_disk_pages == 0  # nothing past a bad page
    assert stats.tokens_prefilled == PROMPT.shape[1]
    assert any("refused prefix page file" in r.getMessage() for r in caplog.records)


def test_another_models_files_are_never_read(tmp_path):
    import transformers

    from tests.conftest import FAMILIES, TINY

    config_cls, model_cls, kv_heads = FAMILIES["llama-gqa"]
    torch.manual_seed(99)  # same config, other weights
    other = getattr(transformers, model_cls)(getattr(transformers, config_cls)(num_key_value_heads=kv_heads, **TINY)).eval()
    theirs = _write(tmp_path / "theirs", other)
    ours = _write(tmp_path / "ours")
    assert {p.name for p in theirs}.isdisjoint(p.name for p in ours)  # names cover the model's identity
    # A file of theirs put under our name: its header names another model; it is refused.
    target = _first_page_file(ours)
    target.write_bytes(_first_page_file(theirs).read_bytes())
    with torch.no_grad():
        ref = tiny_model("llama-gqa").generate(PROMPT, **GREEDY)
    out, stats = _reuse(tmp_path / "ours")
    assert torch.equal(out, ref)
    assert stats.prefix_rejected_files == 1 and stats.prefix_disk_pages == 0
