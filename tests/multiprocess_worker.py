"""One process of a multi-controller test program, started by ``sampler.multiprocess.launch`` (see
tests/test_multiprocess.py). Every process runs the same steps; each prints its findings
as one ``RESULT {json}`` line. Usage: python -m tests.multiprocess_worker SCENARIO MODEL_DIR
"""

import atexit
import contextlib
import json
import os
import signal
import sys
import time

from sampler import multiprocess

multiprocess.initialize()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from converters import ParamsMismatchError, fingerprint_params  # noqa: E402
from sampler import SamplerConfig, SglangJaxSampler  # noqa: E402
from sampler.errors import NotLeaderError, PeerFailureError  # noqa: E402
from sampler.sync.leaves import buffer_pointers  # noqa: E402
from sampler.tunix.models import load_tunix_model  # noqa: E402
from tests import helpers  # noqa: E402

P = jax.sharding.PartitionSpec
AUTO = jax.sharding.AxisType.Auto
RANK = jax.process_index()
#: Update/generate cycles of the soak step.
CYCLES = 20
#: A prompt per process for collective generation.
OWN_PROMPTS = {0: ["1+1="], 1: ["hello world the quick"]}
#: Special ids of the tiny tokenizer, the scale of their lm_head rows in the exact-ids step,
#: and that step's request (n answers per prompt).
SPECIAL_IDS = (0, 2)
SPECIAL_ROW_SCALE = 30.0
SPECIAL_PARAMS = {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True, "n": 2}
#: Bound on a late follower's waits for process 0 (ms); only a broken run reaches it.
LATE_FOLLOWER_WAIT_MS = 120_000
#: How often the unprotected late follower looks whether the coordination service is gone (s).
SERVICE_POLL_S = 0.05


_T0 = time.monotonic()


def step(name: str) -> None:
    """Progress on stderr (the launcher shows it when a run fails)."""
    print(f"[{time.monotonic() - _T0:7.1f} s] {name}", file=sys.stderr, flush=True)


def sampler(path) -> SglangJaxSampler:
    return SglangJaxSampler(
        config=SamplerConfig(
            model_path=str(path),
            load_format="safetensors",
            tp_size=jax.device_count(),
            context_length=128,
            max_running_requests=4,
        )
    )


def shards(x) -> dict[str, np.ndarray]:
    """This process's shards of a global array, keyed by their index in the global array."""
    return {str(s.index): helpers.bits(np.asarray(s.data)) for s in x.addressable_shards}


def same_shards(a, b) -> bool:
    sa, sb = shards(a), shards(b)
    return sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


def greedy_ids(s, prompts, steps=8):
    return [t.tolist() for t in s(prompts, max_generation_steps=steps, temperature=0.0).tokens]


def main_scenario(path) -> dict:
    out: dict = {"devices": jax.device_count(), "local_devices": jax.local_device_count()}
    s = sampler(path)
    weights = s.weight_paths()
    print("engine mesh", s.mesh.devices.tolist(), file=sys.stderr)
    # the oracle: what sglang-jax's own loader put in this process's shards
    loaded = {p: s.engine_params()[p] for p in weights}
    loaded = {p: jax.device_put(x, x.sharding, may_alias=False) for p, x in loaded.items()}  # kept copies
    step("engine started")
    out["fp_loaded"] = s.fingerprint()
    if RANK == 0:
        out["tokens_loaded"] = greedy_ids(s, helpers.PROMPTS)
    else:
        try:
            s(["1+1="], max_generation_steps=2)
        except NotLeaderError as e:
            out["follower_generate"] = f"NotLeaderError: {e}"
    s.barrier("generated")

    step("generated")
    # A Tunix Qwen3 trainer, FSDP-sharded over the 4 global devices, fp32 master params.
    mesh = jax.make_mesh((jax.device_count(), 1), ("fsdp", "tp"), axis_types=(AUTO, AUTO))
    with mesh:
        model = load_tunix_model(path, mesh=mesh)
    state = nnx.state(model, nnx.Param)
    leaf = jax.tree_util.tree_leaves(state)[0]
    out["trainer_devices"] = len(leaf.sharding.device_set)
    out["trainer_fully_addressable"] = leaf.is_fully_addressable
    step("trainer loaded")
    zeros = {p: jax.jit(jnp.zeros_like, out_shardings=x.sharding)(x) for p, x in loaded.items()}
    s.update_params(zeros)
    out["fp_zeros"] = s.fingerprint()
    step("zeros pushed")
    report = s.update_params(state)
    out["push"] = {"aliased": len(report.aliased), "copied": len(report.copied), "version": report.version}
    served = s.engine_params()
    out["leaves_differing_from_loader"] = [p for p in weights if not same_shards(served[p], loaded[p])]
    out["shards_compared"] = sum(len(served[p].addressable_shards) for p in weights)
    out["fp_pushed"] = s.fingerprint()
    out["fp_params"] = fingerprint_params(state, s.spec)
    if RANK == 0:
        out["tokens_pushed"] = greedy_ids(s, helpers.PROMPTS)
    s.barrier("generated pushed")

    step("trainer pushed")
    # bf16 engine layout on the trainer's own mesh (other axis names, same devices and
    # partitioning): every leaf aliased, on every process
    trainer_mesh = jax.make_mesh((1, jax.device_count()), ("dp", "model"), axis_types=(AUTO, AUTO))
    print("trainer mesh", trainer_mesh.devices.tolist(), file=sys.stderr)
    rename = {"data": "dp", "tensor": "model"}
    layout = {}
    for p, x in loaded.items():
        spec = P(*(rename.get(a, a) if a else None for a in x.sharding.spec))
        layout[p] = jax.device_put(x, jax.sharding.NamedSharding(trainer_mesh, spec), may_alias=False)
    report = s.update_params(layout)
    served = s.engine_params()
    out["zero_copy"] = {
        "copied": report.copied,
        "aliased": len(report.aliased),
        "all_shared": s.verify_sharing(layout).all_shared,
        "pointers_equal": all(buffer_pointers(layout[p]) == buffer_pointers(served[p]) for p in weights),
        "pointers_compared": sum(len(buffer_pointers(layout[p])) for p in weights),
    }
    step("zero-copy pushed")
    # replicated trainer leaves: resharded through collectives, every process its part
    replicated = {p: jax.device_put(x, jax.sharding.NamedSharding(trainer_mesh, P())) for p, x in layout.items()}
    report = s.update_params(replicated)
    out["replicated_push"] = {"copied": len(report.copied), "aliased": len(report.aliased)}
    out["replicated_equal"] = all(same_shards(s.engine_params()[p], loaded[p]) for p in weights)
    step("replicated pushed")
    fp = s.fingerprint()

    step("fingerprinted")
    # bad trees: on every process alike, and on one process only; nothing changes
    bad = dict(layout)
    del bad["model.layers.1.mlp.up_proj.weight"]
    try:
        s.update_params(bad)
        out["bad_tree"] = "accepted"
    except ParamsMismatchError as e:
        out["bad_tree"] = f"ParamsMismatchError: {e}"
    one_bad = bad if RANK == 1 else layout
    try:
        s.update_params(one_bad)
        out["bad_on_rank1"] = "accepted"
    except (ParamsMismatchError, PeerFailureError) as e:
        out["bad_on_rank1"] = f"{type(e).__name__}: {e}"
    # an in-flight policy: refused on every process before the tree is even checked
    try:
        s.update_params(bad, in_flight="continue")
        out["continue_policy"] = "accepted"
    except ValueError as e:
        out["continue_policy"] = f"ValueError: {e}"
    out["fp_after_bad"] = s.fingerprint()
    out["fp_before_bad"] = fp

    step("bad trees refused")
    # collective generation: every process its own prompts, process 0 runs them
    with s.collective_generation():
        out["collective_tokens"] = greedy_ids(s, OWN_PROMPTS[RANK])

    step("collective generation")
    # exact rollout data: lm_head rows of special ids scaled up, so answers hold them mid-way;
    # every process gets all n answers of its own prompts, ids one to one with their logprobs
    head = loaded["lm_head.embedding"]
    factor = jnp.ones(head.shape[0], jnp.float32).at[jnp.asarray(SPECIAL_IDS)].set(SPECIAL_ROW_SCALE)
    special = {
        **loaded,
        "lm_head.embedding": jax.jit(lambda x: (x.astype(jnp.float32) * factor[:, None]).astype(x.dtype))(head),
    }
    s.update_params(special)
    with s.collective_generation():
        answers = s.generate_ids([s.tokenize(p) for p in OWN_PROMPTS[RANK]], SPECIAL_PARAMS)
    out["special_answers"] = [
        {
            "ids": a["output_ids"],
            "logprob_ids": helpers.tokens_of(a),
            "completion_tokens": a["meta_info"]["completion_tokens"],
        }
        for a in answers
    ]
    step("special ids")
    # update/generate cycles, fingerprints compared across processes every cycle
    scale = jax.jit(lambda x, f: (x.astype(jnp.float32) * f).astype(x.dtype))
    cycles = []
    for i in range(CYCLES):
        params = {p: scale(x, 1.0 + 0.01 * (i + 1)) for p, x in loaded.items()}
        report = s.update_params(params)
        with s.collective_generation():
            tokens = greedy_ids(s, OWN_PROMPTS[RANK], steps=4)
        cycles.append({"version": report.version, "fp": s.fingerprint(), "tokens": tokens})
    out["cycles"] = cycles
    out["fp_last_params"] = fingerprint_params(params, s.spec)

    step("cycles done")
    # shutdown in either order: the follower first (it waits for process 0's engine to stop)
    t0 = time.monotonic()
    if RANK == 0:
        out["tokens_before_shutdown"] = greedy_ids(s, helpers.PROMPTS[:1], steps=2)
    s.shutdown()
    out["shutdown_s"] = time.monotonic() - t0
    return out


def kill_scenario(path, victim: int) -> dict:
    """Process ``victim`` dies (SIGKILL) before the other's next update_params."""
    s = sampler(path)
    params = {p: jax.device_put(x, x.sharding, may_alias=False) for p, x in s.engine_params().items()}
    s.update_params(params)
    s.fingerprint()
    if RANK == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    if victim != 0:
        # arrive after JAX's own heartbeat timeout and our silence bound have both passed:
        # the survivor must still be alive, and told at once (not after another silence)
        time.sleep(multiprocess.HEARTBEAT_TIMEOUT_S + multiprocess.PEER_SILENCE_S)
    t0 = time.monotonic()
    try:
        s.update_params(params)
        result = {"error": None}
    except Exception as e:  # noqa: BLE001
        result = {"error": f"{type(e).__name__}: {e}"}
    result["seconds"] = time.monotonic() - t0
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # the coordination service is gone or about to end this process


def late_follower_scenario(protected: bool) -> dict:
    """The follower leaves strictly after process 0 has begun to exit. ``protected``: with
    ``outlive_followers`` (process 0 waits for it); else without it, and the follower leaves
    only once process 0's coordination service is gone (what the workaround prevents)."""
    from sampler.compat import multinode

    client = multinode.distributed_client()
    if not protected:
        atexit.unregister(multinode.outlive_followers)
        if RANK == 0:  # announce the exit as outlive_followers would, then leave at once
            atexit.register(client.key_value_set, multinode.LEADER_EXITING_KEY, "1")
    if RANK != 0:
        deadline = time.monotonic() + LATE_FOLLOWER_WAIT_MS / 1e3
        # unprotected, the service may be gone before the key is read: the calls then raise
        with contextlib.nullcontext() if protected else contextlib.suppress(Exception):
            client.blocking_key_value_get(multinode.LEADER_EXITING_KEY, LATE_FOLLOWER_WAIT_MS)
            while not protected and time.monotonic() < deadline:
                client.key_value_try_get(multinode.LEADER_EXITING_KEY)
                time.sleep(SERVICE_POLL_S)
    return {"rank": RANK}


def main() -> None:
    scenario, path = sys.argv[1], sys.argv[2]
    if scenario == "main":
        result = main_scenario(path)
    elif scenario.startswith("late_follower"):
        result = late_follower_scenario(protected=scenario == "late_follower")
    elif scenario.startswith("kill"):
        result = kill_scenario(path, victim=int(scenario[len("kill") :]))
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
