"""Converters keyed by (HF architecture, source format), with format detection."""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from converters import tables
from converters.errors import UnknownFormatError
from converters.tables import LeafRule, Table

_LAYER = re.compile(r"\.(\d+)(?=\.|$)")
_LINEN_LAYER = re.compile(r"(?<![^.])layers_(\d+)(?=\.|$)")


def canonical_key(path: str) -> str:
    """Spellings that mean the same leaf: ``/`` separators, a leading ``params.``,
    linen's ``layers_3``, sglang-jax's LoRA-wrapped ``.base_layer.``."""
    path = path.replace("/", ".")
    if path.startswith("params."):
        path = path[len("params.") :]
    path = _LINEN_LAYER.sub(r"layers.\1", path)
    return path.replace(".base_layer.", ".")


def abstract_key(path: str) -> tuple[str, tuple[str, ...]]:
    """``layers.3.attn.q_proj.w`` -> (``layers.{}.attn.q_proj.w``, ("3",))."""
    path = canonical_key(path)
    numbers = tuple(_LAYER.findall(path))
    return _LAYER.sub(".{}", path), numbers


class Converter:
    """One architecture's table for one source format, and key lookup over it."""

    def __init__(self, architecture: str, source_format: str, rules: Iterable[LeafRule]):
        self.architecture = architecture
        self.source_format = source_format
        self.rules: Table = tuple(rules)
        self._by_source = {r.source: r for r in self.rules}
        self._targets = {r.target for r in self.rules}
        if len(self._by_source) != len(self.rules):
            raise ValueError(f"{architecture}/{source_format}: two rules share a source pattern")

    def __repr__(self) -> str:
        return f"Converter({self.architecture!r}, {self.source_format!r}, {len(self.rules)} rules)"

    def lookup(self, path: str) -> tuple[LeafRule, str] | None:
        """The rule for a source path and the engine path it feeds, or None.

        A LoRA-wrapped engine path (``.base_layer.``) is looked up as the plain one.
        """
        pattern, numbers = abstract_key(path)
        rule = self._by_source.get(pattern)
        if rule is None:
            return None
        return rule, rule.target.format(*numbers)

    def feeds(self, engine_path: str) -> bool:
        """Whether some rule of this table produces ``engine_path`` (a weight leaf)."""
        return abstract_key(engine_path)[0] in self._targets

    def matched(self, paths: Sequence[str]) -> int:
        return sum(1 for p in paths if abstract_key(p)[0] in self._by_source)


_REGISTRY: dict[tuple[str, str], Converter] = {}


def register_converter(
    architecture: str, source_format: str, rules: Iterable[LeafRule], *, replace: bool = False
) -> Converter:
    """Add a table for (architecture, source format); returns the Converter."""
    key = (architecture, source_format)
    if key in _REGISTRY and not replace:
        raise ValueError(f"a converter for {key} is already registered (pass replace=True)")
    conv = Converter(architecture, source_format, rules)
    _REGISTRY[key] = conv
    return conv


def get_converter(architecture: str, source_format: str) -> Converter:
    try:
        return _REGISTRY[(architecture, source_format)]
    except KeyError:
        raise UnknownFormatError(
            f"no converter for architecture {architecture!r} and format {source_format!r}; "
            f"available: {available_converters()}"
        ) from None


def available_converters() -> list[tuple[str, str]]:
    return sorted(_REGISTRY)


def formats_for(architecture: str) -> list[str]:
    return sorted(f for a, f in _REGISTRY if a == architecture)


def detect_format(architecture: str, paths: Sequence[str]) -> str:
    """The registered format of ``architecture`` whose table matches the most paths.

    An empty tree, a tree no table matches, or a tie between formats is an error that
    shows sample paths and the known formats.
    """
    formats = formats_for(architecture)
    if not formats:
        raise UnknownFormatError(
            f"no converter is registered for architecture {architecture!r}; available: {available_converters()}"
        )
    if not paths:
        raise UnknownFormatError("the parameter tree is empty")
    scores = {f: _REGISTRY[(architecture, f)].matched(paths) for f in formats}
    best = max(scores.values())
    winners = [f for f, s in scores.items() if s == best]
    sample = ", ".join(list(paths)[:5])
    if best == 0:
        raise UnknownFormatError(
            f"cannot tell the format of the parameter tree: none of its {len(paths)} paths "
            f"(e.g. {sample}) matches a {architecture} table; known formats: {formats}"
        )
    if len(winners) > 1:
        raise UnknownFormatError(
            f"ambiguous parameter tree: formats {winners} each match {best} of its {len(paths)} "
            f"paths (e.g. {sample}); pass source_format= explicitly"
        )
    return winners[0]


for _arch, _table in (
    ("LlamaForCausalLM", tables.LLAMA_TUNIX + tables.TUNIX_LORA),
    ("Qwen2ForCausalLM", tables.QWEN2_TUNIX + tables.TUNIX_LORA),
    ("Qwen3ForCausalLM", tables.QWEN3_TUNIX + tables.TUNIX_LORA),
):
    register_converter(_arch, "tunix", _table)
    register_converter(_arch, "sglang", tables.engine_layout(_table))
for _arch, _hf, _flax in (
    ("LlamaForCausalLM", tables.HF_BASE + tables.HF_QKV_BIAS, tables.FLAX_BASE + tables.FLAX_QKV_BIAS),
    ("Qwen2ForCausalLM", tables.HF_BASE + tables.HF_QKV_BIAS, tables.FLAX_BASE + tables.FLAX_QKV_BIAS),
    ("Qwen3ForCausalLM", tables.HF_BASE + tables.HF_QKV_BIAS + tables.HF_QK_NORM,
     tables.FLAX_BASE + tables.FLAX_QKV_BIAS + tables.FLAX_QK_NORM),
):
    register_converter(_arch, "hf", _hf)
    register_converter(_arch, "flax", _flax)
