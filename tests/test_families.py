"""What the MoE and Gemma families add beyond the shared oracle tests (test_oracle,
test_sharded, test_reference): zero-copy expert arrays from a Tunix trainer on the engine's
MoE mesh, checkpoint loads that stack experts one at a time, and the configurations upstream
cannot serve, refused before an engine starts."""

import logging
import threading
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import converters
from sampler import SamplerConfig, SglangJaxSampler, UnsupportedModelError
from sampler.sync.leaves import buffer_pointers
from sampler.tiny import write_tiny_model
from sampler.tunix.models import load_tunix_model
from tests import helpers

EXPERT_LEAVES = (".mlp.wi_0", ".mlp.wi_1", ".mlp.wo")


def _served(sampler) -> dict:
    return {k: np.asarray(v) for k, v in sampler.engine_params().items()}


def trainer_mesh(tp: int, ep: int) -> jax.sharding.Mesh:
    """A Tunix trainer mesh over the engine's devices laid out as its MoE mesh: fsdp = ep groups
    of tp // ep devices, expert-major (sglang-jax's layers/moe.py reshapes the same way)."""
    devices = np.asarray(jax.devices()[:tp]).reshape(ep, tp // ep)
    return jax.sharding.Mesh(devices, ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


@pytest.mark.engine
@pytest.mark.parametrize("case,tp,ep", [("qwen3-moe", 1, 1), ("qwen3-moe-2kv", 2, 1), ("qwen3-moe-tp", 2, 2)])
def test_moe_experts_from_a_tunix_trainer_are_aliased(case, tp, ep, model_dir, engines):
    """A bf16 Tunix Qwen3-MoE on a mesh laid out like the engine's MoE mesh: every expert
    array (almost all of the model's bytes) is served from the trainer's own buffers."""
    path = model_dir(case)
    sampler = engines.get(path, **helpers.engine_config(tp, ep))
    mesh = trainer_mesh(tp, ep)
    with mesh:
        state = nnx.state(load_tunix_model(path, dtype=jnp.bfloat16, mesh=mesh), nnx.Param)
    report = sampler.update_params(state)

    helpers.assert_same_bits(_served(sampler), helpers.upstream_engine_leaves(path, tp=tp))
    assert sampler.fingerprint() == converters.fingerprint_params(state, sampler.spec)
    experts = sorted(p for p in sampler.engine_params() if p.endswith(EXPERT_LEAVES))
    assert experts and set(experts) <= set(report.aliased)
    sharing = sampler.verify_sharing(state)
    assert set(experts) <= set(sharing.shared)
    served = sampler.engine_params()
    flat = dict(zip(converters.key_paths(state), jax.tree_util.tree_leaves(state)))
    for path_ in experts:
        layer, leaf = path_.split(".")[2], path_.rsplit(".", 1)[1]
        source = flat[f"layers.{layer}.mlp.{dict(wi_0='gate_proj', wi_1='up_proj', wo='down_proj')[leaf]}"]
        assert buffer_pointers(served[path_]) == buffer_pointers(source), path_
        assert len(source.addressable_shards) == tp
    assert report.aliased_bytes >= sum(served[p].nbytes for p in experts)
    # the router stays a copy: the engine keeps it in float32
    assert "cast bfloat16->float32" in sharing.copies["model.layers.0.moe_gate.kernel"]


@pytest.mark.engine
def test_load_checkpoint_stacks_experts_one_at_a_time(model_dir, engines):
    """load_checkpoint writes each expert into the engine's stacked array as it reads it: host
    memory (numpy and Python allocations, traced) stays below one stacked leaf, far below the
    checkpoint; the leaves equal what sglang-jax's loader makes (tp 2, experts over ep 2)."""
    path = model_dir("qwen3-moe-32e")
    sampler = engines.get(path, **helpers.engine_config(2, 2))
    expected = helpers.upstream_engine_leaves(path, tp=2)
    stacked = max(x.nbytes for p, x in expected.items() if p.endswith(EXPERT_LEAVES))
    checkpoint = converters.SafetensorsCheckpoint(path)
    largest = max(checkpoint.load(n).nbytes for n in checkpoint.names if ".experts." not in n)
    assert stacked > 2 * largest  # so that holding one stack would show
    sampler.load_checkpoint(str(path))  # compiles the per-expert writes
    zeros = {k: jnp.zeros_like(v) for k, v in sampler.engine_params().items() if sampler.sync.is_weight(k)}
    sampler.update_params(zeros, alias=False)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        report = sampler.load_checkpoint(str(path))
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    helpers.assert_same_bits(_served(sampler), expected)
    assert report.source_format == "hf" and len(report.copied) == len(expected)
    assert peak < stacked < checkpoint.nbytes / 4, (peak, stacked, checkpoint.nbytes)
    print(f"load_checkpoint host peak {peak / 2**10:.0f} KiB; one stacked leaf {stacked / 2**10:.0f} KiB")


# ---------------------------------------------------------------------------- refused configurations
REFUSED = {
    # (architecture, config overrides, SamplerConfig fields) -> the field the error names
    "gemma4 tp > kv heads": ("Gemma4ForCausalLM", dict(moe=True), dict(tp_size=2), "num_key_value_heads=1"),
    "gemma4 mixed head dims": ("Gemma4ForCausalLM", dict(global_head_dim=256), {}, "global_head_dim=256"),
    "gemma4 k_eq_v kv counts": (
        "Gemma4ForCausalLM",
        dict(attention_k_eq_v=True, num_kv_heads=2, num_global_kv_heads=1),
        {},
        "num_global_key_value_heads=1",
    ),
    "qwen3-moe sparse step": ("Qwen3MoeForCausalLM", dict(decoder_sparse_step=2), {}, "decoder_sparse_step=2"),
    "qwen3-moe ep > tp": ("Qwen3MoeForCausalLM", {}, dict(engine_kwargs={"ep_size": 2}), "ep_size=2 must divide"),
    "qwen3-moe ep vs experts": (
        "Qwen3MoeForCausalLM",
        dict(num_experts=3),
        dict(tp_size=2, engine_kwargs={"ep_size": 2}),
        "num_experts=3",
    ),
    "qwen3-moe fused on cpu": (
        "Qwen3MoeForCausalLM",
        {},
        dict(engine_kwargs={"moe_backend": "fused"}),
        "moe_backend='fused'",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_configurations_are_refused_before_the_engine_starts(name, tmp_path):
    arch, overrides, fields, message = REFUSED[name]
    path = write_tiny_model(tmp_path / "m", arch, weights=False, **overrides)
    before = set(threading.enumerate())
    with pytest.raises(UnsupportedModelError, match=message.replace("(", r"\(")):
        SglangJaxSampler(
            config=SamplerConfig(model_path=str(path), context_length=64, max_running_requests=2, **fields)
        )
    assert set(threading.enumerate()) <= before  # no engine thread was started


def test_gemma4_without_text_config_and_e2b_features_are_refused(tmp_path):
    from sampler import compat

    kwargs = {"tp_size": 1, "attention_backend": "native"}
    with pytest.raises(UnsupportedModelError, match="text_config"):
        compat.check_gemma4({"architectures": ["Gemma4ForCausalLM"], "num_attention_heads": 2}, kwargs)
    text = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128, hidden_size_per_layer_input=256)
    with pytest.raises(UnsupportedModelError, match="hidden_size_per_layer_input=256"):
        compat.check_gemma4({"text_config": text}, kwargs)
    with pytest.raises(UnsupportedModelError, match="num_global_key_value_heads is null"):
        compat.check_gemma4({"text_config": {**text, "num_global_key_value_heads": None}}, kwargs)


@pytest.mark.engine
def test_gemma4_ep_size_is_warned_about_and_the_engine_serves(model_dir, engines, caplog):
    """ep_size reaches sglang-jax's Gemma 4 nowhere: warned, the experts stay tensor-parallel,
    and the leaves are still what the loader makes."""
    path = model_dir("gemma4-moe-tp")
    with caplog.at_level(logging.WARNING, logger="sampler.compat.models"):
        sampler = engines.get(path, **helpers.engine_config(2, 2))
    assert any("ep_size=2 is ignored" in r.getMessage() for r in caplog.records)
    sampler.update_params(helpers.hf_tensors(path))
    helpers.assert_same_bits(_served(sampler), helpers.upstream_engine_leaves(path, tp=2))
    mesh = sampler.engine_params()["model.layers.0.experts.wi_0"].sharding.mesh
    assert dict(mesh.shape) == {"expert": 1, "tensor": 2}
    engines.drop(path, **helpers.engine_config(2, 2))


def test_tiny_models_of_every_family_have_the_configured_shapes(tmp_path):
    """The recipes build what their configs say (a wrong recipe would make every oracle test
    compare a model with itself at the wrong size)."""
    for case in ("qwen3-moe", "gemma2", "gemma4-moe", "gemma4-keqv"):
        path = helpers.write_case(tmp_path / case, case)
        spec = converters.ModelSpec.from_hf_config(path)
        hf = helpers.hf_tensors(path)
        engine = helpers.upstream_engine_leaves(path, hf)
        assert spec.num_layers == 2 and spec.head_dim == 128
        if spec.num_experts:
            stacks = [x for p, x in engine.items() if p.endswith((".wi_0", ".experts.wi_0"))]
            assert stacks and all(x.shape == (spec.num_experts, spec.hidden_size, 64) for x in stacks)
