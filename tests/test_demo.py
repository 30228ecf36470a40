"""`make demo` on a local transformers directory: runs, and exact mode reports identical tokens."""

from __future__ import annotations

from offload.demo import main
from tests.conftest import tiny_model


def test_demo_on_a_model_directory(tmp_path, capsys):
    tiny_model("qwen2").save_pretrained(tmp_path)
    main([str(tmp_path), "--prompt-tokens", "300", "--new-tokens", "4", "--budget-fraction", "0.3"])
    out = capsys.readouterr().out
    assert "mode=exact" in out and "mode=sparse" in out
    assert "identical tokens" in out
    assert "OffloadStats" in out
