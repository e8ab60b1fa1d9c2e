"""Patches to what requests get back from sglang-jax 0.1.0rc0: output ids, output logprobs,
text (each idempotent, each with a still-needed and a works test in ``tests/test_compat.py``).
An RL trainer learns from exactly these: every id the scheduler generated, one to one with
its logprob, in order, once."""

from __future__ import annotations

import dataclasses
import importlib
import numbers
from typing import Any

# --------------------------------------------------------------------------------------
# non-streamed outputs, mixed logprob batches
# --------------------------------------------------------------------------------------

#: Interval (tokens) of upstream's forced intermediate outputs of non-streamed requests.
UPSTREAM_FORCE_STREAM_INTERVAL = 50


def patch_non_stream_chunks() -> bool:
    """Send a non-streamed request's output once, when it finishes (idempotent).

    sglang-jax 0.1.0rc0 sends every non-streamed request an intermediate output each
    50 tokens (``DEFAULT_FORCE_STREAM_INTERVAL``), and the tokenizer manager then adds
    earlier tokens again: 120 generated tokens come back as 270 ``output_ids`` and 270
    ``output_token_logprobs`` (50 + 100 + 120). Raising the interval beyond any
    generation length leaves one, correct, final output. Returns True when applied now.
    """
    module = importlib.import_module("sgl_jax.srt.managers.scheduler_output_processor_mixin")
    if module.DEFAULT_FORCE_STREAM_INTERVAL != UPSTREAM_FORCE_STREAM_INTERVAL:
        return False
    module.DEFAULT_FORCE_STREAM_INTERVAL = 1 << 40
    return True


def patch_mixed_logprob_batches() -> bool:
    """Let requests with and without output logprobs share a batch (idempotent).

    sglang-jax 0.1.0rc0 turns ``return_logprob=True`` (no start position, no top-k) into
    "output logprobs only"; a batch computes those only if *all* its requests want them
    (``ScheduleBatch.return_output_logprob_only = all(...)``), but then reads them for every
    request that does: one such request batched with one that wants none raises TypeError
    in the scheduler thread, which kills the process. Marking every generation request as
    "output logprobs only" on the scheduler side (the tokenizer manager still returns them
    only to those that asked) keeps the batch flag true. Cost: a log-softmax per token.
    Returns True when applied now.
    """
    tm = importlib.import_module("sgl_jax.srt.managers.tokenizer_manager")
    io = importlib.import_module("sgl_jax.srt.managers.io_struct")
    original = tm.TokenizerManager._create_tokenized_object
    if getattr(original, "_mixed_logprob_patched", False):
        return False

    def _create_tokenized_object(self, *args, **kwargs):
        tokenized = original(self, *args, **kwargs)
        if isinstance(tokenized, io.TokenizedGenerateReqInput) and not (
            tokenized.return_logprob or tokenized.return_output_logprob_only
        ):
            tokenized.return_output_logprob_only = True
        return tokenized

    _create_tokenized_object._mixed_logprob_patched = True  # type: ignore[attr-defined]
    _create_tokenized_object.__wrapped__ = original  # type: ignore[attr-defined]
    tm.TokenizerManager._create_tokenized_object = _create_tokenized_object
    return True


# --------------------------------------------------------------------------------------
# output ids: every generated id, once; text decoded under each request's own options
# --------------------------------------------------------------------------------------

#: Attribute on the detokenizer's per-request ``DecodeStatus``: how many generated ids the
#: request has been sent so far.
_IDS_SENT = "_sampler_ids_sent"
#: A row's detokenization options (fields of ``BatchTokenIDOut``, one value per row).
_DECODE_OPTIONS = ("skip_special_tokens", "spaces_between_special_tokens")


def _rows(batch: Any, rows: list[int]) -> Any:
    """The sub-batch of ``rows`` of a ``BatchTokenIDOut`` / ``BatchStrOut``: every per-row
    field (a list with one entry per request) indexed, every batch-wide field kept."""
    n = len(batch.rids)
    changes = {
        f.name: [value[i] for i in rows]
        for f in dataclasses.fields(batch)
        if isinstance(value := getattr(batch, f.name), list) and len(value) == n
    }
    return dataclasses.replace(batch, **changes)


def _merge_rows(parts: list[tuple[list[int], Any]], n: int) -> Any:
    """The inverse of ``_rows``: one batch of ``n`` rows from ``(rows, sub-batch)`` parts."""
    first = parts[0][1]
    changes = {}
    for f in dataclasses.fields(first):
        if not isinstance(getattr(first, f.name), list) or len(getattr(first, f.name)) != len(parts[0][0]):
            continue
        merged: list = [None] * n
        for rows, part in parts:
            for i, value in zip(rows, getattr(part, f.name)):
                merged[i] = value
        changes[f.name] = merged
    return dataclasses.replace(first, **changes)


#: What a decoder makes of bytes that are not (yet) a whole UTF-8 character.
REPLACEMENT_CHARACTER = "\ufffd"


def printable_prefix(text: str) -> str:
    """``text`` without the replacement characters at its end: a streamed chunk that ends
    inside a UTF-8 character waits for the tokens that complete it."""
    return text.rstrip(REPLACEMENT_CHARACTER)


def patch_detokenizer_output() -> bool:
    """Make ``output_ids`` every id the scheduler generated, in order, each sent once; decode
    each request's text under its own options; hold back streamed text that ends inside a
    character (idempotent).

    sglang-jax 0.1.0rc0's detokenizer (``DetokenizerManager.handle_batch_token_id_out``)
    rewrites the ids it passes on: with ``skip_special_tokens`` (the default) it removes every
    special id (``process_special_tokens_spaces``), it cuts the matched stop token, and in a
    stream whose text chunk ends inside a UTF-8 character it sends again every id since its
    decoding window's start. ``output_ids`` then no longer line up with
    ``output_token_logprobs``, ``completion_tokens`` and the weight-version token indices.
    It also decodes a whole batch under its first request's ``skip_special_tokens`` and
    ``spaces_between_special_tokens``. The scheduler's incremental-decoding buffer, which the
    detokenizer keeps per request, holds every generated id (through the stop token) after the
    prompt's last ``read_offset`` ids: the ids sent are the new ones of that buffer. Batches that
    mix decoding options are decoded one group at a time.

    A streamed chunk whose text ends inside a character is meant to wait for the rest of it
    (``find_printable_text``), but sglang-jax's version returns the text as it is: the chunk
    sends a replacement character, and the final text never gets the character itself. It
    now holds back the incomplete end. Returns True when applied now.
    """
    module = importlib.import_module("sgl_jax.srt.managers.detokenizer_manager")
    dm = module.DetokenizerManager
    original = dm.handle_batch_token_id_out
    if getattr(original, "_exact_ids_patched", False):
        return False

    def exact_ids(self, recv_obj: Any, out: Any) -> Any:
        for i, rid in enumerate(recv_obj.rids):
            status = self.decode_status.get(rid)
            if status is None or out.output_ids is None:  # evicted (upstream raises first) or no ids at all
                continue
            generated = status.decode_ids[recv_obj.read_offsets[i] :]
            sent = getattr(status, _IDS_SENT, 0)
            out.output_ids[i] = list(generated[sent:])
            setattr(status, _IDS_SENT, len(generated))
        return out

    def handle_batch_token_id_out(self, recv_obj):
        groups: dict[tuple, list[int]] = {}
        for i in range(len(recv_obj.rids)):
            groups.setdefault(tuple(getattr(recv_obj, f)[i] for f in _DECODE_OPTIONS), []).append(i)
        if len(groups) <= 1:
            return exact_ids(self, recv_obj, original(self, recv_obj))
        parts = []
        for rows in groups.values():
            sub = _rows(recv_obj, rows)
            parts.append((rows, exact_ids(self, sub, original(self, sub))))
        return _merge_rows(parts, len(recv_obj.rids))

    handle_batch_token_id_out._exact_ids_patched = True  # type: ignore[attr-defined]
    handle_batch_token_id_out.__wrapped__ = original  # type: ignore[attr-defined]
    dm.handle_batch_token_id_out = handle_batch_token_id_out
    printable_prefix.__wrapped__ = module.find_printable_text  # type: ignore[attr-defined]
    module.find_printable_text = printable_prefix
    return True


def patch_filtered_logprob_lists() -> bool:
    """Drop a running batch's per-request logprob lists once no request in it wants them
    (idempotent).

    sglang-jax 0.1.0rc0's ``ScheduleBatch.filter_batch`` recomputes ``return_logprob`` from the
    requests left, but keeps their ``top_logprobs_nums`` / ``token_ids_logprobs``. When the
    last request that wanted input or top logprobs (a scoring request) finishes, the batch
    says it wants none but still holds the lists; ``merge_batch`` then adds the next
    requests without extending them, and the next ``filter_batch`` indexes past their end:
    IndexError in the scheduler thread, which dies with every request it held. With the
    lists dropped, a later merge with a batch that wants them rebuilds them for every
    request (upstream's own branch for that case). Returns True when applied now.
    """
    cls = importlib.import_module("sgl_jax.srt.managers.schedule_batch").ScheduleBatch
    original = cls.filter_batch
    if getattr(original, "_logprob_lists_patched", False):
        return False

    def filter_batch(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if not self.return_logprob:
            for info in self.reqs_info:
                info.top_logprobs_nums = info.token_ids_logprobs = None
        return out

    filter_batch._logprob_lists_patched = True  # type: ignore[attr-defined]
    filter_batch.__wrapped__ = original  # type: ignore[attr-defined]
    cls.filter_batch = filter_batch
    return True


def _sent_marks(req: Any) -> tuple:
    """What the scheduler's output step changes on a request it sends (offsets of ids sent)."""
    return req.send_token_offset, req.send_decode_id_offset


def patch_output_logprob_rows() -> bool:
    """Send each request its own output logprobs, once (idempotent).

    sglang-jax 0.1.0rc0's ``stream_output_generation`` builds one list entry per request for
    every logprob field; but in a batch where some request wants input or top logprobs
    (``return_logprob``, e.g. a scoring request with ``logprob_start_len``), a request that
    wants output logprobs only (what plain ``return_logprob=True`` becomes) gets two entries:
    every request after it receives the logprobs of the one before it (the next one gets
    ``[]``). And it never advances an output-only request's logprob offset, so each streamed
    chunk carries every logprob since the start (20 tokens -> 210 records). Sent as two
    batches, output-only requests apart, each list has one entry per request; the offset of
    an output-only request advances whenever its output is sent. Returns True when applied now.
    """
    mixin = importlib.import_module("sgl_jax.srt.managers.scheduler_output_processor_mixin")
    cls = mixin.SchedulerOutputProcessorMixin
    original = cls.stream_output_generation
    if getattr(original, "_logprob_rows_patched", False):
        return False

    def send(self, reqs, return_logprob, return_output_logprob_only, skip_reqs, cache_miss_count):
        only = [r for r in reqs if r.return_output_logprob_only]
        before = [_sent_marks(r) for r in only]
        original(self, reqs, return_logprob, return_output_logprob_only, skip_reqs, cache_miss_count)
        for r, marks in zip(only, before):
            if _sent_marks(r) != marks:  # sent now: its logprobs up to here went with it
                r.send_output_token_logprobs_offset = len(r.output_token_logprobs_val)

    def stream_output_generation(
        self, reqs, return_logprob, return_output_logprob_only, skip_reqs=None, cache_miss_count=None
    ):
        only = [r for r in reqs if r.return_output_logprob_only]
        if not return_logprob or not only:
            return send(self, reqs, return_logprob, return_output_logprob_only, skip_reqs, cache_miss_count)
        rest = [r for r in reqs if not r.return_output_logprob_only]
        send(self, only, False, True, skip_reqs, cache_miss_count)
        if rest:
            send(self, rest, True, False, skip_reqs, cache_miss_count)

    stream_output_generation._logprob_rows_patched = True  # type: ignore[attr-defined]
    stream_output_generation.__wrapped__ = original  # type: ignore[attr-defined]
    cls.stream_output_generation = stream_output_generation
    return True


# --------------------------------------------------------------------------------------
# logprob token text and values
# --------------------------------------------------------------------------------------

#: Token ids the Rust tokenizer can decode at all (it takes u32).
DECODABLE_IDS = 1 << 32


def patch_logprob_token_decoding() -> bool:
    """Make every logprob record ``(float, id, text)`` with a Python float, and decode logprob
    token ids outside ``[0, 2**32)`` to ``None`` text instead of raising (idempotent).

    The tokenizer manager decodes the token ids of logprobs (``token_ids_logprob``, or the
    prompt ids when input logprobs start at 0) to text on its event loop; a negative id makes
    the Rust tokenizer raise OverflowError there, and upstream's ``print_exception_wrapper``
    then kills the whole process. Request validation refuses such ids before they reach the
    engine; this keeps a miss from being fatal. The scheduler hands over logprob values as
    numpy floats, which the streamed ``/generate`` route cannot serialise (``orjson``:
    "Type is not JSON serializable: numpy.float64", a 500 for every streamed request that
    asks for logprobs). Returns True when applied now.
    """
    tm = importlib.import_module("sgl_jax.srt.managers.tokenizer_manager").TokenizerManager
    original = tm.detokenize_logprob_tokens
    if getattr(original, "_range_patched", False):
        return False

    def decodable(t) -> bool:
        return isinstance(t, numbers.Integral) and 0 <= t < DECODABLE_IDS

    def detokenize_logprob_tokens(self, token_logprobs_val, token_logprobs_idx, decode_to_text):
        values = [None if v is None else float(v) for v in token_logprobs_val]
        if decode_to_text and not all(decodable(t) for t in token_logprobs_idx):
            texts = [self.tokenizer.decode([int(t)]) if decodable(t) else None for t in token_logprobs_idx]
            return list(zip(values, token_logprobs_idx, texts))
        return original(self, values, token_logprobs_idx, decode_to_text)

    detokenize_logprob_tokens._range_patched = True  # type: ignore[attr-defined]
    detokenize_logprob_tokens.__wrapped__ = original  # type: ignore[attr-defined]
    tm.detokenize_logprob_tokens = detokenize_logprob_tokens
    return True
