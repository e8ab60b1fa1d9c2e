"""One sglang-jax engine in this process: starting, quiescing, parking and stopping it
(``handle``), what a well-formed request is (``validation``, checked inside the engine's
tokenizer manager for every route and call), and start-up progress (``progress``)."""

from sampler.engine.handle import (
    FAULT_POLL_S,
    MIN_PARK_WAIT_S,
    PAUSE_TIMEOUT_S,
    SHUT_DOWN_WHILE_WAITING,
    START_STAGES,
    EngineHandle,
    engine_kwargs,
)
from sampler.engine.validation import InvalidRequestError, RequestLimits, RequestValidator
from sampler.errors import EngineFaultError, UpdateTimeoutError

__all__ = [
    "FAULT_POLL_S",
    "MIN_PARK_WAIT_S",
    "PAUSE_TIMEOUT_S",
    "SHUT_DOWN_WHILE_WAITING",
    "START_STAGES",
    "EngineFaultError",
    "EngineHandle",
    "InvalidRequestError",
    "RequestLimits",
    "RequestValidator",
    "UpdateTimeoutError",
    "engine_kwargs",
]
