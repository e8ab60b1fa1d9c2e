"""Real engine faults on demand, for tests of fault containment and recovery
(``python -m sampler.serve --enable-fault-injection`` imports it, nothing else does): requests
that crash one engine thread past request validation, and the park/crash driver behind
``POST /admin/inject_fault``."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from sgl_jax.srt.managers.io_struct import GenerateReqInput

from sampler import compat

#: Requests that crash one engine thread if they get past request validation (two of
#: ``compat.crashes.UPSTREAM_CRASHES``, which lists them all), and one that failed the
#: tokenizer manager's output loop (fatal only where ``compat.patch_logprob_token_decoding``
#: is undone): a negative id in ``token_ids_logprob``.
POISON_REQUESTS: dict[str, dict[str, Any]] = {
    "scheduler": {"input_ids": [5, 6, 2**31]},
    "detokenizer": {"input_ids": [5, 6, -1]},
    "tokenizer": {"input_ids": [5, 6, 7], "return_logprob": True, "token_ids_logprob": [-1]},
}
POISON_SAMPLING = {"max_new_tokens": 2, "temperature": 0.0}


async def generate_unchecked(tokenizer_manager: Any, **fields: Any) -> Any:
    """One generation request past the request checks (``compat.check_requests_with``):
    only for tests that need an input the checks refuse, e.g. to cause a real engine fault.
    Run it on the engine's event loop."""
    generate = compat.unchecked_generate_request(tokenizer_manager)
    fields.setdefault("sampling_params", dict(POISON_SAMPLING))
    return await generate(GenerateReqInput(**fields), None).__anext__()


#: How long ``inject_fault`` waits for the scheduler to park or a request to arrive (s).
INJECT_TIMEOUT_S = 60.0


def inject_fault(sampler: Any, *, park: bool = False, thread: str | None = None) -> dict[str, Any]:
    """Test-only (``python -m sampler.serve --enable-fault-injection``): cause a real fault.

    ``park=True`` parks the scheduler between two iterations, so that requests sent meanwhile
    stay in flight; ``thread`` (a key of ``POISON_REQUESTS``) sends that poison request past
    validation, waits until the engine holds it, and lets the scheduler go: the thread fails
    on it, with every request that was held in flight still waiting.
    """
    handle = sampler.handle
    if park and not handle._park.park(INJECT_TIMEOUT_S):
        raise ValueError("the scheduler did not park")
    if thread is None:
        return {"parked": park}
    if thread not in POISON_REQUESTS:
        handle._park.release()
        raise ValueError(f"thread must be one of {sorted(POISON_REQUESTS)}, got {thread!r}")
    tm = sampler.engine.tokenizer_manager
    rid = f"inject-fault-{uuid.uuid4().hex}"
    asyncio.run_coroutine_threadsafe(generate_unchecked(tm, rid=rid, **POISON_REQUESTS[thread]), handle.loop)
    deadline = time.monotonic() + INJECT_TIMEOUT_S
    while rid not in tm.rid_to_state and time.monotonic() < deadline:
        time.sleep(0.002)
    handle._park.release()
    return {"sent": thread, "rid": rid}
