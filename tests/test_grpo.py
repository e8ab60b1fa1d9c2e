"""GRPO through Tunix's RLCluster with SglangJaxRollout: no stale weights after any sync,
engine logprobs agree with the trainer's, num_iterations > 1, and the demo's reward rises."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tunix.rl import common

import converters
from sampler import SglangJaxRollout
from training_examples import grpo_tiny

pytestmark = pytest.mark.engine


class CheckedRollout(SglangJaxRollout):
    """Records, after every sync, the engine's fingerprint and the actor's, and the prompts
    of every generate call."""

    syncs: list = []
    prompts: list = []

    def generate(self, prompts, rollout_config, **kwargs):
        CheckedRollout.prompts.append(list(prompts))
        return super().generate(prompts, rollout_config, **kwargs)

    def update_params(self, params, filter_types=None):
        report = super().update_params(params, filter_types)
        expected = converters.fingerprint_params(params, self.sampler.spec)
        CheckedRollout.syncs.append((report.version, self.sampler.fingerprint(), expected, len(report.engines)))
        return report


def _trainer_logps(actor, prompt_tokens, completion_tokens, pad_id, eos_id):
    graphdef, state = nnx.split(actor)
    return np.asarray(
        common.compute_per_token_logps(
            graphdef,
            state,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            pad_id=pad_id,
            eos_id=eos_id,
            temperature=1.0,
        )
    )


def test_grpo_steps_sync_fresh_weights_and_logprobs_agree(tmp_path):
    CheckedRollout.syncs, CheckedRollout.prompts = [], []
    state = {}
    logs = grpo_tiny.run(
        steps=3,
        workdir=str(tmp_path),
        num_iterations=2,
        plot=False,
        verbose=False,
        rollout_cls=CheckedRollout,
        keep=state,
    )
    assert len(logs) == 3
    # every rollout gets batch_size x num_generations prompts of the demo's own text, each
    # prompt num_generations times in a row (a group)
    groups = 4
    assert CheckedRollout.prompts
    for call in CheckedRollout.prompts:
        assert len(call) % groups == 0 and all(isinstance(p, str) and p in grpo_tiny.PROMPTS for p in call), call
        assert all(len(set(call[i : i + groups])) == 1 for i in range(0, len(call), groups)), call
    assert sum(len(call) for call in CheckedRollout.prompts) == 3 * 4 * groups  # steps x B x G (iterations reuse them)
    syncs = CheckedRollout.syncs
    assert len(syncs) >= 4  # the initial full sync + one per global step
    for version, served, expected, _ in syncs:
        assert served == expected, f"engine serves stale weights after sync v{version}"

    rollout, actor, config = state["rollout"], state["actor"], state["rollout_config"]
    out = rollout.generate(grpo_tiny.PROMPTS[:4], config)
    prompt_tokens = np.asarray(out.left_padded_prompt_tokens)
    completion_tokens = _right_padded(out.tokens, rollout.pad_id())
    mask = completion_tokens != rollout.pad_id()
    trainer = _trainer_logps(actor, prompt_tokens, completion_tokens, rollout.pad_id(), rollout.eos_id())
    engine_sampled = np.stack(out.logprobs)
    engine_scored = np.asarray(rollout.get_per_token_logps(prompt_tokens, completion_tokens))
    # same tokens, same weights: prefill (scoring) and decode (sampling) differ only by bf16 rounding
    np.testing.assert_allclose(engine_scored[mask], engine_sampled[mask], atol=0.05)
    # trainer: Tunix's Qwen3 with fp32 params; engine: sglang-jax's Qwen3 with their bf16 copies
    diff = np.abs(engine_scored[mask] - trainer[mask])
    assert diff.mean() < 0.05 and diff.max() < 0.2, diff
    rollout.shutdown()


def test_grpo_on_a_tiny_qwen3_moe_syncs_fresh_weights_every_step(tmp_path):
    """Tunix GRPO on a Qwen3-MoE actor (experts stacked in Tunix's layout): after every sync the
    engine serves exactly the actor's weights, and they changed from the step before."""
    CheckedRollout.syncs = []
    state = {}
    logs = grpo_tiny.run(
        steps=2,
        workdir=str(tmp_path),
        plot=False,
        verbose=False,
        rollout_cls=CheckedRollout,
        keep=state,
        architecture="Qwen3MoeForCausalLM",
    )
    rollout = state["rollout"]
    try:
        assert len(logs) == 2
        assert rollout.sampler.spec.architecture == "Qwen3MoeForCausalLM" and rollout.sampler.spec.num_experts == 4
        syncs = CheckedRollout.syncs
        assert len(syncs) >= 3  # the initial full sync + one per global step
        versions = [version for version, *_ in syncs]
        assert versions == sorted(set(versions))
        for version, served, expected, _ in syncs:
            assert served == expected, f"engine serves stale weights after sync v{version}"
        fingerprints = [served for _, served, _, _ in syncs]
        assert all(a != b for a, b in zip(fingerprints, fingerprints[1:])), "a step synced unchanged weights"
        experts = [p for p in rollout.last_report.copied + rollout.last_report.aliased if p.endswith(".mlp.wi_0")]
        assert len(experts) == 2  # both layers' expert stacks went through every sync
    finally:
        rollout.shutdown()


def _right_padded(tokens, pad_id):
    width = max(len(t) for t in tokens)
    return np.stack([np.pad(t, (0, width - len(t)), constant_values=pad_id) for t in tokens])


def test_rollout_returns_completions_at_their_real_length(model_dir):
    """A completion that stops early comes back with its stop token and nothing after it:
    Tunix's agentic learner counts every returned token, and padded completions made it drop
    every trajectory as too long (it trained on nothing)."""
    from tunix.rl.rollout import base_rollout

    from sampler.tunix.models import load_tunix_model

    path = model_dir("qwen3-tied")
    config = base_rollout.RolloutConfig(
        max_tokens_to_generate=8, max_prompt_length=16, temperature=0.0,
        rollout_sglang_jax_model_version=str(path), rollout_sglang_jax_context_length=64,
        rollout_sglang_jax_max_running_requests=2, rollout_sglang_jax_log_level="error",
    )  # fmt: skip
    rollout = SglangJaxRollout(rollout_actor=load_tunix_model(path), mesh=None, rollout_config=config)
    try:
        greedy = rollout.generate(["1+1="], config).tokens[0]
        assert len(greedy) == 8  # no stop token met: the whole budget
        stop = int(greedy[2])
        out = rollout.generate(["1+1="], config, stop_token_ids=[stop])
        first = list(greedy).index(stop)
        assert out.tokens[0].tolist() == greedy[: first + 1].tolist()  # ends at the stop token, unpadded
        assert len(out.logprobs[0]) == first + 1
    finally:
        rollout.shutdown()


#: The demo's sampler/trainer mismatch when every sync is right (bf16 engine, fp32 trainer):
#: about 0.01 nats mean per token on this machine; an engine one step behind is off by tenths.
HEALTHY_MEAN_ABS = 0.05


def test_reward_rises_and_the_sampler_trainer_mismatch_stays_small(tmp_path):
    logs = grpo_tiny.run(steps=20, workdir=str(tmp_path), plot=False, verbose=False, learning_rate=2e-3)
    rewards = [log.reward for log in logs]
    assert np.mean(rewards[-6:]) > np.mean(rewards[:4]) + 0.25, rewards
    assert all(log.sync_ms is not None for log in logs)
    mismatch = [log.logp_diff_mean for log in logs]
    assert all(m is not None and m < HEALTHY_MEAN_ABS for m in mismatch), mismatch
    assert all(log.k3_kl < HEALTHY_MEAN_ABS**2 for log in logs), [log.k3_kl for log in logs]


class StaleRollout(SglangJaxRollout):
    """Pushes the weights of the sync before: from the second step on the engine serves the
    policy one step behind the trainer's."""

    def update_params(self, params, filter_types=None):
        current = jax.tree.map(jnp.copy, params)  # Tunix's next step may donate the live buffers
        previous, self._previous = getattr(self, "_previous", None), current
        return super().update_params(current if previous is None else previous, filter_types)


def test_grpo_with_data_parallel_rollout(tmp_path):
    """RLCluster unchanged, RolloutConfig(data_parallel_size=2) over a 2-device rollout mesh:
    two engines, both serving the actor's weights after every sync."""
    from sampler import DataParallelSampler

    CheckedRollout.syncs = []
    state = {}
    logs = grpo_tiny.run(
        steps=2,
        workdir=str(tmp_path),
        plot=False,
        verbose=False,
        rollout_cls=CheckedRollout,
        keep=state,
        rollout_devices=2,
        rollout_overrides={"data_parallel_size": 2},
    )
    rollout = state["rollout"]
    try:
        assert len(logs) == 2
        assert isinstance(rollout.sampler, DataParallelSampler) and rollout.sampler.data_parallel_size == 2
        assert len(CheckedRollout.syncs) >= 3
        assert [engines for *_, engines in CheckedRollout.syncs] == [2] * len(CheckedRollout.syncs)
        for version, served, expected, _ in CheckedRollout.syncs:  # fingerprint() raises if the engines differ
            assert served == expected, f"stale weights after sync v{version}"
    finally:
        rollout.shutdown()


def test_a_stale_engine_shows_in_the_mismatch_and_truncated_is_weights_it(tmp_path):
    """An engine one step behind the trainer, under TruncatedISGRPOLearner: the mismatch
    metric catches it (small on the first rollout, large on the second); the second step's
    tokens are weighted by min(pi_trainer / pi_sampler, C), some clipped at C, and Tunix's loss
    applies the weights token by token (weights of one change nothing; the step's weights give
    the weighted per-token loss)."""
    from tunix.rl import algo_core

    threshold = 2.0
    state = {}
    logs = grpo_tiny.run(
        steps=2,
        workdir=str(tmp_path),
        plot=False,
        verbose=False,
        rollout_cls=StaleRollout,
        truncated_is=threshold,
        keep=state,
    )
    rollout, learner, actor = state["rollout"], state["learner"], state["actor"]
    try:
        mismatch = [log.logp_diff_mean for log in logs]
        assert mismatch[0] < HEALTHY_MEAN_ABS, mismatch  # the first rollout: both on the initial weights
        assert mismatch[1] > 4 * HEALTHY_MEAN_ABS, mismatch
        example = learner.last_example
        trainer, sampler = (np.asarray(x, np.float64) for x in learner.last_logps)
        mask = np.asarray(example.completion_mask, bool)
        want = np.where(mask, np.minimum(np.exp(np.clip(trainer - sampler, -20, 20)), threshold), 0.0)
        weights = np.asarray(example.sampler_is_weights)
        np.testing.assert_allclose(weights, want, rtol=1e-5, atol=1e-6)
        assert (weights[mask] >= threshold - 1e-6).any() and (weights[mask] < 1).any(), weights[mask]

        def loss(weights):
            value, _ = algo_core.grpo_loss_fn(
                actor,
                example.replace(sampler_is_weights=weights),
                learner.algo_config,
                rollout.pad_id(),
                rollout.eos_id(),
            )
            return float(value)

        # at the weights the loss is evaluated with, each token's ratio is 1: its loss is -advantage,
        # times its weight, then aggregated as the learner's config says
        def expected(weights):
            per_token = -np.asarray(example.advantages)[:, None] * np.broadcast_to(weights, mask.shape)
            agg = common.aggregate_loss(
                jnp.asarray(per_token), example.completion_mask, learner.algo_config.loss_agg_mode
            )
            return float(agg)

        ones = jnp.asarray(mask, jnp.float32)
        assert loss(ones) == pytest.approx(loss(None), abs=1e-6)
        assert loss(example.sampler_is_weights) == pytest.approx(expected(weights), rel=1e-4, abs=1e-6)
        assert abs(loss(example.sampler_is_weights) - loss(None)) > 1e-3  # the correction changes the loss
    finally:
        rollout.shutdown()
