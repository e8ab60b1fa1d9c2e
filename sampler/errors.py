"""Every exception the library raises, in one place (and the converters' own, re-exported).

Errors from a caller's input are ``ValueError`` subclasses naming the field or path at fault;
the engine keeps serving. The others say what failed and what state the engine is in.
"""

from __future__ import annotations

from typing import Any

from converters.checkpoint import CheckpointError
from converters.errors import ConversionError, DeletedArrayError, ParamsMismatchError, UnknownFormatError

#: Longest repr of a refused value quoted in an error message.
QUOTE_CHARS = 80


def quote(value: Any) -> str:
    """A refused value as an error message shows it (long ones cut)."""
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."


class InvalidRequestError(ValueError):
    """A generation request that the engine must not see: names the field, the value and
    what is allowed (HTTP 400)."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.allowed = field, allowed
        super().__init__(f"invalid {field}={quote(value)}: must be {allowed}")


class UnsupportedModelError(ValueError):
    """The engine cannot serve this model in this configuration."""


class TrainerMismatchError(ValueError):
    """A Tunix trainer built for this config would compute another model than the engine
    (which follows the HF config): its logprobs, and so the policy gradient, would be off."""


class EngineFaultError(RuntimeError):
    """An engine thread failed; this engine cannot serve again (the process is fine)."""


class UpdateTimeoutError(TimeoutError):
    """Requests kept running past the time allowed for them to finish before a weight swap."""


class WeightsLostError(RuntimeError):
    """A restarted engine could not get back the weights it served; push them again."""


class PeerFailureError(RuntimeError):
    """Another process of the engine failed, refused a step, died or stopped answering."""


class NotLeaderError(RuntimeError):
    """Generation was asked of a process other than 0 outside ``collective_generation()``."""


__all__ = [
    "CheckpointError",
    "ConversionError",
    "DeletedArrayError",
    "EngineFaultError",
    "InvalidRequestError",
    "NotLeaderError",
    "ParamsMismatchError",
    "PeerFailureError",
    "TrainerMismatchError",
    "UnknownFormatError",
    "UnsupportedModelError",
    "UpdateTimeoutError",
    "WeightsLostError",
    "quote",
]
