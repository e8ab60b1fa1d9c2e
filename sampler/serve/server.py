"""An sglang-jax HTTP server whose weights can be replaced while it runs.

``python -m sampler.serve --model-path DIR [--port N] [--admin-token T]`` (or the
``sglang-jax-sampler-serve`` command) serves
sglang-jax's own routes (``/generate``, ``/v1/completions``, ``/v1/chat/completions``,
``/health``, ...) from in-process engines, plus admin endpoints that hot-reload weights
through the converters (see ``WeightServer``): one engine, or several on disjoint devices
(``--data-parallel-size N``: one port, requests routed by ``routing.EngineRouter``;
``--num-servers N``: one port per engine), every weight change applied to all engines or
none. The HTTP server runs on an event loop of its own; sglang-jax's routes run on each
engine's loop (where its tokenizer manager lives) through ``bridge.EngineApp``, so the
server outlives an engine that faults and is rebuilt (``sampler.serve.rebuild``).
"""

import asyncio
import dataclasses
import hmac
import importlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from converters.checkpoint import CheckpointError
from converters.errors import ConversionError
from sampler import compat
from sampler.errors import UpdateTimeoutError
from sampler.interface import RolloutEngine
from sampler.reports import UpdateReport
from sampler.serve.admission import ADMIN_TOKEN_ENV, Admission, bearer
from sampler.serve.bridge import EngineApp
from sampler.serve.routing import EngineRouter
from sampler.sync.inflight import check_in_flight

logger = logging.getLogger(__name__)

#: The default cap on request bodies (bytes).
MAX_BODY_BYTES = 16 * 2**20
#: The default cap on prompts (times ``n``) per generation request.
MAX_BATCH_SIZE = 1024
#: Where the API key may come from when ``--api-key`` is not given.
API_KEY_ENV = "SAMPLER_API_KEY"
#: Retry-After (s) while the engine is rebuilt.
RECOVERY_RETRY_AFTER_S = 5


def serving_engines(sampler: RolloutEngine) -> list[Any]:
    """The in-process engines behind ``sampler``: a ``DataParallelSampler``'s members, or itself."""
    return list(getattr(sampler, "samplers", None) or [sampler])


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
      under the new weights (see ``sampler.sync.inflight``). 409 while another weight change runs.
      Every ``/generate`` answer's ``meta_info["weight_versions"]`` says which weight
      version produced which tokens.
    - ``GET /admin/reload_status``, ``GET /admin/weights_checksum`` (``fingerprint()``),
      ``POST /admin/perturb_weights`` (only with ``enable_weight_perturb``).

    Admin endpoints and sglang-jax's engine-control routes (``UPSTREAM_CONTROL_PATHS``) need
    ``Authorization: Bearer <admin_token>`` (or ``X-Admin-Token``); without a configured
    token they are disabled (403). The sampler is a ``SglangJaxSampler`` or a
    ``DataParallelSampler`` (several engines): ``app`` serves them all on one port (each
    request to the least busy engine, engine-control routes to every engine), ``port_apps()``
    one app per engine; every app's admin endpoints act on all engines at once.
    """

    def __init__(
        self,
        sampler: RolloutEngine,
        *,
        admin_token: str | None = None,
        api_key: str | None = None,
        enable_weight_perturb: bool = False,
        enable_fault_injection: bool = False,
        max_body_bytes: int = MAX_BODY_BYTES,
    ):
        self.sampler = sampler
        self.engines = serving_engines(sampler)
        #: Tells apart the processes behind several ports (the admin client reloads each once).
        self.server_id = uuid.uuid4().hex
        self.router = EngineRouter(len(self.engines))
        self.admin_token = admin_token or None
        self.api_key = api_key or None
        self.enable_weight_perturb = enable_weight_perturb
        self.enable_fault_injection = enable_fault_injection
        #: Test-only fault injection (``sampler.serve.faults``), loaded only when enabled.
        self.faults = importlib.import_module("sampler.serve.faults") if enable_fault_injection else None
        self.max_body_bytes = max_body_bytes
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
        #: serving | recovering | failed | stopping, and why when not serving
        self.engine_state = "serving"
        self.engine_reason: str | None = None
        self.engine_events: dict[str, Any] = {"restarts": 0, "last_fault": None, "last_restart": None}
        self.engine_apps: list[EngineApp] = []
        self._admin_app = self._build_admin_app()
        self.app = Admission(self._admin_app, server=self)
        self.install_engines()

    # ------------------------------------------------------------------ apps
    def port_apps(self) -> list["Admission"]:
        """One app per engine (the one-port-per-engine layout); admin endpoints act on all."""
        return [Admission(self._admin_app, server=self, engine=i) for i in range(len(self.engines))]

    def install_engines(self) -> None:
        """Serve sglang-jax's routes from each engine's current instance (from any thread but
        the engines' loops)."""
        apps = []
        for engine in self.engines:
            handle = engine.handle

            def problem(handle=handle) -> str | None:
                fault = handle.fault_message()
                if fault is not None:
                    return f"{fault}; the server rebuilds its engine"
                return "the engine was shut down" if handle.closed else None

            app = EngineApp(compat.upstream_http_app(engine.engine), handle.loop, problem)
            app.start()
            apps.append(app)
        self.engine_apps = apps

    def engine_fault(self) -> str | None:
        """Why an engine cannot serve (its thread failed), or None."""
        for i, engine in enumerate(self.engines):
            fault = engine.fault
            if fault is not None:
                return fault if len(self.engines) == 1 else f"engine {i}: {fault}"
        return None

    def restart_engines(self) -> tuple[str, dict[str, Any]]:
        """Rebuild the faulted engines (main thread only) and serve from them: (summary, details)."""
        reports = self.sampler.restart()
        reports = reports if isinstance(reports, list) else [reports]
        self.install_engines()
        details = [dataclasses.asdict(r) for r in reports]
        return "; ".join(r.summary() for r in reports), details[0] if len(details) == 1 else {"engines": details}

    def _build_admin_app(self):
        from fastapi import FastAPI
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse
        from pydantic import BaseModel

        app = FastAPI(openapi_url=None)

        @app.exception_handler(RequestValidationError)
        async def bad_body(_request, exc: RequestValidationError):
            where = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
            return _error(400, f"invalid request body: {where}", "BadRequestError")

        class ReloadBody(BaseModel):
            model_path: str
            load_format: str = "safetensors"
            in_flight: str = "drain"

        class PerturbBody(BaseModel):
            seed: int = 0
            scale: float = 0.01
            num_leaves: int = 1

        class FaultBody(BaseModel):
            park: bool = False
            thread: str | None = None
            engine: int = 0

        @app.get("/health")
        async def health():
            body = self.health()
            return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

        @app.post("/admin/reload_weights")
        async def reload_weights(body: ReloadBody):
            return await self.reload(body.model_path, body.load_format, body.in_flight)

        @app.get("/admin/reload_status")
        async def reload_status():
            return self.status()

        @app.get("/admin/weights_checksum")
        async def weights_checksum():
            async with self._lock():
                prints = await asyncio.to_thread(lambda: [e.fingerprint() for e in self.engines])
            agree = len(set(prints)) == 1
            return {
                "checksum": prints[0] if agree else None,
                "agree": agree,
                "version": self.sampler.version,
                "server_id": self.server_id,
                "engines": [
                    {"index": i, "checksum": fp, "version": engine.version}
                    for i, (engine, fp) in enumerate(zip(self.engines, prints))
                ],
            }

        @app.post("/admin/perturb_weights")
        async def perturb(body: PerturbBody):
            return await self.perturb(body.seed, body.scale, body.num_leaves)

        @app.post("/admin/inject_fault")
        async def inject_fault(body: FaultBody):
            if self.faults is None:
                return _error(403, "fault injection is disabled: it exists for tests (--enable-fault-injection)")
            if not 0 <= body.engine < len(self.engines):
                return _error(400, f"engine must be in [0, {len(self.engines)}) (got {body.engine})")
            engine = self.engines[body.engine]
            try:
                return await asyncio.to_thread(self.faults.inject_fault, engine, park=body.park, thread=body.thread)
            except ValueError as e:
                return _error(400, str(e))

        return app

    # ------------------------------------------------------------------ engine faults and rebuilds
    async def begin_recovery(self, reason: str) -> None:
        """Stop serving the faulted engine: new requests get 503 naming ``reason``, requests
        still waiting on it get a 503 now; waits for a weight change under way to end."""
        self.engine_state, self.engine_reason = "recovering", reason
        self.engine_events["last_fault"] = {"reason": reason, "at": time.time()}
        for app in self.engine_apps:
            await app.close(reason)
        await self._lock().acquire()

    async def end_recovery(self, restart: dict[str, Any] | None, failure: str | None = None) -> None:
        """Serve again (the engine was rebuilt), or stay down for good with ``failure``."""
        if failure is None:
            self.engine_events["restarts"] += 1
            self.engine_events["last_restart"] = {**(restart or {}), "at": time.time()}
            self.engine_state, self.engine_reason = "serving", None
        else:
            self.engine_state, self.engine_reason = "failed", failure
        self._lock().release()

    async def stop_engine(self, reason: str) -> None:
        """Answer every request still waiting with a 503 naming ``reason`` (server stopping)."""
        self.engine_state, self.engine_reason = "stopping", reason
        for app in self.engine_apps:
            await app.close(reason)

    def _lock(self) -> asyncio.Lock:
        if self._weights_lock is None:  # created on the engine loop, where it is used
            self._weights_lock = asyncio.Lock()
        return self._weights_lock

    # ------------------------------------------------------------------ policy
    def auth_problem(self, headers) -> tuple[int, str] | None:
        """Why an admin request is refused (status, message), or None."""
        if self.admin_token is None:
            return 403, f"admin endpoints are disabled: start the server with --admin-token or ${ADMIN_TOKEN_ENV}"
        given = headers.get("x-admin-token") or bearer(headers)
        if not given:
            return 401, "missing admin token (Authorization: Bearer <token>)"
        if not hmac.compare_digest(given.encode(), self.admin_token.encode()):
            return 401, "wrong admin token"
        return None

    def key_problem(self, headers) -> tuple[int, str] | None:
        """Why an inference request is refused for its API key (only with ``api_key``)."""
        if self.api_key is None:
            return None
        given = bearer(headers)
        if not given:
            return 401, "missing API key (Authorization: Bearer <key>)"
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            return 401, "wrong API key"
        return None

    def admission_problem(self) -> tuple[str, int | None] | None:
        """Why a new generation request cannot be served now: (reason, Retry-After)."""
        if self.engine_state != "serving":
            retry = RECOVERY_RETRY_AFTER_S if self.engine_state == "recovering" else None
            return self.engine_reason or f"the engine is {self.engine_state}", retry
        fault = self.engine_fault()
        if fault is not None:  # noticed before the rebuild starts
            return f"{fault}; the server rebuilds its engine", RECOVERY_RETRY_AFTER_S
        if self.gating:
            return f"the server is changing its weights ({self.operation}); retry shortly", max(
                1, math.ceil(self.last_seconds)
            )
        try:
            self.sampler.check_servable()
        except Exception as e:  # broken / donated weights: serving would crash or mix weights
            return str(e), None
        return None

    def health(self) -> dict[str, Any]:
        """``/health``: "ok" while the engine can serve; otherwise why not (HTTP 503)."""
        status, reason = self.engine_state, self.engine_reason
        if status == "serving":
            fault = self.engine_fault()
            status, reason = ("faulted", fault) if fault is not None else ("ok", None)
        return {"status": status, "reason": reason, "version": self.sampler.version, **self.engine_events}

    def engine_status(self) -> list[dict[str, Any]]:
        """Per engine: version, fault, requests in it, and what the router sent it."""
        out = []
        for i, engine in enumerate(self.engines):
            load = self.router.loads[i]
            out.append(
                {
                    "index": i,
                    "version": engine.version,
                    "fault": engine.fault,
                    "devices": [d.id for d in engine.mesh.devices.flat],
                    "engine_requests": compat.requests_in_flight(engine.engine.tokenizer_manager),
                    "paused": compat.is_paused(engine.engine.tokenizer_manager),
                    "bridged_requests": self.engine_apps[i].requests if i < len(self.engine_apps) else 0,
                    "outstanding_requests": load.requests,
                    "outstanding_tokens": load.tokens,
                    "routed": load.routed,
                }
            )
        return out

    def status(self) -> dict[str, Any]:
        engines = self.engine_status()
        return {
            "engine": {"state": self.engine_state, "reason": self.engine_reason, **self.engine_events},
            "server_id": self.server_id,
            "state": self.state,
            "operation": self.operation,
            "version": self.sampler.version,
            # how the engines serve their weights quantized (None: in the model dtype)
            "quantization": _quantization(self.sampler.quantization),
            "accepting": not self.gating,
            "in_flight": self.in_flight,
            "engine_requests": sum(e["engine_requests"] for e in engines),
            "bridged_requests": sum(e["bridged_requests"] for e in engines),
            "engines": engines,
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
        if num_leaves < 1 or not math.isfinite(scale) or scale < 0 or seed < 0:
            return _error(
                400, f"need num_leaves >= 1, a finite scale >= 0 and a seed >= 0 (got {num_leaves}, {scale}, {seed})"
            )
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


def _quantization(q: Any) -> dict[str, Any] | None:
    """``/admin/reload_status``'s view of a ``converters.Quantization``."""
    if q is None:
        return None
    return {"linear": q.linear, "moe": q.moe, "skipped": sorted(q.skipped)}


def _error(status: int, message: str, kind: str | None = None, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(
        {"ok": False, "error": {"message": message, "type": kind or "error", "code": status}},
        status_code=status,
        headers=headers,
    )
