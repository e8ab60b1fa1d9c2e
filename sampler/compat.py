"""Workarounds for upstream sglang-jax behaviour, in one place.

Each workaround names the upstream version it was written against
(``SGLANG_JAX_VERSION``) and has a test in ``tests/test_compat.py`` that runs the
unpatched upstream code and fails once the workaround is no longer needed, and a
test that shows the workaround still works. Nothing outside this module patches
upstream code.

| workaround                      | upstream behaviour (sglang-jax 0.1.0rc0)                                   |
|---------------------------------|-----------------------------------------------------------------------------|
| ``patch_merge_kv_sharding``     | native attention on CPU: Llama/Qwen2 k and v reach ``merge_kv`` with        |
|                                 | different shardings -> ShardingTypeError in the scheduler thread -> SIGQUIT |
| ``check_head_dim``              | native attention on CPU returns the KV pool's 128-padded head width, so a   |
|                                 | head_dim that is not a multiple of 128 crashes in o_proj                    |
| ``quiet_idle_scheduler``        | the scheduler loop polls its sockets without blocking: an idle engine keeps |
|                                 | one core at 100%, also after ``Engine.shutdown()``                          |
| ``stop_engine_threads``         | ``Engine.shutdown()`` stops no thread (scheduler, detokenizer, event loop,  |
|                                 | d2h sync, watchdog) and kills every child process of the host              |
| ``patch_zmq_linger``            | sockets keep an infinite linger: after an engine stops, ``zmq_ctx_term``    |
|                                 | blocks at interpreter exit and the process never ends                      |
| ``restore_signal_handlers``     | ``Engine()`` installs process-wide SIGCHLD/SIGQUIT handlers; the SIGCHLD one |
|                                 | reaps children that the host's own code waits for                          |
| ``patch_non_stream_chunks``     | non-streamed outputs > 50 tokens repeat earlier tokens and logprobs        |
|                                 | (120 tokens -> 270 output_ids)                                              |
| ``patch_mixed_logprob_batches`` | a batch mixing output-logprob and no-logprob requests raises TypeError in  |
|                                 | the scheduler thread -> SIGQUIT -> the process dies                         |
| ``patch_contain_engine_faults`` | any exception in the scheduler/detokenizer thread SIGQUITs the process;    |
|                                 | contained: recorded, callers get ``EngineFaultError``, the process lives   |
"""

from __future__ import annotations

import atexit
import contextlib
import os
import logging
import pickle
import queue
import signal
import dataclasses
import threading
import time
from typing import Any, Callable

logger = logging.getLogger(__name__)

SGLANG_JAX_VERSION = "0.1.0rc0"


def upstream_version() -> str:
    from sgl_jax.version import __version__

    return __version__


def warn_if_untested_version() -> None:
    version = upstream_version()
    if version != SGLANG_JAX_VERSION:
        logger.warning(
            "sglang-jax %s is installed; the workarounds in sampler.compat were checked against %s",
            version,
            SGLANG_JAX_VERSION,
        )


# --------------------------------------------------------------------------------------
# merge_kv sharding (CPU native attention, Llama / Qwen2)
# --------------------------------------------------------------------------------------

_merge_kv_patched = False


def patch_merge_kv_sharding() -> bool:
    """Reshard v to k's sharding before ``memory_pool.merge_kv`` (idempotent).

    The two differ only in how the size-1 "data" axis is named, so the reshard moves
    no data; without it, jnp.stack raises ShardingTypeError inside the scheduler
    thread and upstream kills the process. Returns True when the patch was applied now.
    """
    global _merge_kv_patched
    if _merge_kv_patched:
        return False
    import jax
    from sgl_jax.srt.mem_cache import memory_pool

    original = memory_pool.merge_kv

    def merge_kv(k, v):
        k_sharding = jax.typeof(k).sharding
        if getattr(k_sharding, "spec", None) is not None and jax.typeof(v).sharding.spec != k_sharding.spec:
            v = jax.sharding.reshard(v, k_sharding.spec)
        return original(k, v)

    merge_kv.__wrapped__ = original  # type: ignore[attr-defined]
    memory_pool.merge_kv = merge_kv
    _merge_kv_patched = True
    return True


# --------------------------------------------------------------------------------------
# zmq sockets that linger forever
# --------------------------------------------------------------------------------------

_ZMQ_MODULES = (
    "sgl_jax.srt.utils",
    "sgl_jax.srt.utils.common_utils",
    "sgl_jax.srt.managers.scheduler",
    "sgl_jax.srt.managers.tokenizer_manager",
    "sgl_jax.srt.managers.detokenizer_manager",
    "sgl_jax.srt.entrypoints.engine",
)


def patch_zmq_linger() -> bool:
    """Create the engine's zmq sockets with LINGER 0 (idempotent).

    Upstream sockets keep zmq's default infinite linger; once an engine is stopped,
    messages queued for a peer that is gone make ``zmq_ctx_term`` block at
    interpreter exit, so the process never ends. Returns True when applied now.
    """
    import importlib

    import zmq

    common = importlib.import_module("sgl_jax.srt.utils.common_utils")
    original = common.get_zmq_socket
    if getattr(original, "_linger_patched", False):
        return False

    def get_zmq_socket(context, socket_type, endpoint, bind):
        sock = original(context, socket_type, endpoint, bind)
        sock.setsockopt(zmq.LINGER, 0)
        with _contexts_lock:
            _contexts_by_endpoint.setdefault(endpoint, []).append(context)
        return sock

    get_zmq_socket._linger_patched = True  # type: ignore[attr-defined]
    get_zmq_socket.__wrapped__ = original  # type: ignore[attr-defined]
    for name in _ZMQ_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "get_zmq_socket", None) is original:
            module.get_zmq_socket = get_zmq_socket
    return True


#: Interval (tokens) of upstream's forced intermediate outputs of non-streamed requests.
UPSTREAM_FORCE_STREAM_INTERVAL = 50


def patch_non_stream_chunks() -> bool:
    """Send a non-streamed request's output once, when it finishes (idempotent).

    sglang-jax 0.1.0rc0 sends every non-streamed request an intermediate output each
    50 tokens (``DEFAULT_FORCE_STREAM_INTERVAL``), and the tokenizer manager then adds
    earlier tokens again: 120 generated tokens come back as 270 ``output_ids`` and 270
    ``output_token_logprobs`` (50 + 100 + 120). Raising the interval beyond any
    generation length leaves one, correct, final output. Returns True when applied now.
    """
    import importlib

    module = importlib.import_module("sgl_jax.srt.managers.scheduler_output_processor_mixin")
    if module.DEFAULT_FORCE_STREAM_INTERVAL != UPSTREAM_FORCE_STREAM_INTERVAL:
        return False
    module.DEFAULT_FORCE_STREAM_INTERVAL = 1 << 40
    return True


def patch_mixed_logprob_batches() -> bool:
    """Let requests with and without output logprobs share a batch (idempotent).

    sglang-jax 0.1.0rc0 turns ``return_logprob=True`` (no start position, no top-k) into
    "output logprobs only"; a batch computes those only if *all* its requests want them
    (``ScheduleBatch.return_output_logprob_only = all(...)``), but then reads them for every
    request that does: one such request batched with one that wants none raises TypeError
    in the scheduler thread, which kills the process. Marking every generation request as
    "output logprobs only" on the scheduler side (the tokenizer manager still returns them
    only to those that asked) keeps the batch flag true. Cost: a log-softmax per token.
    Returns True when applied now.
    """
    import importlib

    tm = importlib.import_module("sgl_jax.srt.managers.tokenizer_manager")
    io = importlib.import_module("sgl_jax.srt.managers.io_struct")
    original = tm.TokenizerManager._create_tokenized_object
    if getattr(original, "_mixed_logprob_patched", False):
        return False

    def _create_tokenized_object(self, *args, **kwargs):
        tokenized = original(self, *args, **kwargs)
        if isinstance(tokenized, io.TokenizedGenerateReqInput) and not (
            tokenized.return_logprob or tokenized.return_output_logprob_only
        ):
            tokenized.return_output_logprob_only = True
        return tokenized

    _create_tokenized_object._mixed_logprob_patched = True  # type: ignore[attr-defined]
    _create_tokenized_object.__wrapped__ = original  # type: ignore[attr-defined]
    tm.TokenizerManager._create_tokenized_object = _create_tokenized_object
    return True


# endpoint -> zmq contexts whose sockets use it (recorded by the patched get_zmq_socket)
_contexts_by_endpoint: dict[str, list] = {}
_contexts_lock = threading.Lock()
#: Contexts of stopped engines, kept referenced so that the garbage collector never
#: runs ``Context.__del__`` (which terminates the context and can block) on some
#: unrelated thread; closed ones cost nothing.
_retired_contexts: list = []


def _destroy_engine_contexts(endpoints: list[str], timeout: float = 5.0) -> bool:
    """Close every socket of the engine's zmq contexts and terminate them, off the caller's
    thread with a timeout (a context term that blocks must not hang shutdown)."""
    with _contexts_lock:
        contexts = []
        for endpoint in endpoints:
            for ctx in _contexts_by_endpoint.pop(endpoint, []):
                if all(ctx is not c for c in contexts):
                    contexts.append(ctx)
    _retired_contexts.extend(contexts)

    def destroy():
        for ctx in contexts:
            ctx.destroy(linger=0)

    t = threading.Thread(target=destroy, name="sampler-zmq-teardown", daemon=True)
    try:
        t.start()
    except RuntimeError:  # at interpreter exit: pyzmq leaves contexts alone then
        return True
    t.join(timeout)
    return not t.is_alive()


# --------------------------------------------------------------------------------------
# Tunix: rope_theta ignored (google-tunix 0.1.7)
# --------------------------------------------------------------------------------------

TUNIX_VERSION = "0.1.7"
TUNIX_FIXED_ROPE_THETA = 1_000_000


def warn_tunix_rope_theta(architecture: str, rope_theta: float) -> bool:
    """Tunix 0.1.7's Qwen3 and Llama3 attention call ``apply_rope`` without the config's
    rope_theta, so they always use 1e6. A trainer built from such a model computes other
    logprobs than the engine (which follows the HF config) unless rope_theta is 1e6
    (Qwen3's own value; Llama 3 uses 5e5). Returns True when it warned."""
    if architecture in ("Qwen3ForCausalLM", "LlamaForCausalLM") and float(rope_theta) != TUNIX_FIXED_ROPE_THETA:
        logger.warning(
            "rope_theta=%s: Tunix %s's %s ignores it and uses %s, so trainer and engine logprobs will differ",
            rope_theta, TUNIX_VERSION, architecture, TUNIX_FIXED_ROPE_THETA,
        )
        return True
    return False


# --------------------------------------------------------------------------------------
# head_dim on CPU
# --------------------------------------------------------------------------------------


class UnsupportedModelError(ValueError):
    """The engine cannot serve this model in this configuration."""


def check_head_dim(head_dim: int, *, backend: str, attention_backend: str) -> None:
    """Refuse, before the engine starts, a head_dim the CPU native backend cannot serve."""
    if backend == "cpu" and attention_backend == "native" and head_dim % 128 != 0:
        raise UnsupportedModelError(
            f"head_dim={head_dim}: sglang-jax {SGLANG_JAX_VERSION} native attention on CPU pads "
            "the KV head width to a multiple of 128 and then fails in o_proj; use a model whose "
            "head_dim is a multiple of 128 on CPU (TPU has no such limit)"
        )


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


def _record_fault(error: BaseException) -> EngineFault:
    import traceback

    thread = threading.current_thread()
    fault = EngineFault(thread.name, f"{type(error).__name__}: {error}", traceback.format_exc())
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
    import importlib

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


# --------------------------------------------------------------------------------------
# scheduler idle spin and thread shutdown
# --------------------------------------------------------------------------------------


def _raise_stop() -> None:
    """End the upstream thread this runs in.

    SystemExit is not an ``Exception``, so upstream ``except Exception`` handlers (which
    send SIGQUIT to the whole process) do not catch it, and ``threading`` ends the thread
    silently (it checks ``exc_type == SystemExit``, so no subclass).
    """
    raise SystemExit()


class _UnpicklesToStop:
    """Sent over a zmq socket: ``recv_pyobj`` raises SystemExit while unpickling it."""

    def __reduce__(self):
        return (_raise_stop, ())


class _StopOnUnpack:
    """Put on a ``queue.Queue`` whose consumer unpacks items: unpacking raises SystemExit."""

    def __iter__(self):
        _raise_stop()


class _StopOnArithmetic(float):
    """Replaces the watchdog timeout: the watchdog thread ends at its next wake-up."""

    def __new__(cls):
        return super().__new__(cls, float("inf"))

    def __floordiv__(self, other):
        _raise_stop()


class _SchedulerStop(threading.Event):
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


def quiet_idle_scheduler(scheduler: Any, *, poll_ms: int = 20) -> threading.Event:
    """Make the scheduler wait on its sockets instead of spinning while it has no work.

    Wraps the instance's ``recv_requests``: when nothing arrived and nothing is queued
    or running, it blocks in ``zmq.Poller.poll`` until a message arrives (no added
    latency) or ``poll_ms`` passes. Returns an Event; once set, the scheduler thread
    ends at its next loop iteration.
    """
    import zmq

    stop = _SchedulerStop()
    original: Callable[[], list] = scheduler.recv_requests
    sockets = [s for s in (scheduler.recv_from_tokenizer, scheduler.recv_from_rpc) if s is not None]
    poller = zmq.Poller()
    for sock in sockets:
        poller.register(sock, zmq.POLLIN)
    poller.register(stop.wake_fd, zmq.POLLIN)

    def recv_requests() -> list:
        if stop.is_set():
            _raise_stop()
        reqs = original()
        if not reqs and (scheduler._engine_paused or scheduler.is_fully_idle()):
            if dict(poller.poll(poll_ms)).get(stop.wake_fd):
                stop.drain()
            if stop.is_set():
                _raise_stop()
            reqs = original()
        return reqs

    scheduler.recv_requests = recv_requests
    return stop


def started_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """Threads started since ``before`` (tqdm's process-wide monitor is not the engine's)."""
    return [t for t in threading.enumerate() if t not in before and t.name != "tqdm_monitor"]


def stop_engine_threads(
    engine: Any,
    threads: list[threading.Thread],
    scheduler_stop: threading.Event | None,
    *,
    timeout: float = 10.0,
) -> list[str]:
    """Stop the threads one in-process Engine started; return the names of any still alive.

    Replaces ``Engine.shutdown()``, which stops none of them and kills every child
    process of the host (for example a server a test started).
    """
    import zmq

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

        def _cancel_and_stop():
            import asyncio

            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.call_soon(loop.stop)

        loop.call_soon_threadsafe(_cancel_and_stop)
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
        for name in ("tokenizer_ipc_name", "scheduler_input_ipc_name", "detokenizer_ipc_name", "rpc_ipc_name", "metrics_ipc_name")
    ]
    if not any(t.is_alive() and "watchdog" not in t.name for t in threads):
        if not _destroy_engine_contexts([e for e in endpoints if e]):
            logger.warning("terminating the engine's zmq contexts did not finish in time; left to the process exit")
    # Upstream registered Engine.shutdown with atexit; it would kill our children at exit.
    atexit.unregister(engine.shutdown)
    # Upstream leaves its IPC socket files in the temp directory.
    for name in ("tokenizer_ipc_name", "scheduler_input_ipc_name", "detokenizer_ipc_name", "rpc_ipc_name", "metrics_ipc_name"):
        address = getattr(engine.port_args, name, None) or ""
        if address.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(address[len("ipc://"):])
    return [t.name for t in threads if t.is_alive() and "watchdog" not in t.name]


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
