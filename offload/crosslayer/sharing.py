"""The `kv_sharing` map: which decoder layer attends which earlier layer's KV (consumer -> producer).

Written as "consumer:producer" pairs separated by commas ("1:0,3:2": layer 1 attends layer 0's
KV with its own queries, layer 3 attends layer 2's), or as a dict {consumer: producer}. A consumer
stores nothing; its producer's KV is stored once and read by every consumer of it.

The rules that need no model are checked here (when an `OffloadConfig` is built); the ones that do
(the layers exist, both are attention layers of the same kind, the model declares no sharing of
its own) are checked when a model is wrapped (`offload.hf.layers.kv_sources`).
"""

from __future__ import annotations

from collections.abc import Mapping

SHARING_FORMAT = ("'consumer:producer' pairs separated by commas (e.g. '1:0,3:2': layer 1 reads layer 0's KV) "
                  "or a dict {consumer: producer}")


def parse_sharing(value, setting: str = "kv_sharing") -> dict[int, int] | None:
    """The map `value` describes, sorted by consumer; None for no sharing (None, "" or {}).

    Raises ValueError naming `setting`, the value and what is accepted."""
    if value is None:
        return None
    if isinstance(value, str):
        pairs = _parse_pairs(value, setting)
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        raise ValueError(f"{setting}={value!r} is not a sharing map; expected {SHARING_FORMAT}")
    sharing: dict[int, int] = {}
    for consumer, producer in pairs:
        for layer in (consumer, producer):
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"{setting}={value!r}: layer {layer!r} is not a layer index (an integer >= 0); "
                                 f"expected {SHARING_FORMAT}")
        if consumer in sharing:
            raise ValueError(f"{setting}={value!r}: layer {consumer} is given two producers; each consumer reads "
                             "one layer's KV")
        if producer >= consumer:
            raise ValueError(f"{setting}={value!r}: layer {consumer} cannot read layer {producer}'s KV; a producer "
                             "must be an earlier layer (its KV exists when the consumer runs)")
        sharing[consumer] = producer
    for consumer, producer in sharing.items():
        if producer in sharing:
            raise ValueError(
                f"{setting}={value!r}: layer {consumer} reads layer {producer}'s KV, but layer {producer} stores none "
                f"(it reads layer {sharing[producer]}'s); write {consumer}:{sharing[producer]}")
    return dict(sorted(sharing.items())) or None


def _parse_pairs(text: str, setting: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        if not item.strip():
            continue
        parts = item.split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            pairs.append((int(parts[0].strip()), int(parts[1].strip())))
        except ValueError:
            raise ValueError(f"{setting}={text!r}: {item.strip()!r} is not a pair of layer indices; "
                             f"expected {SHARING_FORMAT}") from None
    return pairs


def format_sharing(sharing: Mapping[int, int] | None) -> str:
    """The string form of a map ("" for none): what `OFFLOAD_KV_SHARING` takes."""
    return ",".join(f"{c}:{p}" for c, p in sorted((sharing or {}).items()))


def kv_layers(num_layers: int, sharing: Mapping[int, int] | None) -> list[int]:
    """The layers that store KV (every layer that is not a consumer)."""
    return [i for i in range(num_layers) if i not in (sharing or {})]
