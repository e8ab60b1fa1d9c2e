"""``WeightSync`` for one process of a multi-process engine: every step (validation, park,
write) is agreed with the other processes, so all succeed or all raise alike."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

from converters.fingerprint import fingerprint_from_partials, partial_digests
from converters.registry import canonical_key
from converters.source import as_param_tree, key_paths
from sampler.config import SamplerConfig
from sampler.errors import PeerFailureError, UpdateTimeoutError
from sampler.multiprocess.engine import MultiNodeEngineHandle
from sampler.multiprocess.group import ProcessGroup, agree, status
from sampler.reports import UpdateReport
from sampler.sync.inflight import check_in_flight
from sampler.sync.weight_sync import Push, SwapWindow, WeightSync, check_finite_leaves


@dataclasses.dataclass
class _MultiPush(Push):
    #: Paths of the source leaves, when they are to be checked for NaN/Inf under the park.
    finite_paths: Sequence[str] | None = None


class MultiProcessSync(WeightSync):
    """``WeightSync`` for one process of a multi-process engine: every step is agreed
    with the other processes (see the module docstring)."""

    handle: MultiNodeEngineHandle

    def __init__(self, handle: MultiNodeEngineHandle, config: SamplerConfig):
        super().__init__(handle, config)
        self.group = ProcessGroup(handle.topology, config.peer_timeout_s)

    def prepare(self, updated_weights: Any, filter_types: Any = None, *, check_finite: bool = False, **options: Any):
        error, push = None, None
        try:
            push = super().prepare(updated_weights, filter_types, check_finite=False, **options)
        except Exception as e:  # noqa: BLE001 - reported to every process, then re-raised
            error = e
        agree(self.group, "validated", error)
        paths = key_paths(as_param_tree(updated_weights, filter_types)) if check_finite else None
        return _MultiPush(**{f.name: getattr(push, f.name) for f in dataclasses.fields(Push)}, finite_paths=paths)

    def prepare_checkpoint(self, path: Any, *, strict: bool = True, track_peak_memory: bool = False) -> Push:
        error, push = None, None
        try:
            push = super().prepare_checkpoint(path, strict=strict, track_peak_memory=track_peak_memory)
        except Exception as e:  # noqa: BLE001
            error = e
        agree(self.group, "checkpoint validated", error)
        return push

    def check_policy(self, in_flight: Any, max_staleness: Any = None) -> None:
        """Only "drain": the processes agree on one idle iteration to swap at."""
        check_in_flight(in_flight, max_staleness)
        if in_flight != "drain":
            raise ValueError(
                f"in_flight={in_flight!r}: an engine spanning several processes swaps with in_flight='drain' only"
            )

    @contextlib.contextmanager
    def exclusive(self, timeout: float | None = None, *, in_flight: str = "drain", max_staleness: int | None = None):
        """Every process's scheduler parked at the same iteration, no request running."""
        self.check_policy(in_flight, max_staleness)
        timeout = self.config.update_timeout_s if timeout is None else timeout
        t0 = time.perf_counter()
        self.handle.raise_if_faulted()
        with self.gate.updating(timeout), contextlib.ExitStack() as stack:
            rnd = self.group.round("parked")
            if self.handle.leader:
                error = None
                try:
                    stack.enter_context(self.handle.quiesced(timeout))
                except Exception as e:  # noqa: BLE001
                    error = e
                rnd.post(status(error))
                if error is not None:
                    raise error
            else:
                leader = rnd.get(0, timeout + self.group.timeout_s)
                if leader:
                    raise (UpdateTimeoutError if b"Timeout" in leader else PeerFailureError)(
                        f"process 0 could not stop the engine ({leader.decode()}); the weights were not changed"
                    )
                # process 0 parked: its last batch parks this process's scheduler too
                lockstep = self.handle.lockstep
                parked = lockstep.wait_parked(self.group.timeout_s)
                if parked:
                    stack.callback(lockstep.release)
                rnd.post(b"" if parked else b"PeerFailureError: process 0's park never reached this process")
            statuses = [rnd.get(r) for r in range(self.group.size)]
            failed = [(r, s.decode()) for r, s in enumerate(statuses) if s]
            if failed:
                raise PeerFailureError(f"process {failed[0][0]} could not park its scheduler ({failed[0][1]})")
            yield SwapWindow("drain", time.perf_counter() - t0)

    def apply(self, push: Push, window: SwapWindow | None = None) -> UpdateReport:
        """Write ``push`` on every process (inside ``exclusive()``); all succeed or all raise."""
        error, report = None, None
        try:
            paths = getattr(push, "finite_paths", None)
            if paths is not None:  # a global reduction: the same answer on every process
                check_finite_leaves(paths, push.leaves)
            report = super().apply(push, window)
        except Exception as e:  # noqa: BLE001
            error = e
        agree(self.group, "applied", error)
        return report

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.group.close()

    def fingerprint(self) -> str:
        """Content hash of the global served weights; collective (every process calls it).
        Equal on every process, and to a single-process engine's for the same weights.
        Each process hashes the shards it holds; the sums are exchanged, not the arrays."""
        with self.gate.generating():  # not in the middle of a swap
            weights = {canonical_key(p): x for p, x in self.engine_params().items() if self.is_weight(p)}
            mine = partial_digests(weights)
        partials = [json.loads(s) for s in self.group.round("fingerprint").exchange(json.dumps(mine).encode())]
        return fingerprint_from_partials(weights, partials)
