"""``python -m sampler.serve``: serve an in-process sglang-jax engine over HTTP with hot
weight reloads (see ``sampler.serve.server.WeightServer``)."""

import argparse
import asyncio
import logging
import os
import signal
import sys

from sampler.config import SamplerConfig
from sampler.sampler import SglangJaxSampler
from sampler.serve.admin_client import ADMIN_TOKEN_ENV
from sampler.serve.server import WeightServer

logger = logging.getLogger("sampler.serve")
#: How often the main thread looks at the server while it runs (s).
SERVE_POLL_S = 0.2
#: The warm-up request that compiles the forward passes before the first client waits on them.
WARMUP_PROMPT = [1, 2, 3]
WARMUP_PARAMS = {"max_new_tokens": 2, "temperature": 0.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sampler.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True, help="HF-style model directory (config, tokenizer, weights)")
    p.add_argument("--load-format", default="safetensors", choices=["safetensors", "dummy"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the engine")
    p.add_argument("--context-length", type=int, default=1024)
    p.add_argument("--max-running-requests", type=int, default=8)
    p.add_argument("--admin-token", default=None, help=f"token for /admin/* (or set ${ADMIN_TOKEN_ENV})")
    p.add_argument("--enable-weight-perturb", action="store_true", help="enable POST /admin/perturb_weights")
    p.add_argument(
        "--reload-timeout",
        type=float,
        default=120.0,
        help="seconds in-flight requests may take to finish before a reload gives up",
    )
    p.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds open requests get on SIGTERM")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up generation before listening")
    p.add_argument("--log-level", default="warning")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    config = SamplerConfig(
        model_path=args.model_path,
        load_format=args.load_format,
        tp_size=args.tp,
        context_length=args.context_length,
        max_running_requests=args.max_running_requests,
        update_timeout_s=args.reload_timeout,
    )
    sampler = SglangJaxSampler(config=config)
    try:
        server = WeightServer(
            sampler,
            admin_token=args.admin_token or os.environ.get(ADMIN_TOKEN_ENV),
            enable_weight_perturb=args.enable_weight_perturb,
        )
        if not args.no_warmup:  # compile the forward passes before the first client waits on them
            sampler.generate_ids([WARMUP_PROMPT], WARMUP_PARAMS, return_logprob=False)
        uv = uvicorn.Server(
            uvicorn.Config(
                server.app,
                host=args.host,
                port=args.port,
                log_level=args.log_level,
                timeout_keep_alive=5,
                timeout_graceful_shutdown=args.graceful_timeout,
            )
        )

        def stop(signum, _frame):
            logger.info("signal %d: shutting down", signum)
            uv.should_exit = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

        async def serve():
            try:
                await uv.serve()
            except SystemExit as e:  # uvicorn exits when it cannot bind
                raise RuntimeError(f"the HTTP server could not start on {args.host}:{args.port}") from e

        done = asyncio.run_coroutine_threadsafe(serve(), sampler.event_loop)
        announced = False
        while True:
            try:
                done.result(timeout=SERVE_POLL_S)
                break
            except TimeoutError:
                if uv.started and not announced:
                    announced = True
                    print(f"sampler.serve: listening on http://{args.host}:{args.port} (pid {os.getpid()})", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"sampler.serve: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        sampler.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
