"""The llama2.c loader against llama2.c itself: a float64 numpy port of run.c's forward pass
(adjacent-pair RoPE, RMSNorm, SwiGLU, GQA) that parses the `.bin` on its own, the reference
text of stories260K, and clear errors on corrupt files."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from offload.models.llama2c import load_llama2c, load_llama2c_model, read_llama2c_header

# Float32 model vs float64 reference, logits of magnitude ~10: only float32 rounding remains.
LOGITS_ATOL = 1e-4

REFERENCE_TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside "
                  "in the park. One day, she saw a big, red ball.")


def read_run_c_weights(path):
    """Config and weights as run.c's `read_checkpoint` maps them (float64)."""
    with open(path, "rb") as f:
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("<7i", f.read(28))
        data = np.frombuffer(f.read(), dtype="<f4").astype(np.float64)
    shared = vocab > 0
    vocab = abs(vocab)
    head_size = dim // heads
    kv_dim = dim * kv_heads // heads
    shapes = [("token_embedding", (vocab, dim)), ("rms_att", (layers, dim)),
              ("wq", (layers, dim, dim)), ("wk", (layers, kv_dim, dim)), ("wv", (layers, kv_dim, dim)),
              ("wo", (layers, dim, dim)), ("rms_ffn", (layers, dim)), ("w1", (layers, hidden, dim)),
              ("w2", (layers, dim, hidden)), ("w3", (layers, hidden, dim)), ("rms_final", (dim,)),
              ("freq_cis", (seq_len * head_size,))]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    w, offset = {}, 0
    for name, shape in shapes:
        size = int(np.prod(shape))
        w[name] = data[offset:offset + size].reshape(shape)
        offset += size
    assert offset == data.size
    if shared:
        w["wcls"] = w["token_embedding"]
    config = dict(dim=dim, layers=layers, heads=heads, kv_heads=kv_heads, head_size=head_size, kv_dim=kv_dim)
    return config, w


def run_c_forward(path, tokens):
    """Logits [T, V] for `tokens`, one position at a time with a KV cache, as run.c forward()."""
    c, w = read_run_c_weights(path)
    dim, head_size, kv_dim = c["dim"], c["head_size"], c["kv_dim"]
    kv_mul = c["heads"] // c["kv_heads"]
    key_cache = np.zeros((c["layers"], len(tokens), kv_dim))
    value_cache = np.zeros((c["layers"], len(tokens), kv_dim))

    def rmsnorm(x, weight):
        return weight * x / np.sqrt(np.mean(x * x) + 1e-5)

    logits = []
    for pos, token in enumerate(tokens):
        x = w["token_embedding"][token].copy()
        for l in range(c["layers"]):
            xb = rmsnorm(x, w["rms_att"][l])
            q, k, v = w["wq"][l] @ xb, w["wk"][l] @ xb, w["wv"][l] @ xb
            for i in range(0, dim, 2):  # RoPE on adjacent pairs; k only spans kv_dim
                freq = 1.0 / 10000.0 ** ((i % head_size) / head_size)
                fcr, fci = np.cos(pos * freq), np.sin(pos * freq)
                for vec in (q, k) if i < kv_dim else (q,):
                    v0, v1 = vec[i], vec[i + 1]
                    vec[i], vec[i + 1] = v0 * fcr - v1 * fci, v0 * fci + v1 * fcr
            key_cache[l, pos], value_cache[l, pos] = k, v
            out = np.zeros(dim)
            for h in range(c["heads"]):
                kv = slice((h // kv_mul) * head_size, (h // kv_mul + 1) * head_size)
                att = key_cache[l, :pos + 1, kv] @ q[h * head_size:(h + 1) * head_size] / np.sqrt(head_size)
                att = np.exp(att - att.max())
                att /= att.sum()
                out[h * head_size:(h + 1) * head_size] = att @ value_cache[l, :pos + 1, kv]
            x = x + w["wo"][l] @ out
            xb = rmsnorm(x, w["rms_ffn"][l])
            hb, hb2 = w["w1"][l] @ xb, w["w3"][l] @ xb
            x = x + w["w2"][l] @ (hb / (1.0 + np.exp(-hb)) * hb2)
        logits.append(w["wcls"] @ rmsnorm(x, w["rms_final"]))
    return np.stack(logits)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


@pytest.mark.parametrize("shared", [True, False], ids=["tied", "untied"])
def test_tiny_logits_match_run_c(write_checkpoint, tiny_header, shared):
    header = tiny_header if shared else (*tiny_header[:5], -tiny_header[5], tiny_header[6])
    path = write_checkpoint(header)
    model = load_llama2c_model(path)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == shared
    tokens = [1, 5, 200, 17, 263, 0, 42, 42, 9, 100, 3]  # 11: not a power of two, repeats
    np.testing.assert_allclose(hf_logits(model, tokens), run_c_forward(path, tokens), rtol=0, atol=LOGITS_ATOL)


def test_stories260k_logits_match_run_c(stories_dir):
    path = stories_dir / "stories260K.bin"
    model, tokenizer = load_llama2c(path)
    tokens = tokenizer.encode("Once upon a time, there was a dog named Max. He")
    np.testing.assert_allclose(hf_logits(model, tokens), run_c_forward(path, tokens), rtol=0, atol=LOGITS_ATOL)


def test_stories260k_config(stories_dir):
    header = read_llama2c_header(stories_dir / "stories260K.bin")
    assert (header.dim, header.hidden_dim, header.n_layers, header.n_heads, header.n_kv_heads,
            header.vocab_size, header.seq_len, header.shared_classifier) == (64, 172, 5, 8, 4, 512, 512, True)
    config = load_llama2c_model(stories_dir / "stories260K.bin").config
    assert config.max_position_embeddings == 512 and config.rms_norm_eps == 1e-5
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)


@pytest.mark.parametrize("tokenizer_name", ["tok512.model", "tok512.bin"])
def test_stories260k_greedy_matches_reference_text(stories_dir, tokenizer_name):
    model, tokenizer = load_llama2c(stories_dir / "stories260K.bin", stories_dir / tokenizer_name)
    inputs = tokenizer("Once upon a time", return_tensors="pt")
    assert inputs["input_ids"][0, 0].item() == tokenizer.bos_token_id == 1
    out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    assert tokenizer.decode(out[0], skip_special_tokens=True).startswith(REFERENCE_TEXT)


def test_stories260k_batched_left_padded_generation_matches_single(stories_dir):
    model, tokenizer = load_llama2c(stories_dir / "stories260K.bin")
    prompts = ["Once upon a time", "Lily"]
    batch = model.generate(**tokenizer(prompts, return_tensors="pt"), max_new_tokens=12, do_sample=False)
    for prompt, row in zip(prompts, tokenizer.batch_decode(batch, skip_special_tokens=True)):
        single = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=12, do_sample=False)
        assert row == tokenizer.decode(single[0], skip_special_tokens=True)


def test_tokenizer_found_next_to_checkpoint(write_checkpoint, write_tiny_tok_bin):
    path = write_checkpoint()
    write_tiny_tok_bin(name="tokenizer.bin")
    model, tokenizer = load_llama2c(path)
    assert tokenizer.vocab_size == model.config.vocab_size == 264


def test_missing_tokenizer_is_reported(write_checkpoint):
    path = write_checkpoint()
    with pytest.raises(ValueError, match=r"no tokenizer next to the checkpoint.*tok264\.model"):
        load_llama2c(path)


def test_mismatched_tokenizer_is_rejected(write_checkpoint, write_tiny_tok_bin):
    path = write_checkpoint()  # vocab 264
    tok_path = write_tiny_tok_bin(num_merges=3)  # 262 tokens
    with pytest.raises(ValueError, match=r"tok\.bin has 262 tokens but checkpoint .*model\.bin has vocab_size 264"):
        load_llama2c(path, tok_path)


def test_stories260k_with_foreign_tokenizer_is_rejected(stories_dir, write_tiny_tok_bin):
    with pytest.raises(ValueError, match="has 264 tokens but checkpoint .* has vocab_size 512"):
        load_llama2c(stories_dir / "stories260K.bin", write_tiny_tok_bin())


# Corrupt input: every error names the file and what is wrong.


def patch_header(path, **fields):
    names = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"]
    data = bytearray(path.read_bytes())
    values = list(struct.unpack_from("<7i", data))
    for name, value in fields.items():
        values[names.index(name)] = value
    struct.pack_into("<7i", data, 0, *values)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(dim=0), "dim is 0, must be positive"),
        (dict(hidden_dim=-24), "hidden_dim is -24, must be positive"),
        (dict(n_layers=0), "n_layers is 0, must be positive"),
        (dict(n_heads=-4), "n_heads is -4, must be positive"),
        (dict(n_kv_heads=0), "n_kv_heads is 0, must be positive"),
        (dict(vocab_size=0), "vocab_size is 0, must be positive"),
        (dict(seq_len=-1), "seq_len is -1, must be positive"),
        (dict(n_heads=3), "n_heads 3 does not divide dim 16"),
        (dict(n_kv_heads=3), "n_kv_heads 3 does not divide n_heads 4"),
        (dict(n_heads=16, n_kv_heads=8), r"head_dim 1 \(dim / n_heads\) must be even"),
    ],
)
def test_bad_header_is_rejected(write_checkpoint, fields, message):
    path = patch_header(write_checkpoint(), **fields)
    with pytest.raises(ValueError, match=rf"model\.bin: bad llama2\.c header .*: {message}"):
        load_llama2c_model(path)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (dict(), None),
        (dict(n_layers=3), "truncated"),  # plausible header, more layers than stored
        (dict(vocab_size=-264), "truncated"),  # claims a separate classifier that is not there
        (dict(seq_len=16), "has trailing data"),
    ],
)
def test_size_must_match_header(write_checkpoint, fields, problem):
    path = patch_header(write_checkpoint(), **fields)
    if problem is None:
        assert read_llama2c_header(path).file_bytes == path.stat().st_size
        return
    with pytest.raises(ValueError, match=rf"model\.bin: file is {problem}: \d+ bytes, but its header .* implies \d+"):
        load_llama2c_model(path)


@pytest.mark.parametrize("keep_bytes", [0, 27, 28, 1000, -4])
def test_truncated_file_is_rejected(write_checkpoint, keep_bytes):
    path = write_checkpoint()
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])
    message = "too short for a llama2.c header" if 0 <= keep_bytes < 28 else "file is truncated"
    with pytest.raises(ValueError, match=rf"model\.bin: .*{message}"):
        load_llama2c_model(path)


def test_missing_file_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.bin: no such llama2\.c checkpoint file"):
        load_llama2c_model(tmp_path / "nope.bin")


def test_versioned_export_is_rejected(write_checkpoint):
    path = write_checkpoint()
    path.write_bytes(struct.pack("<Ii", 0x616B3432, 1) + path.read_bytes()[8:])
    with pytest.raises(ValueError, match="versioned llama2.c export .* only the legacy version 0"):
        load_llama2c_model(path)


def test_non_finite_weights_are_rejected(write_checkpoint):
    path = write_checkpoint()
    data = bytearray(path.read_bytes())
    struct.pack_into("<f", data, 28 + 4 * 5, float("nan"))
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.bin: 1 weights are NaN or infinite"):
        load_llama2c_model(path)
