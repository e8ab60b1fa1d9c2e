"""Several JAX processes, one engine: sglang-jax's multi-node mode driven as a
multi-controller (SPMD) JAX program.

Every process runs the same program: it builds a ``SglangJaxSampler`` (one engine spanning
every process's devices, ``tp_size`` = the global device count) and calls ``update_params``
with the same global trainer state. Each process writes only the shards it holds: leaves
whose global sharding is equivalent to the engine's are aliased, the rest are resharded
by JAX's own collectives. The processes agree at every step through JAX's coordination
service (its key-value store), never through a collective, so that a refusal on one
process is a refusal on all and no process is left waiting in a collective:

1. ``prepare``: each validates the tree; they exchange the outcome; all raise alike.
2. ``exclusive``: process 0 holds new requests back, waits for those in flight, and
   parks its scheduler at an idle iteration; the batch it publishes there parks every
   follower's scheduler too (``compat.LockstepPark``). No forward pass runs anywhere.
3. the swap (reshards are collectives: every process runs the same ones in the same
   order), the prefix cache flush; they exchange the outcome;
4. every scheduler is released. No process generates on the new version before all
   have it (3 completes on all before 4 starts on any).

Generation runs on process 0 (the engine's tokenizer manager lives there). On the other
processes ``generate_ids`` / ``__call__`` raise ``NotLeaderError``, except inside
``sampler.collective_generation()``: then every process calls, process 0 runs every
process's prompts in one batch, and each gets its own results (this is what
``SglangJaxRollout`` does, so Tunix code that runs on every process works unchanged).
``fingerprint()`` is collective too. Waits are bounded (``peer_timeout_s``) and check the
coordination service's heartbeats: a process that died is named in a ``PeerFailureError``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import pickle
import threading
import time
from collections.abc import Sequence
from typing import Any, Iterator

import jax

from converters.fingerprint import fingerprint_from_partials, partial_digests
from converters.registry import canonical_key
from converters.source import as_param_tree, key_paths
from sampler import compat, launch
from sampler.compat import multinode
from sampler.config import SamplerConfig
from sampler.core import Push, SwapWindow, WeightSync, check_finite_leaves
from sampler.engine import PAUSE_TIMEOUT_S, EngineHandle, UpdateTimeoutError
from sampler.inflight import check_in_flight
from sampler.reports import UpdateReport
from sampler.validation import RequestLimits, samples_per_prompt

logger = logging.getLogger(__name__)

#: Heartbeat timeout of the coordination service set by ``initialize`` (s).
HEARTBEAT_TIMEOUT_S = 10
#: How often a waiting process looks at the others' heartbeats (s).
PEER_POLL_S = 0.5
#: How often each process of a multi-process engine posts its heartbeat (s).
HEARTBEAT_PERIOD_S = 0.5
#: A process whose heartbeat did not move for this long is reported dead (s).
PEER_SILENCE_S = 5.0
#: How long a shutting-down follower waits for process 0's engine to stop first (s).
FOLLOWER_SHUTDOWN_S = 60.0
#: How long a leader's shutdown waits for its scheduler to tell the followers (s).
LEADER_STOP_S = 10.0
#: Offset of the engine's port from JAX's coordinator port, when neither
#: ``SamplerConfig.dist_init_addr`` nor ``$SAMPLER_DIST_INIT_ADDR`` gives one (sglang-jax
#: then binds that port + 5 and + 6).
ENGINE_PORT_OFFSET = 10


class PeerFailureError(RuntimeError):
    """Another process of the engine failed, refused a step, died or stopped answering."""


class NotLeaderError(RuntimeError):
    """Generation was asked of a process other than 0 outside ``collective_generation()``."""


def initialize(*, heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> None:
    """Join the multi-controller program ``python -m sampler.launch`` started (reads
    ``$SAMPLER_COORDINATOR``, ``$SAMPLER_NUM_PROCESSES``, ``$SAMPLER_PROCESS_ID``); call it
    before anything else uses JAX. On CPU, collectives go through gloo. A process that dies
    does not end the others (``jax_enable_recoverability``): they raise ``PeerFailureError``
    naming it. Calling ``jax.distributed.initialize`` yourself, set that option too, or JAX
    ends every survivor once its heartbeat timeout passes. At exit process 0 keeps JAX's
    coordination service up until the others have disconnected (a process leaving after it
    would abort: ``compat.multinode.outlive_followers``). No-op when ``jax.distributed`` is
    already initialised or the variables are not set."""
    if multinode.distributed_initialized() or launch.ENV_COORDINATOR not in os.environ:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # a process that dies must not end the others: they name it in a PeerFailureError
    # (without this, JAX's coordination service aborts every process after its heartbeat timeout)
    jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(
        os.environ[launch.ENV_COORDINATOR],
        num_processes=int(os.environ[launch.ENV_NUM_PROCESSES]),
        process_id=int(os.environ[launch.ENV_PROCESS_ID]),
        heartbeat_timeout_seconds=heartbeat_timeout_s,
    )
    atexit.register(multinode.outlive_followers)  # runs before JAX's own exit hook


# --------------------------------------------------------------------------------------
# where this process stands
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Topology:
    """This process's place in a multi-process engine."""

    nnodes: int
    node_rank: int
    #: ``host:port``: sglang-jax's processes meet at port + 5 and + 6.
    dist_init_addr: str

    @property
    def leader(self) -> bool:
        return self.node_rank == 0


def _check_addr(addr: str, field: str) -> str:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 - 6:
        raise ValueError(f"{field}={addr!r} must be 'host:port' with a port below {65536 - 6}")
    return addr


def topology(config: SamplerConfig) -> Topology | None:
    """The multi-process layout ``config`` asks for, or None for a single-process engine.

    ``nnodes`` / ``node_rank`` default to an initialised ``jax.distributed``'s process count
    and index; the address to ``config.dist_init_addr``, ``$SAMPLER_DIST_INIT_ADDR``, or JAX's
    coordinator host with its port + ``ENGINE_PORT_OFFSET``. When ``nnodes > 1`` is given and
    ``jax.distributed`` is not initialised yet, it is initialised here at ``dist_init_addr``
    (JAX's coordinator at its port, as sglang-jax itself would), with gloo collectives on CPU.
    """
    initialized = multinode.distributed_initialized()
    if config.nnodes is None and not initialized:
        return None
    nnodes = config.nnodes if config.nnodes is not None else jax.process_count()
    if nnodes < 1:
        raise ValueError(f"nnodes={nnodes} must be >= 1")
    if nnodes == 1:
        return None
    addr = config.dist_init_addr or os.environ.get(launch.ENV_DIST_INIT_ADDR)
    if not initialized:
        if config.node_rank is None or addr is None:
            raise ValueError(
                f"nnodes={nnodes} without an initialised jax.distributed: set node_rank and dist_init_addr "
                "(or call jax.distributed.initialize first)"
            )
        if not 0 <= config.node_rank < nnodes:
            raise ValueError(f"node_rank={config.node_rank} must be in [0, {nnodes})")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        jax.distributed.initialize(_check_addr(addr, "dist_init_addr"), nnodes, config.node_rank)
    node_rank = config.node_rank if config.node_rank is not None else jax.process_index()
    if jax.process_count() != nnodes or jax.process_index() != node_rank:
        raise ValueError(
            f"nnodes={nnodes}, node_rank={node_rank} but jax.distributed has {jax.process_count()} processes "
            f"and this is process {jax.process_index()}: leave them unset to take jax.distributed's"
        )
    if addr is None:
        host, _, port = (multinode.coordinator_address() or "").rpartition(":")
        addr = f"{host}:{int(port) + ENGINE_PORT_OFFSET}"
    return Topology(nnodes, node_rank, _check_addr(addr, "dist_init_addr"))


# --------------------------------------------------------------------------------------
# agreeing through the coordination service
# --------------------------------------------------------------------------------------

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


def _status(error: BaseException | None) -> bytes:
    return b"" if error is None else f"{type(error).__name__}: {error}".encode()


def agree(group: ProcessGroup, tag: str, error: BaseException | None) -> None:
    """Every process reports how its step went; if any failed, every process raises
    (its own error, or a PeerFailureError naming the process that failed)."""
    statuses = group.round(tag).exchange(_status(error))
    if error is not None:
        raise error
    failed = [(r, s.decode()) for r, s in enumerate(statuses) if s]
    if failed:
        rank, message = failed[0]
        raise PeerFailureError(f"process {rank} failed at step {tag!r} ({message}); nothing was changed here either")


# --------------------------------------------------------------------------------------
# the engine in each process
# --------------------------------------------------------------------------------------


class MultiNodeEngineHandle(EngineHandle):
    """This process's part of an engine spanning several processes (sglang-jax nnodes > 1)."""

    def __init__(self, config: SamplerConfig, topo: Topology):
        self.topology = topo
        multinode.check_devices(config.tp_size, jax.device_count())
        self._silence_s = config.peer_timeout_s
        super().__init__(dataclasses.replace(config, device_indexes=None))

    @property
    def leader(self) -> bool:
        return self.topology.leader

    def _start_engine(self, engine_class: type, kwargs: dict[str, Any]) -> Any:
        kwargs = {
            **kwargs,
            "nnodes": self.topology.nnodes,
            "node_rank": self.topology.node_rank,
            "dist_init_addr": self.topology.dist_init_addr,
        }
        if not self.leader:
            kwargs = multinode.follower_kwargs(kwargs)
        env = contextlib.nullcontext() if self.leader else multinode.follower_env()
        multinode.patch_lockstep_broadcast()
        with multinode.capture_scheduler() as captured, env:
            engine = engine_class(**kwargs)
        self._captured = captured
        return engine

    def _attach_scheduler(self) -> None:
        multinode.attach_scheduler_info(self.engine, self._captured)
        self.scheduler = compat.scheduler_of(self.engine)
        self.model_runner = compat.model_runner_of(self.engine)
        self._park = None  # parking goes through the lockstep park on every process
        self.lockstep = multinode.lockstep_of(self.scheduler)
        self.lockstep.silence_s = self._silence_s
        if self.leader:
            self._scheduler_stop = compat.quiet_idle_scheduler(self.scheduler)
            self.lockstep.stop = self._scheduler_stop
            self.lockstep.ready = self._idle
        else:
            self._scheduler_stop = self.lockstep.stop

    def _attach_validator(self, config: SamplerConfig) -> None:
        """Process 0's engine checks every request as it arrives (the others have no
        tokenizer manager: their prompts reach it through collective generation); every
        process checks its own calls against the same limits first."""
        if self.leader:
            super()._attach_validator(config)
        else:  # the same limits, read from this process's scheduler; nothing to hook
            self.limits = RequestLimits.of(self.engine, config.max_batch_size)
            self.validator = None

    def _idle(self) -> bool:
        """From the leader's scheduler thread: nothing in flight, nothing queued or running."""
        return not compat.requests_in_flight(self.tokenizer_manager) and compat.scheduler_idle(self.scheduler)

    @contextlib.contextmanager
    def quiesced(self, timeout: float):
        """Leader: hold new requests, wait for those in flight, park every scheduler at the
        same iteration. Raises UpdateTimeoutError (nothing parked) after ``timeout``."""
        if not self.leader:
            raise RuntimeError("only process 0 quiesces the engine; the others follow its park")
        tm = self.tokenizer_manager
        self.run(compat.set_paused(tm, True), timeout=PAUSE_TIMEOUT_S)
        try:
            self.lockstep.request()
            if not self.lockstep.wait_parked(timeout) and not self.lockstep.cancel():
                raise UpdateTimeoutError(
                    f"{compat.requests_in_flight(tm)} requests were still running after {timeout:.0f} s; "
                    "the weights were not changed"
                )
            try:
                yield
            finally:
                self.lockstep.release()
        finally:
            self.run(compat.set_paused(tm, False), timeout=PAUSE_TIMEOUT_S)

    def shutdown(self) -> None:
        if self.closed:
            return
        thread = next((t for t in self.threads if "scheduler" in t.name), None)
        if self.leader:
            # The next batch tells every follower to stop, then the leader's scheduler ends.
            self.lockstep.stop_followers()
            if thread is not None:
                thread.join(LEADER_STOP_S)
        elif thread is not None and thread.is_alive():
            # A follower's scheduler runs every forward pass with process 0's: it ends when
            # process 0's engine stops (or gives up after FOLLOWER_SHUTDOWN_S).
            if not self.lockstep.leader_stopped.wait(FOLLOWER_SHUTDOWN_S):
                logger.warning("process 0's engine did not stop within %.0f s; stopping anyway", FOLLOWER_SHUTDOWN_S)
            thread.join(LEADER_STOP_S)
        super().shutdown()


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
                rnd.post(_status(error))
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


# --------------------------------------------------------------------------------------
# generation from any process
# --------------------------------------------------------------------------------------


class CollectiveGeneration:
    """``generate_ids`` for a multi-process engine: direct on process 0; inside
    ``collective_generation()`` every process calls and process 0 runs them all."""

    def __init__(self, handle: MultiNodeEngineHandle, group: ProcessGroup):
        self.handle = handle
        self.group = group
        self._local = threading.local()

    @property
    def active(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    @contextlib.contextmanager
    def collective(self) -> Iterator[None]:
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1

    def check_direct(self) -> None:
        if not self.handle.leader:
            raise NotLeaderError(
                f"this is process {self.handle.topology.node_rank} of a {self.handle.topology.nnodes}-process "
                "engine: generation runs on process 0 (its tokenizer manager serves the engine). Call it there, "
                "or call it on every process inside `with sampler.collective_generation():` (process 0 runs "
                "every process's prompts; each gets its own results)"
            )

    def generate(self, run_local, prompts, sampling_params, *, return_logprob, logprob_start_len, timeout):
        """Every process posts its prompts; process 0 runs them together and posts each
        process its results (or the error, raised on every process)."""
        n = len(prompts)
        params = [dict(sampling_params)] * n if isinstance(sampling_params, dict) else list(sampling_params)
        starts = (
            [logprob_start_len] * n
            if logprob_start_len is None or isinstance(logprob_start_len, int)
            else list(logprob_start_len)
        )
        request = pickle.dumps(([list(map(int, p)) for p in prompts], params, starts))
        asked = self.group.round("generate")
        answered = self.group.round("generated")
        asked.post(request)
        if self.handle.leader:
            batches = [pickle.loads(asked.get(r, timeout)) for r in range(self.group.size)]
            all_prompts = [p for b in batches for p in b[0]]
            results, error = [], None
            try:
                if all_prompts:
                    results = run_local(
                        all_prompts,
                        [p for b in batches for p in b[1]],
                        return_logprob=return_logprob,
                        logprob_start_len=[s if s is not None else -1 for b in batches for s in b[2]]
                        if any(s is not None for b in batches for s in b[2])
                        else None,
                        timeout=timeout,
                    )
            except Exception as e:  # noqa: BLE001 - every process raises it
                error = e
            k = samples_per_prompt([p for b in batches for p in b[1]])  # answers per prompt, prompt-major
            offset = 0
            for r, b in enumerate(batches):
                mine = None if error is not None else results[offset * k : (offset + len(b[0])) * k]
                offset += len(b[0])
                answered.post(pickle.dumps((mine, None if error is None else _status(error).decode())), rank=r)
            if error is not None:
                raise error
            return results[: n * k]
        out, message = pickle.loads(answered.get(self.group.rank, timeout))
        if message is not None:
            raise PeerFailureError(f"process 0 could not generate ({message})")
        return out


def engine_parts(config: SamplerConfig) -> tuple[EngineHandle, WeightSync, CollectiveGeneration | None]:
    """The engine handle and weight sync for ``config``: single-process, or this process's
    part of a multi-process engine (then also its generation front)."""
    topo = topology(config)
    if topo is None:
        handle = EngineHandle(config)
        return handle, _sync_or_shutdown(WeightSync, handle, config), None
    handle = MultiNodeEngineHandle(config, topo)
    sync = _sync_or_shutdown(MultiProcessSync, handle, config)
    return handle, sync, CollectiveGeneration(handle, sync.group)


def _sync_or_shutdown(cls, handle, config):
    try:
        return cls(handle, config)
    except BaseException:
        handle.shutdown()
        raise
