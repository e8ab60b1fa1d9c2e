"""Every workaround for upstream behaviour (sglang-jax 0.1.0rc0, google-tunix 0.1.7), and
every touch of an upstream private, in one package. Nothing outside it patches upstream.

- ``patches``: changes to upstream sglang-jax behaviour (idempotent monkeypatches);
- ``lifecycle``: the engine's threads: quiet idle scheduler, parking, fault containment,
  shutdown, signal handlers;
- ``internals``: accessors of upstream internals that are not patches (model runner,
  tokenizer-manager pause flag and request table, HTTP server global state, flax slots);
- ``inflight``: the scheduler's queues, retract, prefix cache and hooks around a weight swap
  with requests in flight;
- ``tunix``: Tunix workarounds and every touch of a Tunix private.

Each workaround has a test in ``tests/test_compat.py`` that runs unpatched upstream and
fails once it is no longer needed, and a test that it works.

| workaround                      | upstream behaviour                                                          |
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
| ``warn_tunix_rope_theta``       | Tunix 0.1.7's Qwen3 and Llama3 ignore ``config.rope_theta`` (always 1e6)   |
| ``retract_last_prefill_batch``  | retract right after a prefill loses the request (it sat in ``last_batch``, |
|                                 | which retract drops): it never finishes, its KV leaks                      |
| ``flush_prefix_cache_ignoring_  | ``flush_cache`` refuses while retracted requests (no KV held) are queued   |
| queues``                        |                                                                             |
| ``take_queued`` +               | aborting a queued request answers it but leaves it in the tokenizer        |
| ``answer_aborted``              | manager's table for ever (it counts as in flight)                          |
| ``sort_free_sampling``          | seeded sampling through the sort top-k/top-p path (Tunix's default) fails  |
|                                 | for a batch of one request (ShardingTypeError in the scheduler thread)     |
| ``enable_in_flight_sync``       | Tunix 0.1.7's agentic ``RolloutSyncLock`` drains every episode at a sync   |
| (``NonDrainingSyncLock``)       | and blocks the learner's event loop while a sync waits: a deadlock when    |
|                                 | ``max_concurrency`` < episodes queued                                       |
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from sampler.compat.internals import (
    abort_pending,
    fast_value_setter,
    flush_prefix_cache,
    model_runner_of,
    requests_in_flight,
    scheduler_idle,
    scheduler_of,
    set_paused,
    upstream_http_app,
    wait_no_requests,
)
from sampler.compat.lifecycle import (
    ConditionalPark,
    EngineFault,
    SchedulerPark,
    patch_contain_engine_faults,
    quiet_idle_scheduler,
    restore_signal_handlers,
    save_signal_handlers,
    started_threads,
    stop_engine_threads,
    thread_fault,
    watch_thread_faults,
)
from sampler.compat.patches import (
    SGLANG_JAX_VERSION,
    UnsupportedModelError,
    check_head_dim,
    patch_merge_kv_sharding,
    patch_mixed_logprob_batches,
    patch_non_stream_chunks,
    patch_zmq_linger,
    upstream_version,
    warn_if_untested_version,
)
from sampler.compat.tunix import (
    TUNIX_FIXED_ROPE_THETA,
    TUNIX_VERSION,
    NonDrainingSyncLock,
    enable_in_flight_sync,
    record_sync_waits,
    sort_free_sampling,
    warn_tunix_rope_theta,
)


def _native_attention(kwargs: Mapping[str, Any]) -> bool:
    return kwargs.get("attention_backend") == "native"


#: Workarounds an architecture module may name in ``Architecture.quirks``:
#: name -> (when it applies, given the engine kwargs; what to call before the engine starts).
ENGINE_QUIRKS: dict[str, tuple[Callable[[Mapping[str, Any]], bool], Callable[[], Any]]] = {
    "merge_kv_sharding": (_native_attention, patch_merge_kv_sharding),
}
#: Trainer-side quirks: name -> called with the HF config dict when a Tunix model is built.
TUNIX_QUIRKS: dict[str, Callable[[dict], Any]] = {
    "tunix_fixed_rope_theta": lambda hf: warn_tunix_rope_theta(hf["architectures"][0], hf.get("rope_theta", 10000)),
}


def _quirks(architecture: str) -> tuple[str, ...]:
    from converters import get_architecture

    quirks = get_architecture(architecture).quirks
    unknown = [q for q in quirks if q not in ENGINE_QUIRKS and q not in TUNIX_QUIRKS]
    if unknown:
        raise ValueError(
            f"{architecture} names unknown quirks {unknown}; known: {sorted({**ENGINE_QUIRKS, **TUNIX_QUIRKS})}"
        )
    return quirks


def prepare_engine(architecture: str, kwargs: Mapping[str, Any]) -> None:
    """Apply, before an Engine starts, every patch it needs: the generic ones and the
    architecture's own quirks."""
    for name in _quirks(architecture):
        if name in ENGINE_QUIRKS:
            applies, patch = ENGINE_QUIRKS[name]
            if applies(kwargs):
                patch()
    patch_zmq_linger()
    patch_non_stream_chunks()
    patch_contain_engine_faults()
    patch_mixed_logprob_batches()


def warn_tunix_quirks(hf_config: dict) -> None:
    """Warn about Tunix behaviour that makes a trainer of this model differ from the engine."""
    for name in _quirks(hf_config["architectures"][0]):
        if name in TUNIX_QUIRKS:
            TUNIX_QUIRKS[name](hf_config)


__all__ = [
    "ENGINE_QUIRKS",
    "ConditionalPark",
    "EngineFault",
    "SGLANG_JAX_VERSION",
    "NonDrainingSyncLock",
    "SchedulerPark",
    "TUNIX_FIXED_ROPE_THETA",
    "TUNIX_QUIRKS",
    "TUNIX_VERSION",
    "UnsupportedModelError",
    "abort_pending",
    "check_head_dim",
    "enable_in_flight_sync",
    "fast_value_setter",
    "flush_prefix_cache",
    "model_runner_of",
    "patch_contain_engine_faults",
    "patch_merge_kv_sharding",
    "patch_mixed_logprob_batches",
    "patch_non_stream_chunks",
    "patch_zmq_linger",
    "prepare_engine",
    "quiet_idle_scheduler",
    "record_sync_waits",
    "requests_in_flight",
    "restore_signal_handlers",
    "save_signal_handlers",
    "scheduler_idle",
    "scheduler_of",
    "set_paused",
    "sort_free_sampling",
    "started_threads",
    "stop_engine_threads",
    "thread_fault",
    "upstream_http_app",
    "upstream_version",
    "wait_no_requests",
    "warn_if_untested_version",
    "warn_tunix_quirks",
    "watch_thread_faults",
]
