"""What an update did, and whether the engine shares the trainer's buffers."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class UpdateReport:
    """One ``update_params`` call.

    ``aliased`` engine leaves now use the source's device buffers (no bytes moved);
    ``copied`` leaves were converted (reshape, transpose, cast, reshard, ...).
    ``live_bytes_*`` count every live device buffer in the process once.
    """

    version: int
    seconds: float
    source_format: str
    aliased: list[str]
    copied: list[str]
    aliased_bytes: int
    copied_bytes: int
    live_bytes_before: int | None = None
    live_bytes_after: int | None = None
    #: Transient memory: highest live bytes during the swap minus the larger of
    #: ``live_bytes_before`` and ``live_bytes_after`` (when tracked).
    peak_extra_bytes: int | None = None
    #: Largest single copied leaf: the bound on extra memory a leaf-by-leaf swap keeps.
    largest_copied_leaf_bytes: int = 0
    #: Engine weight leaves left as they were (``strict=False`` partial updates).
    untouched: list[str] = dataclasses.field(default_factory=list)
    plan_reused: bool = False
    #: Engine path -> how it got there: "alias", "view" (a reshaped view of the source's
    #: memory, per device), "convert in place" (written into the engine's old buffer),
    #: "convert", "reshard (host)" (placed from host views on CPU), "reshard (bucket)" (one
    #: XLA program per bucket), "reshard", "load" (host array), "copy" (``alias=False``).
    paths: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Bytes written per path (``copied_bytes`` is their sum; zero-copy paths move none).
    moved_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    #: What happened to requests in flight: "drain" (they finished first), "continue"
    #: (they went on with their KV cache), "recompute" (their KV was recomputed).
    in_flight: str = "drain"
    #: Requests in flight that switched to the new weights ("continue" / "recompute").
    requests_in_flight: int = 0
    #: Time the caller waited before the weights could change (requests finishing with
    #: "drain", the scheduler reaching an iteration boundary otherwise); part of ``seconds``.
    wait_seconds: float = 0.0
    #: Data-parallel samplers: one report per engine (paths above are prefixed ``engine<i>/``).
    engines: list["UpdateReport"] = dataclasses.field(default_factory=list)

    @classmethod
    def combine(cls, reports: list["UpdateReport"], seconds: float) -> "UpdateReport":
        """One report for an update of several engines, with the per-engine reports kept."""
        first, last = reports[0], reports[-1]
        peaks = [r.peak_extra_bytes for r in reports if r.peak_extra_bytes is not None]
        return cls(
            version=max(r.version for r in reports),
            seconds=seconds,
            source_format=first.source_format,
            aliased=[f"engine{i}/{p}" for i, r in enumerate(reports) for p in r.aliased],
            copied=[f"engine{i}/{p}" for i, r in enumerate(reports) for p in r.copied],
            aliased_bytes=sum(r.aliased_bytes for r in reports),
            copied_bytes=sum(r.copied_bytes for r in reports),
            live_bytes_before=first.live_bytes_before,
            live_bytes_after=last.live_bytes_after,
            peak_extra_bytes=max(peaks) if peaks else None,
            largest_copied_leaf_bytes=max(r.largest_copied_leaf_bytes for r in reports),
            untouched=list(first.untouched),
            plan_reused=all(r.plan_reused for r in reports),
            paths={f"engine{i}/{p}": k for i, r in enumerate(reports) for p, k in r.paths.items()},
            moved_bytes={
                k: sum(r.moved_bytes.get(k, 0) for r in reports) for k in {k for r in reports for k in r.moved_bytes}
            },
            in_flight=first.in_flight,
            requests_in_flight=sum(r.requests_in_flight for r in reports),
            wait_seconds=sum(r.wait_seconds for r in reports),  # engines are held one after another
            engines=list(reports),
        )

    def summary(self) -> str:
        mib = 1 << 20
        parts = [
            f"v{self.version} {self.source_format}: {self.seconds * 1e3:.1f} ms",
            f"aliased {len(self.aliased)} leaves ({self.aliased_bytes / mib:.2f} MiB)",
            f"copied {len(self.copied)} leaves ({self.copied_bytes / mib:.2f} MiB)",
        ]
        if self.live_bytes_before is not None and self.live_bytes_after is not None:
            parts.append(f"live {self.live_bytes_before / mib:.1f} -> {self.live_bytes_after / mib:.1f} MiB")
        if self.peak_extra_bytes is not None:
            parts.append(f"peak extra {self.peak_extra_bytes / mib:.2f} MiB")
        counts: dict[str, int] = {}
        for kind in self.paths.values():
            counts[kind] = counts.get(kind, 0) + 1
        if counts:
            parts.append(
                "paths: "
                + "; ".join(
                    f"{k} {n} ({self.moved_bytes.get(k, 0) / mib:.1f} MiB moved)" for k, n in sorted(counts.items())
                )
            )
        if self.in_flight != "drain":
            parts.append(f"{self.in_flight}: {self.requests_in_flight} requests in flight switched")
        if self.engines:
            parts.append(
                "per engine aliased/copied: "
                + " ".join(f"{i}:{len(r.aliased)}/{len(r.copied)}" for i, r in enumerate(self.engines))
            )
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SharingReport:
    """Per engine leaf: does the engine hold the very same device buffers as the source?"""

    shared: list[str]
    #: engine path -> why it is not shared
    copies: dict[str, str]

    @property
    def all_shared(self) -> bool:
        return not self.copies
