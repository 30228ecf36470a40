"""Tokenizers of llama2.c checkpoints: the sentencepiece wrapper, run.c's BPE over `tok*.bin`
(checked against sentencepiece on the real vocabulary), the HF-like call surface, bad files."""

from __future__ import annotations

import struct

import pytest
import torch

from offload.models.tokenizer import Llama2cBinTokenizer, SentencePieceTokenizer, load_llama2c_tokenizer

TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    'Lily and Ben went to the park. "Hi!" she said.\nThe end.',
    "héllo wörld 日本 🙂",  # byte fallback
    "a",
]


@pytest.fixture
def sp_tokenizer(stories_dir):
    return SentencePieceTokenizer(stories_dir / "tok512.model")


@pytest.fixture
def bin_tokenizer(stories_dir):
    return Llama2cBinTokenizer(stories_dir / "tok512.bin")


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_round_trip(sp_tokenizer, text):
    ids = sp_tokenizer.encode(text)
    assert ids[0] == 1 and 1 not in ids[1:]
    assert sp_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert sp_tokenizer.decode(ids) == "<s>" + text
    assert sp_tokenizer.encode(text, add_special_tokens=False) == ids[1:]


@pytest.mark.parametrize("text", TEXTS)
def test_bin_tokenizer_agrees_with_sentencepiece(sp_tokenizer, bin_tokenizer, text):
    assert bin_tokenizer.vocab_size == sp_tokenizer.vocab_size == 512
    ids = sp_tokenizer.encode(text)
    assert bin_tokenizer.encode(text) == ids
    assert bin_tokenizer.decode(ids) == sp_tokenizer.decode(ids)


def test_tiny_bin_tokenizer_merges_and_byte_fallback(write_tiny_tok_bin):
    tokenizer = load_llama2c_tokenizer(write_tiny_tok_bin())
    # 259 " ", 260 "a", 261 "b", 262 " a" (score -3), 263 "ab" (-4): " a" wins, leftmost first.
    assert tokenizer.encode("ab a", add_special_tokens=False) == [262, 261, 262]
    assert tokenizer.decode([262, 261, 262]) == "ab a"
    assert tokenizer.encode("é") == [1, 259, 0xC3 + 3, 0xA9 + 3]
    assert tokenizer.decode([1, 259, 0xC3 + 3, 0xA9 + 3], skip_special_tokens=True) == "é"
    assert tokenizer.encode("", add_special_tokens=False) == []


def test_call_pads_batches_on_the_left(write_tiny_tok_bin):
    tokenizer = load_llama2c_tokenizer(write_tiny_tok_bin())
    single = tokenizer("ab")  # " a" outscores "ab": [" a", "b"]
    assert single["input_ids"] == [1, 262, 261] and single["attention_mask"] == [1, 1, 1]
    one = tokenizer("ab", return_tensors="pt")
    assert one.input_ids.tolist() == [[1, 262, 261]] and one.attention_mask.dtype == torch.long
    batch = tokenizer(["ab a", "a", ""], return_tensors="pt")
    pad = tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[1, 262, 261, 262], [pad, pad, 1, 262], [pad, pad, pad, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    assert tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True) == ["ab a", "a", ""]
    assert tokenizer(["a"], add_special_tokens=False)["input_ids"] == [[262]]
    with pytest.raises(ValueError, match="return_tensors must be None or 'pt'"):
        tokenizer("a", return_tensors="np")


def test_special_ids_and_decode_range(write_tiny_tok_bin):
    tokenizer = load_llama2c_tokenizer(write_tiny_tok_bin())
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    assert len(tokenizer) == tokenizer.vocab_size == 264 and tokenizer.padding_side == "left"
    assert tokenizer.decode(torch.tensor([1, 262, 2])) == "<s>a</s>"
    assert tokenizer.decode(262) == "a"
    with pytest.raises(ValueError, match=r"token id 264 is outside the vocabulary \[0, 264\)"):
        tokenizer.decode([264])


def tok_bin_bytes(pieces, max_len=8):
    return struct.pack("<i", max_len) + b"".join(struct.pack("<fi", 0.0, len(p)) + p for p in pieces)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "0 bytes is too short"),
        (struct.pack("<i", 0), "max_token_length is 0"),
        (tok_bin_bytes([b"<unk>"] * 300)[:-3], "token 299 has length 5 at byte"),
        (tok_bin_bytes([b"<unk>"] * 300) + b"\x00\x00", "truncated entry for token 300"),
        (tok_bin_bytes([b"<unk>", b"toolongpiece"]), "token 1 has length 12 .*max_token_length 8"),
        (tok_bin_bytes([b"<unk>"] * 10), "10 tokens, fewer than"),
    ],
)
def test_corrupt_bin_tokenizer_is_rejected(tmp_path, data, message):
    path = tmp_path / "tok.bin"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=rf"tok\.bin: {message}"):
        load_llama2c_tokenizer(path)


def test_bad_tokenizer_paths_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"tok\.model: no such tokenizer file"):
        load_llama2c_tokenizer(tmp_path / "tok.model")
    (tmp_path / "tok.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tok\.json: unknown tokenizer format"):
        load_llama2c_tokenizer(tmp_path / "tok.json")
    (tmp_path / "tok.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match=r"tok\.model: not a readable sentencepiece model"):
        load_llama2c_tokenizer(tmp_path / "tok.model")
