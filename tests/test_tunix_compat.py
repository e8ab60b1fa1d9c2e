"""A Tunix user swaps the sampler class and nothing else.

Ports of Tunix's own sglang-jax sampler tests (google/tunix tests/generate/
sglang_jax_sampler_test.py and sglang_jax_lora_test.py) to tiny local checkpoints, run
against our class: Tunix's SglangJaxConfig, its MappingConfig, its call arguments, and
RLCluster's rollout fields, with Tunix's own vanilla sampler as the oracle.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from tunix.generate import mappings
from tunix.generate import sampler as vanilla_sampler
from tunix.generate import sglang_jax_sampler as tunix_sglang

import converters
from sampler import SglangJaxRollout, SglangJaxSampler
from sampler.tunix.config import from_tunix_config
from sampler.tunix.models import load_tunix_model, tunix_model_config
from tests import helpers
from training_examples import grpo_tiny

pytestmark = pytest.mark.engine

CASE = "llama-untied"  # Tunix's own test uses a Llama 3
PROMPTS = ["1+1=", "hello world the quick", "Q: what is 3+4? A:"]


def _mesh(devices=1):
    return jax.make_mesh(
        (1, devices), ("fsdp", "tp"), devices=jax.devices()[:devices], axis_types=(jax.sharding.AxisType.Auto,) * 2
    )


def test_tunix_config_fields_map_to_the_engine():
    """Every SglangJaxConfig field lands where Tunix's own sampler puts it (no engine)."""
    mesh = _mesh(2)
    config = tunix_sglang.SglangJaxConfig(
        mesh=mesh, mapping_config=None, model_version="/ckpt", context_length=512, mem_fraction_static=0.3,
        init_with_random_weights=True, disable_radix_cache=True, enable_deterministic_sampling=True,
        use_sort_for_toppk_minp=False, enable_static_lora=True, lora_target_modules=["all"], max_lora_rank=8,
        lora_scaling=2.0, max_running_requests=16, log_level="warning",
    )  # fmt: skip
    ours = from_tunix_config(config, random_seed_extra=7)
    assert (ours.model_path, ours.context_length, ours.max_running_requests) == ("/ckpt", 512, 16)
    assert ours.tp_size == 2 and ours.device_indexes == [0, 1]  # Tunix: one engine as wide as the mesh
    assert ours.load_format == "dummy" and ours.disable_radix_cache and ours.deterministic_sampling
    assert ours.log_level == "warning"
    kwargs = ours.engine_kwargs
    assert kwargs["use_sort_for_toppk_minp"] is False and kwargs["random_seed_extra"] == 7
    assert kwargs["enable_static_lora"] and kwargs["max_lora_rank"] == 8 and kwargs["lora_scaling"] == 2.0
    from sgl_jax.srt.utils.common_utils import SUPPORTED_LORA_TARGET_MODULES

    assert kwargs["lora_target_modules"] == list(SUPPORTED_LORA_TARGET_MODULES)  # "all"
    real = tunix_sglang.SglangJaxConfig(
        mesh=mesh, mapping_config=None, model_version="/ckpt", context_length=64, init_with_random_weights=False
    )
    assert from_tunix_config(real).load_format == "safetensors"  # Tunix's "auto"
    with pytest.raises(ValueError, match="max_lora_rank"):
        from_tunix_config(
            tunix_sglang.SglangJaxConfig(
                mesh=mesh, mapping_config=None, model_version="/ckpt", context_length=64, enable_static_lora=True
            )
        )


def test_tunix_sglang_jax_sampler_test_ported(model_dir, engines):
    """Tunix's test: a Tunix model, its vanilla sampler and the sglang-jax sampler built from
    SglangJaxConfig + MappingConfig, load_checkpoint(nnx.state(model)), same greedy call.
    The two samplers give the same text (Tunix's test: both match the expected answers), and
    the engine's lm_head is the model's (Tunix's test checks the same weight)."""
    path = model_dir(CASE)
    mesh = _mesh()
    model = load_tunix_model(path, dtype=jnp.float32, mesh=mesh)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    cfg = tunix_model_config(path)
    call = dict(
        max_generation_steps=16, max_prompt_length=None, temperature=0.0, top_k=1, seed=0, echo=False,
        pad_output=True,
    )  # fmt: skip
    vanilla = vanilla_sampler.Sampler(
        transformer=model,
        tokenizer=tokenizer,
        cache_config=vanilla_sampler.CacheConfig(
            cache_size=256, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim
        ),
    )
    expected = vanilla(input_strings=PROMPTS, **call)

    config = tunix_sglang.SglangJaxConfig(
        model_version=str(path), context_length=128, mesh=mesh, mem_fraction_static=0.2,
        init_with_random_weights=True, max_running_requests=4, log_level="error",
        mapping_config=mappings.MappingConfig.build(model=model, backend="sglang_jax"),
    )  # fmt: skip
    with SglangJaxSampler(tokenizer=tokenizer, config=config) as sampler:
        assert sampler.mesh.shape["tensor"] == 1 and sampler.config.load_format == "dummy"
        sampler.load_checkpoint(nnx.state(model))
        out = sampler(input_strings=PROMPTS, **call)
        assert out.text == expected.text
        assert [t.tolist() for t in out.tokens] == [t.tolist() for t in expected.tokens]
        assert out.padded_prompt_tokens.shape == expected.padded_prompt_tokens.shape
        np.testing.assert_array_equal(out.padded_prompt_tokens, expected.padded_prompt_tokens)
        lm_head = np.asarray(nnx.state(model)["lm_head"]["w"].get_value().astype(jnp.bfloat16))
        served = np.asarray(sampler.transformer_state["lm_head"]["embedding"].get_value())
        np.testing.assert_array_equal(helpers.bits(served.T), helpers.bits(lm_head))
        # and every other leaf is what sglang-jax's own loader makes of the checkpoint
        reference = engines.get(path, load_format="safetensors")
        helpers.assert_same_bits(
            {k: np.asarray(v) for k, v in sampler.engine_params().items()},
            {k: np.asarray(v) for k, v in reference.engine_params().items()},
        )
        engines.drop(path, load_format="safetensors")


def test_mapping_config_with_renamed_keys_is_honoured(model_dir, engines):
    """A MappingConfig naming the trainer's leaves differently ("attn" -> "attention") becomes
    a converter table; our layout ops stay. An unknown engine leaf in it is an error."""
    path = model_dir(CASE)
    model = load_tunix_model(path, dtype=jnp.float32)
    base = mappings.MappingConfig.build(model=model, backend="sglang_jax")
    renamed = {k.replace(".attn.", ".attention."): v for k, v in base.to_hf_mappings.items()}
    custom = mappings.MappingConfig(to_hf_mappings=renamed)
    state = nnx.state(model, nnx.Param)
    paths, leaves = converters.key_paths(state), jax.tree.leaves(state)
    source = {p.replace(".attn.", ".attention."): x for p, x in zip(paths, leaves)}

    from sampler.tunix.config import mapping_format

    name = mapping_format("LlamaForCausalLM", custom)
    assert name is not None and name.startswith("tunix-mapping-")
    assert mapping_format("LlamaForCausalLM", base) is None  # nothing new: ignored (logged)
    sampler = engines.get(path)
    report = sampler.update_params(source)
    assert report.source_format == name
    reference = helpers.upstream_engine_leaves(path)
    helpers.assert_same_bits({k: np.asarray(v) for k, v in sampler.engine_params().items()}, reference)
    bad = mappings.MappingConfig(to_hf_mappings={"layers.*.attn.q_proj.w": ("model.layers.*.self_attn.qq.weight", ())})
    with pytest.raises(converters.UnknownFormatError, match="self_attn.qq.weight"):
        mapping_format("LlamaForCausalLM", bad)


def test_tunix_sglang_jax_lora_test_ported(model_dir, tmp_path):
    """Tunix's LoRA test: GRPO with a LoRA actor (adapters on gate_proj only) and the engine's
    static LoRA on "all" modules, RLCluster's rollout fields as in Tunix's test. What Tunix's
    VERIFY_UPDATE_PARAMS check names (layers.0.mlp.gate_proj.kernel_lora_a ->
    model.layers.0.mlp.gate_proj.A_buffer) holds after every sync; modules without adapters
    keep zero buffers."""
    rank, alpha = 4, 4.0
    syncs = []

    class Checked(SglangJaxRollout):
        def update_params(self, params, filter_types=None):
            report = super().update_params(params, filter_types)
            served = self.sampler.engine_params()
            a = served["model.layers.0.mlp.gate_proj.A_buffer"]
            syncs.append((report, np.asarray(a), np.asarray(served["model.layers.0.mlp.up_proj.B_buffer"])))
            return report

    state = {}
    grpo_tiny.run(
        steps=2, workdir=str(tmp_path), plot=False, verbose=False, rollout_cls=Checked, keep=state,
        lora_rank=rank, lora_alpha=alpha, lora_modules=("gate_proj",), rollout_overrides=dict(
            rollout_sglang_jax_lora_target_modules=["all"], rollout_sglang_jax_precompile_bs_paddings=[8],
            rollout_sglang_jax_precompile_token_paddings=[64], rollout_sglang_jax_disable_radix_cache=True,
        ),
    )  # fmt: skip
    rollout, actor = state["rollout"], state["actor"]
    try:
        assert len(syncs) >= 3
        lora_a = nnx.state(actor, nnx.LoRAParam)["layers"][0]["mlp"]["gate_proj"]["kernel_lora_a"].get_value()
        expected = np.asarray(jnp.transpose(lora_a).astype(jnp.bfloat16))[None]
        np.testing.assert_array_equal(helpers.bits(syncs[-1][1]), helpers.bits(expected))
        assert not np.asarray(syncs[-1][2], np.float32).any()  # up_proj has no adapter: zeros
        assert all(r.copied_bytes < syncs[0][0].copied_bytes for r, *_ in syncs[1:])  # adapters only
    finally:
        rollout.shutdown()


def test_completion_mask_decides_where_a_completion_ends(model_dir, engines):
    """A completion may hold the pad id as a real sampled token: without a mask it is scored and
    the completion ends at its last non-pad token (Tunix 0.1.7's learner masks only the pad
    positions, so the tokens after a sampled pad count); Tunix main's
    get_per_token_logps(..., completion_mask) decides the end and zeroes masked positions."""
    sampler = engines.get(model_dir(CASE), load_format="safetensors")
    pad = sampler.tokenizer.pad_id()
    prompt = np.asarray([[pad, pad, 5, 17, 42]])
    completion = np.asarray([[99, pad, 7, 3, pad, pad]])  # a real pad token at index 1
    full = sampler.generate_ids(
        [[5, 17, 42, 99, pad, 7, 3]], {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=2
    )[0]
    expected = np.asarray([lp for lp, *_ in full["meta_info"]["input_token_logprobs"][1:5]], np.float32)
    assert np.count_nonzero(expected) == 4
    by_pad = sampler.score_completions(prompt, completion)
    np.testing.assert_allclose(by_pad[0], np.concatenate([expected, [0, 0]]), atol=1e-6)
    by_mask = sampler.score_completions(prompt, completion, np.asarray([[1, 1, 1, 0, 0, 0]]))
    np.testing.assert_allclose(by_mask[0], np.concatenate([expected[:3], [0, 0, 0]]), atol=1e-6)
    unmasked_pad = sampler.score_completions(prompt, completion, np.asarray([[1, 0, 1, 1, 0, 0]]))
    np.testing.assert_allclose(unmasked_pad[0], [expected[0], 0, expected[2], expected[3], 0, 0], atol=1e-6)
    mask = np.asarray([[1, 1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="completion_mask has shape"):
        sampler.score_completions(prompt, completion, mask[:, :3])
    engines.drop(model_dir(CASE), load_format="safetensors")
