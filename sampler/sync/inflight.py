"""Weight swaps with requests in flight, and which weights produced which tokens.

``update_params(..., in_flight=...)`` chooses what happens to requests running when the
weights change:

- ``"drain"`` (default): new requests wait, running ones finish on the old weights, then
  the weights change. Every request runs on one version.
- ``"continue"``: the scheduler is parked between two iterations, the weights change, it
  resumes. Running requests keep their KV cache (computed under the old weights) and
  sample their next tokens with the new ones.
- ``"recompute"``: as "continue", but running requests are retracted first (their KV is
  freed) and re-prefilled, prompt + tokens so far, under the new weights: every token after
  the swap is exactly what the new weights produce for that prefix.

Nothing computed under old weights is reused by a request admitted after a swap: the
prefix cache is flushed ("drain", "recompute"), or with requests still holding entries
("continue") every entry nobody holds is evicted and the cache is namespaced per weight
version, so a request only ever matches entries of the weights it started on.

Every answer says which versions produced which tokens: ``meta_info["weight_versions"] =
[(3, 0), (4, 17)]`` means tokens 0-16 came from version 3 and tokens 17- from version 4.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from sampler import compat
from sampler.compat import scheduler as sched

logger = logging.getLogger(__name__)

InFlight = Literal["drain", "continue", "recompute"]
IN_FLIGHT_MODES: tuple[str, ...] = ("drain", "continue", "recompute")
#: meta_info key of the per-request weight-version stamps.
WEIGHT_VERSIONS_KEY = "weight_versions"
#: Requests whose stamps are kept at once (an answer nobody collects is dropped after this many).
MAX_TRACKED_REQUESTS = 1 << 16

Stamps = list[tuple[int, int]]
#: The abort answer of requests that would otherwise run on a partial set of weights.
PARTIAL_WEIGHTS_MESSAGE = (
    "a weight update failed midway, so the engine holds a mix of old and new leaves; the request was aborted"
)


def check_in_flight(in_flight: Any, max_staleness: Any = None) -> None:
    """Raise ValueError naming the field and the allowed values for a bad policy."""
    if in_flight not in IN_FLIGHT_MODES:
        raise ValueError(f"in_flight={in_flight!r}: must be one of {', '.join(map(repr, IN_FLIGHT_MODES))}")
    if max_staleness is None:
        return
    if isinstance(max_staleness, bool) or not isinstance(max_staleness, (int, np.integer)) or max_staleness < 0:
        raise ValueError(f"max_staleness={max_staleness!r}: must be None or an integer >= 0")
    if max_staleness == 0 and in_flight != "drain":
        raise ValueError(
            f"max_staleness=0 with in_flight={in_flight!r}: no request may then span a swap, which is "
            "in_flight='drain'; use max_staleness >= 1 or in_flight='drain'"
        )


def token_versions(weight_versions: Sequence[Sequence[int]], num_tokens: int) -> np.ndarray:
    """The weight version that produced each of a completion's ``num_tokens`` tokens."""
    out = np.empty(num_tokens, np.int64)
    if num_tokens and not weight_versions:
        raise ValueError("weight_versions is empty: the answer carries no stamps")
    for i, (version, start) in enumerate(weight_versions):
        end = weight_versions[i + 1][1] if i + 1 < len(weight_versions) else num_tokens
        out[min(start, num_tokens) : min(end, num_tokens)] = version
    return out


def token_staleness(weight_versions: Sequence[Sequence[int]], num_tokens: int, current_version: int) -> np.ndarray:
    """How many versions behind ``current_version`` the weights that sampled each token are
    (0: sampled by the current weights); weight or drop off-policy tokens with it."""
    return current_version - token_versions(weight_versions, num_tokens)


def oldest_version(weight_versions: Sequence[Sequence[int]]) -> int:
    """The oldest weight version that produced any token of a completion."""
    return min(v for v, _ in weight_versions)


class WeightVersions:
    """Per request id, the weight version each stretch of its tokens came from.

    Written on the scheduler thread (a request's arrival; a swap, while the thread is
    parked, so the version cannot change in between), read on the engine's event loop as
    answers go out. Bounded: entries of answers nobody collected are dropped, oldest first.
    """

    def __init__(self, limit: int = MAX_TRACKED_REQUESTS):
        self._stamps: collections.OrderedDict[str, Stamps] = collections.OrderedDict()
        self._cond = threading.Condition()
        self._limit = limit

    def start(self, rid: str, version: int) -> None:
        with self._cond:
            self._stamps[rid] = [(version, 0)]
            while len(self._stamps) > self._limit:
                self._stamps.popitem(last=False)

    def switch(self, rid: str, version: int, start: int) -> None:
        """From token ``start`` on, ``version`` produces this request's tokens."""
        with self._cond:
            stamps = self._stamps.get(rid)
            if stamps is None:
                return
            if stamps[-1][1] >= start:  # no token came from the previous version
                stamps[-1] = (version, start)
            else:
                stamps.append((version, start))

    def get(self, rid: str) -> Stamps | None:
        with self._cond:
            stamps = self._stamps.get(rid)
            return None if stamps is None else list(stamps)

    def done(self, rid: str) -> None:
        with self._cond:
            if self._stamps.pop(rid, None) is not None:
                self._cond.notify_all()

    def oldest_in_flight(self) -> int | None:
        """The oldest version that produced a token of any request still in flight."""
        with self._cond:
            return min((s[0][0] for s in self._stamps.values()), default=None)

    def wait_until_no_older_than(self, version: int, timeout: float) -> bool:
        """Wait until no request in flight has a token from before ``version``; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: all(s[0][0] >= version for s in self._stamps.values()), max(0.0, timeout)
            )


class InFlightSwitch:
    """One engine's side of swaps that do not drain: stamps every request at arrival,
    rearranges the parked scheduler around a swap, and annotates every answer with its
    weight-version stamps."""

    def __init__(self, scheduler: Any, tokenizer_manager: Any, loop: Any, version_of: Any, broken_of: Any):
        self._scheduler = scheduler
        self._tm = tokenizer_manager
        self._loop = loop  # the engine's event loop, where the tokenizer manager lives
        self._version_of = version_of  # () -> the version served now
        self._broken_of = broken_of  # () -> True while the engine holds a partial set of weights
        self.versions = WeightVersions()
        self.radix = sched.radix_cache_enabled(scheduler)
        #: False on a process of a multi-process engine other than 0: no tokenizer manager,
        #: no answers to stamp (its scheduler still namespaces the prefix cache like process 0's).
        self.answers = tokenizer_manager is not None
        sched.on_arrival(scheduler, self._arrived, lambda rids: self._answer_aborted(rids, PARTIAL_WEIGHTS_MESSAGE))
        if self.answers:
            sched.annotate_answers(tokenizer_manager, self._annotate, self.versions.done)

    # ------------------------------------------------------------------ hooks
    def _arrived(self, requests: list) -> list[str]:
        """Scheduler thread: stamp new requests; refuse them while the weights are partial."""
        version = self._version_of()
        for r in requests:
            if self.answers:
                self.versions.start(r.rid, version)
            if self.radix:
                r.extra_key = sched.namespace(version, r.extra_key)
        if self._broken_of():
            logger.warning("aborting %d requests: the engine holds a partial set of weights", len(requests))
            return [r.rid for r in requests]
        return []

    def _answer_aborted(self, rids: list[str], message: str) -> None:
        if not self.answers:
            return
        try:
            self._loop.call_soon_threadsafe(sched.answer_aborted, self._tm, rids, message)
        except RuntimeError:  # the loop is closed: nobody waits
            pass

    def _annotate(self, rid: str, out: dict) -> None:
        stamps = self.versions.get(rid)
        if stamps is not None and isinstance(out, dict) and isinstance(out.get("meta_info"), dict):
            out["meta_info"][WEIGHT_VERSIONS_KEY] = stamps

    # ------------------------------------------------------------------ a swap (scheduler parked)
    def check_supported(self, in_flight: str) -> None:
        if in_flight != "drain" and sched.overlap_scheduling(self._scheduler):
            raise ValueError(
                f"in_flight={in_flight!r} needs the engine started with disable_overlap_schedule=True: with "
                "overlapped scheduling a batch may still be computing when the scheduler is parked"
            )

    def ready(self, in_flight: str) -> bool:
        """Whether the parked scheduler is at a point where this swap may happen: a
        recompute waits for a chunked prefill to take its last chunk."""
        return in_flight != "recompute" or not sched.chunked_prefill_in_progress(self._scheduler)

    def before_write(self, in_flight: str) -> list:
        """Parked, before the new weights are written: the requests that will switch
        (retracted first with "recompute")."""
        if in_flight == "drain":
            return []
        held = sched.held_requests(self._scheduler)
        if in_flight == "recompute":
            sched.retract_all(self._scheduler)
        return held

    def after_write(self, in_flight: str, version: int, held: list) -> None:
        """Parked, the new weights (``version``) in place: drop what the old ones computed
        from the prefix cache and stamp the requests that switched."""
        scheduler = self._scheduler
        # stamped first: the new weights are in place whatever the flush below does
        for r in held:
            self.versions.switch(r.rid, version, sched.tokens_generated(r))
        if self.radix:
            sched.move_queued_to_namespace(scheduler, version)
        if in_flight == "drain":
            ok, message = compat.flush_prefix_cache(scheduler)
        elif in_flight == "recompute":
            ok, message = sched.flush_prefix_cache_ignoring_queues(scheduler)
        else:  # requests still hold entries: evict the rest; the namespaces keep them apart
            ok, message = True, ""
            sched.evict_unlocked_prefix_cache(scheduler)
        if not ok:
            raise RuntimeError(f"sglang-jax refused to flush its prefix cache: {message}")

    def abort_held(self) -> int:
        """Parked, after a swap failed midway: end every held request with an abort answer
        (none may run a forward pass on a partial set of weights). Returns how many."""
        rids = sched.abort_held(self._scheduler)
        self._answer_aborted(rids, PARTIAL_WEIGHTS_MESSAGE)
        return len(rids)

    def wait_for_staleness(self, new_version: int, max_staleness: int | None, timeout: float) -> float:
        """Before a swap to ``new_version``: wait until no request in flight would then hold
        tokens more than ``max_staleness`` versions old. Returns the seconds waited."""
        if max_staleness is None:
            return 0.0
        t0 = time.perf_counter()
        if not self.versions.wait_until_no_older_than(new_version - max_staleness, timeout):
            from sampler.errors import UpdateTimeoutError

            raise UpdateTimeoutError(
                f"requests with tokens from version {self.versions.oldest_in_flight()} were still running after "
                f"{timeout:.0f} s; with max_staleness={max_staleness} the swap to version {new_version} waits for "
                "them; the weights were not changed"
            )
        return time.perf_counter() - t0
