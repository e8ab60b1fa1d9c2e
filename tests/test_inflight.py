"""Weight swaps with requests in flight (``update_params(..., in_flight=...)``), against real
engines: the engine under test starts from checkpoint A (sglang-jax's own loader) and swaps
to B mid-request; B's tokens are checked against a second engine that loaded B with
sglang-jax's own loader. The swap point is made deterministic by parking the scheduler
once the request has produced exactly N tokens (``helpers.parked_at_tokens``)."""

import asyncio
import threading
import time

import numpy as np
import pytest

from sampler import DataParallelSampler, SamplerConfig, create_sampler
from sampler.compat.scheduler import held_requests
from sampler.serve.server import WeightServer
from sampler.sync.inflight import check_in_flight, oldest_version, token_staleness, token_versions
from tests import helpers

pytestmark = pytest.mark.engine

PROMPT = "Q: what is 3+4? A: the quick"
#: Tokens per request, and where the swap happens (exactly: the scheduler parks there).
L, N = 24, 9
GREEDY = {"temperature": 0.0, "ignore_eos": True}


def _greedy(sampler, ids, n):
    (res,) = sampler.generate_ids([ids], {"max_new_tokens": n, **GREEDY})
    return helpers.tokens_of(res), res


@pytest.fixture(scope="module")
def ab(varied_dir, engines):
    """The engine under test (serving A), B's oracle engine, both checkpoints' tensors, the
    prompt and A's greedy tokens."""
    a, b = varied_dir(0), varied_dir(1)
    sampler = engines.get(a, load_format="safetensors")
    ref_b = engines.get(b, load_format="safetensors")
    hf = {"a": helpers.hf_tensors(a), "b": helpers.hf_tensors(b)}
    prompt = sampler.tokenize(PROMPT)
    tokens_a, _ = _greedy(sampler, prompt, L)
    tokens_b, _ = _greedy(ref_b, prompt, L)
    assert tokens_a[N:] != tokens_b[N:] and len(set(tokens_a[N:])) > 3  # the checkpoints tell themselves apart
    yield sampler, ref_b, hf, prompt, tokens_a
    engines.drop(a, load_format="safetensors")
    engines.drop(b, load_format="safetensors")


def _serve_a(sampler, hf):
    sampler.update_params(hf["a"])  # drain; nothing in flight


def _swap_mid_request(sampler, prompt, weights, in_flight, n=N, **options):
    """A greedy request of L tokens; after exactly ``n`` of them the weights change."""
    with helpers.parked_at_tokens(sampler, n) as wait:
        future = helpers.send_async(sampler, prompt, L)
        assert wait() == [n]
        report = sampler.update_params(weights, in_flight=in_flight, **options)
    out = future.result(120)
    return helpers.tokens_of(out), out["meta_info"], report


@pytest.mark.parametrize("n", [N, 1], ids=["mid-decode", "right-after-prefill"])
def test_recompute_tail_is_the_new_weights_continuation(ab, n):
    """The part before the swap is A's greedy output; the part after is, token for token, B's
    greedy continuation of (prompt + the part before) from an engine that loaded B itself.
    n=1 parks right after the prefill, where upstream's retract loses the request."""
    sampler, ref_b, hf, prompt, tokens_a = ab
    v = sampler.version
    tokens, meta, report = _swap_mid_request(sampler, prompt, hf["b"], "recompute", n)
    try:
        assert len(tokens) == L
        assert tokens[:n] == tokens_a[:n]
        expected_tail, _ = _greedy(ref_b, prompt + tokens[:n], L - n)
        assert tokens[n:] == expected_tail
        assert meta["weight_versions"] == [(v, 0), (v + 1, n)]
        assert report.in_flight == "recompute" and report.requests_in_flight == 1 and report.version == v + 1
        assert meta.get("cache_miss_count", 0) == 0  # upstream counts the last batch only: it ran compiled code
    finally:
        _serve_a(sampler, hf)


def test_continue_keeps_the_prefix_and_stamps_the_switch(ab):
    sampler, ref_b, hf, prompt, tokens_a = ab
    v = sampler.version
    tokens, meta, report = _swap_mid_request(sampler, prompt, hf["b"], "continue")
    try:
        assert len(tokens) == L and tokens[:N] == tokens_a[:N]
        assert meta["weight_versions"] == [(v, 0), (v + 1, N)]
        assert report.in_flight == "continue" and report.requests_in_flight == 1
        # the new weights sample over the KV the old ones computed: not B's own continuation
        recomputed, _ = _greedy(ref_b, prompt + tokens[:N], L - N)
        assert tokens[N:] != recomputed
    finally:
        _serve_a(sampler, hf)


@pytest.mark.parametrize("in_flight", ["continue", "recompute"])
def test_no_new_request_reuses_what_old_weights_computed(ab, in_flight):
    """After a swap with a request still running, new requests (one sharing the running
    request's prompt, one extending its finished sequence) get exactly B's greedy output:
    no prefix-cache entry computed under A is matched."""
    sampler, ref_b, hf, prompt, tokens_a = ab
    try:
        tokens, _, _ = _swap_mid_request(sampler, prompt, hf["b"], in_flight)
        for ids in (prompt, prompt + tokens):  # the second: the finished request's whole sequence
            got, res = _greedy(sampler, ids, 8)
            want, _ = _greedy(ref_b, ids, 8)
            assert got == want, ids
            assert res["meta_info"]["weight_versions"] == [(sampler.version, 0)]
    finally:
        _serve_a(sampler, hf)


def test_recompute_flushes_the_prefix_cache_while_retracted_requests_wait(ab):
    """Upstream's flush refuses while the retracted request waits; the workaround empties the
    tree anyway (checked while the scheduler is still parked, before the re-prefill)."""
    sampler, _, hf, prompt, _ = ab
    scheduler = sampler._handle.scheduler
    try:
        with helpers.parked_at_tokens(sampler, N) as wait:
            future = helpers.send_async(sampler, prompt, L)
            wait()
            assert scheduler.tree_cache.total_size() > 0  # A's prompt, held by the running request
            sampler.update_params(hf["b"], in_flight="recompute")
            waiting = [r for r in scheduler.waiting_queue if not r.finished()]
            assert len(waiting) == 1 and len(waiting[0].output_ids) == N  # retracted, output kept
            assert scheduler.tree_cache.total_size() == 0
        assert len(helpers.tokens_of(future.result(120))) == L
    finally:
        _serve_a(sampler, hf)


def test_weights_change_only_between_iterations(ab, monkeypatch):
    """Every leaf write happens while the scheduler thread is parked between iterations, and
    no forward pass sees the served leaves change under it, across swaps in every mode with
    requests in flight. The update is called while the scheduler runs (the request is let go
    after n tokens), so the swap has to park it itself."""
    sampler, _, hf, prompt, _ = ab
    sync, handle = sampler.sync, sampler._handle
    runner, scheduler = handle.model_runner, handle.scheduler
    writes, forwards = [], []
    setters = list(sync.weights._setters)

    def watched(setter):
        def set_value(value):
            writes.append(handle.park.parked)
            setter(value)

        return set_value

    monkeypatch.setattr(sync.weights, "_setters", [watched(s) for s in setters])
    run_batch = scheduler.run_batch

    def served():
        return [id(x) for x in runner.model_state_leaves], sync.writing

    def watched_run_batch(batch):
        before = served()
        out = run_batch(batch)
        forwards.append((before, served()))
        return out

    monkeypatch.setattr(scheduler, "run_batch", watched_run_batch)
    try:
        for i, in_flight in enumerate(["continue", "recompute", "continue", "recompute", "drain"]):
            weights = hf["b"] if i % 2 == 0 else hf["a"]
            if in_flight == "drain":
                sampler.update_params(weights)
                continue
            with helpers.parked_at_tokens(sampler, 2 + i) as wait:
                future = helpers.send_async(sampler, prompt, L)
                wait()
            sampler.update_params(weights, in_flight=in_flight)  # the scheduler is decoding meanwhile
            assert len(helpers.tokens_of(future.result(120))) == L
    finally:
        monkeypatch.undo()
        _serve_a(sampler, hf)
    assert writes and all(writes), "a leaf was written while the scheduler thread was running"
    assert len(forwards) >= 4 * L  # L iterations per request (a re-prefill replaces a decode)
    assert all(before == after and not before[1] for before, after in forwards), "a forward saw the weights change"


def test_swap_failing_midway_aborts_requests_in_flight(ab, monkeypatch):
    """A swap that fails after writing some leaves leaves a mix: the request in flight ends
    with an abort answer (no forward on the mix), a request arriving meanwhile from another
    client is aborted too, the sampler refuses to generate, and a complete push recovers."""
    sampler, _, hf, prompt, tokens_a = ab
    plan = sampler.plan_for(hf["b"])
    original = type(plan).materialize
    calls = {"n": 0}

    def failing(self, entry, inputs, reuse=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure while writing a leaf")
        return original(self, entry, inputs, reuse=reuse)

    monkeypatch.setattr(type(plan), "materialize", failing)
    with helpers.parked_at_tokens(sampler, N) as wait:
        future = helpers.send_async(sampler, prompt, L)
        wait()
        with pytest.raises(RuntimeError, match="simulated failure"):
            sampler.update_params(hf["b"], in_flight="continue")
        late = helpers.send_async(sampler, prompt, L)  # another client, straight to the engine
    monkeypatch.undo()
    for f in (future, late):
        meta = f.result(120)["meta_info"]
        assert meta["finish_reason"]["type"] == "abort", meta
    assert not sampler.engine.tokenizer_manager.rid_to_state  # answered and gone (upstream's abort leaves them)
    with pytest.raises(RuntimeError, match="failed midway"):
        sampler.generate_ids([prompt], {"max_new_tokens": 2})
    sampler.update_params(hf["a"])
    assert _greedy(sampler, prompt, L)[0] == tokens_a


def test_a_refused_cache_flush_still_stamps_the_requests_that_switched(ab, monkeypatch):
    """The new weights are in place when the prefix-cache flush comes; if sglang-jax refuses
    it (a fault, simulated), the caller gets the error and the request in flight still says,
    truthfully, that it switched to the new version at token N."""
    from sampler.sync import inflight

    sampler, _, hf, prompt, _ = ab
    v = sampler.version
    monkeypatch.setattr(inflight.sched, "flush_prefix_cache_ignoring_queues", lambda s: (False, "simulated refusal"))
    try:
        with helpers.parked_at_tokens(sampler, N) as wait:
            future = helpers.send_async(sampler, prompt, L)
            assert wait() == [N]
            with pytest.raises(RuntimeError, match="simulated refusal"):
                sampler.update_params(hf["b"], in_flight="recompute")
        meta = future.result(120)["meta_info"]
        assert meta["weight_versions"] == [(v, 0), (v + 1, N)], meta["weight_versions"]
        assert sampler.version == v + 1
    finally:
        monkeypatch.undo()
        _serve_a(sampler, hf)


def test_max_staleness_makes_a_swap_wait_for_requests_it_would_leave_too_old(ab, monkeypatch):
    """max_staleness=1: a request may span one swap; a second swap while it runs waits for it
    to finish (it never gets tokens two versions apart), and requests stay in flight meanwhile."""
    sampler, _, hf, prompt, _ = ab
    v = sampler.version
    versions = sampler.sync.switch.versions
    waiting = threading.Event()
    wait_until = versions.wait_until_no_older_than

    def watched(version, timeout):
        waiting.set()
        return wait_until(version, timeout)

    monkeypatch.setattr(versions, "wait_until_no_older_than", watched)
    second: dict = {}
    try:
        with helpers.parked_at_tokens(sampler, N) as wait:
            future = helpers.send_async(sampler, prompt, L)
            wait()
            first = sampler.update_params(hf["b"], in_flight="continue", max_staleness=1)
            assert first.version == v + 1 and first.requests_in_flight == 1
            waiting.clear()
            swapper = threading.Thread(
                target=lambda: second.setdefault(
                    "report", sampler.update_params(hf["a"], in_flight="continue", max_staleness=1)
                )
            )
            swapper.start()
            deadline = time.monotonic() + 120
            while not (waiting.is_set() or "report" in second):
                assert time.monotonic() < deadline, "the second swap neither waited nor ran"
                time.sleep(0.005)
            assert "report" not in second and sampler.version == v + 1, "the second swap did not wait"
        meta = future.result(120)["meta_info"]
        swapper.join(120)
        assert meta["weight_versions"] == [(v, 0), (v + 1, N)]
        assert second["report"].version == v + 2 and second["report"].wait_seconds > 0
    finally:
        monkeypatch.undo()
        _serve_a(sampler, hf)


def test_bad_policies_are_refused_naming_the_field(ab):
    sampler, _, hf, _, _ = ab
    with pytest.raises(ValueError, match="in_flight='sometimes'"):
        sampler.update_params(hf["a"], in_flight="sometimes")
    with pytest.raises(ValueError, match="max_staleness=-1"):
        sampler.update_params(hf["a"], in_flight="continue", max_staleness=-1)
    with pytest.raises(ValueError, match="max_staleness=0 with in_flight='recompute'"):
        check_in_flight("recompute", 0)
    assert sampler.healthy


def test_stamps_reach_every_front_end(ab):
    sampler, _, _, prompt, _ = ab
    out = sampler(["1+1=", PROMPT], max_generation_steps=4, temperature=0.0)
    assert [m["weight_versions"] for m in out.meta] == [[(sampler.version, 0)]] * 2
    (res,) = sampler.generate_ids([prompt], {"max_new_tokens": 2})
    assert res["meta_info"]["weight_versions"] == [(sampler.version, 0)]


def test_token_version_helpers():
    stamps = [(3, 0), (4, 2), (6, 5)]
    assert token_versions(stamps, 7).tolist() == [3, 3, 4, 4, 4, 6, 6]
    assert token_staleness(stamps, 7, current_version=6).tolist() == [3, 3, 2, 2, 2, 0, 0]
    assert token_versions([(5, 0)], 0).tolist() == [] and oldest_version(stamps) == 3
    assert np.array_equal(token_versions([(1, 0), (2, 3)], 2), [1, 1])


def test_http_server_admits_requests_while_an_in_flight_reload_writes(ab, varied_dir, monkeypatch):
    """The WeightServer (in process, its admission logic and reload handler on the engine's
    loop): during a "recompute" reload nothing is refused, the request held across it goes on
    under the new weights, and only a "drain" reload answers 503."""
    sampler, ref_b, hf, prompt, tokens_a = ab
    server = WeightServer(sampler, admin_token="t")
    seen = []
    setters = list(sampler.sync.weights._setters)

    def midway(setter):  # the second leaf written: the weights are half old, half new
        def set_value(value):
            seen.append((server.admission_problem(), server.status()["accepting"]))
            setter(value)

        return set_value

    monkeypatch.setattr(sampler.sync.weights, "_setters", setters[:1] + [midway(setters[1])] + setters[2:])
    loop = sampler.event_loop
    try:
        with helpers.parked_at_tokens(sampler, N) as wait:
            future = helpers.send_async(sampler, prompt, L)
            wait()
            answer = asyncio.run_coroutine_threadsafe(
                server.reload(str(varied_dir(1)), in_flight="recompute"), loop
            ).result(120)
        assert answer["ok"] and answer["report"]["in_flight"] == "recompute", answer
        assert answer["report"]["requests_in_flight"] == 1
        assert seen == [(None, True)]
        tokens = helpers.tokens_of(future.result(120))
        assert tokens[:N] == tokens_a[:N] and tokens[N:] == _greedy(ref_b, prompt + tokens[:N], L - N)[0]
        bad = asyncio.run_coroutine_threadsafe(server.reload(str(varied_dir(0)), in_flight="never"), loop).result(60)
        assert bad.status_code == 400 and b"in_flight='never'" in bad.body
        asyncio.run_coroutine_threadsafe(server.reload(str(varied_dir(0))), loop).result(120)
        assert seen[-1][0] is not None and seen[-1][1] is False  # drain: 503 while it swaps
    finally:
        monkeypatch.undo()
        _serve_a(sampler, hf)


@pytest.fixture(scope="module")
def dp_ab(varied_dir):
    """Two data-parallel engines, each loaded with A by sglang-jax's loader."""
    sampler = create_sampler(
        SamplerConfig(
            model_path=str(varied_dir(0)),
            load_format="safetensors",
            data_parallel_size=2,
            device_indexes=[2, 3],
            context_length=128,
            max_running_requests=4,
        )
    )
    assert isinstance(sampler, DataParallelSampler)
    yield sampler
    sampler.shutdown()


def test_data_parallel_engines_switch_at_their_next_iteration(ab, dp_ab):
    """One request per engine, each parked at its own token count; one recompute push: each
    request's tail is B's continuation from where its engine was, each stamped there."""
    sampler_a, ref_b, hf, prompt, _ = ab
    dp = dp_ab
    prompts = [prompt, prompt[:-2]]
    counts = [N, N + 4]
    v = dp.version
    results: dict = {}
    with helpers.parked_at_tokens(dp.samplers[0], counts[0]) as wait0:
        with helpers.parked_at_tokens(dp.samplers[1], counts[1]) as wait1:
            caller = threading.Thread(
                target=lambda: results.setdefault("out", dp.generate_ids(prompts, {"max_new_tokens": L, **GREEDY}))
            )
            caller.start()
            assert wait0() == [counts[0]] and wait1() == [counts[1]]
            assert [len(held_requests(s._handle.scheduler)) for s in dp.samplers] == [1, 1]
            report = dp.update_params(hf["b"], in_flight="recompute")
    caller.join(120)
    assert report.requests_in_flight == 2 and [r.version for r in report.engines] == [v + 1, v + 1]
    for ids, n, res in zip(prompts, counts, results["out"]):
        tokens = helpers.tokens_of(res)
        assert res["meta_info"]["weight_versions"] == [(v, 0), (v + 1, n)]
        assert tokens[n:] == _greedy(ref_b, ids + tokens[:n], L - n)[0]
        assert tokens[:n] == _greedy(sampler_a, ids, L)[0][:n]
