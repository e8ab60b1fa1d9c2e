"""Turn what a trainer hands over into flat leaves, a tree structure and key paths."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx


def as_param_tree(tree: Any, filter_types: Sequence[type] | type | None = None) -> Any:
    """An nnx.Module becomes its state (``filter_types`` or nnx.Param); an nnx.State is
    filtered when ``filter_types`` is given; objects with ``.params`` (a Flax
    TrainState) give their params; mappings pass through."""
    if isinstance(filter_types, type):
        filter_types = (filter_types,)
    if isinstance(tree, nnx.Module):
        return nnx.state(tree, nnx.Any(*filter_types) if filter_types else nnx.Param)
    if isinstance(tree, nnx.State):
        return tree.filter(nnx.Any(*filter_types)) if filter_types else tree
    if isinstance(tree, Mapping):
        return tree
    if hasattr(tree, "params"):
        return tree.params
    raise TypeError(
        f"cannot read parameters from a {type(tree).__name__}: pass an nnx.State, an nnx.Module, "
        "a mapping of arrays, or an object with .params"
    )


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def key_paths(tree: Any) -> list[str]:
    """Dotted path of every leaf, in ``jax.tree_util.tree_flatten`` order.

    The ``.value`` step of nnx Variables is dropped, so an nnx.State of a Tunix model
    gives ``layers.0.attn.q_proj.w`` and a flat dict gives its own keys.
    """
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [_key_name(k) for k in path]
        if len(names) > 1 and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
            names = names[:-1]
        out.append(".".join(names))
    return out


def leaf_signature(leaf: Any) -> tuple:
    """What a cached plan depends on: shape, dtype and placement of one leaf."""
    if isinstance(leaf, jax.Array):
        return (leaf.shape, leaf.dtype, leaf.sharding)
    arr = np.asarray(leaf) if not hasattr(leaf, "shape") else leaf
    return (tuple(arr.shape), np.dtype(arr.dtype), None)
