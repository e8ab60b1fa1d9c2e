"""What a well-formed generation request is, checked before anything reaches the engine.

sglang-jax 0.1.0rc0 checks some request fields itself, but lets through inputs that crash
an engine thread (a negative token id, ``top_k`` beyond int32, an invalid grammar, ...), kill
the process (a negative id in ``token_ids_logprob``) or are served as garbage (ids beyond the
vocabulary), and it sends the items of a batch one by one, so a bad item k leaves items
``0..k-1`` running. Here every request is checked whole, before its first item is sent:

- ``RequestValidator.check`` runs inside every engine's tokenizer manager
  (``compat.check_requests_with``), so every way in is covered: the Python API
  (``generate_ids``, ``__call__``, ``score_completions``, the Tunix rollout), the HTTP routes
  (``/generate``, the OpenAI routes, streaming or not) and raw ``engine.async_generate`` calls;
- front ends normalise their own arguments with the helpers below (``prompt_ids``, ...)
  before building a request, and ``DataParallelSampler`` checks a whole call before it
  splits it across its engines.

A bad request raises ``InvalidRequestError`` (a ``ValueError``; HTTP 400) naming the field,
the value and what is allowed; the engine is not touched. The limits come from the running
engine (``RequestLimits.of``): the model's vocabulary, the context length and the
scheduler's real prompt and request limits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np

from sampler import compat
from sampler.errors import InvalidRequestError

#: Bounds of the int32 arrays the scheduler packs ``top_k`` and ``sampling_seed`` into.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: ``top_k`` meaning "the whole vocabulary" upstream (``-1`` is mapped to this).
TOP_K_ALL = 1 << 30
#: The grammar options; at most one per request.
GRAMMAR_KEYS = ("regex", "json_schema", "ebnf", "structural_tag")
#: Request fields this engine cannot serve (no multimodal processor, no embedding input).
UNSUPPORTED_INPUTS = ("input_embeds", "image_data", "video_data", "audio_data")


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What one running engine accepts."""

    #: Token ids are in ``[0, vocab_size)`` (the model's embedding rows).
    vocab_size: int
    #: The context length the tokenizer manager checks against.
    context_len: int
    #: Prompt plus generated tokens of one request (the scheduler's ``max_req_len``).
    max_req_len: int
    #: Prompts must be shorter than this (the scheduler's ``max_req_input_len``).
    max_req_input_len: int
    #: Prompts (times ``n``) in one request; None: unbounded.
    max_batch_size: int | None = None
    #: Upstream truncates long prompts instead of refusing them (``allow_auto_truncate``).
    truncates_prompts: bool = False

    @classmethod
    def of(cls, engine: Any, max_batch_size: int | None = None) -> "RequestLimits":
        return cls(**compat.engine_limits(engine), max_batch_size=max_batch_size)

    @property
    def max_prompt_len(self) -> int:
        return self.max_req_input_len - 1

    def max_new_tokens(self, prompt_len: int) -> int:
        """Largest ``max_new_tokens`` for a prompt of ``prompt_len`` tokens (the engine
        then generates at most ``max_req_len - prompt_len - 1`` of them)."""
        return max(0, min(self.max_req_len, self.context_len - 1) - prompt_len)

    def token_range(self) -> str:
        return f"a token id: an integer in [0, {self.vocab_size}) (the model's vocabulary)"


# --------------------------------------------------------------------------------------
# value checks: each raises InvalidRequestError(field, value, allowed)
# --------------------------------------------------------------------------------------


def is_int(x: Any) -> bool:
    """An integer, not a bool and not a float that happens to be integral."""
    return type(x) is int or isinstance(x, np.integer)


def is_number(x: Any) -> bool:
    return type(x) in (int, float) or isinstance(x, (np.integer, np.floating))


def _interval(lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    if hi is None:
        return "any value" if lo is None else f"{'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"<= {hi}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}]"


Check = Callable[[Any, str, RequestLimits], None]


Bound = int | Callable[[RequestLimits], int | None] | None


def integer(lo: int | None = None, hi: Bound = None, *, also: tuple = ()) -> Check:
    """An integer in ``[lo, hi]`` (``hi`` may depend on the limits), or one of ``also``."""

    def check(value, field, limits):
        top = hi(limits) if callable(hi) else hi
        if is_int(value) and (value in also or ((lo is None or value >= lo) and (top is None or value <= top))):
            return
        extra = "".join(f" or {a}" for a in also)
        raise InvalidRequestError(field, value, f"an integer {_interval(lo, top)}{extra}")

    return check


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Check:
    """A finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""

    def check(value, field, limits):
        if is_number(value) and math.isfinite(value):
            above = lo is None or (value > lo if lo_open else value >= lo)
            if above and (hi is None or value <= hi):
                return
        raise InvalidRequestError(field, value, f"a finite number {_interval(lo, hi, lo_open)}")

    return check


def boolean(value, field, limits) -> None:
    if type(value) is not bool and not isinstance(value, np.bool_):
        raise InvalidRequestError(field, value, "true or false")


def optional(check: Check) -> Check:
    def optional_check(value, field, limits):
        if value is not None:
            check(value, field, limits)

    return optional_check


def token_id(value, field, limits) -> None:
    if not (is_int(value) and 0 <= value < limits.vocab_size):
        raise InvalidRequestError(field, value, limits.token_range())


def token_ids(value, field, limits, *, allow_empty: bool = True) -> None:
    """A list of token ids (a 1-D integer array is fine too)."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind not in "iu":
            raise InvalidRequestError(field, value, "a list of token ids")
        bad = np.flatnonzero((value < 0) | (value >= limits.vocab_size))
        if len(bad):
            token_id(value[bad[0]].item(), f"{field}[{bad[0]}]", limits)
        items: Sequence = value
    elif isinstance(value, (list, tuple)):
        for j, t in enumerate(value):
            if not (type(t) is int and 0 <= t < limits.vocab_size):
                token_id(t, f"{field}[{j}]", limits)
        items = value
    else:
        raise InvalidRequestError(field, value, "a list of token ids")
    if not allow_empty and len(items) == 0:
        raise InvalidRequestError(field, value, "a non-empty list of token ids")


def stop_strings(value, field, limits) -> None:
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) and s for s in strings):
        raise InvalidRequestError(field, value, "a non-empty string or a list of non-empty strings")


def grammar(value, field, limits) -> None:
    """A regex / EBNF: a non-empty string (an empty structural tag crashed the scheduler)."""
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(field, value, "a non-empty string")


def schema(value, field, limits) -> None:
    """A JSON schema or structural tag: a non-empty string, or an object upstream serialises."""
    if not (isinstance(value, str) and value) and not (isinstance(value, Mapping) and value):
        raise InvalidRequestError(field, value, "a non-empty string or object")


def logit_bias(value, field, limits) -> None:
    if not isinstance(value, Mapping):
        raise InvalidRequestError(field, value, "an object mapping token ids to finite numbers")
    for key, bias in value.items():
        tid = int(key) if isinstance(key, str) and key.isdigit() else key
        token_id(tid, f"{field}[{key!r}]", limits)
        number()(bias, f"{field}[{key!r}]", limits)


#: Every sampling parameter sglang-jax 0.1.0rc0 knows (``SamplingParams.__init__``) and
#: what it may be. ``max_new_tokens``' upper bound and ``min_new_tokens <= max_new_tokens``
#: depend on the prompt and are checked per prompt.
SAMPLING_PARAMS: dict[str, Check] = {
    "max_new_tokens": optional(integer(0)),
    "min_new_tokens": integer(0),
    "temperature": number(0),
    "top_p": number(0, 1, lo_open=True),
    "top_k": integer(1, TOP_K_ALL, also=(-1,)),
    "min_p": number(0, 1),
    "frequency_penalty": number(-2, 2),
    "presence_penalty": number(-2, 2),
    "repetition_penalty": number(0, 2),
    "n": integer(1, lambda limits: limits.max_batch_size),
    "stop": optional(stop_strings),
    "stop_token_ids": optional(token_ids),
    "regex": optional(grammar),
    "json_schema": optional(schema),
    "ebnf": optional(grammar),
    "structural_tag": optional(schema),
    "ignore_eos": boolean,
    "skip_special_tokens": boolean,
    "spaces_between_special_tokens": boolean,
    "no_stop_trim": boolean,
    "stream_interval": optional(integer(1)),
    "logit_bias": optional(logit_bias),
    "sampling_seed": optional(integer(INT32_MIN, INT32_MAX)),
}


def check_sampling_params(params: Any, field: str, limits: RequestLimits) -> dict:
    """One request's sampling parameters on their own (not against its prompt)."""
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise InvalidRequestError(field, params, "an object of sampling parameters")
    for key, value in params.items():
        check = SAMPLING_PARAMS.get(key)
        if check is None:
            raise InvalidRequestError(f"{field}.{key}", value, f"one of the known parameters {sorted(SAMPLING_PARAMS)}")
        check(value, f"{field}.{key}", limits)
    grammars = [k for k in GRAMMAR_KEYS if params.get(k) is not None]
    if len(grammars) > 1:
        raise InvalidRequestError(f"{field}.{grammars[1]}", params[grammars[1]], f"unset: {grammars[0]} is set already")
    return dict(params)


def check_against_prompt(params: Mapping, field: str, prompt_len: int, limits: RequestLimits) -> None:
    """``max_new_tokens`` and ``min_new_tokens`` against the prompt they go with."""
    budget = limits.max_new_tokens(prompt_len)
    max_new = params.get("max_new_tokens")
    if max_new is not None and max_new > budget:
        raise InvalidRequestError(
            f"{field}.max_new_tokens",
            max_new,
            f"an integer in [0, {budget}] for a prompt of {prompt_len} tokens (a request holds at most "
            f"{min(limits.max_req_len, limits.context_len - 1)} tokens)",
        )
    min_new = params.get("min_new_tokens", 0)
    top = budget if max_new is None else max_new
    if min_new > top:
        raise InvalidRequestError(f"{field}.min_new_tokens", min_new, f"an integer in [0, {top}] (max_new_tokens)")


def check_prompt_len(prompt_len: int, field: str, limits: RequestLimits) -> None:
    if prompt_len < 1 or (prompt_len > limits.max_prompt_len and not limits.truncates_prompts):
        raise InvalidRequestError(
            field,
            f"<{prompt_len} tokens>",
            f"a prompt of 1 to {limits.max_prompt_len} tokens (the engine's limit for a prompt)",
        )


# --------------------------------------------------------------------------------------
# front-end helpers
# --------------------------------------------------------------------------------------


def prompt_ids(prompts: Any, field: str = "prompts") -> list[list[int]]:
    """Token-id prompts as lists of Python ints: a non-empty sequence of non-empty
    sequences of integers (integer numpy arrays are fine; floats, strings, bools are not)."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, np.ndarray)) or len(prompts) == 0:
        raise InvalidRequestError(field, prompts, "a non-empty list of prompts, each a list of token ids")
    out = []
    for i, prompt in enumerate(prompts):
        where = f"{field}[{i}]"
        if isinstance(prompt, np.ndarray):
            if prompt.ndim != 1 or prompt.dtype.kind not in "iu":
                raise InvalidRequestError(where, prompt, "a list of token ids (a 1-D integer array)")
            ids = prompt.tolist()
        elif isinstance(prompt, (list, tuple)):
            for j, t in enumerate(prompt):
                if not is_int(t):
                    raise InvalidRequestError(f"{where}[{j}]", t, "a token id (an integer)")
            ids = [int(t) for t in prompt]
        else:
            raise InvalidRequestError(where, prompt, "a list of token ids")
        if not ids:
            raise InvalidRequestError(where, ids, "a non-empty list of token ids")
        out.append(ids)
    return out


def per_prompt(value: Any, count: int, field: str) -> list:
    """A per-call option given once (shared) or as a list with exactly one entry per prompt."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise InvalidRequestError(field, value, f"one value for all prompts, or a list of {count} (one per prompt)")
        return list(value)
    return [value] * count


def samples_per_prompt(sampling_params: Any) -> int:
    """How many answers each prompt of a call gets (sampling parameter ``n``, which request
    validation makes the same for every prompt). sglang-jax returns them prompt-major: the
    ``n`` answers of prompt 0, then those of prompt 1, ..."""
    first = sampling_params if isinstance(sampling_params, Mapping) else (sampling_params or [{}])[0]
    n = first.get("n") if isinstance(first, Mapping) else None
    return n if is_int(n) and n > 0 else 1


# --------------------------------------------------------------------------------------
# the whole request
# --------------------------------------------------------------------------------------


class RequestValidator:
    """Checks whole generation requests (sglang-jax ``GenerateReqInput``) against one
    engine's limits; see the module docstring."""

    def __init__(self, limits: RequestLimits, tokenize: Callable[[list[str]], list[list[int]]] | None = None):
        self.limits = limits
        self.tokenize = tokenize

    def check(self, obj: Any, in_flight: Collection[str] = ()) -> None:
        """Raise InvalidRequestError unless every item of ``obj`` can be served as asked."""
        from sgl_jax.srt.managers.io_struct import GenerateReqInput

        limits = self.limits
        if not isinstance(obj, GenerateReqInput):
            raise InvalidRequestError(
                "request", type(obj).__name__, "a generation request (this engine serves a generation model)"
            )
        for name in UNSUPPORTED_INPUTS:
            value = getattr(obj, name, None)
            if value is not None and value != []:
                raise InvalidRequestError(name, value, "unset: this engine takes text or token ids only")
        prompts, single = self._prompts(obj)
        count = len(prompts)

        if single:
            if obj.sampling_params is not None and not isinstance(obj.sampling_params, Mapping):
                raise InvalidRequestError("sampling_params", obj.sampling_params, "one object for a single prompt")
            for name in ("return_logprob", "logprob_start_len", "top_logprobs_num", "rid"):
                if isinstance(getattr(obj, name), (list, tuple)):
                    raise InvalidRequestError(name, getattr(obj, name), "one value for a single prompt")
        params = (
            [check_sampling_params(p, f"sampling_params[{i}]", limits) for i, p in enumerate(obj.sampling_params)]
            if isinstance(obj.sampling_params, (list, tuple)) and not single
            else None
        )
        if params is not None and len(params) != count:
            raise InvalidRequestError(
                "sampling_params", obj.sampling_params, f"one object shared by all prompts, or a list of {count}"
            )
        if params is None:
            shared = check_sampling_params(obj.sampling_params, "sampling_params", limits)
            params, fields = [shared] * count, ["sampling_params"] * count
        else:
            fields = [f"sampling_params[{i}]" for i in range(count)]

        ns = {p.get("n", 1) for p in params}
        if len(ns) > 1:
            raise InvalidRequestError("sampling_params.n", sorted(ns), "the same n for every prompt")
        n = ns.pop()
        if limits.max_batch_size is not None and count * n > limits.max_batch_size:
            raise InvalidRequestError(
                "request", f"<{count} prompts x n={n}>", f"at most {limits.max_batch_size} prompts x n per request"
            )

        return_logprob = per_prompt(obj.return_logprob, count, "return_logprob")
        starts = per_prompt(obj.logprob_start_len, count, "logprob_start_len")
        tops = per_prompt(obj.top_logprobs_num, count, "top_logprobs_num")
        for name in ("stream", "return_text_in_logprobs"):
            optional(boolean)(getattr(obj, name), name, limits)
        self._token_ids_logprob(obj.token_ids_logprob, count, single)
        self._rids(obj.rid, count, single, in_flight)

        for i, (prompt, sp, field) in enumerate(zip(prompts, params, fields)):
            where = "" if single else f"[{i}]"
            optional(boolean)(return_logprob[i], f"return_logprob{where}", limits)
            optional(integer(0, lambda lim: lim.vocab_size))(tops[i], f"top_logprobs_num{where}", limits)
            if prompt is None:  # text prompt, no tokenizer to measure it with
                continue
            check_prompt_len(len(prompt), self._prompt_field(obj, i, single), limits)
            check_against_prompt(sp, field, len(prompt), limits)
            start_max = len(prompt) - 1 if return_logprob[i] else None
            optional(integer(0, start_max, also=(-1,)))(starts[i], f"logprob_start_len{where}", limits)

    # ------------------------------------------------------------------ parts
    @staticmethod
    def _prompt_field(obj: Any, i: int, single: bool) -> str:
        name = "text" if obj.text is not None else "input_ids"
        return name if single else f"{name}[{i}]"

    def _prompts(self, obj: Any) -> tuple[list[list[int] | None], bool]:
        """Each prompt's token ids (None for text when there is no tokenizer); single or batch."""
        limits = self.limits
        if (obj.text is None) == (obj.input_ids is None):
            raise InvalidRequestError("text/input_ids", None, "exactly one of text and input_ids")
        if obj.text is not None:
            single = isinstance(obj.text, str)
            texts = [obj.text] if single else obj.text
            if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
                raise InvalidRequestError("text", obj.text, "a string or a non-empty list of strings")
            if self.tokenize is None:
                return [None] * len(texts), single
            return [list(ids) for ids in self.tokenize(list(texts))], single
        ids = obj.input_ids
        if not isinstance(ids, (list, tuple, np.ndarray)) or len(ids) == 0:
            raise InvalidRequestError("input_ids", ids, "a non-empty list of token ids, or a list of such lists")
        single = not isinstance(ids[0], (list, tuple, np.ndarray))
        prompts = [ids] if single else list(ids)
        for i, prompt in enumerate(prompts):
            field = "input_ids" if single else f"input_ids[{i}]"
            token_ids(prompt, field, limits, allow_empty=False)
        return prompts, single

    def _token_ids_logprob(self, value: Any, count: int, single: bool) -> None:
        if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
            return
        if not isinstance(value, (list, tuple)):
            raise InvalidRequestError("token_ids_logprob", value, "a list of token ids (or one list per prompt)")
        if isinstance(value[0], (list, tuple)) and not single:
            if len(value) != count:
                raise InvalidRequestError("token_ids_logprob", value, f"one list for all prompts, or {count} lists")
            for i, ids in enumerate(value):
                optional(token_ids)(ids, f"token_ids_logprob[{i}]", self.limits)
        else:
            token_ids(value, "token_ids_logprob", self.limits)

    def _rids(self, rid: Any, count: int, single: bool, in_flight: Collection[str]) -> None:
        if rid is None:
            return
        rids = ([rid] if single else [f"{rid}_{i}" for i in range(count)]) if isinstance(rid, str) else rid
        if not isinstance(rids, (list, tuple)) or not all(isinstance(r, str) and r for r in rids):
            raise InvalidRequestError("rid", rid, "a non-empty string, or a list of them (one per prompt)")
        if isinstance(rid, (list, tuple)) and len(rids) != count:
            raise InvalidRequestError("rid", rid, f"a list of {count} request ids (one per prompt)")
        if len(set(rids)) != len(rids):
            raise InvalidRequestError("rid", rid, "distinct request ids")
        busy = [r for r in rids if r in in_flight]
        if busy:
            raise InvalidRequestError("rid", busy[0], "an id that no request in flight uses")


__all__ = [
    "InvalidRequestError",
    "RequestLimits",
    "RequestValidator",
    "SAMPLING_PARAMS",
    "check_sampling_params",
    "per_prompt",
    "prompt_ids",
]
