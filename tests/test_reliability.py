"""Reliability: swaps racing requests from other clients, timeouts, donating trainers,
non-finite params, a soak of update/generate cycles, and property-based converter checks."""

import threading
import time

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import converters
from converters import ParamsMismatchError
from sampler import UpdateTimeoutError
from sampler.sync.leaves import buffer_pointers, live_device_bytes
from sampler.tiny import write_tiny_model
from tests import helpers

IDS = [5, 17, 42, 99, 7]


def _placed(path, sampler):
    shardings = sampler.engine_shardings()
    return {p: jax.device_put(np.asarray(x), shardings[p]) for p, x in helpers.upstream_engine_leaves(path).items()}


def _raw_generate(sampler, n=8):
    return helpers.raw_generate(sampler, IDS, n)


@pytest.fixture(scope="module")
def two_sets(model_dir, engines):
    sampler = engines.get(model_dir("qwen3-tied"))
    a, b = _placed(model_dir("qwen3-tied", 0), sampler), _placed(model_dir("qwen3-tied", 1), sampler)
    sampler.update_params(a)
    ref_a = _raw_generate(sampler)
    sampler.update_params(b)
    ref_b = _raw_generate(sampler)
    assert ref_a != ref_b
    return sampler, a, b, ref_a, ref_b


#: Each racing client keeps going until it has seen both weight sets and made this many requests.
RACE_REQUESTS = 10
#: Upper bounds that only a broken engine reaches (they end a test that would otherwise hang).
RACE_MAX_REQUESTS, RACE_MAX_SWAPS = 2000, 20000
#: A finished client's answer count: the swapper no longer waits for it.
RACE_DONE = -1


@pytest.mark.engine
def test_swaps_racing_other_clients_never_mix_weights(two_sets):
    """Three clients (two straight to the engine, one through the sampler) against back-to-back
    swaps between A and B: every answer is exactly A's or B's greedy output. The run ends on
    events, not time: when every client has seen both sets and made RACE_REQUESTS requests.
    Each swap waits until every client still running has had an answer since the previous
    one, so no client starves however the machine's load orders the threads (their next
    requests are in flight as the swap comes)."""
    sampler, a, b, ref_a, ref_b = two_sets
    expected = {tuple(ref_a): "a", tuple(ref_b): "b"}
    seen, errors = [], []
    answers = [0, 0, 0]  # per client, answers so far
    progress = threading.Condition()

    def client(k: int, raw: bool):
        mine: list[str] = []
        try:
            while len(mine) < RACE_MAX_REQUESTS and not ({"a", "b"} <= set(mine) and len(mine) >= RACE_REQUESTS):
                if mine and mine[-1] not in ("a", "b"):
                    break  # a mixed answer: fail now
                if raw:
                    ids = _raw_generate(sampler)
                else:
                    params = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
                    ids = sampler.generate_ids([IDS], params)[0]["output_ids"]
                mine.append(expected.get(tuple(ids), f"mixed: {ids}"))
                with progress:
                    answers[k] += 1
                    progress.notify_all()
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        seen.extend(mine)
        with progress:
            answers[k] = RACE_DONE
            progress.notify_all()

    clients = list(enumerate((True, True, False)))
    threads = [threading.Thread(target=client, args=c, daemon=True) for c in clients]
    for t in threads:
        t.start()
    swaps = 0
    while any(t.is_alive() for t in threads) and swaps < RACE_MAX_SWAPS:
        with progress:
            last = list(answers)
            assert progress.wait_for(
                lambda last=last: all(n > m or n == RACE_DONE for n, m in zip(answers, last)), 600
            ), (
                "a client got no answer for 600 s",
                answers,
            )
        sampler.update_params(a if swaps % 2 == 0 else b)
        swaps += 1
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert all(s in ("a", "b") for s in seen), [s for s in seen if s not in ("a", "b")][:3]
    assert len(seen) >= 3 * RACE_REQUESTS and seen.count("a") and seen.count("b"), (swaps, seen)
    print(f"race: {swaps} swaps, {len(seen)} answers")


@pytest.mark.engine
def test_update_times_out_while_a_request_runs_and_changes_nothing(two_sets):
    sampler, a, b, ref_a, ref_b = two_sets
    sampler.update_params(a)
    fp, version = sampler.fingerprint(), sampler.version
    saved = sampler.config.update_timeout_s
    sampler.config.update_timeout_s = 0.5
    try:
        with helpers.held_in_flight(sampler, IDS) as held:
            with pytest.raises(UpdateTimeoutError, match="still running"):
                sampler.update_params(b)
            assert sampler.fingerprint() == fp and sampler.version == version
    finally:
        sampler.config.update_timeout_s = saved
    assert held["ids"] == ref_a  # finished on the weights it started with
    assert _raw_generate(sampler) == ref_a  # and new requests are not held back after the timeout


@pytest.mark.engine
def test_alias_false_survives_a_donating_train_step(two_sets):
    sampler, a, b, ref_a, ref_b = two_sets
    trainer = {p: x + 0 for p, x in a.items()}  # the trainer's own buffers, engine placement
    report = sampler.update_params(trainer, alias=False)
    assert not report.aliased and len(report.copied) == len(trainer)
    served = sampler.engine_params()
    assert all(buffer_pointers(served[p]) != buffer_pointers(x) for p, x in trainer.items())

    step = jax.jit(lambda params: {p: x * 1 for p, x in params.items()}, donate_argnums=0)
    trainer = step(trainer)  # donates (deletes) every old trainer buffer
    assert _raw_generate(sampler) == ref_a
    sampler.check_servable()

    report = sampler.update_params(trainer)  # the default aliases again
    assert len(report.aliased) == len(trainer)


@pytest.mark.engine
def test_check_finite_refuses_nan_and_inf(two_sets):
    sampler, a, b, ref_a, ref_b = two_sets
    sampler.update_params(a)
    fp = sampler.fingerprint()
    bad = dict(b)
    for path, index, value in (
        ("model.layers.1.mlp.up_proj.weight", (0, 0), np.nan),
        ("model.norm.scale", (3,), np.inf),
    ):
        host = np.array(bad[path])
        host[index] = value
        bad[path] = jax.device_put(host, bad[path].sharding)
    with pytest.raises(ParamsMismatchError) as err:
        sampler.update_params(bad, check_finite=True)
    assert "model.layers.1.mlp.up_proj.weight: holds NaN or Inf" in str(err.value)
    assert "model.norm.scale: holds NaN or Inf" in str(err.value)
    assert sampler.fingerprint() == fp and _raw_generate(sampler) == ref_a
    sampler.update_params(b, check_finite=True)
    assert _raw_generate(sampler) == ref_b


SOAK_CYCLES = 240


@pytest.mark.engine
def test_soak_update_generate_cycles(two_sets):
    """Hundreds of update/generate cycles: live bytes flat, the fingerprint right every cycle."""
    sampler, a, b, ref_a, ref_b = two_sets
    fps = {"a": converters.fingerprint(a), "b": converters.fingerprint(b)}
    sets = {"a": a, "b": b}
    refs = {"a": ref_a, "b": ref_b}
    # fp32 sources are converted (cast) every cycle, bf16 ones aliased: both paths soak
    sets32 = {k: {p: x.astype(np.float32) for p, x in v.items()} for k, v in sets.items()}
    sampler.update_params(a)
    _raw_generate(sampler, n=2)
    baseline = live_device_bytes()
    t0, cycles, live = time.monotonic(), 0, []
    while cycles < SOAK_CYCLES:
        name = "ab"[cycles % 2]
        source = sets32[name] if cycles % 3 == 0 else sets[name]
        sampler.update_params(source)
        assert sampler.fingerprint() == fps[name], f"cycle {cycles}"
        if cycles % 10 == 0:
            assert _raw_generate(sampler) == refs[name], f"cycle {cycles}"
        else:
            _raw_generate(sampler, n=2)
        live.append(live_device_bytes())
        cycles += 1
    model = sum(x.nbytes for x in a.values())
    # After a converted (fp32) push the engine owns one model's worth of its own buffers;
    # after an aliased push it owns none. Neither level may creep up over the run.
    for kind in (0, 1, 2):
        levels = live[kind::3]
        third = len(levels) // 3
        assert max(levels[-third:]) <= max(levels[:third]) + 64 * 1024, (kind, levels[:3], levels[-3:])
    assert max(live) <= baseline + model + 64 * 1024, (baseline, max(live))
    elapsed = time.monotonic() - t0
    print(f"soak: {cycles} cycles in {elapsed:.1f} s, live bytes {min(live)}..{max(live)} (baseline {baseline})")


# ---------------------------------------------------------------------------- properties
ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@st.composite
def tiny_configs(draw):
    arch = draw(st.sampled_from(sorted(ARCHS)))
    kv = draw(st.sampled_from([1, 2]))
    heads = kv * draw(st.sampled_from([1, 2]))
    tp = draw(st.sampled_from([t for t in (1, 2, 4) if heads % t == 0]))
    hidden = draw(st.sampled_from([128, 256, 384]))
    if arch == "qwen2":  # Qwen2's config has no head_dim: it is hidden / heads (128 on CPU)
        hidden = heads * 128
    if hidden == kv * 128 and tp > kv:  # sglang-jax's own loader pads KV on the wrong axis here
        hidden += 128
    return dict(
        arch=ARCHS[arch],
        num_layers=draw(st.integers(1, 3)),
        num_heads=heads,
        num_kv_heads=kv,
        hidden_size=hidden,
        intermediate_size=draw(st.sampled_from([128, 256])),
        tie_word_embeddings=draw(st.booleans()),
        dtype=draw(st.sampled_from(["bfloat16", "float32"])),
        tp=tp,
        seed=draw(st.integers(0, 3)),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=tiny_configs())
def test_converters_match_upstream_loader_mapping(cfg, tmp_path_factory):
    """Random small configurations: every engine leaf our hf and flax converters produce
    equals sglang-jax's own WeightMapping applied to the same tensors (tp via KV replication)."""
    cfg = dict(cfg)
    arch, tp, seed = cfg.pop("arch"), cfg.pop("tp"), cfg.pop("seed")
    path = write_tiny_model(tmp_path_factory.mktemp("prop"), arch, seed=seed, **cfg)
    hf = helpers.hf_tensors(path)
    expected = helpers.upstream_engine_leaves(path, hf, tp=tp)
    spec = converters.ModelSpec.from_hf_config(path, tp_size=tp)
    for source in (hf, helpers.flax_params(hf)):
        got = converters.to_engine_layout(source, spec)
        assert set(got) == set(expected)
        helpers.assert_same_bits({p: np.asarray(x) for p, x in got.items()}, expected)


@st.composite
def family_configs(draw):
    """Random small Qwen3-MoE, Gemma 2 and Gemma 4 (dense or MoE, k_eq_v or not) models."""
    arch = draw(st.sampled_from(["Qwen3MoeForCausalLM", "Gemma2ForCausalLM", "Gemma4ForCausalLM"]))
    kv = draw(st.sampled_from([1, 2]))
    heads = kv * draw(st.sampled_from([1, 2]))
    layers = draw(st.integers(1, 3))
    cfg = dict(
        arch=arch,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        hidden_size=draw(st.sampled_from([256, 384])),  # != kv_heads * head_dim (upstream's padding axis)
        intermediate_size=draw(st.sampled_from([128, 256])),
        dtype=draw(st.sampled_from(["bfloat16", "float32"])),
        tp=draw(st.sampled_from([t for t in (1, 2, 4) if heads % t == 0])),
        seed=draw(st.integers(0, 3)),
    )
    experts = draw(st.sampled_from([2, 4, 8]))
    if arch == "Qwen3MoeForCausalLM":
        cfg.update(
            num_experts=experts,
            num_experts_per_tok=draw(st.integers(1, experts)),
            moe_intermediate_size=draw(st.sampled_from([64, 128])),
            mlp_only_layers=tuple(i for i in range(layers) if draw(st.booleans()) and i != layers - 1),
            tie_word_embeddings=draw(st.booleans()),
        )
    elif arch == "Gemma4ForCausalLM":
        cfg.update(moe=draw(st.booleans()), attention_k_eq_v=draw(st.booleans()), num_experts=experts)
        if cfg["attention_k_eq_v"] and draw(st.booleans()):
            cfg["num_global_kv_heads"] = draw(st.sampled_from([1, 2]))
    return cfg


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=family_configs())
def test_family_converters_match_upstream_loader_mapping(cfg, tmp_path_factory):
    """Random MoE and Gemma configurations: every engine leaf from the hf converter (and
    Gemma 4's text-only names) equals sglang-jax's own mappings applied to the same tensors
    (experts stacked, Gemma 4's experts as its model loads them, KV replication at tp)."""
    cfg = dict(cfg)
    arch, tp, seed = cfg.pop("arch"), cfg.pop("tp"), cfg.pop("seed")
    path = write_tiny_model(tmp_path_factory.mktemp("prop"), arch, seed=seed, **cfg)
    hf = helpers.hf_tensors(path)
    expected = helpers.upstream_engine_leaves(path, hf, tp=tp)
    spec = converters.ModelSpec.from_hf_config(path, tp_size=tp)
    sources = [hf]
    if arch == "Gemma4ForCausalLM":
        sources.append({k.replace("model.language_model.", "model.", 1): v for k, v in hf.items()})
    for source in sources:
        got = converters.to_engine_layout(source, spec)
        helpers.assert_same_bits({p: np.asarray(x) for p, x in got.items()}, expected)
