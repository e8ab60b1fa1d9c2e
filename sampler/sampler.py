"""SglangJaxSampler: a Tunix sampler backed by an in-process sglang-jax Engine whose
weights the trainer replaces in place after every step."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from tunix.generate import base_sampler
from tunix.generate import tokenizer_adapter as tok_adapter

from converters import (
    ConversionPlan,
    ModelSpec,
    build_plan,
    detect_format,
    fingerprint as fingerprint_arrays,
    get_converter,
)
from converters.checkpoint import SafetensorsCheckpoint
from converters.errors import DeletedArrayError, ParamsMismatchError
from converters.registry import canonical_key
from converters.source import as_param_tree, key_paths, leaf_signature
from sampler.config import SamplerConfig
from sampler.engine import EngineHandle, UpdateTimeoutError, read_hf_config
from sampler.reports import SharingReport, UpdateReport
from sampler.weights import EngineWeights, buffer_pointers, live_device_bytes

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SglangSamplerOutput(base_sampler.SamplerOutput):
    """Tunix's SamplerOutput plus sglang-jax's per-request meta info."""

    meta: list[dict] = dataclasses.field(default_factory=list)


class _UpdateGate:
    """Generation calls run side by side; a weight update waits until none is in flight
    and holds new ones back until the swap is done, so every request runs on one
    complete set of weights."""

    def __init__(self):
        self._cond = threading.Condition()
        self._active = 0
        self._updating = False
        self._update_lock = threading.Lock()

    @contextlib.contextmanager
    def generating(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._updating)
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def updating(self, timeout: float):
        if not self._update_lock.acquire(timeout=timeout):
            raise UpdateTimeoutError(f"another weight update is still running after {timeout:.0f} s")
        try:
            with self._cond:
                self._updating = True
                if not self._cond.wait_for(lambda: self._active == 0, timeout):
                    self._updating = False
                    self._cond.notify_all()
                    raise UpdateTimeoutError(
                        f"{self._active} generation calls were still running after {timeout:.0f} s; "
                        "the weights were not changed"
                    )
            try:
                yield
            finally:
                with self._cond:
                    self._updating = False
                    self._cond.notify_all()
        finally:
            self._update_lock.release()


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    return jax.numpy.isfinite(x).all()


def check_finite_leaves(paths: Sequence[str], leaves: Sequence[Any]) -> None:
    """Raise ParamsMismatchError naming every floating-point leaf holding NaN or Inf."""
    floating = [(p, x) for p, x in zip(paths, leaves) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
    if not floating:
        return
    on_device = [(p, x) for p, x in floating if isinstance(x, jax.Array)]
    on_host = [(p, x) for p, x in floating if not isinstance(x, jax.Array)]
    bad = [p for p, x in on_host if not np.isfinite(np.asarray(x, np.float32)).all()]
    if on_device:
        finite = jax.device_get([_all_finite(x) for _, x in on_device])  # dispatched together, one wait
        bad += [p for (p, _), ok in zip(on_device, finite) if not ok]
    if bad:
        raise ParamsMismatchError(
            [f"{p}: holds NaN or Inf" for p in sorted(bad)], header="refusing non-finite parameters (check_finite=True)"
        )


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class SglangJaxSampler(base_sampler.BaseSampler):
    """A Tunix ``BaseSampler`` whose sglang-jax Engine runs in this process.

    ``update_params`` replaces the engine's weights with a trainer's live parameters:
    leaves that already have the engine's shape, dtype and sharding are aliased (the
    engine uses the trainer's buffers), the rest are converted leaf by leaf.
    """

    def __init__(self, tokenizer: Any = None, config: SamplerConfig | None = None):
        if config is None:
            raise TypeError("SglangJaxSampler needs config=SamplerConfig(model_path=...)")
        if config.data_parallel_size != 1:
            raise ValueError(
                f"data_parallel_size={config.data_parallel_size}: build it with sampler.create_sampler(config) "
                "or DataParallelSampler (one SglangJaxSampler is one engine)"
            )
        self.config = config
        hf = read_hf_config(config.model_path)
        if tokenizer is None:
            # Loaded here first: a tokenizer that fails inside the engine's startup kills the process.
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(config.model_path)
        self.tokenizer = (
            tokenizer if isinstance(tokenizer, tok_adapter.TokenizerAdapter) else tok_adapter.TokenizerAdapter(tokenizer)
        )
        self._handle = EngineHandle(config)
        try:
            self.engine = self._handle.engine
            runner = self._handle.model_runner
            self._weights = EngineWeights(runner)
            tp = int(runner.mesh.shape.get("tensor", 1))
            self.spec = ModelSpec.from_hf_config(hf, tp_size=tp)
            self.spec = dataclasses.replace(self.spec, dtype=np.dtype(runner.dtype).name)
        except BaseException:
            self._handle.shutdown()
            raise
        self._plans: dict[Any, ConversionPlan] = {}
        self._gate = _UpdateGate()
        self.version = 0

    # ------------------------------------------------------------------ properties
    @property
    def architecture(self) -> str:
        return self.spec.architecture

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self._handle.mesh

    @property
    def event_loop(self):
        """The engine's asyncio loop (runs in its own thread; the tokenizer manager lives there)."""
        return self._handle.loop

    @property
    def transformer(self) -> nnx.Module:
        """The engine's own nnx model (its Variables hold the served weights)."""
        return self._handle.model_runner.model

    @property
    def transformer_state(self) -> nnx.State:
        return nnx.state(self._handle.model_runner.model)

    # ------------------------------------------------------------------ weights
    def engine_params(self) -> dict[str, jax.Array]:
        """The arrays the engine serves now, keyed by engine path.

        Valid until the next update: a converted leaf is written into the buffer of the
        leaf it replaces, which deletes the old array object.
        """
        return self._weights.as_dict()

    def engine_shardings(self) -> dict[str, jax.sharding.Sharding]:
        """Engine path -> sharding: place trainer params like this for zero-copy updates."""
        return {p: x.sharding for p, x in self.engine_params().items()}

    def fingerprint(self) -> str:
        """Content hash of the served weights (same as ``converters.fingerprint_params``)."""
        # LoRA-wrapped linears hash under their plain path, as a converted trainer state does
        weights = {canonical_key(p): x for p, x in self.engine_params().items() if self._is_weight(p)}
        return fingerprint_arrays(weights)

    def _is_weight(self, path: str) -> bool:
        return get_converter(self.architecture, "sglang").feeds(path)

    def weight_paths(self) -> list[str]:
        """Engine paths of the model weights (not rotary caches or other buffers), sorted."""
        return sorted(p for p in self._weights.paths if self._is_weight(p))

    def plan_for(
        self, updated_weights: Any, filter_types: Any = None, *, source_format: str | None = None, strict: bool = True
    ) -> ConversionPlan:
        """The (cached) conversion plan for this source structure; validates everything."""
        tree = as_param_tree(updated_weights, filter_types)
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        plan, _ = self._plan(tree, leaves, treedef, source_format, strict)
        return plan

    def _plan(self, tree, leaves, treedef, source_format, strict) -> tuple[ConversionPlan, bool]:
        signatures = tuple(leaf_signature(x) for x in leaves)
        key = (treedef, signatures, source_format, strict, self.config.reshape_views)
        plan = self._plans.get(key)
        if plan is not None:
            return plan, True
        paths = key_paths(tree)
        fmt = source_format or detect_format(self.architecture, paths)
        converter = get_converter(self.architecture, fmt)
        plan = build_plan(
            converter, self.spec, paths, signatures, self._weights.leaves(), strict=strict, allow_views=self.config.reshape_views
        )
        self._plans[key] = plan
        return plan, False

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
    ) -> UpdateReport:
        """Serve ``updated_weights`` from the next request on.

        ``updated_weights``: an nnx.State, an nnx.Module, a Flax params tree or TrainState,
        or a mapping of arrays in a registered source format (detected from the paths
        unless ``source_format``). Everything is validated before the engine is touched; a
        bad tree raises a ValueError naming the offending paths and the engine keeps its
        weights. ``strict=False`` allows updating a subset of the engine's weight leaves.
        ``alias=False`` copies every leaf (for train steps that donate their parameters).
        ``check_finite=True`` refuses params holding NaN or Inf (ValueError naming the
        paths; costs one reduction over every leaf).
        """
        t0 = time.perf_counter()
        tree = as_param_tree(updated_weights, filter_types)
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        plan, reused = self._plan(tree, leaves, treedef, source_format, strict)
        plan.check_live(leaves)
        if check_finite:
            check_finite_leaves(key_paths(tree), leaves)
        return self._swap(plan, leaves, t0, reused, track_peak_memory, alias=alias)

    def load_checkpoint(
        self, path_or_weights: Any, *, strict: bool = True, track_peak_memory: bool = False
    ) -> UpdateReport:
        """Load an HF safetensors directory (one file, or shards with an index), or an
        in-memory tree (as ``update_params``).

        Tensors are read from disk one at a time, converted and put on the engine's
        shardings, so host memory stays near one tensor. A checkpoint of another
        architecture, or with a missing or misshapen tensor, raises a ValueError before
        the engine is touched (``converters.CheckpointError`` if the files are unreadable).
        """
        if not (isinstance(path_or_weights, (str, bytes)) or hasattr(path_or_weights, "__fspath__")):
            return self.update_params(path_or_weights, strict=strict, track_peak_memory=track_peak_memory)
        t0 = time.perf_counter()
        ckpt, plan = self.check_checkpoint(path_or_weights, strict=strict)
        return self._swap(plan, ckpt.leaves(), t0, False, track_peak_memory)

    def check_checkpoint(self, path: Any, *, strict: bool = True) -> tuple[SafetensorsCheckpoint, ConversionPlan]:
        """Validate a safetensors directory against the engine (reads only the headers):
        raises as ``load_checkpoint`` would, without touching the engine."""
        path = os.fsdecode(path)
        config_file = os.path.join(path, "config.json")
        if os.path.isfile(config_file):  # name the architecture mismatch, not its symptoms
            archs = read_hf_config(path).get("architectures") or []
            if archs and self.architecture not in archs:
                raise ParamsMismatchError(
                    [f"checkpoint {path!r} is a {archs[0]}, but this engine serves {self.architecture}"],
                    header="the checkpoint does not fit the engine",
                )
        ckpt = SafetensorsCheckpoint(path)
        fmt = detect_format(self.architecture, ckpt.names)
        plan = build_plan(
            get_converter(self.architecture, fmt), self.spec, ckpt.names, ckpt.signatures(),
            self._weights.leaves(), strict=strict, allow_views=False,
        )
        return ckpt, plan

    def _swap(
        self, plan: ConversionPlan, leaves: Sequence[Any], t0: float, reused: bool, track_peak_memory: bool,
        alias: bool = True,
    ) -> UpdateReport:
        self._handle.raise_if_faulted()
        track = self.config.track_memory or track_peak_memory
        before = live_device_bytes() if track else None
        peak = [before or 0]

        def on_leaf(_index, new):
            new.block_until_ready()
            peak[0] = max(peak[0], live_device_bytes())

        timeout = self.config.update_timeout_s
        with self._gate.updating(timeout), self._handle.quiesced(timeout):
            written = self._weights.swap(plan, leaves, on_leaf if track_peak_memory else None, alias=alias)
            jax.block_until_ready(written)
            self._handle.flush_cache_parked()
            self.version += 1
        del written
        after = live_device_bytes() if track else None
        copied = plan.copied if alias else plan.entries
        aliased = plan.aliased if alias else []
        return UpdateReport(
            version=self.version,
            seconds=time.perf_counter() - t0,
            source_format=plan.source_format,
            aliased=[e.engine_path for e in aliased],
            copied=[e.engine_path for e in copied],
            aliased_bytes=sum(e.nbytes for e in aliased),
            copied_bytes=sum(e.nbytes for e in copied),
            live_bytes_before=before,
            live_bytes_after=after,
            peak_extra_bytes=max(0, peak[0] - max(before, after)) if track_peak_memory and before is not None else None,
            largest_copied_leaf_bytes=max((e.nbytes for e in copied), default=0),
            untouched=list(plan.missing),
            plan_reused=reused,
        )

    def verify_sharing(self, updated_weights: Any, filter_types: Any = None, *, source_format: str | None = None) -> SharingReport:
        """Whether each engine leaf holds the very same device buffers as its source."""
        tree = as_param_tree(updated_weights, filter_types)
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        plan, _ = self._plan(tree, leaves, treedef, source_format, False)
        served = self._weights.arrays
        shared, copies = [], {}
        for entry in plan.entries:
            src = leaves[entry.source_index]
            if entry.reasons:
                copies[entry.engine_path] = "copied: " + ", ".join(entry.reasons)
                continue
            if src.is_deleted() or served[entry.engine_index].is_deleted():
                copies[entry.engine_path] = "deleted: the source or engine array was donated or freed"
            elif buffer_pointers(src) == buffer_pointers(served[entry.engine_index]):
                shared.append(entry.engine_path)
            else:
                copies[entry.engine_path] = "different buffers: these arrays were not pushed with update_params"
        for path in plan.missing:
            copies[path] = "not in the source"
        return SharingReport(shared=shared, copies=copies)

    # ------------------------------------------------------------------ generation
    def tokenize(self, input_string: str) -> list[int]:
        ids = list(self.tokenizer.encode(input_string))
        bos = self.tokenizer.bos_id()
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    @property
    def healthy(self) -> bool:
        """False once an engine thread has failed (then every call raises EngineFaultError)."""
        return not self._handle.closed and self._handle.fault() is None

    def check_servable(self) -> None:
        """Raise if generating now would crash the engine or use a mixed set of weights."""
        if self._handle.closed:
            raise RuntimeError("this sampler has been shut down")
        self._handle.raise_if_faulted()
        if self._weights.broken:
            raise RuntimeError(
                "a weight update failed midway, so the engine holds a mix of old and new leaves; "
                "push a complete set with update_params before generating"
            )
        dead = [p for p, x in zip(self._weights.paths, self._weights.arrays) if x.is_deleted()]
        if dead:
            raise DeletedArrayError(
                f"{len(dead)} engine weight arrays were deleted, e.g. {dead[:3]}: a train step donated "
                "buffers the engine aliases. Push the parameters again with update_params (or update "
                "with copies if your train step donates its parameters)"
            )

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        sampling_params: Sequence[dict] | dict,
        *,
        return_logprob: bool = True,
        logprob_start_len: int | list[int] | None = None,
        timeout: float | None = None,
    ) -> list[dict]:
        """Raw engine results for token-id prompts (one dict per prompt)."""
        self.check_servable()
        with self._gate.generating():
            out = self._handle.run(
                self.engine.async_generate(
                    input_ids=[list(map(int, p)) for p in prompts],
                    sampling_params=sampling_params if isinstance(sampling_params, dict) else list(sampling_params),
                    return_logprob=return_logprob,
                    logprob_start_len=logprob_start_len,
                ),
                timeout=timeout,
            )
        self._handle.raise_if_faulted()  # a fault during the call ended it with "abort" answers
        return out if isinstance(out, list) else [out]

    def score_completions(self, prompt_tokens: np.ndarray, completion_tokens: np.ndarray) -> np.ndarray:
        """Logprob of each completion token given its prompt, computed by the engine.

        ``prompt_tokens`` left-padded (B, P), ``completion_tokens`` right-padded (B, C), as
        Tunix passes them; returns float32 (B, C) with 0 after each completion's end.
        These are the engine's prompt logprobs: log-softmax of the raw logits.
        """
        pad = self.tokenizer.pad_id()
        prompt_tokens = np.asarray(prompt_tokens)
        completion_tokens = np.asarray(completion_tokens)
        out = np.zeros(completion_tokens.shape, np.float32)
        inputs, starts, lengths = [], [], []
        for prompt, completion in zip(prompt_tokens, completion_tokens):
            first = int(np.argmax(prompt != pad)) if (prompt != pad).any() else len(prompt)
            p = prompt[first:].tolist()
            ends = np.flatnonzero(completion == pad)
            c = completion[: ends[0] if len(ends) else len(completion)].tolist()
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
        input_strings = [str(s) for s in input_strings]  # numpy str_ from data pipelines
        if max_generation_steps > self.config.context_length:
            raise ValueError(
                f"max_generation_steps={max_generation_steps} exceeds context_length={self.config.context_length}"
            )
        prompts = [self.tokenize(s) for s in input_strings]
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
            logger.warning("seed=%s is ignored: per-request seeds need SamplerConfig(deterministic_sampling=True)", seed)
        elif seed is not None:
            seeds = list(seed) if isinstance(seed, (list, tuple, np.ndarray)) else [int(seed) + i for i in range(len(prompts))]
            if len(seeds) != len(prompts):
                raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
            for p, s in zip(params, seeds):
                p["sampling_seed"] = int(s)
        outputs = self.generate_ids(prompts, params, return_logprob=True)

        longest = max(len(p) for p in prompts)
        if max_prompt_length is None or max_prompt_length < longest:
            max_prompt_length = _next_power_of_2(longest)
        pad = self.tokenizer.pad_id()
        padded_prompts = np.full((len(prompts), max_prompt_length), pad, dtype=np.int32)
        for i, p in enumerate(prompts):
            padded_prompts[i, max_prompt_length - len(p) :] = p

        tokens, logprobs, texts = [], [], []
        for prompt, prompt_text, out in zip(
            prompts, [s for s in input_strings for _ in range(multi_sampling)], outputs
        ):
            # output_ids drops special tokens (e.g. EOS) when skip_special_tokens; the
            # logprob records hold every generated token id, aligned with its logprob.
            records = out["meta_info"].get("output_token_logprobs") or []
            ids = np.asarray([tid for _, tid, *_ in records], dtype=np.int32)
            lps = np.asarray([lp for lp, *_ in records], dtype=np.float32)
            text = out.get("text")
            if text is None:
                text = self.tokenizer.decode(ids.tolist())
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

    # ------------------------------------------------------------------ lifecycle
    def shutdown(self) -> None:
        """Stop the engine and every thread it started (idempotent)."""
        self._plans.clear()
        self._handle.shutdown()

    def __enter__(self) -> "SglangJaxSampler":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
