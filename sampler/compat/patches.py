"""Patches to upstream sglang-jax behaviour (sglang-jax 0.1.0rc0), each idempotent, each
with a test in ``tests/test_compat.py`` that runs unpatched upstream and fails once the
patch is no longer needed, and a test that the patch works."""

from __future__ import annotations

import importlib
import logging
import threading

import jax
import jax.numpy as jnp
import zmq

from sampler.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

SGLANG_JAX_VERSION = "0.1.0rc0"


def upstream_version() -> str:
    from sgl_jax.version import __version__

    return __version__


def warn_if_untested_version() -> None:
    version = upstream_version()
    if version != SGLANG_JAX_VERSION:
        logger.warning(
            "sglang-jax %s is installed; the workarounds in sampler.compat were checked against %s",
            version,
            SGLANG_JAX_VERSION,
        )


# --------------------------------------------------------------------------------------
# merge_kv sharding (CPU native attention, Llama / Qwen2)
# --------------------------------------------------------------------------------------

_merge_kv_patched = False


def patch_merge_kv_sharding() -> bool:
    """Reshard v to k's sharding before ``memory_pool.merge_kv`` (idempotent).

    The two differ only in how the size-1 "data" axis is named, so the reshard moves
    no data; without it, jnp.stack raises ShardingTypeError inside the scheduler
    thread and upstream kills the process. Returns True when the patch was applied now.
    """
    global _merge_kv_patched
    if _merge_kv_patched:
        return False
    from sgl_jax.srt.mem_cache import memory_pool

    original = memory_pool.merge_kv

    def merge_kv(k, v):
        k_sharding = jax.typeof(k).sharding
        if getattr(k_sharding, "spec", None) is not None and jax.typeof(v).sharding.spec != k_sharding.spec:
            v = jax.sharding.reshard(v, k_sharding.spec)
        return original(k, v)

    merge_kv.__wrapped__ = original  # type: ignore[attr-defined]
    memory_pool.merge_kv = merge_kv
    _merge_kv_patched = True
    return True


# --------------------------------------------------------------------------------------
# zmq sockets that linger forever
# --------------------------------------------------------------------------------------

_ZMQ_MODULES = (
    "sgl_jax.srt.utils",
    "sgl_jax.srt.utils.common_utils",
    "sgl_jax.srt.managers.scheduler",
    "sgl_jax.srt.managers.tokenizer_manager",
    "sgl_jax.srt.managers.detokenizer_manager",
    "sgl_jax.srt.entrypoints.engine",
)


def patch_zmq_linger() -> bool:
    """Create the engine's zmq sockets with LINGER 0 (idempotent).

    Upstream sockets keep zmq's default infinite linger; once an engine is stopped,
    messages queued for a peer that is gone make ``zmq_ctx_term`` block at
    interpreter exit, so the process never ends. Returns True when applied now.
    """
    common = importlib.import_module("sgl_jax.srt.utils.common_utils")
    original = common.get_zmq_socket
    if getattr(original, "_linger_patched", False):
        return False

    def get_zmq_socket(context, socket_type, endpoint, bind):
        sock = original(context, socket_type, endpoint, bind)
        sock.setsockopt(zmq.LINGER, 0)
        with _contexts_lock:
            _contexts_by_endpoint.setdefault(endpoint, []).append(context)
        return sock

    get_zmq_socket._linger_patched = True  # type: ignore[attr-defined]
    get_zmq_socket.__wrapped__ = original  # type: ignore[attr-defined]
    for name in _ZMQ_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "get_zmq_socket", None) is original:
            module.get_zmq_socket = get_zmq_socket
    return True


# endpoint -> zmq contexts whose sockets use it (recorded by the patched get_zmq_socket)
_contexts_by_endpoint: dict[str, list] = {}
_contexts_lock = threading.Lock()
#: Contexts of stopped engines, kept referenced so that the garbage collector never
#: runs ``Context.__del__`` (which terminates the context and can block) on some
#: unrelated thread; closed ones cost nothing.
_retired_contexts: list = []


#: How long terminating a stopped engine's zmq contexts may take (s).
ZMQ_TEARDOWN_TIMEOUT_S = 5.0


def destroy_engine_contexts(endpoints: list[str], timeout: float = ZMQ_TEARDOWN_TIMEOUT_S) -> bool:
    """Close every socket of the engine's zmq contexts and terminate them, off the caller's
    thread with a timeout (a context term that blocks must not hang shutdown)."""
    with _contexts_lock:
        contexts = []
        for endpoint in endpoints:
            for ctx in _contexts_by_endpoint.pop(endpoint, []):
                if all(ctx is not c for c in contexts):
                    contexts.append(ctx)
    _retired_contexts.extend(contexts)

    def destroy():
        for ctx in contexts:
            ctx.destroy(linger=0)

    t = threading.Thread(target=destroy, name="sampler-zmq-teardown", daemon=True)
    try:
        t.start()
    except RuntimeError:  # at interpreter exit: pyzmq leaves contexts alone then
        return True
    t.join(timeout)
    return not t.is_alive()


# --------------------------------------------------------------------------------------
# head_dim on CPU
# --------------------------------------------------------------------------------------


def check_head_dim(head_dim: int, *, backend: str, attention_backend: str) -> None:
    """Refuse, before the engine starts, a head_dim the CPU native backend cannot serve."""
    if backend == "cpu" and attention_backend == "native" and head_dim % 128 != 0:
        raise UnsupportedModelError(
            f"head_dim={head_dim}: sglang-jax {SGLANG_JAX_VERSION} native attention on CPU pads "
            "the KV head width to a multiple of 128 and then fails in o_proj; use a model whose "
            "head_dim is a multiple of 128 on CPU (TPU has no such limit)"
        )


# --------------------------------------------------------------------------------------
# invalid grammars
# --------------------------------------------------------------------------------------


def patch_invalid_grammar_copy() -> bool:
    """Let an invalid grammar end its request with a clear error (idempotent).

    sglang-jax 0.1.0rc0 compiles a request's regex / JSON schema / EBNF / structural tag in
    the scheduler thread; an invalid one compiles to the shared ``INVALID_GRAMMAR_OBJ``, and
    ``Scheduler.move_ready_grammar_requests`` calls ``.copy()`` on it (to cache it) before it
    checks for it: a bare ``BaseGrammarObject.copy`` raises NotImplementedError, the scheduler
    thread dies and upstream kills the process. A ``copy`` that returns the object itself
    lets the check that follows abort the request ("Invalid grammar request: key=...", a
    ValueError to the caller, HTTP 400). Returns True when applied now.
    """
    base = importlib.import_module("sgl_jax.srt.constrained.base_grammar_backend")
    invalid = base.INVALID_GRAMMAR_OBJ
    if "copy" in vars(invalid):
        return False
    invalid.copy = lambda: invalid
    return True


# --------------------------------------------------------------------------------------
# greedy requests batched with sampled ones
# --------------------------------------------------------------------------------------


def patch_greedy_rows_in_mixed_batches() -> bool:
    """Give greedy requests (``top_k == 1``, which upstream makes of ``temperature == 0``)
    the argmax of their logits in every batch (idempotent).

    sglang-jax 0.1.0rc0 takes the argmax only when the whole batch is greedy
    (``Sampler.__call__``: ``lax.cond(is_all_greedy, ...)``); in a batch that also holds a
    sampled request, a greedy row goes through top-k masking, which keeps every token tied
    with the top one (``binary_search.topk_mask``: "in presence of ties, more than k values
    might be returned"), and then samples among them: a greedy client's tokens change with
    what other clients send. Returns True when applied now.
    """
    sampler = importlib.import_module("sgl_jax.srt.layers.sampler")
    original = sampler.top_k_top_p_min_p_sampling_from_probs_jax
    if getattr(original, "_greedy_patched", False):
        return False

    def top_k_top_p_min_p_sampling_from_probs_jax(args, use_sort_for_toppk_minp):
        ids = original(args, use_sort_for_toppk_minp)
        logits, top_ks = args[0], args[2]
        greedy = jnp.argmax(logits, axis=-1).astype(ids.dtype).reshape(ids.shape)
        is_greedy = top_ks.reshape(ids.shape) == 1
        sharding = jax.typeof(ids).sharding
        if getattr(sharding, "spec", None) is not None:  # the engine's explicit mesh: the ids' sharding
            greedy, is_greedy = jax.sharding.reshard(greedy, sharding), jax.sharding.reshard(is_greedy, sharding)
        return jnp.where(is_greedy, greedy, ids)

    top_k_top_p_min_p_sampling_from_probs_jax._greedy_patched = True  # type: ignore[attr-defined]
    top_k_top_p_min_p_sampling_from_probs_jax.__wrapped__ = original  # type: ignore[attr-defined]
    sampler.top_k_top_p_min_p_sampling_from_probs_jax = top_k_top_p_min_p_sampling_from_probs_jax
    return True
