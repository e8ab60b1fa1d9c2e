"""The command line of ``python -m sampler.serve``, checked before anything starts (no JAX
device, tokenizer or engine): a bad value is a usage error naming its option (exit status 2).

``--log-level LEVEL`` (any case): one of uvicorn's levels, ``critical``, ``error``,
``warning`` (or ``warn``), ``info``, ``debug``, ``trace`` (uvicorn's level 5); it sets
uvicorn's loggers and this library's (``sampler.*``, on a handler of their own).
sglang-jax's own log level stays ``error``: ``--engine-arg log_level=info`` changes it.

``--engine-arg KEY=VALUE`` (repeatable) passes an sglang-jax engine option on to every
engine (``SamplerConfig.engine_kwargs``), e.g. ``--engine-arg mem_fraction_static=0.5
--engine-arg quantization_config_path=int8.yaml``. KEY is a field of sglang-jax's
``ServerArgs`` (``-`` may stand for ``_``); VALUE is parsed as JSON when it parses (numbers,
``true``/``false``, ``null``, lists, objects) and kept as text otherwise, or as written
for a field that takes text (``served_model_name=123``, ``json_model_override_args={...}``);
a value of the wrong type for its field is refused. Keys the server sets itself are refused
(``ENGINE_ARGS_SET_BY_SERVER``: ``model_path``, ``tp_size``, ``port``, ... name the option
to use instead). ``random_seed`` becomes ``SamplerConfig.random_seed`` (engine i of
several gets ``random_seed + i``). An engine argument overrides the sampler's engine
defaults (on CPU: ``device``, ``attention_backend``, ``disable_precompile``,
``disable_overlap_schedule``, ``max_total_tokens``).
"""

import argparse
import dataclasses
import difflib
import functools
import ipaddress
import json
import logging
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable

from sampler.config import QUANTIZATIONS
from sampler.serve.admission import ADMIN_TOKEN_ENV
from sampler.serve.rebuild import MAX_ENGINE_RESTARTS
from sampler.serve.server import API_KEY_ENV, MAX_BATCH_SIZE, MAX_BODY_BYTES

#: The largest TCP port.
MAX_PORT = 65535
#: uvicorn's log level "trace" (uvicorn.config.TRACE_LOG_LEVEL; Python's logging has none).
TRACE = 5
#: The levels --log-level takes: uvicorn's (uvicorn.config.LOG_LEVELS), by name.
LOG_LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
}
#: Other spellings --log-level takes.
LOG_LEVEL_ALIASES = {"warn": "warning"}
#: How this library's log lines look.
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"
#: The name of the handler ``configure_logging`` installs on the ``sampler`` logger.
LOG_HANDLER_NAME = "sampler.serve"
#: Where --engine-arg keys come from.
SERVER_ARGS = "sgl_jax.srt.server_args.ServerArgs"
#: Engine arguments the server sets itself (from its options, or always): --engine-arg refuses
#: them, saying what to use instead.
ENGINE_ARGS_SET_BY_SERVER = {
    "model_path": "use --model-path",
    "load_format": "use --load-format",
    "tp_size": "use --tp-size",
    "context_length": "use --context-length",
    "max_running_requests": "use --max-running-requests",
    "host": "use --host",
    "port": "use --port (or --base-port)",
    "api_key": "use --api-key",
    "device_indexes": "each engine gets its own devices from --tp-size and --data-parallel-size or --num-servers",
    "enable_single_process": "the engine always runs in this process",
    "enable_engine_loop_run_forever_daemon": "the engine's event loop always runs on a thread of its own",
    "nnodes": "the server runs single-process engines (multi-process engines: sampler.multiprocess)",
    "node_rank": "the server runs single-process engines (multi-process engines: sampler.multiprocess)",
    "dist_init_addr": "the server runs single-process engines (multi-process engines: sampler.multiprocess)",
}
#: Engine arguments that become SamplerConfig fields instead of engine_kwargs (the sampler does
#: more with them than pass them on), each with the type the field takes.
ENGINE_ARGS_TO_CONFIG = {"random_seed": int}


#: The end of --help.
EPILOG = """\
examples:
  python -m sampler.serve --model-path DIR --admin-token T --log-level info
  python -m sampler.serve --model-path DIR --num-servers 4 --base-port 31000 --admin-token T
  python -m sampler.serve --model-path DIR --engine-arg mem_fraction_static=0.5 \\
      --engine-arg quantization_config_path=int8.yaml
"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help (none for required options, flags and no default)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``low..high`` (no upper bound without ``high``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"within {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound} (got {value})")
        return value

    return parse


def quantization(text: str) -> str:
    """An argparse ``type``: a ``SamplerConfig.quantization`` name or an existing config file."""
    if text in QUANTIZATIONS:
        return text
    if not text.endswith((".yaml", ".yml")):
        raise argparse.ArgumentTypeError(
            f"one of {', '.join(QUANTIZATIONS)} or a quantization config .yaml (got {text!r})"
        )
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such quantization config file: {text!r}")
    return os.path.abspath(text)


def seconds(*, zero: bool) -> Callable[[str], float]:
    """An argparse ``type``: a finite number of seconds, > 0 (or >= 0 with ``zero``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(
                f"must be a finite number of seconds {'>=' if zero else '>'} 0 (got {text})"
            )
        return value

    return parse


def secret(text: str) -> str:
    """An argparse ``type``: a token or key as clients send it (``Bearer <token>``)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (leave the option out for none)")
    if text != text.strip():
        raise argparse.ArgumentTypeError("must not begin or end with whitespace (clients' tokens are stripped)")
    return text


def log_level(text: str) -> str:
    """An argparse ``type``: the canonical (lower-case) name of a --log-level (``choices`` check it)."""
    name = text.strip().lower()
    return LOG_LEVEL_ALIASES.get(name, name)


@functools.cache
def server_arg_types() -> dict[str, Any]:
    """Each field of sglang-jax's ``ServerArgs`` and its type. Importing the module loads no JAX
    device (and the engine imports it anyway); the dataclass is not instantiated (its
    ``__post_init__`` reads the model)."""
    from sgl_jax.srt.server_args import ServerArgs

    return {f.name: f.type for f in dataclasses.fields(ServerArgs)}


def accepts(tp: Any, value: Any) -> bool:
    """Whether a field annotated ``tp`` takes the JSON ``value`` (True for a type not known here)."""
    if tp is Any or isinstance(tp, str):
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(accepts(arg, value) for arg in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is None or tp is type(None):
        return value is None
    base = origin or tp
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is str:
        return isinstance(value, str)
    if base in (list, tuple, set, frozenset):
        return isinstance(value, list)
    if base is dict:
        return isinstance(value, dict)
    return True


def type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp)


def json_kind(value: Any) -> str:
    """What a parsed --engine-arg VALUE is, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    kinds = {str: "text", int: "an integer", float: "a number", list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def engine_arg(text: str) -> tuple[str, Any]:
    """An argparse ``type``: ``KEY=VALUE`` -> (KEY, VALUE): KEY a ``ServerArgs`` field the server
    does not set itself, VALUE JSON when it parses, else (or for a text field) the text."""
    key, eq, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    fields = server_arg_types()
    if key not in fields:
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise argparse.ArgumentTypeError(f"{key!r} is not an sglang-jax engine option (a field of {SERVER_ARGS}){hint}")
    if key in ENGINE_ARGS_SET_BY_SERVER:
        raise argparse.ArgumentTypeError(f"{key!r} is set by the server: {ENGINE_ARGS_SET_BY_SERVER[key]}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    tp = ENGINE_ARGS_TO_CONFIG.get(key, fields[key])
    if not accepts(tp, value) and accepts(tp, raw):
        value = raw  # a text field: the text as written (123, {"a": 1}: not a number or object)
    if not accepts(tp, value):
        raise argparse.ArgumentTypeError(
            f"{key}={raw!r}: the engine option takes {type_name(tp)}, not {json_kind(value)}"
        )
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sampler.serve",
        description="Serve in-process sglang-jax engines over HTTP, with hot weight reloads.",
        formatter_class=HelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument(
        "--model-path",
        metavar="DIR",
        required=True,
        help="HF-style model directory (config.json, tokenizer, and with --load-format safetensors the weights)",
    )
    p.add_argument(
        "--load-format",
        default="safetensors",
        choices=["safetensors", "dummy"],
        help="safetensors: the directory's *.safetensors weights; dummy: start with zero weights (push them later)",
    )
    p.add_argument(
        "--host",
        metavar="HOST",
        default="127.0.0.1",
        help="address to listen on; one other than loopback needs an admin token",
    )
    p.add_argument(
        "--port",
        metavar="PORT",
        type=int_in(0, MAX_PORT),
        default=30000,
        help=f"port to listen on, 0..{MAX_PORT} (0: a free one); unused with --num-servers",
    )
    p.add_argument(
        "--tp",
        "--tp-size",
        dest="tp",
        metavar="N",
        type=int_in(1),
        default=1,
        help="tensor-parallel size of each engine (devices per engine)",
    )
    p.add_argument(
        "--data-parallel-size",
        metavar="N",
        type=int_in(1),
        default=1,
        help="engines (each --tp devices, disjoint) behind --port; requests go to the least busy",
    )
    p.add_argument(
        "--num-servers",
        metavar="N",
        type=int_in(1),
        default=None,
        help="engines served one per port, from --base-port on (instead of --port); admin endpoints act on all",
    )
    p.add_argument(
        "--base-port",
        metavar="PORT",
        type=int_in(1, MAX_PORT),
        default=31000,
        help=f"first port of --num-servers (the last one, --base-port + --num-servers - 1, at most {MAX_PORT})",
    )
    p.add_argument(
        "--context-length",
        metavar="TOKENS",
        type=int_in(1),
        default=1024,
        help="most tokens of a sequence (prompt and output) each engine takes",
    )
    p.add_argument(
        "--quantization",
        metavar="NAME|FILE",
        type=quantization,
        default=None,
        help=f"serve the weights quantized: {', '.join(QUANTIZATIONS)} (sglang-jax's configs of that name) "
        "or a sglang-jax quantization config file; reloads and pushes quantize as they load",
    )
    p.add_argument(
        "--max-running-requests",
        metavar="N",
        type=int_in(1),
        default=8,
        help="most requests each engine runs at once (on CPU it also sizes the KV cache with --context-length)",
    )
    p.add_argument(
        "--admin-token",
        metavar="TOKEN",
        type=secret,
        default=None,
        help=f"token for /admin/* (or set ${ADMIN_TOKEN_ENV})",
    )
    p.add_argument(
        "--api-key",
        metavar="KEY",
        type=secret,
        default=None,
        help=f"key the inference routes require as a Bearer token (or set ${API_KEY_ENV})",
    )
    p.add_argument(
        "--max-body-bytes",
        metavar="BYTES",
        type=int_in(1),
        default=MAX_BODY_BYTES,
        help="larger request bodies get 413",
    )
    p.add_argument(
        "--max-batch-size",
        metavar="N",
        type=int_in(1),
        default=MAX_BATCH_SIZE,
        help="most prompts (times n) in one request",
    )
    p.add_argument(
        "--max-engine-restarts",
        metavar="N",
        type=int_in(0),
        default=MAX_ENGINE_RESTARTS,
        help="engine rebuilds after faults before the server gives up (0: none)",
    )
    p.add_argument("--enable-weight-perturb", action="store_true", help="enable POST /admin/perturb_weights")
    p.add_argument(
        "--enable-fault-injection",
        action="store_true",
        help="enable POST /admin/inject_fault (for tests of fault recovery only: it crashes the engine)",
    )
    p.add_argument(
        "--reload-timeout",
        metavar="SECONDS",
        type=seconds(zero=False),
        default=120.0,
        help="seconds in-flight requests may take to finish before a reload gives up (> 0)",
    )
    p.add_argument(
        "--graceful-timeout",
        metavar="SECONDS",
        type=seconds(zero=True),
        default=30.0,
        help="seconds open requests get on SIGTERM (0: none)",
    )
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up generation before listening")
    p.add_argument(
        "--log-level",
        type=log_level,
        choices=list(LOG_LEVELS),
        metavar="LEVEL",
        default="warning",
        help=(
            f"log level of uvicorn and of this library (sampler.*), any case: {', '.join(LOG_LEVELS)} "
            "('warn' is taken for 'warning'); sglang-jax's own: --engine-arg log_level=..."
        ),
    )
    p.add_argument(
        "--engine-arg",
        dest="engine_args",
        metavar="KEY=VALUE",
        type=engine_arg,
        action="append",
        default=None,
        help=(
            "an sglang-jax engine option for every engine (repeatable): KEY a field of sglang-jax's ServerArgs "
            "('-' may stand for '_'), VALUE parsed as JSON when it parses (numbers, true/false, null, lists, "
            "objects), else kept as text (as written for a field that takes text); keys the server sets "
            f"itself are refused ({', '.join(ENGINE_ARGS_SET_BY_SERVER)}); random_seed sets each engine's "
            "seed (engine i of several: random_seed + i)"
        ),
    )
    return p


def parse_args(argv: list[str] | None = None, *, check_model_path: bool = False) -> argparse.Namespace:
    """The command line, checked (a bad value: argparse's usage error, exit status 2), with
    ``engine_kwargs``: the --engine-arg items as a dict. ``check_model_path``: --model-path must
    also be a model directory (``main`` checks it; the other checks need no model)."""
    p = build_parser()
    args = p.parse_args(argv)
    args.engine_kwargs = {}
    for key, value in args.engine_args or []:
        if key in args.engine_kwargs:
            p.error(f"argument --engine-arg: {key} is given more than once")
        args.engine_kwargs[key] = value
    problem = args_problem(args) or (
        model_path_problem(args.model_path, args.load_format) if check_model_path else None
    )
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
    """Why the command line cannot be served (named after its option), or None. Each option's
    own range is checked by its argparse ``type``; here are the checks across options."""
    if args.num_servers is not None:
        if args.data_parallel_size not in (1, args.num_servers):
            return f"--num-servers {args.num_servers} serves that many engines: drop --data-parallel-size"
        last = args.base_port + args.num_servers - 1
        if not 0 < args.base_port <= last <= MAX_PORT:
            return f"--base-port {args.base_port} + --num-servers {args.num_servers} must stay within 1..{MAX_PORT}"
    if args.quantization is not None and "quantization_config_path" in args.engine_kwargs:
        return "--quantization and --engine-arg quantization_config_path=... both set the quantization: give one"
    if not is_loopback(args.host) and not (args.admin_token or os.environ.get(ADMIN_TOKEN_ENV)):
        return (
            f"refusing to listen on non-loopback address {args.host!r} without an admin token: "
            f"pass --admin-token or set ${ADMIN_TOKEN_ENV} (and --api-key or ${API_KEY_ENV} to guard the "
            "inference routes too), or listen on 127.0.0.1"
        )
    return None


def model_path_problem(model_path: str, load_format: str) -> str | None:
    """Why ``model_path`` is no model directory the server can start from, or None."""
    path = Path(model_path)
    if not path.exists():
        return f"--model-path {model_path!r} does not exist"
    if not path.is_dir():
        return f"--model-path {model_path!r} is not a directory"
    if not (path / "config.json").is_file():
        return f"--model-path {model_path!r} holds no config.json (an HF-style model directory)"
    if load_format == "safetensors" and not any(path.glob("*.safetensors")):
        return (
            f"--model-path {model_path!r} holds no *.safetensors weights for --load-format safetensors "
            "(--load-format dummy starts with zero weights)"
        )
    return None


def configure_logging(level: str) -> None:
    """This library's loggers (``sampler.*``) at ``level`` (a ``LOG_LEVELS`` name), on a handler
    of their own: sglang-jax sets the root logger's level to its own (``error``) when an engine
    starts, and an earlier import already gave the root logger a handler."""
    logging.addLevelName(TRACE, "TRACE")
    handler = logging.StreamHandler()
    handler.set_name(LOG_HANDLER_NAME)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    library = logging.getLogger("sampler")
    for old in [h for h in library.handlers if h.get_name() == LOG_HANDLER_NAME]:
        library.removeHandler(old)
    library.addHandler(handler)
    library.setLevel(LOG_LEVELS[level])
    library.propagate = False
