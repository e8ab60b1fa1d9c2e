"""The few model facts a conversion needs, read from an HF config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Shape facts of a decoder-only model, plus the engine's tensor-parallel size.

    ``tp_size`` matters because sglang-jax replicates KV heads when it exceeds
    ``num_kv_heads`` (h0,h0,h1,h1,... or zero padding for MHA, as its loader does).
    """

    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    tp_size: int = 1
    #: dtype of the engine's parameters (the HF config's torch_dtype unless the engine overrides it)
    dtype: str = "bfloat16"

    @classmethod
    def from_hf_config(cls, config: Any, *, tp_size: int = 1) -> "ModelSpec":
        """From a transformers config, a config.json dict, or a model directory."""
        if isinstance(config, (str, Path)):
            config = json.loads((Path(config) / "config.json").read_text())
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        archs = get("architectures") or []
        if not archs:
            raise ValueError("the HF config names no architecture ('architectures' is empty)")
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        return cls(
            architecture=archs[0],
            num_layers=get("num_hidden_layers"),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size"),
            vocab_size=get("vocab_size"),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or hidden // heads,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            tp_size=tp_size,
            dtype=str(get("torch_dtype") or get("dtype") or "bfloat16").replace("torch.", ""),
        )

    def with_tp(self, tp_size: int) -> "ModelSpec":
        return dataclasses.replace(self, tp_size=tp_size)

    @property
    def kv_replicas(self) -> int:
        """How many copies of each KV head the engine keeps (sglang-jax's rule)."""
        if self.tp_size > self.num_kv_heads:
            return -(-self.tp_size // self.num_kv_heads)
        return 1

    @property
    def kv_padding(self) -> str:
        """sglang-jax replicates KV heads for GQA and zero-pads them for MHA."""
        return "replicate" if self.num_heads > self.num_kv_heads else "zero"

    @property
    def engine_kv_heads(self) -> int:
        return self.tp_size if self.tp_size > self.num_kv_heads else self.num_kv_heads
