"""An sglang-jax HTTP server whose weights can be replaced while it runs.

``python -m sampler.serve --model-path DIR [--port N] [--admin-token T]`` (or the
``sglang-jax-sampler-serve`` command) serves
sglang-jax's own routes (``/generate``, ``/v1/completions``, ``/v1/chat/completions``,
``/health``, ...) from an in-process, single-process engine, plus admin endpoints that
hot-reload weights through the converters (see ``WeightServer``). The HTTP server runs
on the engine's own event loop, the loop its tokenizer manager lives on.
"""

import asyncio
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from converters.checkpoint import CheckpointError
from converters.errors import ConversionError
from sampler import compat
from sampler.base import RolloutEngine
from sampler.engine import UpdateTimeoutError
from sampler.inflight import check_in_flight
from sampler.reports import UpdateReport
from sampler.serve.admin_client import ADMIN_TOKEN_ENV

logger = logging.getLogger(__name__)

#: Always answered, even during a reload: the process is alive.
UNGATED_PATHS = frozenset({"/health"})
#: sglang-jax routes that change the engine's state: they need the admin token here.
UPSTREAM_CONTROL_PATHS = frozenset(
    {
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


def report_summary(report: UpdateReport) -> dict[str, Any]:
    """The JSON form of an UpdateReport (leaf counts instead of the path lists)."""
    return {
        "version": report.version,
        "seconds": round(report.seconds, 4),
        "source_format": report.source_format,
        "aliased_leaves": len(report.aliased),
        "copied_leaves": len(report.copied),
        "aliased_bytes": report.aliased_bytes,
        "copied_bytes": report.copied_bytes,
        "untouched_leaves": len(report.untouched),
        "in_flight": report.in_flight,
        "requests_in_flight": report.requests_in_flight,
        "wait_seconds": round(report.wait_seconds, 4),
        "summary": report.summary(),
    }


def perturb_weights(
    sampler: RolloutEngine, *, seed: int, scale: float, num_leaves: int
) -> tuple[list[str], UpdateReport]:
    """Add seeded Gaussian noise (std ``scale``) to ``num_leaves`` served weight leaves."""
    params = sampler.engine_params()
    paths = sampler.weight_paths()
    rng = np.random.default_rng(seed)
    chosen = sorted(paths[i] for i in rng.choice(len(paths), size=min(num_leaves, len(paths)), replace=False))
    noisy = {}
    for path in chosen:
        x = params[path]
        host = np.asarray(x).astype(np.float32)
        host += scale * rng.standard_normal(host.shape, dtype=np.float32)
        noisy[path] = jax.device_put(host.astype(x.dtype), x.sharding)
    return chosen, sampler.update_params(noisy, source_format="sglang", strict=False)


class WeightServer:
    """sglang-jax's FastAPI routes over a ``RolloutEngine``, plus admin endpoints.

    - ``POST /admin/reload_weights {"model_path", "load_format", "in_flight"}``: validate
      the checkpoint (headers only; a bad one is rejected with nothing paused). With
      ``in_flight="drain"`` (default) new requests get 503 + ``Retry-After`` while in-flight
      ones finish on the old weights, then the weights are swapped and the prefix cache
      flushed; with ``"continue"`` / ``"recompute"`` nothing is refused: the scheduler is
      parked between two iterations, the weights swapped, and requests in flight go on
      under the new weights (see ``sampler.inflight``). 409 while another weight change runs.
      Every ``/generate`` answer's ``meta_info["weight_versions"]`` says which weight
      version produced which tokens.
    - ``GET /admin/reload_status``, ``GET /admin/weights_checksum`` (``fingerprint()``),
      ``POST /admin/perturb_weights`` (only with ``enable_weight_perturb``).

    Admin endpoints and sglang-jax's engine-control routes (``UPSTREAM_CONTROL_PATHS``) need
    ``Authorization: Bearer <admin_token>`` (or ``X-Admin-Token``); without a configured
    token they are disabled (403). One WeightServer per process: sglang-jax's routes read a
    module-global engine state (``compat.upstream_http_app``). The sampler may be any
    ``RolloutEngine`` with an ``engine`` (the in-process sglang-jax Engine it serves).
    """

    def __init__(self, sampler: RolloutEngine, *, admin_token: str | None = None, enable_weight_perturb: bool = False):
        self.sampler = sampler
        self.admin_token = admin_token or None
        self.enable_weight_perturb = enable_weight_perturb
        self.state = "idle"  # idle | reloading | failed
        self.operation: str | None = None  # the weight change running now
        self.gating = False  # new requests get 503 while True
        self.in_flight = 0
        self.last_report: dict[str, Any] | None = None
        self.last_error: dict[str, Any] | None = None
        self.last_started: float | None = None
        self.last_finished: float | None = None
        self.last_seconds = 1.0
        self._weights_lock: asyncio.Lock | None = None
        self.app = self._build_app()

    # ------------------------------------------------------------------ app
    def _build_app(self):
        from pydantic import BaseModel

        app = compat.upstream_http_app(self.sampler.engine)
        app.add_middleware(_Admission, server=self)

        class ReloadBody(BaseModel):
            model_path: str
            load_format: str = "safetensors"
            in_flight: str = "drain"

        class PerturbBody(BaseModel):
            seed: int = 0
            scale: float = 0.01
            num_leaves: int = 1

        @app.post("/admin/reload_weights")
        async def reload_weights(body: ReloadBody):
            return await self.reload(body.model_path, body.load_format, body.in_flight)

        @app.get("/admin/reload_status")
        async def reload_status():
            return self.status()

        @app.get("/admin/weights_checksum")
        async def weights_checksum():
            async with self._lock():
                fingerprint = await asyncio.to_thread(self.sampler.fingerprint)
            return {"checksum": fingerprint, "version": self.sampler.version}

        @app.post("/admin/perturb_weights")
        async def perturb(body: PerturbBody):
            return await self.perturb(body.seed, body.scale, body.num_leaves)

        return app

    def _lock(self) -> asyncio.Lock:
        if self._weights_lock is None:  # created on the engine loop, where it is used
            self._weights_lock = asyncio.Lock()
        return self._weights_lock

    # ------------------------------------------------------------------ policy
    def auth_problem(self, headers) -> tuple[int, str] | None:
        if self.admin_token is None:
            return 403, f"admin endpoints are disabled: start the server with --admin-token or ${ADMIN_TOKEN_ENV}"
        given = headers.get("x-admin-token")
        auth = headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given:
            return 401, "missing admin token (Authorization: Bearer <token>)"
        if not hmac.compare_digest(given.encode(), self.admin_token.encode()):
            return 401, "wrong admin token"
        return None

    def admission_problem(self) -> tuple[str, int | None] | None:
        """Why a new generation request cannot be served now: (reason, Retry-After)."""
        if self.gating:
            return f"the server is changing its weights ({self.operation}); retry shortly", max(
                1, math.ceil(self.last_seconds)
            )
        try:
            self.sampler.check_servable()
        except Exception as e:  # broken / donated weights: serving would crash or mix weights
            return str(e), None
        return None

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "operation": self.operation,
            "version": self.sampler.version,
            "accepting": not self.gating,
            "in_flight": self.in_flight,
            "engine_requests": compat.requests_in_flight(self.sampler.engine.tokenizer_manager),
            "last_report": self.last_report,
            "last_error": self.last_error,
            "last_started": self.last_started,
            "last_finished": self.last_finished,
        }

    # ------------------------------------------------------------------ weight changes
    async def reload(self, model_path: str, load_format: str = "safetensors", in_flight: str = "drain"):
        if load_format not in ("safetensors", "auto"):
            return _error(400, f"load_format {load_format!r} cannot be reloaded: only 'safetensors' checkpoints")
        try:
            check_in_flight(in_flight)
        except ValueError as e:
            return _error(400, str(e))

        async def validate():
            if not Path(model_path).is_dir():
                raise FileNotFoundError(f"checkpoint directory {model_path!r} does not exist")
            await asyncio.to_thread(self.sampler.check_checkpoint, model_path)

        return await self._change(
            "reload",
            validate,
            lambda: self.sampler.load_checkpoint(model_path, in_flight=in_flight),
            {"model_path": model_path, "in_flight": in_flight},
            gate=in_flight == "drain",
        )

    async def perturb(self, seed: int, scale: float, num_leaves: int):
        if not self.enable_weight_perturb:
            return _error(403, "weight perturbation is disabled: start the server with --enable-weight-perturb")
        if num_leaves < 1 or not math.isfinite(scale) or scale < 0:
            return _error(400, f"need num_leaves >= 1 and a finite scale >= 0 (got {num_leaves}, {scale})")
        result: dict[str, Any] = {}

        def apply():
            result["leaves"], report = perturb_weights(self.sampler, seed=seed, scale=scale, num_leaves=num_leaves)
            return report

        response = await self._change("perturb", None, apply, {"seed": seed, "scale": scale})
        if isinstance(response, dict):
            response["perturbed"] = result.get("leaves", [])
        return response

    async def _change(
        self,
        operation: str,
        validate: Callable[[], Awaitable[None]] | None,
        apply: Callable[[], Any],
        detail: dict[str, Any],
        gate: bool = True,
    ):
        """One weight change at a time: validate if given (nothing paused yet), then swap;
        with ``gate`` new generation requests get 503 meanwhile (a draining swap)."""
        if self.operation is not None:
            return _error(409, f"a weight change ({self.operation}) is already running")
        self.operation, self.state = operation, "reloading"
        self.last_started, self.last_finished = time.time(), None
        t0 = time.perf_counter()
        try:
            async with self._lock():
                try:
                    if validate is not None:
                        await validate()
                except FileNotFoundError as e:
                    return self._failed(404, e, detail)
                except (ConversionError, CheckpointError) as e:
                    return self._failed(400, e, detail)
                self.gating = gate
                try:
                    report = await asyncio.to_thread(apply)
                except UpdateTimeoutError as e:
                    return self._failed(503, e, detail, retry_after=True)
                except (ConversionError, CheckpointError) as e:
                    return self._failed(400, e, detail)
                except Exception as e:  # noqa: BLE001 - reported to the caller, the server lives on
                    logger.exception("%s failed", operation)
                    return self._failed(500, e, detail)
                finally:
                    self.gating = False
        finally:
            self.operation = None
            self.last_finished = time.time()
        self.last_seconds = time.perf_counter() - t0
        self.state, self.last_error = "idle", None
        self.last_report = {**report_summary(report), **detail, "operation": operation}
        logger.info("%s done: version %d (%s)", operation, report.version, report.summary())
        return {"ok": True, "version": report.version, "report": self.last_report}

    def _failed(self, status: int, error: BaseException, detail: dict[str, Any], retry_after: bool = False):
        self.state = "failed"
        self.last_error = {"status": status, "type": type(error).__name__, "message": str(error), **detail}
        logger.warning("weight change failed (%d): %s", status, error)
        headers = {"Retry-After": "1"} if retry_after else None
        return _error(status, str(error), type(error).__name__, headers=headers)


def _error(status: int, message: str, kind: str | None = None, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(
        {"ok": False, "error": {"message": message, "type": kind or "error", "code": status}},
        status_code=status,
        headers=headers,
    )


class _Admission:
    """ASGI middleware: 503 for generation while weights change (or cannot be served),
    the admin token for engine-control routes, and a count of requests in flight (held
    until the response's last byte, so streamed responses count too)."""

    def __init__(self, app, server: WeightServer):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or path in UNGATED_PATHS:
            return await self.app(scope, receive, send)
        if path.startswith("/admin/") or path in UPSTREAM_CONTROL_PATHS:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            problem = self.server.auth_problem(headers)
            if problem is not None:
                return await _error(problem[0], problem[1], headers={"WWW-Authenticate": "Bearer"})(
                    scope, receive, send
                )
            return await self.app(scope, receive, send)
        problem = self.server.admission_problem()
        if problem is not None:
            reason, retry_after = problem
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
            return await _error(503, reason, "unavailable", headers=headers)(scope, receive, send)
        self.server.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.server.in_flight -= 1
