"""Sampler configuration."""

from __future__ import annotations

import dataclasses
from typing import Any

#: SamplerConfig.reshard values.
RESHARD_MODES = ("auto", "bucket", "leaf")
#: SamplerConfig.quantization names: sglang-jax's own per-channel configs of the same name
#: (``sgl_jax/srt/utils/quantization/configs/<name>.yaml``); ``_w8a8`` ones also quantize
#: activations at run time (the weights a push writes are the same).
QUANTIZATIONS = ("int8", "fp8", "int8_w8a8", "fp8_w8a8")


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
    #: How leaves that change placement are resharded: "auto" places them from host views on
    #: the CPU backend (views where shards coincide, numpy copies of the rest, on a few
    #: threads) and in one XLA program per bucket elsewhere; "bucket": XLA programs per bucket
    #: everywhere; "leaf": one XLA program per leaf.
    reshard: str = "auto"
    #: Bytes of resharded leaves in flight at once (a larger single leaf goes alone): the
    #: bound on the extra memory of a resharded update.
    reshard_bucket_bytes: int = 256 << 20
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
    #: An engine spanning several JAX processes (sglang-jax's multi-node mode; see
    #: ``sampler.multiprocess``): how many, this one's rank, and the ``host:port`` they meet at
    #: (sglang-jax binds port + 5 and + 6). None: taken from an initialised jax.distributed
    #: (process count and index; the address from ``$SAMPLER_DIST_INIT_ADDR`` or JAX's
    #: coordinator host). With one process the engine is single-process, as before.
    nnodes: int | None = None
    node_rank: int | None = None
    dist_init_addr: str | None = None
    #: How long a process of a multi-process engine waits for the others at a step before
    #: raising ``PeerFailureError`` (a process that died is reported sooner, by its heartbeat).
    peer_timeout_s: float = 300.0
    log_level: str = "error"
    #: Serve the weights quantized: one of ``QUANTIZATIONS`` or a sglang-jax quantization
    #: config file (the same as ``engine_kwargs={"quantization_config_path": ...}``). Pushes
    #: quantize each leaf as they convert it, bit for bit as sglang-jax does at load.
    quantization: str | None = None
    engine_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def quantization_config_path(self) -> str | None:
        """The sglang-jax quantization config the engine starts with (None: not quantized)."""
        q = self.quantization
        if q is None:
            return self.engine_kwargs.get("quantization_config_path")
        return q if q.endswith((".yaml", ".yml")) else f"{q}.yaml"

    def __post_init__(self):
        if self.quantization is not None:
            q = self.quantization
            if not isinstance(q, str) or not (q in QUANTIZATIONS or q.endswith((".yaml", ".yml"))):
                raise ValueError(
                    f"SamplerConfig.quantization={q!r}: one of {QUANTIZATIONS} or a quantization config .yaml file"
                )
            if self.engine_kwargs.get("quantization_config_path") not in (None, self.quantization_config_path):
                raise ValueError(
                    f"SamplerConfig.quantization={q!r} and engine_kwargs quantization_config_path="
                    f"{self.engine_kwargs['quantization_config_path']!r} disagree: set one"
                )
        if self.reshard not in RESHARD_MODES:
            raise ValueError(f"SamplerConfig.reshard={self.reshard!r}: one of {RESHARD_MODES}")
        if self.reshard_bucket_bytes < 1:
            raise ValueError(f"SamplerConfig.reshard_bucket_bytes={self.reshard_bucket_bytes}: must be >= 1")
