"""Every source format into tensor-parallel engines (4 simulated CPU devices), FSDP
trainers, disaggregated placement and load_checkpoint, against sglang-jax's own loader."""

import shutil
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import converters
from converters import CheckpointError, ParamsMismatchError
from sampler.sync.leaves import buffer_pointers
from sampler.tiny import write_weights
from sampler.tunix.models import load_tunix_model
from tests import helpers

pytestmark = pytest.mark.engine

P = jax.sharding.PartitionSpec


class Reference(NamedTuple):
    leaves: dict
    tokens: list
    fingerprint: str


@pytest.fixture(scope="module")
def tp_reference(engines):
    """Engine leaves, greedy tokens and fingerprint as sglang-jax's safetensors loader makes
    them, per (model, tp, ep)."""
    cache = {}

    def get(path, tp, ep=1) -> Reference:
        key = (str(path), tp, ep)
        if key not in cache:
            config = helpers.engine_config(tp, ep)
            ref = engines.get(path, load_format="safetensors", **config)
            leaves = {k: np.asarray(v) for k, v in ref.engine_params().items()}
            cache[key] = Reference(leaves, helpers.greedy(ref)[0], ref.fingerprint())
            engines.drop(path, load_format="safetensors", **config)
        return cache[key]

    return get


def _sources(path):
    """Every source format the architecture has: Tunix (Tunix's own HF loader), HF tensors,
    Gemma 4's text-only HF names, Flax (linen) for the Llama family."""
    hf = helpers.hf_tensors(path)
    sources = {
        "tunix": nnx.state(load_tunix_model(path), nnx.Param),
        "hf": hf,
        "hf-text": {k.replace("model.language_model.", "model.", 1): v for k, v in hf.items()},
        "flax": helpers.flax_params(hf, linen_layers=True),
    }
    have = converters.formats_for(converters.read_hf_config(path)["architectures"][0])
    return {fmt: source for fmt, source in sources.items() if fmt in have}


def _served(sampler):
    return {k: np.asarray(v) for k, v in sampler.engine_params().items()}


@pytest.mark.parametrize("case,tp,ep", helpers.TP_ENGINES)
def test_every_format_into_a_tp_engine_matches_the_loader(case, tp, ep, model_dir, engines, tp_reference):
    """Every source format into a tp (and, for MoE, ep) engine: every leaf bit for bit as
    sglang-jax's loader makes it, the same greedy tokens, the trainer's fingerprint."""
    path = model_dir(case)
    expected, tokens, fingerprint = tp_reference(path, tp, ep)
    sampler = engines.get(path, **helpers.engine_config(tp, ep))
    assert sampler.mesh.shape["tensor"] == tp
    zeros = {k: np.zeros_like(v) for k, v in expected.items()}
    for fmt, source in _sources(path).items():
        sampler.update_params(zeros)  # wipe first
        report = sampler.update_params(source)
        assert report.source_format == fmt
        helpers.assert_same_bits(_served(sampler), expected)
        assert helpers.greedy(sampler)[0] == tokens, fmt
        assert sampler.fingerprint() == fingerprint == converters.fingerprint_params(source, sampler.spec), fmt
    # engine layout, already on the engine's shardings: pure aliasing, also at tp > 1
    layout = {k: jax.device_put(v, sampler.engine_shardings()[k]) for k, v in expected.items()}
    report = sampler.update_params(layout)
    assert report.copied == [] and sampler.verify_sharing(layout).all_shared
    if case == "qwen3-4h":  # 2 KV heads over 4 devices: replicated h0,h0,h1,h1
        assert expected["model.layers.0.self_attn.k_proj.weight"].shape == (384, 4 * 128)
    experts = [x.sharding for p, x in sampler.engine_params().items() if p.endswith(".wi_0")]
    for sharding in experts:  # the MoE mesh: ep groups of tp // ep devices (Gemma 4 ignores ep_size)
        assert dict(sharding.mesh.shape) == {"expert": ep, "tensor": tp // ep}


def test_load_checkpoint_single_and_sharded(model_dir, engines, tp_reference, tmp_path):
    path = model_dir("qwen3-tp")
    expected = tp_reference(path, 2).leaves
    sampler = engines.get(path, tp_size=2)
    sharded = tmp_path / "sharded"
    shutil.copytree(path, sharded)
    write_weights(sharded, helpers.hf_tensors(path), max_shard_bytes=300_000)
    assert len(list(sharded.glob("*.safetensors"))) > 2
    for ckpt in (path, sharded):
        sampler.update_params({k: jnp.zeros_like(v) for k, v in expected.items()})
        report = sampler.load_checkpoint(str(ckpt), track_peak_memory=True)
        assert report.source_format == "hf" and len(report.copied) == len(expected)
        helpers.assert_same_bits(_served(sampler), expected)
        assert report.peak_extra_bytes <= report.largest_copied_leaf_bytes


def test_bad_checkpoints_are_refused_and_weights_kept(model_dir, engines, tmp_path):
    path = model_dir("qwen3-tp")
    sampler = engines.get(path, tp_size=2)
    sampler.load_checkpoint(str(path))
    fp = sampler.fingerprint()
    with pytest.raises(CheckpointError, match="does not exist"):
        sampler.load_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(ParamsMismatchError, match="is a Qwen2ForCausalLM, but this engine serves Qwen3ForCausalLM"):
        sampler.load_checkpoint(str(model_dir("qwen2.5-tp")))  # another architecture (from config.json)
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    write_weights(no_config, helpers.hf_tensors(model_dir("qwen2.5-tp")))
    with pytest.raises(ParamsMismatchError, match="no attention biases"):
        sampler.load_checkpoint(str(no_config))  # the same, judged from the tensors alone
    missing = tmp_path / "missing"
    shutil.copytree(path, missing)
    hf = helpers.hf_tensors(path)
    del hf["model.layers.1.mlp.up_proj.weight"]
    write_weights(missing, hf)
    with pytest.raises(
        ParamsMismatchError, match="missing parameter for engine leaf model.layers.1.mlp.up_proj.weight"
    ):
        sampler.load_checkpoint(str(missing))
    assert sampler.fingerprint() == fp
    assert all(len(t) for t in helpers.greedy(sampler, steps=2)[0])


def test_fsdp_trainer_into_tp_engine(model_dir, engines, tp_reference):
    """Tunix model FSDP-sharded over the same 4 devices as a tp=4 engine: resharded leaf
    by leaf; engine-layout params on an equivalent trainer mesh are aliased."""
    path = model_dir("qwen3-4h")
    expected = tp_reference(path, 4).leaves
    sampler = engines.get(path, tp_size=4)
    mesh = jax.make_mesh((4, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with mesh:
        model = load_tunix_model(path, mesh=mesh)  # fp32 master params, FSDP-sharded
    state = nnx.state(model, nnx.Param)
    assert len(jax.tree_util.tree_leaves(state)[0].sharding.device_set) == 4
    report = sampler.update_params(state, track_peak_memory=True)
    helpers.assert_same_bits(_served(sampler), expected)
    assert not report.aliased and len(report.copied) == len(expected)  # fp32 -> bf16 everywhere
    assert report.peak_extra_bytes <= report.largest_copied_leaf_bytes
    sharing = sampler.verify_sharing(state)
    assert "cast float32->bfloat16" in sharing.copies["model.layers.0.self_attn.q_proj.weight"]

    # bf16 trainer params in engine layout on the trainer's own mesh (other axis names)
    trainer_mesh = jax.make_mesh((1, 4), ("dp", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rename = {"data": "dp", "tensor": "model"}
    layout = {}
    for k, v in expected.items():
        spec = sampler.engine_shardings()[k].spec
        trainer_spec = P(*(rename.get(a, a) if a else None for a in spec))
        layout[k] = jax.device_put(jnp.asarray(v), jax.sharding.NamedSharding(trainer_mesh, trainer_spec))
    report = sampler.update_params(layout)
    assert report.copied == [], report.copied
    sharing = sampler.verify_sharing(layout)
    assert sharing.all_shared
    # replicated or differently split trainer params are resharded, and say so
    replicated = {k: jax.device_put(v, jax.sharding.NamedSharding(trainer_mesh, P())) for k, v in layout.items()}
    report = sampler.update_params(replicated)
    sharing = sampler.verify_sharing(replicated)
    assert sharing.copies["model.embed_tokens.embedding"] == "copied: reshard"
    assert "model.norm.scale" in sharing.shared  # replicated on both sides
    helpers.assert_same_bits(_served(sampler), expected)


def test_disaggregated_engine_on_other_devices(model_dir, engines, tp_reference):
    path = model_dir("qwen3-tp")
    expected = tp_reference(path, 2).leaves
    sampler = engines.get(path, tp_size=2, device_indexes=[2, 3])
    mesh = jax.make_mesh(
        (2, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=jax.devices()[:2]
    )
    with mesh:
        state = nnx.state(load_tunix_model(path, mesh=mesh, dtype=jnp.bfloat16), nnx.Param)
    report = sampler.update_params(state)
    assert not report.aliased  # other devices: everything moves
    helpers.assert_same_bits(_served(sampler), expected)
    engine_devices = {d.id for x in sampler.engine_params().values() for d in x.sharding.device_set}
    assert engine_devices == {2, 3}
    trainer_ptrs = {p for x in jax.tree_util.tree_leaves(state) for p in buffer_pointers(x)}
    assert not trainer_ptrs & {p for x in sampler.engine_params().values() for p in buffer_pointers(x)}
    assert all(len(t) for t in helpers.greedy(sampler, steps=2)[0])
