"""MkDocs hook: replace ``<!-- benchmark: NAME -->`` lines with the tables of ``results/NAME.json``.

In ``mkdocs.yml``::

    hooks:
      - docs/benchmarks/hook.py

A marker is a line of its own (surrounding blanks allowed), outside fenced code blocks. A
missing or malformed results file fails the build with an error naming the file. Standard
library only.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
MARKER = re.compile(r"^\s*<!--\s*benchmark:\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*-->\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _load_render():
    """render.py next to this file (MkDocs loads a hook by path, not from a package)."""
    name = "sglang_jax_sampler_benchmark_render"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


render = _load_render()
ResultsError = render.ResultsError


def expand(markdown: str, results_dir: str | Path = RESULTS_DIR, page: str = "page") -> str:
    """``markdown`` with every benchmark marker replaced by its rendered tables."""
    out, fence = [], None
    for line in markdown.splitlines(keepends=True):
        opened = _FENCE.match(line)
        if opened and fence is None:
            fence = opened.group(1)
        elif opened and line.strip().startswith(fence):
            fence = None
        match = MARKER.match(line) if fence is None else None
        if match is None:
            out.append(line)
            continue
        path = Path(results_dir) / f"{match.group('name')}.json"
        try:
            rendered = render.render_file(path)
        except ResultsError as e:
            raise ResultsError(f"{page}: benchmark marker {match.group('name')!r}: {e}") from e
        out.append(rendered + ("\n" if line.endswith("\n") else ""))
    return "".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """MkDocs ``on_page_markdown`` event. A missing or malformed results file aborts the build
    (as MkDocs' PluginError, which it reports in one line, when MkDocs is the caller)."""
    where = getattr(getattr(page, "file", None), "src_path", None) or "page"
    try:
        return expand(markdown, RESULTS_DIR, where)
    except ResultsError as e:
        try:
            from mkdocs.exceptions import PluginError
        except ImportError:  # not under MkDocs
            raise e from None
        raise PluginError(str(e)) from e
