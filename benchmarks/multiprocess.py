"""The same push into a tp=4 engine from one process (4 devices) and from two processes
(2 x 2 devices, one engine spanning both, ``sampler.multiprocess.launch`` on loopback).

Two pushes, each timed (median of ``--runs``, after one untimed push of the same kind):
- "fsdp tunix bf16": a Tunix Qwen3 model FSDP-sharded over the 4 devices (every leaf is
  resharded to the engine's tensor-parallel placement: JAX collectives, across processes
  in the two-process run);
- "engine layout": bf16 params already placed like the engine's leaves (aliased: no copy).

"bytes written by the process" is the kernel's count of bytes this process passed to
write/send calls during the push (``/proc/self/io`` wchar): in the two-process run the data
that crossed to the other process over loopback, plus the coordination messages; it is the
bytes moved between processes, expected about 0 when every leaf is aliased.

    python benchmarks/multiprocess.py [--runs 5] [--layers 28] [--hidden 1024]

Writes the table to docs/benchmarks/results/multiprocess.json (``--json PATH`` elsewhere,
``--no-json`` not at all).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MiB = 1 << 20

from benchmarks.common import Results, add_output_args, num  # noqa: E402


def _wchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def worker(args) -> None:
    """Runs in every process (one with 4 devices, or each of two with 2)."""
    from sampler import multiprocess

    multiprocess.initialize()
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sampler import SamplerConfig, SglangJaxSampler
    from sampler.tunix.models import load_tunix_model

    auto = (jax.sharding.AxisType.Auto,) * 2
    s = SglangJaxSampler(config=SamplerConfig(model_path=args.model, tp_size=jax.device_count(), context_length=128))
    mesh = jax.make_mesh((jax.device_count(), 1), ("fsdp", "tp"), axis_types=auto)
    with jax.set_mesh(mesh):
        # Tunix's HF loader (its random-model creator fails across processes: device_put to one Device)
        state = nnx.state(load_tunix_model(args.model, dtype=jnp.bfloat16, mesh=mesh), nnx.Param)
    s.update_params(state)
    layout = {
        p: jax.jit(lambda x: x + 0, out_shardings=x.sharding)(x)
        for p, x in s.engine_params().items()
        if p in s.weight_paths()
    }
    rows = {}
    for name, params in (("fsdp tunix bf16", state), ("engine layout", layout)):
        s.update_params(params)  # untimed: plans and compiles
        times, written, copied = [], [], 0
        for _ in range(args.runs):
            w0, t0 = _wchar(), time.perf_counter()
            report = s.update_params(params)
            times.append(time.perf_counter() - t0)
            written.append(_wchar() - w0)
            copied = report.copied_bytes
        rows[name] = {"ms": statistics.median(times) * 1e3, "written": statistics.median(written), "copied": copied}
    s.barrier("measured")
    where = {"backend": jax.default_backend(), "devices": jax.device_count(), "processes": jax.process_count()}
    print("ROWS " + json.dumps({"rank": jax.process_index(), "rows": rows, "jax": where}), flush=True)
    s.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--hidden", type=int, default=1024)  # with 28 layers: Qwen3-0.6B's shape
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    add_output_args(ap)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    from sampler.multiprocess.launch import launch
    from sampler.tiny import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_model(
            tmp,
            "Qwen3ForCausalLM",
            seed=args.seed,
            num_layers=args.layers,
            hidden_size=args.hidden,
            num_heads=8,
            num_kv_heads=4,
            intermediate_size=3 * args.hidden,
            tie_word_embeddings=True,
        )
        cmd = [sys.executable, __file__, "--worker", "--model", tmp, "--runs", str(args.runs), "--seed", str(args.seed)]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
        single = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        runs = {"1 process x 4 devices": [single.stdout]}
        multi = launch(cmd, nproc=2, devices_per_proc=2, cwd=str(ROOT))
        runs["2 processes x 2 devices"] = [r.output for r in multi]
    shape = f"Qwen3 {args.layers} layers, hidden {args.hidden}, bf16"
    res = Results("multiprocess", args, context={"failed": [], "jax": {}})
    table = res.table(
        ["push", "processes", "median ms", "bytes copied (plan)", "bytes written by each process"],
        align=[None, None, "right", "right", "right"],
        key="pushes",
        caption=f"{shape}; tp=4 engine; median of {args.runs}, seed {args.seed}",
    )
    for label, outputs in runs.items():
        found = [json.loads(line[5:]) for out in outputs for line in out.splitlines() if line.startswith("ROWS ")]
        if not found:
            print(f"| ({label} failed) | | | | |\n" + "\n".join(o[-3000:] for o in outputs), file=sys.stderr)
            res.context["failed"].append(label)
            continue
        res.context["jax"][label] = found[0].get("jax")
        for name in found[0]["rows"]:
            ms = max(f["rows"][name]["ms"] for f in found)
            ranks = sorted(found, key=lambda f: f["rank"])
            written = [f["rows"][name]["written"] / MiB for f in ranks]
            copied = found[0]["rows"][name]["copied"] / MiB
            table.add(
                name,
                label,
                num(ms, "{:.1f}", "ms"),
                num(copied, "{:.1f} MiB", "MiB"),
                num(written, " / ".join(["{:.2f} MiB"] * len(written)), "MiB"),
            )
    workers = [w for w in res.context["jax"].values() if w]
    if workers:  # the parent starts no JAX backend: the workers' is the one measured
        res.machine_extra = {"jax_backend": workers[0]["backend"], "jax_device_count": workers[0]["devices"]}
    res.emit()


if __name__ == "__main__":
    main()
