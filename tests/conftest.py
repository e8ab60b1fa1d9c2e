"""Shared fixtures: tiny HF checkpoints built locally and real engines on JAX's CPU backend.

Engines are expensive to start and compile, so tests share them through session-scoped
fixtures, and share compiled programs through JAX's persistent cache. Four CPU devices are
simulated for the sharding tests.
"""

import contextlib
import os

#: XLA flags of every program the suite compiles, here and in its child processes. The models
#: are tiny: compiling, not running, is the cost, and LLVM's optimizations make it longer.
#: What the tests check (weights bit for bit, ids, orderings, outputs against a float64
#: reference within tolerances) does not depend on them.
#: XLA_FLAGS=--xla_backend_optimization_level=2 restores XLA's default for a run.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

# Engines of one model compile the same programs. JAX's persistent compilation cache lets
# every engine after the first (here, in the other xdist worker, in probe and multi-process
# children, and after a restart) load them instead of compiling again.
# helpers.counting_compiles counts a cache load as a compilation, so the tests that check
# "no recompile" still see one. runs/ is not committed; a fresh clone starts cold.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, "runs", "jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))


def _drop_orphan_cache_entries(cache_dir: str) -> None:
    """JAX's size-limited cache writes an entry's ``-cache`` file, then its ``-atime`` file; a
    process killed in between leaves an entry without one, and every later write then fails
    (its eviction pass reads every entry's atime: FileNotFoundError). Drop such halves."""
    if not os.path.isdir(cache_dir):
        return
    names = set(os.listdir(cache_dir))
    for name in names:
        key, _, kind = name.rpartition("-")
        other = {"cache": "atime", "atime": "cache"}.get(kind)
        if other is not None and f"{key}-{other}" not in names:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(cache_dir, name))


_drop_orphan_cache_entries(os.environ["JAX_COMPILATION_CACHE_DIR"])

import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# sglang-jax logs an engine-thread exception and then SIGQUITs the process, which loses
# pytest's captured output; keep those log lines in a file that survives (.ci/run prints it),
# one per pytest-xdist worker (``test-engine-errors-gw0.log``, ...).
ENGINE_ERROR_LOGS = Path(__file__).resolve().parents[1] / "runs"


def pytest_configure(config):
    worker = getattr(config, "workerinput", {}).get("workerid")
    ENGINE_ERROR_LOGS.mkdir(exist_ok=True)
    path = ENGINE_ERROR_LOGS / f"test-engine-errors{'-' + worker if worker else ''}.log"
    handler = logging.FileHandler(path, mode="w")
    handler.setLevel(logging.ERROR)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(threadName)s: %(message)s"))
    logging.getLogger("sgl_jax").addHandler(handler)


from tests import helpers  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """``model_dir(case, seed=0)`` -> a directory with config, tokenizer and random HF weights."""
    cache = {}

    def make(case: str, seed: int = 0):
        key = (case, seed)
        if key not in cache:
            cache[key] = helpers.write_case(tmp_path_factory.mktemp(f"{case}-s{seed}"), case, seed=seed)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def varied_dir(tmp_path_factory):
    """``varied_dir(seed=0)`` -> a tiny Qwen3 whose greedy text varies from token to token
    (``helpers.write_varied_case``): which weights produced which tokens is visible."""
    cache = {}

    def make(seed: int = 0):
        if seed not in cache:
            cache[seed] = helpers.write_varied_case(tmp_path_factory.mktemp(f"varied-s{seed}"), seed=seed)
        return cache[seed]

    return make


@pytest.fixture(scope="session")
def special_dir(tmp_path_factory):
    """A tiny Llama whose answers hold special ids mid-sequence (``helpers.write_special_prone_case``)."""
    return helpers.write_special_prone_case(tmp_path_factory.mktemp("special"))


@pytest.fixture(scope="session")
def engines():
    """Session-wide pool of samplers keyed by (case, seed, load_format); shut down at the end."""
    pool = helpers.SamplerPool()
    yield pool
    pool.close()
