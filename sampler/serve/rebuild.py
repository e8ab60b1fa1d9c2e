"""The HTTP server rebuilds a faulted engine by itself.

An engine thread that fails (an upstream bug request validation did not foresee) makes the
engine unusable but not the process. ``EngineRecovery.poll`` (the server's main thread calls
it between its other duties: sglang-jax installs signal handlers while an engine starts, so
engines are built on the main thread) notices the fault and:

1. stops serving the faulted engine: ``/health`` answers 503 with the reason, new requests
   503 + Retry-After naming the fault, requests in flight a 503 naming it;
2. rebuilds it (every faulted engine) with ``SglangJaxSampler.restart()``: the weights it served (the served arrays
   while alive, else the last checkpoint; ``sampler.restart``), the same version;
3. serves sglang-jax's routes from the new engine and resumes.

A failed rebuild is retried up to ``attempts`` times; after ``max_restarts`` rebuilds in
all, or when every attempt failed, the server stays down (``/health`` 503 "failed") with the
reason in ``/health`` and ``/admin/reload_status``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

logger = logging.getLogger(__name__)

#: Rebuild attempts for one fault before the server gives up.
RECOVERY_ATTEMPTS = 3
#: Rebuilds over the server's life before it gives up (a request that keeps crashing it).
MAX_ENGINE_RESTARTS = 10
#: How long a step on the server's loop may take (s).
SERVER_CALL_TIMEOUT_S = 600.0


class EngineRecovery:
    """Watches ``server``'s engine and rebuilds it after a fault; call ``poll`` from the
    main thread. ``on_server`` runs a coroutine on the HTTP server's loop and waits."""

    def __init__(
        self,
        server: Any,
        on_server: Callable[[Coroutine], Any],
        *,
        attempts: int = RECOVERY_ATTEMPTS,
        max_restarts: int = MAX_ENGINE_RESTARTS,
    ):
        self.server = server
        self.on_server = on_server
        self.attempts = attempts
        self.max_restarts = max_restarts

    def poll(self) -> bool:
        """Rebuild the engine if it faulted (blocks until done); True if it did anything."""
        server = self.server
        fault = server.engine_fault()
        if fault is None or server.engine_state != "serving":
            return False
        reason = f"{fault}; the server is rebuilding its engine"
        logger.error("%s", reason)
        self.on_server(server.begin_recovery(reason))
        if server.engine_events["restarts"] >= self.max_restarts:
            failure = f"{reason}, but it was rebuilt {self.max_restarts} times already (--max-engine-restarts)"
            self.on_server(server.end_recovery(None, failure))
            return True
        errors = []
        for attempt in range(1, self.attempts + 1):
            try:
                summary, details = server.restart_engines()
            except Exception as e:  # noqa: BLE001 - retried, then reported
                logger.exception("rebuilding the engine failed (attempt %d of %d)", attempt, self.attempts)
                errors.append(f"{type(e).__name__}: {e}")
                continue
            logger.warning("engine rebuilt after %s: %s", fault, summary)
            self.on_server(server.end_recovery({**details, "attempts": attempt}))
            return True
        failure = f"{reason}, but every rebuild failed ({self.attempts} attempts): {errors[-1]}"
        self.on_server(server.end_recovery(None, failure))
        return True


def caller_on(loop: asyncio.AbstractEventLoop) -> Callable[[Coroutine], Any]:
    """``on_server`` for ``EngineRecovery``: run a coroutine on ``loop`` from another thread."""
    return lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(SERVER_CALL_TIMEOUT_S)
