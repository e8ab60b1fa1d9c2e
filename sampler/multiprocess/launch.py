"""Start a multi-controller JAX program as several local processes on loopback.

    python -m sampler.multiprocess.launch --nproc 2 --devices-per-proc 2 -- python SCRIPT [ARGS...]

Each process gets ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (simulated CPU
devices), ``JAX_PLATFORMS=cpu`` unless set, and where to meet the others:
``SAMPLER_COORDINATOR`` (JAX's coordinator, ``127.0.0.1:PORT``), ``SAMPLER_NUM_PROCESSES``,
``SAMPLER_PROCESS_ID`` and ``SAMPLER_DIST_INIT_ADDR`` (the engine's address: sglang-jax
binds its request broadcast to that port + 5 and + 6). The script calls
``sampler.multiprocess.initialize()`` first. Output lines are prefixed with ``[rank i]``.
When a process fails (non-zero exit) or the time limit passes, every other process is
killed; the exit code is the first failure's (0 when all succeeded).

Loopback only: this is for tests, examples and benchmarks on one machine. On real hosts
use your cluster's launcher and ``jax.distributed.initialize`` as usual.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

#: The loopback address every process binds to and connects to.
LOOPBACK = "127.0.0.1"
#: Ports sglang-jax derives from its dist_init_addr port (pub/sub at +5, +6).
ENGINE_PORT_OFFSETS = (0, 5, 6)
#: After the first failure, how long the others get to end by themselves (s).
FAILURE_GRACE_S = 5.0
#: Default limit on the whole run (s).
DEFAULT_TIMEOUT_S = 900.0
#: Exit code when the run hit its time limit.
TIMEOUT_EXIT = 124

ENV_COORDINATOR = "SAMPLER_COORDINATOR"
ENV_NUM_PROCESSES = "SAMPLER_NUM_PROCESSES"
ENV_PROCESS_ID = "SAMPLER_PROCESS_ID"
ENV_DIST_INIT_ADDR = "SAMPLER_DIST_INIT_ADDR"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port_block(offsets: Sequence[int] = (0,), exclude: Sequence[int] = ()) -> int:
    """A loopback port P such that P + each offset is free (and not in ``exclude``)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        ports = [port + o for o in offsets]
        if max(ports) < 65536 and not set(ports) & set(exclude) and all(_port_free(p) for p in ports):
            return port
    raise RuntimeError("no free block of loopback ports found")


@dataclasses.dataclass
class ProcessResult:
    rank: int
    returncode: int | None
    output: str
    #: Killed by the launcher (another process failed, or the time limit passed).
    killed: bool = False


def process_env(rank: int, nproc: int, devices_per_proc: int, coordinator: str, engine_addr: str) -> dict[str, str]:
    """The environment of process ``rank``: simulated devices and where to meet the others."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_proc}"])
    env.setdefault("JAX_PLATFORMS", "cpu")
    env[ENV_COORDINATOR] = coordinator
    env[ENV_NUM_PROCESSES] = str(nproc)
    env[ENV_PROCESS_ID] = str(rank)
    env[ENV_DIST_INIT_ADDR] = engine_addr
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch(
    command: Sequence[str],
    *,
    nproc: int = 2,
    devices_per_proc: int = 2,
    timeout: float = DEFAULT_TIMEOUT_S,
    echo: bool = False,
    cwd: str | None = None,
) -> list[ProcessResult]:
    """Run ``command`` as ``nproc`` processes of one JAX program; wait for all of them.

    Returns one result per rank (its exit code and output). When one process exits
    non-zero, the others get ``FAILURE_GRACE_S`` to end by themselves (so that they can
    report the failure) and are then killed, as are all of them at ``timeout``.
    """
    if nproc < 1 or devices_per_proc < 1:
        raise ValueError(f"nproc={nproc} and devices_per_proc={devices_per_proc} must be >= 1")
    coordinator_port = free_port_block()
    engine_port = free_port_block(ENGINE_PORT_OFFSETS, exclude=[coordinator_port])
    coordinator, engine_addr = f"{LOOPBACK}:{coordinator_port}", f"{LOOPBACK}:{engine_port}"
    procs = [
        subprocess.Popen(
            list(command),
            env=process_env(rank, nproc, devices_per_proc, coordinator, engine_addr),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            start_new_session=True,  # killed as a group, children included
        )
        for rank in range(nproc)
    ]
    outputs: list[list[str]] = [[] for _ in procs]
    done = threading.Event()

    def pump(rank: int) -> None:
        for line in procs[rank].stdout:
            outputs[rank].append(line)
            if echo:
                sys.stdout.write(f"[rank {rank}] {line}")
                sys.stdout.flush()
        done.set()

    pumps = [threading.Thread(target=pump, args=(r,), daemon=True) for r in range(nproc)]
    for t in pumps:
        t.start()
    killed = [False] * nproc
    deadline = time.monotonic() + timeout
    failed_at = None
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
            if now >= deadline or (failed_at is not None and now >= failed_at + FAILURE_GRACE_S):
                break
            done.wait(0.1)
            done.clear()
    finally:
        for rank, p in enumerate(procs):
            if p.poll() is None:
                killed[rank] = True
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in procs:
            p.wait()
        for t in pumps:
            t.join(5)
    return [
        ProcessResult(
            rank,
            TIMEOUT_EXIT if killed[rank] and time.monotonic() >= deadline else p.returncode,
            "".join(outputs[rank]),
            killed[rank],
        )
        for rank, p in enumerate(procs)
    ]


def exit_code(results: Sequence[ProcessResult]) -> int:
    """The first non-zero exit code (by rank), else 0."""
    for r in results:
        if r.returncode:
            return r.returncode if r.returncode > 0 else 128 - r.returncode
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sampler.multiprocess.launch",
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s [options] -- COMMAND...",
    )
    parser.add_argument("--nproc", type=int, default=2, help="processes to start (default 2)")
    parser.add_argument("--devices-per-proc", type=int, default=2, help="simulated CPU devices each (default 2)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="limit on the whole run (s)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the program, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    results = launch(command, nproc=args.nproc, devices_per_proc=args.devices_per_proc, timeout=args.timeout, echo=True)
    for r in results:
        state = "killed by the launcher" if r.killed else f"exit code {r.returncode}"
        print(f"[launch] rank {r.rank}: {state}", file=sys.stderr)
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
