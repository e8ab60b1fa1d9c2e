"""What each weight sync of ``training_examples.async_grpo`` waits for, sync by sync.

Runs the asynchronous GRPO example (one mode) and records, for every ``update_params``:
the time until the scheduler reached an iteration boundary (``UpdateReport.wait_seconds``),
the time the swap took once there, the XLA compiles that ended inside the sync (JAX's
backend-compile events, with the thread that compiled) and the full (generation-2) Python
garbage collections that overlapped it (``gc.callbacks``, with their thread).

    python benchmarks/async_syncs.py [--mode in-flight] [--steps 6] [--no-precompile]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
from jax._src.dispatch import BACKEND_COMPILE_EVENT  # noqa: E402

from sampler import core  # noqa: E402
from training_examples import async_grpo  # noqa: E402

#: Only full collections: the young generations take microseconds.
OLDEST_GENERATION = 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="in-flight", choices=async_grpo.MODES)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="runs/async_syncs")
    ap.add_argument("--no-precompile", action="store_true")
    args = ap.parse_args()

    compiles: list[tuple[float, float, str]] = []  # (end, seconds, thread)
    collections: list[tuple[float, float, str]] = []  # (start, end, thread)
    syncs: list[tuple[float, float, object]] = []  # (start, end, report)
    started: dict[int, float] = {}

    def on_event(event: str, seconds: float, **_: object) -> None:
        if event == BACKEND_COMPILE_EVENT:
            compiles.append((time.perf_counter(), seconds, threading.current_thread().name))

    def on_gc(phase: str, info: dict) -> None:
        ident = threading.get_ident()
        if phase == "start":
            started[ident] = time.perf_counter()
        elif info.get("generation") == OLDEST_GENERATION and ident in started:
            collections.append((started.pop(ident), time.perf_counter(), threading.current_thread().name))

    jax.monitoring.register_event_duration_secs_listener(on_event)
    gc.callbacks.append(on_gc)
    update_params = core.WeightSync.update_params

    def timed_update_params(self, *a, **k):
        t0 = time.perf_counter()
        report = update_params(self, *a, **k)
        syncs.append((t0, time.perf_counter(), report))
        return report

    core.WeightSync.update_params = timed_update_params
    async_grpo.run(
        args.mode, args.steps, args.workdir, seed=args.seed, precompile=not args.no_precompile, verbose=False
    )
    print(f"async_grpo {args.mode}, {args.steps} steps, seed {args.seed}, precompile {not args.no_precompile}\n")
    print(
        "| update | update_params ms | wait for an iteration boundary ms | compiles inside (ms, thread) "
        "| full GCs overlapping (ms, thread) |"
    )
    print("|---:|---:|---:|---|---|")
    for i, (t0, t1, report) in enumerate(syncs):
        inside = [f"{1e3 * s:.0f} {th}" for end, s, th in compiles if t0 <= end <= t1]
        overlapping = [f"{1e3 * (b - a):.0f} {th}" for a, b, th in collections if a < t1 and b > t0]
        wait, compiled, collected = 1e3 * report.wait_seconds, ", ".join(inside) or "-", ", ".join(overlapping) or "-"
        print(f"| {i} | {1e3 * (t1 - t0):.1f} | {wait:.1f} | {compiled} | {collected} |")


if __name__ == "__main__":
    main()
