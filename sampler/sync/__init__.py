"""The weight sync: where a swap happens.

``weight_sync.WeightSync.update_params`` validates a trainer tree against a cached conversion
plan, waits for the swap window (the update gate, the engine quiesced or parked), and writes
the engine's leaves through ``leaves.EngineWeights`` (aliasing what already has the engine's
layout, converting the rest into the old buffers); ``inflight`` decides what happens to
requests running at the swap and stamps every answer with the weight versions that produced
it. A multi-process engine's sync (``sampler.multiprocess.sync``) is a ``WeightSync`` whose
steps are agreed among the processes.
"""

from sampler.sync.gate import UpdateGate
from sampler.sync.inflight import (
    IN_FLIGHT_MODES,
    WEIGHT_VERSIONS_KEY,
    InFlightSwitch,
    WeightVersions,
    check_in_flight,
    oldest_version,
    token_staleness,
    token_versions,
)
from sampler.sync.leaves import EngineWeights, buffer_pointers, live_device_bytes
from sampler.sync.weight_sync import Push, SwapWindow, WeightSync, is_path

__all__ = [
    "IN_FLIGHT_MODES",
    "WEIGHT_VERSIONS_KEY",
    "EngineWeights",
    "InFlightSwitch",
    "Push",
    "SwapWindow",
    "UpdateGate",
    "WeightSync",
    "WeightVersions",
    "buffer_pointers",
    "check_in_flight",
    "is_path",
    "live_device_bytes",
    "oldest_version",
    "token_staleness",
    "token_versions",
]
