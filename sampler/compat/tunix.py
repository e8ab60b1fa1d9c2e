"""Workarounds for google-tunix behaviour, and every touch of a Tunix private, each with a
test in ``tests/test_compat.py`` that fails once it is no longer needed."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import functools
import importlib
import importlib.metadata
import logging
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from sampler.errors import TrainerMismatchError

logger = logging.getLogger(__name__)

TUNIX_VERSION = "0.1.7"
TUNIX_FIXED_ROPE_THETA = 1_000_000
#: Tunix's Gemma (1/2) attention calls ``apply_rope`` with its default max_wavelength.
TUNIX_GEMMA_ROPE_THETA = 10_000
#: HF's default rope_theta when a config.json names none (transformers' config classes).
HF_DEFAULT_ROPE_THETA = 10_000
#: Tunix model modules whose ``Attention.block`` calls ``apply_rope`` without the config's
#: rope_theta (so it takes the default 1e6): Qwen3 (dense and MoE) and Llama3.
TUNIX_ROPE_MODULES = ("tunix.models.qwen3.model", "tunix.models.llama3.model")


# --------------------------------------------------------------------------------------
# Tunix model configs the trainer cannot (or does not) follow
# --------------------------------------------------------------------------------------

#: The rope_theta of the attention being traced (``patch_tunix_rope_theta``).
_rope_theta: contextvars.ContextVar[float | None] = contextvars.ContextVar("tunix_rope_theta", default=None)


def patch_tunix_rope_theta() -> bool:
    """Make Tunix 0.1.7's Qwen3 (dense and MoE) and Llama3 attention rotate with their config's
    ``rope_theta`` (idempotent).

    Their ``Attention.block`` calls the module's ``apply_rope`` without it, so every model
    uses the default 1e6 (Qwen3's own value; Llama 3 uses 5e5, some Qwen3 releases 5e6):
    a trainer built for another value computes another model than the engine (measured on a
    tiny Qwen3 with rope_theta 1e4: 0.32 nats mean, 2.5 max off a float64 reference forward).
    Patched: ``block`` makes its config's value the one ``apply_rope`` uses while it runs
    (also inside ``nnx.remat``, which calls ``block`` through the class). Returns True when
    applied now."""
    applied = False
    for name in TUNIX_ROPE_MODULES:
        module = importlib.import_module(name)
        if getattr(module.apply_rope, "_theta_patched", False):
            continue
        apply_rope, block = module.apply_rope, module.Attention.block

        def patched_rope(inputs, positions, head_dim, rope_theta=None, _original=apply_rope):
            theta = rope_theta if rope_theta is not None else _rope_theta.get()
            return _original(inputs, positions, head_dim, TUNIX_FIXED_ROPE_THETA if theta is None else theta)

        def patched_block(self, *args, _original=block, **kwargs):
            token = _rope_theta.set(self.config.rope_theta)
            try:
                return _original(self, *args, **kwargs)
            finally:
                _rope_theta.reset(token)

        for fn, original in ((patched_rope, apply_rope), (patched_block, block)):
            fn.__wrapped__ = original  # type: ignore[attr-defined]
            fn._theta_patched = True  # type: ignore[attr-defined]
        module.apply_rope, module.Attention.block = patched_rope, patched_block
        applied = True
    return applied


def _rope_type(hf_config: Mapping[str, Any]) -> str | None:
    scaling = hf_config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, Mapping) else scaling
    return None if kind in (None, "default") else str(kind)


def tunix_rope_scaling(hf_config: Mapping[str, Any]) -> list[str]:
    """Tunix 0.1.7's Qwen2/2.5, Qwen3, Llama3 and Gemma implement plain RoPE only: a config
    with ``rope_scaling`` (Llama 3.1+'s "llama3", YaRN, linear, dynamic) is computed without it."""
    kind = _rope_type(hf_config)
    return (
        [f"rope_scaling={hf_config.get('rope_scaling')} (Tunix {TUNIX_VERSION} applies no {kind} scaling)"]
        if kind
        else []
    )


def tunix_gemma_rope_theta(hf_config: Mapping[str, Any]) -> list[str]:
    """Tunix 0.1.7's Gemma has no RoPE setting: it always uses 1e4."""
    theta = float(hf_config.get("rope_theta", TUNIX_GEMMA_ROPE_THETA))
    if theta != TUNIX_GEMMA_ROPE_THETA:
        return [f"rope_theta={theta:g} (Tunix {TUNIX_VERSION}'s Gemma always uses {TUNIX_GEMMA_ROPE_THETA:g})"]
    return []


def tunix_query_scale(hf_config: Mapping[str, Any]) -> list[str]:
    """Tunix 0.1.7's Gemma scales queries by ``head_dim**-0.5`` and has no
    ``query_pre_attn_scalar`` (tunix/models/gemma/model.py:420); the engine and HF use
    ``query_pre_attn_scalar**-0.5``. Equal for Gemma 2 2B/9B (256 = head_dim), not for 27B
    (144 vs 128)."""
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    scalar = hf_config.get("query_pre_attn_scalar", head_dim)
    if scalar != head_dim:
        return [f"query_pre_attn_scalar={scalar} (Tunix {TUNIX_VERSION}'s Gemma scales queries by head_dim={head_dim})"]
    return []


def tunix_moe_routing(hf_config: Mapping[str, Any]) -> list[str]:
    """Tunix 0.1.7's Qwen3 MoE layer always renormalises the top-k routing weights
    (tunix/models/qwen3/model.py:741) and makes every layer an MoE layer; the engine follows
    ``norm_topk_prob`` and ``mlp_only_layers``."""
    problems = []
    if not hf_config.get("norm_topk_prob", False):
        problems.append(f"norm_topk_prob=False (Tunix {TUNIX_VERSION} renormalises the top-k weights anyway)")
    if hf_config.get("mlp_only_layers"):
        problems.append(f"mlp_only_layers={hf_config['mlp_only_layers']} (Tunix {TUNIX_VERSION} has no dense layers)")
    return problems


def check_trainer_config(
    architecture: str, hf_config: Mapping[str, Any], checks: Any, *, allow_mismatch: bool = False
) -> list[str]:
    """Run ``checks`` (functions of the HF config returning problems, each naming its field);
    raise ``TrainerMismatchError`` listing them, or with ``allow_mismatch`` log them. Returns
    the problems."""
    problems = [problem for check in checks for problem in check(hf_config)]
    if problems and not allow_mismatch:
        raise TrainerMismatchError(
            f"a Tunix trainer of this {architecture} would compute another model than the engine: "
            + "; ".join(problems)
            + ". Its logprobs, and the policy gradient, would be off; pass allow_mismatch=True "
            "(SglangJaxRollout: allow_trainer_mismatch=True) to train anyway"
        )
    for problem in problems:
        logger.warning("trainer and engine compute different models (allowed): %s", problem)
    return problems


# --------------------------------------------------------------------------------------
# sort-based top-k/top-p sampling with seeds (Tunix's default, forwarded to sglang-jax)
# --------------------------------------------------------------------------------------


def sort_free_sampling(engine_kwargs: dict[str, Any], deterministic_sampling: bool) -> dict[str, Any]:
    """Turn off ``use_sort_for_toppk_minp`` when sampling is deterministic (seeded).

    Tunix 0.1.7's ``RolloutConfig.rollout_sglang_jax_use_sort_for_toppk_minp`` defaults to
    True (sglang-jax's own default is False); with deterministic sampling, sglang-jax
    0.1.0rc0's sort-based top-k/top-p path raises ShardingTypeError in ``take_along_axis``
    (``sgl_jax/srt/layers/sampler.py``) in the scheduler thread for a batch of one request,
    and Tunix's agentic learner sends one prompt per call. The other path samples from the
    same distribution. Returns the kwargs to use.
    """
    if deterministic_sampling and engine_kwargs.get("use_sort_for_toppk_minp"):
        logger.info("use_sort_for_toppk_minp=False: sglang-jax's sort path fails with seeded sampling of one request")
        return {**engine_kwargs, "use_sort_for_toppk_minp": False}
    return engine_kwargs


# --------------------------------------------------------------------------------------
# the agentic learner's weight syncs: RolloutSyncLock and policy_version
# --------------------------------------------------------------------------------------


class NonDrainingSyncLock:
    """Stands in for ``tunix.rl.agentic.utils.RolloutSyncLock`` when the rollout itself makes
    weight syncs safe with requests in flight (``SglangJaxRollout``): rollouts never wait,
    and a weight sync only excludes other weight syncs; it no longer waits for every
    episode in flight to end.

    Tunix 0.1.7's lock drains: a sync waits until every episode (all its turns) has ended,
    and a new episode waits while a sync is waiting, inside a coroutine on the learner's
    event loop. With ``max_concurrency`` below the episodes the producer has queued
    (``(off_policy_steps + 1) * batch * num_generations``) that blocked loop can never run
    the episodes the sync waits for: a deadlock. This lock cannot block the loop.
    """

    def __init__(self):
        self._sync = threading.Lock()
        self._count = threading.Lock()
        self._rollouts = 0  # episodes in flight (read by ``record_sync_waits``), as Tunix's lock counts them

    def acquire_rollout(self) -> None:
        with self._count:
            self._rollouts += 1

    def release_rollout(self) -> None:
        with self._count:
            self._rollouts -= 1

    def acquire_weight_sync(self) -> None:
        self._sync.acquire()

    def release_weight_sync(self) -> None:
        self._sync.release()


#: Threads that wait, for the episodes about to start, until a pending weight sync is done.
ROLLOUT_START_WAITERS = 64
_waiters: concurrent.futures.ThreadPoolExecutor | None = None


class _PreAcquiredStarts:
    """Stands between Tunix's orchestrator and its sync lock: ``acquire_rollout`` called by a
    runner task whose start was already acquired off the loop (``patch_rollout_start_off_loop``)
    takes that acquisition instead of waiting on the loop thread."""

    def __init__(self, lock: Any):
        self.lock = lock
        self.started: set[Any] = set()  # runner tasks holding a start acquired off the loop

    def acquire_rollout(self) -> None:
        task = asyncio.current_task()
        if task in self.started:
            self.started.discard(task)
        else:
            self.lock.acquire_rollout()

    def __getattr__(self, name: str) -> Any:  # release_rollout, the weight-sync side, counters
        return getattr(self.lock, name)


def patch_rollout_start_off_loop() -> None:
    """Tunix 0.1.7's ``RolloutOrchestrator._runner`` calls ``acquire_rollout`` of the learner's
    ``RolloutSyncLock`` on the learner's event loop thread (rollout_orchestrator.py:164). When
    a weight sync is waiting for the episodes in flight, that call blocks the loop those
    episodes need to finish: the learner deadlocks, at any ``max_concurrency``, whenever an
    episode is about to start while a sync waits (timing: more likely on a loaded machine).
    Patched: the runner waits for its start in a thread of its own and only then runs
    Tunix's own runner; the lock and its draining semantics (a sync waits for every episode
    in flight, new episodes wait for a pending sync) are Tunix's. Idempotent."""
    from tunix.rl.agentic.pipeline.rollout_orchestrator import RolloutOrchestrator

    original = RolloutOrchestrator._runner
    if hasattr(original, "__wrapped__"):
        return

    async def _runner(self, *args: Any, **kwargs: Any) -> Any:
        global _waiters
        if not isinstance(self._rollout_sync_lock, _PreAcquiredStarts):
            self._rollout_sync_lock = _PreAcquiredStarts(self._rollout_sync_lock)
        starts = self._rollout_sync_lock
        if _waiters is None:
            _waiters = concurrent.futures.ThreadPoolExecutor(ROLLOUT_START_WAITERS, "tunix-rollout-start")
        start = asyncio.get_running_loop().run_in_executor(_waiters, starts.lock.acquire_rollout)
        try:
            await asyncio.shield(start)
        except asyncio.CancelledError:  # the start is taken later, in its thread: give it back then
            start.add_done_callback(lambda f: f.cancelled() or f.exception() or starts.lock.release_rollout())
            raise
        task = asyncio.current_task()
        starts.started.add(task)
        try:
            return await original(self, *args, **kwargs)
        finally:
            if task in starts.started:  # Tunix's runner ended before it took its start
                starts.started.discard(task)
                starts.lock.release_rollout()

    _runner.__wrapped__ = original  # type: ignore[attr-defined]
    RolloutOrchestrator._runner = _runner


def prompt_text(content: Any) -> Any:
    """Tunix 0.1.7's agentic learner hands each prompt to its agent as a one-element numpy
    array (micro-batches of one, ``AgenticRLLearner._create_micro_batch_iterator``), which a
    chat template renders as ``"['text']"``: every prompt the model sees is the array's repr.
    Returns the element of such an array; anything else unchanged."""
    if isinstance(content, np.ndarray) and content.size == 1:
        return content.reshape(-1)[0].item()
    return content


@functools.cache
def prompt_text_agent() -> type:
    """Tunix's ``ModelAgent`` with ``prompt_text`` applied to the task's prompt (its
    ``"prompts"`` or ``"question"``): pass ``agent_class=compat.prompt_text_agent()`` to an
    agentic learner so the model sees the prompt itself."""
    from tunix.rl.agentic.agents.model_agent import ModelAgent

    class PromptTextAgent(ModelAgent):
        def _observation_to_messages(self, observation: Any, reward: float, done: bool, info: dict) -> None:
            if isinstance(observation, dict):
                observation = {k: prompt_text(v) if k in ("prompts", "question") else v for k, v in observation.items()}
            super()._observation_to_messages(observation, reward, done, info)

    return PromptTextAgent


class PolicyVersions:
    """Maps the rollout engine's weight versions to the learner's ``policy_version``:
    recorded once when installed and after every learner sync."""

    def __init__(self, engine_version: int, policy_version: int):
        self._points: list[tuple[int, int]] = [(engine_version, policy_version)]
        self._lock = threading.Lock()

    def record(self, engine_version: int, policy_version: int) -> None:
        with self._lock:
            self._points.append((engine_version, policy_version))

    def policy_version(self, engine_version: int) -> int:
        """The learner's version for the weights the engine served as ``engine_version``."""
        with self._lock:
            known = [p for v, p in self._points if v <= engine_version]
            return known[-1] if known else self._points[0][1]


def _check_tunix_version() -> None:
    installed = importlib.metadata.version("google-tunix")
    if installed != TUNIX_VERSION:
        logger.warning(
            "google-tunix %s is installed; enable_in_flight_sync was checked against %s", installed, TUNIX_VERSION
        )


def enable_in_flight_sync(learner: Any) -> PolicyVersions:
    """Let a Tunix agentic learner (``AgenticGRPOLearner`` / ``AgenticRLLearner``) sync
    weights without waiting for the rollouts in flight, and record in each trajectory's
    ``policy_version`` the weights that actually produced its tokens.

    Call after building the learner and before ``train()``; its rollout must be a
    ``SglangJaxRollout`` (``rollout_engine=functools.partial(SglangJaxRollout,
    in_flight="recompute")``: the engine then swaps between two scheduler iterations and
    each request's tokens after the swap come from the new weights; with
    ``in_flight="drain"`` a sync waits only for the requests running, not for whole
    episodes). It replaces two privates of the learner (Tunix 0.1.7):

    - ``_rollout_sync_lock`` -> ``NonDrainingSyncLock`` (also ends the deadlock described there);
    - ``_model_call``: after each call, ``env.task["policy_version"]`` becomes the learner
      version of the oldest weights that produced any token of the episode so far (Tunix
      stamps the version current when the turn started, which with in-flight syncs may be
      older or newer than the tokens' own).

    Returns the engine-version -> policy-version map it keeps.
    """
    _check_tunix_version()
    rollout = learner.rl_cluster.rollout
    if not hasattr(rollout, "last_weight_versions"):
        raise TypeError(
            f"enable_in_flight_sync needs a SglangJaxRollout as the learner's rollout, got {type(rollout).__name__}"
        )
    for name in ("_rollout_sync_lock", "_model_call"):
        if not hasattr(learner, name):
            raise TypeError(f"{type(learner).__name__} has no {name}: this Tunix version is not supported")
    versions = PolicyVersions(rollout.sampler.version, learner.policy_version)
    lock = NonDrainingSyncLock()
    release = lock.release_weight_sync

    def release_weight_sync() -> None:  # the learner has synced and bumped its version by now
        versions.record(rollout.sampler.version, learner.policy_version)
        release()

    lock.release_weight_sync = release_weight_sync  # type: ignore[method-assign]
    learner._rollout_sync_lock = lock
    model_call = learner._model_call
    oldest: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _model_call(chat_lists, env=None, *args, **kwargs):
        out = model_call(chat_lists, env, *args, **kwargs)
        stamps = rollout.last_weight_versions()
        if env is not None and stamps and stamps[0]:
            version = versions.policy_version(min(v for v, _ in stamps[0]))
            if env in oldest:
                version = min(version, oldest[env])
            oldest[env] = version
            env.task["policy_version"] = version
        return out

    learner._model_call = _model_call
    return versions


@dataclasses.dataclass
class SyncWait:
    """One weight sync of an agentic learner, as the trainer saw it."""

    #: Episodes in flight when the sync asked for the lock.
    episodes_in_flight: int
    #: Time the trainer waited for the sync lock (Tunix's lock: until those episodes ended).
    lock_seconds: float
    #: Time ``RLCluster.sync_weights()`` took (the rollout's ``update_params``).
    sync_seconds: float

    @property
    def seconds(self) -> float:
        """The trainer's whole wait at this sync."""
        return self.lock_seconds + self.sync_seconds


def record_sync_waits(learner: Any) -> list[SyncWait]:
    """Time every weight sync of an agentic learner (call after ``enable_in_flight_sync`` if
    used, before ``train()``); returns the list it appends to."""
    waits: list[SyncWait] = []
    lock = learner._rollout_sync_lock
    cluster = learner.rl_cluster
    acquire, sync_weights = lock.acquire_weight_sync, cluster.sync_weights
    pending: dict[str, float] = {}

    def acquire_weight_sync() -> None:
        episodes, t0 = int(getattr(lock, "_rollouts", 0)), time.perf_counter()
        acquire()
        pending.update(episodes=episodes, lock=time.perf_counter() - t0)

    def timed_sync_weights(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return sync_weights(*args, **kwargs)
        finally:
            if pending:
                waits.append(SyncWait(int(pending["episodes"]), pending["lock"], time.perf_counter() - t0))
                pending.clear()

    lock.acquire_weight_sync = acquire_weight_sync
    cluster.sync_weights = timed_sync_weights
    return waits
