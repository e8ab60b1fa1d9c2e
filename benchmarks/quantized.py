"""Quantized rollout: a bf16 Tunix trainer pushed into int8 and fp8 engines, against its limit.

One process, three engines of a Qwen3-0.6B-shaped model (28 layers, hidden 1024, 16/8 heads,
head_dim 128, vocab 151936, tied; random weights, config made locally): bf16, int8 (sglang-jax's
``int8.yaml``) and fp8 (``fp8_w8a8.yaml``), each on the default SamplerConfig plus
``quantization``. Every push is the same bf16 Tunix state, alternating engines, timed in its
steady state (after an untimed push of the same kind). Per engine: the median push, the bytes
it reads (the trainer's leaves it converts) and writes (the engine leaves it replaces), a
memcpy moving the same bytes in the same run (the bandwidth limit of any pass that reads and
writes them once), the peak extra live memory, and the engine's weight memory against bf16.
Writes docs/benchmarks/results/quantized.json (``--json PATH`` elsewhere, ``--no-json`` not at all).

    python benchmarks/quantized.py [--runs 7] [--layers 28] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import MiB, Results, add_output_args, memcpy_seconds, num, write_qwen3_0_6b  # noqa: E402
from flax import nnx  # noqa: E402

from sampler import SamplerConfig, SglangJaxSampler  # noqa: E402
from sampler.tunix.models import random_tunix_model  # noqa: E402

#: (row label, SamplerConfig.quantization)
ENGINES = [("bf16", None), ("int8", "int8"), ("fp8", "fp8_w8a8")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--seed", type=int, default=0)
    add_output_args(ap)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-quantized-"))
    write_qwen3_0_6b(tmp, args.layers)
    samplers = {
        label: SglangJaxSampler(
            config=SamplerConfig(model_path=str(tmp), context_length=256, max_running_requests=2, quantization=q)
        )
        for label, q in ENGINES
    }
    state = nnx.state(random_tunix_model(tmp, seed=args.seed, dtype=jnp.bfloat16), nnx.Param)
    jax.block_until_ready(state)
    reports = {label: s.update_params(state) for label, s in samplers.items()}  # warm-up: plans, compiles
    reports = {label: s.update_params(state) for label, s in samplers.items()}

    # bytes read (sources of converted leaves) and written (engine leaves replaced), per engine
    source_bytes = [x.nbytes for x in jax.tree_util.tree_leaves(state)]
    moved = {}
    for label, s in samplers.items():
        read = sum(source_bytes[i] for e in s.sync.plan_for(state).copied for i in e.source_indexes)
        moved[label] = (read, reports[label].copied_bytes)

    times: dict[str, list[float]] = {label: [] for label in samplers}
    labels = list(samplers)
    for r in range(args.runs):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:  # rotate the order
            s = samplers[label]
            s.update_params(state)
            t0 = time.perf_counter()
            s.update_params(state)
            times[label].append(time.perf_counter() - t0)
    limits = {label: memcpy_seconds(max(4, (read + written) // 2)) for label, (read, written) in moved.items()}
    peaks = {label: s.update_params(state, track_peak_memory=True).peak_extra_bytes for label, s in samplers.items()}
    weights = {label: sum(x.nbytes for x in s.engine_params().values()) for label, s in samplers.items()}
    linear_bytes = {
        label: sum(x.nbytes for p, x in s.engine_params().items() if _is_linear(p, x)) for label, s in samplers.items()
    }
    med = {label: statistics.median(t) for label, t in times.items()}

    res = Results(
        "quantized",
        args,
        context={
            "engine_weight_bytes": weights,
            "linear_weight_bytes": linear_bytes,
            "bytes_read_written": moved,
        },
    )
    table = res.table(
        [
            "engine",
            "median push ms",
            "vs bf16 push",
            "bytes read + written",
            "memcpy of those bytes ms",
            "push vs that memcpy",
            "extra memory: live arrays",
            "engine weights",
            "vs bf16 engine",
            "linear layers (values + scales)",
            "vs bf16 linear layers",
        ],
        align=[None] + ["right"] * 10,
        key="pushes",
        caption=(
            f"Qwen3-0.6B-shaped ({args.layers} layers), bf16 Tunix trainer state, JAX {jax.__version__} on "
            f"{jax.devices()[0].platform} ({os.cpu_count()} cores), default SamplerConfig plus quantization, "
            f"{args.runs} alternating rounds, seed {args.seed}"
        ),
    )
    for label, _ in ENGINES:
        read, written = moved[label]
        table.add(
            label,
            num(med[label] * 1e3, "{:.1f}", "ms"),
            num(med[label] / med["bf16"], "{:.2f}x", "x"),
            num((read + written) / MiB, "{:.0f} MiB", "MiB"),
            num(limits[label] * 1e3, "{:.1f}", "ms") if read + written else "n/a (nothing copied)",
            num(med[label] / limits[label], "{:.2f}x", "x") if read + written else "n/a",
            num(peaks[label] / MiB, "{:.0f} MiB", "MiB"),
            num(weights[label] / MiB, "{:.0f} MiB", "MiB"),
            num(weights[label] / weights["bf16"], "{:.2f}x", "x"),
            num(linear_bytes[label] / MiB, "{:.0f} MiB", "MiB"),
            num(linear_bytes[label] / linear_bytes["bf16"], "{:.3f}x", "x"),
        )
    table.note(
        "a memcpy of N bytes reads N and writes N: the limit column is a memcpy of (read + written) / 2 bytes, "
        "measured in this run; the bf16 engine aliases or views most Tunix leaves on CPU (nothing read or written)"
    )
    res.emit()
    for s in samplers.values():
        s.shutdown()


def _is_linear(path: str, x) -> bool:
    """A linear layer's weight: bf16 (in, out) ``weight``, or a quantized one's values and scale."""
    last = path.rpartition(".")[2]
    return last in ("weight_q", "weight_scale") or (last == "weight" and x.ndim == 2)


if __name__ == "__main__":
    main()
