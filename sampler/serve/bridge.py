"""sglang-jax's own HTTP app, run on its engine's event loop, served from the HTTP server's.

Upstream's routes must run on the loop their tokenizer manager lives on: the engine's.
The HTTP server runs on a loop of its own so that it outlives any one engine (the server
rebuilds a faulted engine, and answers ``/health`` and 503s meanwhile). ``EngineApp``
relays each request to the engine's loop and its response back, and guarantees every
request an answer:

- a response is held back until its first body part: if the engine faulted by then, the
  client gets a 503 naming the fault (upstream would answer 200 with an empty "abort"
  output, or a 500 ``KeyError`` on the OpenAI routes); a stream whose first event is an
  error (upstream reports a refused request that way, with status 200) gets that error's
  status (400) and body instead;
- a stream under way when the engine faults ends with an error event naming the fault;
- ``close(reason)`` (engine rebuilt or server stopping) answers every request still
  waiting with a 503 naming the reason, whatever the engine's loop does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
from collections.abc import Callable
from typing import Any

from sampler import compat

logger = logging.getLogger(__name__)

#: How long starting or stopping upstream's app on the engine loop may take (s).
LIFESPAN_TIMEOUT_S = 60.0
#: How a stream reports an error as its first event (upstream's /generate and /v1 routes).
SSE_ERROR_PREFIX = b'data: {"error"'
#: Status of a response that failed because the engine is gone or being rebuilt.
ENGINE_GONE_STATUS = 503


def error_body(status: int, message: str, kind: str = "error") -> bytes:
    return json.dumps({"ok": False, "error": {"message": message, "type": kind, "code": status}}).encode()


async def send_json(send, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _sse_error(chunk: bytes, flat: bool) -> tuple[int, bytes]:
    """Status and JSON body of a stream's error event (``data: {"error": {...}}``), in the
    form the route answers errors of non-streamed requests: ``{"error": {...}}`` for
    ``/generate``, the error object itself (upstream's ``ErrorResponse``) for ``/v1/*``."""
    payload = chunk[len(b"data: ") :].split(b"\n\n", 1)[0]
    try:
        error = json.loads(payload)["error"]
        code = error.get("code")
        status = code if isinstance(code, int) and 400 <= code < 600 else 400
        return status, json.dumps(error if flat else {"error": error}).encode()
    except (ValueError, KeyError, TypeError, AttributeError):
        return 400, error_body(400, payload.decode("utf-8", "replace"))


class _Relay:
    """Forwards one inner response to the client, holding its start line back until the
    first body part (see the module docstring)."""

    def __init__(self, send, problem: Callable[[], str | None], flat_errors: bool):
        self._send = send
        self._problem = problem
        self._flat_errors = flat_errors
        self.start: dict | None = None
        self.started = False  # the start line went out
        self.complete = False  # the last body part went out (or a replacement did)
        self.sse = False

    async def send(self, message: dict) -> None:
        if self.complete:
            return
        if message["type"] == "http.response.start":
            self.start = message
            headers = dict(message.get("headers") or [])
            self.sse = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            return
        if message["type"] != "http.response.body":
            await self._send(message)
            return
        body, more = message.get("body", b""), message.get("more_body", False)
        problem = self._problem()
        if not self.started:
            if problem is not None:
                return await self.replace(ENGINE_GONE_STATUS, error_body(ENGINE_GONE_STATUS, problem, "engine_fault"))
            if self.sse and body.startswith(SSE_ERROR_PREFIX):
                return await self.replace(*_sse_error(body, self._flat_errors))
            await self._send(self.start)
            self.started = True
        elif problem is not None and self.sse:
            return await self.end_stream(problem)
        await self._send(message)
        self.complete = not more

    async def replace(self, status: int, body: bytes) -> None:
        self.complete = True
        await send_json(self._send, status, body)

    async def end_stream(self, message: str) -> None:
        self.complete = True
        event = json.dumps({"error": {"message": message, "type": "engine_fault", "code": ENGINE_GONE_STATUS}})
        await self._send({"type": "http.response.body", "body": f"data: {event}\n\ndata: [DONE]\n\n".encode()})
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def finish(self, status: int, message: str, kind: str) -> None:
        """The inner app is done (or gone): make sure the client got a whole response."""
        if self.complete:
            return
        if not self.started:
            await self.replace(status, error_body(status, message, kind))
        elif self.sse:
            await self.end_stream(message)
        else:
            self.complete = True
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})


class EngineApp:
    """An ASGI app that runs ``app`` on ``loop`` (an engine's event loop) for the caller's loop.

    ``problem()`` says why the engine cannot answer (its fault), or None.
    """

    def __init__(self, app: Any, loop: asyncio.AbstractEventLoop, problem: Callable[[], str | None]):
        self.app = app
        self.loop = loop
        self.problem = problem
        self.closed: str | None = None
        self._calls: set[concurrent.futures.Future] = set()
        self._lifespan: Any = None

    # ------------------------------------------------------------------ lifecycle (any thread but the engine loop's)
    def start(self) -> None:
        """Start upstream's app on the engine loop (its lifespan builds the OpenAI handlers)."""

        async def enter():
            self._lifespan = await compat.enter_upstream_app(self.app)

        asyncio.run_coroutine_threadsafe(enter(), self.loop).result(LIFESPAN_TIMEOUT_S)

    async def close(self, reason: str) -> None:
        """Answer every request still waiting with a 503 naming ``reason``; refuse new ones.
        Run on the server's loop."""
        self.closed = reason
        for call in list(self._calls):
            call.cancel()

    # ------------------------------------------------------------------ requests
    @property
    def requests(self) -> int:
        return len(self._calls)

    async def __call__(self, scope, receive, send) -> None:
        if self.closed is not None or not self.loop.is_running():
            reason = self.closed or "the engine is not running"
            return await send_json(send, ENGINE_GONE_STATUS, error_body(ENGINE_GONE_STATUS, reason, "unavailable"))
        server_loop = asyncio.get_running_loop()
        relay = _Relay(send, self.problem, flat_errors=scope.get("path", "").startswith("/v1/"))

        def on_server(coro):
            return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, server_loop))

        async def inner_receive():
            return await on_server(receive())

        async def inner_send(message):
            await on_server(relay.send(message))

        call = asyncio.run_coroutine_threadsafe(self.app(scope, inner_receive, inner_send), self.loop)
        self._calls.add(call)
        status, message, kind = ENGINE_GONE_STATUS, None, "unavailable"
        try:
            await asyncio.wrap_future(call)
        except asyncio.CancelledError:
            if self.closed is None or asyncio.current_task().cancelling():
                raise
            message = self.closed
        except Exception as e:  # noqa: BLE001 - the client gets an answer, the server lives on
            if not relay.complete:  # (otherwise upstream answered 500 and logged it already)
                logger.exception("the engine's app failed on %s", scope.get("path"))
            status, message, kind = 500, f"internal error: {type(e).__name__}: {e}", "error"
        finally:
            self._calls.discard(call)
        problem = self.problem()
        if problem is not None:
            status, message, kind = ENGINE_GONE_STATUS, problem, "engine_fault"
        await relay.finish(status, message or "the request ended without a response", kind)
