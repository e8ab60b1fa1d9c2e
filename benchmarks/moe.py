"""update_params on a Qwen3-30B-A3B-shaped MoE, scaled down in depth to fit one machine.

Qwen3-30B-A3B's proportions (hidden 2048, 32/4 heads of 128, 128 experts of width 768, top-8,
vocab 151936, untied) with ``--layers`` layers (48 in the real model); random weights, config
made locally, default SamplerConfig on one device. Sources: a bf16 Tunix Qwen3-MoE (experts
already stacked (E, H, I) like the engine's) and engine-layout bf16 arrays on the engine's
shardings. Prints a Markdown table: medians, bytes aliased and copied (copied measured by
buffer pointers), transient memory two ways (see benchmarks/common.py) and the machine's
memcpy time for the bytes copied, in the same run; writes them to docs/benchmarks/results/moe.json
(``--json PATH`` elsewhere, ``--no-json`` not at all).

The peer: Tunix 0.1.7's own SglangJaxSampler.update_params runs, but its sglang-jax mapping
for Qwen3 (tunix/models/qwen3/mapping_sglang_jax.py) has no entries for the router and the
experts and names the attention output o_proj (the engine's Qwen3-MoE calls it c_proj): it
logs "No mapping for source key" and skips them (tunix/generate/utils.py:491), so those
engine leaves stay stale. Its row reports its time and the stale bytes (checked by content).

    python benchmarks/moe.py [--layers 2] [--experts 128] [--runs 5] [--seed 0]

Memory: the engine, the Tunix state and the engine-layout copy are each one model (about 3.5 GB
at 2 layers and 128 experts), so the run needs about 4x that; check it first with
``--layers 1 --experts 8``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import (  # noqa: E402
    MiB,
    Results,
    add_output_args,
    copied_bytes,
    memcpy_seconds,
    num,
    rss_high_water,
    tunix_peer,
    tunix_update,
)
from flax import nnx  # noqa: E402

import converters  # noqa: E402
from sampler import SamplerConfig, SglangJaxSampler  # noqa: E402
from sampler.sync.leaves import live_device_bytes  # noqa: E402
from sampler.tiny import write_tiny_model  # noqa: E402
from sampler.tunix.models import random_tunix_model  # noqa: E402

#: Qwen3-30B-A3B (config.json of Qwen/Qwen3-30B-A3B) but for the number of layers and experts.
QWEN3_30B_A3B = dict(
    vocab_size=151936,
    hidden_size=2048,
    num_heads=32,
    num_kv_heads=4,
    head_dim=128,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    tie_word_embeddings=False,
)
EXPERT_LEAVES = (".mlp.wi_0", ".mlp.wi_1", ".mlp.wo")


def ours(sampler, tree) -> float:
    t0 = time.perf_counter()
    sampler.update_params(tree)
    return time.perf_counter() - t0


def stale_bytes(sampler, expected: dict) -> int:
    """Bytes of engine leaves that do not hold the pushed content (compared bit for bit)."""
    served = sampler.engine_params()
    return sum(
        served[p].nbytes
        for p, want in expected.items()
        if not np.array_equal(np.asarray(served[p]).view(np.uint8), np.asarray(want).view(np.uint8))
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    add_output_args(ap)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-qwen3-30b-a3b-"))
    write_tiny_model(
        tmp,
        "Qwen3MoeForCausalLM",
        weights=False,
        num_layers=args.layers,
        num_experts=args.experts,
        **QWEN3_30B_A3B,
    )
    sampler = SglangJaxSampler(config=SamplerConfig(model_path=str(tmp), context_length=256, max_running_requests=2))
    model = random_tunix_model(tmp, seed=args.seed, dtype=jnp.bfloat16)
    tunix_bf16 = nnx.state(model, nnx.Param)
    shardings = sampler.engine_shardings()
    engine_layout = {
        k: jax.device_put(v, shardings[k]) for k, v in converters.to_engine_layout(tunix_bf16, sampler.spec).items()
    }
    jax.block_until_ready((tunix_bf16, engine_layout))
    model_bytes = sum(x.nbytes for x in engine_layout.values())
    expert_bytes = sum(x.nbytes for p, x in engine_layout.items() if p.endswith(EXPERT_LEAVES))
    cases = [("ours", "Tunix layout bf16", tunix_bf16), ("ours", "engine layout bf16", engine_layout)]

    for _, _, tree in cases:  # warm-up: compile transforms, build plans
        ours(sampler, tree)
    times: list[list[float]] = [[] for _ in cases]
    for r in range(args.runs):
        for k in range(len(cases)) if r % 2 == 0 else reversed(range(len(cases))):
            ours(sampler, cases[k][2])  # steady state: each timed push follows one of its kind
            times[k].append(ours(sampler, cases[k][2]))
    rows = []
    for k, (who, source, tree) in enumerate(cases):
        report = sampler.update_params(tree)
        copied = copied_bytes(sampler._handle.model_runner.model_state_leaves, tree)
        sampler.update_params(tree)
        before = live_device_bytes()
        rep = sampler.update_params(tree, track_peak_memory=True)
        live = before + rep.peak_extra_bytes + max(0, rep.live_bytes_after - rep.live_bytes_before)
        live_peak = max(0, live - max(before, live_device_bytes()))
        sampler.update_params(tree)
        rss = rss_high_water(lambda tree=tree: sampler.update_params(tree))[1]
        limit = memcpy_seconds(copied) if copied else 0.0
        stale = stale_bytes(sampler, engine_layout)
        rows.append(
            (who, source, statistics.median(times[k]), report.aliased_bytes, copied, limit, live_peak, rss, stale)
        )

    # the peer: Tunix's own sync of the same bf16 Tunix state, on the same engine
    sampler.update_params({k: jnp.zeros_like(v) for k, v in engine_layout.items()}, alias=False)
    peer = tunix_peer(sampler, model)
    logging.getLogger().setLevel(logging.CRITICAL)  # one "No mapping" line per skipped leaf
    tunix_update(peer, tunix_bf16)
    peer_times = [tunix_update(peer, tunix_bf16) for _ in range(args.runs)]
    stale = stale_bytes(sampler, engine_layout)
    rows.append(
        ("Tunix 0.1.7", "Tunix layout bf16", statistics.median(peer_times), None, None, None, None, None, stale)
    )

    res = Results("moe", args, context={"model_bytes": model_bytes, "expert_bytes": expert_bytes})
    table = res.table(
        [
            "update",
            "source",
            "median ms",
            "aliased MiB (report)",
            "copied MiB (buffer pointers)",
            "memcpy of the copied bytes, ms",
            "extra memory: live arrays",
            "extra memory: RSS high-water",
            "engine bytes left stale",
        ],
        align=[None, None] + ["right"] * 7,
        key="updates",
        caption=(
            f"Qwen3-30B-A3B-shaped MoE, {args.layers} layers (48 in the real model), {args.experts} experts, "
            f"{model_bytes / MiB:.0f} MiB bf16 of which experts {expert_bytes / MiB:.0f} MiB; JAX {jax.__version__} "
            f"on {jax.devices()[0].platform} ({os.cpu_count()} cores), default SamplerConfig, tp 1, {args.runs} "
            f"alternating rounds, seed {args.seed}"
        ),
    )
    for who, source, med, aliased, copied, limit, live, rss, stale_ in rows:
        if aliased is None:
            table.add(
                who,
                source,
                num(med * 1e3, "{:.1f}", "ms"),
                *["n/a"] * 5,
                num(stale_ / MiB, "{:.0f} MiB (no sglang-jax mapping for router, experts, c_proj: skipped)", "MiB"),
            )
            continue
        table.add(
            who,
            source,
            num(med * 1e3, "{:.1f}", "ms"),
            num(aliased / MiB, "{:.0f}", "MiB"),
            num(copied / MiB, "{:.0f}", "MiB"),
            num(limit * 1e3, "{:.1f}", "ms"),
            num(live / MiB, "{:.0f} MiB", "MiB"),
            num(rss / MiB, "{:.0f} MiB", "MiB"),
            num(stale_ / MiB, "{:.0f} MiB", "MiB"),
        )
    res.emit()
    sampler.shutdown()


if __name__ == "__main__":
    main()
