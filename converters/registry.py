"""Converters keyed by (HF architecture, source format), with format detection.

A Converter is one architecture's table for one source format and the one lookup over
it: a source path abstracts to a pattern (every number written ``{}``) and its numbers;
the rules with that pattern say which engine leaf it feeds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from converters.errors import UnknownFormatError
from converters.rules import LeafRule, Table

_NUMBER = re.compile(r"\.(\d+)(?=\.|$)")
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
    return _NUMBER.sub(".{}", path), tuple(_NUMBER.findall(path))


class Match(NamedTuple):
    """One engine leaf a source path feeds."""

    rule: LeafRule
    target: str
    #: The source's index in a stack (N -> 1 rules), else None.
    stack_index: int | None


class Converter:
    """One architecture's table for one source format, and key lookup over it."""

    def __init__(self, architecture: str, source_format: str, rules: Iterable[LeafRule]):
        self.architecture = architecture
        self.source_format = source_format
        self.rules: Table = tuple(rules)
        self._by_source: dict[str, list[LeafRule]] = {}
        for rule in self.rules:
            self._by_source.setdefault(rule.lookup_pattern, []).append(rule)
        # Several rules may feed one engine pattern from different sources (alternative
        # layouts, e.g. Gemma's q_einsum or fused qkv_einsum) or for different layers.
        self._by_target: dict[str, list[LeafRule]] = {}
        for rule in self.rules:
            same = [r for r in self._by_target.get(rule.target, ()) if r.lookup_pattern == rule.lookup_pattern]
            if any(r.layers is None or r.layers == rule.layers or rule.layers is None for r in same):
                raise ValueError(f"{architecture}/{source_format}: two rules feed {rule.target} from {rule.source}")
            self._by_target.setdefault(rule.target, []).append(rule)

    def __repr__(self) -> str:
        return f"Converter({self.architecture!r}, {self.source_format!r}, {len(self.rules)} rules)"

    def lookup(self, path: str) -> list[Match]:
        """Every engine leaf the source ``path`` feeds (empty when no rule knows it)."""
        pattern, numbers = abstract_key(path)
        out = []
        for rule in self._by_source.get(pattern, ()):
            position = rule.stack_position
            if position is None:
                out.append(Match(rule, rule.target.format(*numbers), None))
            else:
                layer_numbers = numbers[:position] + numbers[position + 1 :]
                out.append(Match(rule, rule.target.format(*layer_numbers), int(numbers[position])))
        return out

    def rule_for(self, engine_path: str) -> LeafRule | None:
        """The (first) rule that produces ``engine_path`` (a weight leaf), or None."""
        rules = self._by_target.get(abstract_key(engine_path)[0])
        return rules[0] if rules else None

    def feeds(self, engine_path: str) -> bool:
        return self.rule_for(engine_path) is not None

    def source_for(self, engine_path: str) -> str | None:
        """The source path (pattern, for stacks) expected to feed ``engine_path``."""
        numbers = abstract_key(engine_path)[1]
        sources = dict.fromkeys(r.source_path(numbers) for r in self._by_target.get(abstract_key(engine_path)[0], ()))
        return " or ".join(sources) or None

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


def unregister_converter(architecture: str, source_format: str) -> None:
    _REGISTRY.pop((architecture, source_format), None)


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
