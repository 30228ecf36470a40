"""`PrefixFiles`: prefix-cache pages on disk, reused by later processes (LMCache's and SGLang
HiCache's local-disk tier).

Each cached page (all layers) is one file named by a chained hash: the hash of page p covers the
model's identity, the KV layout and every token id of pages 0..p, so a file names exactly one
prefix of one model (vLLM's block hashes). A file is

    b"OFFLOADP" | header length (u32, little endian) | header (JSON) | payload

where the header holds the format version, the model identity, the layout, the page's token
ids, its own and its parent's hash and the payload's SHA-256, and the payload is every layer's
keys then values. A file is used only if every one of those checks out; anything else (a
truncated or corrupted file, another model's, another layout's, another format version's) is
refused and logged once, never attended: the prompt is forwarded instead.

Files are written atomically (a temporary file, then `os.replace`), so a crash never leaves a
half-written page under a real name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile

import numpy as np
import torch

from offload.store.layout import KVLayout

logger = logging.getLogger("offload")

MAGIC = b"OFFLOADP"
FORMAT_VERSION = 2  # 2: head-major pages [H_kv, page_size, D] (1 was token-major)
_LENGTH = struct.Struct("<I")


class PrefixFiles:
    def __init__(self, directory: str, layout: KVLayout, identity: str) -> None:
        self.layout = layout
        self.identity = identity
        self.layout_key = {"num_layers": layout.num_layers, "num_kv_heads": layout.num_kv_heads,
                           "head_dim": layout.head_dim, "page_size": layout.page_size, "dtype": str(layout.dtype)}
        self.root = hashlib.sha256(json.dumps([FORMAT_VERSION, identity, self.layout_key]).encode()).hexdigest()
        self.directory = os.path.join(directory, "prefix", self.root[:24])
        os.makedirs(self.directory, exist_ok=True)
        self.loaded_pages = 0
        self.saved_pages = 0
        self.rejected_files = 0
        self._warned = False

    def hashes(self, tokens: list[int], num_pages: int) -> list[str]:
        """The chained hash of each of the first `num_pages` whole pages of `tokens`."""
        ps = self.layout.page_size
        out, parent = [], self.root
        for p in range(num_pages):
            page = np.asarray(tokens[p * ps : (p + 1) * ps], dtype=np.int64).tobytes()
            parent = hashlib.sha256(parent.encode() + page).hexdigest()
            out.append(parent)
        return out

    def path(self, page_hash: str) -> str:
        return os.path.join(self.directory, page_hash + ".kvp")

    def has(self, page_hash: str) -> bool:
        return os.path.exists(self.path(page_hash))

    # ------------------------------------------------------------------ writing
    def save(self, page_hash: str, parent: str, tokens: list[int], keys: list[torch.Tensor],
             values: list[torch.Tensor]) -> None:
        """Write one page: keys/values per layer, each [H_kv, page_size, D] (CPU)."""
        payload = b"".join(_raw(t) for kv in zip(keys, values) for t in kv)
        header = json.dumps({
            "version": FORMAT_VERSION, "model": self.identity, "layout": self.layout_key, "tokens": list(tokens),
            "hash": page_hash, "parent": parent, "payload_bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
        }).encode()
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + _LENGTH.pack(len(header)) + header + payload)
            os.replace(tmp, self.path(page_hash))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self.saved_pages += 1

    # ------------------------------------------------------------------ reading
    def load(self, page_hash: str, parent: str, tokens: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """The page's keys and values per layer, or None if there is no such file or it fails a
        check (logged once, counted in `rejected_files`)."""
        path = self.path(page_hash)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._reject(path, f"unreadable ({exc})")
            return None
        reason = self._check(data, page_hash, parent, tokens)
        if reason is not None:
            self._reject(path, reason)
            return None
        (length,) = _LENGTH.unpack_from(data, len(MAGIC))
        payload = memoryview(data)[len(MAGIC) + _LENGTH.size + length :]
        shape = self.layout.page_shape
        size = len(payload) // (2 * self.layout.num_layers)
        keys, values = [], []
        for layer in range(self.layout.num_layers):
            base = 2 * layer * size
            keys.append(_tensor(payload[base : base + size], self.layout.dtype, shape))
            values.append(_tensor(payload[base + size : base + 2 * size], self.layout.dtype, shape))
        self.loaded_pages += 1
        return keys, values

    def _check(self, data: bytes, page_hash: str, parent: str, tokens: list[int]) -> str | None:
        """Why this file cannot be used, or None."""
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _LENGTH.size:
            return "not an offload prefix page (bad magic)"
        (length,) = _LENGTH.unpack_from(data, len(MAGIC))
        start = len(MAGIC) + _LENGTH.size
        try:
            header = json.loads(data[start : start + length])
        except ValueError:
            return "corrupted header"
        if not isinstance(header, dict):
            return "corrupted header"
        if header.get("version") != FORMAT_VERSION:
            return f"format version {header.get('version')!r}, this offload reads {FORMAT_VERSION}"
        if header.get("model") != self.identity:
            return "written by another model (identity differs)"
        if header.get("layout") != self.layout_key:
            return f"another KV layout ({header.get('layout')})"
        if header.get("hash") != page_hash or header.get("parent") != parent or header.get("tokens") != list(tokens):
            return "its tokens are not this prefix's"
        payload = data[start + length :]
        expected = self.layout.num_layers * self.layout.page_bytes
        if len(payload) != header.get("payload_bytes") or len(payload) != expected:
            return f"truncated ({len(payload)} of {expected} payload bytes)"
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            return "corrupted payload (checksum mismatch)"
        return None

    def _reject(self, path: str, reason: str) -> None:
        self.rejected_files += 1
        if not self._warned:
            self._warned = True
            logger.warning("refused prefix page file %s: %s; those tokens are forwarded instead", path, reason)


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()


def _tensor(raw: memoryview, dtype: torch.dtype, shape) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
