"""Data-parallel rollout: four tp=1 engines in one process on four simulated CPU devices,
checked against one engine loaded by sglang-jax's own loader."""

import threading

import jax
import numpy as np
import pytest

import converters
from sampler import DataParallelSampler, SamplerConfig, SglangJaxSampler, create_sampler
from sampler.data_parallel import device_groups, split_balanced
from tests import helpers

pytestmark = pytest.mark.engine

PROMPTS = [
    "1+1=",
    "hello world the quick",
    "Q: what is 3+4? A:",
    "a",
    "the quick brown fox jumps over",
    "2*3=",
    "lorem ipsum dolor sit amet consectetur",
    "x",
    "numbers 1 2 3 4",
    "why",
    "ok go",
    "end of the list",
]


def test_split_balanced_counts_and_lengths():
    costs = [9, 1, 8, 2, 7, 3, 6, 4, 5, 5]
    groups = split_balanced(costs, 4)
    assert sorted(i for g in groups for i in g) == list(range(len(costs)))
    assert max(map(len, groups)) - min(map(len, groups)) <= 1
    loads = [sum(costs[i] for i in g) for g in groups]
    assert max(loads) - min(loads) <= max(costs) // 2, loads
    assert split_balanced([], 3) == [[], [], []]
    assert split_balanced([5], 3) == [[0], [], []]


def test_device_groups_are_checked():
    cfg = SamplerConfig(model_path="unused", data_parallel_size=2, tp_size=2)
    assert device_groups(cfg) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="needs 4 distinct devices"):
        device_groups(SamplerConfig(model_path="unused", data_parallel_size=2, tp_size=2, device_indexes=[0, 1, 1, 2]))
    with pytest.raises(ValueError, match="this process does not have"):
        device_groups(SamplerConfig(model_path="unused", data_parallel_size=4, tp_size=2))
    with pytest.raises(ValueError, match="create_sampler"):
        SglangJaxSampler(config=SamplerConfig(model_path="unused", data_parallel_size=2))


@pytest.fixture(scope="module")
def dp(model_dir):
    sampler = create_sampler(
        SamplerConfig(
            model_path=str(model_dir("qwen3-tied")), data_parallel_size=4, context_length=128, max_running_requests=4
        )
    )
    assert isinstance(sampler, DataParallelSampler)
    yield sampler
    sampler.shutdown()


def _engine_layout_on(path, sampler: SglangJaxSampler):
    """Checkpoint tensors in engine layout, placed exactly as ``sampler``'s engine holds them."""
    leaves = helpers.upstream_engine_leaves(path)
    shardings = sampler.engine_shardings()
    return {p: jax.device_put(np.asarray(x), shardings[p]) for p, x in leaves.items()}


def test_each_engine_lives_on_its_own_device(dp):
    devices = jax.devices()
    for i, s in enumerate(dp.samplers):
        assert {d.id for d in s.mesh.devices.flat} == {devices[i].id}
        for path, x in s.engine_params().items():
            assert x.devices() == {devices[i]}, (i, path, x.devices())
        pool = s._handle.model_runner.token_to_kv_pool
        for buf in jax.tree_util.tree_leaves(pool.kv_buffer):
            assert buf.devices() == {devices[i]}


def test_update_aliases_on_the_trainers_devices_and_copies_to_the_others(dp, model_dir):
    path = model_dir("qwen3-tied")
    params = _engine_layout_on(path, dp.samplers[0])  # the "trainer" holds engine 0's layout on device 0
    report = dp.update_params(params)
    first, *others = report.engines
    assert len(report.engines) == 4
    assert not first.copied and len(first.aliased) == len(params)
    for r in others:
        assert not r.aliased and len(r.copied) == len(params)
    assert report.version == min(s.version for s in dp.samplers)
    expected = converters.fingerprint_params(helpers.hf_tensors(path), path)
    assert dp.fingerprints() == [expected] * 4
    assert [all(s.verify_sharing(params).shared) for s in dp.samplers][0]
    for i, s in enumerate(dp.samplers[1:], start=1):
        for p, x in s.engine_params().items():
            assert x.devices() == {jax.devices()[i]}, p


def test_concurrent_generation_matches_one_engine(dp, model_dir, engines):
    path = model_dir("qwen3-tied")
    dp.load_checkpoint(path)
    ref = engines.get(path, load_format="safetensors")
    expected = ref(PROMPTS, max_generation_steps=8, temperature=0.0)

    result = {}
    worker = threading.Thread(
        target=lambda: result.setdefault("out", dp(PROMPTS, max_generation_steps=8, temperature=0.0))
    )
    worker.start()
    worker.join(180)
    assert not worker.is_alive(), "concurrent generation on 4 engines did not finish in 180 s"
    out = result["out"]
    assert [t.tolist() for t in out.tokens] == [t.tolist() for t in expected.tokens]
    assert out.text == expected.text
    np.testing.assert_array_equal(out.padded_prompt_tokens, expected.padded_prompt_tokens)
    for a, b in zip(out.logprobs, expected.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-5)

    # every engine took part, in parallel threads
    served = [s for s in dp.samplers if s.engine.tokenizer_manager.last_receive_tstamp > 0]
    assert len(served) == 4

    ids = [dp.tokenize(p) for p in PROMPTS]
    raw = dp.generate_ids(ids, {"max_new_tokens": 4, "temperature": 0.0})
    ref_raw = ref.generate_ids(ids, {"max_new_tokens": 4, "temperature": 0.0})
    assert [r["output_ids"] for r in raw] == [r["output_ids"] for r in ref_raw]

    prompt_tokens = np.asarray(expected.padded_prompt_tokens)
    completion = np.stack([np.pad(t, (0, 8 - len(t)), constant_values=dp.tokenizer.pad_id()) for t in expected.tokens])
    np.testing.assert_allclose(
        dp.score_completions(prompt_tokens, completion), ref.score_completions(prompt_tokens, completion), atol=1e-5
    )
    engines.drop(path, load_format="safetensors")


def test_update_reaches_every_engine_and_bad_input_changes_none(dp, model_dir):
    new = model_dir("qwen3-tied", 1)
    versions = [s.version for s in dp.samplers]
    before = dp.fingerprint()
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        dp.load_checkpoint(model_dir("llama-tied"))
    assert dp.fingerprints() == [before] * 4 and [s.version for s in dp.samplers] == versions
    report = dp.load_checkpoint(new)
    assert len(report.engines) == 4
    assert dp.fingerprints() == [converters.fingerprint_params(helpers.hf_tensors(new), new)] * 4
    tokens = dp(PROMPTS[:4], max_generation_steps=6, temperature=0.0).tokens
    assert all(len(t) > 0 for t in tokens)


def test_sampled_duplicates_differ_across_engines(dp):
    out = dp(["the quick brown"] * 8, max_generation_steps=8, temperature=1.0)
    assert len({tuple(t.tolist()) for t in out.tokens}) > 1


def test_shutdown_stops_every_engine_and_thread(model_dir):
    baseline = {t.name for t in threading.enumerate()}
    sampler = DataParallelSampler(
        config=SamplerConfig(
            model_path=str(model_dir("qwen3-tied")), data_parallel_size=2, context_length=64, max_running_requests=2
        )
    )
    assert len({t.name for t in threading.enumerate()} - baseline) > 2
    sampler.shutdown()
    sampler.shutdown()  # idempotent
    left = [
        t.name
        for t in threading.enumerate()
        if t.name not in baseline and "watchdog" not in t.name and t.name != "tqdm_monitor"
    ]
    assert left == []
    with pytest.raises(RuntimeError, match="shut down"):
        sampler(["x"], max_generation_steps=2)
