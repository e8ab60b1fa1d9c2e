"""How long update_params blocks the trainer with K requests of L tokens in flight, under
in_flight="drain", "continue" and "recompute", with the limits measured in the same run.

For each model: an engine on the default SamplerConfig (only the model path and the KV
sizing are given; radix cache on), a Tunix-layout trainer state (random weights; float32,
as Tunix trains, so every leaf is cast to the engine's bf16). Each timed round: K greedy
requests of L tokens start together (one prefill batch), the scheduler is parked once they
hold L/2 tokens, released, and update_params is called at once; the time until it returns
is what the trainer waits. Limits, same run, same engine:

- idle-engine push: update_params with nothing in flight;
- one decode step of the K requests (scheduler batches timed while they run, from launch to
  processed result);
- one decode iteration of the scheduler with the K requests (launch to the next launch: the
  step plus the scheduler's own work around it). The benchmark calls update_params just as
  an iteration begins, so a swap between iterations waits for a whole one;
- one prefill of the K requests, prompt + L/2 tokens each (the re-prefill "recompute" runs).

Two rows explain what "continue" pays beyond those, both from the "drain" rounds with the
scheduler parked right after a decode step, before their own swap:

- the step tail: CPU time the process still spends once the step's result is out, until it
  goes quiet (at the Qwen3-0.6B shape on the CPU backend: XLA's threads unmapping the step's
  temporaries). A swap made right after a step shares the cores with it, an idle push does not;
- an in_flight="continue" push made after the tail is over (the scheduler is already parked,
  so it does not wait): the write with requests in flight, nothing else running.

Targets (issue 16): "continue" <= idle push + one decode step; "recompute" <= that + one
prefill; each also against the decode iteration in place of the step. A fixed seed, medians
over ``--runs`` rounds after one warm-up round per mode.

    python benchmarks/inflight.py [--runs 5] [--models tiny qwen3-0.6b] [--smoke]

Writes the table to docs/benchmarks/results/inflight-<models>.json (inflight-tiny.json for
``--models tiny``, inflight-tiny-qwen3-0.6b.json by default, inflight-smoke.json for ``--smoke``;
``--json PATH`` elsewhere, ``--no-json`` not at all).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import QWEN3_0_6B, Results, add_output_args, num  # noqa: E402
from sampler import SamplerConfig, SglangJaxSampler  # noqa: E402
from sampler.compat.scheduler import held_requests, record_batch_seconds, tokens_generated  # noqa: E402
from sampler.tiny import write_tiny_model  # noqa: E402
from sampler.tunix.models import random_tunix_model  # noqa: E402

MODES = ("drain", "continue", "recompute")
PROMPT = [5, 17, 42, 99, 7, 3, 1, 4]
#: Generous bound on any wait here (only a broken engine reaches it).
WAIT_BOUND_S = 600
#: The step tail: polled every TAIL_POLL_S, over once a poll adds less than TAIL_QUIET_CPU_S of
#: CPU time (an idle parked engine adds next to none), cut off after TAIL_MAX_S.
TAIL_POLL_S, TAIL_QUIET_CPU_S, TAIL_MAX_S = 0.02, 0.002, 5.0


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    k: int  # requests in flight
    length: int  # tokens per request
    config: dict  # write_tiny_model overrides


CASES = {
    "tiny": Case("tiny Qwen3 (2 layers, hidden 128)", 8, 512, {}),
    "qwen3-0.6b": Case("Qwen3-0.6B shape (28 layers, hidden 1024)", 4, 64, QWEN3_0_6B),
}
SMOKE = {"tiny": Case("tiny Qwen3 (smoke sizes)", 2, 16, {})}


def send_async(sampler, ids: list[int], n: int):
    """One greedy request of ``n`` tokens straight to the engine; a concurrent future."""
    import asyncio

    params = {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}
    return asyncio.run_coroutine_threadsafe(
        sampler.engine.async_generate(input_ids=ids, sampling_params=params), sampler.event_loop
    )


def start_requests(sampler, k: int, length: int) -> list:
    """K greedy requests of ``length`` tokens, prefilled together in one batch."""
    park = sampler._handle.park
    assert park.park(WAIT_BOUND_S), "the scheduler did not park"
    try:
        futures = [send_async(sampler, PROMPT[: 4 + i % 4] + [i], length) for i in range(k)]
        tm = sampler.engine.tokenizer_manager
        deadline = time.monotonic() + WAIT_BOUND_S
        while len(tm.rid_to_state) < k:  # all sent before the scheduler looks again
            assert time.monotonic() < deadline
            time.sleep(0.001)
    finally:
        park.release()
    return futures


def hold_until(sampler, k: int, tokens: int, while_parked: Callable[[], Any] | None = None) -> Any:
    """Return once the K requests hold ``tokens`` tokens each (the scheduler then runs on);
    ``while_parked()``, if given, runs before it does, and its result is returned."""
    scheduler = sampler._handle.scheduler
    hold = sampler._handle.park.park_when(
        lambda: len(held := held_requests(scheduler)) == k and min(map(tokens_generated, held)) >= tokens
    )
    try:
        assert hold.wait(WAIT_BOUND_S), "the requests never reached the swap point"
        return while_parked() if while_parked is not None else None
    finally:
        hold.release()


def settled(sampler, state) -> tuple[float, float]:
    """With the scheduler parked right after a decode step: (CPU seconds of the step tail, then
    seconds of an in_flight="continue" update_params made once it is over, which finds the
    scheduler already parked and so does not wait). Measured in "drain" rounds, before their
    own swap: neither is part of any timed swap."""
    tail = step_tail_cpu_seconds()
    t0 = time.perf_counter()
    sampler.update_params(state, in_flight="continue")
    return tail, time.perf_counter() - t0


def step_tail_cpu_seconds() -> float:
    """CPU seconds this process (all threads) spends once the scheduler has parked right after
    a decode step, until it goes quiet: the step's work that outlasts its result (on the CPU
    backend, XLA's threads freeing the step's temporaries). An update_params made at that
    moment shares the cores with it; an idle-engine push never meets it."""
    start = last = time.process_time()
    deadline = time.monotonic() + TAIL_MAX_S
    while time.monotonic() < deadline:
        time.sleep(TAIL_POLL_S)
        now = time.process_time()
        if now - last < TAIL_QUIET_CPU_S:  # one quiet poll: the tail is over
            return now - start
        last = now
    return time.process_time() - start


def timed_round(sampler, state, case: Case, mode: str, batches: list) -> tuple[float, float, tuple | None]:
    """One round: (seconds update_params blocked, seconds of the prefill right after it, and
    in "drain" rounds the step tail with an in-flight push made after it; see ``settled``)."""
    futures = start_requests(sampler, case.k, case.length)
    measure_settled = (lambda: settled(sampler, state)) if mode == "drain" else None
    after_tail = hold_until(sampler, case.k, case.length // 2, measure_settled)
    mark = len(batches)
    t0 = time.perf_counter()
    sampler.update_params(state, in_flight=mode)
    blocked = time.perf_counter() - t0
    for f in futures:
        f.result(WAIT_BOUND_S)
    # the re-prefill of the retracted requests: after the decode steps that ran before the
    # swap, the prefill batches up to the next decode step (a long prefill comes in chunks)
    after = itertools.dropwhile(lambda b: b[0] == "decode", batches[mark:])
    reprefill = list(itertools.takewhile(lambda b: b[0] == "prefill", after))
    return blocked, (sum(b[2] for b in reprefill) if reprefill else float("nan")), after_tail


def measure(key: str, case: Case, runs: int, seed: int) -> list[tuple[str, float]]:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-inflight-{key}-"))
    write_tiny_model(tmp, "Qwen3ForCausalLM", weights=False, **case.config)
    context = len(PROMPT) + 1 + case.length + 16
    sampler = SglangJaxSampler(
        config=SamplerConfig(model_path=str(tmp), context_length=context, max_running_requests=case.k)
    )
    state = nnx.state(random_tunix_model(tmp, seed=seed, dtype=jnp.float32), nnx.Param)
    jax.block_until_ready(state)
    batches = record_batch_seconds(sampler._handle.scheduler)
    idle, blocked, reprefill, tails, settled_pushes = [], {m: [] for m in MODES}, [], [], []
    warm = 0
    for r in range(runs + 1):  # round 0 warms up: compiles, plans, prefill shapes
        if r == 1:
            warm = len(batches)
        sampler.update_params(state)
        t0 = time.perf_counter()
        sampler.update_params(state)
        idle.append(time.perf_counter() - t0)
        for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:  # rotate the order
            seconds, prefill, after_tail = timed_round(sampler, state, case, mode, batches)
            if r:
                blocked[mode].append(seconds)
                if mode == "recompute":
                    reprefill.append(prefill)
                if mode == "drain":
                    tails.append(after_tail[0])
                    settled_pushes.append(after_tail[1])
    measured = batches[warm:]
    decode = [s for kind, n, s, _ in measured if kind == "decode" and n == case.k]
    # launch to next launch of two decode batches of all K in a row; the two per round and
    # mode that span a park (the hold, the swap) are a few percent of them: the median stands
    iteration = [
        b[3] - a[3] for a, b in zip(measured, measured[1:]) if a[0] == b[0] == "decode" and a[1] == b[1] == case.k
    ]
    sampler.shutdown()
    push, step, prefill = statistics.median(idle[1:]), statistics.median(decode), statistics.median(reprefill)
    loop = statistics.median(iteration)
    rows = [
        (f"update_params blocks, in_flight={m!r}, {case.k} requests at token {case.length // 2}", blocked[m])
        for m in MODES
    ]
    rows = [(label, statistics.median(times)) for label, times in rows]
    rows += [
        ("limit: idle-engine push (nothing in flight)", push),
        (f"limit: one decode step of the {case.k} requests (launch to processed result)", step),
        (f"limit: one decode iteration of the scheduler, {case.k} requests (launch to next launch)", loop),
        (f"limit: one prefill of the {case.k} requests (prompt + {case.length // 2} tokens)", prefill),
        (
            "cause: CPU time the engine still spends after a decode step's result is out (step tail)",
            statistics.median(tails),
        ),
        (
            f"check: in_flight='continue' push, {case.k} requests parked, once the step tail is over (no wait)",
            statistics.median(settled_pushes),
        ),
        ("target 'continue': idle push + one decode step", push + step),
        ("target 'recompute': idle push + one decode step + one prefill", push + step + prefill),
        ("target 'continue', per iteration: idle push + one decode iteration", push + loop),
        ("target 'recompute', per iteration: idle push + one decode iteration + one prefill", push + loop + prefill),
    ]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 requests of 16 tokens, 1 run")
    add_output_args(ap)
    args = ap.parse_args()
    cases = SMOKE if args.smoke else {k: CASES[k] for k in args.models}
    runs = 1 if args.smoke else args.runs
    res = Results(
        "inflight-smoke" if args.smoke else "inflight-" + "-".join(cases),
        args,
        context={
            "runs": runs,
            "cases": {key: {"name": c.name, "k": c.k, "length": c.length} for key, c in cases.items()},
        },
    )
    table = res.table(
        ["model", "K x L", "what is measured", "median ms"],
        align=[None, None, None, "right"],
        key="inflight",
        stream=True,  # one model's rows as soon as they are measured
        caption=(
            f"JAX {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores), default SamplerConfig, "
            f"Tunix-layout float32 trainer state, {runs} rounds after a warm-up, seed {args.seed}"
        ),
    )
    for key, case in cases.items():
        for label, seconds in measure(key, case, runs, args.seed):
            table.add(case.name, num([case.k, case.length], "{} x {}"), label, num(seconds * 1e3, "{:.1f}", "ms"))
    res.emit()


if __name__ == "__main__":
    main()
