"""Every workaround for upstream behaviour (sglang-jax 0.1.0rc0, google-tunix 0.1.7), and every
touch of an upstream private, in one package; nothing outside it patches upstream. This module
only re-exports. The table of workarounds, with the upstream behaviour each answers, is the
docs' "Upstream workarounds" page.

- ``patches``: changes to upstream sglang-jax behaviour (idempotent monkeypatches);
- ``lifecycle``: the engine's threads: quiet idle scheduler, parking, fault containment,
  shutdown, signal handlers;
- ``internals``: accessors of upstream internals that are not patches (model runner,
  tokenizer-manager pause flag and request table, HTTP server global state, flax slots);
- ``scheduler``: the scheduler's queues, retract, prefix cache and hooks around a weight swap
  with requests in flight;
- ``models``: model-family limits and engine arguments; ``crashes``: requests that crash an
  engine thread upstream (``sampler.engine.validation`` refuses them);
- ``multinode``: one engine over several JAX processes; ``tunix``: Tunix workarounds and
  every touch of a Tunix private;
- ``quirks``: the registry of what each architecture needs, and ``prepare_engine`` /
  ``prepare_tunix_trainer`` that apply it.

Each workaround has a test in ``tests/test_compat.py`` (or the test module its docstring
names) that runs unpatched upstream and fails once it is no longer needed, and a test that
it works.
"""

from __future__ import annotations

from sampler.compat.crashes import UPSTREAM_CRASHES, UpstreamCrash
from sampler.compat.internals import (
    abort_pending,
    check_requests_with,
    engine_limits,
    engine_scope,
    enter_upstream_app,
    fast_value_setter,
    flush_prefix_cache,
    is_paused,
    model_runner_of,
    requests_in_flight,
    scheduler_idle,
    scheduler_of,
    set_paused,
    tokenize_texts,
    unchecked_generate_request,
    upstream_http_app,
    wait_no_requests,
)
from sampler.compat.lifecycle import (
    ConditionalPark,
    EngineFault,
    SchedulerPark,
    patch_contain_engine_faults,
    patch_contain_tokenizer_loop_faults,
    quiet_idle_scheduler,
    restore_signal_handlers,
    save_signal_handlers,
    started_threads,
    stop_engine_threads,
    thread_fault,
    unwatch_thread_faults,
    watch_thread_faults,
)
from sampler.compat.models import (
    HYBRID_SWA_OFF,
    check_expert_parallel,
    check_gemma4,
    check_moe_sparse_layers,
    check_quantized_engine,
    gemma4_engine_dtype,
)
from sampler.compat.outputs import (
    patch_detokenizer_output,
    patch_filtered_logprob_lists,
    patch_logprob_token_decoding,
    patch_mixed_logprob_batches,
    patch_non_stream_chunks,
    patch_output_logprob_rows,
)
from sampler.compat.patches import (
    SGLANG_JAX_VERSION,
    check_head_dim,
    patch_greedy_rows_in_mixed_batches,
    patch_invalid_grammar_copy,
    patch_merge_kv_sharding,
    patch_zmq_linger,
    upstream_version,
    warn_if_untested_version,
)
from sampler.compat.quirks import (
    ENGINE_PATCHES,
    ENGINE_QUIRKS,
    TUNIX_QUIRKS,
    EngineQuirk,
    TunixQuirk,
    prepare_engine,
    prepare_tunix_trainer,
)
from sampler.compat.tunix import (
    HF_DEFAULT_ROPE_THETA,
    TUNIX_FIXED_ROPE_THETA,
    TUNIX_VERSION,
    NonDrainingSyncLock,
    check_trainer_config,
    enable_in_flight_sync,
    patch_rollout_start_off_loop,
    patch_tunix_rope_theta,
    prompt_text,
    prompt_text_agent,
    record_sync_waits,
    sort_free_sampling,
    tunix_gemma_rope_theta,
    tunix_moe_routing,
    tunix_query_scale,
    tunix_rope_scaling,
)
from sampler.errors import TrainerMismatchError, UnsupportedModelError

__all__ = [
    "ENGINE_PATCHES",
    "ENGINE_QUIRKS",
    "ConditionalPark",
    "EngineQuirk",
    "HF_DEFAULT_ROPE_THETA",
    "HYBRID_SWA_OFF",
    "check_expert_parallel",
    "check_gemma4",
    "check_moe_sparse_layers",
    "check_quantized_engine",
    "gemma4_engine_dtype",
    "EngineFault",
    "SGLANG_JAX_VERSION",
    "NonDrainingSyncLock",
    "SchedulerPark",
    "TUNIX_FIXED_ROPE_THETA",
    "TUNIX_QUIRKS",
    "TUNIX_VERSION",
    "TrainerMismatchError",
    "TunixQuirk",
    "check_trainer_config",
    "patch_tunix_rope_theta",
    "prepare_tunix_trainer",
    "tunix_gemma_rope_theta",
    "tunix_moe_routing",
    "tunix_query_scale",
    "tunix_rope_scaling",
    "UPSTREAM_CRASHES",
    "UnsupportedModelError",
    "UpstreamCrash",
    "abort_pending",
    "check_head_dim",
    "check_requests_with",
    "engine_limits",
    "engine_scope",
    "enter_upstream_app",
    "enable_in_flight_sync",
    "fast_value_setter",
    "flush_prefix_cache",
    "is_paused",
    "model_runner_of",
    "patch_contain_engine_faults",
    "patch_contain_tokenizer_loop_faults",
    "patch_detokenizer_output",
    "patch_filtered_logprob_lists",
    "patch_greedy_rows_in_mixed_batches",
    "patch_invalid_grammar_copy",
    "patch_logprob_token_decoding",
    "patch_merge_kv_sharding",
    "patch_mixed_logprob_batches",
    "patch_non_stream_chunks",
    "patch_output_logprob_rows",
    "patch_zmq_linger",
    "prepare_engine",
    "quiet_idle_scheduler",
    "patch_rollout_start_off_loop",
    "prompt_text",
    "prompt_text_agent",
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
    "tokenize_texts",
    "unchecked_generate_request",
    "unwatch_thread_faults",
    "upstream_http_app",
    "upstream_version",
    "wait_no_requests",
    "warn_if_untested_version",
    "watch_thread_faults",
]
