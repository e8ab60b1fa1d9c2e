"""What each weight sync of ``training_examples.async_grpo`` waits for, sync by sync.

Runs the asynchronous GRPO example (one mode) and records, for every ``update_params``:
the time until the scheduler reached an iteration boundary (``UpdateReport.wait_seconds``),
the time the swap took once there, the XLA compiles that ended inside the sync (JAX's
backend-compile events, with the thread that compiled) and the full (generation-2) Python
garbage collections that overlapped it (``gc.callbacks``, with their thread).

    python benchmarks/async_syncs.py [--mode in-flight] [--steps 6] [--no-precompile]

Writes the table to docs/benchmarks/results/async_syncs-<mode>[-no-precompile].json
(async_syncs-in-flight.json by default; ``--json PATH`` elsewhere, ``--no-json`` not at all).
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

from benchmarks.common import Results, add_output_args, num  # noqa: E402
from sampler.sync import weight_sync  # noqa: E402
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
    add_output_args(ap)
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
    update_params = weight_sync.WeightSync.update_params

    def timed_update_params(self, *a, **k):
        t0 = time.perf_counter()
        report = update_params(self, *a, **k)
        syncs.append((t0, time.perf_counter(), report))
        return report

    weight_sync.WeightSync.update_params = timed_update_params
    async_grpo.run(
        args.mode, args.steps, args.workdir, seed=args.seed, precompile=not args.no_precompile, verbose=False
    )
    res = Results(
        f"async_syncs-{args.mode}" + ("-no-precompile" if args.no_precompile else ""),
        args,
        context={"syncs": len(syncs), "compiles": len(compiles), "full_collections": len(collections)},
    )
    table = res.table(
        [
            "update",
            "update_params ms",
            "wait for an iteration boundary ms",
            "compiles inside (ms, thread)",
            "full GCs overlapping (ms, thread)",
        ],
        align=["right", "right", "right", None, None],
        key="syncs",
        caption=f"async_grpo {args.mode}, {args.steps} steps, seed {args.seed}, precompile {not args.no_precompile}",
    )
    for i, (t0, t1, report) in enumerate(syncs):
        inside = [(1e3 * s, th) for end, s, th in compiles if t0 <= end <= t1]
        overlapping = [(1e3 * (b - a), th) for a, b, th in collections if a < t1 and b > t0]
        table.add(
            i,
            num(1e3 * (t1 - t0), "{:.1f}", "ms"),
            num(1e3 * report.wait_seconds, "{:.1f}", "ms"),
            _events(inside),
            _events(overlapping),
        )
    res.emit()


def _events(events: list[tuple[float, str]]) -> dict:
    """A cell listing (ms, thread) events: "930 scheduler, 41 MainThread", or "-" for none."""
    return {
        "value": [{"ms": ms, "thread": thread} for ms, thread in events],
        "text": ", ".join(f"{ms:.0f} {thread}" for ms, thread in events) or "-",
        "unit": "ms",
    }


if __name__ == "__main__":
    main()
