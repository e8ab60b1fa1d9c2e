"""Every workaround for upstream behaviour (sglang-jax 0.1.0rc0, google-tunix 0.1.7), and
every touch of an upstream private, in one package. Nothing outside it patches upstream.

- ``patches``: changes to upstream sglang-jax behaviour (idempotent monkeypatches);
- ``lifecycle``: the engine's threads: quiet idle scheduler, parking, fault containment,
  shutdown, signal handlers;
- ``internals``: accessors of upstream internals that are not patches (model runner,
  tokenizer-manager pause flag and request table, HTTP server global state, flax slots);
- ``inflight``: the scheduler's queues, retract, prefix cache and hooks around a weight swap
  with requests in flight;
- ``tunix``: Tunix workarounds and every touch of a Tunix private;
- ``crashes``: requests that crash an engine thread upstream (``sampler.validation`` refuses them).

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
| ``patch_output_logprob_rows``   | a batch mixing output-only logprob requests with input/top-logprob ones    |
|                                 | shifts the output logprobs of every later request by one; streamed output- |
|                                 | only logprobs repeat every earlier record in each chunk                    |
| ``patch_filtered_logprob_lists``| a running batch keeps its input/top-logprob lists after the last request    |
|                                 | that wanted them finished; the next requests merged in are not added to    |
|                                 | them -> IndexError in ``filter_batch`` -> the scheduler thread dies        |
| ``patch_contain_engine_faults`` | any exception in the scheduler/detokenizer thread SIGQUITs the process;    |
|                                 | contained: recorded, callers get ``EngineFaultError``, the process lives   |
| ``patch_contain_tokenizer_loop_ | any exception in the tokenizer manager's output loop (``handle_loop``)     |
| faults``                        | SIGKILLs the process (``kill_process_tree``); contained the same way       |
| ``patch_invalid_grammar_copy``  | an invalid regex / JSON schema / EBNF / structural tag crashes the         |
|                                 | scheduler thread (``INVALID_GRAMMAR_OBJ.copy()`` raises NotImplementedError)|
|                                 | -> SIGQUIT; patched: the request gets "Invalid grammar request" (400)      |
| ``patch_logprob_token_decoding``| a negative id among the logprob token ids (``token_ids_logprob``, input     |
|                                 | logprobs from 0) raises OverflowError in the tokenizer manager's loop ->   |
|                                 | the process is killed; patched: such ids decode to ``None`` text; logprob  |
|                                 | values are numpy floats: every streamed ``/generate`` with logprobs is a   |
|                                 | 500 (orjson cannot serialise them); patched: Python floats                 |
| ``patch_detokenizer_output``    | the detokenizer drops special ids and the stop token from ``output_ids``    |
|                                 | and repeats ids in streams: ids no longer line up with their logprobs;      |
|                                 | a batch's text is decoded under its first request's skip_special_tokens;   |
|                                 | a stream chunk ending inside a character sends "\ufffd" for good            |
| ``patch_greedy_rows_in_mixed_ | a greedy request batched with a sampled one is sampled among the tokens    |
| batches``                       | tied with its top logit: its tokens depend on what other clients send     |
| ``crashes.UPSTREAM_CRASHES``    | requests with out-of-range ids, int32 overflows, wrong types or logprob    |
| (``sampler.validation``)        | options crash the scheduler/detokenizer thread; refused before they are    |
|                                 | sent, naming the field                                                     |
| ``engine_scope``                | the HTTP routes and their lifespan read one module-global ``_GlobalState``  |
| (``upstream_http_app``)         | (``http_server.py:99``): one engine per process; each engine's app gets     |
|                                 | copies of the route functions bound to its own state                        |
| ``patch_tunix_rope_theta``      | Tunix 0.1.7's Qwen3 (dense and MoE) and Llama3 ignore ``rope_theta``       |
|                                 | (always 1e6); patched: the config's value                                  |
| ``HYBRID_SWA_OFF``              | sliding-window models on CPU: the hybrid SWA KV pool lacks the method the   |
| (``hybrid_swa_memory_on_cpu``)  | native backend calls -> AttributeError -> SIGQUIT; engine arg turns it off  |
| ``gemma4_engine_dtype``         | Gemma 4: the engine dtype comes from text_config only (float32 without it) |
| ``check_gemma4``                | Gemma 4: tp > KV heads outside k_eq_v layers, mixed head dims / KV counts   |
|                                 | on CPU, per-layer embeddings: refused; ``ep_size`` is ignored: warned       |
| ``check_moe_sparse_layers``     | Qwen3-MoE: ``decoder_sparse_step`` > 1 ignored (every layer MoE): refused   |
| ``check_expert_parallel``       | ``ep_size`` not dividing tp or the experts, fused MoE on CPU: refused       |
| ``check_trainer_config``        | Tunix 0.1.7 cannot follow ``rope_scaling`` (any family), Gemma's            |
| (``TrainerMismatchError``)      | ``rope_theta`` / ``query_pre_attn_scalar``, Qwen3-MoE's ``norm_topk_prob`` / |
|                                 | ``mlp_only_layers``: refused, naming the field, unless allowed             |
| ``multinode`` (several JAX      | rank > 0 ``Engine()`` blocks in a health server, drops ``scheduler_info``,  |
| processes, one engine)          | crashes with the loop daemon; followers wait for process 0 forever and      |
|                                 | cannot be stopped or parked at one iteration (``LockstepPark``); see the    |
|                                 | module's own table. Still-needed tests: ``tests/test_multiprocess.py``      |
| ``retract_last_prefill_batch``  | retract right after a prefill loses the request (it sat in ``last_batch``, |
|                                 | which retract drops): it never finishes, its KV leaks                      |
| ``flush_prefix_cache_ignoring_  | ``flush_cache`` refuses while retracted requests (no KV held) are queued   |
| queues``                        |                                                                             |
| ``take_queued`` +               | aborting a queued request answers it but leaves it in the tokenizer        |
| ``answer_aborted``              | manager's table for ever (it counts as in flight)                          |
| ``sort_free_sampling``          | seeded sampling through the sort top-k/top-p path (Tunix's default) fails  |
|                                 | for a batch of one request (ShardingTypeError in the scheduler thread)     |
| ``patch_rollout_start_off_      | Tunix 0.1.7's orchestrator waits for a pending sync on its event loop      |
| loop`` (applied by              | thread (``acquire_rollout``): the episodes in flight the sync waits for    |
| ``SglangJaxRollout``)           | cannot run -> deadlock whenever an episode starts while a sync waits       |
| ``prompt_text_agent``           | Tunix 0.1.7's agentic learner hands each prompt to its agent as a one-     |
| (``prompt_text``)               | element array: the chat template renders ``"['text']"`` as the prompt      |
| ``enable_in_flight_sync``       | Tunix 0.1.7's agentic ``RolloutSyncLock`` drains every episode at a sync:  |
| (``NonDrainingSyncLock``)       | with in-flight swaps a sync need not wait for episodes                     |
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

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
    gemma4_engine_dtype,
    native_attention,
)
from sampler.compat.patches import (
    SGLANG_JAX_VERSION,
    UnsupportedModelError,
    check_head_dim,
    patch_detokenizer_output,
    patch_filtered_logprob_lists,
    patch_greedy_rows_in_mixed_batches,
    patch_invalid_grammar_copy,
    patch_logprob_token_decoding,
    patch_merge_kv_sharding,
    patch_mixed_logprob_batches,
    patch_non_stream_chunks,
    patch_output_logprob_rows,
    patch_zmq_linger,
    upstream_version,
    warn_if_untested_version,
)
from sampler.compat.tunix import (
    HF_DEFAULT_ROPE_THETA,
    TUNIX_FIXED_ROPE_THETA,
    TUNIX_VERSION,
    NonDrainingSyncLock,
    TrainerMismatchError,
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

HfConfig = Mapping[str, Any]


def _always(kwargs: Mapping[str, Any]) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class EngineQuirk:
    """What one architecture's engine needs before it starts, when ``applies(engine kwargs)``:
    a ``check`` that refuses (UnsupportedModelError) or warns, engine arguments to set (a
    mapping, or a function of the HF config and the kwargs), an idempotent upstream ``patch``."""

    applies: Callable[[Mapping[str, Any]], bool] = _always
    check: Callable[[HfConfig, Mapping[str, Any]], None] | None = None
    engine_kwargs: Mapping[str, Any] | Callable[[HfConfig, Mapping[str, Any]], Mapping[str, Any]] = dataclasses.field(
        default_factory=dict
    )
    patch: Callable[[], Any] | None = None

    def kwargs_for(self, hf_config: HfConfig, kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
        return self.engine_kwargs(hf_config, kwargs) if callable(self.engine_kwargs) else self.engine_kwargs


#: Workarounds and limits an architecture module may name in ``Architecture.quirks``.
ENGINE_QUIRKS: dict[str, EngineQuirk] = {
    "merge_kv_sharding": EngineQuirk(applies=native_attention, patch=patch_merge_kv_sharding),
    "hybrid_swa_memory_on_cpu": EngineQuirk(applies=native_attention, engine_kwargs=HYBRID_SWA_OFF),
    "gemma4_text_dtype": EngineQuirk(engine_kwargs=gemma4_engine_dtype),
    "gemma4_limits": EngineQuirk(check=check_gemma4),
    "moe_sparse_layers": EngineQuirk(check=check_moe_sparse_layers),
    "moe_expert_parallel": EngineQuirk(check=check_expert_parallel),
}


@dataclasses.dataclass(frozen=True)
class TunixQuirk:
    """What a Tunix trainer of one architecture needs to compute the engine's model: an
    idempotent ``patch`` of Tunix, and a ``check`` of the HF config returning what Tunix cannot
    follow (each problem naming its field)."""

    patch: Callable[[], Any] | None = None
    check: Callable[[HfConfig], list[str]] | None = None


#: Trainer-side quirks an architecture module may name in ``Architecture.quirks``.
TUNIX_QUIRKS: dict[str, TunixQuirk] = {
    "tunix_rope_theta_ignored": TunixQuirk(patch=patch_tunix_rope_theta),
    "tunix_no_rope_scaling": TunixQuirk(check=tunix_rope_scaling),
    "tunix_gemma_rope_theta": TunixQuirk(check=tunix_gemma_rope_theta),
    "tunix_query_pre_attn_scalar": TunixQuirk(check=tunix_query_scale),
    "tunix_moe_routing": TunixQuirk(check=tunix_moe_routing),
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


def prepare_engine(architecture: str, kwargs: Mapping[str, Any], hf_config: HfConfig | None = None) -> dict[str, Any]:
    """Before an Engine starts: refuse what upstream cannot serve (UnsupportedModelError),
    apply every patch it needs (the generic ones and the architecture's own quirks); returns
    the engine kwargs with the arguments the quirks set."""
    hf_config = hf_config or {}
    quirks = [ENGINE_QUIRKS[name] for name in _quirks(architecture) if name in ENGINE_QUIRKS]
    quirks = [q for q in quirks if q.applies(kwargs)]
    for quirk in quirks:
        if quirk.check is not None:
            quirk.check(hf_config, kwargs)
    out = dict(kwargs)
    for quirk in quirks:
        out.update(quirk.kwargs_for(hf_config, kwargs))
        if quirk.patch is not None:
            quirk.patch()
    patch_zmq_linger()
    patch_non_stream_chunks()
    patch_contain_engine_faults()
    patch_contain_tokenizer_loop_faults()
    patch_mixed_logprob_batches()
    patch_output_logprob_rows()
    patch_filtered_logprob_lists()
    patch_invalid_grammar_copy()
    patch_logprob_token_decoding()
    patch_greedy_rows_in_mixed_batches()
    patch_detokenizer_output()
    return out


def prepare_tunix_trainer(hf_config: HfConfig, *, allow_mismatch: bool = False) -> list[str]:
    """Before a Tunix model of this HF config trains against the engine: patch Tunix where it
    can follow the config, refuse (``TrainerMismatchError`` naming each field) where it cannot,
    unless ``allow_mismatch`` (then logged). Returns the problems allowed."""
    architecture = hf_config["architectures"][0]
    quirks = [TUNIX_QUIRKS[name] for name in _quirks(architecture) if name in TUNIX_QUIRKS]
    for quirk in quirks:
        if quirk.patch is not None:
            quirk.patch()
    checks = [quirk.check for quirk in quirks if quirk.check is not None]
    return check_trainer_config(architecture, hf_config, checks, allow_mismatch=allow_mismatch)


__all__ = [
    "ENGINE_QUIRKS",
    "ConditionalPark",
    "EngineQuirk",
    "HF_DEFAULT_ROPE_THETA",
    "HYBRID_SWA_OFF",
    "check_expert_parallel",
    "check_gemma4",
    "check_moe_sparse_layers",
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
