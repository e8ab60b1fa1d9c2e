"""The one interface every rollout engine here implements, and the Tunix sampler front
end built on it.

``RolloutEngine`` is what ``SglangJaxRollout``, the HTTP server and trainers use: weights
in (``update_params``, ``load_checkpoint``), tokens out (``generate_ids``). Its concrete
methods turn ``generate_ids`` into Tunix's ``BaseSampler`` API: tokenization, sampling
parameters, seeds, left-padded prompts, per-token logprobs, and scoring of completions.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from tunix.generate import base_sampler
from tunix.generate import tokenizer_adapter as tok_adapter

from converters import ModelSpec, Quantization
from sampler import compat
from sampler.config import SamplerConfig
from sampler.engine.validation import RequestLimits, integer, is_int, token_ids
from sampler.errors import InvalidRequestError
from sampler.reports import SharingReport, UpdateReport

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SglangSamplerOutput(base_sampler.SamplerOutput):
    """Tunix's SamplerOutput plus sglang-jax's per-request meta info."""

    meta: list[dict] = dataclasses.field(default_factory=list)


def generated_tokens(result: dict) -> tuple[list[int], list[float]]:
    """Every id an engine answer generated and its logprob, checked one to one.

    ``output_ids`` hold every generated id (``compat.patch_detokenizer_output``), the stop
    token and special ids included; they must equal the ids of the logprob records. A
    difference means an upstream change the compat patches do not cover: raised, never
    handed to a trainer."""
    ids = list(result["output_ids"])
    records = result["meta_info"].get("output_token_logprobs") or []
    if ids != [tid for _, tid, *_ in records] or len(ids) != result["meta_info"].get("completion_tokens", len(ids)):
        raise RuntimeError(
            f"the engine's output_ids ({len(ids)}) and its logprob records ({len(records)}) of request "
            f"{result['meta_info'].get('id')} disagree: sglang-jax {compat.SGLANG_JAX_VERSION} behaviour that "
            "sampler.compat no longer covers"
        )
    return ids, [lp for lp, *_ in records]


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def as_tokenizer_adapter(tokenizer: Any, model_path: str) -> tok_adapter.TokenizerAdapter:
    """Tunix's TokenizerAdapter over ``tokenizer``, or over the model directory's own."""
    if tokenizer is None:
        # Loaded here first: a tokenizer that fails inside the engine's startup kills the process.
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
    return tokenizer if isinstance(tokenizer, tok_adapter.TokenizerAdapter) else tok_adapter.TokenizerAdapter(tokenizer)


class RolloutEngine(base_sampler.BaseSampler, abc.ABC):
    """Weights in, tokens out: one engine (``SglangJaxSampler``) or several
    (``DataParallelSampler``) behind the same calls."""

    config: SamplerConfig
    tokenizer: tok_adapter.TokenizerAdapter

    # ------------------------------------------------------------------ weights
    @property
    @abc.abstractmethod
    def spec(self) -> ModelSpec: ...

    @property
    def quantization(self) -> Quantization | None:
        """How the engine(s) serve weights quantized (pass it to ``converters.fingerprint_params``);
        None when they serve the model dtype."""
        return None

    @property
    @abc.abstractmethod
    def version(self) -> int:
        """How many weight updates the engine(s) have taken."""

    @abc.abstractmethod
    def update_params(
        self,
        updated_weights: Any,
        filter_types: Sequence[type] | type | None = None,
        *,
        source_format: str | None = None,
        strict: bool = True,
        track_peak_memory: bool = False,
        alias: bool = True,
        check_finite: bool = False,
        in_flight: str = "drain",
        max_staleness: int | None = None,
    ) -> UpdateReport:
        """Serve ``updated_weights`` from the next request on (see ``SglangJaxSampler``)."""

    @abc.abstractmethod
    def load_checkpoint(
        self,
        path_or_weights: Any,
        *,
        strict: bool = True,
        track_peak_memory: bool = False,
        in_flight: str = "drain",
        max_staleness: int | None = None,
    ) -> UpdateReport:
        """Load an HF safetensors directory (or an in-memory tree) into the engine(s)."""

    @abc.abstractmethod
    def check_checkpoint(self, path: Any, *, strict: bool = True) -> None:
        """Raise as ``load_checkpoint`` would, reading only the headers, changing nothing."""

    @abc.abstractmethod
    def verify_sharing(
        self, updated_weights: Any, filter_types: Any = None, *, source_format: str | None = None
    ) -> Any:
        """Per engine leaf, whether the engine holds the very same device buffers as its source
        (a ``SharingReport``; one per engine for several)."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Content hash of the served weights (``converters.fingerprint_params`` of the source)."""

    @abc.abstractmethod
    def engine_params(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def weight_paths(self) -> list[str]: ...

    # ------------------------------------------------------------------ generation
    @abc.abstractmethod
    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        sampling_params: Sequence[dict] | dict,
        *,
        return_logprob: bool = True,
        logprob_start_len: int | list[int] | None = None,
        timeout: float | None = None,
    ) -> list[dict]:
        """sglang-jax's raw results for token-id prompts, one dict per prompt, in order."""

    @property
    @abc.abstractmethod
    def healthy(self) -> bool: ...

    @property
    @abc.abstractmethod
    def request_limits(self) -> RequestLimits:
        """What the engine(s) accept (vocabulary, prompt and request lengths, batch size)."""

    @abc.abstractmethod
    def check_servable(self) -> None:
        """Raise if generating now would crash the engine or use a mixed set of weights."""

    @abc.abstractmethod
    def shutdown(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ Tunix front end
    @property
    def architecture(self) -> str:
        return self.spec.architecture

    def tokenize(self, input_string: str) -> list[int]:
        ids = list(self.tokenizer.encode(input_string))
        bos = self.tokenizer.bos_id()
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def score_completions(
        self, prompt_tokens: np.ndarray, completion_tokens: np.ndarray, completion_mask: np.ndarray | None = None
    ) -> np.ndarray:
        """Logprob of each completion token given its prompt, computed by the engine.

        ``prompt_tokens`` left-padded (B, P), ``completion_tokens`` right-padded (B, C), as
        Tunix passes them. A completion ends at its last non-pad token (right padding: a pad id
        sampled inside a completion is a real token, and Tunix's learner counts the tokens after
        it), or, given ``completion_mask`` (B, C), at its last 1; positions where the mask is 0
        score 0. Returns float32 (B, C), 0 after each completion's end.
        These are the engine's prompt logprobs: log-softmax of the raw logits.
        """
        pad = self.tokenizer.pad_id()
        prompt_tokens = np.asarray(prompt_tokens)
        completion_tokens = np.asarray(completion_tokens)
        for name, x in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens)):
            if x.ndim != 2 or x.dtype.kind not in "iu":
                raise InvalidRequestError(name, f"<{x.dtype} array of shape {x.shape}>", "a 2-D integer array")
        if len(prompt_tokens) != len(completion_tokens):
            raise InvalidRequestError(
                "completion_tokens", f"<{len(completion_tokens)} rows>", f"{len(prompt_tokens)} rows (one per prompt)"
            )
        limits = self.request_limits
        for i, row in enumerate(completion_tokens):
            token_ids(row[row != pad], f"completion_tokens[{i}]", limits)
        out = np.zeros(completion_tokens.shape, np.float32)
        inputs, starts, lengths = [], [], []
        if completion_mask is not None and np.shape(completion_mask) != completion_tokens.shape:
            raise ValueError(
                f"completion_mask has shape {np.shape(completion_mask)}, completion_tokens {completion_tokens.shape}"
            )
        for row, (prompt, completion) in enumerate(zip(prompt_tokens, completion_tokens)):
            first = int(np.argmax(prompt != pad)) if (prompt != pad).any() else len(prompt)
            p = prompt[first:].tolist()
            real = np.flatnonzero(completion != pad if completion_mask is None else completion_mask[row] != 0)
            c = completion[: real[-1] + 1 if len(real) else 0].tolist()
            if not p:
                raise ValueError("a prompt row holds only padding")
            inputs.append(p + c)
            starts.append(len(p) - 1)  # the record at len(p)-1 is the prompt's last token (no logprob)
            lengths.append(len(c))
        todo = [i for i, n in enumerate(lengths) if n]
        if not todo:
            return out
        results = self.generate_ids(
            [inputs[i] for i in todo],
            [{"max_new_tokens": 0, "temperature": 0.0} for _ in todo],
            return_logprob=True,
            logprob_start_len=[starts[i] for i in todo],
        )
        for i, res in zip(todo, results):
            records = res["meta_info"]["input_token_logprobs"][1:]
            out[i, : lengths[i]] = [lp for lp, *_ in records[: lengths[i]]]
        if completion_mask is not None:
            out *= np.asarray(completion_mask) != 0
        return out

    def __call__(
        self,
        input_strings: str | list[str],
        max_generation_steps: int,
        max_prompt_length: int | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int | None = None,
        beam_size: int | None = None,
        seed: int | list[int] | None = None,
        multi_sampling: int = 1,
        return_logits: bool = True,
        echo: bool = False,
        pad_output: bool = False,
        **kwargs: Any,
    ) -> SglangSamplerOutput:
        """Tunix's sampler call: text, completion tokens, left-padded prompt tokens and
        the per-token logprobs of every generated token."""
        if beam_size is not None:
            raise NotImplementedError("beam search is not supported by the sglang-jax engine")
        if isinstance(input_strings, str):
            input_strings = [input_strings]
        if not isinstance(input_strings, (list, tuple, np.ndarray)) or len(input_strings) == 0:
            raise InvalidRequestError("input_strings", input_strings, "a string or a non-empty list of strings")
        for i, text in enumerate(input_strings):
            if not isinstance(text, str):  # numpy str_ (from data pipelines) is a str
                raise InvalidRequestError(f"input_strings[{i}]", text, "a string")
        input_strings = [str(s) for s in input_strings]
        limits = self.request_limits
        integer(0)(max_generation_steps, "max_generation_steps", limits)
        integer(1, limits.max_batch_size)(multi_sampling, "multi_sampling", limits)
        if limits.max_batch_size is not None and len(input_strings) * multi_sampling > limits.max_batch_size:
            raise InvalidRequestError(
                "multi_sampling",
                multi_sampling,
                f"at most {limits.max_batch_size} prompts x multi_sampling per call ({len(input_strings)} prompts)",
            )
        if max_prompt_length is not None:
            integer(1)(max_prompt_length, "max_prompt_length", limits)
        if max_generation_steps > self.config.context_length:
            raise ValueError(
                f"max_generation_steps={max_generation_steps} exceeds context_length={self.config.context_length}"
            )
        prompts = [self.tokenize(s) for s in input_strings]
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise InvalidRequestError(f"input_strings[{i}]", input_strings[i], "a text of at least one token")
        prompts = [p for p in prompts for _ in range(multi_sampling)]
        base = dict(
            max_new_tokens=max_generation_steps,
            temperature=temperature,
            stop_token_ids=[self.tokenizer.eos_id()],
            skip_special_tokens=True,
        )
        if top_p is not None:
            base["top_p"] = top_p
        if top_k is not None:
            base["top_k"] = top_k
        base.update(kwargs)
        params = [dict(base) for _ in prompts]
        if seed is not None and not self.config.deterministic_sampling:
            logger.warning(
                "seed=%s is ignored: per-request seeds need SamplerConfig(deterministic_sampling=True)", seed
            )
        elif seed is not None:
            if isinstance(seed, np.ndarray):
                seed = seed.tolist()
            if isinstance(seed, (list, tuple)):
                seeds = list(seed)
            elif is_int(seed):
                seeds = [int(seed) + i for i in range(len(prompts))]
            else:
                seeds = [seed]
            if not all(is_int(x) for x in seeds):
                raise InvalidRequestError("seed", seed, "an integer or a list of integers (one per prompt)")
            if len(seeds) != len(prompts):
                raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
            for request, s in zip(params, seeds):
                request["sampling_seed"] = int(s)
        outputs = self.generate_ids(prompts, params, return_logprob=True)

        longest = max(len(p) for p in prompts)
        if max_prompt_length is None or max_prompt_length < longest:
            max_prompt_length = next_power_of_2(longest)
        pad = self.tokenizer.pad_id()
        padded_prompts = np.full((len(prompts), max_prompt_length), pad, dtype=np.int32)
        for i, row in enumerate(prompts):
            padded_prompts[i, max_prompt_length - len(row) :] = row

        tokens, logprobs, texts = [], [], []
        for prompt, prompt_text, out in zip(
            prompts, [s for s in input_strings for _ in range(multi_sampling)], outputs
        ):
            generated, logprob_values = generated_tokens(out)
            ids = np.asarray(generated, dtype=np.int32)
            lps = np.asarray(logprob_values, dtype=np.float32)
            answer = out.get("text")
            text = self.tokenizer.decode(ids.tolist()) if answer is None else answer
            if echo:
                ids = np.concatenate([np.asarray(prompt, np.int32), ids])
                text = prompt_text + text
            if pad_output:
                n = max_generation_steps + (len(prompt) if echo else 0)
                ids = np.concatenate([ids, np.full(n - len(ids), pad, np.int32)])
                lps = np.concatenate([lps, np.zeros(max_generation_steps - len(lps), np.float32)])
            tokens.append(ids)
            logprobs.append(lps)
            texts.append(text)
        return SglangSamplerOutput(
            text=texts,
            logits=None,
            tokens=tokens,
            padded_prompt_tokens=padded_prompts,
            logprobs=logprobs,
            meta=[o["meta_info"] for o in outputs],
        )


__all__ = [
    "RolloutEngine",
    "SglangSamplerOutput",
    "SharingReport",
    "as_tokenizer_adapter",
    "generated_tokens",
    "next_power_of_2",
]
