"""Conversion rules as data: a source key pattern, the engine key pattern it feeds, and
the layout ops between them.

``{}`` in a pattern stands for the layer number. ``{*}`` in a source pattern marks a
stacked index (an expert number): the rule then takes the source leaves with indexes
``0 .. n-1`` and stacks them on a new leading axis before its ops run (N -> 1). Several
rules may share a source pattern, each selecting its part of a fused leaf (1 -> N), or
each applying to its own set of layers (``layers=``); several rules may feed one engine
pattern from alternative source layouts.
Dtype casts and resharding are not in a table: the plan adds them by comparing each
source leaf with the engine leaf it feeds. A rule names a ``dtype`` only where the engine
keeps a leaf in a fixed dtype whatever the model's (float32 norms and MoE routers), so
that a conversion without an engine (``to_engine_layout``, fingerprints) gets it right.
"""

from __future__ import annotations

import dataclasses

from converters.ops import Op

#: Placeholder for a stacked index in a source pattern (see module docstring).
STACKED = "{*}"


@dataclasses.dataclass(frozen=True)
class LeafRule:
    source: str
    target: str
    ops: tuple[Op, ...] = ()
    #: For N -> 1 rules: the ModelSpec attribute that says how many source leaves are
    #: stacked (e.g. "num_experts"); the source pattern holds one ``{*}``.
    stack: str | None = None
    #: A complete push may leave this engine leaf out (LoRA buffers of modules the trainer
    #: has no adapter for keep their values: zeros, so no effect).
    optional: bool = False
    #: The engine leaf's dtype when it does not follow the model dtype (e.g. "float32").
    dtype: str | None = None
    #: Only for the layers a ModelSpec fact of this name lists (e.g. Gemma 4's
    #: "k_eq_v_layers", whose k_proj the engine treats differently); None: every layer.
    layers: str | None = None

    def applies_to(self, layer: int | None, spec) -> bool:
        """Whether this rule is the one for ``layer`` of the model ``spec`` describes."""
        return self.layers is None or layer is None or layer in tuple(spec.get(self.layers) or ())

    def __post_init__(self):
        if (self.stack is None) != (STACKED not in self.source):
            raise ValueError(f"rule {self.source} -> {self.target}: a {STACKED} index needs stack= and vice versa")
        if self.source.count(STACKED) > 1:
            raise ValueError(f"rule {self.source}: at most one {STACKED} index")

    @property
    def lookup_pattern(self) -> str:
        """The source pattern with every number written ``{}`` (what a path abstracts to)."""
        return self.source.replace(STACKED, "{}")

    @property
    def stack_position(self) -> int | None:
        """Which of the source path's numbers is the stacked index."""
        if self.stack is None:
            return None
        return self.source[: self.source.index(STACKED)].count("{")

    def source_path(self, numbers: tuple[str, ...], stacked: str | None = None) -> str:
        """The source path this rule reads for the engine leaf with layer ``numbers``."""
        if self.stack is None:
            return self.source.format(*numbers)
        return self.source.replace(STACKED, "{stacked}").format(*numbers, stacked=stacked or "{*}")


Table = tuple[LeafRule, ...]


def engine_layout(table: Table) -> Table:
    """The ``"sglang"`` format of an architecture: engine paths mapped to themselves."""
    seen: dict[str, LeafRule] = {}
    for rule in table:
        seen.setdefault(rule.target, LeafRule(rule.target, rule.target, optional=rule.optional, dtype=rule.dtype))
    return tuple(seen.values())
