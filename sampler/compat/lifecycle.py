"""Engine threads: keeping an idle scheduler quiet, parking it between iterations,
containing faults, and stopping every thread an in-process Engine started.

sglang-jax 0.1.0rc0 busy-polls in its scheduler loop, SIGQUITs the whole process on any
exception in its scheduler or detokenizer thread, stops no thread in
``Engine.shutdown()`` (and kills every child process of the host there), and replaces
the host's SIGCHLD handler. Each workaround has a still-needed and a works test in
``tests/test_compat.py``.

Over 500 lines because it is one mechanism: the scheduler loop that parks, stops and stays
quiet is the same replaced function (``dispatch_scheduler_event_loop``) whose exceptions are
contained and whose thread shutdown stops; parking, quieting, containment and stopping read
and write the same per-engine state.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib
import logging
import os
import pickle
import queue
import signal
import threading
import time
import traceback
from typing import Any, Callable

import zmq

from sampler.compat.patches import destroy_engine_contexts

logger = logging.getLogger(__name__)

#: How long an idle scheduler waits on its sockets before looking again (ms).
IDLE_POLL_MS = 20
#: How long shutdown waits for the engine's threads to end (s).
THREAD_STOP_TIMEOUT_S = 10.0
#: How long the engine's cancelled event-loop tasks get to unwind before the loop stops (s).
LOOP_UNWIND_TIMEOUT_S = 2.0


# --------------------------------------------------------------------------------------
# engine-thread faults
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class EngineFault:
    """An exception that ended one of an engine's threads (contained, see below)."""

    thread: str
    error: str
    traceback: str


#: thread -> the fault that ended it (filled by the wrappers below)
_thread_faults: dict[threading.Thread, EngineFault] = {}
#: thread -> called with the fault when that thread fails
_fault_callbacks: dict[threading.Thread, Callable[[EngineFault], None]] = {}


def watch_thread_faults(threads: list[threading.Thread], callback: Callable[[EngineFault], None]) -> None:
    """Call ``callback(fault)`` (from the failing thread) when one of ``threads`` fails."""
    for t in threads:
        _fault_callbacks[t] = callback


def unwatch_thread_faults(threads: list[threading.Thread]) -> None:
    """Forget ``threads`` (a stopped engine's): no callback, no recorded fault kept alive."""
    for t in threads:
        _fault_callbacks.pop(t, None)
        _thread_faults.pop(t, None)


def _record_fault(error: BaseException, name: str | None = None) -> EngineFault:
    thread = threading.current_thread()
    fault = EngineFault(name or thread.name, f"{type(error).__name__}: {error}", traceback.format_exc())
    _thread_faults[thread] = fault
    logger.error("sglang-jax %s thread failed (contained; the process lives on): %s", fault.thread, fault.traceback)
    callback = _fault_callbacks.pop(thread, None)
    if callback is not None:
        try:
            callback(fault)
        except Exception:  # noqa: BLE001
            logger.exception("fault callback failed")
    return fault


def thread_fault(threads: list[threading.Thread]) -> EngineFault | None:
    """The first recorded fault of any of ``threads``."""
    for t in threads:
        if t in _thread_faults:
            return _thread_faults[t]
    return None


def patch_contain_engine_faults() -> bool:
    """Keep an exception in an engine thread from killing the process (idempotent).

    sglang-jax 0.1.0rc0 catches any exception of its scheduler or detokenizer thread, logs
    it and sends SIGQUIT to its own process, whose handler kills the whole process tree: a
    training run dies with the engine. The wrapped loops record the fault instead and let
    the thread end; the sampler then raises ``EngineFaultError`` to its callers. The
    scheduler's ``cur_batch`` is cleared so that its watchdog does not fire later.
    Returns True when applied now.
    """
    sched = importlib.import_module("sgl_jax.srt.managers.scheduler")
    detok = importlib.import_module("sgl_jax.srt.managers.detokenizer_manager")
    original = sched.dispatch_scheduler_event_loop
    if getattr(original, "_contained", False):
        return False

    def dispatch_scheduler_event_loop(scheduler, server_args):
        try:
            original(scheduler, server_args)
        except Exception as e:  # noqa: BLE001 - SystemExit (our stop) passes through
            scheduler._contained_fault = _record_fault(e)
            scheduler.cur_batch = None

    dispatch_scheduler_event_loop._contained = True  # type: ignore[attr-defined]
    dispatch_scheduler_event_loop.__wrapped__ = original  # type: ignore[attr-defined]
    sched.dispatch_scheduler_event_loop = dispatch_scheduler_event_loop

    event_loop = detok.DetokenizerManager.event_loop

    def detokenizer_event_loop(self):
        try:
            event_loop(self)
        except Exception as e:  # noqa: BLE001
            _record_fault(e)

    detokenizer_event_loop.__wrapped__ = event_loop  # type: ignore[attr-defined]
    detok.DetokenizerManager.event_loop = detokenizer_event_loop
    return True


#: The name a fault of the tokenizer manager's output loop is reported under.
TOKENIZER_LOOP = "tokenizer manager (handle_loop)"


def patch_contain_tokenizer_loop_faults() -> bool:
    """Keep an exception in the tokenizer manager's output loop from killing the process
    (idempotent).

    sglang-jax 0.1.0rc0 runs ``TokenizerManager.handle_loop`` (which turns every output of the
    detokenizer into answers) under ``print_exception_wrapper``, which calls
    ``kill_process_tree(os.getpid(), include_parent=True)`` on any exception: the trainer or
    the server dies (SIGKILL) with the engine. The wrapper here records the fault, as for
    the scheduler and detokenizer threads (callers get ``EngineFaultError``, requests in
    flight are aborted), and lets the loop thread live on. Returns True when applied now.
    """
    tm = importlib.import_module("sgl_jax.srt.managers.tokenizer_manager")
    original = tm.print_exception_wrapper
    if getattr(original, "_contained", False):
        return False

    async def print_exception_wrapper(func):
        try:
            await func()
        except Exception as e:  # noqa: BLE001 - CancelledError (our stop) passes through
            name = TOKENIZER_LOOP if getattr(func, "__name__", "") == "handle_loop" else None
            _record_fault(e, name)

    print_exception_wrapper._contained = True  # type: ignore[attr-defined]
    print_exception_wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    tm.print_exception_wrapper = print_exception_wrapper
    return True


# --------------------------------------------------------------------------------------
# scheduler idle spin, parking, and thread shutdown
# --------------------------------------------------------------------------------------


def raise_stop() -> None:
    """End the upstream thread this runs in.

    SystemExit is not an ``Exception``, so upstream ``except Exception`` handlers (which
    send SIGQUIT to the whole process) do not catch it, and ``threading`` ends the thread
    silently (it checks ``exc_type == SystemExit``, so no subclass).
    """
    raise SystemExit()


class _UnpicklesToStop:
    """Sent over a zmq socket: ``recv_pyobj`` raises SystemExit while unpickling it."""

    def __reduce__(self):
        return (raise_stop, ())


class _StopOnUnpack:
    """Put on a ``queue.Queue`` whose consumer unpacks items: unpacking raises SystemExit."""

    def __iter__(self):
        raise_stop()


class _StopOnArithmetic(float):
    """Replaces the watchdog timeout: the watchdog thread ends at its next wake-up."""

    def __new__(cls):
        return super().__new__(cls, float("inf"))

    def __floordiv__(self, other):
        raise_stop()


class SchedulerStop(threading.Event):
    """Set: the scheduler thread ends. ``wake()``: an idle scheduler returns from its wait now."""

    def __init__(self):
        super().__init__()
        self.wake_fd, self._wake_w = os.pipe()
        os.set_blocking(self.wake_fd, False)

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def drain(self) -> None:
        try:
            while os.read(self.wake_fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        """Release the pipe (only once the scheduler thread has ended)."""
        for fd in (self.wake_fd, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


def quiet_idle_scheduler(scheduler: Any, *, poll_ms: int = IDLE_POLL_MS) -> "SchedulerStop":
    """Make the scheduler wait on its sockets instead of spinning while it has no work.

    Wraps the instance's ``recv_requests``: when nothing arrived and nothing is queued
    or running, it blocks in ``zmq.Poller.poll`` until a message arrives (no added
    latency) or ``poll_ms`` passes. Returns an Event; once set, the scheduler thread
    ends at its next loop iteration.
    """
    stop = SchedulerStop()
    original: Callable[[], list] = scheduler.recv_requests
    sockets = [s for s in (scheduler.recv_from_tokenizer, scheduler.recv_from_rpc) if s is not None]
    poller = zmq.Poller()
    for sock in sockets:
        poller.register(sock, zmq.POLLIN)
    poller.register(stop.wake_fd, zmq.POLLIN)

    def recv_requests() -> list:
        if stop.is_set():
            raise_stop()
        reqs = original()
        if not reqs and (scheduler._engine_paused or scheduler.is_fully_idle()):
            if dict(poller.poll(poll_ms)).get(stop.wake_fd):
                stop.drain()
            if stop.is_set():
                raise_stop()
            reqs = original()
        return reqs

    scheduler.recv_requests = recv_requests
    return stop


class SchedulerPark:
    """Stops the scheduler thread between two iterations, where no forward pass runs.

    Wraps the scheduler's ``recv_requests`` (called once at the top of every loop
    iteration): while anyone holds a park the thread waits there, so the holders may
    replace the weights, flush the prefix cache or rearrange the scheduler's queues from
    their own threads. Parks nest: the thread resumes once every holder has released (and
    then runs at least one iteration before a new park takes effect). ``park_when`` parks
    at the first iteration boundary where a condition holds (e.g. a request has produced N
    tokens), decided on the scheduler thread itself.
    """

    def __init__(self, scheduler: Any, wake: Callable[[], None] = lambda: None):
        self._wake = wake  # returns an idle scheduler from its socket wait at once
        self._cond = threading.Condition()
        self._holds = 0
        #: Counts the times every hold was released (the parked thread may then go on).
        self._epoch = 0
        #: Iteration number and epoch at which the thread waits now (None while it runs).
        self._parked_at: int | None = None
        self._parked_epoch: int | None = None
        self._iteration = 0
        self._conditions: list[Callable[[], bool]] = []
        inner = scheduler.recv_requests

        def recv_requests() -> list:
            with self._cond:
                self._iteration += 1
                for condition in list(self._conditions):
                    if condition():
                        self._conditions.remove(condition)
                        self._holds += 1  # on behalf of the caller of park_when
                if self._holds:
                    epoch = self._epoch
                    self._parked_at, self._parked_epoch = self._iteration, epoch
                    self._cond.notify_all()
                    self._cond.wait_for(lambda: self._epoch != epoch)
                    self._parked_at = self._parked_epoch = None
            return inner()

        scheduler.recv_requests = recv_requests

    def _held_parked(self, after: int | None = None) -> bool:
        """The thread waits between iterations and stays there until the holds are released."""
        return (
            self._parked_at is not None
            and self._parked_epoch == self._epoch
            and (after is None or self._parked_at > after)
        )

    @property
    def parked(self) -> bool:
        """Whether the scheduler thread is held between two iterations now."""
        with self._cond:
            return self._held_parked()

    def park(self, timeout: float, *, fresh: bool = False) -> bool:
        """Ask the scheduler to stop and wait until it has (``fresh``: at an iteration
        boundary after the one it waits at now, i.e. after one more iteration); False, and
        no park held, on timeout. Each successful park needs one ``release``."""
        with self._cond:
            since = self._iteration if fresh else None
            self._holds += 1
            self._wake()
            if self._cond.wait_for(lambda: self._held_parked(since), timeout):
                return True
            self._release_locked()
            return False

    def park_when(self, condition: Callable[[], bool]) -> "ConditionalPark":
        """Park at the first iteration boundary where ``condition()`` is true, evaluated on
        the scheduler thread under the park's lock (keep it cheap). Returns at once; wait
        for the park with ``.wait(timeout)``, end it with ``.release()``."""
        with self._cond:
            self._conditions.append(condition)
            self._wake()
        return ConditionalPark(self, condition)

    def _release_locked(self) -> None:
        if self._holds <= 0:
            raise RuntimeError("SchedulerPark.release() without a park held")
        self._holds -= 1
        if self._holds == 0:
            self._epoch += 1
        self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._release_locked()

    def release_all(self) -> None:
        """Drop every hold and pending condition (at shutdown: a parked thread must see its stop)."""
        with self._cond:
            self._conditions.clear()
            if self._holds:
                self._holds = 0
                self._epoch += 1
            self._cond.notify_all()


class ConditionalPark:
    """A park that takes effect once a condition holds (``SchedulerPark.park_when``)."""

    def __init__(self, park: SchedulerPark, condition: Callable[[], bool]):
        self._park = park
        self._condition = condition

    @property
    def fired(self) -> bool:
        return self._condition not in self._park._conditions

    def wait(self, timeout: float) -> bool:
        """Wait until the scheduler has parked on the condition; False on timeout."""
        park = self._park
        with park._cond:
            return park._cond.wait_for(lambda: self.fired and park._held_parked(), timeout)

    def release(self) -> None:
        """Resume the scheduler (or, if the condition never held, stop watching for it)."""
        with self._park._cond:
            if not self.fired:
                self._park._conditions.remove(self._condition)
                return
            self._park._release_locked()


def started_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """Threads started since ``before`` (tqdm's process-wide monitor is not the engine's)."""
    return [t for t in threading.enumerate() if t not in before and t.name != "tqdm_monitor"]


def stop_engine_threads(
    engine: Any,
    threads: list[threading.Thread],
    scheduler_stop: threading.Event | None,
    *,
    timeout: float = THREAD_STOP_TIMEOUT_S,
) -> list[str]:
    """Stop the threads one in-process Engine started; return the names of any still alive.

    Replaces ``Engine.shutdown()``, which stops none of them and kills every child
    process of the host (for example a server a test started).
    """
    scheduler = engine.scheduler_info.get("scheduler") if engine.scheduler_info else None
    # Keep the SystemExit of the threads we end out of any installed excepthook (pytest's
    # reports every thread exception; the default hook already ignores SystemExit).
    previous_hook = threading.excepthook
    stopping = set(threads)

    def hook(args):
        if args.exc_type is SystemExit and args.thread in stopping:
            return
        previous_hook(args)

    threading.excepthook = hook
    if engine.tokenizer_manager is not None:
        engine.tokenizer_manager.shutdown()

    # Scheduler thread: ends at its next recv_requests (at most one poll interval).
    if scheduler_stop is not None:
        scheduler_stop.set()
        getattr(scheduler_stop, "wake", lambda: None)()
    # Detokenizer thread: blocked in recv_pyobj on its PULL socket; send it a pill.
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    try:
        sock.connect(engine.port_args.detokenizer_ipc_name)
        sock.send(pickle.dumps(_UnpicklesToStop()))
    finally:
        sock.close()
    if scheduler is not None:
        worker = scheduler.tp_worker
        # Overlap worker thread: a falsy batch ends its loop.
        input_queue = getattr(worker, "input_queue", None)
        if isinstance(input_queue, queue.Queue):
            input_queue.put((None, None, None, None))
        inner = getattr(worker, "worker", worker)
        sync_queue = getattr(inner, "sync_queue", None)
        if isinstance(sync_queue, queue.Queue):
            sync_queue.put(_StopOnUnpack())
        # Watchdog thread: sleeps watchdog_timeout // 2 between checks; ends at its next wake-up.
        scheduler.watchdog_timeout = _StopOnArithmetic()
    # Event loop thread (enable_engine_loop_run_forever_daemon).
    loop = getattr(engine, "loop", None)
    if loop is not None and loop.is_running():
        import asyncio

        async def cancel_then_stop():
            # Stop the loop only once the cancelled tasks have unwound: a caller waiting on one
            # (through run_coroutine_threadsafe) gets its answer, not a future left pending.
            tasks = [t for t in asyncio.all_tasks(loop) if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=LOOP_UNWIND_TIMEOUT_S)
            loop.stop()

        loop.call_soon_threadsafe(lambda: loop.create_task(cancel_then_stop()))
    if engine.send_to_rpc is not None:
        engine.send_to_rpc.close(linger=0)

    deadline = time.monotonic() + timeout
    for t in threads:
        if "watchdog" in t.name:
            continue  # asleep; holds no socket, ends by itself
        t.join(max(0.0, deadline - time.monotonic()))
    threading.excepthook = previous_hook if threading.excepthook is hook else threading.excepthook
    endpoints = [
        getattr(engine.port_args, name, None)
        for name in (
            "tokenizer_ipc_name",
            "scheduler_input_ipc_name",
            "detokenizer_ipc_name",
            "rpc_ipc_name",
            "metrics_ipc_name",
        )
    ]
    if not any(t.is_alive() and "watchdog" not in t.name for t in threads):
        if not destroy_engine_contexts([e for e in endpoints if e]):
            logger.warning("terminating the engine's zmq contexts did not finish in time; left to the process exit")
        if scheduler is not None:
            _release_stopped_scheduler(scheduler)
    # Upstream registered Engine.shutdown with atexit; it would kill our children at exit.
    atexit.unregister(engine.shutdown)
    # Upstream leaves its IPC socket files in the temp directory.
    for name in (
        "tokenizer_ipc_name",
        "scheduler_input_ipc_name",
        "detokenizer_ipc_name",
        "rpc_ipc_name",
        "metrics_ipc_name",
    ):
        address = getattr(engine.port_args, name, None) or ""
        if address.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(address[len("ipc://") :])
    return [t.name for t in threads if t.is_alive() and "watchdog" not in t.name]


#: What the scheduler's watchdog thread reads while it sleeps out its last interval.
_WATCHDOG_FIELDS = frozenset(
    {"cur_batch", "forward_ct", "watchdog_timeout", "watchdog_last_forward_ct", "watchdog_last_time"}
)


def _release_stopped_scheduler(scheduler: Any) -> None:
    """Drop a stopped scheduler's state (its model runner, KV cache, weights, batches).

    Its watchdog thread sleeps ``watchdog_timeout // 2`` (150 s by default) between checks
    and holds the scheduler until it wakes; without this, a stopped engine's memory stays
    allocated that long (a restarted engine would briefly hold two). The watchdog then
    wakes, reads only these fields and ends.
    """
    scheduler.cur_batch = None
    for name in [n for n in vars(scheduler) if n not in _WATCHDOG_FIELDS]:
        with contextlib.suppress(AttributeError):
            delattr(scheduler, name)


def restore_signal_handlers(saved: dict[int, Any]) -> None:
    """Put back SIGCHLD (upstream's handler reaps the host's own children).

    SIGQUIT stays upstream's: an exception inside an engine thread sends SIGQUIT, and
    upstream's handler is what ends the process then (see DESIGN.md).
    """
    if threading.current_thread() is threading.main_thread():
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def save_signal_handlers() -> dict[int, Any]:
    return {signal.SIGCHLD: signal.getsignal(signal.SIGCHLD)}
