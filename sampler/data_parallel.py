"""Data-parallel rollout: several sglang-jax engines in one process, one per device group.

sglang-jax has no data parallelism of its own. ``DataParallelSampler`` starts
``data_parallel_size`` engines (each ``tp_size`` devices wide, on its own devices), splits
every batch across them, generates on all of them at once and returns results in input
order. ``update_params`` pushes the same weights to every engine under one gate, so no call
ever sees engines on different versions.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from converters import ModelSpec, Quantization
from sampler.config import SamplerConfig
from sampler.engine.validation import RequestLimits, per_prompt, prompt_ids, samples_per_prompt
from sampler.interface import RolloutEngine, as_tokenizer_adapter
from sampler.reports import SharingReport, UpdateReport
from sampler.restart import RestartReport
from sampler.sampler import SglangJaxSampler
from sampler.sync.gate import UpdateGate
from sampler.sync.inflight import check_in_flight
from sampler.sync.weight_sync import Push, is_path
from sampler.tunix.config import as_sampler_config

#: The warm-up request that compiles an engine's forward passes before the next one starts.
WARMUP_PROMPT = [1, 2, 3]
WARMUP_PARAMS = {"max_new_tokens": 2, "temperature": 0.0}


def device_groups(config: SamplerConfig) -> list[list[int]]:
    """The device indexes of each engine: consecutive runs of ``tp_size`` devices."""
    dp, tp = config.data_parallel_size, config.tp_size
    if dp < 1 or tp < 1:
        raise ValueError(f"data_parallel_size={dp} and tp_size={tp} must be >= 1")
    devices = list(config.device_indexes) if config.device_indexes is not None else list(range(dp * tp))
    if len(devices) != dp * tp or len(set(devices)) != len(devices):
        raise ValueError(
            f"data_parallel_size={dp} x tp_size={tp} needs {dp * tp} distinct devices, got device_indexes={devices}"
        )
    if max(devices) >= jax.device_count():
        raise ValueError(f"device_indexes={devices} name devices this process does not have ({jax.device_count()})")
    return [devices[i * tp : (i + 1) * tp] for i in range(dp)]


def split_balanced(costs: Sequence[int], parts: int) -> list[list[int]]:
    """Split item indexes into ``parts`` groups with counts differing by at most one and
    the total cost of each group as even as greedy longest-first placement makes it."""
    capacity = -(-len(costs) // parts) if costs else 0
    groups: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        open_groups = [g for g in range(parts) if len(groups[g]) < capacity]
        g = min(open_groups, key=lambda g: (load[g], len(groups[g]), g))
        groups[g].append(i)
        load[g] += costs[i]
    return [sorted(g) for g in groups]


class DataParallelSampler(RolloutEngine):
    """N ``SglangJaxSampler`` engines behind the ``SglangJaxSampler`` interface.

    Engines are built on the main thread one after another (each warms up before the next
    starts), then serve concurrently: a call's prompts are split across the engines
    (balanced by count and token length) and run at the same time from a small thread
    pool; outputs come back in input order. Engine ``i`` gets ``random_seed + i`` so
    sampled completions of duplicated prompts differ across engines.
    """

    def __init__(self, tokenizer: Any = None, config: Any = None, **engine_kwargs: Any):
        config = as_sampler_config(config, **engine_kwargs)
        self.config = config
        groups = device_groups(config)
        self.tokenizer = as_tokenizer_adapter(tokenizer, config.model_path)
        self.samplers: list[SglangJaxSampler] = []
        try:
            for i, group in enumerate(groups):
                engine_config = dataclasses.replace(
                    config, data_parallel_size=1, device_indexes=group, random_seed=config.random_seed + i
                )
                sampler = SglangJaxSampler(tokenizer=self.tokenizer, config=engine_config)
                self.samplers.append(sampler)
                # Compile this engine's forward passes before the next one starts.
                sampler.generate_ids([WARMUP_PROMPT], WARMUP_PARAMS, return_logprob=False)
        except BaseException:
            for s in self.samplers:
                s.shutdown()
            raise
        self._pool = concurrent.futures.ThreadPoolExecutor(len(self.samplers), thread_name_prefix="dp-sampler")
        # weight writes get threads of their own: with in_flight="continue"/"recompute" the
        # generation threads above stay busy with requests in flight during a push
        self._write_pool = concurrent.futures.ThreadPoolExecutor(len(self.samplers), thread_name_prefix="dp-writer")
        self._gate = UpdateGate()
        #: True from the first engine write of an update until the last; stays True when an
        #: update failed midway, until a complete push (then engines may hold different versions).
        self._mixed = False
        #: True while an update writes the engines (their schedulers are parked then).
        self._writing = False
        self._closed = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ properties
    @property
    def data_parallel_size(self) -> int:
        return len(self.samplers)

    @property
    def spec(self) -> ModelSpec:
        return self.samplers[0].spec

    @property
    def quantization(self) -> Quantization | None:
        return self.samplers[0].quantization

    @property
    def mesh(self) -> jax.sharding.Mesh:
        """Engine 0's mesh (``meshes`` has all of them)."""
        return self.samplers[0].mesh

    @property
    def meshes(self) -> list[jax.sharding.Mesh]:
        return [s.mesh for s in self.samplers]

    @property
    def healthy(self) -> bool:
        return all(s.healthy for s in self.samplers)

    @property
    def version(self) -> int:
        return min(s.version for s in self.samplers)

    @property
    def request_limits(self) -> RequestLimits:
        return self.samplers[0].request_limits

    @property
    def transformer(self):
        return self.samplers[0].transformer

    @property
    def transformer_state(self):
        return self.samplers[0].transformer_state

    def engine_params(self) -> dict[str, jax.Array]:
        """Engine 0's served arrays (``[s.engine_params() for s in samplers]`` for all)."""
        return self.samplers[0].engine_params()

    def engine_shardings(self) -> dict[str, jax.sharding.Sharding]:
        """Engine 0's shardings: trainer params placed like this are aliased by engine 0."""
        return self.samplers[0].engine_shardings()

    def fingerprints(self) -> list[str]:
        return [s.fingerprint() for s in self.samplers]

    def fingerprint(self) -> str:
        """The served weights' fingerprint; raises if the engines disagree."""
        prints = self.fingerprints()
        if len(set(prints)) != 1:
            raise RuntimeError(f"the data-parallel engines serve different weights: {prints}")
        return prints[0]

    def weight_paths(self) -> list[str]:
        return self.samplers[0].weight_paths()

    # ------------------------------------------------------------------ weights
    def update_params(
        self,
        updated_weights: Any,
        filter_types: Sequence[type] | type | None = None,
        *,
        source_format: str | None = None,
        strict: bool = True,
        track_peak_memory: bool = False,
        alias: bool = True,
        check_finite: bool = False,
        in_flight: str = "drain",
        max_staleness: int | None = None,
    ) -> UpdateReport:
        """Push the weights to every engine or to none: aliased where an engine's devices and
        sharding already hold them, copied to the others.

        The tree is validated against every engine, then every engine is held where its
        weights may change (``in_flight="drain"``: no request runs on any of them; otherwise
        each scheduler is parked between two iterations with its requests in flight, and all
        switch at their next iteration), and only then are the weights written. If an engine
        cannot be held in time, ``UpdateTimeoutError`` and no engine changed. If a write fails
        midway, generation is refused until a complete push (no call sees mixed versions).
        """
        check_in_flight(in_flight, max_staleness)
        pushes = [
            s.sync.prepare(
                updated_weights, filter_types, source_format=source_format, strict=strict,
                track_peak_memory=track_peak_memory, alias=alias, check_finite=check_finite and i == 0,
            )
            for i, s in enumerate(self.samplers)
        ]  # fmt: skip
        return self._apply_all(pushes, in_flight=in_flight, max_staleness=max_staleness)

    def load_checkpoint(
        self,
        path_or_weights: Any,
        *,
        strict: bool = True,
        track_peak_memory: bool = False,
        in_flight: str = "drain",
        max_staleness: int | None = None,
    ) -> UpdateReport:
        """``SglangJaxSampler.load_checkpoint`` on every engine or on none (as ``update_params``)."""
        options: dict[str, Any] = dict(strict=strict, track_peak_memory=track_peak_memory)
        if not is_path(path_or_weights):
            return self.update_params(path_or_weights, in_flight=in_flight, max_staleness=max_staleness, **options)
        check_in_flight(in_flight, max_staleness)
        pushes = [s.sync.prepare_checkpoint(path_or_weights, **options) for s in self.samplers]
        return self._apply_all(pushes, in_flight=in_flight, max_staleness=max_staleness)

    def _apply_all(
        self, pushes: list[Push], *, in_flight: str = "drain", max_staleness: int | None = None
    ) -> UpdateReport:
        t0 = min(p.t0 for p in pushes)
        timeout = self.config.update_timeout_s
        drain = in_flight == "drain"
        with self._gate.one_update(timeout), contextlib.ExitStack() as held:
            if drain:
                held.enter_context(self._gate.holding_new_calls(timeout))
            # every engine held (idle, or parked between iterations) before any engine changes
            windows = [
                held.enter_context(s.sync.exclusive(timeout, in_flight=in_flight, max_staleness=max_staleness))
                for s in self.samplers
            ]
            if not drain:
                held.enter_context(self._gate.holding_new_calls())
            was_mixed, self._mixed = self._mixed, True  # until every engine holds the new version
            self._writing = True
            try:
                # the engines' writes overlap: each engine has its own devices and buffers
                futures = [
                    self._write_pool.submit(s.sync.apply, push, window)
                    for s, push, window in zip(self.samplers, pushes, windows)
                ]
                concurrent.futures.wait(futures)  # every write has ended before the engines resume
                reports = [f.result() for f in futures]
            finally:
                self._writing = False
            self._mixed = was_mixed and not all(p.plan.complete for p in pushes)
        return UpdateReport.combine(reports, time.perf_counter() - t0)

    def check_checkpoint(self, path: Any, *, strict: bool = True) -> None:
        for s in self.samplers:
            s.check_checkpoint(path, strict=strict)

    def verify_sharing(
        self, updated_weights: Any, filter_types: Any = None, *, source_format: str | None = None
    ) -> list[SharingReport]:
        """One SharingReport per engine."""
        return [s.verify_sharing(updated_weights, filter_types, source_format=source_format) for s in self.samplers]

    def check_servable(self) -> None:
        if self._closed:
            raise RuntimeError("this sampler has been shut down")
        if self._writing:  # only callers outside the gate see this; see WeightSync.check_servable
            for s in self.samplers:
                s.sync.handle.raise_if_faulted()
            return
        if self._mixed:
            versions = [s.version for s in self.samplers]
            raise RuntimeError(
                f"a weight update failed midway across the data-parallel engines (versions {versions}); "
                "push a complete set with update_params before generating"
            )
        for s in self.samplers:
            s.check_servable()

    # ------------------------------------------------------------------ generation
    def _scatter(
        self, costs: Sequence[int], call: Callable[[SglangJaxSampler, list[int]], Any]
    ) -> list[tuple[list[int], Any]]:
        """Run ``call(engine, indexes)`` on every engine with a non-empty share, concurrently."""
        groups = split_balanced(costs, len(self.samplers))
        with self._gate.generating(check=self.check_servable):
            futures = [
                (idx, self._pool.submit(call, sampler, idx)) for sampler, idx in zip(self.samplers, groups) if idx
            ]
            return [(idx, f.result()) for idx, f in futures]

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        sampling_params: Sequence[dict] | dict,
        *,
        return_logprob: bool = True,
        logprob_start_len: int | list[int] | None = None,
        timeout: float | None = None,
    ) -> list[dict]:
        """``SglangJaxSampler.generate_ids`` over all engines; results in input order (with
        ``n`` > 1: the ``n`` answers of each prompt together, as one engine returns them).

        The whole call is validated before any engine gets a prompt."""
        prompts = prompt_ids(prompts)
        per = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, Mapping)
            else per_prompt(sampling_params, len(prompts), "sampling_params")
        )
        self.samplers[0].check_request(prompts, per, return_logprob=return_logprob, logprob_start_len=logprob_start_len)
        starts = logprob_start_len if isinstance(logprob_start_len, list) else [logprob_start_len] * len(prompts)
        budget = [len(p) + int(sp.get("max_new_tokens", 0) or 0) for p, sp in zip(prompts, per)]

        def call(sampler, idx):
            start = [starts[i] for i in idx] if isinstance(logprob_start_len, list) else logprob_start_len
            return sampler.generate_ids(
                [prompts[i] for i in idx],
                [per[i] for i in idx],
                return_logprob=return_logprob,
                logprob_start_len=start,
                timeout=timeout,
            )

        n = samples_per_prompt(per)  # each engine answers its prompts prompt-major, n answers each
        out: list[dict | None] = [None] * (len(prompts) * n)
        for idx, results in self._scatter(budget, call):
            for j, i in enumerate(idx):
                out[i * n : (i + 1) * n] = results[j * n : (j + 1) * n]
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ lifecycle
    def restart(self) -> list[RestartReport]:
        """Restart every engine whose thread failed (``SglangJaxSampler.restart``), under the
        update gate (no call sees an engine mid-restart); main thread only."""
        with self._gate.updating(self.config.update_timeout_s):
            return [s.restart() for s in self.samplers if s.fault is not None]

    def shutdown(self) -> None:
        """Stop every engine and the thread pool (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True)
        self._write_pool.shutdown(wait=True)
        for s in self.samplers:
            s.shutdown()
