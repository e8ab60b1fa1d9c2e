"""Requests that crash a thread of sglang-jax 0.1.0rc0 when nothing refuses them first.

Upstream checks some request fields (``SamplingParams.verify``, the tokenizer manager's
length checks), but not token-id ranges, int32 bounds, types, or the logprob options. Each
request here fails the scheduler or the detokenizer thread (unpatched upstream then kills the
process; ``patch_contain_engine_faults`` contains it, but the engine is lost). The workaround is
request validation (``sampler.engine.validation``): it refuses every one of them, naming the field,
before anything is sent. ``tests/test_compat.py`` sends each one past validation to show that
upstream still crashes on it (drop the entry once it does not), and ``tests/test_validation.py``
shows each is refused.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

GREEDY = {"max_new_tokens": 2, "temperature": 0.0}
SAMPLED = {"max_new_tokens": 2, "temperature": 1.0}


@dataclasses.dataclass(frozen=True)
class UpstreamCrash:
    """One request (``GenerateReqInput`` fields) and the thread it fails in sglang-jax 0.1.0rc0."""

    request: dict[str, Any]
    thread: str  # "scheduler" or "detokenizer"
    error: str  # the exception type the thread dies of
    where: str  # upstream's failing line (site-packages/sgl_jax/srt/...)
    refused_as: str  # the field sampler.engine.validation names when it refuses it


UPSTREAM_CRASHES: dict[str, UpstreamCrash] = {
    "negative prompt id": UpstreamCrash(
        {"input_ids": [5, 6, -1], "sampling_params": GREEDY},
        "detokenizer", "OverflowError", "managers/detokenizer_manager.py:219 (batch_decode of the last 5 prompt ids)",
        "input_ids[2]",
    ),
    "prompt id beyond int32": UpstreamCrash(
        {"input_ids": [5, 6, 2**31], "sampling_params": GREEDY},
        "scheduler", "OverflowError", "managers/schedule_batch.py:1223 (prepare_for_extend, int32 array)",
        "input_ids[2]",
    ),
    "prompt id None": UpstreamCrash(
        {"input_ids": [5, 6, None], "sampling_params": GREEDY},
        "scheduler", "TypeError", "managers/schedule_batch.py:1223", "input_ids[2]",
    ),
    "skip_special_tokens not a bool": UpstreamCrash(
        {"input_ids": [5, 6, 7], "sampling_params": {**GREEDY, "skip_special_tokens": "x"}},
        "detokenizer", "TypeError", "managers/detokenizer_manager.py:219", "sampling_params.skip_special_tokens",
    ),
    "top_k beyond int32": UpstreamCrash(
        {"input_ids": [5, 6, 7], "sampling_params": {**SAMPLED, "top_k": 2**31}},
        "scheduler", "OverflowError", "sampling/sampling_batch_info.py:359 (int32 array)", "sampling_params.top_k",
    ),
    "top_k NaN": UpstreamCrash(
        {"input_ids": [5, 6, 7], "sampling_params": {**SAMPLED, "top_k": math.nan}},
        "scheduler", "ValueError", "sampling/sampling_batch_info.py:359", "sampling_params.top_k",
    ),
    "top_logprobs_num beyond the vocabulary": UpstreamCrash(
        {"input_ids": [5, 6, 7], "sampling_params": GREEDY, "return_logprob": True, "top_logprobs_num": 385},
        "scheduler", "ValueError", "layers/sampler.py:228 (jax.lax.top_k)", "top_logprobs_num",
    ),
    "top_logprobs_num a float": UpstreamCrash(
        {"input_ids": [5, 6, 7], "sampling_params": GREEDY, "return_logprob": True, "top_logprobs_num": 2.5},
        "scheduler", "TypeError", "layers/sampler.py:228", "top_logprobs_num",
    ),
    "token_ids_logprob beyond the vocabulary": UpstreamCrash(
        {"input_ids": [5, 6, 7], "sampling_params": GREEDY, "return_logprob": True, "token_ids_logprob": [400]},
        "scheduler", "IndexError", "managers/tp_worker.py:645 (_materialize_logprobs_to_host)", "token_ids_logprob[0]",
    ),
    "logprob_start_len below -1": UpstreamCrash(
        {"input_ids": [5, 6, 7], "sampling_params": GREEDY, "return_logprob": True, "logprob_start_len": -2},
        "scheduler", "AssertionError", "managers/scheduler_output_processor_mixin.py:712", "logprob_start_len",
    ),
    "logprob_start_len a float": UpstreamCrash(
        {"input_ids": [5, 6, 7], "sampling_params": GREEDY, "return_logprob": True, "logprob_start_len": 1.5},
        "scheduler", "TypeError", "managers/schedule_batch.py:529 (adjust_max_prefix_ids)", "logprob_start_len",
    ),
    "empty structural tag": UpstreamCrash(
        {"input_ids": [5, 6, 7], "sampling_params": {**GREEDY, "structural_tag": ""}},
        "scheduler", "UnboundLocalError", "managers/scheduler.py:1445 (handle_generate_request: no grammar key)",
        "sampling_params.structural_tag",
    ),
}  # fmt: skip
