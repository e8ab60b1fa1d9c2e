"""Start, drive and stop one sglang-jax Engine inside this process."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Coroutine, TypeVar

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
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

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
