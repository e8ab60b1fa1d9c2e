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
    sharing = dp.verify_sharing(params)
    assert sharing[0].all_shared and len(sharing[0].shared) == len(params)  # engine 0: the trainer's buffers
    for other in sharing[1:]:
        assert not other.shared and len(other.copies) == len(params)
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


def test_every_engine_serves_its_share_at_the_same_time(dp, model_dir, monkeypatch):
    """The engines generate concurrently: each engine's call waits at a barrier that only opens
    when all four are inside it (serial calls would never meet), and each serves its share."""
    dp.load_checkpoint(model_dir("qwen3-tied"))
    barrier = threading.Barrier(len(dp.samplers), timeout=60)
    shares = {}
    for i, s in enumerate(dp.samplers):
        inner = s.generate_ids

        def met(prompts, *args, i=i, inner=inner, **kwargs):
            shares[i] = len(prompts)
            barrier.wait()  # BrokenBarrierError unless all engines are called at once
            return inner(prompts, *args, **kwargs)

        monkeypatch.setattr(s, "generate_ids", met)
    out = dp(PROMPTS, max_generation_steps=4, temperature=0.0)
    assert len(out.tokens) == len(PROMPTS) and all(len(t) for t in out.tokens)
    assert shares == {0: 3, 1: 3, 2: 3, 3: 3}


def test_update_is_all_or_nothing(dp, model_dir):
    """A request held in flight on engine 2 only: that engine cannot be quiesced, so the update
    times out and no engine changed (none serves the new version); once released, a push
    reaches all four."""
    from sampler import UpdateTimeoutError

    a, b = model_dir("qwen3-tied"), model_dir("qwen3-tied", 1)
    dp.load_checkpoint(a)
    before, versions = dp.fingerprints(), [s.version for s in dp.samplers]
    saved = dp.config.update_timeout_s
    dp.config.update_timeout_s = 1.0
    try:
        with helpers.held_in_flight(dp.samplers[2], [5, 6, 7]) as held:
            with pytest.raises(UpdateTimeoutError):
                dp.load_checkpoint(b)
            assert dp.fingerprints() == before and [s.version for s in dp.samplers] == versions
    finally:
        dp.config.update_timeout_s = saved
    assert held["ids"]  # the held request finished, on the old weights
    dp.load_checkpoint(b)
    expected = converters.fingerprint_params(helpers.hf_tensors(b), b)
    assert dp.fingerprints() == [expected] * 4


def test_a_push_failing_midway_blocks_generation_until_a_complete_push(dp, model_dir, monkeypatch):
    """A device error while writing engine 2 (injected: it cannot be caused on demand) leaves
    the other engines on the new weights and engine 2 on the old: generation is refused until
    a full push."""
    a, b = model_dir("qwen3-tied"), model_dir("qwen3-tied", 1)
    dp.load_checkpoint(a)
    target = dp.samplers[2].sync
    original = target.apply

    def failing(push, window=None):
        raise RuntimeError("injected device failure")

    monkeypatch.setattr(target, "apply", failing)
    with pytest.raises(RuntimeError, match="injected"):
        dp.load_checkpoint(b)
    monkeypatch.setattr(target, "apply", original)
    prints = dp.fingerprints()
    assert prints[0] == prints[1] == prints[3] != prints[2]
    with pytest.raises(RuntimeError, match="failed midway across the data-parallel engines"):
        dp(PROMPTS[:2], max_generation_steps=2)
    with pytest.raises(RuntimeError, match="failed midway"):
        dp.generate_ids([[5, 6, 7]], {"max_new_tokens": 2})
    dp.load_checkpoint(b)
    assert len(set(dp.fingerprints())) == 1
    assert all(len(t) for t in dp(PROMPTS[:2], max_generation_steps=2).tokens)


def test_a_bad_prompt_sends_nothing_to_any_engine(dp):
    """The whole call is validated before it is split: with every scheduler parked, anything
    sent would still be in some engine's tokenizer manager table."""
    from sampler.errors import InvalidRequestError

    prompts = [[5, 6, 7]] * 7 + [[5, 6, -1]]  # the bad prompt is the last: another engine's share
    for s in dp.samplers:
        assert s._handle._park.park(60)
    try:
        with pytest.raises(InvalidRequestError, match=r"input_ids\[7\]\[2\]"):
            dp.generate_ids(prompts, {"max_new_tokens": 2, "temperature": 0.0})
        assert [len(s.engine.tokenizer_manager.rid_to_state) for s in dp.samplers] == [0] * 4
    finally:
        for s in dp.samplers:
            s._handle._park.release()
    assert dp.healthy and len(dp.generate_ids(prompts[:4], {"max_new_tokens": 2, "temperature": 0.0})) == 4


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
