"""Cost of the reliability options, and a soak of update/generate cycles.

1. ``update_params(check_finite=True)`` vs the default, Qwen3-0.6B-shaped engine (28 layers,
   random weights), engine-layout bf16 source (the zero-copy path, where a check costs the
   most relative to the push) and Tunix-layout fp32 source; alternating rounds, medians.
2. Soak: a tiny Qwen3 engine, N cycles of (push set A or B, alternately aliased bf16 and
   converted fp32; fingerprint check; generate); prints cycles/s, fingerprint mismatches and
   the live device bytes over the run (flat = no leak).

Writes both tables to docs/benchmarks/results/reliability.json (``--skip-finite``: the soak alone,
reliability-soak.json; ``--json PATH`` elsewhere, ``--no-json`` not at all).

    .venv/bin/python benchmarks/reliability.py [--rounds 7] [--cycles 500]
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import functools
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import converters  # noqa: E402
from benchmarks.common import Results, add_output_args, num, write_qwen3_0_6b  # noqa: E402
from sampler import SamplerConfig, SglangJaxSampler  # noqa: E402
from sampler.sync.leaves import live_device_bytes  # noqa: E402
from sampler.tiny import write_tiny_model  # noqa: E402
from sampler.tunix.models import random_tunix_model  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def finite_check_cost(args, res: Results) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-rel-"))
    write_qwen3_0_6b(tmp)
    sampler = SglangJaxSampler(config=SamplerConfig(model_path=str(tmp), context_length=256, max_running_requests=2))
    try:
        spec = sampler.spec
        engine_sets = []
        tunix32_sets = []
        for seed in (args.seed, args.seed + 1):
            model = random_tunix_model(tmp, seed=seed, dtype=jnp.float32)
            state = nnx.state(model, nnx.Param)
            tunix32_sets.append(state)
            layout = converters.to_engine_layout(state, spec, dtype=jnp.bfloat16)
            shardings = sampler.engine_shardings()
            engine_sets.append({p: jax.device_put(x, shardings[p]) for p, x in layout.items()})
        rows = []
        for name, sets in (("engine layout bf16", engine_sets), ("Tunix layout fp32", tunix32_sets)):
            times = {False: [], True: []}
            for check in (False, True):  # warm-up: plans and the check's compilations
                sampler.update_params(sets[0], check_finite=check)
            for r in range(args.rounds):
                for check in (False, True) if r % 2 == 0 else (True, False):
                    src = sets[(r + check) % 2]
                    sampler.update_params(sets[1 - (r + check) % 2])  # steady state: the other set first
                    times[check].append(timed(functools.partial(sampler.update_params, src, check_finite=check)))
            base, checked = statistics.median(times[False]), statistics.median(times[True])
            rows.append((name, base, checked))
        size = sum(x.nbytes for x in engine_sets[0].values()) / 2**20
        res.context["check_finite_model_mib"] = size
        table = res.table(
            ["source", "update_params ms", "with check_finite ms", "added ms"],
            align=[None, "right", "right", "right"],
            key="check_finite",
            caption=f"check_finite cost, Qwen3-0.6B shape ({size:.0f} MiB bf16), {args.rounds} alternating rounds, "
            "median:",
        )
        for name, base, checked in rows:
            table.add(
                name,
                num(base * 1e3, "{:.1f}", "ms"),
                num(checked * 1e3, "{:.1f}", "ms"),
                num((checked - base) * 1e3, "{:.1f}", "ms"),
            )
        res.show(table)
    finally:
        sampler.shutdown()


def soak(args, res: Results) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    path_a = write_tiny_model(tmp / "a", "Qwen3ForCausalLM", seed=args.seed)
    path_b = write_tiny_model(tmp / "b", "Qwen3ForCausalLM", seed=args.seed + 1)
    sampler = SglangJaxSampler(config=SamplerConfig(model_path=str(path_a), context_length=128, max_running_requests=4))
    try:
        from safetensors.numpy import load_file

        shardings = sampler.engine_shardings()
        sets, sets32, prints = [], [], []
        for path in (path_a, path_b):
            layout = converters.to_engine_layout(load_file(str(path / "model.safetensors")), path)
            sets.append({p: jax.device_put(x, shardings[p]) for p, x in layout.items()})
            sets32.append({p: x.astype(jnp.float32) for p, x in sets[-1].items()})
            prints.append(converters.fingerprint(sets[-1]))
        params = {"max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True}
        sampler.update_params(sets[0])
        sampler.generate_ids([[5, 6, 7]], params)
        baseline = live_device_bytes()
        live, mismatches = [], 0
        t0 = time.perf_counter()
        for cycle in range(args.cycles):
            k = cycle % 2
            sampler.update_params(sets32[k] if cycle % 3 == 0 else sets[k])
            mismatches += sampler.fingerprint() != prints[k]
            sampler.generate_ids([[5, 6, 7], [9, 10]], params)
            live.append(live_device_bytes())
        elapsed = time.perf_counter() - t0
        first, last = live[: len(live) // 10], live[-len(live) // 10 :]
        mib = 2**20
        model_mib = sum(x.nbytes for x in sets[0].values()) / mib
        res.context["soak_model_mib"] = model_mib
        table = res.table(
            [
                "cycles",
                "s per cycle",
                "fingerprint mismatches",
                "live MiB at start",
                "live MiB min..max over the run",
                "max of first 10%",
                "max of last 10%",
            ],
            align=["right"] * 7,
            key="soak",
            caption=f"soak, tiny Qwen3 ({model_mib:.2f} MiB bf16), seed {args.seed}:",
        )
        table.add(
            args.cycles,
            num(elapsed / args.cycles * 1e3, "{:.1f} ms", "ms"),
            int(mismatches),
            num(baseline / mib, "{:.2f}", "MiB"),
            num([min(live) / mib, max(live) / mib], "{:.2f}..{:.2f}", "MiB"),
            num(max(first) / mib, "{:.2f}", "MiB"),
            num(max(last) / mib, "{:.2f}", "MiB"),
        )
        res.show(table)
    finally:
        sampler.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cycles", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-finite", action="store_true")
    add_output_args(ap)
    args = ap.parse_args()
    np.random.seed(args.seed)
    res = Results("reliability-soak" if args.skip_finite else "reliability", args)
    soak(args, res)  # first: its live-bytes baseline is then this engine alone
    if not args.skip_finite:
        finite_check_cost(args, res)
    res.emit()


if __name__ == "__main__":
    main()
