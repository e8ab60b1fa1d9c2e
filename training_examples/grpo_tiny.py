"""GRPO with Tunix's GRPOLearner and SglangJaxRollout on a tiny Qwen3, on CPU.

    python -m training_examples.grpo_tiny [--steps 30] [--workdir runs/grpo_tiny]
        [--rollout-quantization int8|fp8] [--truncated-is C] [--compare-quantization]

A 2-layer Qwen3 (head_dim 128) is built locally (no hub) and loaded into a Tunix
model with Tunix's own HF loader; the rollouts come from an in-process sglang-jax
engine whose weights RLCluster.sync_weights() replaces after every step through
SglangJaxRollout.update_params. The task: answer with digits only; the reward is
the fraction of the completion's characters that are digits, which a random tiny
model learns within a few dozen steps. Prints the reward and the weight-sync
report per step, measures how far the engine's logprobs of the sampled tokens are from the
trainer's (sampler/trainer mismatch) and writes a plot of the three (PNG).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from sampler.config import QUANTIZATIONS  # noqa: E402

PROMPTS = [
    "Q: 3+4=",
    "Q: 7+2=",
    "Q: 1+1=",
    "Q: 9+9=",
    "Q: 12+7=",
    "count: ",
    "number: ",
    "sum: ",
    "what is 4+4? A: ",
    "the answer is ",
    "hello ",
    "yes or no? ",
]


def digit_reward(prompts, completions, **kwargs) -> list[float]:
    """Fraction of the completion's non-space characters that are digits."""
    scores = []
    for text in completions:
        chars = [c for c in text if not c.isspace()]
        scores.append(sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0)
    return scores


LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_lora(model, rank: int, alpha: float, modules: tuple[str, ...] = LORA_MODULES):
    """qwix LoRA adapters on the given projections (default: every attention and MLP one)."""
    import qwix

    provider = qwix.LoraProvider(module_path="|".join(f".*{m}" for m in modules), rank=rank, alpha=alpha)
    ids = jnp.ones((1, 4), jnp.int32)
    return qwix.apply_lora_to_model(
        model, provider, ids, positions=jnp.arange(4)[None], cache=None, attention_mask=jnp.ones((1, 4, 4), bool)
    )


@dataclasses.dataclass
class StepLog:
    step: int
    reward: float
    sync_ms: float | None
    aliased_mib: float | None
    copied_mib: float | None
    seconds: float
    #: The sampler/trainer mismatch of the step's rollout (sampler.logprob_mismatch), if measured.
    logp_diff_mean: float | None = None
    logp_diff_max: float | None = None
    k3_kl: float | None = None


def run(
    steps: int = 30,
    workdir: str = "runs/grpo_tiny",
    *,
    seed: int = 0,
    learning_rate: float = 3e-3,
    num_generations: int = 4,
    batch_size: int = 4,
    num_iterations: int = 1,
    plot: bool = True,
    verbose: bool = True,
    rollout_cls=None,
    keep: dict | None = None,
    lora_rank: int | None = None,
    lora_alpha: float = 16.0,
    lora_modules: tuple[str, ...] = LORA_MODULES,
    rollout_devices: int = 1,
    rollout_overrides: dict | None = None,
    architecture: str = "Qwen3ForCausalLM",
    mismatch: bool = True,
    rollout_quantization: str | None = None,
    truncated_is: float | None = None,
    plot_path: Path | None = None,
) -> list[StepLog]:
    """Run the demo; returns one StepLog per GRPO step.

    ``keep``: if given, receives the live rollout, actor and rollout config, and the
    rollout is left running (the caller shuts it down). ``rollout_quantization``: roll out from
    an int8 / fp8 engine ("int8", "fp8", "fp8_w8a8", ...: ``SamplerConfig.quantization``), fed the
    float32 actor's weights quantized at every sync. ``truncated_is``: weight each completion
    token's loss by min(pi_trainer / pi_sampler, C) with this C (``TruncatedISGRPOLearner``).
    ``rollout_devices``: size of the
    rollout mesh; ``rollout_overrides``: extra RolloutConfig fields (e.g. data_parallel_size).
    ``architecture``: the tiny model's (any with a Tunix model and a tiny recipe, e.g.
    "Qwen3MoeForCausalLM"). ``mismatch``: measure the sampler/trainer logprob mismatch of every
    rollout (one trainer forward pass per step; ``sampler.measure_mismatch``).
    """
    import grain.python as grain
    from transformers import AutoTokenizer
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    from sampler import SglangJaxRollout, TruncatedISGRPOLearner, measure_mismatch
    from sampler.tiny import write_tiny_model
    from sampler.tunix.models import load_tunix_model

    work = Path(workdir)
    model_dir = write_tiny_model(work / f"tiny-{architecture}", architecture, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    mesh = jax.make_mesh(
        (1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=jax.devices()[:1]
    )
    with mesh:
        actor = load_tunix_model(model_dir, dtype=jnp.float32, mesh=mesh)
    rollout_mesh = (
        mesh
        if rollout_devices == 1
        else jax.make_mesh(
            (1, rollout_devices),
            ("fsdp", "tp"),
            axis_types=(jax.sharding.AxisType.Auto,) * 2,
            devices=jax.devices()[:rollout_devices],
        )
    )
    lora_fields = {}
    if lora_rank:
        actor = apply_lora(actor, lora_rank, lora_alpha, lora_modules)
        lora_fields = dict(
            rollout_sglang_jax_enable_static_lora=True,
            rollout_sglang_jax_lora_target_modules=list(lora_modules),
            rollout_sglang_jax_max_lora_rank=lora_rank,
            rollout_sglang_jax_lora_scaling=lora_alpha / lora_rank,
        )

    rewards_per_step: list[float] = []

    def reward_fn(prompts, completions, **kwargs):
        scores = digit_reward(prompts, completions)
        rewards_per_step.append(float(np.mean(scores)))
        return scores

    max_new = 8
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={
            rl_cluster_lib.Role.ACTOR: mesh,
            rl_cluster_lib.Role.REFERENCE: mesh,
            rl_cluster_lib.Role.ROLLOUT: rollout_mesh,
        },
        rollout_engine=(
            functools.partial(rollout_cls or SglangJaxRollout, quantization=rollout_quantization)
            if rollout_quantization
            else rollout_cls or SglangJaxRollout
        ),
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optax.adam(learning_rate),
            eval_every_n_steps=10_000,
            max_steps=steps * num_iterations,
        ),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=max_new,
            max_prompt_length=16,
            temperature=1.0,
            top_p=1.0,
            rollout_sglang_jax_model_version=str(model_dir),
            rollout_sglang_jax_context_length=64,
            rollout_sglang_jax_max_running_requests=batch_size * num_generations,
            **{"rollout_sglang_jax_log_level": "error", **lora_fields, **(rollout_overrides or {})},
        ),
    )
    cluster = rl_cluster_lib.RLCluster(actor=actor, reference=None, tokenizer=tokenizer, cluster_config=cluster_config)
    algo_config = grpo_learner.GRPOConfig(num_generations=num_generations, num_iterations=num_iterations, beta=0.0)
    if truncated_is is not None:
        learner = TruncatedISGRPOLearner(
            rl_cluster=cluster, reward_fns=reward_fn, algo_config=algo_config, sampler_is_threshold=truncated_is
        )
    else:
        learner = grpo_learner.GRPOLearner(rl_cluster=cluster, reward_fns=reward_fn, algo_config=algo_config)
    rng = np.random.default_rng(seed)
    prompts = [PROMPTS[i] for i in rng.integers(0, len(PROMPTS), size=steps * batch_size)]
    # a numpy array of strings per batch, as Tunix expects: its learner repeats every leaf of
    # the batch num_generations times, so a Python list would become a list of arrays
    dataset = grain.MapDataset.source(prompts).batch(batch_size).map(lambda x: {"prompts": np.asarray(x)})

    rollout: SglangJaxRollout = cluster.rollout
    monitor = measure_mismatch(cluster) if mismatch else None
    t0 = time.perf_counter()
    learner.train(dataset)
    elapsed = time.perf_counter() - t0
    reports = list(rollout.history)[1:]  # the first is the initial full sync at construction
    measured = {m.step: m.mismatch for m in monitor.history} if monitor else {}  # by global step (0-based)
    logs = []
    for i, reward in enumerate(rewards_per_step[:steps]):
        rep = reports[i] if i < len(reports) else None
        mm = measured.get(i)
        logs.append(
            StepLog(
                step=i + 1,
                reward=reward,
                sync_ms=rep.seconds * 1e3 if rep else None,
                aliased_mib=rep.aliased_bytes / 2**20 if rep else None,
                copied_mib=rep.copied_bytes / 2**20 if rep else None,
                seconds=elapsed,
                logp_diff_mean=mm.mean_abs if mm else None,
                logp_diff_max=mm.max_abs if mm else None,
                k3_kl=mm.k3_kl if mm else None,
            )
        )
        if verbose:
            sync = "no sync"
            if rep:
                mib = 2**20
                sync = f"sync {rep.seconds * 1e3:6.1f} ms, aliased {rep.aliased_bytes / mib:.2f} MiB, "
                sync += f"copied {rep.copied_bytes / mib:.2f} MiB"
            if mm:
                sync += f", |dlogp| {mm.mean_abs:.4f}"
            print(f"step {i + 1:3d}  reward {reward:.3f}  {sync}", flush=True)
    if verbose:
        first, last = np.mean([log.reward for log in logs[:5]]), np.mean([log.reward for log in logs[-5:]])
        print(
            f"\n{len(logs)} GRPO steps in {elapsed:.0f} s; mean reward first 5 steps {first:.3f} -> last 5 {last:.3f}"
        )
        print(f"sample completions now: {rollout.generate(PROMPTS[:3], cluster_config.rollout_config).text}")
    (work / "grpo_tiny.json").write_text(json.dumps([dataclasses.asdict(log) for log in logs], indent=1))
    if plot:
        plot_path = plot_path or work / "grpo_tiny.png"
        _plot(logs, plot_path)
        if verbose:
            print(f"plot: {plot_path}")
    if keep is not None:
        keep.update(rollout=rollout, actor=actor, rollout_config=cluster_config.rollout_config, learner=learner)
    else:
        rollout.shutdown()
    return logs


def _plot(logs: list[StepLog], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [log.step for log in logs]
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    a.plot(steps, [log.reward for log in logs], marker="o")
    a.set_ylabel("mean reward")
    a.set_title("GRPO on a tiny Qwen3 with an in-process sglang-jax rollout")
    b.plot(steps, [log.sync_ms for log in logs], marker=".", color="tab:orange")
    b.set_ylabel("weight sync (ms)")
    c.plot(steps, [log.logp_diff_mean for log in logs], marker=".", color="tab:green", label="mean")
    c.plot(steps, [log.logp_diff_max for log in logs], marker=".", color="tab:red", alpha=0.5, label="max")
    c.set_yscale("log")
    c.set_ylabel("sampler vs trainer\n|logprob diff| (nats)")
    c.legend(loc="upper right", fontsize="small")
    c.set_xlabel("GRPO step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


#: ``--compare-quantization``: (label, SamplerConfig.quantization) of each run.
COMPARED = (("bf16", None), ("int8", "int8"), ("fp8", "fp8_w8a8"))


def compare_quantization(steps: int, workdir: str, **options) -> dict[str, list[StepLog]]:
    """The demo once per rollout precision in ``COMPARED`` (same seed, prompts and trainer), and
    one plot of their reward and sampler/trainer mismatch: what a quantized rollout costs."""
    runs = {}
    for label, quantization in COMPARED:
        print(f"\n== rollout {label}", flush=True)
        runs[label] = run(
            steps,
            str(Path(workdir) / label),
            rollout_quantization=quantization,
            plot_path=Path(workdir) / label / "grpo_tiny.png",
            **options,
        )
    path = Path(workdir) / "grpo_tiny_quantization.png"
    _plot_compared(runs, path)
    (Path(workdir) / "grpo_tiny_quantization.json").write_text(
        json.dumps({k: [dataclasses.asdict(log) for log in v] for k, v in runs.items()}, indent=1)
    )
    print("\nmean sampler/trainer |logprob diff| per token (nats):")
    for label, logs in runs.items():
        values = [log.logp_diff_mean for log in logs if log.logp_diff_mean is not None]
        rewards = [log.reward for log in logs]
        print(
            f"  {label:5s} {np.mean(values):.4f}   reward first 5 steps {np.mean(rewards[:5]):.3f} "
            f"-> last 5 {np.mean(rewards[-5:]):.3f}"
        )
    print(f"plot: {path}")
    return runs


def _plot_compared(runs: dict[str, list[StepLog]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for label, logs in runs.items():
        steps = [log.step for log in logs]
        a.plot(steps, [log.reward for log in logs], marker=".", label=f"{label} rollout")
        b.plot(steps, [log.logp_diff_mean for log in logs], marker=".", label=f"{label} rollout")
    a.set_ylabel("mean reward")
    a.set_title("GRPO on a tiny Qwen3: bf16, int8 and fp8 rollouts of a float32 trainer")
    a.legend(loc="lower right", fontsize="small")
    b.set_yscale("log")
    b.set_ylabel("sampler vs trainer\nmean |logprob diff| (nats)")
    b.legend(loc="upper right", fontsize="small")
    b.set_xlabel("GRPO step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--workdir", default="runs/grpo_tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--learning-rate", type=float, default=3e-3)
    ap.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank")
    ap.add_argument(
        "--rollout-quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="roll out from an int8 / fp8 engine (sglang-jax's config of that name), fed the trainer's weights",
    )
    ap.add_argument(
        "--compare-quantization",
        action="store_true",
        help="run the demo three times (bf16, int8, fp8 rollouts; same seed and prompts) and plot their "
        "sampler/trainer mismatch side by side",
    )
    ap.add_argument(
        "--truncated-is",
        metavar="C",
        type=float,
        default=None,
        help="truncated importance sampling: weight each token's loss by min(pi_trainer / pi_sampler, C)",
    )
    args = ap.parse_args()
    if args.steps < 1:
        ap.error(f"--steps must be >= 1 (got {args.steps})")
    if not (args.learning_rate > 0 and math.isfinite(args.learning_rate)):
        ap.error(f"--learning-rate must be a finite number > 0 (got {args.learning_rate})")
    if args.truncated_is is not None and not (args.truncated_is > 0 and math.isfinite(args.truncated_is)):
        ap.error(f"--truncated-is must be a finite number > 0 (got {args.truncated_is})")
    if args.lora_rank is not None and args.lora_rank < 1:
        ap.error(f"--lora-rank must be >= 1 (got {args.lora_rank})")
    if args.compare_quantization:
        compare_quantization(
            args.steps, args.workdir, seed=args.seed, learning_rate=args.learning_rate, truncated_is=args.truncated_is
        )
        return
    run(
        args.steps,
        args.workdir,
        seed=args.seed,
        learning_rate=args.learning_rate,
        lora_rank=args.lora_rank,
        rollout_quantization=args.rollout_quantization,
        truncated_is=args.truncated_is,
    )


if __name__ == "__main__":
    main()
