"""Start, drive and stop one sglang-jax Engine inside this process."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Coroutine, TypeVar

import jax

from sampler import compat
from sampler.config import SamplerConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")


def read_hf_config(model_path: str | Path) -> dict[str, Any]:
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in model_path {str(model_path)!r}")
    return json.loads(path.read_text())


def engine_kwargs(config: SamplerConfig) -> dict[str, Any]:
    """The Engine arguments for ``config``, with working defaults on JAX's CPU backend."""
    model_path = config.model_path
    if os.path.isdir(model_path):
        model_path = os.path.abspath(model_path)  # upstream's tokenizer loading breaks on relative paths
    kwargs: dict[str, Any] = dict(
        model_path=model_path,
        load_format=config.load_format,
        context_length=config.context_length,
        max_running_requests=config.max_running_requests,
        tp_size=config.tp_size,
        random_seed=config.random_seed,
        disable_radix_cache=config.disable_radix_cache,
        enable_deterministic_sampling=config.deterministic_sampling,
        log_level=config.log_level,
        enable_single_process=True,
        # The event loop runs in its own daemon thread, so any thread may submit work.
        enable_engine_loop_run_forever_daemon=True,
    )
    device_indexes = config.device_indexes
    if device_indexes is None and jax.device_count() > config.tp_size:
        device_indexes = list(range(config.tp_size))  # upstream needs them when devices > tp
    if device_indexes is not None:
        device_indexes = [int(i) for i in device_indexes]
        if len(set(device_indexes)) != config.tp_size or not all(0 <= i < jax.device_count() for i in device_indexes):
            raise ValueError(
                f"device_indexes={device_indexes} must name tp_size={config.tp_size} distinct devices "
                f"out of the {jax.device_count()} this process has"
            )
        kwargs["device_indexes"] = device_indexes
    if config.mem_fraction_static is not None:
        kwargs["mem_fraction_static"] = config.mem_fraction_static
    if jax.default_backend() == "cpu":
        kwargs.update(
            device="cpu",
            attention_backend="native",
            disable_precompile=True,
            disable_overlap_schedule=True,
            # Memory profiling on CPU would size the KV cache from host RAM (GBs).
            max_total_tokens=config.max_total_tokens
            or config.context_length * config.max_running_requests,
        )
    elif config.max_total_tokens is not None:
        kwargs["max_total_tokens"] = config.max_total_tokens
    kwargs.update(config.engine_kwargs)
    kwargs["enable_single_process"] = True
    kwargs["enable_engine_loop_run_forever_daemon"] = True
    return kwargs


class EngineFaultError(RuntimeError):
    """An engine thread failed; this engine cannot serve again (the process is fine)."""


class UpdateTimeoutError(TimeoutError):
    """Requests kept running past the time allowed for them to finish before a weight swap."""


class SchedulerPark:
    """Stops the scheduler thread between two iterations, where no forward pass runs.

    Wraps the scheduler's ``recv_requests`` (called once at the top of every loop
    iteration): while a park is requested the thread waits there, so the caller may
    replace the weights and flush the prefix cache from its own thread.
    """

    def __init__(self, scheduler: Any, wake: Callable[[], None] = lambda: None):
        self._wake = wake  # returns an idle scheduler from its socket wait at once
        self._cond = threading.Condition()
        self._wanted = False
        self._parked = False
        inner = scheduler.recv_requests

        def recv_requests() -> list:
            with self._cond:
                if self._wanted:
                    self._parked = True
                    self._cond.notify_all()
                    self._cond.wait_for(lambda: not self._wanted)
                    self._parked = False
            return inner()

        scheduler.recv_requests = recv_requests

    def park(self, timeout: float) -> bool:
        """Ask the scheduler to stop and wait until it has; False (and no park) on timeout."""
        with self._cond:
            self._wanted = True
            self._wake()
            if self._cond.wait_for(lambda: self._parked, timeout):
                return True
            self._wanted = False
            self._cond.notify_all()
            return False

    def release(self) -> None:
        with self._cond:
            self._wanted = False
            self._cond.notify_all()


class EngineHandle:
    """An in-process Engine plus what is needed to drive it from any thread and stop it."""

    def __init__(self, config: SamplerConfig):
        from sgl_jax.srt.entrypoints.engine import Engine

        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "sglang-jax installs signal handlers while it starts, so an Engine can only be "
                "built on the main thread"
            )
        compat.warn_if_untested_version()
        kwargs = engine_kwargs(config)
        hf = read_hf_config(config.model_path)
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        compat.check_head_dim(
            head_dim, backend=jax.default_backend(), attention_backend=kwargs.get("attention_backend", "fa")
        )
        if kwargs.get("attention_backend") == "native":
            compat.patch_merge_kv_sharding()
        compat.patch_zmq_linger()
        compat.patch_non_stream_chunks()
        compat.patch_contain_engine_faults()
        compat.patch_mixed_logprob_batches()
        self.kwargs = kwargs
        saved = compat.save_signal_handlers()
        before = set(threading.enumerate())
        try:
            self.engine = Engine(**kwargs)
        finally:
            compat.restore_signal_handlers(saved)
        self.threads = compat.started_threads(before)
        # Upstream registered Engine.shutdown at exit (it kills the host's child processes).
        atexit.unregister(self.engine.shutdown)
        atexit.register(self.shutdown)
        self.scheduler = self.engine.scheduler_info["scheduler"]
        self.model_runner = self.scheduler.tp_worker.worker.model_runner
        self._scheduler_stop = compat.quiet_idle_scheduler(self.scheduler)
        self._park = SchedulerPark(self.scheduler, self._scheduler_stop.wake)
        compat.watch_thread_faults(self.threads, self._on_fault)
        self.loop: asyncio.AbstractEventLoop = self.engine.loop
        self.closed = False

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.model_runner.mesh

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run an engine coroutine on the engine's event loop and wait for its result."""
        if self.closed:
            coro.close()
            raise RuntimeError("the engine has been shut down")
        self.raise_if_faulted()
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 0.25 if deadline is None else min(0.25, max(0.0, deadline - time.monotonic()))
            try:
                return future.result(wait)
            except TimeoutError:
                if self.fault() is not None:
                    future.cancel()
                    self.raise_if_faulted()
                if deadline is not None and time.monotonic() >= deadline:
                    future.cancel()
                    raise

    def fault(self) -> compat.EngineFault | None:
        """What ended one of this engine's threads, if anything did."""
        return getattr(self.scheduler, "_contained_fault", None) or compat.thread_fault(self.threads)

    def _on_fault(self, fault: compat.EngineFault) -> None:
        """From the failing thread: end every request still waiting on this engine."""
        try:
            self.loop.call_soon_threadsafe(_abort_pending, self.engine.tokenizer_manager, fault)
        except RuntimeError:  # the loop is closed: nobody is waiting
            pass

    def raise_if_faulted(self) -> None:
        fault = self.fault()
        if fault is not None:
            raise EngineFaultError(
                f"the sglang-jax engine's {fault.thread} thread failed ({fault.error}); this engine cannot "
                "serve any more. Shut the sampler down and build a new one (the process and the trainer's "
                "state are unaffected)."
            )

    @contextlib.contextmanager
    def quiesced(self, timeout: float):
        """Run the body while no request runs in the engine, whoever sent it.

        New requests (this process's callers, the HTTP server, anyone using the engine's
        tokenizer manager) wait at the tokenizer manager (upstream's pause flag); requests
        already in flight finish; then the scheduler thread is parked between iterations.
        Raises UpdateTimeoutError, with nothing changed, if requests are still running after
        ``timeout`` seconds.
        """
        tm = self.engine.tokenizer_manager
        deadline = time.monotonic() + timeout
        self.run(_set_paused(tm, True), timeout=60)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not self.run(_wait_no_requests(tm, left), timeout=left + 60):
                    raise UpdateTimeoutError(
                        f"{len(tm.rid_to_state)} requests were still running after {timeout:.0f} s; "
                        "the weights were not changed"
                    )
                if not self._park.park(max(deadline - time.monotonic(), 0.1)):
                    continue
                # Parked: a request sent between the check and the park is still in
                # rid_to_state (the tokenizer records it as it sends it).
                if not tm.rid_to_state and self.scheduler.is_fully_idle():
                    break
                self._park.release()
                time.sleep(0.002)
            try:
                yield
            finally:
                self._park.release()
        finally:
            self.run(_set_paused(tm, False), timeout=60)

    def flush_cache_parked(self) -> None:
        """Drop the prefix cache; only inside ``quiesced`` (the scheduler thread is parked)."""
        ok, message, _ = self.scheduler.flush_cache()
        if not ok:
            raise RuntimeError(f"sglang-jax refused to flush its prefix cache: {message}")

    def flush_cache(self) -> None:
        out = self.run(self.engine.tokenizer_manager.flush_cache(), timeout=60)
        if not getattr(out, "success", True):
            raise RuntimeError(f"sglang-jax refused to flush its prefix cache: {out}")

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.shutdown)
        alive = compat.stop_engine_threads(self.engine, self.threads, self._scheduler_stop)
        if alive:
            logger.warning("engine threads still running after shutdown: %s", alive)
        if not any("scheduler" in name for name in alive):
            self._scheduler_stop.close()


async def _set_paused(tm: Any, paused: bool) -> None:
    async with tm.is_pause_cond:
        tm.is_pause = paused
        tm.is_pause_cond.notify_all()


async def _wait_no_requests(tm: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while tm.rid_to_state:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.002)
    return True


def _abort_pending(tm: Any, fault: compat.EngineFault) -> None:
    """Finish every request of a failed engine with an "abort" finish reason (what upstream
    returns for aborted requests), so that clients (HTTP ones too) get an answer."""
    message = f"the engine's {fault.thread} thread failed ({fault.error}); the request was aborted"
    for rid, state in list(tm.rid_to_state.items()):
        state.out_list.append(
            {"text": "", "output_ids": [], "meta_info": {"id": rid, "finish_reason": {"type": "abort", "message": message}}}
        )
        state.finished = True
        state.event.set()
        tm.rid_to_state.pop(rid, None)
