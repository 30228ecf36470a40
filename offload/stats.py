"""`OffloadStats`: what a run moved, held and spent, counted rather than estimated."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from offload.sizes import format_bytes


@dataclass
class OffloadStats:
    h2d_bytes: int = 0  # host -> device page copies (promotions)
    d2h_bytes: int = 0  # device -> host page copies (home copies of completed pages)
    device_peak_bytes: int = 0  # most device-tier bytes in use at any time (pages + summaries)
    device_reserved_bytes: int = 0  # device-tier bytes allocated (pools + summaries)
    device_budget_bytes: int = 0
    host_bytes: int = 0  # host-tier bytes in use now (every live request and the prefix cache)
    host_reserved_bytes: int = 0  # ... of which held for merged tokens (merging policies), not pages
    pages_resident: int = 0  # complete pages with a device copy now, all layers and sequences
    pages_total: int = 0  # complete pages now, all layers and sequences
    host_attn_s: float = 0.0
    device_attn_s: float = 0.0
    link_s: float = 0.0  # time the link was busy, both directions (emulated, or CUDA events)
    h2d_link_s: float = 0.0  # ... with host -> device copies
    d2h_link_s: float = 0.0  # ... with device -> host copies
    h2d_transfers: int = 0  # contiguous host -> device copies: coalesced runs of pages, keys and values one each
    d2h_transfers: int = 0  # contiguous device -> host copies (home copies)
    d2h_wait_s: float = 0.0  # time readers of host copies waited for asynchronous home copies to land
    failed_home_copies: int = 0  # home copies that failed in the background (rewritten synchronously)
    stall_s: float = 0.0  # time the compute waited on copies
    needed_pages: int = 0  # decode steps: pages (beyond sinks and recent window) the real query selected
    needed_on_device: int = 0  # ... of which were resident or in flight when the layer ran
    prefetch_issued_pages: int = 0
    prefetch_hit_pages: int = 0  # speculated pages that the real query then selected
    prefetch_skipped: int = 0  # layer steps that did not speculate: their selections kept finding every page on the device
    skipped_pages: int = 0  # sparse mode, sparse_misses="skip": needed pages not attended
    failed_copies: int = 0  # pages whose copy failed (read from the host instead)
    failed_kernels: int = 0  # host-kernel failures recovered by the torch kernel
    mass_device: float = 0.0  # sum over decode query rows and heads of the device part's share of attention mass
    mass_rows: int = 0
    dropped_pages: int = 0  # policy_effect="drop": complete pages freed for good (all layers)
    dropped_bytes: int = 0  # ... their bytes: how much the KV footprint shrank
    kv_bytes: int = 0  # bytes of the complete pages this request holds now (all layers and sequences)
    gathered_bytes: int = 0  # host pages read into the device part (per-head selections)
    device_read_bytes: int = 0  # KV bytes the device part read (counted per key attended)
    host_read_bytes: int = 0  # KV bytes the host part read (whole pages attended there)
    merged_pages: int = 0  # merging policies: pages merged into one token per KV head
    policy_read_bytes: int = 0  # keys a policy read to choose pages (SparQ, the oracle)
    oracle_pages: int = 0  # measured runs (KVStore.measure): the oracle's top pages, per KV head and step
    oracle_hits: int = 0  # ... of which the policy kept
    mass_missed: float = 0.0  # measured runs: exact attention mass outside the kept pages
    mass_measured_rows: int = 0
    disk_read_bytes: int = 0  # page bytes read from the disk tier (attention and copies)
    disk_write_bytes: int = 0  # page bytes written to the disk tier (spills)
    spilled_pages: int = 0  # pages whose host copy left for a lower tier (host full)
    promoted_pages: int = 0  # lower-tier pages brought back to the host (hot again)
    wire_pull_bytes: int = 0  # remote tier: page bytes pulled over the wire
    wire_attend_bytes: int = 0  # remote tier: bytes over the wire for remote attention (queries out, partials back)
    remote_attend_s: float = 0.0  # remote tier: wall time of remote attention calls
    recomputed_pages: int = 0  # pages a lower tier lost, recomputed from their token ids (all layers)
    recoveries: int = 0  # steps that found lost pages and recomputed them
    lower_bytes: int = 0  # bytes of pages held in the tiers below the host now (all layers)
    prefix_disk_pages: int = 0  # prefix pages (all layers each) read from files an earlier process wrote
    prefix_rejected_files: int = 0  # prefix page files refused (corrupt, truncated, another model's)
    tokens_generated: int = 0
    tokens_prefilled: int = 0  # tokens forwarded through the model in prefill (prefix hits excluded)
    prefix_hit_tokens: int = 0  # prompt tokens reused from the prefix cache instead of prefilled
    prefix_cached_pages: int = 0  # pages (per layer) the prefix cache holds now
    prefix_device_pages: int = 0  # reused pages whose device copy an earlier request left (no copy needed)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    per_layer: list[dict] = field(default_factory=list)

    @property
    def h2d_bytes_per_token(self) -> float:
        return self.h2d_bytes / self.tokens_generated if self.tokens_generated else 0.0

    @property
    def moved_bytes_per_token(self) -> float:
        """Every byte a decode step brought to the device part or read to choose pages, per token:
        page copies, pages read into the device part and keys a policy read."""
        moved = self.h2d_bytes + self.gathered_bytes + self.policy_read_bytes
        return moved / self.tokens_generated if self.tokens_generated else 0.0

    @property
    def link_gbps(self) -> float:
        """Achieved link bandwidth: bytes copied either way / time the link was busy, in GB/s."""
        return (self.h2d_bytes + self.d2h_bytes) / self.link_s / 1e9 if self.link_s > 0 else 0.0

    @property
    def h2d_gbps(self) -> float:
        """Achieved host -> device bandwidth: bytes / time the link was busy with them, in GB/s."""
        return self.h2d_bytes / self.h2d_link_s / 1e9 if self.h2d_link_s > 0 else 0.0

    @property
    def d2h_gbps(self) -> float:
        """Achieved device -> host bandwidth (home copies), in GB/s."""
        return self.d2h_bytes / self.d2h_link_s / 1e9 if self.d2h_link_s > 0 else 0.0

    @property
    def transfers(self) -> int:
        return self.h2d_transfers + self.d2h_transfers

    @property
    def bytes_per_transfer(self) -> float:
        """Mean size of a contiguous transfer, both directions: what coalescing raises."""
        return (self.h2d_bytes + self.d2h_bytes) / self.transfers if self.transfers else 0.0

    @property
    def prefetch_recall(self) -> float:
        """Needed pages already resident or in flight when the layer ran / needed pages."""
        return self.needed_on_device / self.needed_pages if self.needed_pages else 1.0

    @property
    def prefetch_precision(self) -> float:
        """Speculated pages the real query selected / speculated pages."""
        return self.prefetch_hit_pages / self.prefetch_issued_pages if self.prefetch_issued_pages else 0.0

    @property
    def mass_coverage(self) -> float:
        """Share of the attention mass that fell on the device part (decode steps), from the lse."""
        return self.mass_device / self.mass_rows if self.mass_rows else 1.0

    @property
    def oracle_recall(self) -> float:
        """Measured runs: share of the oracle's top pages (same budget, per KV head) the policy kept."""
        return self.oracle_hits / self.oracle_pages if self.oracle_pages else 1.0

    @property
    def mass_captured(self) -> float:
        """Measured runs: share of the exact attention mass on the pages the policy kept (and the tail)."""
        return 1.0 - self.mass_missed / self.mass_measured_rows if self.mass_measured_rows else 1.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_generated / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        data = asdict(self)
        data["h2d_bytes_per_token"] = self.h2d_bytes_per_token
        data["moved_bytes_per_token"] = self.moved_bytes_per_token
        data["link_gbps"] = self.link_gbps
        data["h2d_gbps"] = self.h2d_gbps
        data["d2h_gbps"] = self.d2h_gbps
        data["transfers"] = self.transfers
        data["bytes_per_transfer"] = self.bytes_per_transfer
        data["tokens_per_s"] = self.tokens_per_s
        data["prefetch_recall"] = self.prefetch_recall
        data["prefetch_precision"] = self.prefetch_precision
        data["mass_coverage"] = self.mass_coverage
        data["oracle_recall"] = self.oracle_recall
        data["mass_captured"] = self.mass_captured
        return data

    def __str__(self) -> str:
        budget = self.device_budget_bytes or 1
        lines = [
            "OffloadStats",
            f"  device tier : peak {format_bytes(self.device_peak_bytes)} of {format_bytes(self.device_budget_bytes)} budget "
            f"({100 * self.device_peak_bytes / budget:.1f}%), reserved {format_bytes(self.device_reserved_bytes)}",
            f"  host tier   : {format_bytes(self.host_bytes)}",
            f"  pages       : {self.pages_resident} of {self.pages_total} complete pages resident on the device",
            f"  moved       : h2d {format_bytes(self.h2d_bytes)} ({format_bytes(self.h2d_bytes_per_token)}/token), "
            f"d2h {format_bytes(self.d2h_bytes)}, link time {self.link_s:.3f} s"
            + (f" ({self.link_gbps:.1f} GB/s achieved)" if self.link_s > 0 else "")
            + (f", gathered {format_bytes(self.gathered_bytes)}" if self.gathered_bytes else "")
            + (f", read by the policy {format_bytes(self.policy_read_bytes)}" if self.policy_read_bytes else ""),
            f"  transfers   : {self.h2d_transfers} h2d + {self.d2h_transfers} d2h, "
            f"{format_bytes(int(self.bytes_per_transfer))} each on average"
            + (f", h2d {self.h2d_gbps:.1f} GB/s, d2h {self.d2h_gbps:.1f} GB/s achieved" if self.link_s > 0 else "")
            + (f", {self.d2h_wait_s:.3f} s waiting for home copies" if self.d2h_wait_s else "")
            + (f", {self.failed_home_copies} home copies rewritten" if self.failed_home_copies else ""),
            f"  prefetch    : recall {self.prefetch_recall:.3f} ({self.needed_on_device}/{self.needed_pages} needed pages on the "
            f"device), precision {self.prefetch_precision:.3f} ({self.prefetch_hit_pages}/{self.prefetch_issued_pages}), "
            f"mass coverage {self.mass_coverage:.3f}, stall {self.stall_s:.3f} s"
            + (f", {self.prefetch_skipped} quiet layer steps not speculated" if self.prefetch_skipped else "")
            + (f", {self.skipped_pages} pages skipped" if self.skipped_pages else ""),
            f"  attention   : device {self.device_attn_s:.3f} s, host {self.host_attn_s:.3f} s"
            + (f" ({self.failed_copies} failed copies, {self.failed_kernels} failed kernels recovered)"
               if self.failed_copies or self.failed_kernels else ""),
            f"  KV held     : {format_bytes(self.kv_bytes)} in complete pages"
            + (f" ({self.dropped_pages} pages, {format_bytes(self.dropped_bytes)} dropped by the policy)"
               if self.dropped_pages else ""),
            f"  prefix cache: {self.prefix_hit_tokens} prompt tokens reused ({self.prefix_device_pages} pages already on "
            f"the device), {self.prefix_cached_pages} pages cached",
            f"  tokens      : {self.tokens_prefilled} prefilled, {self.tokens_generated} generated"
            + (f" ({self.tokens_per_s:.1f} tokens/s)" if self.decode_s > 0 else ""),
        ]
        return "\n".join(lines)
