"""``python -m sampler.serve``: serve in-process sglang-jax engines over HTTP with hot
weight reloads (see ``sampler.serve.server.WeightServer``).

One engine on ``--port``; ``--data-parallel-size N``: N engines on disjoint devices behind
``--port``; ``--num-servers N``: N engines, engine i on ``--base-port + i``. The main thread
builds the engines, starts the HTTP servers on a thread and event loop of their own, and
then watches: it rebuilds an engine after a fault (``sampler.serve.rebuild``; engines can
only be built on the main thread) and runs the shutdown on SIGTERM/SIGINT.

The command line (checked before anything starts) is ``sampler.serve.cli``.
"""

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time

from sampler.config import SamplerConfig
from sampler.factory import create_sampler
from sampler.serve.admission import ADMIN_TOKEN_ENV
from sampler.serve.cli import ENGINE_ARGS_TO_CONFIG, configure_logging, parse_args
from sampler.serve.rebuild import EngineRecovery, caller_on
from sampler.serve.server import API_KEY_ENV, WeightServer

logger = logging.getLogger("sampler.serve")
#: How often the main thread looks at the server while it runs (s).
SERVE_POLL_S = 0.2
#: Exit status when the engine refuses the configuration it was given (2 is a usage error).
EXIT_ENGINE_START_FAILED = 3
#: The warm-up request that compiles the forward passes before the first client waits on them.
WARMUP_PROMPT = [1, 2, 3]
WARMUP_PARAMS = {"max_new_tokens": 2, "temperature": 0.0}
#: Extra time uvicorn gives open connections beyond --graceful-timeout (by then every request
#: has been answered: after the grace period the engine's requests get a 503).
UVICORN_GRACE_MARGIN_S = 30.0


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
                    log_level=args.log_level,  # a LOG_LEVELS name: lower case, "warn" taken for "warning"
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
    args = parse_args(argv, check_model_path=True)
    configure_logging(args.log_level)
    engine_kwargs = dict(args.engine_kwargs)
    config_fields = {key: engine_kwargs.pop(key) for key in ENGINE_ARGS_TO_CONFIG if key in engine_kwargs}
    config = SamplerConfig(
        model_path=args.model_path,
        load_format=args.load_format,
        tp_size=args.tp,
        data_parallel_size=args.num_servers or args.data_parallel_size,
        context_length=args.context_length,
        max_running_requests=args.max_running_requests,
        update_timeout_s=args.reload_timeout,
        max_batch_size=args.max_batch_size,
        quantization=args.quantization,
        engine_kwargs=engine_kwargs,
        **config_fields,
    )
    try:
        sampler = create_sampler(config)
    except Exception as e:  # a value the engine refuses (--tp, --engine-arg, the checkpoint): no traceback
        logger.debug("engine start failed", exc_info=True)
        print(f"sampler.serve: the engine could not start: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return EXIT_ENGINE_START_FAILED
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
