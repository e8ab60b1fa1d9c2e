"""Shared by the benchmarks: Tunix's sampler as the peer on the same engine, the machine's
memory-bandwidth limit, and independent memory measures.

Memory columns say what they measure:
- "live arrays": bytes of live jax arrays (each device buffer once), the library's own
  accounting (``jax.live_arrays``), at the update's peak;
- "RSS high-water": the process's resident-set high-water mark during the call minus its
  resident set before (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``),
  measured by the kernel, independent of JAX. On the CPU backend device buffers are host
  memory, so this sees them; on an accelerator use ``device.memory_stats()`` instead.

Results: every benchmark collects its tables in a ``Results`` and ends with ``emit()``, which
prints them as Markdown (as the scripts always did) and writes one JSON file,
``docs/benchmarks/results/<name>.json`` (``--json PATH`` elsewhere, ``--no-json`` not at all),
with the command, the date, the machine, the arguments, the seed and the tables; the docs
render their tables from those files (``docs/benchmarks/render.py``, schema there)::

    ap = argparse.ArgumentParser()
    add_output_args(ap)                      # --json PATH, --no-json
    args = ap.parse_args()
    res = Results("update_params", args)     # seed taken from args.seed
    t = res.table(["update", "median ms"], caption="...", align=[None, "right"], key="updates")
    t.add("ours", num(19.31, "{:.1f}", "ms"))
    t.note("a line under the table")
    res.emit()
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

MiB = 1 << 20

#: Qwen3-0.6B's shape (28 layers, hidden 1024, 16/8 heads, head_dim 128, vocab 151936, tied), as
#: ``sampler.tiny.write_tiny_model`` keyword arguments (the benchmarks' real-size model).
QWEN3_0_6B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_layers=28,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
)


def write_qwen3_0_6b(path: Path, layers: int = 28) -> Path:
    """A Qwen3-0.6B-shaped model directory (config and tokenizer; no weights) at ``path``."""
    from sampler.tiny import write_tiny_model

    return write_tiny_model(path, "Qwen3ForCausalLM", weights=False, **{**QWEN3_0_6B, "num_layers": layers})


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_high_water(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn``; return (its result, bytes the resident set rose above where it started)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    out = fn()
    return out, max(0, _status_kib("VmHWM") - before) * 1024


def memcpy_seconds(nbytes: int, runs: int = 5) -> float:
    """Median time of one host memcpy of ``nbytes`` (the bandwidth limit of any copy of them)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tunix_peer(sampler, model):
    """Tunix 0.1.7's own SglangJaxSampler, driving the same engine (no second engine)."""
    from tunix.generate import mappings
    from tunix.generate import sglang_jax_sampler as tsj

    peer = object.__new__(tsj.SglangJaxSampler)
    peer.engine = sampler.engine
    mc = mappings.MappingConfig.build(model=model, backend="sglang_jax")
    peer.args = {"enable_static_lora": False, "lora_target_modules": None}
    peer.to_hf_key_mappings = mc.to_hf_mappings
    peer.to_hf_transpose_keys = mc.to_hf_transpose_keys
    peer.to_hf_hook_fns = mc.to_hf_hook_fns
    return peer


def tunix_update(peer, state) -> float:
    t0 = time.perf_counter()
    peer.update_params(state)
    jax.block_until_ready(peer._model_runner.model_state_leaves)
    return time.perf_counter() - t0


def tunix_live_peak(peer, state) -> int:
    """Live-array bytes at Tunix's peak: its converted state built, old weights still alive."""
    from tunix.generate import sglang_jax_sampler as tsj

    from sampler.sync.leaves import live_device_bytes

    original = tsj.utils.transfer_state_with_mappings
    seen = []

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        jax.block_until_ready(out)
        seen.append(live_device_bytes())
        return out

    tsj.utils.transfer_state_with_mappings = wrapped
    try:
        peer.update_params(state)
    finally:
        tsj.utils.transfer_state_with_mappings = original
    return max(seen)


def copied_bytes(engine_leaves, source_tree) -> int:
    """Bytes of engine leaves that share no buffer with the source (measured, not declared)."""
    from sampler.sync.leaves import buffer_pointers

    src = {p for x in jax.tree_util.tree_leaves(source_tree) for p in buffer_pointers(x)}
    return sum(a.nbytes for a in engine_leaves if not set(buffer_pointers(a)) & src)


# --- results: Markdown on stdout, one JSON file per run ---------------------------------------

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "docs" / "benchmarks" / "results"
#: Distributions whose versions every results file records.
VERSIONS = ("sglang-jax", "google-tunix", "flax", "jax", "jaxlib", "numpy")
SCHEMA = 1


def _load_render():
    """docs/benchmarks/render.py (stdlib only): the one place that draws a table."""
    name = "sglang_jax_sampler_benchmark_render"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / "benchmarks" / "render.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


render = _load_render()


def add_output_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--json PATH`` (default docs/benchmarks/results/<name>.json) and ``--no-json``."""
    group = ap.add_argument_group("results file")
    group.add_argument(
        "--json", metavar="PATH", help=f"write the results here (default: {RESULTS_DIR.relative_to(ROOT)}/<name>.json)"
    )
    group.add_argument("--no-json", action="store_true", help="print the tables only, write no results file")
    return ap


def num(value: Any, fmt: str = "{}", unit: str | None = None) -> dict:
    """A measured cell: ``value`` (a number, a list of numbers, or None) shown as ``fmt.format(value)``
    (``fmt.format(*value)`` for a list). The JSON keeps both, and ``unit`` if given."""
    if isinstance(value, (list, tuple)):
        value = [_plain(v) for v in value]
        text = fmt.format(*value)
    else:
        value = _plain(value)
        text = fmt.format(value)
    cell = {"value": value, "text": text}
    if unit:
        cell["unit"] = unit
    return cell


def _plain(value: Any) -> Any:
    """numpy scalars as Python numbers (JSON)."""
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        return value.item()
    return value


class Table:
    """One table: caption (text above it), headers, column alignment, rows of cells, notes (lines
    under it). Cells: str, int, None, or ``num(...)``."""

    def __init__(self, headers, *, caption=None, align=None, key=None):
        self.key = key
        self.caption = caption
        self.headers = list(headers)
        self.align = list(align) if align is not None else [None] * len(self.headers)
        if len(self.align) != len(self.headers):
            raise ValueError(f"{len(self.align)} alignments for {len(self.headers)} columns")
        self.rows: list[list] = []
        self.notes: list[str] = []
        self.head_printed = False  # caption, header and the rows so far are on stdout
        self.done = False  # all of it, notes included

    def add(self, *cells) -> Table:
        if len(cells) != len(self.headers):
            raise ValueError(f"{len(cells)} cells for {len(self.headers)} columns: {cells!r}")
        row = [_plain(c) if not isinstance(c, (str, dict)) else c for c in cells]
        self.rows.append(row)
        if self.head_printed:
            print(render.row_line(row), flush=True)
        return self

    def note(self, line: str) -> Table:
        self.notes.append(line)
        return self

    def to_json(self) -> dict:
        return {
            "key": self.key,
            "caption": self.caption,
            "headers": self.headers,
            "align": self.align,
            "rows": self.rows,
            "notes": self.notes,
        }

    def print_head(self) -> None:
        """Caption (between blank lines), header and the rows so far; later rows print as added."""
        print(f"\n{self.caption}\n" if self.caption else "")
        for line in render.header_lines(self.to_json()):
            print(line)
        for row in self.rows:
            print(render.row_line(row))
        sys.stdout.flush()
        self.head_printed = True

    def print_rest(self) -> None:
        """Whatever of the table is not printed yet, then its notes after a blank line."""
        if self.done:
            return
        if not self.head_printed:
            self.print_head()
        if self.notes:
            print()
            for line in self.notes:
                print(line)
        sys.stdout.flush()
        self.done = True


class Results:
    """The tables of one benchmark run, printed as Markdown and written as one JSON file.

    ``name`` is the file's name without ``.json`` (a script with variants names each one, e.g.
    "inflight-tiny"); ``args`` the parsed arguments (with ``--json``/``--no-json`` from
    ``add_output_args``); ``seed`` defaults to ``args.seed``; ``context`` holds values that are
    no table cell (sizes, limits measured in the same run, ...)."""

    def __init__(self, name: str, args: argparse.Namespace | None = None, *, seed: Any = None, context=None):
        self.name = name
        self.args = args
        self.seed = seed if seed is not None else getattr(args, "seed", None)
        self.context: dict = dict(context or {})
        self.tables: list[Table] = []
        self.machine_extra: dict = {}

    def table(self, headers: Sequence[str], *, caption=None, align=None, key=None, stream=False) -> Table:
        """A new table. ``stream=True`` prints its caption and header now and each row as it is added."""
        t = Table(headers, caption=caption, align=align, key=key or f"table{len(self.tables)}")
        self.tables.append(t)
        if stream:
            t.print_head()
        return t

    def show(self, table: Table) -> None:
        """Print a finished table now (emit prints the others at the end)."""
        table.print_rest()

    @property
    def path(self) -> Path | None:
        if getattr(self.args, "no_json", False):
            return None
        explicit = getattr(self.args, "json", None)
        return Path(explicit) if explicit else RESULTS_DIR / f"{self.name}.json"

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "benchmark": self.name,
            "command": command_line(),
            "argv": list(sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {**machine_info(), **self.machine_extra},
            "git": git_info(),
            "args": _jsonable(vars(self.args)) if self.args is not None else {},
            "seed": _jsonable(self.seed),
            "context": _jsonable(self.context),
            "tables": [_jsonable(t.to_json()) for t in self.tables],
        }

    def emit(self) -> Path | None:
        """Print the tables not printed yet; write the JSON (unless --no-json). Returns its path."""
        for t in self.tables:
            t.print_rest()
        path = self.path
        if path is None:
            return None
        data = render.validate(self.to_json(), str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(_dumps(data) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        print(f"\nresults: {_shown_path(path)}", file=sys.stderr)
        return path


def _dumps(data: dict) -> str:
    """Indented JSON with each table row on one line (diffs of two runs stay readable)."""
    rows = {}
    tables = []
    for i, table in enumerate(data["tables"]):
        marks = []
        for j, row in enumerate(table["rows"]):
            mark = f"@@row-{i}-{j}@@"
            rows[json.dumps(mark)] = json.dumps(row, allow_nan=False)
            marks.append(mark)
        tables.append({**table, "rows": marks})
    text = json.dumps({**data, "tables": tables}, indent=1, allow_nan=False)
    for mark, row in rows.items():
        text = text.replace(mark, row, 1)
    return text


def _shown_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _jsonable(x: Any) -> Any:
    """Plain JSON values; NaN and infinities as None (JSON has none), paths and others as str."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if x == x and x not in (float("inf"), float("-inf")) else None
    if hasattr(x, "item"):
        return _jsonable(x.item())
    return str(x)


def command_line() -> str:
    """``python benchmarks/x.py ARGS`` (the script relative to the repo when it is inside it)."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "cpu model", "Model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def _ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """Platform, cores, CPU model, RAM, JAX backend (only if this process already started one:
    asking would start it) and the versions of the libraries measured."""
    backend, devices = None, None
    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            backend, devices = jax.default_backend(), jax.device_count()
    except Exception:  # a private module: the record goes on without it
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "ram_bytes": _ram_bytes(),
        "jax_backend": backend,
        "jax_device_count": devices,
        "env": {k: os.environ[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS") if k in os.environ},
        "versions": {d: _version(d) for d in VERSIONS},
    }


def git_info() -> dict:
    def git(*cmd: str) -> str | None:
        try:
            out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}
