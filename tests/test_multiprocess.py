"""Several JAX processes, one engine (2 processes x 2 simulated CPU devices, loopback only):
a Tunix FSDP trainer spanning both pushes into a tp=4 engine spanning both. Each scenario
runs once as real processes (``sampler.launch``; tests/multiprocess_worker.py); the tests
check what each process reported against sglang-jax's own loader and a single-process
tp=4 engine in this process."""

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from sampler.launch import launch
from tests import helpers
from tests.multiprocess_worker import CYCLES, OWN_PROMPTS

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[1]
#: Generous bound on one launched scenario (s); a hang fails the test instead of the run.
RUN_TIMEOUT_S = 900


def run(scenario: str, path) -> list:
    results = launch(
        [sys.executable, "-m", "tests.multiprocess_worker", scenario, str(path)],
        nproc=2,
        devices_per_proc=2,
        timeout=RUN_TIMEOUT_S,
        cwd=str(ROOT),
    )
    return results


def reported(result) -> dict | None:
    lines = [line for line in result.output.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT ") :]) if lines else None


@pytest.fixture(scope="module")
def main_run(model_dir):
    path = model_dir("qwen3-4h")
    results = run("main", path)
    for r in results:
        assert r.returncode == 0 and not r.killed, f"rank {r.rank} failed:\n{r.output[-6000:]}"
    return path, [reported(r) for r in results]


@pytest.fixture(scope="module")
def single(model_dir, engines):
    """A single-process tp=4 engine on this process's 4 simulated devices, same checkpoint."""
    return engines.get(model_dir("qwen3-4h"), load_format="safetensors", tp_size=4)


def test_engine_and_trainer_span_both_processes(main_run):
    _, ranks = main_run
    for r in ranks:
        assert (r["devices"], r["local_devices"]) == (4, 2)
        assert r["trainer_devices"] == 4 and r["trainer_fully_addressable"] is False
    refused = ranks[1]["follower_generate"]
    assert "NotLeaderError" in refused and "collective_generation" in refused


def test_fsdp_trainer_push_equals_sglang_jax_loader(main_run):
    _, ranks = main_run
    for r in ranks:
        assert r["leaves_differing_from_loader"] == []
        assert r["shards_compared"] > 0
        assert r["push"]["aliased"] == 0 and r["push"]["copied"] > 0  # fp32 FSDP -> bf16 tensor-parallel
        assert r["fp_zeros"] != r["fp_loaded"]  # the push replaced zeros, it did not find the weights there


def test_fingerprint_equal_on_every_process_and_to_single_process(main_run, single):
    _, ranks = main_run
    expected = single.fingerprint()
    for r in ranks:
        assert r["fp_loaded"] == r["fp_pushed"] == r["fp_params"] == expected


def test_greedy_tokens_equal_single_process_tp4(main_run, single):
    _, ranks = main_run
    tokens, _ = helpers.greedy(single)
    assert ranks[0]["tokens_loaded"] == tokens
    assert ranks[0]["tokens_pushed"] == tokens


def test_zero_copy_per_process_where_shardings_are_equivalent(main_run):
    _, ranks = main_run
    for r in ranks:
        z = r["zero_copy"]
        assert z["copied"] == [] and z["aliased"] > 0
        assert z["all_shared"] and z["pointers_equal"] and z["pointers_compared"] >= 2 * z["aliased"]
        # replicated trainer leaves differ in partitioning: resharded (collectives), still exact
        assert r["replicated_push"]["copied"] > 0 and r["replicated_equal"]


def test_bad_tree_raises_on_every_process_and_changes_nothing(main_run):
    _, ranks = main_run
    for r in ranks:
        assert r["bad_tree"].startswith("ParamsMismatchError")
        assert "missing parameter for engine leaf model.layers.1.mlp.up_proj.weight" in r["bad_tree"]
        assert r["fp_after_bad"] == r["fp_before_bad"]
    # a tree only process 1 refuses: process 0 is told, nobody hangs
    assert ranks[1]["bad_on_rank1"].startswith("ParamsMismatchError")
    assert ranks[0]["bad_on_rank1"].startswith("PeerFailureError") and "process 1" in ranks[0]["bad_on_rank1"]


def test_collective_generation_gives_each_process_its_own_results(main_run, single):
    _, ranks = main_run
    for rank, r in enumerate(ranks):
        assert r["collective_tokens"] == helpers.greedy(single, OWN_PROMPTS[rank])[0]


def test_update_generate_cycles_agree_across_processes(main_run, single):
    _, ranks = main_run
    a, b = ranks[0]["cycles"], ranks[1]["cycles"]
    assert len(a) == len(b) == CYCLES
    assert [c["fp"] for c in a] == [c["fp"] for c in b]
    assert len({c["fp"] for c in a}) == CYCLES  # every cycle served new weights
    assert [c["version"] for c in a] == sorted(c["version"] for c in a)
    assert ranks[0]["fp_last_params"] == a[-1]["fp"]
    # the last cycle's weights in the single-process engine: the same fingerprint and tokens
    scale = 1.0 + 0.01 * CYCLES
    loaded = {p: x for p, x in single.engine_params().items() if p in single.weight_paths()}
    single.update_params({p: (x.astype(jnp.float32) * scale).astype(x.dtype) for p, x in loaded.items()})
    try:
        assert single.fingerprint() == a[-1]["fp"]
        for rank, r in enumerate((a, b)):
            assert r[-1]["tokens"] == helpers.greedy(single, OWN_PROMPTS[rank], steps=4)[0]
    finally:
        single.update_params(loaded)


def test_shutdown_in_either_order(main_run):
    _, ranks = main_run  # process 1 shut down first, then process 0 after a generation
    assert len(ranks[0]["tokens_before_shutdown"][0]) == 2
    for r in ranks:
        assert r["shutdown_s"] >= 0  # both returned; the fixture checked both exited 0


def test_a_killed_follower_is_reported_by_process_0(model_dir):
    results = run("kill1", model_dir("qwen3-4h"))
    assert results[1].returncode == -9
    r0 = reported(results[0])
    assert r0 is not None, results[0].output[-4000:]
    assert r0["error"].startswith("PeerFailureError") and "process 1" in r0["error"] and "heartbeat" in r0["error"]


def test_a_killed_process_0_is_reported_by_the_follower(model_dir):
    results = run("kill0", model_dir("qwen3-4h"))
    assert results[0].returncode == -9
    r1 = reported(results[1])
    out = results[1].output
    # JAX's coordination service lived in process 0: the follower is told by JAX (which then
    # ends it) or by our heartbeat check, whichever comes first; never a hang
    assert not results[1].killed, out[-4000:]
    assert (r1 is not None and "process 0" in (r1["error"] or "")) or "another task died" in out, out[-4000:]
