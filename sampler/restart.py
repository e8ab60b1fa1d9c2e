"""Rebuilding an engine after a fault, serving the weights it served.

An engine thread that fails (an upstream bug; see ``compat.patch_contain_engine_faults``)
leaves the engine unusable but the process, and the engine's weight arrays, intact. A new
engine (built on the main thread: sglang-jax installs signal handlers while it starts) then
gets, in this order of preference:

1. the very arrays the old engine served, when all are still alive (pushed trainer params,
   a loaded checkpoint, perturbed weights: whatever was served, aliased, no copy);
2. else the checkpoint directory loaded last (``load_checkpoint``);
3. else the weights of the sampler's configuration (``model_path`` / ``load_format``) when
   nothing replaced them since; otherwise the new engine refuses to generate until the
   trainer pushes weights again (``WeightsLostError``).

``SglangJaxSampler.restart()`` does this for a trainer; the HTTP server does it by itself
(``sampler.serve.rebuild``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class WeightSource:
    """Where the served weights came from last (what a restart can reload)."""

    #: "config": the sampler's own model_path/load_format; "checkpoint": ``path``;
    #: "pushed": an in-memory tree (only its arrays can bring it back).
    kind: str = "config"
    path: str | None = None


@dataclasses.dataclass
class ServedWeights:
    """What an engine serves, captured so that a new engine can serve it again."""

    #: Engine path -> the served array (engine layout), when every one is still alive.
    arrays: dict[str, jax.Array] | None
    fingerprint: str | None
    source: WeightSource
    version: int


@dataclasses.dataclass
class RestartReport:
    """What ``restart()`` did."""

    #: "arrays" (the served arrays, aliased), "checkpoint", "config" or "none" (push again).
    restored: str
    fingerprint: str | None
    seconds: float
    #: The fault that made the restart necessary (None for a restart of a healthy engine).
    fault: str | None = None

    def summary(self) -> str:
        return f"engine restarted in {self.seconds:.1f} s, weights restored from {self.restored}"


def capture(sampler: Any) -> ServedWeights:
    """The weights ``sampler`` (an ``SglangJaxSampler``) serves, with their source."""
    sync = sampler.sync
    arrays = None
    fingerprint = None
    if not sync.weights.broken:
        served = sync.engine_params()
        weights = {p: served[p] for p in sync.weight_paths()}
        if all(not x.is_deleted() for x in weights.values()):
            arrays = weights
            try:
                fingerprint = sync.fingerprint()
            except Exception:  # noqa: BLE001 - e.g. a leaf left on another device by the fault
                logger.warning("could not fingerprint the faulted engine's weights", exc_info=True)
    return ServedWeights(arrays, fingerprint, dataclasses.replace(sampler.weight_source), sync.version)


def restore(sampler: Any, served: ServedWeights) -> str:
    """Put ``served`` into ``sampler``'s new engine; returns how (see ``RestartReport``)."""
    if served.arrays is not None:
        sampler.update_params(served.arrays, source_format="sglang")
        if served.fingerprint is not None and sampler.fingerprint() != served.fingerprint:
            raise RuntimeError("the restarted engine's weights differ from the ones served before the restart")
        restored = "arrays"
    elif served.source.kind == "checkpoint":
        sampler.load_checkpoint(served.source.path)
        restored = "checkpoint"
    elif served.source.kind == "config":
        restored = "config"  # the new engine loaded them itself
    else:
        restored = "none"
    sampler.weight_source = served.source
    sampler.sync.version = served.version
    return restored


def restart_config(config: Any, served: ServedWeights) -> Any:
    """The config to build the new engine with: no weights to load when they come from
    elsewhere (the served arrays or a later checkpoint)."""
    if served.arrays is not None or served.source.kind != "config":
        return dataclasses.replace(config, load_format="dummy")
    return config
