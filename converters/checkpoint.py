"""HF safetensors checkpoints read lazily: names, shapes and dtypes from the headers,
each tensor loaded only when asked for (so a caller can stream tensor by tensor)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from converters.errors import ConversionError


class CheckpointError(ConversionError):
    """The directory is not a readable HF safetensors checkpoint."""


def _np_dtype(name: str):
    import ml_dtypes

    table = {
        "BF16": ml_dtypes.bfloat16,
        "F16": np.float16,
        "F32": np.float32,
        "F64": np.float64,
        "I8": np.int8,
        "I16": np.int16,
        "I32": np.int32,
        "I64": np.int64,
        "U8": np.uint8,
        "BOOL": np.bool_,
        "F8_E4M3": ml_dtypes.float8_e4m3fn,
        "F8_E5M2": ml_dtypes.float8_e5m2,
    }
    if name not in table:
        raise CheckpointError(f"unsupported safetensors dtype {name}")
    return np.dtype(table[name])


class SafetensorsCheckpoint:
    """Tensors of ``model.safetensors`` or a sharded set with ``model.safetensors.index.json``."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise CheckpointError(f"{index.name} names shard files that are missing: {missing}")
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors file in {str(path)!r}")
        self.path = path
        self._handles: dict[str, Any] = {}
        self.names: list[str] = []
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, np.dtype] = {}
        for f in files:
            try:
                handle = safe_open(str(path / f), framework="numpy")
            except Exception as e:  # truncated or not safetensors
                raise CheckpointError(f"cannot read {f}: {e}") from e
            self._handles[f] = handle
            for name in handle.keys():
                sl = handle.get_slice(name)
                self.names.append(name)
                self.file_of[name] = f
                self.shapes[name] = tuple(sl.get_shape())
                self.dtypes[name] = _np_dtype(sl.get_dtype())
        self.names.sort()

    def signatures(self) -> list[tuple]:
        return [(self.shapes[n], self.dtypes[n], None) for n in self.names]

    def load(self, name: str) -> np.ndarray:
        return self._handles[self.file_of[name]].get_tensor(name)

    def leaves(self) -> "LazyLeaves":
        return LazyLeaves(self)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(s, dtype=np.int64)) * self.dtypes[n].itemsize for n, s in self.shapes.items())


class LazyLeaves(Sequence):
    """``leaves[i]`` reads tensor ``names[i]`` from disk at that moment."""

    #: Reading a leaf costs I/O and host memory: consumers read them one at a time.
    lazy = True

    def __init__(self, ckpt: SafetensorsCheckpoint):
        self._ckpt = ckpt

    def shape_of(self, i: int) -> tuple[int, ...]:
        """Tensor ``i``'s shape, from the header (nothing is read)."""
        return self._ckpt.shapes[self._ckpt.names[i]]

    def __len__(self) -> int:
        return len(self._ckpt.names)

    def __getitem__(self, i):
        return self._ckpt.load(self._ckpt.names[i])
