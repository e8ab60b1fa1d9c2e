"""Restarting a faulted engine from Python (``SglangJaxSampler.restart``, ``auto_restart``),
with real engine-thread faults: the poison requests of ``sampler.serve.faults`` sent past request
validation, and a served weight deleted under the engine. The restarted engine must serve the
very weights served before (fingerprint and greedy tokens), keep the version, and free the old
engine's device memory."""

import gc

import jax
import numpy as np
import pytest

import converters
from sampler import EngineFaultError, SamplerConfig, SglangJaxSampler, WeightsLostError
from sampler.serve.faults import POISON_REQUESTS, generate_unchecked
from sampler.sync.leaves import buffer_pointers, live_device_bytes
from tests import helpers

pytestmark = pytest.mark.engine

IDS = [5, 17, 42, 99, 7]
PARAMS = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}


def greedy(sampler):
    return sampler.generate_ids([IDS], PARAMS, return_logprob=False)[0]["output_ids"]


def fault(sampler, thread):
    """A real fault of one engine thread: a request that crashes it, sent past validation."""
    out = sampler._handle.run(generate_unchecked(sampler.engine.tokenizer_manager, **POISON_REQUESTS[thread]), 120)
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert not sampler.healthy and sampler.fault is not None
    with pytest.raises(EngineFaultError):
        greedy(sampler)


def placed(path, sampler):
    shardings = sampler.engine_shardings()
    return {p: jax.device_put(np.asarray(x), shardings[p]) for p, x in helpers.upstream_engine_leaves(path).items()}


@pytest.fixture(scope="module")
def ckpts(model_dir):
    a, b = model_dir("qwen3-tied", 0), model_dir("qwen3-tied", 1)
    return {"a": a, "b": b, "fp_a": converters.fingerprint_params(helpers.hf_tensors(a), a)}


@pytest.fixture(scope="module")
def sampler(ckpts):
    """Its own sampler: these tests fault it on purpose."""
    s = SglangJaxSampler(
        config=SamplerConfig(
            model_path=str(ckpts["a"]), load_format="safetensors", context_length=128, max_running_requests=4
        )
    )
    yield s
    s.shutdown()


@pytest.mark.parametrize("thread", ["scheduler", "detokenizer"])
def test_restart_serves_the_pushed_weights_again(sampler, ckpts, thread):
    b = placed(ckpts["b"], sampler)
    sampler.update_params(b)
    tokens_b, fp_b, version = greedy(sampler), sampler.fingerprint(), sampler.version
    assert fp_b == converters.fingerprint(b)
    gc.collect()
    live = live_device_bytes()

    fault(sampler, thread)
    report = sampler.restart()
    assert report.restored == "arrays" and thread in report.fault, report
    assert sampler.healthy and sampler.fault is None
    assert sampler.fingerprint() == fp_b and greedy(sampler) == tokens_b
    assert sampler.version == version
    # the served arrays were aliased, not copied, and the old engine's memory is gone
    served = sampler.engine_params()
    assert all(buffer_pointers(served[p]) == buffer_pointers(x) for p, x in b.items())
    del b
    gc.collect()
    assert live_device_bytes() <= live, (live, live_device_bytes())


def test_restart_reloads_the_checkpoint_when_the_served_arrays_are_gone(sampler, ckpts):
    """A served (engine-owned) array donated away: the next forward pass crashes the scheduler
    thread, and the arrays cannot be reused; the restart reloads the last checkpoint."""
    sampler.load_checkpoint(ckpts["a"])
    tokens_a = greedy(sampler)
    path = sampler.weight_paths()[0]
    jax.jit(lambda x: x * 1, donate_argnums=0)(sampler.engine_params()[path])
    assert sampler.engine_params()[path].is_deleted()
    out = sampler._handle.run(sampler.engine.async_generate(input_ids=IDS, sampling_params=PARAMS), 120)
    assert out["meta_info"]["finish_reason"]["type"] == "abort" and not sampler.healthy

    report = sampler.restart()
    assert report.restored == "checkpoint", report
    assert sampler.fingerprint() == ckpts["fp_a"] and greedy(sampler) == tokens_a


def test_restart_refuses_to_generate_when_pushed_weights_are_lost(sampler, ckpts):
    trainer = {p: x + 0 for p, x in placed(ckpts["b"], sampler).items()}  # the trainer's own buffers
    sampler.update_params(trainer)  # aliased
    tokens_b = greedy(sampler)
    jax.jit(lambda t: {p: x * 1 for p, x in t.items()}, donate_argnums=0)(trainer)  # a donating train step
    fault(sampler, "scheduler")

    report = sampler.restart()
    assert report.restored == "none"
    with pytest.raises(WeightsLostError, match="push them"):
        greedy(sampler)
    sampler.update_params(placed(ckpts["b"], sampler))
    assert greedy(sampler) == tokens_b


def test_auto_restart_is_bounded(ckpts):
    s = SglangJaxSampler(
        config=SamplerConfig(
            model_path=str(ckpts["a"]),
            load_format="safetensors",
            context_length=128,
            max_running_requests=4,
            auto_restart=1,
        )
    )
    try:
        tokens = greedy(s)
        s._handle.run(generate_unchecked(s.engine.tokenizer_manager, **POISON_REQUESTS["detokenizer"]), 120)
        assert not s.healthy
        assert greedy(s) == tokens and s.healthy  # restarted by itself before the call
        fault(s, "scheduler")  # the one allowed restart is used up: the caller is told
    finally:
        s.shutdown()
