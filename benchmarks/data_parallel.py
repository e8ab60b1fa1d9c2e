"""Rollout throughput: one tp=4 engine vs four tp=1 engines (DataParallelSampler) on the
same four simulated CPU devices, for the same batch of prompts.

Prints tokens/s (median of several runs, fixed seed, greedy with ignore_eos so every run
generates the same number of tokens) and, for the data-parallel sampler, the overlap
achieved: the sum of the engines' times when each runs its share alone, divided by the wall
time when they run together (1.0 = no overlap, 4.0 = perfect). Writes the table to
docs/benchmarks/results/data_parallel.json (``--json PATH`` elsewhere, ``--no-json`` not at all).

    .venv/bin/python benchmarks/data_parallel.py [--prompts 32] [--new-tokens 32] [--runs 5]
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import argparse  # noqa: E402
import functools
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import Results, add_output_args, num  # noqa: E402
from sampler import DataParallelSampler, SamplerConfig, SglangJaxSampler  # noqa: E402
from sampler.data_parallel import split_balanced  # noqa: E402
from sampler.tiny import write_tiny_model  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while numbers one two three four".split()


def prompts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 12)))) for _ in range(n)]


def timed(fn, runs: int) -> list[float]:
    fn()  # warm-up: compile the shapes this batch needs
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    add_output_args(ap)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-dp-"))
    model = write_tiny_model(
        work / "qwen3",
        "Qwen3ForCausalLM",
        seed=args.seed,
        hidden_size=384,
        num_heads=4,
        num_kv_heads=2,
        num_layers=4,
        tie_word_embeddings=True,
    )
    batch = prompts(args.prompts, args.seed)
    gen = dict(max_generation_steps=args.new_tokens, temperature=0.0, ignore_eos=True)
    tokens = args.prompts * args.new_tokens
    common = dict(model_path=str(model), load_format="safetensors", context_length=128)

    rows = []
    tp4 = SglangJaxSampler(config=SamplerConfig(tp_size=4, max_running_requests=args.prompts, **common))
    try:
        t = timed(lambda: tp4(batch, **gen), args.runs)
        reference = tp4(batch, **gen).tokens
    finally:
        tp4.shutdown()
    rows.append(("1 engine, tp=4", statistics.median(t), None))

    dp = DataParallelSampler(
        config=SamplerConfig(data_parallel_size=4, max_running_requests=args.prompts // 4 + 1, **common)
    )
    try:
        t = timed(lambda: dp(batch, **gen), args.runs)
        same = sum(a.tolist() == b.tolist() for a, b in zip(dp(batch, **gen).tokens, reference))
        lengths = [len(dp.tokenize(p)) + args.new_tokens for p in batch]
        shares = split_balanced(lengths, 4)
        alone = []
        for s, idx in zip(dp.samplers, shares):
            part = [batch[i] for i in idx]
            alone.append(statistics.median(timed(functools.partial(s, part, **gen), args.runs)))
        wall = statistics.median(t)
        rows.append(("4 engines, tp=1 (DataParallelSampler)", wall, sum(alone) / wall))
    finally:
        dp.shutdown()

    res = Results(
        "data_parallel",
        args,
        context={"tokens_per_run": tokens, "greedy_identical": same, "sequences": len(batch)},
    )
    table = res.table(
        ["set-up", "wall (s)", "tokens/s", "overlap (sum of engines alone / wall)"],
        key="throughput",
        caption=(
            f"{args.prompts} prompts x {args.new_tokens} new tokens (greedy), Qwen3 hidden 384, 4 layers, "
            f"4 simulated CPU devices on {os.cpu_count()} cores; median of {args.runs} runs\n"
            f"greedy sequences identical across the two set-ups: {same}/{len(batch)} "
            "(tp=4 sums bf16 partial products in another order than tp=1)"
        ),
    )
    for name, wall, overlap in rows:
        ov = num(overlap, "{:.2f}x", "x") if overlap is not None else "-"
        table.add(name, num(wall, "{:.2f}", "s"), num(tokens / wall, "{:.0f}", "tokens/s"), ov)
    res.emit()


if __name__ == "__main__":
    main()
