"""Every read or write of upstream state that is not a public API, in one place.

sglang-jax 0.1.0rc0 exposes no weight-update, pause-for-swap or multi-server API, so the
sampler reaches into a few internals: the model runner behind an in-process Engine, the
tokenizer manager's pause flag and request table, the HTTP server's module-global state,
and (for speed) flax's storage slot of an nnx Variable. Each accessor names what it
relies on; ``tests/test_compat.py`` checks that these still exist.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

#: How often a waiter looks again at the tokenizer manager's request table (s).
REQUEST_POLL_S = 0.002


# --------------------------------------------------------------------------------------
# the engine's scheduler and model runner (single-process mode)
# --------------------------------------------------------------------------------------


def scheduler_of(engine: Any) -> Any:
    """The Scheduler object of an Engine started with ``enable_single_process=True``."""
    return engine.scheduler_info["scheduler"]


def model_runner_of(engine: Any) -> Any:
    """The ModelRunner whose ``model`` and ``model_state_leaves`` every forward reads."""
    return scheduler_of(engine).tp_worker.worker.model_runner


def flush_prefix_cache(scheduler: Any) -> tuple[bool, str]:
    """Drop the radix cache from the caller's thread (only while the scheduler is parked)."""
    ok, message, _ = scheduler.flush_cache()
    return ok, message


def scheduler_idle(scheduler: Any) -> bool:
    return scheduler.is_fully_idle()


# --------------------------------------------------------------------------------------
# the tokenizer manager: pause flag and request table (run these on the engine's loop)
# --------------------------------------------------------------------------------------


async def set_paused(tm: Any, paused: bool) -> None:
    """Hold new requests at the tokenizer manager (upstream's pause flag), or let them go."""
    async with tm.is_pause_cond:
        tm.is_pause = paused
        tm.is_pause_cond.notify_all()


def is_paused(tm: Any) -> bool:
    """Whether the tokenizer manager holds new requests back (upstream's pause flag)."""
    return bool(tm.is_pause)


def requests_in_flight(tm: Any) -> int:
    """Requests the tokenizer manager has sent and not yet finished."""
    return len(tm.rid_to_state)


async def wait_no_requests(tm: Any, timeout: float) -> bool:
    """Wait until no request is in flight; False on timeout."""
    deadline = time.monotonic() + timeout
    while tm.rid_to_state:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(REQUEST_POLL_S)
    return True


def finish_aborted(state: Any, rid: str, message: str) -> None:
    """End one request's state with an "abort" answer (what upstream returns for aborted
    requests): its waiting client, HTTP ones too, gets it."""
    state.out_list.append(
        {
            "text": "",
            "output_ids": [],
            "meta_info": {"id": rid, "finish_reason": {"type": "abort", "message": message}},
        }
    )
    state.finished = True
    state.event.set()


def abort_pending(tm: Any, message: str) -> None:
    """Finish every request in flight with an "abort" answer."""
    for rid, state in list(tm.rid_to_state.items()):
        finish_aborted(state, rid, message)
        tm.rid_to_state.pop(rid, None)


# --------------------------------------------------------------------------------------
# the HTTP server's module-global state
# --------------------------------------------------------------------------------------


#: Keyword arguments of ``APIRoute`` that a copied route takes over from upstream's.
ROUTE_FIELDS = (
    "response_model", "status_code", "tags", "dependencies", "summary", "description",
    "response_description", "responses", "deprecated", "name", "methods", "operation_id",
    "response_model_include", "response_model_exclude", "response_model_by_alias",
    "response_model_exclude_unset", "response_model_exclude_defaults", "response_model_exclude_none",
    "include_in_schema", "response_class", "callbacks", "openapi_extra", "generate_unique_id_function",
)  # fmt: skip


def _rebind(fn: Callable, scope: dict[str, Any]) -> Callable:
    """A copy of function ``fn`` that reads its module globals from ``scope``."""
    import types

    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__annotations__ = dict(fn.__annotations__)
    copy.__qualname__, copy.__module__, copy.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    copy.__dict__.update(fn.__dict__)
    return copy


def engine_scope(upstream: Any, state: Any) -> dict[str, Any]:
    """Upstream's HTTP module namespace with ``_global_state`` set to ``state``, every
    module-level function in it rebound to that namespace (helpers the routes call too)."""
    import types

    scope = dict(vars(upstream))
    scope["_global_state"] = state
    for name, value in vars(upstream).items():
        if isinstance(value, types.FunctionType) and value.__module__ == upstream.__name__:
            scope[name] = _rebind(value, scope)
    return scope


def upstream_http_app(engine: Any):
    """A FastAPI app with sglang-jax's own routes, serving ``engine`` (in-process).

    Upstream's routes and lifespan read a module-global ``_GlobalState`` (one engine per
    process). This app's routes are copies of upstream's functions whose globals are a
    namespace of their own (``engine_scope``) naming this engine's state; upstream's module
    is left untouched, so several engines are served from one process.
    """
    import contextlib

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.routing import APIRoute
    from sgl_jax.srt.entrypoints import http_server as upstream

    state = upstream._GlobalState(
        tokenizer_manager=engine.tokenizer_manager,
        template_manager=engine.template_manager,
        scheduler_info={k: v for k, v in engine.scheduler_info.items() if k != "scheduler"},
    )
    scope = engine_scope(upstream, state)
    lifespan = contextlib.asynccontextmanager(_rebind(upstream.lifespan.__wrapped__, scope))
    app = FastAPI(lifespan=lifespan, openapi_url=None)
    app.server_args = engine.server_args
    app.add_exception_handler(RequestValidationError, scope["validation_exception_handler"])
    for route in upstream.app.router.routes:
        if isinstance(route, APIRoute):
            fields = {k: getattr(route, k) for k in ROUTE_FIELDS}
            app.router.routes.append(APIRoute(route.path, _rebind(route.endpoint, scope), **fields))
    return app


async def enter_upstream_app(app: Any) -> Any:
    """Run the startup half of upstream's lifespan on the engine's loop (it builds the
    OpenAI route handlers on ``app.state``); returns the context to exit, if ever."""
    context = app.router.lifespan_context(app)
    await context.__aenter__()
    return context


# --------------------------------------------------------------------------------------
# flax nnx Variables
# --------------------------------------------------------------------------------------


def fast_value_setter(var: Any) -> Callable[[Any], None]:
    """``var.set_value`` without its per-call checks when they cannot matter (flax 0.12).

    A swap writes hundreds of Variables from eager code; flax 0.12's set_value spends
    ~15 us each on trace-level checks and a tree copy. For a plain mutable Variable
    holding a jax.Array with no on_set_value hook, storing the new array in its
    ``_raw_value`` slot is all it does; anything else goes through set_value.
    """
    import jax

    plain = (
        not getattr(var, "hijax", False)
        and getattr(var, "mutable", True)
        and "on_set_value" not in getattr(var, "_var_metadata", {"on_set_value": None})
        and isinstance(getattr(var, "_raw_value", None), jax.Array)
    )
    if plain:
        return lambda value: object.__setattr__(var, "_raw_value", value)
    return var.set_value


# --------------------------------------------------------------------------------------
# request checks and limits
# --------------------------------------------------------------------------------------


def engine_limits(engine: Any) -> dict[str, Any]:
    """The request limits of a running engine: the model's vocabulary (embedding rows),
    the tokenizer manager's context length, the scheduler's real prompt and request
    limits, and whether upstream truncates long prompts."""
    tm = engine.tokenizer_manager
    scheduler = scheduler_of(engine)
    # a process of a multi-process engine other than 0 has no tokenizer manager: the
    # scheduler's own model config holds the same numbers
    model_config = scheduler.model_config if tm is None else tm.model_config
    return dict(
        vocab_size=int(model_config.vocab_size),
        context_len=int(model_config.context_len if tm is None else tm.context_len),
        max_req_len=int(scheduler.max_req_len),
        max_req_input_len=int(scheduler.max_req_input_len),
        truncates_prompts=bool(engine.server_args.allow_auto_truncate),
    )


def tokenize_texts(tm: Any) -> Callable[[list[str]], list[list[int]]]:
    """Token ids of texts, as the tokenizer manager computes them for a text prompt."""
    return lambda texts: tm.tokenizer(texts)["input_ids"]


def check_requests_with(tm: Any, check: Callable[[Any, Any], None]) -> None:
    """Run ``check(obj, in_flight_rids)`` on every request before the tokenizer manager
    takes it (every route, every Python call goes through ``generate_request``); whatever
    it raises goes to the caller, and the request is not sent."""
    original = tm.generate_request

    async def generate_request(obj, request=None):
        check(obj, tm.rid_to_state)
        async for out in original(obj, request):
            yield out

    generate_request.__wrapped__ = original  # type: ignore[attr-defined]
    tm.generate_request = generate_request


def unchecked_generate_request(tm: Any) -> Callable:
    """The tokenizer manager's own ``generate_request``, past ``check_requests_with``
    (only for tests that need an input the checks refuse)."""
    return getattr(tm.generate_request, "__wrapped__", tm.generate_request)
