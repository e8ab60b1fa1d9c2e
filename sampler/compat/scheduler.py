"""The scheduler's internals that in-flight weight swaps touch (sglang-jax 0.1.0rc0).

sglang-jax has no weight-update API and no way to tell a request which weights produced
its tokens. A swap that does not drain the engine parks the scheduler thread between two
iterations (``SchedulerPark``) and then, from the swapping thread, reads and rearranges
the scheduler's queues with the functions here:

- which requests it holds, and how many tokens each has produced (``held_requests``);
- retract them, so that their KV is recomputed under the new weights (``retract_all``);
  upstream's retract loses a request whose prefill batch ran in the iteration just before
  (``retract_last_prefill_batch`` is the workaround);
- drop the prefix cache while retracted requests wait (upstream's ``flush_cache`` refuses;
  ``flush_prefix_cache_ignoring_queues`` is the workaround), or evict what is unlocked;
- give each request a prefix-cache namespace per weight version (``extra_key``), so that
  no request matches KV computed under other weights;
- take what it holds out of it and answer it "abort" (upstream's abort of a queued request
  leaves it in the tokenizer manager's table for ever); record each request's arrival;
  annotate each answer.

Every function here runs on a parked scheduler (or on its own thread, for the hooks).
"""

from __future__ import annotations

import re
import time
from typing import Any, AsyncIterator, Callable

from sampler.compat.internals import finish_aborted

#: Prefix of the prefix-cache namespace of each weight version (upstream's ``extra_key``).
NAMESPACE_FORMAT = "weights-v{version}|"
_NAMESPACE_RE = re.compile(r"^weights-v\d+\|")
#: More tokens than any KV pool holds: "evict everything that is evictable".
EVICT_ALL_TOKENS = 1 << 62


def overlap_scheduling(scheduler: Any) -> bool:
    """Whether the scheduler overlaps batches (its last batch may still be computing)."""
    return bool(scheduler.enable_overlap)


def radix_cache_enabled(scheduler: Any) -> bool:
    return not scheduler.server_args.disable_radix_cache


def _batch_requests(batch: Any) -> list:
    if batch is None:
        return []
    return [r for info in batch.reqs_info for r in (info.reqs or [])]


def _queued(scheduler: Any) -> list:
    """Requests received and not yet scheduled (no KV, no prefix-cache locks)."""
    return (
        list(scheduler.waiting_queue)
        + list(getattr(scheduler, "grammar_queue", ()))
        + list(getattr(scheduler, "pending_dp_reqs", ()))
    )


def held_requests(scheduler: Any) -> list:
    """Every unfinished request the scheduler holds: running, just prefilled, queued."""
    seen: set[int] = set()
    out = []
    candidates = (
        _batch_requests(scheduler.running_batch)
        + _batch_requests(scheduler.last_batch)
        + _batch_requests(scheduler.cur_batch)
        + [r for r in scheduler.chunked_reqs if r is not None]
        + _queued(scheduler)
    )
    for r in candidates:
        finished = getattr(r, "finished", None)
        if id(r) in seen or (finished is not None and finished()):
            continue
        seen.add(id(r))
        out.append(r)
    return out


def tokens_generated(request: Any) -> int:
    """How many output tokens a held request has produced so far."""
    return len(getattr(request, "output_ids", None) or ())


def chunked_prefill_in_progress(scheduler: Any) -> bool:
    """A long prompt is being prefilled in chunks across iterations."""
    return any(r is not None for r in scheduler.chunked_reqs)


def retract_last_prefill_batch(scheduler: Any) -> int:
    """Workaround: retract the requests of a prefill batch that ran in the last iteration.

    A prefill batch stays in ``last_batch`` until the next iteration merges it into
    ``running_batch``; upstream's retract (``Scheduler.pause_generation(mode="retract")``)
    retracts ``running_batch`` only and then drops ``last_batch``, so those requests are
    lost: they never finish, and their KV leaks until the idle memory check kills the
    scheduler thread. Filtering the batch as that merge would and retracting what is left
    keeps them (re-queued, output kept). Returns how many were retracted.
    """
    batch = scheduler.last_batch
    if batch is None or batch is scheduler.running_batch or not batch.forward_mode.is_extend():
        return 0
    chunked = {rank: r for rank, r in enumerate(scheduler.chunked_reqs) if r is not None}
    batch.filter_batch(chunked_req_to_exclude=chunked)
    if batch.is_empty() or batch.is_prefill_only:
        return 0
    retracted = batch.retract_all(scheduler.server_args)
    for req in retracted:
        scheduler._add_request_to_queue(req)
    return len(retracted)


def retract_all(scheduler: Any) -> None:
    """Retract every request that holds KV: freed, re-queued with the tokens produced so far,
    re-prefilled (prompt + those tokens) under whatever weights serve then. The scheduler's
    own pause flag is left as it was."""
    from sgl_jax.srt.managers.io_struct import PauseGenerationReqInput

    retract_last_prefill_batch(scheduler)
    paused = scheduler._engine_paused
    scheduler.pause_generation(PauseGenerationReqInput(mode="retract"))
    scheduler._engine_paused = paused


def flush_prefix_cache_ignoring_queues(scheduler: Any) -> tuple[bool, str]:
    """Workaround: drop the whole prefix cache while retracted requests wait.

    Upstream's ``flush_cache`` refuses while any request is queued, but a retracted or
    never-scheduled request holds no KV and no prefix-cache lock, so a flush is safe then;
    the queues are set aside around it (the flush would also clear ``pending_dp_reqs``).
    Only with nothing running (after ``retract_all``).
    """
    saved = scheduler.waiting_queue, scheduler.grammar_queue, scheduler.pending_dp_reqs
    scheduler.waiting_queue, scheduler.grammar_queue, scheduler.pending_dp_reqs = [], [], []
    try:
        ok, message, _ = scheduler.flush_cache()
    finally:
        scheduler.waiting_queue, scheduler.grammar_queue, scheduler.pending_dp_reqs = saved
    return ok, message


def evict_unlocked_prefix_cache(scheduler: Any) -> int:
    """Drop every prefix-cache entry no running request holds; returns tokens evicted."""
    from sgl_jax.srt.mem_cache.base_prefix_cache import EvictParams

    if not radix_cache_enabled(scheduler):
        return 0
    result = scheduler.tree_cache.evict(EvictParams(num_tokens=EVICT_ALL_TOKENS))
    return int(getattr(result, "num_tokens_evicted", 0) or 0)


def namespace(version: int, extra_key: str | None) -> str:
    """The prefix-cache key namespace of weight version ``version`` (the request's own
    ``extra_key``, e.g. a LoRA id, kept after it)."""
    rest = _NAMESPACE_RE.sub("", extra_key or "")
    return NAMESPACE_FORMAT.format(version=version) + rest


def move_queued_to_namespace(scheduler: Any, version: int) -> int:
    """Give every queued request (not yet holding KV) the namespace of ``version``: it then
    matches only prefix-cache entries computed under those weights. Returns how many."""
    queued = _queued(scheduler)
    for r in queued:
        r.extra_key = namespace(version, getattr(r, "extra_key", None))
    return len(queued)


def take_queued(scheduler: Any, rids: set[str] | None = None) -> list:
    """Remove queued requests (all, or those in ``rids``) from the scheduler: they hold no KV
    and have run no forward pass. Their clients still wait: answer them (``answer_aborted``).

    Not upstream's ``abort_request``: its answer for a queued request
    (``TokenizerManager._handle_abort_req``) never removes the request from the tokenizer
    manager's table, so the request counts as in flight forever.
    """
    taken = []
    for name in ("waiting_queue", "grammar_queue", "pending_dp_reqs"):
        queue = getattr(scheduler, name, None)
        if not queue:
            continue
        keep = []
        for r in queue:
            (taken if rids is None or r.rid in rids else keep).append(r)
        setattr(scheduler, name, keep)
    return taken


def answer_aborted(tm: Any, rids: list[str], message: str) -> None:
    """Finish these requests at the tokenizer manager with an "abort" answer (what upstream
    returns for aborted requests). Run on the engine's event loop."""
    for rid in rids:
        state = tm.rid_to_state.pop(rid, None)
        if state is not None:
            finish_aborted(state, rid, message)


def abort_held(scheduler: Any) -> list[str]:
    """Take every request the scheduler holds out of it without another forward pass
    (running ones are retracted first); returns their ids, to answer with ``answer_aborted``."""
    retract_all(scheduler)
    return [r.rid for r in take_queued(scheduler)]


def on_arrival(scheduler: Any, arrived: Callable[[list], Any], refuse: Callable[[list[str]], None]) -> None:
    """Call ``arrived(generate_requests)`` on the scheduler thread with every generation
    request as it is received, before the scheduler queues it (it may set ``extra_key``);
    when it returns request ids, those are taken out of the queue again (no forward pass)
    and handed to ``refuse``."""
    from sgl_jax.srt.managers.io_struct import TokenizedGenerateReqInput

    inner = scheduler.process_input_requests

    def process_input_requests(recv_reqs):
        new = [r for r in recv_reqs or () if isinstance(r, TokenizedGenerateReqInput)]
        refused = arrived(new) if new else None
        out = inner(recv_reqs)
        if refused:
            take_queued(scheduler, set(refused))
            refuse(list(refused))
        return out

    process_input_requests.__wrapped__ = inner  # type: ignore[attr-defined]
    scheduler.process_input_requests = process_input_requests


def annotate_answers(tm: Any, annotate: Callable[[str, dict], None], done: Callable[[str], None]) -> None:
    """Call ``annotate(rid, out)`` on every answer (streamed chunks too) the tokenizer
    manager returns, before the caller sees it, and ``done(rid)`` once a request's answers
    end (finished, aborted or abandoned). Runs on the engine's event loop."""
    inner = tm._wait_one_response

    async def _wait_one_response(obj, state, request=None) -> AsyncIterator[dict]:
        rid = obj.rid
        try:
            async for out in inner(obj, state, request):
                annotate(rid, out)
                yield out
        finally:
            done(rid)

    _wait_one_response.__wrapped__ = inner  # type: ignore[attr-defined]
    tm._wait_one_response = _wait_one_response


def record_batch_seconds(scheduler: Any) -> list[tuple[str, int, float, float]]:
    """Time every batch the scheduler runs (benchmarks): appends (``"decode"`` or
    ``"prefill"``, requests in the batch, seconds from launch to processed result, launch
    time on ``time.perf_counter``'s clock)."""
    run_batch, process = scheduler.run_batch, scheduler.process_batch_result
    records: list[tuple[str, int, float, float]] = []
    started: dict[int, float] = {}

    def timed_run_batch(batch):
        started[id(batch)] = time.perf_counter()
        return run_batch(batch)

    def timed_process_batch_result(batch, result, *args, **kwargs):
        out = process(batch, result, *args, **kwargs)
        t0 = started.pop(id(batch), None)
        if t0 is not None:
            mode = "decode" if batch.forward_mode.is_decode() else "prefill"
            records.append((mode, len(_batch_requests(batch)), time.perf_counter() - t0, t0))
        return out

    scheduler.run_batch = timed_run_batch
    scheduler.process_batch_result = timed_process_batch_result
    return records
