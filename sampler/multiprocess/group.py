"""The engine's processes agreeing through JAX's coordination service (its key-value
store, never a collective): exchanges, barriers, heartbeats, and ``agree`` (all succeed or
all raise)."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time

from sampler.compat import multinode
from sampler.errors import PeerFailureError
from sampler.multiprocess.process import Topology

#: How often a waiting process looks at the others' heartbeats (s).
PEER_POLL_S = 0.5
#: How often each process of a multi-process engine posts its heartbeat (s).
HEARTBEAT_PERIOD_S = 0.5
#: A process whose heartbeat did not move for this long is reported dead (s).
PEER_SILENCE_S = 5.0

_group_ids = itertools.count()


class ProcessGroup:
    """Exchanges small payloads among the engine's processes through JAX's coordination
    service (key-value store). Every process makes the same exchanges in the same order."""

    def __init__(self, topo: Topology, timeout_s: float):
        self.rank, self.size = topo.node_rank, topo.nnodes
        self.timeout_s = timeout_s
        self._client = multinode.distributed_client()
        self._prefix = f"sglang-jax-sampler/{next(_group_ids)}"
        self._rounds = itertools.count()
        self._posted: list[str] = []
        # (coordination-service heartbeats are not readable without a barrier: beat here)
        # the same thread watches the others' beats all the time, so a process that died
        # is named as soon as anyone waits for it, however late that wait starts
        self._beats: dict[int, tuple[str | None, float]] = {}
        #: When this process last looked at the beats: silence is measured up to then, so a
        #: watcher that was itself starved of CPU does not take its own lateness for a death.
        self._watched_at: float | None = None
        self._beats_lock = threading.Lock()
        self._stopped = threading.Event()
        self._beating = threading.Thread(target=self._beat, name="sampler-peer-heartbeat", daemon=True)
        self._beating.start()

    def _beat(self) -> None:
        key = f"{self._prefix}/alive/{self.rank}"
        while not self._stopped.is_set():
            with contextlib.suppress(Exception):  # the service is gone: the waiters will say so
                self._client.key_value_increment(key, 1)
            self._watch_peers()
            self._stopped.wait(HEARTBEAT_PERIOD_S)

    def _watch_peers(self) -> None:
        """Note when each other process's heartbeat last moved."""
        for r in range(self.size):
            if r == self.rank:
                continue
            try:
                beat = self._client.key_value_try_get(f"{self._prefix}/alive/{r}")
            except Exception:  # noqa: BLE001 - not beating yet, or the service is gone
                beat = None
            now = time.monotonic()
            with self._beats_lock:
                last = self._beats.get(r)
                if last is None or beat != last[0]:
                    self._beats[r] = (beat, now)
        with self._beats_lock:
            self._watched_at = time.monotonic()

    def close(self) -> None:
        self._stopped.set()

    def check_peers(self) -> None:
        """Raise PeerFailureError if another process stopped beating for ``PEER_SILENCE_S``
        (measured up to this process's last look at the beats, not up to now)."""
        with self._beats_lock:
            beats, now = dict(self._beats), self._watched_at
        if now is None:
            return
        for r, (beat, since) in sorted(beats.items()):
            if beat is not None and now - since > PEER_SILENCE_S:
                raise PeerFailureError(
                    f"process {r} of the engine stopped: no heartbeat for {now - since:.0f} s (it died or hangs)"
                )

    def round(self, tag: str) -> "Round":
        return Round(self, f"{self._prefix}/{next(self._rounds)}-{tag}", tag)

    def barrier(self, tag: str, timeout: float | None = None) -> None:
        """Wait until every process got here (through the coordination service, not a collective)."""
        self.round(tag).exchange(b"", timeout)

    def _get(self, key: str, what: str, timeout: float | None) -> bytes:
        timeout = self.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            wait = max(0.001, min(PEER_POLL_S, deadline - time.monotonic()))
            try:
                return self._client.blocking_key_value_get_bytes(key, int(wait * 1000))
            except Exception as e:  # noqa: BLE001 - the client raises its runtime error on timeout
                if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                    raise PeerFailureError(f"the coordination service failed while waiting for {what}: {e}") from e
            self.check_peers()
            if time.monotonic() >= deadline:
                raise PeerFailureError(f"gave up waiting {timeout:.0f} s for {what}: that process hangs or is gone")

    def _forget_old(self, key: str) -> None:
        self._posted.append(key)
        # every process has read round n-1 once all posted round n: drop ours from before
        while len(self._posted) > 2:
            with contextlib.suppress(Exception):
                self._client.key_value_delete(self._posted.pop(0))


class Round:
    """One exchange: each process posts once; anyone reads any process's post."""

    def __init__(self, group: ProcessGroup, key: str, tag: str):
        self.group, self.key, self.tag = group, key, tag

    def post(self, payload: bytes, *, rank: int | None = None) -> None:
        key = f"{self.key}/{self.group.rank if rank is None else rank}"
        self.group._client.key_value_set_bytes(key, payload)
        self.group._forget_old(key)

    def get(self, rank: int, timeout: float | None = None) -> bytes:
        return self.group._get(f"{self.key}/{rank}", f"process {rank} at step {self.tag!r}", timeout)

    def exchange(self, payload: bytes, timeout: float | None = None) -> list[bytes]:
        self.post(payload)
        return [self.get(r, timeout) for r in range(self.group.size)]


def status(error: BaseException | None) -> bytes:
    return b"" if error is None else f"{type(error).__name__}: {error}".encode()


def agree(group: ProcessGroup, tag: str, error: BaseException | None) -> None:
    """Every process reports how its step went; if any failed, every process raises
    (its own error, or a PeerFailureError naming the process that failed)."""
    statuses = group.round(tag).exchange(status(error))
    if error is not None:
        raise error
    failed = [(r, s.decode()) for r, s in enumerate(statuses) if s]
    if failed:
        rank, message = failed[0]
        raise PeerFailureError(f"process {rank} failed at step {tag!r} ({message}); nothing was changed here either")
