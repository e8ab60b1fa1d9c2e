"""Turn a benchmark results JSON (written by ``benchmarks/common.py``) into Markdown.

Standard library only: the MkDocs hook (``hook.py``) and the benchmark scripts both use it, so
the tables in the docs and the tables a script prints are drawn by the same code.

A results file (schema 1)::

    {
      "schema": 1,
      "benchmark": "update_params",
      "command": "python benchmarks/update_params.py --runs 7",
      "argv": ["benchmarks/update_params.py", "--runs", "7"],
      "date": "2025-01-01T12:00:00+00:00",
      "machine": {"platform": "...", "cpu_count": 2, "cpu_model": "...", "ram_bytes": 25276182528,
                  "jax_backend": "cpu", "jax_device_count": 1, "env": {...}, "versions": {"jax": "0.10.2", ...}},
      "git": {"commit": "...", "dirty": true},
      "args": {"runs": 7, "layers": 28, "seed": 0, ...},
      "seed": 0,
      "context": {...},
      "tables": [
        {"key": "updates", "caption": "text above the table", "headers": ["update", "median ms"],
         "align": [null, "right"], "rows": [["ours", {"value": 19.31, "text": "19.3", "unit": "ms"}]],
         "notes": ["a line under the table"]}
      ]
    }

A cell is a string (shown as is), an integer, null (empty), or ``{"value": ..., "text": ...}``: the
measured value (a number, a list of numbers, or null) and the text it is shown as.

    python docs/benchmarks/render.py docs/benchmarks/results/update_params.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SCHEMA = 1
RESULTS_DIR = Path(__file__).resolve().parent / "results"
_SEPARATORS = {None: "---", "left": ":---", "right": "---:", "center": ":---:"}
_REQUIRED = {"benchmark": str, "command": str, "date": str, "machine": dict, "tables": list}


class ResultsError(ValueError):
    """A results file is missing or malformed (the message names the file)."""


# --- cells and tables ------------------------------------------------------------------------


def cell_text(cell: Any) -> str:
    """The text a cell is shown as."""
    if cell is None:
        return ""
    if isinstance(cell, dict):
        return str(cell["text"])
    if isinstance(cell, bool):
        return str(cell)
    if isinstance(cell, (int, float, str)):
        return str(cell)
    raise TypeError(f"not a table cell: {cell!r}")


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_lines(table: dict) -> list[str]:
    """The Markdown table (header, separator, rows) of one table, without caption or notes."""
    headers = table["headers"]
    align = table.get("align") or [None] * len(headers)
    out = [_row(headers), "|" + "|".join(_SEPARATORS[a] for a in align) + "|"]
    out += [_row(cell_text(c) for c in row) for row in table["rows"]]
    return out


def header_lines(table: dict) -> list[str]:
    """Header and separator only (a script printing its rows as they come)."""
    return table_lines({**table, "rows": []})


def row_line(row: list) -> str:
    return _row(cell_text(c) for c in row)


def _row(texts) -> str:
    return "|" + "|".join(f" {_escape(t)} " if t else " " for t in texts) + "|"


# --- provenance ------------------------------------------------------------------------------


def machine_text(machine: dict) -> str:
    """'2 cores, AMD EPYC, 23.5 GiB RAM, JAX 0.10.2 on cpu (4 devices)'."""
    parts = []
    if machine.get("cpu_count"):
        parts.append(f"{machine['cpu_count']} cores")
    if machine.get("cpu_model"):
        parts.append(str(machine["cpu_model"]))
    if machine.get("ram_bytes"):
        parts.append(f"{machine['ram_bytes'] / 2**30:.1f} GiB RAM")
    jax_version = (machine.get("versions") or {}).get("jax")
    # a script whose engines run in child processes starts no backend itself: say what they were told
    backend = machine.get("jax_backend") or (machine.get("env") or {}).get("JAX_PLATFORMS")
    if jax_version or backend:
        devices = machine.get("jax_device_count")
        where = f" on {backend}" + (f" ({devices} devices)" if devices and devices > 1 else "") if backend else ""
        parts.append(f"JAX {jax_version or '?'}{where}")
    return ", ".join(parts) or "an unrecorded machine"


def date_text(date: str) -> str:
    """'2025-01-01 12:00 UTC' from an ISO date (as given if it does not parse)."""
    from datetime import datetime, timezone

    try:
        when = datetime.fromisoformat(date)
    except ValueError:
        return date
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M UTC")


def provenance(results: dict) -> str:
    """The line under each table: which command, at which commit, on which machine, when."""
    git = results.get("git") or {}
    commit = f" at commit {git['commit'][:10]}" if git.get("commit") else ""
    if commit and git.get("dirty"):
        commit += " (with uncommitted changes)"
    return (
        f"Produced by `{results['command']}`{commit} on {machine_text(results['machine'])}, "
        f"{date_text(results['date'])}."
    )


# --- whole files -----------------------------------------------------------------------------


def validate(results: Any, source: str = "results") -> dict:
    """Check the structure; raise ResultsError naming ``source`` at the first problem."""

    def fail(why: str):
        raise ResultsError(f"{source}: {why}")

    if not isinstance(results, dict):
        fail("not a JSON object")
    if results.get("schema") != SCHEMA:
        fail(f"schema {results.get('schema')!r}, expected {SCHEMA}")
    for key, kind in _REQUIRED.items():
        if not isinstance(results.get(key), kind):
            fail(f"{key!r} missing or not a {kind.__name__}")
    if not results["tables"]:
        fail("no tables")
    for i, table in enumerate(results["tables"]):
        where = f"table {i} ({table.get('key')!r})" if isinstance(table, dict) else f"table {i}"
        if not isinstance(table, dict):
            fail(f"{where} is not an object")
        headers = table.get("headers")
        if not isinstance(headers, list) or not headers or not all(isinstance(h, str) for h in headers):
            fail(f"{where}: 'headers' must be a non-empty list of strings")
        align = table.get("align")
        if align is not None and (len(align) != len(headers) or any(a not in _SEPARATORS for a in align)):
            fail(f"{where}: 'align' must hold one of {sorted(_SEPARATORS, key=str)} per column")
        if not isinstance(table.get("rows"), list):
            fail(f"{where}: 'rows' missing")
        for r, row in enumerate(table["rows"]):
            if not isinstance(row, list) or len(row) != len(headers):
                fail(f"{where}, row {r}: expected {len(headers)} cells")
            for cell in row:
                if isinstance(cell, dict) and "text" not in cell:
                    fail(f"{where}, row {r}: cell {cell!r} has no 'text'")
                if not isinstance(cell, (dict, str, int, float, type(None))):
                    fail(f"{where}, row {r}: cell {cell!r} is not a string, number, null or object")
        for key in ("caption",):
            if table.get(key) is not None and not isinstance(table[key], str):
                fail(f"{where}: {key!r} must be a string")
        notes = table.get("notes", [])
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            fail(f"{where}: 'notes' must be a list of strings")
    return results


def load(path: str | Path) -> dict:
    """Read and validate one results file; ResultsError (naming the file) if missing or malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ResultsError(f"{path}: cannot read benchmark results ({e.strerror or e})") from e
    try:
        results = json.loads(text)
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not valid JSON ({e})") from e
    return validate(results, str(path))


def render_table(table: dict, results: dict | None = None) -> str:
    """One table as Markdown: caption, table, notes (as a list), and the provenance line."""
    blocks = []
    if table.get("caption"):
        blocks.append(table["caption"].strip())
    blocks.append("\n".join(table_lines(table)))
    notes = [n for n in table.get("notes", []) if n.strip()]
    if notes:
        blocks.append("\n".join(f"- {n}" for n in notes))
    if results is not None:
        blocks.append(provenance(results))
    return "\n\n".join(blocks)


def render(results: dict) -> str:
    """Every table of one results file, each with its caption, notes and provenance line."""
    return "\n\n".join(render_table(t, results) for t in results["tables"])


def render_file(path: str | Path) -> str:
    return render(load(path))


def render_name(name: str, results_dir: str | Path = RESULTS_DIR) -> str:
    """The tables of ``<results_dir>/<name>.json``."""
    return render_file(Path(results_dir) / f"{name}.json")


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    for path in paths:
        print(render_file(path) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
