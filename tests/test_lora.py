"""LoRA actors: base weights pushed once, then only adapters move; the engine's static
LoRA buffers give what an engine serving the merged weights (W + alpha/r * a @ b) gives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import converters
from sampler import SglangJaxRollout
from sampler.tunix.models import load_tunix_model
from tests import helpers
from training_examples import grpo_tiny

pytestmark = pytest.mark.engine
RANK, ALPHA = 4, 8.0


def _randomize_lora(model, seed, scale=0.05):
    """Give every adapter non-zero values (qwix starts B at zero)."""
    state = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(jax.tree_util.tree_leaves(state))))
    nnx.update(model, jax.tree.map(lambda x: scale * jax.random.normal(next(keys), x.shape, x.dtype), state))


_MERGE = {"q_proj": "dr,rnh->dnh", "k_proj": "dr,rnh->dnh", "v_proj": "dr,rnh->dnh", "o_proj": "nhr,rd->nhd"}


def merged_params(model) -> dict:
    """The actor's base params with every adapter folded in: W + alpha/rank * a @ b (Tunix layout)."""
    state = nnx.state(model, nnx.Param)
    flat = dict(zip(converters.key_paths(state), jax.tree_util.tree_leaves(state)))
    out = {}
    for path, x in flat.items():
        if "_lora_" in path:
            continue
        a, b = flat.get(path + "_lora_a"), flat.get(path + "_lora_b")
        if a is not None:
            module = path.split(".")[-2]
            x = x + (ALPHA / RANK) * jnp.einsum(_MERGE.get(module, "ir,ro->io"), a, b)
        out[path] = x
    return out


def test_lora_only_updates_follow_the_trainer(model_dir, engines):
    from tunix.rl.rollout import base_rollout

    path = model_dir("qwen3-tied")
    actor = grpo_tiny.apply_lora(load_tunix_model(path), RANK, ALPHA)
    config = base_rollout.RolloutConfig(
        max_tokens_to_generate=6,
        max_prompt_length=16,
        temperature=1.0,
        rollout_sglang_jax_model_version=str(path),
        rollout_sglang_jax_context_length=64,
        rollout_sglang_jax_max_running_requests=4,
        rollout_sglang_jax_enable_static_lora=True,
        rollout_sglang_jax_lora_target_modules=list(grpo_tiny.LORA_MODULES),
        rollout_sglang_jax_max_lora_rank=RANK,
        rollout_sglang_jax_lora_scaling=ALPHA / RANK,
        rollout_sglang_jax_log_level="error",
    )
    rollout = SglangJaxRollout(rollout_actor=actor, mesh=None, rollout_config=config)
    try:
        sampler = rollout.sampler
        full = rollout.last_report
        assert full.copied and "model.layers.0.self_attn.q_proj.base_layer.weight" in full.copied
        out = rollout.generate(helpers.PROMPTS, config)
        width = max(len(t) for t in out.tokens)
        completions = np.stack([np.pad(t, (0, width - len(t)), constant_values=rollout.pad_id()) for t in out.tokens])
        prompts = np.asarray(out.left_padded_prompt_tokens)
        mask = completions != rollout.pad_id()
        before = np.asarray(rollout.get_per_token_logps(prompts, completions))

        adapter_bytes = sum(
            x.nbytes for p, x in sampler.engine_params().items() if p.endswith(("A_buffer", "B_buffer"))
        )
        plain = engines.get(path)  # the same model served without LoRA: gets the merged weights
        for step in range(2):
            _randomize_lora(actor, seed=step)
            lora_state = nnx.state(actor, nnx.LoRAParam)
            report = rollout.update_params(lora_state, (nnx.LoRAParam,))
            # only the adapters moved: every engine leaf touched is a LoRA buffer
            assert report.copied_bytes + report.aliased_bytes == adapter_bytes
            assert all(p.endswith(("A_buffer", "B_buffer")) for p in report.copied + report.aliased)
            assert report.copied_bytes < full.copied_bytes / 10
            assert sampler.fingerprint() == converters.fingerprint_params(nnx.state(actor, nnx.Param), sampler.spec)
            plain.update_params(merged_params(actor))
            lora_engine = np.asarray(rollout.get_per_token_logps(prompts, completions))
            merged_engine = plain.score_completions(prompts, completions)
            changed = np.abs(lora_engine - before)[mask].mean()
            mismatch = np.abs(lora_engine - merged_engine)[mask].mean()
            # engine-side LoRA == merged weights, up to bf16 rounding of the separate LoRA
            # matmuls, while the adapters themselves moved the output much more than that
            assert mismatch < 0.05 and changed > max(0.1, 4 * mismatch), (changed, mismatch)
            np.testing.assert_allclose(lora_engine[mask], merged_engine[mask], atol=0.25)
    finally:
        rollout.shutdown()


def test_lora_into_an_engine_without_lora_is_refused(model_dir, engines):
    path = model_dir("qwen3-tied")
    actor = grpo_tiny.apply_lora(load_tunix_model(path), RANK, ALPHA)
    sampler = engines.get(path)
    with pytest.raises(converters.ParamsMismatchError, match="static LoRA"):
        sampler.update_params(nnx.state(actor, nnx.LoRAParam), strict=False)
