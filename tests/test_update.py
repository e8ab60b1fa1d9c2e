"""update_params on a real engine: new weights take effect, zero-copy aliasing frees the
engine's old buffers, bad input changes nothing, and the Tunix sampler API."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import converters
from converters import DeletedArrayError, ParamsMismatchError
from sampler.sync.leaves import buffer_pointers, live_device_bytes
from sampler.tunix.models import load_tunix_model
from tests import helpers

pytestmark = pytest.mark.engine

CASE = "qwen3-tied"


@pytest.fixture(scope="module")
def setup(model_dir, engines):
    path_a, path_b = model_dir(CASE, seed=0), model_dir(CASE, seed=1)
    refs = {}
    for name, path in (("a", path_a), ("b", path_b)):
        ref = engines.get(path, load_format="safetensors")
        refs[name] = helpers.greedy(ref)[0]
        engines.drop(path, load_format="safetensors")
    state_a = nnx.state(load_tunix_model(path_a), nnx.Param)
    state_b = nnx.state(load_tunix_model(path_b), nnx.Param)
    sampler = engines.get(path_a, max_total_tokens=1024)
    return sampler, path_a, state_a, state_b, refs


def _engine_layout(sampler, state):
    """Trainer params kept in engine layout, bf16, on the engine's shardings."""
    shardings = sampler.engine_shardings()
    return {k: jax.device_put(v, shardings[k]) for k, v in converters.to_engine_layout(state, sampler.spec).items()}


def _one_prompt_at_a_time(sampler) -> int:
    """XLA compilations while each prompt runs on its own: one request per batch, so the shapes
    run do not depend on how the scheduler happened to group concurrent requests."""
    with helpers.counting_compiles() as compiles:
        for prompt in helpers.PROMPTS:
            helpers.greedy(sampler, [prompt])
    return len(compiles)


def test_generation_follows_new_weights(setup):
    sampler, _, state_a, state_b, refs = setup
    sampler.update_params(state_a)
    tokens_a, _ = helpers.greedy(sampler)
    assert tokens_a == refs["a"]
    report = sampler.update_params(state_b)
    tokens_b, _ = helpers.greedy(sampler)
    assert tokens_b == refs["b"] != tokens_a
    assert report.version == sampler.version and report.plan_reused
    sampler.update_params(state_a)
    assert helpers.greedy(sampler)[0] == refs["a"]


def test_engine_layout_source_is_aliased_and_old_buffers_freed(setup):
    sampler, _, state_a, state_b, refs = setup
    sampler.update_params(state_a)
    _one_prompt_at_a_time(sampler)  # compiles every shape the check below runs
    model_bytes = sum(x.nbytes for x in sampler.engine_params().values())
    source = _engine_layout(sampler, state_b)
    before = live_device_bytes()
    report = sampler.update_params(source)
    after = live_device_bytes()

    assert report.copied == [] and report.copied_bytes == 0
    assert len(report.aliased) == len(source) and report.aliased_bytes == model_bytes
    served = sampler.engine_params()
    for path, src in source.items():
        assert buffer_pointers(served[path]) == buffer_pointers(src), path
    sharing = sampler.verify_sharing(source)
    assert sharing.all_shared and len(sharing.shared) == len(source)
    # the engine's previous weights are gone: one model's worth of buffers freed
    assert before - after == model_bytes
    assert report.live_bytes_before is None  # not measured by default (SamplerConfig.track_memory)

    assert _one_prompt_at_a_time(sampler) == 0  # the aliased weights need no recompilation
    assert helpers.greedy(sampler)[0] == refs["b"]


def test_converted_update_is_written_into_the_old_buffers(setup):
    """fp32 -> bf16 pushes: each converted leaf lands in the very buffer of the engine leaf it
    replaces (the old leaf is donated), so the update needs no extra memory at all."""
    sampler, _, state_a, state_b, refs = setup
    sampler.update_params(state_a)  # converted: from here on the engine owns every buffer
    old = {p: buffer_pointers(x) for p, x in sampler.engine_params().items() if sampler.sync.is_weight(p)}
    assert old
    report = sampler.update_params(state_b, track_peak_memory=True)
    assert len(report.copied) == len(old)  # every weight was converted: each one was checked below
    assert report.copied and not report.aliased
    new = {p: buffer_pointers(x) for p, x in sampler.engine_params().items() if p in old}
    assert new == old, [p for p in old if new[p] != old[p]][:5]
    assert report.peak_extra_bytes == 0
    assert report.live_bytes_after == report.live_bytes_before
    assert helpers.greedy(sampler)[0] == refs["b"]


def test_bf16_tunix_layout_reshapes_are_views_on_cpu(setup, model_dir):
    """On CPU a row-major reshape moves no bytes: the engine aliases the trainer's
    q/k/v/o buffers through reshaped views; only transposes and casts copy."""
    sampler, path, _, state_b, refs = setup
    state = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state_b)
    report = sampler.update_params(state)
    assert report.copied == [] and len(report.aliased) == len(sampler.engine_params())
    sharing = sampler.verify_sharing(state)
    assert sharing.all_shared, sharing.copies
    assert helpers.greedy(sampler)[0] == refs["b"]
    # A train step that donates its params: buffers held by a view cannot be donated
    # (XLA copies instead); directly aliased ones are deleted, and the engine says so.
    step = jax.jit(lambda p: jax.tree.map(lambda x: x * 2, p), donate_argnums=0)
    doubled = step(state)
    assert not state["layers"][0]["attn"]["q_proj"]["w"].get_value().is_deleted()
    assert state["embedder"]["input_embedding"].get_value().is_deleted()
    with pytest.raises(DeletedArrayError, match="donated"):
        helpers.greedy(sampler)
    sampler.update_params(doubled)
    assert helpers.greedy(sampler)[0] != refs["b"]


def test_verify_sharing_reports_copies_with_reasons(setup):
    sampler, _, state_a, _, _ = setup
    sampler.update_params(state_a)
    sharing = sampler.verify_sharing(state_a)
    assert not sharing.all_shared and not sharing.shared
    assert sharing.copies["model.layers.0.self_attn.q_proj.weight"] == "copied: reshape, cast float32->bfloat16"
    assert sharing.copies["model.norm.scale"] == "copied: cast float32->bfloat16"


def _bad_inputs(sampler, state):
    layout = _engine_layout(sampler, state)
    missing = {k: v for k, v in layout.items() if k != "model.layers.1.mlp.up_proj.weight"}
    unknown = dict(layout, **{"model.layers.0.mlp.spare_proj.weight": layout["model.layers.0.mlp.up_proj.weight"]})
    wrong_shape = dict(layout, **{"model.layers.0.self_attn.o_proj.weight": jnp.zeros((128, 256), jnp.bfloat16)})
    integer = dict(layout, **{"model.norm.scale": jnp.ones((128,), jnp.int32)})
    return {
        "missing": (missing, "missing parameter for engine leaf model.layers.1.mlp.up_proj.weight (128, 256)"),
        "unknown": (unknown, "unknown parameter model.layers.0.mlp.spare_proj.weight (128, 256)"),
        "wrong shape": (
            wrong_shape,
            "parameter model.layers.0.self_attn.o_proj.weight (128, 256) gives (128, 256), "
            "engine leaf model.layers.0.self_attn.o_proj.weight is (256, 128)",
        ),
        "integer": (integer, "model.norm.scale (128,) has dtype int32"),
    }


def test_bad_input_is_refused_and_engine_keeps_serving(setup, model_dir):
    sampler, _, state_a, state_b, refs = setup
    sampler.update_params(state_a)
    fp, version = sampler.fingerprint(), sampler.version
    cases = _bad_inputs(sampler, state_b)
    qwen2_state = nnx.state(load_tunix_model(model_dir("qwen2.5")), nnx.Param)
    cases["other architecture"] = (qwen2_state, "layers.0.attn.q_bias")
    for name, (tree, expected) in cases.items():
        with pytest.raises(ValueError) as err:
            sampler.update_params(tree)
        assert isinstance(err.value, ParamsMismatchError), name
        assert expected in str(err.value), (name, str(err.value))
        assert sampler.fingerprint() == fp and sampler.version == version, name
        assert helpers.greedy(sampler)[0] == refs["a"], name


def test_partial_update_with_strict_false(setup):
    sampler, _, state_a, state_b, refs = setup
    sampler.update_params(state_a)
    layout_b = _engine_layout(sampler, state_b)
    subset = {k: v for k, v in layout_b.items() if ".layers.1." in k}
    report = sampler.update_params(subset, strict=False)
    assert sorted(report.aliased) == sorted(subset)
    assert "model.norm.scale" in report.untouched
    served = sampler.engine_params()
    a = converters.to_engine_layout(state_a, sampler.spec)
    for k in served:
        expected = layout_b[k] if k in subset else a[k]
        np.testing.assert_array_equal(helpers.bits(served[k]), helpers.bits(expected), err_msg=k)
    with pytest.raises(ParamsMismatchError, match="missing parameter"):
        sampler.update_params(subset)


def test_donated_arrays_are_detected(setup):
    sampler, _, state_a, state_b, refs = setup
    layout = _engine_layout(sampler, state_b)
    sampler.update_params(layout)
    # a train step that donates its params deletes the buffers the engine aliases
    layout["model.layers.0.mlp.up_proj.weight"].delete()
    with pytest.raises(DeletedArrayError, match="update_params"):
        helpers.greedy(sampler)
    with pytest.raises(DeletedArrayError, match="model.layers.0.mlp.up_proj.weight"):
        sampler.update_params(layout)
    sampler.update_params(state_a)  # a fresh push recovers
    assert helpers.greedy(sampler)[0] == refs["a"]


def test_sampler_output_follows_tunix_conventions(setup):
    sampler, _, state_a, _, _ = setup
    sampler.update_params(state_a)
    prompts = ["1+1=", "hello world the quick"]
    out = sampler(prompts, max_generation_steps=6, max_prompt_length=16, pad_output=True)
    assert out.padded_prompt_tokens.shape == (2, 16)
    for row, prompt in zip(out.padded_prompt_tokens, prompts):
        ids = sampler.tokenize(prompt)
        assert row[-len(ids) :].tolist() == ids
        assert (row[: 16 - len(ids)] == sampler.tokenizer.pad_id()).all()
    assert all(t.shape == (6,) for t in out.tokens) and all(lp.shape == (6,) for lp in out.logprobs)
    plain = sampler(prompts, max_generation_steps=6)
    for toks, lps, text in zip(plain.tokens, plain.logprobs, plain.text):
        assert len(toks) == len(lps) > 0 and np.all(lps <= 0)
        assert text == sampler.tokenizer.decode([t for t in toks.tolist() if t != sampler.tokenizer.eos_id()])
    # multi_sampling gives n samples per prompt, next to each other
    s1 = sampler(prompts, max_generation_steps=6, temperature=1.0, multi_sampling=2)
    assert len(s1.tokens) == len(s1.logprobs) == 4
    assert s1.padded_prompt_tokens[0].tolist() == s1.padded_prompt_tokens[1].tolist()
    echoed = sampler(prompts[:1], max_generation_steps=4, echo=True)
    assert echoed.tokens[0][: len(sampler.tokenize(prompts[0]))].tolist() == sampler.tokenize(prompts[0])


def test_swap_failing_midway_blocks_generation_until_a_full_push(setup, monkeypatch):
    """A device error halfway through a swap (injected: it cannot be caused on demand)
    leaves old and new leaves mixed; the sampler refuses to generate until a full push."""
    sampler, _, state_a, state_b, refs = setup
    sampler.update_params(state_a)
    plan = sampler.plan_for(state_b)
    calls = {"n": 0}
    original = type(plan).materialize

    def failing(self, entry, x, reuse=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected device failure")
        return original(self, entry, x, reuse)

    monkeypatch.setattr(type(plan), "materialize", failing)
    with pytest.raises(RuntimeError, match="injected"):
        sampler.update_params(state_b)
    monkeypatch.setattr(type(plan), "materialize", original)
    with pytest.raises(RuntimeError, match="failed midway"):
        helpers.greedy(sampler)
    layout = _engine_layout(sampler, state_a)
    sampler.update_params({k: v for k, v in layout.items() if ".layers.0." in k}, strict=False)
    with pytest.raises(RuntimeError, match="failed midway"):  # a partial push does not repair it
        helpers.greedy(sampler)
    sampler.update_params(state_a)
    assert helpers.greedy(sampler)[0] == refs["a"]


def test_checkpoint_load_shows_progress_only_when_asked_or_on_a_terminal(setup, capfd):
    sampler, path_a, *_ = setup
    sampler.load_checkpoint(str(path_a))  # stderr is not a terminal under pytest: quiet
    assert "loading weights" not in capfd.readouterr().err
    sampler.config.progress = True
    try:
        sampler.load_checkpoint(str(path_a))
    finally:
        sampler.config.progress = None
    err = capfd.readouterr().err
    assert "loading weights" in err and "leaf" in err


def test_counting_compiles_counts_programs_loaded_from_the_compilation_cache():
    """The suite runs with JAX's persistent compilation cache (conftest): a program it answers
    is still a compilation for the "no recompile" checks above."""
    if not jax.config.jax_compilation_cache_dir:
        pytest.skip("no persistent compilation cache in this run")
    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:

        def make_program():  # a new function each call: JAX's in-memory caches miss, the persistent one is asked
            def program(x):
                return jnp.tanh(x @ x.T) * 3.0 + 1.5

            return program

        x = jnp.ones((7, 5))
        with helpers.counting_compiles() as compiles:
            jax.jit(make_program())(x).block_until_ready()  # compiled, or loaded from an earlier run's cache
        assert len(compiles) >= 1
        hits = []

        def on_event(event: str, **_) -> None:
            hits.append(event == helpers.CACHE_HIT_EVENT)

        jax.monitoring.register_event_listener(on_event)
        try:
            with helpers.counting_compiles() as compiles:
                jax.jit(make_program())(x).block_until_ready()
        finally:
            jax.monitoring.unregister_event_listener(on_event)
        assert any(hits), "the persistent cache did not answer: this check checks nothing"
        assert len(compiles) >= 1, "a program loaded from the persistent cache was not counted"
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)
