"""sglang-jax's multi-node mode (``nnodes > 1``) with one in-process engine per JAX process,
and the JAX distributed client the processes coordinate through.

In sglang-jax 0.1.0rc0 process 0's scheduler publishes every batch of requests it takes
(``Scheduler.broadcast_pyobj``, scheduler.py:1286) and the other processes' schedulers
follow, so all of them run the same forward passes over one global mesh. What upstream
does not support for an in-process engine, and the workaround here:

| upstream behaviour (file:line in sgl_jax)                            | workaround             |
|---------------------------------------------------------------------|------------------------|
| on rank > 0 ``Engine()`` blocks forever in a dummy health-check      | ``follower_env``:      |
| server (engine.py:692-697) unless ``SGLANG_BLOCK_NONZERO_RANK_       | the variable set while |
| CHILDREN=0``                                                         | the engine starts      |
| on rank > 0 ``Engine()`` returns no ``scheduler_info`` (engine.py:   | ``capture_scheduler``, |
| 694), so the scheduler and model runner are out of reach             | ``attach_scheduler_    |
|                                                                      | info``                 |
| on rank > 0 ``enable_engine_loop_run_forever_daemon`` crashes:       | ``follower_kwargs``    |
| ``self.tokenizer_manager.event_loop`` on None (engine.py:150)        |                        |
| ``device_indexes`` is dropped when ``nnodes > 1`` (server_args.py:   | refused up front       |
| 543-545): the engine spans every global device                       | (``check_devices``)    |
| rank > 0 waits for process 0's next batch forever, retrying every    | ``LockstepPark``       |
| 5 s without counting (scheduler.py:1266-1284, ``retry_count`` never  | (follower): polls with |
| grows): a follower cannot be stopped, and never notices that process | a stop pipe and a      |
| 0 is gone                                                            | silence limit          |
| nothing parks the schedulers of all processes at the same iteration  | ``LockstepPark``: a    |
| (needed to swap weights: every process must run the same collective  | marker in the broadcast|
| computations in the same order)                                      | parks every follower   |
| jax 0.10.2 with ``jax_enable_recoverability``: process 0's exit shuts | ``outlive_followers``: |
| the coordination service down without waiting for the others; a     | at exit process 0 waits|
| process leaving after it aborts (``client.h:80 Terminating process  | until every other has  |
| because the JAX distributed service detected fatal errors``, SIGABRT)| disconnected           |

Every access to JAX's private distributed client is here as well (``distributed_client``).
Each workaround has a still-needed test (``tests/test_multiprocess.py``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import threading
import time
from typing import Any, Callable, Iterator

import zmq
from jax._src import distributed

from sampler.compat.lifecycle import SchedulerStop, raise_stop

#: Upstream's switch that keeps ``Engine()`` on rank > 0 from blocking in a health server.
BLOCK_NONZERO_RANK_ENV = "SGLANG_BLOCK_NONZERO_RANK_CHILDREN"
#: How often a waiting follower looks at its stop pipe (ms).
FOLLOWER_POLL_MS = 100
#: Key process 0 posts as its exit begins (tests make a follower leave after it).
LEADER_EXITING_KEY = "sglang-jax-sampler/leader-exiting"
#: How long a follower's scheduler waits for process 0's next batch before giving up (s);
#: the handle sets each engine's own (``SamplerConfig.peer_timeout_s``).
DEFAULT_SILENCE_S = 300.0


class LeaderLostError(RuntimeError):
    """Process 0's scheduler stopped sending batches: it died, hangs, or was shut down abruptly."""


class _Marker:
    """Sent inside a broadcast batch from process 0; never reaches upstream's request dispatch."""

    def __init__(self, kind: str):
        self.kind = kind

    def __reduce__(self):
        return (_Marker, (self.kind,))

    def __repr__(self):
        return f"<{self.kind}>"


def _split_markers(reqs: Any) -> tuple[list, set[str]]:
    if not reqs:
        return reqs if reqs is not None else [], set()
    kinds = {r.kind for r in reqs if isinstance(r, _Marker)}
    return ([r for r in reqs if not isinstance(r, _Marker)] if kinds else reqs), kinds


PARK, STOP = "park", "stop"


# --------------------------------------------------------------------------------------
# starting an engine on a follower (rank > 0)
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def follower_env() -> Iterator[None]:
    """Keep ``Engine()`` on rank > 0 from blocking in upstream's dummy health server."""
    before = os.environ.get(BLOCK_NONZERO_RANK_ENV)
    os.environ[BLOCK_NONZERO_RANK_ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(BLOCK_NONZERO_RANK_ENV, None)
        else:
            os.environ[BLOCK_NONZERO_RANK_ENV] = before


def follower_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Engine kwargs for rank > 0: no tokenizer manager there, so no engine event-loop thread."""
    return {**kwargs, "enable_engine_loop_run_forever_daemon": False}


@contextlib.contextmanager
def capture_scheduler() -> Iterator[dict[str, Any]]:
    """Record the scheduler info an in-process Engine creates (on rank > 0 ``Engine()``
    drops it). Yields a dict that holds ``"scheduler"`` once the engine has started."""
    from sgl_jax.srt.entrypoints import engine as engine_module

    original = engine_module.run_scheduler_loop_thread_after_create
    captured: dict[str, Any] = {}

    def run_scheduler_loop_thread_after_create(*args, **kwargs):
        info = original(*args, **kwargs)
        if isinstance(info, dict):
            captured.update(info)
        return info

    engine_module.run_scheduler_loop_thread_after_create = run_scheduler_loop_thread_after_create
    try:
        yield captured
    finally:
        engine_module.run_scheduler_loop_thread_after_create = original


def attach_scheduler_info(engine: Any, captured: dict[str, Any]) -> None:
    """Give a rank > 0 Engine the scheduler info upstream dropped, as rank 0 has it (so the
    scheduler and model runner are reached, and stopped, the same way on every process)."""
    if engine.scheduler_info is None:
        engine.scheduler_info = dict(captured)


def check_devices(tp_size: int, device_count: int) -> None:
    """Upstream drops ``device_indexes`` when nnodes > 1: the engine spans every device."""
    if tp_size != device_count:
        raise ValueError(
            f"tp_size={tp_size}: an engine spanning several processes uses every one of the {device_count} "
            "global devices (sglang-jax 0.1.0rc0 ignores device_indexes when nnodes > 1, server_args.py:543); "
            f"set tp_size={device_count}"
        )


# --------------------------------------------------------------------------------------
# parking every process's scheduler at the same iteration
# --------------------------------------------------------------------------------------


class LockstepPark:
    """Parks the schedulers of all processes of one engine between the same two iterations.

    Replaces ``Scheduler.broadcast_pyobj`` (called once per iteration when nnodes > 1; see
    ``patch_lockstep_broadcast``). On process 0 (the leader) a requested park happens at the
    first iteration boundary where ``ready()`` holds and no request arrived: the batch it
    publishes carries a park marker, and the leader's scheduler then waits. A follower's
    scheduler parks when it receives that marker, so every process stops after the same
    number of iterations and no forward pass runs anywhere. Each process releases its own.

    On a follower it also replaces upstream's receive (which retries forever): it waits on
    the subscriber socket and on ``stop``'s pipe, ends the thread when ``stop`` is set (or
    on the leader's stop marker), and raises ``LeaderLostError`` after ``silence_s``
    without any batch from the leader.
    """

    def __init__(self, scheduler: Any, *, silence_s: float = DEFAULT_SILENCE_S):
        self.leader = scheduler.node_rank == 0
        #: Set: the scheduler thread ends. The leader's handle replaces it with its
        #: quiet-idle scheduler's stop (the same kind of event, whose pipe wakes that loop).
        self.stop = SchedulerStop()
        #: Called (from any thread) while the scheduler is idle: no-op until ``ready`` is set.
        self.ready: Callable[[], bool] = lambda: not self.leader
        self.silence_s = silence_s
        self._cond = threading.Condition()
        self._wanted = False
        self._parked = False
        self._stop_followers = False
        #: Set on a follower when the leader's engine announced its shutdown.
        self.leader_stopped = threading.Event()
        self._scheduler = scheduler

    # ---------------------------------------------------------------- scheduler thread
    def broadcast(self, original: Callable[[Any], Any], recv_reqs: Any) -> Any:
        return self._leader_broadcast(original, recv_reqs) if self.leader else self._follower_broadcast()

    def _wait_parked(self) -> None:
        with self._cond:
            self._parked = True
            self._cond.notify_all()
            while self._wanted and not self.stop.is_set():
                self._cond.wait(FOLLOWER_POLL_MS / 1000)
            self._parked = False
        if self.stop.is_set():
            raise_stop()

    def _leader_broadcast(self, original, recv_reqs):
        markers = []
        with self._cond:
            park = self._wanted and not recv_reqs and self.ready()
            if park:
                markers.append(_Marker(PARK))
            if self._stop_followers:
                markers.append(_Marker(STOP))
        out = original(list(recv_reqs or []) + markers) if markers else original(recv_reqs)
        if any(m.kind == STOP for m in markers):
            raise_stop()
        if park:
            self._wait_parked()
        return _split_markers(out)[0]

    def _follower_broadcast(self):
        sub = self._scheduler.subscriber
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(self.stop.wake_fd, zmq.POLLIN)
        last = time.monotonic()
        while True:
            if self.stop.is_set():
                raise_stop()
            events = dict(poller.poll(FOLLOWER_POLL_MS))
            if events.get(self.stop.wake_fd):
                self.stop.drain()
            if events.get(sub):
                reqs = pickle.loads(sub.recv(zmq.NOBLOCK))
                break
            if time.monotonic() - last > self.silence_s:
                raise LeaderLostError(
                    f"process 0 sent no batch for {self.silence_s:.0f} s: its engine or process is gone"
                )
        reqs, kinds = _split_markers(reqs)
        if STOP in kinds:
            self.leader_stopped.set()
            raise_stop()
        if PARK in kinds:
            with self._cond:
                self._wanted = True
            self._wait_parked()
        return reqs

    # ---------------------------------------------------------------- caller side
    @property
    def parked(self) -> bool:
        with self._cond:
            return self._parked

    def request(self) -> None:
        """Leader: park at the next iteration boundary where the engine is idle."""
        with self._cond:
            self._wanted = True
        self.stop.wake()

    def cancel(self) -> bool:
        """Leader: withdraw a request; True if the scheduler had already parked (then it stays)."""
        with self._cond:
            if self._parked:
                return True
            self._wanted = False
            return False

    def wait_parked(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._parked, timeout)

    def release(self) -> None:
        with self._cond:
            self._wanted = False
            self._cond.notify_all()

    def stop_followers(self) -> None:
        """Leader: the next batch tells every follower's scheduler to end (and this one)."""
        with self._cond:
            self._stop_followers = True
            self._wanted = False
            self._cond.notify_all()
        self.stop.wake()


_lockstep_lock = threading.Lock()


def lockstep_of(scheduler: Any) -> LockstepPark:
    """The scheduler's LockstepPark (made on first use, by its own thread or the caller's)."""
    with _lockstep_lock:
        park = scheduler.__dict__.get("_sampler_lockstep")
        if park is None:
            park = scheduler._sampler_lockstep = LockstepPark(scheduler)
        return park


def patch_lockstep_broadcast() -> bool:
    """Route every multi-node scheduler's ``broadcast_pyobj`` through its LockstepPark
    (idempotent; a class patch, so that it holds from the scheduler thread's first
    iteration, before ``Engine()`` returns). Returns True when applied now."""
    from sgl_jax.srt.managers.scheduler import Scheduler

    original = Scheduler.broadcast_pyobj
    if getattr(original, "_lockstep", False):
        return False

    def broadcast_pyobj(self, recv_reqs):
        return lockstep_of(self).broadcast(lambda reqs: original(self, reqs), recv_reqs)

    broadcast_pyobj._lockstep = True  # type: ignore[attr-defined]
    broadcast_pyobj.__wrapped__ = original  # type: ignore[attr-defined]
    Scheduler.broadcast_pyobj = broadcast_pyobj
    return True


# --------------------------------------------------------------------------------------
# JAX's distributed runtime client (private API, jax 0.10)
# --------------------------------------------------------------------------------------


def distributed_client() -> Any:
    """The key-value store / barrier client of an initialised ``jax.distributed``."""
    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialised in this process")
    return client


def coordinator_address() -> str | None:
    """``host:port`` of JAX's coordination service, when ``jax.distributed`` is initialised."""
    return distributed.global_state.coordinator_address


def distributed_initialized() -> bool:
    return distributed.global_state.client is not None


def outlive_followers() -> None:
    """At process 0's exit (registered after JAX's own exit hook, so it runs first): keep the
    coordination service up until every other process has disconnected.

    JAX's ``get_live_nodes`` returns once every other live process has called it too or is
    gone (disconnected, or silent past the heartbeat timeout); the followers never call it,
    so it returns as the last one leaves. A follower that hangs holds process 0's exit with
    it (a thread cannot bound the wait: Python 3.12 starts none at exit).
    """
    state = distributed.global_state
    if state.process_id != 0 or state.client is None:
        return
    with contextlib.suppress(Exception):  # already posted
        state.client.key_value_set(LEADER_EXITING_KEY, "1")
    with contextlib.suppress(Exception):  # the service is already gone: nothing to keep up
        state.client.get_live_nodes(list(range(state.num_processes)))
