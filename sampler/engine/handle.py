"""Start, drive, quiesce and stop one sglang-jax Engine inside this process."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from typing import Any, Callable, Coroutine, TypeVar

import jax

from converters.spec import config_getter, head_dim_of, read_hf_config
from sampler import compat
from sampler.config import SamplerConfig
from sampler.engine.progress import progress
from sampler.engine.validation import RequestLimits, RequestValidator
from sampler.errors import EngineFaultError, UpdateTimeoutError

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: How often a caller waiting on the engine looks for a fault of its threads (s).
FAULT_POLL_S = 0.25
#: How long pausing or resuming the tokenizer manager may take (s).
PAUSE_TIMEOUT_S = 60.0
#: A park attempt is given at least this long (s).
MIN_PARK_WAIT_S = 0.1
#: What engine start-up shows on its progress bar.
START_STAGES = ("loading model and compiling", "taking over the scheduler")


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
    )
    if config.tp_size > jax.device_count():  # upstream would fail in its scheduler and SIGQUIT the process
        raise ValueError(f"tp_size={config.tp_size} needs that many devices; this process has {jax.device_count()}")
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
            max_total_tokens=config.max_total_tokens or config.context_length * config.max_running_requests,
        )
    elif config.max_total_tokens is not None:
        kwargs["max_total_tokens"] = config.max_total_tokens
    kwargs.update(config.engine_kwargs)
    if config.quantization_config_path is not None:
        kwargs["quantization_config_path"] = config.quantization_config_path
    # The scheduler runs in this process (its model runner is what a swap writes), and the
    # event loop in its own daemon thread, so any thread may submit work.
    kwargs["enable_single_process"] = True
    kwargs["enable_engine_loop_run_forever_daemon"] = True
    return kwargs


#: What a call waiting on the engine gets when the engine is shut down under it.
SHUT_DOWN_WHILE_WAITING = "the engine was shut down while this call waited for it"


class EngineHandle:
    """An in-process Engine plus what is needed to drive it from any thread, quiesce it
    for a weight swap, and stop it."""

    def __init__(self, config: SamplerConfig):
        from sgl_jax.srt.entrypoints.engine import Engine

        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "sglang-jax installs signal handlers while it starts, so an Engine can only be built on the main thread"
            )
        compat.warn_if_untested_version()
        kwargs = engine_kwargs(config)
        self.hf_config = read_hf_config(config.model_path)
        compat.check_head_dim(
            head_dim_of(config_getter(self.hf_config)),
            backend=jax.default_backend(),
            attention_backend=kwargs.get("attention_backend", "fa"),
        )
        compat.check_quantized_engine((self.hf_config.get("architectures") or ["?"])[0], kwargs)
        kwargs = compat.prepare_engine((self.hf_config.get("architectures") or ["?"])[0], kwargs, self.hf_config)
        self.kwargs = kwargs
        saved = compat.save_signal_handlers()
        before = set(threading.enumerate())
        logger.info("starting the sglang-jax engine for %s (tp=%d)", config.model_path, config.tp_size)
        bar = progress(len(START_STAGES), "starting sglang-jax", config.progress, unit="stage")
        bar.set_postfix_str(START_STAGES[0])
        try:
            self.engine = self._start_engine(Engine, kwargs)
        finally:
            compat.restore_signal_handlers(saved)
        bar.update(1)
        bar.set_postfix_str(START_STAGES[1])
        self.threads = compat.started_threads(before)
        # Upstream registered Engine.shutdown at exit (it kills the host's child processes).
        atexit.unregister(self.engine.shutdown)
        atexit.register(self.shutdown)
        self._attach_scheduler()
        compat.watch_thread_faults(self.threads, self._on_fault)
        self.loop: asyncio.AbstractEventLoop = self.engine.loop
        self.closed = False
        #: Calls waiting in ``run`` (ended at once by ``shutdown``).
        self._waiting: set[concurrent.futures.Future] = set()
        self._attach_validator(config)
        bar.update(1)
        bar.close()
        logger.info("engine ready: %d threads, mesh %s", len(self.threads), dict(self.mesh.shape))

    def _start_engine(self, engine_class: type, kwargs: dict[str, Any]) -> Any:
        return engine_class(**kwargs)

    def _attach_scheduler(self) -> None:
        """Reach the scheduler and model runner; keep the idle scheduler quiet; set up parking."""
        self.scheduler = compat.scheduler_of(self.engine)
        self.model_runner = compat.model_runner_of(self.engine)
        self._scheduler_stop = compat.quiet_idle_scheduler(self.scheduler)
        self._park = compat.SchedulerPark(self.scheduler, self._scheduler_stop.wake)

    def _attach_validator(self, config: SamplerConfig) -> None:
        """Every request to this engine, from any caller, is checked before it is sent."""
        self.limits = RequestLimits.of(self.engine, config.max_batch_size)
        self.validator = RequestValidator(self.limits, compat.tokenize_texts(self.tokenizer_manager))
        compat.check_requests_with(self.tokenizer_manager, self.validator.check)

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.model_runner.mesh

    @property
    def tokenizer_manager(self) -> Any:
        return self.engine.tokenizer_manager

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run an engine coroutine on the engine's event loop and wait for its result."""
        if self.closed:
            coro.close()
            raise RuntimeError("the engine has been shut down")
        self.raise_if_faulted()
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        self._waiting.add(future)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                wait = FAULT_POLL_S if deadline is None else min(FAULT_POLL_S, max(0.0, deadline - time.monotonic()))
                try:
                    return future.result(wait)
                except TimeoutError:
                    if self.fault() is not None:
                        future.cancel()
                        self.raise_if_faulted()
                    if self.closed:
                        future.cancel()
                        raise RuntimeError(SHUT_DOWN_WHILE_WAITING) from None
                    if deadline is not None and time.monotonic() >= deadline:
                        future.cancel()
                        raise
                except concurrent.futures.CancelledError:
                    if self.closed:  # shutdown() ended the call
                        raise RuntimeError(SHUT_DOWN_WHILE_WAITING) from None
                    raise
        finally:
            self._waiting.discard(future)

    def fault(self) -> compat.EngineFault | None:
        """What ended one of this engine's threads, if anything did."""
        return getattr(self.scheduler, "_contained_fault", None) or compat.thread_fault(self.threads)

    def fault_message(self) -> str | None:
        fault = self.fault()
        return None if fault is None else f"the engine's {fault.thread} thread failed ({fault.error})"

    def _on_fault(self, fault: compat.EngineFault) -> None:
        """From the failing thread: end every request still waiting on this engine."""
        message = f"the engine's {fault.thread} thread failed ({fault.error}); the request was aborted"
        try:
            self.loop.call_soon_threadsafe(compat.abort_pending, self.tokenizer_manager, message)
        except RuntimeError:  # the loop is closed: nobody is waiting
            pass

    def raise_if_faulted(self) -> None:
        fault = self.fault()
        if fault is not None:
            raise EngineFaultError(
                f"the sglang-jax engine's {fault.thread} thread failed ({fault.error}); this engine cannot "
                "serve any more. Call sampler.restart() for a new engine serving the same weights (or "
                "SamplerConfig(auto_restart=N)); the process and the trainer's state are unaffected."
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
        tm = self.tokenizer_manager
        deadline = time.monotonic() + timeout
        self.run(compat.set_paused(tm, True), timeout=PAUSE_TIMEOUT_S)
        fresh = False  # after a failed look: park at a later iteration boundary
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not self.run(compat.wait_no_requests(tm, left), timeout=left + PAUSE_TIMEOUT_S):
                    raise UpdateTimeoutError(
                        f"{compat.requests_in_flight(tm)} requests were still running after {timeout:.0f} s; "
                        "the weights were not changed"
                    )
                if not self._park.park(max(deadline - time.monotonic(), MIN_PARK_WAIT_S), fresh=fresh):
                    continue
                # Parked: a request sent between the check and the park is still in the
                # request table (the tokenizer records it as it sends it).
                if not compat.requests_in_flight(tm) and compat.scheduler_idle(self.scheduler):
                    break
                self._park.release()
                fresh = True
            try:
                yield
            finally:
                self._park.release()
        finally:
            self.run(compat.set_paused(tm, False), timeout=PAUSE_TIMEOUT_S)

    @contextlib.contextmanager
    def parked(self, timeout: float, ready: Callable[[], bool] | None = None):
        """Run the body with the scheduler thread held between two iterations, requests in
        flight left where they are (new ones queue up in front of it): no forward pass runs
        meanwhile. ``ready()``, if given, is checked while parked; when false the scheduler
        runs one more iteration and is looked at again. UpdateTimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        fresh = False
        while True:
            self.raise_if_faulted()
            left = deadline - time.monotonic()
            if left <= 0 or not self._park.park(max(left, MIN_PARK_WAIT_S), fresh=fresh):
                raise UpdateTimeoutError(
                    f"the scheduler did not reach a point where the weights can change within {timeout:.0f} s; "
                    "the weights were not changed"
                )
            if ready is None or ready():
                break
            self._park.release()
            fresh = True
        try:
            yield
        finally:
            self._park.release()

    @property
    def park(self) -> compat.SchedulerPark:
        """The scheduler's park (tests and benchmarks hold requests in flight with it)."""
        return self._park

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.shutdown)
        for future in list(self._waiting):  # callers waiting in run() get their answer now
            future.cancel()
        if self._park is not None:  # a parked scheduler could not see its stop
            self._park.release_all()
        alive = compat.stop_engine_threads(self.engine, self.threads, self._scheduler_stop)
        compat.unwatch_thread_faults(self.threads)
        if alive:
            logger.warning("engine threads still running after shutdown: %s", alive)
        if not any("scheduler" in name for name in alive):
            self._scheduler_stop.close()
