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

    @property
    def bytes_moved(self) -> int:
        return self.copied_bytes

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
