"""Converter unit tests, no engine: every architecture x format against sglang-jax's own
weight-mapping table applied to the same HF tensors, plus detection and validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import converters
from converters import (
    EngineLeaf,
    ModelSpec,
    ParamsMismatchError,
    Take,
    Transpose,
    UnknownFormatError,
    build_plan,
    get_converter,
)
from sampler.tunix.models import load_tunix_model
from tests import helpers

ALL_CASES = sorted(helpers.CASES)
#: Source formats built from the HF tensors (below); "tunix" comes from Tunix's own loader.
HF_FORMATS = ["hf", "hf-text", "flax", "flax-linen", "flax-trainstate"]


def _formats(case: str) -> list[str]:
    """The HF-derived formats the case's architecture has a table for."""
    have = converters.formats_for(helpers.CASES[case][0])
    return [f for f in HF_FORMATS if (f if f.startswith("hf") else "flax") in have]


def _hf_text(hf: dict) -> dict:
    """Gemma 4's text-only checkpoint names (``model.`` instead of ``model.language_model.``)."""
    return {k.replace("model.language_model.", "model.", 1): v for k, v in hf.items()}


@pytest.fixture(scope="module")
def case_data(model_dir):
    cache = {}

    def get(case):
        if case not in cache:
            path = model_dir(case)
            spec = ModelSpec.from_hf_config(path)
            state = nnx.state(load_tunix_model(path, dtype=jnp.float32), nnx.Param)
            cache[case] = (path, spec, state, helpers.upstream_engine_leaves(path))
        return cache[case]

    return get


def _abstract_engine(oracle: dict) -> list[EngineLeaf]:
    return [EngineLeaf(p, a.shape, jnp.dtype(a.dtype)) for p, a in sorted(oracle.items())]


@pytest.mark.parametrize("case", ALL_CASES)
def test_tunix_format_matches_upstream_loader_table(case, case_data):
    path, spec, state, oracle = case_data(case)
    assert converters.detect_format(spec.architecture, converters.key_paths(state)) == "tunix"
    converted = converters.to_engine_layout(state, spec)
    helpers.assert_same_bits({k: np.asarray(v) for k, v in converted.items()}, oracle)


@pytest.mark.parametrize("case", ALL_CASES)
def test_sglang_format_is_identity(case, case_data):
    path, spec, _, oracle = case_data(case)
    engine_layout = {k: jnp.asarray(v) for k, v in oracle.items()}
    assert converters.detect_format(spec.architecture, list(engine_layout)) == "sglang"
    converted = converters.to_engine_layout(engine_layout, spec)
    helpers.assert_same_bits({k: np.asarray(v) for k, v in converted.items()}, oracle)


@pytest.mark.parametrize("case,fmt", [(c, f) for c in ALL_CASES for f in _formats(c)])
def test_hf_and_flax_formats_match_upstream_loader_table(case, fmt, case_data):
    path, spec, _, oracle = case_data(case)
    hf = helpers.hf_tensors(path)
    if fmt == "hf":
        source = hf
    elif fmt == "hf-text":
        source = _hf_text(hf)
    elif fmt == "flax":
        source = helpers.flax_params(hf)
    elif fmt == "flax-linen":
        source = helpers.flax_params(hf, linen_layers=True, wrap=False)
    else:
        import optax
        from flax.training import train_state

        source = train_state.TrainState.create(
            apply_fn=None, params=helpers.flax_params(hf)["params"], tx=optax.adam(1e-3)
        )
    tree = converters.as_param_tree(source)
    detected = converters.detect_format(spec.architecture, converters.key_paths(tree))
    assert detected == (fmt if fmt == "hf-text" else fmt.split("-")[0])
    converted = converters.to_engine_layout(source, spec)
    helpers.assert_same_bits({k: np.asarray(v) for k, v in converted.items()}, oracle)


@pytest.mark.parametrize(
    "case,layer",
    [
        ("llama-untied", 0),
        ("qwen2.5", 0),
        ("qwen3-tied", 0),
        ("qwen3-moe", 0),
        ("gemma2", 0),
        ("gemma2-mha", 0),
        ("gemma4-keqv", 1),
    ],
)
@pytest.mark.parametrize("tp", [2, 4])
def test_kv_head_replication_matches_upstream(case, layer, tp, case_data):
    """tp > num_kv_heads: the engine replicates KV heads (and their biases); MHA zero-pads;
    Gemma 4 only in its k_eq_v full layers (layer 1), not in sliding ones (layer 0)."""
    path, spec, state, _ = case_data(case)
    oracle = helpers.upstream_engine_leaves(path, tp=tp)
    converted = converters.to_engine_layout(state, spec.with_tp(tp))
    helpers.assert_same_bits({k: np.asarray(v) for k, v in converted.items()}, oracle)
    from_hf = converters.to_engine_layout(helpers.hf_tensors(path), spec.with_tp(tp))
    helpers.assert_same_bits({k: np.asarray(v) for k, v in from_hf.items()}, oracle)
    k = converted[f"model.layers.{layer}.self_attn.k_proj.weight"]
    assert k.shape[1] == max(tp, spec.num_kv_heads) * spec.head_dim  # one head per device (at least)
    if spec.get("k_eq_v_layers"):
        assert converted["model.layers.0.self_attn.k_proj.weight"].shape[1] == spec.head_dim  # sliding: as is


def test_plan_marks_alias_and_copy_reasons(case_data):
    _, spec, state, oracle = case_data("qwen3-untied")
    engine = _abstract_engine(oracle)
    paths = converters.key_paths(state)
    sigs = [(x.shape, x.dtype, None) for x in jax.tree_util.tree_leaves(state)]
    plan = build_plan(get_converter(spec.architecture, "tunix"), spec, paths, sigs, engine)
    reasons = {e.engine_path: e.reasons for e in plan.entries}
    assert reasons["model.layers.0.self_attn.q_proj.weight"] == ("reshape", "cast float32->bfloat16", "host array")
    assert reasons["lm_head.embedding"][0] == "transpose"
    assert reasons["model.layers.1.mlp.up_proj.weight"] == ("cast float32->bfloat16", "host array")
    # engine-layout bf16 arrays on the right device: nothing to do but alias
    sigs = [(a.shape, jnp.dtype(a.dtype), None) for _, a in sorted(oracle.items())]
    plan = build_plan(get_converter(spec.architecture, "sglang"), spec, sorted(oracle), sigs, engine)
    assert all(e.reasons == ("host array",) for e in plan.entries)
    assert len(plan.entries) == len(engine)


def _plan_problems(spec, conv, source: dict, engine, **kw):
    sigs = [(np.shape(v), np.asarray(v).dtype, None) for v in source.values()]
    with pytest.raises(ParamsMismatchError) as err:
        build_plan(conv, spec, list(source), sigs, engine, **kw)
    return str(err.value)


def test_validation_names_every_problem(case_data):
    _, spec, _, oracle = case_data("qwen3-tied")
    engine = _abstract_engine(oracle)
    conv = get_converter(spec.architecture, "sglang")
    good = dict(sorted(oracle.items()))

    bad = dict(good)
    del bad["model.layers.1.mlp.up_proj.weight"]
    msg = _plan_problems(spec, conv, bad, engine)
    assert "missing parameter for engine leaf model.layers.1.mlp.up_proj.weight (128, 256)" in msg

    bad = dict(good, **{"model.layers.0.mlp.extra.weight": good["model.norm.scale"]})
    assert "unknown parameter model.layers.0.mlp.extra.weight (128,)" in _plan_problems(spec, conv, bad, engine)

    bad = dict(good, **{"model.layers.0.self_attn.q_proj.weight": np.zeros((128, 255), np.float32)})
    msg = _plan_problems(spec, conv, bad, engine)
    assert "shape mismatch: parameter model.layers.0.self_attn.q_proj.weight (128, 255)" in msg
    assert "(128, 256)" in msg

    bad = dict(good, **{"model.norm.scale": np.zeros((128,), np.int32)})
    assert "model.norm.scale (128,) has dtype int32" in _plan_problems(spec, conv, bad, engine)

    bad = dict(good, **{"lm_head.embedding": good["model.embed_tokens.embedding"]})
    assert "ties lm_head" in _plan_problems(spec, conv, bad, engine)

    # strict=False accepts a subset and lists what stays as it is
    subset = {k: v for k, v in good.items() if "layers.0." in k}
    sigs = [(v.shape, v.dtype, None) for v in subset.values()]
    plan = build_plan(conv, spec, list(subset), sigs, engine, strict=False)
    assert "model.norm.scale" in plan.missing and len(plan.entries) == len(subset)


def test_another_architecture_is_refused_with_paths(case_data):
    _, _, qwen2_state, _ = case_data("qwen2.5")
    _, spec, _, oracle = case_data("qwen3-tied")
    paths = converters.key_paths(qwen2_state)
    sigs = [(x.shape, x.dtype, None) for x in jax.tree_util.tree_leaves(qwen2_state)]
    with pytest.raises(ParamsMismatchError) as err:
        build_plan(get_converter(spec.architecture, "tunix"), spec, paths, sigs, _abstract_engine(oracle))
    msg = str(err.value)
    assert "layers.0.attn.q_bias" in msg and "no attention biases" in msg
    assert "missing parameter for engine leaf model.layers.0.self_attn.q_norm.scale" in msg


def test_format_detection_errors():
    with pytest.raises(UnknownFormatError, match="cannot tell the format"):
        converters.detect_format("Qwen3ForCausalLM", ["encoder.block.0.weight", "decoder.w"])
    with pytest.raises(UnknownFormatError, match="empty"):
        converters.detect_format("Qwen3ForCausalLM", [])
    with pytest.raises(UnknownFormatError, match="no converter is registered"):
        converters.detect_format("GPT2LMHeadModel", ["wte.weight"])
    # a user table that claims the same keys as "tunix" makes a tree ambiguous
    converters.register_converter("Qwen3ForCausalLM", "tunix-copy", get_converter("Qwen3ForCausalLM", "tunix").rules)
    try:
        with pytest.raises(UnknownFormatError, match="ambiguous"):
            converters.detect_format("Qwen3ForCausalLM", ["embedder.input_embedding", "final_norm.w"])
    finally:
        from converters import registry

        registry._REGISTRY.pop(("Qwen3ForCausalLM", "tunix-copy"))


def test_register_converter_for_a_new_layout(case_data):
    """A user format in a few lines: Tunix's layout with attention blocks named "attention"."""
    from converters import LeafRule

    _, spec, state, oracle = case_data("qwen3-tied")
    rules = [
        LeafRule(r.source.replace(".attn.", ".attention."), r.target, r.ops)
        for r in get_converter(spec.architecture, "tunix").rules
    ]
    converters.register_converter(spec.architecture, "my-layout", rules)
    try:
        leaves = jax.tree_util.tree_leaves(state)
        renamed = {p.replace(".attn.", ".attention."): x for p, x in zip(converters.key_paths(state), leaves)}
        assert converters.detect_format(spec.architecture, list(renamed)) == "my-layout"
        converted = converters.to_engine_layout(renamed, spec)
        helpers.assert_same_bits({k: np.asarray(v) for k, v in converted.items()}, oracle)
    finally:
        from converters import registry

        registry._REGISTRY.pop((spec.architecture, "my-layout"))


def test_fingerprint_is_content_and_sharding_based():
    mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    a = jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8).astype(jnp.bfloat16)
    sharded = jax.device_put(a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", None)))
    assert converters.fingerprint({"w": a}) == converters.fingerprint({"w": sharded})
    flipped = a.at[3, 5].set(a[3, 5] + 1)
    assert converters.fingerprint({"w": a}) != converters.fingerprint({"w": flipped})
    swapped = a.at[0, 0].set(a[1, 0]).at[1, 0].set(a[0, 0])
    assert converters.fingerprint({"w": a}) != converters.fingerprint({"w": swapped})
    assert converters.fingerprint({"w": a}) != converters.fingerprint({"v": a})
    assert converters.fingerprint({"w": a}) != converters.fingerprint({"w": a.astype(jnp.float32)})


# ---------------------------------------------------------------------------- N -> 1 and 1 -> N rules
def _toy_spec(**kw):
    return ModelSpec(
        architecture="Toy", num_layers=2, hidden_size=4, intermediate_size=6, vocab_size=8, num_heads=2,
        num_kv_heads=2, head_dim=3, tie_word_embeddings=True, **kw,
    )  # fmt: skip


def _toy_converter():
    from converters import LeafRule, MergeAxes, Take, Transpose
    from converters.registry import Converter

    return Converter(
        "Toy",
        "toy",
        [
            # N -> 1: per-expert (I, H) matrices stacked into (E, H, I); the expert number is not a layer
            LeafRule(
                "blocks.{}.experts.{*}.up.w", "model.layers.{}.mlp.wi_1", (Transpose((0, 2, 1)),), stack="num_experts"
            ),
            # 1 -> N: a fused (2, D, K, H) leaf split into k and v (D, K*H)
            LeafRule("blocks.{}.kv", "model.layers.{}.k_proj.weight", (Take(0, 0), MergeAxes(1, 3))),
            LeafRule("blocks.{}.kv", "model.layers.{}.v_proj.weight", (Take(0, 1), MergeAxes(1, 3))),
        ],
    )


def _toy_source(experts=3, layers=2):
    rng = np.random.default_rng(0)
    src = {}
    for layer in range(layers):
        for e in range(experts):
            src[f"blocks.{layer}.experts.{e}.up.w"] = rng.standard_normal((6, 4)).astype(np.float32)
        src[f"blocks.{layer}.kv"] = rng.standard_normal((2, 4, 2, 3)).astype(np.float32)
    return src


def test_stacked_and_split_rules_convert_like_numpy():
    from converters.plan import convert_params

    spec, conv, src = _toy_spec(num_experts=3), _toy_converter(), _toy_source()
    got = convert_params(conv, spec, list(src), [jnp.asarray(v) for v in src.values()], jnp.float32)
    assert sorted(got) == sorted(
        f"model.layers.{i}.{leaf}" for i in range(2) for leaf in ("mlp.wi_1", "k_proj.weight", "v_proj.weight")
    )
    for layer in range(2):
        experts = np.stack([src[f"blocks.{layer}.experts.{e}.up.w"].T for e in range(3)])
        np.testing.assert_array_equal(np.asarray(got[f"model.layers.{layer}.mlp.wi_1"]), experts)
        kv = src[f"blocks.{layer}.kv"]
        np.testing.assert_array_equal(np.asarray(got[f"model.layers.{layer}.k_proj.weight"]), kv[0].reshape(4, 6))
        np.testing.assert_array_equal(np.asarray(got[f"model.layers.{layer}.v_proj.weight"]), kv[1].reshape(4, 6))


def test_stacked_and_split_rules_in_a_plan():
    spec, conv, src = _toy_spec(num_experts=3), _toy_converter(), _toy_source()
    engine = [EngineLeaf(f"model.layers.{i}.mlp.wi_1", (3, 4, 6), jnp.float32) for i in range(2)]
    engine += [
        EngineLeaf(f"model.layers.{i}.{p}.weight", (4, 6), jnp.float32) for i in range(2) for p in ("k_proj", "v_proj")
    ]
    sigs = [(v.shape, v.dtype, None) for v in src.values()]
    plan = build_plan(conv, spec, list(src), sigs, engine)
    by_path = {e.engine_path: e for e in plan.entries}
    stacked = by_path["model.layers.1.mlp.wi_1"]
    assert stacked.stacked and stacked.reasons[0] == "stack"
    assert stacked.source_path == "blocks.1.experts.{*}.up.w"
    assert [list(src)[i] for i in stacked.source_indexes] == [f"blocks.1.experts.{e}.up.w" for e in range(3)]
    k, v = by_path["model.layers.0.k_proj.weight"], by_path["model.layers.0.v_proj.weight"]
    assert k.source_indexes == v.source_indexes and "slice" in k.reasons  # one source, two engine leaves

    # a missing expert is named, with the stack's pattern and the indexes it got
    partial = {k: v for k, v in src.items() if k != "blocks.0.experts.2.up.w"}
    msg = _plan_problems(spec, conv, partial, engine)
    assert "engine leaf model.layers.0.mlp.wi_1 stacks 3 (num_experts) sources blocks.0.experts.{*}.up.w" in msg
    assert "got indexes 0..1, missing 2" in msg
    # an expert of a differently shaped source
    odd = dict(src, **{"blocks.1.experts.1.up.w": np.zeros((5, 4), np.float32)})
    assert "differ in shape" in _plan_problems(spec, conv, odd, engine)
    # and a stack of more experts than the model has
    more = {**src, "blocks.0.experts.3.up.w": src["blocks.0.experts.0.up.w"]}
    assert "got indexes 0..3" in _plan_problems(spec, conv, more, engine)


def test_split_axis_and_fixed_dtype_rules():
    """HF Gemma 4's fused experts (E, 2*I, H): SplitAxis + Take + Transpose give gate and up
    (E, H, I); a rule's fixed dtype (float32 routers) wins over the model dtype."""
    from converters import LeafRule, SplitAxis, Take, Transpose
    from converters.plan import convert_params
    from converters.registry import Converter

    ops = (SplitAxis(1, 2), Take(1, 0), Transpose((0, 2, 1)))
    conv = Converter(
        "Toy",
        "toy",
        [
            LeafRule("l.{}.gate_up", "model.layers.{}.wi_0", ops),
            LeafRule("l.{}.gate_up", "model.layers.{}.wi_1", (SplitAxis(1, 2), Take(1, 1), Transpose((0, 2, 1)))),
            LeafRule("l.{}.router", "model.layers.{}.router", (Transpose((1, 0)),), dtype="float32"),
        ],
    )
    rng = np.random.default_rng(0)
    gate_up = rng.standard_normal((3, 2 * 5, 4)).astype(np.float32)
    router = rng.standard_normal((3, 4)).astype(np.float32)
    got = convert_params(conv, _toy_spec(), ["l.0.gate_up", "l.0.router"], [gate_up, router], jnp.bfloat16)
    gate, up = gate_up[:, :5], gate_up[:, 5:]
    np.testing.assert_array_equal(np.asarray(got["model.layers.0.wi_0"]), gate.transpose(0, 2, 1).astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(got["model.layers.0.wi_1"]), up.transpose(0, 2, 1).astype(jnp.bfloat16))
    assert got["model.layers.0.router"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got["model.layers.0.router"]), router.T)
    with pytest.raises(ValueError, match="into 2 equal parts"):
        SplitAxis(1, 2).out_shape((3, 9, 4), _toy_spec())


def test_layer_restricted_and_alternative_rules():
    """Rules for some layers only (Gemma 4's k_eq_v layers) and alternative source layouts of one
    engine leaf (Gemma 2's q_einsum or fused qkv_einsum)."""
    import dataclasses

    from converters import LeafRule, MergeAxes, Take
    from converters.plan import convert_params
    from converters.registry import Converter

    spec = dataclasses.replace(_toy_spec(), extra=(("even", (0, 2)), ("odd", (1, 3))))
    conv = Converter(
        "Toy",
        "toy",
        [
            LeafRule("l.{}.k", "model.layers.{}.k", layers="even"),
            LeafRule("l.{}.k", "model.layers.{}.k", (Transpose((1, 0)),), layers="odd"),
            LeafRule("l.{}.q", "model.layers.{}.q", (MergeAxes(0, 2),)),
            LeafRule("l.{}.qkv", "model.layers.{}.q", (Take(0, 0), MergeAxes(0, 2))),
        ],
    )
    k = np.arange(6, dtype=np.float32).reshape(2, 3)
    q = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    got = convert_params(conv, spec, ["l.0.k", "l.1.k", "l.0.q", "l.1.qkv"], [k, k, q, np.stack([q] * 3)], jnp.float32)
    np.testing.assert_array_equal(np.asarray(got["model.layers.0.k"]), k)
    np.testing.assert_array_equal(np.asarray(got["model.layers.1.k"]), k.T)
    np.testing.assert_array_equal(np.asarray(got["model.layers.0.q"]), q.reshape(4, 3))
    np.testing.assert_array_equal(np.asarray(got["model.layers.1.q"]), q.reshape(4, 3))
    # both layouts for one layer: named, not silently overwritten
    with pytest.raises(ParamsMismatchError, match="l.0.q and l.0.qkv both map to engine leaf model.layers.0.q"):
        convert_params(conv, spec, ["l.0.q", "l.0.qkv"], [q, np.stack([q] * 3)], jnp.float32)
    # a layer no restricted rule covers
    narrow = dataclasses.replace(spec, extra=(("even", (0,)), ("odd", (1,))))
    with pytest.raises(ParamsMismatchError, match="l.2.k .* has no rule for its layer"):
        convert_params(conv, narrow, ["l.2.k"], [k], jnp.float32)
    # the same source and target twice for overlapping layers is a table error
    with pytest.raises(ValueError, match="two rules feed model.layers.{}.k"):
        Converter(
            "Toy",
            "bad",
            [LeafRule("l.{}.k", "model.layers.{}.k"), LeafRule("l.{}.k", "model.layers.{}.k", layers="odd")],
        )


def test_stack_axis_check_for_streamed_checkpoint_stacks():
    """Checkpoint stacks are written one source at a time only when the ops act on each stack
    entry on its own (transposes behind the stack axis); anything else is stacked whole."""
    from converters import SplitAxis
    from converters.plan import _keeps_stack_axis

    spec = _toy_spec()
    assert _keeps_stack_axis((Transpose((0, 2, 1)),), (4, 6, 8), spec)
    assert _keeps_stack_axis((SplitAxis(1, 2), Take(1, 0)), (4, 6, 8), spec)
    assert not _keeps_stack_axis((Transpose((1, 0, 2)),), (4, 6, 8), spec)
    assert not _keeps_stack_axis((Take(0, 1),), (4, 6, 8), spec)
