"""Load a llama2.c checkpoint (`.bin`, legacy version 0) as a transformers `LlamaForCausalLM`.

Format (all little-endian): a header of 7 int32 `dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, seq_len` (negative `vocab_size`: the classifier is stored separately),
then float32 arrays in PyTorch `(out, in)` order: `tok_embeddings[V, D]`, `rms_att[L, D]`,
`wq[L, D, D]`, `wk[L, KVD, D]`, `wv[L, KVD, D]`, `wo[L, D, D]`, `rms_ffn[L, D]`,
`w1[L, H, D]`, `w2[L, D, H]`, `w3[L, H, D]`, `rms_final[D]`, two unused RoPE tables of
`seq_len * head_dim / 2` floats each, and `wcls[V, D]` only when unshared.

llama2.c rotates adjacent pairs (0, 1), (2, 3), ... of each head with RoPE; transformers'
Llama rotates halves (i, i + head_dim / 2). The two agree once the output rows of `wq` and
`wk` are permuted per head so that row 2i lands at i and row 2i + 1 at i + head_dim / 2.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from offload.models.tokenizer import BOS_ID, EOS_ID, UNK_ID, Tokenizer, load_llama2c_tokenizer

HEADER_BYTES = 7 * 4
# llama2.c's newer exports (version >= 1) start with this uint32 ("ak42" read little-endian).
_VERSIONED_MAGIC = 0x616B3432
_ROPE_THETA = 10000.0
_RMS_NORM_EPS = 1e-5


@dataclass(frozen=True, slots=True)
class Llama2cHeader:
    """The 7 header fields; `vocab_size` is positive, its sign moved to `shared_classifier`."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool = True

    def __post_init__(self):
        for field in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"):
            value = getattr(self, field)
            if value <= 0:
                raise ValueError(f"{field} is {value}, must be positive")
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads {self.n_heads} does not divide dim {self.dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads {self.n_kv_heads} does not divide n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} (dim / n_heads) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def num_floats(self) -> int:
        """float32 values after the header: weights, the two RoPE tables, `wcls` if unshared."""
        d, h, n, v, kvd = self.dim, self.hidden_dim, self.n_layers, self.vocab_size, self.kv_dim
        per_layer = 2 * d + 2 * d * d + 2 * kvd * d + 3 * h * d
        classifier = 0 if self.shared_classifier else v * d
        return v * d + n * per_layer + d + self.seq_len * self.head_dim + classifier

    @property
    def file_bytes(self) -> int:
        return HEADER_BYTES + 4 * self.num_floats

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            intermediate_size=self.hidden_dim,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            max_position_embeddings=self.seq_len,
            rms_norm_eps=_RMS_NORM_EPS,
            rope_parameters={"rope_type": "default", "rope_theta": _ROPE_THETA},
            tie_word_embeddings=self.shared_classifier,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            dtype=torch.float32,
        )


def read_llama2c_header(path: str | Path) -> Llama2cHeader:
    """The header of a llama2.c checkpoint, checked against the file's size."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such llama2.c checkpoint file")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is too short for a llama2.c header ({HEADER_BYTES} bytes)")
    with path.open("rb") as f:
        raw = f.read(HEADER_BYTES)
    if struct.unpack_from("<I", raw)[0] == _VERSIONED_MAGIC:
        raise ValueError(f"{path}: a versioned llama2.c export (magic 'ak42'); only the legacy "
                         "version 0 format is supported (export with --version 0)")
    fields = struct.unpack("<7i", raw)
    try:
        header = Llama2cHeader(*fields[:5], abs(fields[5]), fields[6], shared_classifier=fields[5] > 0)
    except ValueError as e:
        names = "dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len"
        raise ValueError(f"{path}: bad llama2.c header ({names} = {fields}): {e}") from None
    if size != header.file_bytes:
        problem = "truncated" if size < header.file_bytes else "has trailing data"
        raise ValueError(f"{path}: file is {problem}: {size} bytes, but its header "
                         f"{dataclasses.astuple(header)} implies {header.file_bytes}")
    return header


def _pairs_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute the output rows `[n_heads * head_dim, in]` of a q/k projection, per head, from
    llama2.c's adjacent RoPE pairs to transformers' rotate-half layout."""
    out_features, in_features = w.shape
    head_dim = out_features // n_heads
    return w.view(n_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def load_llama2c_model(path: str | Path) -> LlamaForCausalLM:
    """A float32 `LlamaForCausalLM` in eval mode holding the weights of a llama2.c `.bin`."""
    path = Path(path)
    header = read_llama2c_header(path)
    values = np.fromfile(path, dtype="<f4", offset=HEADER_BYTES)
    if not np.isfinite(values).all():
        raise ValueError(f"{path}: {int((~np.isfinite(values)).sum())} weights are NaN or infinite")
    flat = torch.from_numpy(values)
    cursor = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal cursor
        count = int(np.prod(shape))
        tensor = flat[cursor:cursor + count].view(shape)
        cursor += count
        return tensor

    h = header
    embed = take(h.vocab_size, h.dim)
    rms_att = take(h.n_layers, h.dim)
    wq = take(h.n_layers, h.dim, h.dim)
    wk = take(h.n_layers, h.kv_dim, h.dim)
    wv = take(h.n_layers, h.kv_dim, h.dim)
    wo = take(h.n_layers, h.dim, h.dim)
    rms_ffn = take(h.n_layers, h.dim)
    w1 = take(h.n_layers, h.hidden_dim, h.dim)
    w2 = take(h.n_layers, h.dim, h.hidden_dim)
    w3 = take(h.n_layers, h.hidden_dim, h.dim)
    rms_final = take(h.dim)
    take(h.seq_len * h.head_dim)  # the two RoPE tables; transformers computes its own
    wcls = embed if h.shared_classifier else take(h.vocab_size, h.dim)
    assert cursor == h.num_floats == flat.numel()

    state = {"model.embed_tokens.weight": embed, "model.norm.weight": rms_final, "lm_head.weight": wcls}
    for i in range(h.n_layers):
        prefix = f"model.layers.{i}."
        state |= {
            prefix + "input_layernorm.weight": rms_att[i],
            prefix + "self_attn.q_proj.weight": _pairs_to_halves(wq[i], h.n_heads),
            prefix + "self_attn.k_proj.weight": _pairs_to_halves(wk[i], h.n_kv_heads),
            prefix + "self_attn.v_proj.weight": wv[i],
            prefix + "self_attn.o_proj.weight": wo[i],
            prefix + "post_attention_layernorm.weight": rms_ffn[i],
            prefix + "mlp.gate_proj.weight": w1[i],
            prefix + "mlp.up_proj.weight": w3[i],
            prefix + "mlp.down_proj.weight": w2[i],
        }
    model = LlamaForCausalLM(header.llama_config()).float()
    model.load_state_dict(state, strict=True)
    # sentencepiece has no pad token; <unk> pads finished rows in batched generation.
    model.generation_config.pad_token_id = UNK_ID
    return model.eval()


def find_llama2c_tokenizer(path: str | Path, vocab_size: int) -> Path:
    """The tokenizer file next to checkpoint `path`: `tok{V}.model`, `tok{V}.bin`,
    `tokenizer.model` or `tokenizer.bin`, first found."""
    folder = Path(path).parent
    names = [f"tok{vocab_size}.model", f"tok{vocab_size}.bin", "tokenizer.model", "tokenizer.bin"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"{path}: no tokenizer next to the checkpoint (looked for {', '.join(names)} "
                     f"in {folder}); pass tokenizer_path")


def load_llama2c(path: str | Path, tokenizer_path: str | Path | None = None
                 ) -> tuple[LlamaForCausalLM, Tokenizer]:
    """The model of a llama2.c checkpoint and its tokenizer (found next to it when not given).

    Raises ValueError when the tokenizer's vocabulary size differs from the checkpoint's.
    """
    model = load_llama2c_model(path)
    vocab_size = model.config.vocab_size
    if tokenizer_path is None:
        tokenizer_path = find_llama2c_tokenizer(path, vocab_size)
    tokenizer = load_llama2c_tokenizer(tokenizer_path)
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens but "
                         f"checkpoint {path} has vocab_size {vocab_size}; they do not belong together")
    return model, tokenizer
