"""The few model facts a conversion needs, read from an HF config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping

from converters import catalog

#: Reads one field of an HF config (a dict or a transformers config object).
ConfigGetter = Callable[..., Any]

#: sglang-jax's dtype when the config names none.
DEFAULT_DTYPE = "bfloat16"


def read_hf_config(model_path: str | Path) -> dict[str, Any]:
    """``config.json`` of an HF-style model directory, as a dict."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in model_path {str(model_path)!r}")
    return json.loads(path.read_text())


#: Where multimodal configs (Gemma 4) keep the language model's fields.
TEXT_CONFIG = "text_config"
_MISSING = object()


def _field(config: Any, key: str, default: Any = _MISSING) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def config_getter(config: Any) -> ConfigGetter:
    """``get(field, default=None)`` over a config dict, a transformers config or a model directory.

    A field the top level lacks is looked up in its ``text_config`` (multimodal configs keep
    the language model's fields there)."""
    if isinstance(config, (str, Path)):
        config = read_hf_config(config)

    def get(key: str, default: Any = None) -> Any:
        value = _field(config, key)
        if value is _MISSING:
            text = _field(config, TEXT_CONFIG, None)
            value = default if text is None else _field(text, key, default)
        return value

    return get


def head_dim_of(get: ConfigGetter) -> int:
    """The attention head width: ``head_dim`` when the config sets it, else hidden / heads."""
    return get("head_dim") or get("hidden_size") // get("num_attention_heads")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Shape facts of a decoder-only model, plus the engine's tensor-parallel size.

    ``tp_size`` matters because sglang-jax replicates KV heads when it exceeds
    ``num_kv_heads`` (h0,h0,h1,h1,... or zero padding for MHA, as its loader does).
    Architecture-specific facts (set by the architecture's module) are in ``extra``.
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
    dtype: str = DEFAULT_DTYPE
    #: Experts per MoE layer (0: a dense model); stacked rules read their count from here.
    num_experts: int = 0
    #: Further facts of one architecture, as sorted (name, value) pairs (hashable).
    extra: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_hf_config(cls, config: Any, *, tp_size: int = 1) -> "ModelSpec":
        """From a transformers config, a config.json dict, or a model directory."""
        get = config_getter(config)
        archs = get("architectures") or []
        if not archs:
            raise ValueError("the HF config names no architecture ('architectures' is empty)")
        arch = catalog.find_architecture(archs[0])
        if arch is not None and arch.config_view is not None:
            get = arch.config_view(get)
        heads = get("num_attention_heads")
        fields: dict[str, Any] = dict(
            architecture=archs[0],
            num_layers=get("num_hidden_layers"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            vocab_size=get("vocab_size"),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads") or heads,
            head_dim=head_dim_of(get),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            tp_size=tp_size,
            dtype=str(get("torch_dtype") or get("dtype") or DEFAULT_DTYPE).replace("torch.", ""),
        )
        if arch is not None and arch.spec_fields is not None:
            extra = dict(arch.spec_fields(get))
            for name in [n for n in extra if n in {f.name for f in dataclasses.fields(cls)}]:
                fields[name] = extra.pop(name)
            fields["extra"] = tuple(sorted(extra.items()))
        return cls(**fields)

    def with_tp(self, tp_size: int) -> "ModelSpec":
        return dataclasses.replace(self, tp_size=tp_size)

    def get(self, name: str, default: Any = None) -> Any:
        """A field, or an architecture-specific fact from ``extra``."""
        if hasattr(self, name):
            return getattr(self, name)
        return dict(self.extra).get(name, default)

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
