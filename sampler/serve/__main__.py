"""``python -m sampler.serve``: serve in-process sglang-jax engines over HTTP with hot
weight reloads (see ``sampler.serve.server.WeightServer``).

One engine on ``--port``; ``--data-parallel-size N``: N engines on disjoint devices behind
``--port``; ``--num-servers N``: N engines, engine i on ``--base-port + i``. The main thread
builds the engines, starts the HTTP servers on a thread and event loop of their own, and
then watches: it rebuilds an engine after a fault (``sampler.serve.rebuild``; engines can
only be built on the main thread) and runs the shutdown on SIGTERM/SIGINT.
"""

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys
import threading
import time

from sampler.config import SamplerConfig
from sampler.factory import create_sampler
from sampler.serve.admin_client import ADMIN_TOKEN_ENV
from sampler.serve.rebuild import MAX_ENGINE_RESTARTS, EngineRecovery, caller_on
from sampler.serve.server import API_KEY_ENV, MAX_BATCH_SIZE, MAX_BODY_BYTES, WeightServer

logger = logging.getLogger("sampler.serve")
#: How often the main thread looks at the server while it runs (s).
SERVE_POLL_S = 0.2
#: The warm-up request that compiles the forward passes before the first client waits on them.
WARMUP_PROMPT = [1, 2, 3]
WARMUP_PARAMS = {"max_new_tokens": 2, "temperature": 0.0}
#: The largest TCP port.
MAX_PORT = 65535
#: Extra time uvicorn gives open connections beyond --graceful-timeout (by then every request
#: has been answered: after the grace period the engine's requests get a 503).
UVICORN_GRACE_MARGIN_S = 30.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sampler.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True, help="HF-style model directory (config, tokenizer, weights)")
    p.add_argument("--load-format", default="safetensors", choices=["safetensors", "dummy"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--tp", "--tp-size", dest="tp", type=int, default=1, help="tensor-parallel size of each engine")
    p.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        help="engines (each --tp devices, disjoint) behind --port; requests go to the least busy",
    )
    p.add_argument(
        "--num-servers",
        type=int,
        default=None,
        help="engines served one per port, from --base-port on (instead of --port); admin endpoints act on all",
    )
    p.add_argument("--base-port", type=int, default=31000, help="first port of --num-servers")
    p.add_argument("--context-length", type=int, default=1024)
    p.add_argument("--max-running-requests", type=int, default=8)
    p.add_argument("--admin-token", default=None, help=f"token for /admin/* (or set ${ADMIN_TOKEN_ENV})")
    p.add_argument(
        "--api-key", default=None, help=f"key the inference routes require as a Bearer token (or set ${API_KEY_ENV})"
    )
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="larger request bodies get 413")
    p.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE, help="most prompts (times n) in one request")
    p.add_argument(
        "--max-engine-restarts",
        type=int,
        default=MAX_ENGINE_RESTARTS,
        help="engine rebuilds after faults before the server gives up",
    )
    p.add_argument("--enable-weight-perturb", action="store_true", help="enable POST /admin/perturb_weights")
    p.add_argument(
        "--enable-fault-injection",
        action="store_true",
        help="enable POST /admin/inject_fault (for tests of fault recovery only: it crashes the engine)",
    )
    p.add_argument(
        "--reload-timeout",
        type=float,
        default=120.0,
        help="seconds in-flight requests may take to finish before a reload gives up",
    )
    p.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds open requests get on SIGTERM")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up generation before listening")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    problem = args_problem(args)
    if problem is not None:
        p.error(problem)
    return args


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (only this machine can connect)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def args_problem(args: argparse.Namespace) -> str | None:
    """Why the command line cannot be served (named after its option), or None."""
    if args.tp < 1:
        return f"--tp-size must be >= 1 (got {args.tp})"
    if args.data_parallel_size < 1:
        return f"--data-parallel-size must be >= 1 (got {args.data_parallel_size})"
    if args.num_servers is not None:
        if args.num_servers < 1:
            return f"--num-servers must be >= 1 (got {args.num_servers})"
        if args.data_parallel_size not in (1, args.num_servers):
            return f"--num-servers {args.num_servers} serves that many engines: drop --data-parallel-size"
        last = args.base_port + args.num_servers - 1
        if not 0 < args.base_port <= last <= MAX_PORT:
            return f"--base-port {args.base_port} + --num-servers {args.num_servers} must stay within 1..{MAX_PORT}"
    if not 0 <= args.port <= MAX_PORT:
        return f"--port must be within 0..{MAX_PORT} (got {args.port})"
    if not is_loopback(args.host) and not (args.admin_token or os.environ.get(ADMIN_TOKEN_ENV)):
        return (
            f"refusing to listen on non-loopback address {args.host!r} without an admin token: "
            f"pass --admin-token or set ${ADMIN_TOKEN_ENV} (and --api-key or ${API_KEY_ENV} to guard the "
            "inference routes too), or listen on 127.0.0.1"
        )
    return None


def listen_ports(args: argparse.Namespace) -> list[int]:
    """The port of each app: one, or one per engine with --num-servers."""
    if args.num_servers is None:
        return [args.port]
    return [args.base_port + i for i in range(args.num_servers)]


class HttpThread:
    """uvicorn serving each app on its port, all on one thread and event loop of their own."""

    def __init__(self, apps: list, ports: list[int], args: argparse.Namespace):
        import uvicorn

        self.servers = [
            uvicorn.Server(
                uvicorn.Config(
                    app,
                    host=args.host,
                    port=port,
                    log_level=args.log_level,
                    timeout_keep_alive=5,
                    timeout_graceful_shutdown=args.graceful_timeout + UVICORN_GRACE_MARGIN_S,
                )
            )
            for app, port in zip(apps, ports)
        ]
        self.loop = asyncio.new_event_loop()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="sampler-http", daemon=True)

    @property
    def started(self) -> bool:
        return all(uv.started for uv in self.servers)

    def stop(self) -> None:
        for uv in self.servers:
            uv.should_exit = True

    async def _serve(self) -> None:
        tasks = [asyncio.ensure_future(uv.serve()) for uv in self.servers]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            self.stop()  # one port failed (it could not bind): stop the others too
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as e:  # noqa: BLE001 - uvicorn exits (SystemExit) when it cannot bind
            self.error = e
        finally:
            self.done.set()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    config = SamplerConfig(
        model_path=args.model_path,
        load_format=args.load_format,
        tp_size=args.tp,
        data_parallel_size=args.num_servers or args.data_parallel_size,
        context_length=args.context_length,
        max_running_requests=args.max_running_requests,
        update_timeout_s=args.reload_timeout,
        max_batch_size=args.max_batch_size,
    )
    sampler = create_sampler(config)
    try:
        server = WeightServer(
            sampler,
            admin_token=args.admin_token or os.environ.get(ADMIN_TOKEN_ENV),
            api_key=args.api_key or os.environ.get(API_KEY_ENV),
            enable_weight_perturb=args.enable_weight_perturb,
            enable_fault_injection=args.enable_fault_injection,
            max_body_bytes=args.max_body_bytes,
        )
        if not args.no_warmup:  # compile the forward passes before the first client waits on them
            sampler.generate_ids([WARMUP_PROMPT], WARMUP_PARAMS, return_logprob=False)
        ports = listen_ports(args)
        http = HttpThread([server.app] if args.num_servers is None else server.port_apps(), ports, args)
        on_server = caller_on(http.loop)
        recovery = EngineRecovery(server, on_server, max_restarts=args.max_engine_restarts)
        stop_at: list[float] = []

        def stop(signum, _frame):
            logger.info("signal %d: shutting down", signum)
            http.stop()
            stop_at.append(time.monotonic())

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        http.thread.start()
        announced = engine_stopped = False
        while not http.done.wait(SERVE_POLL_S):
            if http.started and not announced:
                announced = True
                urls = ", ".join(f"http://{args.host}:{port}" for port in ports)
                print(f"sampler.serve: listening on {urls} (pid {os.getpid()})", flush=True)
            if not stop_at:
                recovery.poll()
            elif not engine_stopped and (
                server.in_flight == 0 or time.monotonic() - stop_at[0] >= args.graceful_timeout
            ):  # open requests had their grace period: each still waiting gets a 503 now
                on_server(server.stop_engine("the server is shutting down"))
                engine_stopped = True
        if http.error is not None and not stop_at:
            raise RuntimeError(f"the HTTP server could not start on {args.host} ports {ports}") from http.error
    except Exception as e:  # noqa: BLE001
        print(f"sampler.serve: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        sampler.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
