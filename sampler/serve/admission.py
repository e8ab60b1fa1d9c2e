"""Admission to the HTTP server's routes (its outermost ASGI app): who may call what (admin
token, API key), how large a body may be, the OpenAI routes' fields that upstream fails on,
503 while the weights change or the engine cannot serve, and which engine answers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sampler.engine.validation import Check, RequestLimits, integer, is_int, optional, token_ids
from sampler.errors import InvalidRequestError
from sampler.serve.bridge import EngineApp, error_body, send_json
from sampler.serve.routing import request_cost

#: Environment variable holding the admin token (server and admin client read it).
ADMIN_TOKEN_ENV = "SAMPLER_ADMIN_TOKEN"

#: Always answered, without a key, even during a reload or a rebuild (``/health`` says how
#: the engine is).
UNGATED_PATHS = frozenset({"/health"})
#: sglang-jax routes that change the engine's state: they need the admin token here.
UPSTREAM_CONTROL_PATHS = frozenset(
    {
        "/abort_request",  # abort_all ends every client's requests
        "/flush_cache",
        "/pause_generation",
        "/continue_generation",
        "/release_memory_occupation",
        "/resume_memory_occupation",
        "/set_internal_state",
        "/configure_logging",
        "/start_profile",
        "/stop_profile",
        "/start_trace",
        "/stop_trace",
    }
)


#: The response header naming the engine (its index) that answered a request.
ENGINE_HEADER = "x-sampler-engine"


def bearer(headers) -> str | None:
    auth = headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


# --------------------------------------------------------------------------------------
# the OpenAI routes: fields upstream fails on before it builds an engine request
# --------------------------------------------------------------------------------------


def openai_prompt(value, field, limits) -> None:
    """A completion prompt: a non-empty text, a list of token ids, or a list of either."""
    items = value if isinstance(value, list) and value and not is_int(value[0]) else [value]
    if not items:
        raise InvalidRequestError(field, value, "a non-empty text or list of token ids, or a non-empty list of them")
    for i, item in enumerate(items):
        where = field if len(items) == 1 and items[0] is value else f"{field}[{i}]"
        if isinstance(item, str):
            if not item:
                raise InvalidRequestError(where, item, "a non-empty text")
        else:
            token_ids(item, where, limits, allow_empty=False)


def openai_messages(value, field, limits) -> None:
    if not isinstance(value, list) or not value or not all(isinstance(m, Mapping) for m in value):
        raise InvalidRequestError(field, value, "a non-empty list of message objects")


#: Route -> the request fields checked before upstream's handler sees them (the engine
#: request it builds is then checked as every request is).
OPENAI_FIELDS: dict[str, dict[str, Check]] = {
    "/v1/completions": {
        "prompt": openai_prompt,
        "n": optional(integer(1, lambda limits: limits.max_batch_size)),
        "logprobs": optional(integer(0, lambda limits: limits.vocab_size)),
    },
    "/v1/chat/completions": {
        "messages": openai_messages,
        "n": optional(integer(1, lambda limits: limits.max_batch_size)),
        "top_logprobs": optional(integer(0, lambda limits: limits.vocab_size)),
    },
}
OPENAI_FIELDS["/invocations"] = OPENAI_FIELDS["/v1/chat/completions"]


def check_openai_request(path: str, body: bytes, limits: RequestLimits) -> None:
    """Check an OpenAI route's JSON body (other paths, and bodies that are not JSON, are left
    to the route: it answers 400 for those itself). A JSON value that is not an object made
    upstream's chat request model raise AttributeError (500)."""
    fields = OPENAI_FIELDS.get(path)
    if fields is None:
        return
    try:
        request = json.loads(body)
    except ValueError:
        return
    if not isinstance(request, dict):
        raise InvalidRequestError("body", request, "a JSON object")
    for key, check in fields.items():
        if key in request:
            check(request[key], key, limits)


#: Bytes of a too-large body read and dropped before the 413, so that the client (still
#: sending) reads the answer instead of a reset connection; beyond it the connection is cut.
DRAIN_BYTES = 64 * 2**20


class _BodyTooLarge(Exception):
    pass


async def _read_body(receive, limit: int, declared: int | None) -> bytes:
    """The whole request body, or _BodyTooLarge once it exceeds ``limit`` (the rest, up to
    DRAIN_BYTES, read and dropped)."""
    chunks, size = [], 0
    if declared is None or declared <= limit:
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)
            chunk, more = message.get("body", b""), message.get("more_body", False)
            size += len(chunk)
            if size > limit:
                await _drain(receive, declared, size)
                raise _BodyTooLarge()
            chunks.append(chunk)
        return b"".join(chunks)
    await _drain(receive, declared, 0)
    raise _BodyTooLarge()


async def _drain(receive, declared: int | None, read: int) -> None:
    """Read and drop the rest of a body the server answers without using (up to
    DRAIN_BYTES), so that a client still sending reads the answer, not a reset connection."""
    if declared is not None and declared - read > DRAIN_BYTES:
        return
    more = True
    while more and read <= DRAIN_BYTES:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        read += len(message.get("body", b""))
        more = message.get("more_body", False)


def _replay(body: bytes, receive):
    """A ``receive`` that yields the buffered body once, then waits on the client."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class Admission:
    """The server's ASGI app: ``/health`` and ``/admin/*`` from the admin app; everything else
    to an engine's app (``EngineApp``), after the admin token (engine-control routes) or the
    API key (inference routes), the body-size cap, the OpenAI field checks, and a 503 while
    the weights change or the engine cannot serve. Counts requests in flight until their
    response's last byte, so streamed responses count too.

    With ``engine`` set, every request goes to that engine; otherwise the router picks one
    per request, and engine-control routes go to every engine. ``server`` is the
    ``WeightServer`` (its checks, limits, router, engine apps and request count)."""

    def __init__(self, app, server: Any, engine: int | None = None):
        self.app = app
        self.server = server
        self.engine = engine

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        path = scope.get("path", "")
        if scope["type"] != "http" or path in UNGATED_PATHS:
            return await self.app(scope, receive, send)
        server = self.server
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        declared = int(headers["content-length"]) if headers.get("content-length", "").isdigit() else None
        admin = path.startswith("/admin/") or path in UPSTREAM_CONTROL_PATHS
        problem = server.auth_problem(headers) if admin else server.key_problem(headers)
        if problem is not None:
            await _drain(receive, declared, 0)
            return await _reply(send, problem[0], problem[1], headers={"WWW-Authenticate": "Bearer"})
        limit = server.max_body_bytes
        try:
            body = await _read_body(receive, limit, declared)
        except _BodyTooLarge:
            return await _reply(send, 413, f"the request body is larger than {limit} bytes (--max-body-bytes)")
        if path.startswith("/admin/"):
            return await self.app(scope, _replay(body, receive), send)
        if not admin:
            problem = server.admission_problem()
            if problem is not None:
                reason, retry_after = problem
                headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
                return await _reply(send, 503, reason, "unavailable", headers)
            try:
                check_openai_request(path, body, server.sampler.request_limits)
            except InvalidRequestError as e:  # in the form upstream answers errors on these routes
                error = {"object": "error", "message": str(e), "type": "BadRequestError", "param": e.field, "code": 400}
                return await send_json(send, 400, json.dumps(error).encode())
        apps = server.engine_apps
        if self.engine is None and admin and len(apps) > 1:
            return await _fan_out(apps, scope, body, receive, send)
        index = self.engine if self.engine is not None else server.router.choose()
        cost = 0 if admin else request_cost(path, body)
        server.router.begin(index, cost)
        server.in_flight += 1
        try:
            await apps[index](scope, _replay(body, receive), _naming_engine(send, index))
        finally:
            server.in_flight -= 1
            server.router.end(index, cost)


def _naming_engine(send, index: int):
    """``send`` with the ``ENGINE_HEADER`` added to the response's start line."""
    name = (ENGINE_HEADER.encode(), str(index).encode())

    async def named(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), name]}
        await send(message)

    return named


async def _fan_out(apps: list[EngineApp], scope, body: bytes, receive, send) -> None:
    """Run an engine-control request on every engine, one after another; answer with the
    first engine's response that is not 2xx, else the last one's."""
    answers = []
    for index, app in enumerate(apps):
        messages: list[dict] = []

        async def keep(message, messages=messages):
            messages.append(message)

        await app(scope, _replay(body, receive), _naming_engine(keep, index))
        answers.append(messages)
    status = [next((m["status"] for m in a if m["type"] == "http.response.start"), 500) for a in answers]
    chosen = next((a for a, code in zip(answers, status) if not 200 <= code < 300), answers[-1])
    for message in chosen:
        await send(message)


async def _reply(send, status: int, message: str, kind: str | None = None, headers: dict | None = None):
    await send_json(send, status, error_body(status, message, kind or "error"), headers)


async def _lifespan(receive, send) -> None:
    """The server's own lifespan: nothing to set up (the engine's app is started apart)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
