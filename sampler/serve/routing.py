"""Which engine serves a request when one port serves several (``--data-parallel-size``).

``EngineRouter`` sends each request to the engine with the least outstanding work: the
fewest tokens still to process (prompt plus requested new tokens, times ``n``, of the
requests it serves now), then the fewest requests in flight, then the fewest requests
served so far (so that sequential clients alternate), then the lowest index. A long
request on one engine sends the next ones to the others, unlike round-robin.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

#: Bytes of prompt text counted as one token when a request gives text, not token ids
#: (a cost estimate for routing only; the engine's tokenizer decides the real count).
BYTES_PER_TOKEN = 4
#: New tokens assumed for a request that sets no limit (upstream's default for /generate).
DEFAULT_NEW_TOKENS = 128
#: The routes that generate (others cost nothing to route).
GENERATION_PATHS = frozenset({"/generate", "/v1/completions", "/v1/chat/completions", "/invocations"})
#: The request fields that cap the new tokens, by route family.
NEW_TOKEN_FIELDS = ("max_new_tokens", "max_completion_tokens", "max_tokens")


def _prompt_tokens(prompt: Any) -> int:
    """Tokens of a prompt given as text, token ids, or a list of either (a batch)."""
    if isinstance(prompt, str):
        return max(1, len(prompt.encode()) // BYTES_PER_TOKEN)
    if isinstance(prompt, list):
        if all(isinstance(t, int) for t in prompt):
            return len(prompt)
        return sum(_prompt_tokens(p) for p in prompt)
    if isinstance(prompt, dict):  # a chat message
        return _prompt_tokens(prompt.get("content") or prompt.get("text") or "")
    return 0


def request_cost(path: str, body: bytes) -> int:
    """Tokens a generation request will make its engine process (an estimate, >= 1; 0 for
    other routes)."""
    if path not in GENERATION_PATHS:
        return 0
    try:
        request = json.loads(body) if body else {}
    except ValueError:
        return 1
    if not isinstance(request, dict):
        return 1
    params = request.get("sampling_params") if path == "/generate" else request
    params = params if isinstance(params, dict) else {}
    prompt = next((request[k] for k in ("input_ids", "text", "prompt", "messages") if request.get(k) is not None), None)
    new = next((params[k] for k in NEW_TOKEN_FIELDS if isinstance(params.get(k), int)), DEFAULT_NEW_TOKENS)
    n = params.get("n") if isinstance(params.get("n"), int) and params.get("n") > 0 else 1
    return max(1, (_prompt_tokens(prompt) + max(0, new)) * n)


@dataclasses.dataclass
class EngineLoad:
    """What one engine serves now (requests and their token cost) and has served."""

    requests: int = 0
    tokens: int = 0
    routed: int = 0


class EngineRouter:
    """Least-outstanding-work choice among ``size`` engines (see the module docstring).

    Runs on the HTTP server's loop only (no locking)."""

    def __init__(self, size: int):
        self.loads = [EngineLoad() for _ in range(size)]

    def choose(self) -> int:
        def busy(i: int) -> tuple[int, int, int, int]:
            load = self.loads[i]
            return load.tokens, load.requests, load.routed, i

        return min(range(len(self.loads)), key=busy)

    def begin(self, index: int, cost: int) -> None:
        load = self.loads[index]
        load.requests += 1
        load.tokens += cost
        load.routed += 1

    def end(self, index: int, cost: int) -> None:
        load = self.loads[index]
        load.requests -= 1
        load.tokens -= cost
