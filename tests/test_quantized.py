"""Pushes into quantized engines (int8, fp8): every served leaf equals, bit for bit, what
sglang-jax's own quantize-at-load holds for the same checkpoint (the oracle: the engine's state
right after it loaded checkpoint A with the quantization config), from every source format;
the report, sharing check, fingerprint and checkpoint reload say and do the same."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import converters
from converters import ParamsMismatchError
from converters.quantization import QUANTIZED_LAYOUTS, Quantization
from sampler import SamplerConfig
from sampler.errors import UnsupportedModelError
from sampler.tiny import write_weights
from sampler.tunix.models import load_tunix_model
from tests import helpers

pytestmark = pytest.mark.engine

#: (case, sglang-jax quantization config): dense int8 weight-only, MoE fp8 weights and activations.
ENGINES = [("qwen3-varied", "int8"), ("qwen3-moe", "fp8_w8a8")]
#: source -> the converters' format name it is in
FORMATS = {"tunix": "tunix", "hf": "hf", "flax": "flax", "engine": "sglang", "tunix-float32": "tunix"}
PROMPT_IDS = [[5, 17, 42, 99, 7]]
STEPS = 8


def _greedy_ids(sampler) -> list[int]:
    out = sampler.generate_ids(PROMPT_IDS, {"max_new_tokens": STEPS, "temperature": 0.0, "ignore_eos": True})
    return list(out[0]["output_ids"])


def _write(tmp_path_factory, case: str, seed: int) -> Path:
    path = tmp_path_factory.mktemp(f"{case}-s{seed}")
    if case != "qwen3-varied":
        return helpers.write_case(path, case, seed=seed)
    # greedy text that changes with the weights, stored in float32 as a trainer holds them
    # (values bf16 cannot hold: the engine, and a push, cast them to bf16 before quantizing)
    helpers.write_varied_case(path, seed=seed, tie_word_embeddings=False)
    rng = np.random.default_rng(seed)
    weights = {
        k: (v.astype(np.float32) * (1 + 0.004 * rng.standard_normal(v.shape))).astype(np.float32)
        for k, v in helpers.hf_tensors(path).items()
    }
    for f in path.glob("*.safetensors"):
        f.unlink()
    write_weights(path, weights)
    return path


@pytest.fixture(scope="module", params=ENGINES, ids=lambda p: f"{p[0]}-{p[1]}")
def quantized(request, tmp_path_factory):
    """An engine that loaded checkpoint A with the quantization (its state then: the oracle),
    and the trainer states of A and of another checkpoint B."""
    case, quantization = request.param
    path_a, path_b = (_write(tmp_path_factory, case, seed) for seed in (0, 1))
    from sampler import SglangJaxSampler

    sampler = SglangJaxSampler(
        config=SamplerConfig(
            model_path=str(path_a),
            load_format="safetensors",
            quantization=quantization,
            context_length=128,
            max_running_requests=4,
        )
    )
    oracle = {p: np.array(x, copy=True) for p, x in sampler.engine_params().items()}  # copies: pushes donate
    tokens = _greedy_ids(sampler)
    states = {name: nnx.state(load_tunix_model(p), nnx.Param) for name, p in (("a", path_a), ("b", path_b))}
    yield dict(
        sampler=sampler, oracle=oracle, tokens=tokens, path_a=path_a, states=states, fingerprint=sampler.fingerprint()
    )
    sampler.shutdown()


def _source(q, fmt: str):
    if fmt == "tunix":
        return q["states"]["a"]
    if fmt == "tunix-float32":  # a float32 trainer: cast to the engine dtype, then quantized
        return jax.tree.map(lambda x: x.astype(jnp.float32), q["states"]["a"])
    hf = helpers.hf_tensors(q["path_a"])
    if fmt == "hf":
        return hf
    if fmt == "flax":
        return helpers.flax_params(hf)
    # an unquantized engine's layout (bf16), as a trainer keeping the engine layout holds it
    return converters.to_engine_layout(q["states"]["a"], q["sampler"].spec)


def _served(sampler) -> dict[str, np.ndarray]:
    return {p: np.asarray(x) for p, x in sampler.engine_params().items()}


def _quantized_paths(sampler) -> set[str]:
    names = {lay.values for lay in QUANTIZED_LAYOUTS} | {lay.scale for lay in QUANTIZED_LAYOUTS}
    return {p for p, x in sampler.engine_params().items() if p.rpartition(".")[2] in names and x.dtype != jnp.bfloat16}


@pytest.mark.parametrize("fmt", FORMATS)
def test_push_equals_sglang_jax_quantize_at_load(quantized, fmt):
    q, sampler = quantized, quantized["sampler"]
    sampler.update_params(q["states"]["b"])
    if FORMATS[fmt] not in converters.formats_for(
        sampler.spec.architecture
    ):  # no table for it: refused, nothing changes
        before = sampler.fingerprint()
        with pytest.raises(ParamsMismatchError, match="unknown parameter"):
            sampler.update_params(_source(q, fmt))
        assert sampler.fingerprint() == before
        return
    assert _greedy_ids(sampler) != q["tokens"] or "Moe" in sampler.spec.architecture
    report = sampler.update_params(_source(q, fmt))
    helpers.assert_same_bits(_served(sampler), q["oracle"])
    assert _greedy_ids(sampler) == q["tokens"]
    # quantized leaves are converted (values and scales written in place), never aliased
    qpaths = _quantized_paths(sampler)
    assert qpaths and qpaths <= set(report.copied) and not qpaths & set(report.aliased)
    assert {report.paths[p] for p in qpaths} == {"quantize in place"}


def test_engine_reports_its_quantization(quantized):
    sampler = quantized["sampler"]
    dtype = "int8" if sampler.config.quantization == "int8" else "float8_e4m3fn"
    moe = dtype if "Moe" in sampler.spec.architecture else None
    assert sampler.quantization == Quantization(linear=dtype, moe=moe)
    assert len(_quantized_paths(sampler)) == sum(
        1 for p in quantized["oracle"] if p.endswith(("weight_q", "weight_scale", "wi_0", "wi_1", "wo", "_scale"))
    )


def test_fingerprint_of_a_quantized_engine(quantized):
    q, sampler = quantized, quantized["sampler"]
    sampler.update_params(q["states"]["a"])
    served = sampler.fingerprint()
    assert served == q["fingerprint"]
    state = q["states"]["a"]
    assert converters.fingerprint_params(state, sampler.spec, quantization=sampler.quantization) == served
    # the SamplerConfig name works as well (sglang-jax's config of that name quantizes every layer)
    assert converters.fingerprint_params(state, sampler.spec, quantization=sampler.config.quantization) == served
    assert converters.fingerprint_params(state, sampler.spec) != served  # the unquantized model differs
    # the checkpoint's own tensors (float32 for the dense case): cast, then quantized, in one program
    hf = helpers.hf_tensors(q["path_a"])
    for fmt in ("hf", "flax"):  # transposed, and as they are: XLA may skip a fused cast's rounding
        if FORMATS[fmt] in converters.formats_for(sampler.spec.architecture):
            tree = hf if fmt == "hf" else helpers.flax_params(hf)
            assert converters.fingerprint_params(tree, sampler.spec, quantization=sampler.quantization) == served


def test_verify_sharing_says_quantized_leaves_are_converted(quantized):
    q, sampler = quantized, quantized["sampler"]
    sampler.update_params(q["states"]["a"])
    sharing = sampler.verify_sharing(q["states"]["a"])
    qpaths = _quantized_paths(sampler)
    assert not qpaths & set(sharing.shared)
    for path in qpaths:
        assert sharing.copies[path].startswith("quantized:") and "quantize" in sharing.copies[path], path


def test_checkpoint_reload_into_a_quantized_engine(quantized):
    q, sampler = quantized, quantized["sampler"]
    sampler.update_params(q["states"]["b"])
    sampler.load_checkpoint(q["path_a"])
    helpers.assert_same_bits(_served(sampler), q["oracle"])


def test_quantized_push_memory_stays_within_one_leaf(quantized):
    q, sampler = quantized, quantized["sampler"]
    sampler.update_params(q["states"]["b"])
    report = sampler.update_params(q["states"]["a"], track_peak_memory=True)
    assert report.peak_extra_bytes is not None
    assert report.peak_extra_bytes <= report.largest_copied_leaf_bytes


def test_a_bad_tree_changes_nothing_in_a_quantized_engine(quantized):
    q, sampler = quantized, quantized["sampler"]
    sampler.update_params(q["states"]["a"])
    before = sampler.fingerprint()
    hf = helpers.hf_tensors(q["path_a"])
    missing = "model.layers.1.self_attn.q_proj.weight"
    del hf[missing]
    with pytest.raises(ParamsMismatchError) as err:
        sampler.update_params(hf)
    assert "model.layers.1.self_attn.q_proj.weight" in str(err.value) and "served quantized" in str(err.value)
    assert sampler.fingerprint() == before


# ------------------------------------------------------------------------------ no engine
@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("source_dtype", [jnp.float32, jnp.bfloat16])
def test_quantize_equals_upstream_quantize_tensor(dtype, source_dtype):
    """The same values and scales as sglang-jax's ``quantize_tensor`` on the engine-dtype leaf,
    for linear (transposed, per output channel) and expert stacks, zero rows included."""
    from sgl_jax.srt.utils.quantization.quantization_utils import quantize_tensor

    rng = np.random.default_rng(0)
    linear, moe = QUANTIZED_LAYOUTS[0], QUANTIZED_LAYOUTS[1]
    x2 = rng.standard_normal((48, 40)).astype(np.float32) * 0.05
    x2[:, 3] = 0.0  # an all-zero output channel: scale 0, values 0
    x3 = rng.standard_normal((4, 40, 24)).astype(np.float32) * 3.0
    for layout, x in ((linear, x2), (moe, x3)):
        leaf = Quantization.uniform(dtype).leaf(f"m.{layout.weight}", x.shape)
        values, scale = jax.jit(converters.quantize, static_argnums=(1, 2))(
            jnp.asarray(x, source_dtype), leaf, jnp.bfloat16
        )
        engine = jnp.asarray(x, source_dtype).astype(jnp.bfloat16)
        want_values, want_scale = quantize_tensor(
            converters.quantization.QUANTIZED_DTYPES[dtype], engine.T if layout.transpose else engine, axis=layout.axis
        )
        helpers.assert_same_bits(
            {"v": values, "s": scale}, {"v": want_values, "s": want_scale.reshape(leaf.scale_shape)}
        )


def test_quantization_config_is_checked():
    with pytest.raises(ValueError, match="SamplerConfig.quantization='int4'"):
        SamplerConfig(model_path="m", quantization="int4")
    with pytest.raises(ValueError, match="disagree"):
        SamplerConfig(model_path="m", quantization="int8", engine_kwargs={"quantization_config_path": "fp8.yaml"})
    assert SamplerConfig(model_path="m", quantization="fp8_w8a8").quantization_config_path == "fp8_w8a8.yaml"
    assert (
        SamplerConfig(model_path="m", engine_kwargs={"quantization_config_path": "a.yaml"}).quantization_config_path
        == "a.yaml"
    )
    assert SamplerConfig(model_path="m").quantization_config_path is None


def test_lora_on_a_quantized_base_is_refused_before_the_engine_starts(model_dir):
    from sampler import SglangJaxSampler

    config = SamplerConfig(
        model_path=str(model_dir("qwen3-tied")),
        quantization="int8",
        engine_kwargs=dict(enable_static_lora=True, lora_target_modules=["q_proj"], max_lora_rank=4, lora_scaling=1.0),
    )
    with pytest.raises(UnsupportedModelError, match="LoRA adapters on a quantized base are not supported"):
        SglangJaxSampler(config=config)


def test_quantized_gemma2_is_refused_before_the_engine_starts(model_dir):
    from sampler import SglangJaxSampler

    with pytest.raises(UnsupportedModelError, match="cannot generate with it"):
        SglangJaxSampler(config=SamplerConfig(model_path=str(model_dir("gemma2")), quantization="int8"))


#: (case, quantization, tp_size): the other architectures sglang-jax quantizes, and tensor parallelism.
MORE_ENGINES = [
    ("llama-untied", "fp8", 1),
    ("qwen2.5", "int8", 1),
    ("gemma4-moe", "int8", 1),
    ("qwen3-moe-tp", "fp8", 2),  # experts and attention over 2 devices; the trainer on one
]


@pytest.mark.parametrize("case,quantization,tp", MORE_ENGINES, ids=lambda v: str(v))
def test_every_quantized_architecture_and_layout(case, quantization, tp, tmp_path):
    """A Tunix trainer's push and a checkpoint reload equal the engine's own quantize-at-load."""
    from sampler import SglangJaxSampler

    path_a, path_b = (helpers.write_case(tmp_path / f"s{seed}", case, seed=seed) for seed in (0, 1))
    sampler = SglangJaxSampler(
        config=SamplerConfig(
            model_path=str(path_a),
            load_format="safetensors",
            quantization=quantization,
            tp_size=tp,
            context_length=128,
            max_running_requests=2,
        )
    )
    try:
        oracle = {p: np.array(x, copy=True) for p, x in sampler.engine_params().items()}
        assert _quantized_paths(sampler)
        state_a, state_b = (nnx.state(load_tunix_model(p), nnx.Param) for p in (path_a, path_b))
        sampler.update_params(state_b)
        sampler.update_params(state_a)
        helpers.assert_same_bits(_served(sampler), oracle)
        sampler.update_params(state_b)
        sampler.load_checkpoint(path_a)
        helpers.assert_same_bits(_served(sampler), oracle)
        assert len(_greedy_ids(sampler)) == STEPS
    finally:
        sampler.shutdown()


def test_tunix_rollout_with_a_quantized_engine(model_dir):
    """SglangJaxRollout(quantization=...): the first sync from the actor is quantized as the
    engine's own load would be, and its generations carry the engine's logprobs."""
    from tunix.rl.rollout import base_rollout

    from sampler import SglangJaxRollout

    path = model_dir("qwen3-tied")
    actor = load_tunix_model(path)
    config = base_rollout.RolloutConfig(
        max_tokens_to_generate=4,
        max_prompt_length=16,
        temperature=1.0,
        rollout_sglang_jax_model_version=str(path),
        rollout_sglang_jax_context_length=64,
        rollout_sglang_jax_max_running_requests=2,
    )
    rollout = SglangJaxRollout(rollout_actor=actor, mesh=None, rollout_config=config, quantization="fp8")
    try:
        sampler = rollout.sampler
        assert sampler.quantization == Quantization(linear="float8_e4m3fn")
        assert set(_quantized_paths(sampler)) <= set(rollout.last_report.copied)
        state = nnx.state(actor, nnx.Param)
        assert sampler.fingerprint() == converters.fingerprint_params(state, sampler.spec, quantization="fp8")
        out = rollout.generate(helpers.PROMPTS[:2], config)
        assert [len(t) for t in out.tokens] == [len(lp) for lp in out.logprobs]
    finally:
        rollout.shutdown()
    with pytest.raises(ValueError, match="SamplerConfig.quantization='int4'"):
        SglangJaxRollout(rollout_actor=None, mesh=None, rollout_config=config, quantization="int4")


@pytest.mark.parametrize(
    "config_file, error, match",
    [
        ("/nonexistent/quant.yaml", ValueError, "cannot be used: FileNotFoundError"),
        ("bad", ValueError, "quantization_config_path=.*cannot be used"),
        ("int8_block_128_dynamic.yaml", UnsupportedModelError, "block-wise quantization"),
    ],
)
def test_an_unusable_quantization_config_is_refused_and_the_process_lives(
    model_dir, tmp_path, config_file, error, match
):
    """Upstream reads the file in its scheduler thread, where a missing or malformed one ends
    the process: refused before the engine starts, naming the field."""
    from sampler import SglangJaxSampler

    if config_file == "bad":
        config_file = str(tmp_path / "bad.yaml")
        Path(config_file).write_text("quantization: [this is: not, a config\n")
    with pytest.raises(error, match=match):
        SglangJaxSampler(config=SamplerConfig(model_path=str(model_dir("qwen3-tied")), quantization=config_file))
