"""Tokenizers for llama2.c checkpoints, usable where code expects a Hugging Face tokenizer.

Two vocab files describe the same tokenizer: a sentencepiece model (`tok512.model`, what the
checkpoint was trained with) and llama2.c's own export of it (`tok512.bin`). Both are wrapped
behind `Tokenizer`, which adds the surface our code uses from transformers tokenizers:
`encode`, `decode`, `batch_decode`, `__call__(texts, return_tensors="pt")` with left padding,
and the special token ids.

Why not `transformers.LlamaTokenizer`: in transformers 5 it converts the sentencepiece file to
a `tokenizers` model, which needs protobuf (not a dependency here), does not add BOS for this
file, and keeps runs of whitespace that sentencepiece collapses, so the model would see token
sequences unlike its training data. sentencepiece itself is exact and already a dependency.
"""

from __future__ import annotations

import numbers
import struct
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import BatchEncoding

# Fixed by llama2.c's sentencepiece training; the ids are not stored in `tok*.bin`.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# llama2.c's byte-fallback tokens <0x00>..<0xFF> follow the three special tokens.
_BYTE_OFFSET = 3


class Tokenizer:
    """Hugging Face-like front end; subclasses implement `_encode_text` and `_decode_text`.

    `pad_token_id` is `<unk>` (0): sentencepiece defines no pad token, and padding with EOS
    would make a padded prompt look finished. Batches are padded on the left so that the last
    position of every row is a real token, as decoder-only generation needs.
    """

    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    pad_token_id = UNK_ID
    unk_token_id = UNK_ID
    bos_token, eos_token, pad_token, unk_token = "<s>", "</s>", "<unk>", "<unk>"
    padding_side = "left"

    def __init__(self, path: Path, vocab_size: int):
        self.name_or_path = str(path)
        self.vocab_size = vocab_size

    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_text(self, ids: list[int]) -> str:
        """Text for ids that contain no special tokens, without the leading dummy-prefix space."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name_or_path!r}, vocab_size={self.vocab_size})"

    @property
    def all_special_ids(self) -> list[int]:
        return [UNK_ID, BOS_ID, EOS_ID]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, starting with BOS when `add_special_tokens` (as Llama's do)."""
        ids = self._encode_text(text)
        return [BOS_ID, *ids] if add_special_tokens else ids

    def decode(self, ids: int | Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, a 1-d tensor or one id); special tokens show as `<s>` etc."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        elif isinstance(ids, numbers.Integral):
            ids = [ids]
        names = {UNK_ID: self.unk_token, BOS_ID: self.bos_token, EOS_ID: self.eos_token}
        parts: list[str] = []
        run: list[int] = []
        for token in ids:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token} is outside the vocabulary [0, {self.vocab_size})")
            if token in names:
                if run:
                    parts.append(self._decode_text(run))
                    run = []
                if not skip_special_tokens:
                    parts.append(names[token])
            else:
                run.append(token)
        if run:
            parts.append(self._decode_text(run))
        return "".join(parts)

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor,
                     skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]

    def __call__(self, text: str | Sequence[str], return_tensors: str | None = None,
                 add_special_tokens: bool = True) -> BatchEncoding:
        """`input_ids` and `attention_mask` of one text or a batch, batches padded on the left.

        A single string gives one row (a list of ids, or a `[1, T]` tensor with
        `return_tensors="pt"`); a list of strings gives one row per string.
        """
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        single = isinstance(text, str)
        rows = [self.encode(t, add_special_tokens) for t in ([text] if single else text)]
        width = max((len(r) for r in rows), default=0)
        input_ids = [[self.pad_token_id] * (width - len(r)) + r for r in rows]
        attention_mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
        if single and return_tensors is None:
            input_ids, attention_mask = input_ids[0], attention_mask[0]
        return BatchEncoding({"input_ids": input_ids, "attention_mask": attention_mask},
                             tensor_type=return_tensors)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` file (what llama2.c's models were trained with)."""

    def __init__(self, path: str | Path):
        import sentencepiece

        path = Path(path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a readable sentencepiece model ({e})") from e
        specials = (self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if specials != (UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(f"{path}: expected unk/bos/eos ids (0, 1, 2) as in llama2.c, "
                             f"got {specials}")
        super().__init__(path, self._sp.vocab_size())

    def _encode_text(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def _decode_text(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


class Llama2cBinTokenizer(Tokenizer):
    """llama2.c's `tok*.bin`, encoded and decoded as `run.c` does.

    Format: int32 `max_token_length`, then per id: float32 merge score, int32 byte length,
    the piece's bytes (`▁` already replaced by a space, bytes as `<0xHH>`).
    Unlike sentencepiece, text is not normalised first: leading and repeated spaces are kept.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such tokenizer file")
        data = path.read_bytes()
        if len(data) < 4:
            raise ValueError(f"{path}: {len(data)} bytes is too short for a llama2.c tokenizer")
        (max_len,) = struct.unpack_from("<i", data, 0)
        if max_len <= 0:
            raise ValueError(f"{path}: max_token_length is {max_len}, must be positive")
        self.pieces: list[bytes] = []
        self.scores: list[float] = []
        offset = 4
        while offset < len(data):
            if offset + 8 > len(data):
                raise ValueError(f"{path}: truncated entry for token {len(self.pieces)} at byte {offset}")
            score, length = struct.unpack_from("<fi", data, offset)
            offset += 8
            if not 0 <= length <= max_len or offset + length > len(data):
                raise ValueError(f"{path}: token {len(self.pieces)} has length {length} at byte "
                                 f"{offset - 4} (max_token_length {max_len}, file {len(data)} bytes)")
            self.pieces.append(data[offset:offset + length])
            self.scores.append(score)
            offset += length
        if len(self.pieces) < _BYTE_OFFSET + 256:
            raise ValueError(f"{path}: {len(self.pieces)} tokens, fewer than the 3 special and "
                             "256 byte tokens every llama2.c vocabulary has")
        # First id wins on duplicate pieces; run.c's binary search may pick either.
        self._ids = {}
        for i, piece in enumerate(self.pieces):
            self._ids.setdefault(piece, i)
        super().__init__(path, len(self.pieces))

    def _encode_text(self, text: str) -> list[int]:
        if not text:
            return []
        # Dummy prefix, code points (or their UTF-8 bytes when absent), then greedy BPE merges
        # of the best-scoring adjacent pair, exactly as run.c's encode().
        ids: list[int] = []
        for char in " " + text:
            raw = char.encode("utf-8")
            if raw in self._ids:
                ids.append(self._ids[raw])
            else:
                ids.extend(b + _BYTE_OFFSET for b in raw)
        while True:
            best_score, best_i, best_id = float("-inf"), -1, -1
            for i in range(len(ids) - 1):
                merged = self._ids.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]])
                if merged is not None and self.scores[merged] > best_score:
                    best_score, best_i, best_id = self.scores[merged], i, merged
            if best_i < 0:
                return ids
            ids[best_i:best_i + 2] = [best_id]

    def _decode_text(self, ids: list[int]) -> str:
        out = bytearray()
        for token in ids:
            piece = self.pieces[token]
            if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
                out.append(int(piece[3:5], 16))
            else:
                out += piece
        text = out.decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text


def load_llama2c_tokenizer(path: str | Path) -> Tokenizer:
    """A sentencepiece `.model` or a llama2.c `.bin` tokenizer, chosen by file suffix."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such tokenizer file")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".bin":
        return Llama2cBinTokenizer(path)
    raise ValueError(f"{path}: unknown tokenizer format; expected a sentencepiece '.model' "
                     "or a llama2.c '.bin' file")
