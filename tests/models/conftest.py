"""Fixtures for checkpoint loaders: the shared stories260K model (skipped when absent) and
writers of tiny llama2.c files, so format and error handling are tested everywhere."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

# ../shared/models/stories260K next to the repository root (see ../shared/models/README.md).
STORIES_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260K"

# dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len: GQA 2:1, head_dim 4.
TINY_HEADER = (16, 24, 2, 4, 2, 264, 32)


@pytest.fixture
def stories_dir() -> Path:
    if not (STORIES_DIR / "stories260K.bin").is_file():
        pytest.skip(f"stories260K not found at {STORIES_DIR} (shared test models are not shipped)")
    return STORIES_DIR


def llama2c_arrays(header: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights in llama2.c file order for `header` (the 7 int32 fields)."""
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = header
    head_dim = dim // heads
    kv_dim = kv_heads * head_dim
    rng = np.random.default_rng(seed)

    def rand(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    arrays = {
        "tok_embeddings": rand(abs(vocab), dim, scale=1.0),
        "rms_att": 1 + rand(layers, dim, scale=0.1),
        "wq": rand(layers, dim, dim),
        "wk": rand(layers, kv_dim, dim),
        "wv": rand(layers, kv_dim, dim),
        "wo": rand(layers, dim, dim),
        "rms_ffn": 1 + rand(layers, dim, scale=0.1),
        "w1": rand(layers, hidden, dim),
        "w2": rand(layers, dim, hidden),
        "w3": rand(layers, hidden, dim),
        "rms_final": 1 + rand(dim, scale=0.1),
        # Deliberately not cos/sin: loaders must ignore these two tables.
        "freq_cis_real": rand(seq_len * head_dim // 2),
        "freq_cis_imag": rand(seq_len * head_dim // 2),
    }
    if vocab < 0:
        arrays["wcls"] = rand(-vocab, dim, scale=1.0)
    return arrays


@pytest.fixture
def write_checkpoint(tmp_path):
    """`write(header=TINY_HEADER, arrays=None, name=...) -> Path` of a llama2.c version 0 file."""

    def write(header=TINY_HEADER, arrays=None, name="model.bin") -> Path:
        if arrays is None:
            arrays = llama2c_arrays(header)
        path = tmp_path / name
        with path.open("wb") as f:
            f.write(struct.pack("<7i", *header))
            for array in arrays.values():
                f.write(np.ascontiguousarray(array, dtype="<f4").tobytes())
        return path

    return write


def tiny_vocab(num_merges: int = 5) -> tuple[list[bytes], list[float]]:
    """A llama2.c vocabulary: 3 special tokens, 256 byte tokens, then a few merges."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)]
    merges = [b" ", b"a", b"b", b" a", b"ab", b" ab", b"ba"][:num_merges]
    scores = [0.0] * len(pieces) + [-float(i) for i in range(len(merges))]
    return pieces + merges, scores


@pytest.fixture
def write_tok_bin(tmp_path):
    """`write(pieces, scores, name=...) -> Path` of a llama2.c tokenizer file."""

    def write(pieces, scores, name="tok.bin") -> Path:
        path = tmp_path / name
        with path.open("wb") as f:
            f.write(struct.pack("<i", max(len(p) for p in pieces)))
            for piece, score in zip(pieces, scores):
                f.write(struct.pack("<fi", score, len(piece)) + piece)
        return path

    return write


@pytest.fixture
def tiny_header() -> tuple[int, ...]:
    """Header of the tiny checkpoint; its vocab matches `tiny_vocab()`'s 264 tokens."""
    return TINY_HEADER


@pytest.fixture
def write_tiny_tok_bin(write_tok_bin):
    """`write(num_merges=5, name=...) -> Path` of `tiny_vocab(num_merges)` as a tok.bin."""

    def write(num_merges=5, name="tok.bin") -> Path:
        return write_tok_bin(*tiny_vocab(num_merges), name=name)

    return write
