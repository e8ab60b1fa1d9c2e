"""Tunix's asynchronous agentic learner (``AgenticGRPOLearner``) with SglangJaxRollout: the
actor trains on simulated CPU device 0 while the rollout engine generates on device 1.
With Tunix's own draining sync lock, and with ``enable_in_flight_sync`` (syncs that do not
wait for episodes, ``policy_version`` fed from the engine's weight-version stamps)."""

import threading

import jax
import pytest
from flax import nnx

import converters
from sampler import SglangJaxRollout
from training_examples import async_grpo

pytestmark = pytest.mark.engine

#: Generous bound on waiting for the learner's first sync (only a deadlock reaches it).
SYNC_WAIT_BOUND_S = 600


class CheckedRollout(SglangJaxRollout):
    """Records, after every sync, the engine's fingerprint and the actor's; holds one
    marked generate call (see the in-flight test) until the learner's first sync is done."""

    syncs: list = []
    prompts: list = []
    synced = threading.Condition()
    marked = threading.local()
    held: dict = {}

    def update_params(self, params, filter_types=None):
        report = super().update_params(params, filter_types)
        expected = converters.fingerprint_params(params, self.sampler.spec)
        with CheckedRollout.synced:
            CheckedRollout.syncs.append((report.version, self.sampler.fingerprint(), expected))
            CheckedRollout.synced.notify_all()
        return report

    def generate(self, prompts, rollout_config, **kwargs):
        CheckedRollout.prompts.extend([prompts] if isinstance(prompts, str) else prompts)
        if getattr(CheckedRollout.marked, "hold", False):
            # Tunix stamped this turn's policy_version before calling us; generate only once
            # the learner's first sync (the second update: the first is RLCluster's) is done.
            with CheckedRollout.synced:
                assert CheckedRollout.synced.wait_for(lambda: len(CheckedRollout.syncs) >= 2, SYNC_WAIT_BOUND_S), (
                    "the learner never synced while an episode was in flight: its sync waits for episodes"
                )
            out = super().generate(prompts, rollout_config, **kwargs)
            CheckedRollout.held["stamps"] = self.last_weight_versions()[0]
            return out
        return super().generate(prompts, rollout_config, **kwargs)


def _reset():
    CheckedRollout.syncs = []
    CheckedRollout.prompts = []
    CheckedRollout.held = {}


def _check_run(log, state):
    rollout, actor = state["rollout"], state["actor"]
    assert len(log.steps) == 3
    assert sum(s.completion_tokens for s in log.steps) > 0, "trained on nothing"
    assert any(s.nonzero_advantages for s in log.steps)
    assert any(s.max_param_change > 0 for s in log.steps), "the actor did not change"
    # the model was asked the dataset's prompts themselves (compat.prompt_text_agent)
    asked = [p for p in async_grpo.PROMPTS if any(f"Q: {p}\n" in text for text in CheckedRollout.prompts)]
    assert CheckedRollout.prompts and all("Q: [" not in text for text in CheckedRollout.prompts), (
        CheckedRollout.prompts[:2]
    )
    assert asked, CheckedRollout.prompts[:2]
    assert len(CheckedRollout.syncs) == 1 + len(log.steps)  # RLCluster's first push + one per step
    assert len(log.sync_waits) == len(log.steps)  # record_sync_waits saw every learner sync
    for version, served, expected in CheckedRollout.syncs:
        assert served == expected, f"engine serves stale weights after sync v{version}"
    # trainer and engine on different devices
    engine_devices = {d for x in rollout.sampler.engine_params().values() for d in x.sharding.device_set}
    actor_devices = {d for x in jax.tree.leaves(nnx.state(actor)) for d in x.sharding.device_set}
    assert engine_devices == {jax.devices()[1]} and actor_devices == {jax.devices()[0]}


def test_agentic_grpo_trains_with_tunix_draining_syncs(tmp_path):
    _reset()
    state = {}
    log = async_grpo.run("drain", 3, str(tmp_path), fast=True, rollout_cls=CheckedRollout, keep=state, verbose=False)
    try:
        _check_run(log, state)
        assert state["rollout"].in_flight == "drain"
        assert len(log.requests_switched) == len(log.steps) and not any(log.requests_switched)
    finally:
        state["rollout"].shutdown()


def test_agentic_grpo_syncs_without_waiting_for_episodes(tmp_path):
    """``enable_in_flight_sync`` + ``in_flight="recompute"``, with max_concurrency=4 (fewer
    than the episodes queued: Tunix's own lock deadlocks there). One episode of the second
    batch holds its generate call until the learner's first sync is done: with a draining
    sync that is a deadlock; here the sync goes through, and that episode's policy_version
    is the version of the weights that produced its tokens, not the one Tunix stamped when
    the turn started."""
    _reset()
    observed: dict = {}

    def instrument(learner):
        model_call = learner._model_call  # already wrapped by enable_in_flight_sync

        def _model_call(chat_lists, env=None, *args, **kwargs):
            batch = env.extra_kwargs["group_id"] // learner._full_batch_size
            hold = batch == 1 and not observed
            if hold:
                observed["tunix_stamp"] = learner.policy_version  # what Tunix stamps for this turn
            CheckedRollout.marked.hold = hold
            try:
                out = model_call(chat_lists, env, *args, **kwargs)
            finally:
                CheckedRollout.marked.hold = False
            if hold:
                observed["fed"] = env.task["policy_version"]
            return out

        learner._model_call = _model_call

    state = {}
    log = async_grpo.run(
        "in-flight", 3, str(tmp_path), fast=True, max_concurrency=4, rollout_cls=CheckedRollout,
        on_learner=instrument, keep=state, verbose=False,
    )  # fmt: skip
    try:
        _check_run(log, state)
        assert state["rollout"].in_flight == "recompute"
        first_learner_sync = CheckedRollout.syncs[1][0]
        assert CheckedRollout.held["stamps"] == [(first_learner_sync, 0)]
        assert observed["tunix_stamp"] == 0 and observed["fed"] == 1
        assert 1 in {v for s in log.steps for v in s.policy_versions}
    finally:
        state["rollout"].shutdown()


def test_policy_version_map_follows_syncs():
    from sampler.compat.tunix import PolicyVersions

    versions = PolicyVersions(engine_version=1, policy_version=0)
    versions.record(engine_version=2, policy_version=1)
    versions.record(engine_version=4, policy_version=2)  # someone else pushed v3 in between
    assert [versions.policy_version(v) for v in (1, 2, 3, 4, 5)] == [0, 1, 1, 2, 2]
