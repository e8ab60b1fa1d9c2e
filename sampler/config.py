"""Sampler configuration."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class SamplerConfig:
    """What the sampler needs to start an in-process sglang-jax Engine.

    ``model_path`` is an HF-style directory (config.json, tokenizer files and, with
    ``load_format="safetensors"``, weights). With the default ``load_format="dummy"``
    the engine starts with zero weights and serves whatever ``update_params`` pushes.
    On JAX's CPU backend the sampler picks working engine defaults (device "cpu",
    native attention, no precompile, a KV cache sized by ``context_length`` x
    ``max_running_requests``); anything in ``engine_kwargs`` overrides them.
    """

    model_path: str
    context_length: int = 1024
    max_running_requests: int = 8
    load_format: str = "dummy"
    tp_size: int = 1
    #: Several engines in this process, each tp_size wide on its own devices (see
    #: ``DataParallelSampler``; build samplers with ``create_sampler``).
    data_parallel_size: int = 1
    device_indexes: list[int] | None = None
    max_total_tokens: int | None = None
    mem_fraction_static: float | None = None
    random_seed: int = 42
    #: Per-request seeds (``seed=`` in ``__call__``) only take effect with this on. sglang-jax
    #: keeps the switch in a process-wide environment variable: all engines share it.
    deterministic_sampling: bool = False
    #: Keep the prefix (radix) cache; it is flushed after every weight update.
    disable_radix_cache: bool = False
    #: On CPU, let reshape-only leaves (Tunix q/k/v/o layouts) alias the trainer's memory
    #: through reshaped host views instead of copying. Has no effect on TPU.
    reshape_views: bool = True
    #: Measure live device bytes before and after each update. Off by default: it walks every
    #: live array of the process twice per update (``update_params(track_peak_memory=True)``
    #: measures them for one call).
    track_memory: bool = False
    #: Most prompts (times ``n``) one generation call may hold. Larger calls are refused
    #: (``InvalidRequestError``) before anything is sent: a runaway ``multi_sampling`` or ``n``
    #: would otherwise exhaust host memory building requests. None: no limit.
    max_batch_size: int | None = 65536
    #: How many times the sampler may restart its engine by itself after a fault (before a
    #: call, on the main thread; see ``SglangJaxSampler.restart``). 0: never, callers get
    #: ``EngineFaultError`` and may call ``restart()`` themselves.
    auto_restart: int = 0
    #: How long update_params waits for in-flight generation before raising.
    update_timeout_s: float = 600.0
    #: Progress bars for checkpoint loads and engine start-up: None shows them only on a terminal.
    progress: bool | None = None
    log_level: str = "error"
    engine_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
