"""Asynchronous GRPO: Tunix's agentic learner with SglangJaxRollout, syncs draining vs in flight.

    python -m training_examples.async_grpo [--steps 6] [--fast] [--no-precompile] [--workdir runs/async_grpo]

Tunix's ``AgenticGRPOLearner`` rolls out the next batch while the actor trains on this one
when the actor and rollout meshes differ (here: the trainer on simulated CPU device 0, the
sglang-jax engine on device 1; ``off_policy_steps=1``). The same model, data and steps run
twice:

- ``drain``: Tunix's own ``RolloutSyncLock``: each weight sync waits until every episode in
  flight has ended (and new ones wait for the sync);
- ``in-flight``: ``sampler.compat.tunix.enable_in_flight_sync(learner)`` with
  ``SglangJaxRollout(in_flight="recompute")``: a sync parks the engine between two
  iterations, swaps, and the requests in flight re-prefill under the new weights; each
  trajectory's ``policy_version`` is the version of the oldest weights that produced it.

Prints per run the throughput (completion tokens trained per second, steps per second),
the time the trainer waited at each sync (lock + ``sync_weights``) and how many turns
spanned a weight swap, then a Markdown table of both. The model is a tiny Qwen3 nudged to
end its answers with EOS (Tunix drops every completion that uses its whole budget);
the reward favours digits and answers of a target length, so groups differ and advantages
are non-zero at every step.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

PROMPTS = ["3+4=", "7+2=", "1+1=", "9+9=", "count:", "number:", "sum:", "hello"]
MODES = ("drain", "in-flight")


@dataclasses.dataclass(frozen=True)
class Size:
    """How big a run is: completion budget, group shape, and the EOS nudge of the model."""

    max_new: int
    batch_size: int
    num_generations: int
    eos_boost: float
    #: Answer length the reward prefers, in characters: well inside the token budget, as
    #: Tunix drops every completion that uses the whole budget.
    target_chars: int


FULL = Size(max_new=40, batch_size=2, num_generations=4, eos_boost=2.0, target_chars=20)
FAST = Size(max_new=12, batch_size=2, num_generations=4, eos_boost=3.5, target_chars=8)


def digits_near_length(target_chars: int) -> Callable[..., list[float]]:
    """The reward: fraction of digit characters, minus the distance from ``target_chars``
    answer characters (relative). A reward that only grew with length drove every answer
    to the budget within a step, and Tunix then dropped them all: training on nothing."""

    def reward(prompts, completions, **kwargs) -> list[float]:
        out = []
        for text in completions:
            chars = [c for c in text if not c.isspace()]
            digits = sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0
            out.append(digits - abs(len(chars) - target_chars) / target_chars)
        return out

    return reward


def chat_parser(tokenizer):
    """A minimal chat format, 'Q: <user>\\nA: <assistant>\\n' (the agentic learner records
    assistant tokens only through a chat parser)."""
    from tunix.rl.agentic.parser.chat_template_parser import parser

    class MiniParser(parser.BaseChatTemplateParser):
        def _init_tokens(self):
            return parser.TokenConfig(user_token="Q: ", assistant_token="A: ", eot_token="\n")

        def _init_generation_prompt(self):
            return "A: "

    return MiniParser(tokenizer)


@dataclasses.dataclass
class StepStats:
    """One train step as the trainer saw its batch."""

    completion_tokens: int
    nonzero_advantages: int
    max_param_change: float
    policy_versions: list[int]


@dataclasses.dataclass
class RunLog:
    mode: str
    seconds: float
    steps: list[StepStats]
    #: Per learner sync: episodes in flight, trainer's lock wait and sync time (s).
    sync_waits: list[dict]
    #: Per engine update: requests in flight that switched weights.
    requests_switched: list[int]
    turns: int
    turns_spanning_a_swap: int

    @property
    def trained_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.steps)

    def summary(self) -> dict[str, Any]:
        waits = [w["lock_seconds"] + w["sync_seconds"] for w in self.sync_waits]
        return {
            "run": self.mode,
            "steps": len(self.steps),
            "seconds": round(self.seconds, 2),
            "steps_per_s": round(len(self.steps) / self.seconds, 3),
            "trained_tokens_per_s": round(self.trained_tokens / self.seconds, 1),
            "sync_wait_median_s": round(statistics.median(waits), 3) if waits else None,
            "sync_wait_max_s": round(max(waits), 3) if waits else None,
            "episodes_in_flight_at_syncs": [w["episodes_in_flight"] for w in self.sync_waits],
            "requests_switched": self.requests_switched,
            "turns_spanning_a_swap": f"{self.turns_spanning_a_swap}/{self.turns}",
        }


def _params(model) -> list[np.ndarray]:
    from flax import nnx

    return [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def run(
    mode: str = "in-flight",
    steps: int = 6,
    workdir: str = "runs/async_grpo",
    *,
    fast: bool = False,
    seed: int = 0,
    learning_rate: float = 3e-5,
    max_concurrency: int | None = None,
    rollout_cls: Any = None,
    on_learner: Callable[[Any], None] | None = None,
    keep: dict | None = None,
    verbose: bool = True,
    precompile: bool = False,
) -> RunLog:
    """One asynchronous GRPO run; ``mode`` is "drain" or "in-flight".

    ``rollout_cls``: a SglangJaxRollout subclass to build instead; ``on_learner(learner)``
    is called before training (tests instrument it there); ``keep`` receives the live
    rollout, actor and learner (the caller shuts the rollout down). ``precompile``: the
    engine compiles its batch shapes at start-up (sglang-jax's default on accelerators; the
    sampler turns it off on CPU), so no swap waits for an iteration that compiles a new one.
    """
    from transformers import AutoTokenizer
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.agentic import agentic_grpo_learner
    from tunix.rl.rollout import base_rollout

    from sampler import SglangJaxRollout, compat
    from sampler.tiny import write_eos_prone_model
    from sampler.tunix.config import from_rollout_config
    from sampler.tunix.models import load_tunix_model

    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: must be one of {MODES}")
    if jax.device_count() < 2:
        raise RuntimeError("needs two devices (XLA_FLAGS=--xla_force_host_platform_device_count=2 on CPU)")
    size = FAST if fast else FULL
    group = size.batch_size * size.num_generations
    # Tunix's lock deadlocks when fewer episodes may run than the producer queues (see
    # compat.tunix.NonDrainingSyncLock): the drain run allows all of them.
    concurrency = max_concurrency or 2 * group
    work = Path(workdir)
    model_dir = write_eos_prone_model(work / f"tiny-qwen3-eos{size.eos_boost}", seed=seed, eos_boost=size.eos_boost)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    auto = (jax.sharding.AxisType.Auto,) * 2
    actor_mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=auto, devices=jax.devices()[:1])
    rollout_mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=auto, devices=jax.devices()[1:2])
    with actor_mesh:
        actor = load_tunix_model(model_dir, dtype=jnp.float32, mesh=actor_mesh)
    in_flight = "recompute" if mode == "in-flight" else "drain"
    prompt_len = 32
    rollout_config = base_rollout.RolloutConfig(
        max_tokens_to_generate=size.max_new,
        max_prompt_length=prompt_len,
        temperature=1.0,
        top_p=1.0,
        return_logprobs=True,
        rollout_sglang_jax_model_version=str(model_dir),
        rollout_sglang_jax_context_length=prompt_len + size.max_new + 16,
        rollout_sglang_jax_max_running_requests=2 * group,
        rollout_sglang_jax_log_level="error",
    )
    sampler_config = from_rollout_config(rollout_config, rollout_mesh)
    if precompile:
        sampler_config.engine_kwargs = {**sampler_config.engine_kwargs, "disable_precompile": False}
    engine = functools.partial(rollout_cls or SglangJaxRollout, in_flight=in_flight, sampler_config=sampler_config)
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={
            rl_cluster_lib.Role.ACTOR: actor_mesh,
            rl_cluster_lib.Role.REFERENCE: actor_mesh,
            rl_cluster_lib.Role.ROLLOUT: rollout_mesh,
        },
        rollout_engine=engine,
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optax.adam(learning_rate), eval_every_n_steps=10_000, max_steps=steps
        ),
        rollout_config=rollout_config,
    )
    cluster = rl_cluster_lib.RLCluster(actor=actor, reference=None, tokenizer=tokenizer, cluster_config=cluster_config)
    learner = agentic_grpo_learner.GRPOLearner(
        rl_cluster=cluster,
        reward_fns=digits_near_length(size.target_chars),
        chat_parser=chat_parser(tokenizer),
        agent_class=compat.prompt_text_agent(),  # the prompt itself, not its array's repr
        algo_config=agentic_grpo_learner.GRPOConfig(
            num_generations=size.num_generations,
            num_iterations=1,
            beta=0.0,
            max_response_length=size.max_new,
            max_concurrency=concurrency,
            off_policy_steps=1,
        ),
    )
    if mode == "in-flight":
        compat.enable_in_flight_sync(learner)
    sync_waits = compat.record_sync_waits(learner)
    rollout = cluster.rollout

    turns = {"all": 0, "spanning": 0}
    generate = rollout.generate

    def counted_generate(prompts, rollout_config, **kwargs):
        out = generate(prompts, rollout_config, **kwargs)
        for stamps in rollout.last_weight_versions() or []:
            turns["all"] += 1
            turns["spanning"] += bool(stamps and len(stamps) > 1)
        return out

    rollout.generate = counted_generate
    stats: list[StepStats] = []
    update_actor = cluster.update_actor

    def measured_update_actor(batches, *args, **kwargs):
        before = _params(cluster.actor_trainer.model)
        out = update_actor(batches, *args, **kwargs)
        after = _params(cluster.actor_trainer.model)
        stats.append(
            StepStats(
                completion_tokens=sum(int(np.asarray(b.completion_mask).sum()) for b in batches),
                nonzero_advantages=sum(int((np.abs(np.asarray(b.advantages)) > 0).sum()) for b in batches),
                max_param_change=max(float(np.abs(a - b).max()) for a, b in zip(after, before)),
                policy_versions=sorted({int(v) for b in batches for v in np.asarray(b.policy_version)}),
            )
        )
        return out

    cluster.update_actor = measured_update_actor
    if on_learner is not None:
        on_learner(learner)

    rng = np.random.default_rng(seed)
    batches = steps + 3  # off_policy_steps + 1 batches are queued ahead of the trainer
    data = [{"prompts": [PROMPTS[i] for i in rng.integers(0, len(PROMPTS), size.batch_size)]} for _ in range(batches)]
    history_start = len(rollout.history)
    t0 = time.perf_counter()
    learner.train(data)
    elapsed = time.perf_counter() - t0
    log = RunLog(
        mode=mode,
        seconds=elapsed,
        steps=stats,
        sync_waits=[dataclasses.asdict(w) for w in sync_waits],
        requests_switched=[r.requests_in_flight for r in list(rollout.history)[history_start:]],
        turns=turns["all"],
        turns_spanning_a_swap=turns["spanning"],
    )
    if verbose:
        print(f"\n== {mode}: {len(stats)} steps in {elapsed:.1f} s", flush=True)
        for i, s in enumerate(stats):
            print(
                f"step {i + 1}: completion tokens {s.completion_tokens:4d}, advantages != 0 {s.nonzero_advantages:2d}, "
                f"max |d param| {s.max_param_change:.1e}, policy versions {s.policy_versions}"
            )
        for i, w in enumerate(sync_waits):
            print(
                f"sync {i + 1}: {w.episodes_in_flight} episodes in flight, trainer waited {w.seconds * 1e3:7.1f} ms "
                f"(lock {w.lock_seconds * 1e3:.1f} ms, sync_weights {w.sync_seconds * 1e3:.1f} ms)"
            )
    if keep is not None:
        keep.update(rollout=rollout, actor=actor, learner=learner)
    else:
        rollout.shutdown()
    return log


def table(logs: list[RunLog]) -> str:
    """The README's Markdown table of the runs."""
    rows = [
        "| run | steps | seconds | steps/s | trained tokens/s | trainer wait per sync, median / max (s) "
        "| episodes in flight at syncs | requests switched weights | turns spanning a swap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for log in logs:
        s = log.summary()
        rows.append(
            f"| {s['run']} | {s['steps']} | {s['seconds']} | {s['steps_per_s']} | {s['trained_tokens_per_s']} "
            f"| {s['sync_wait_median_s']} / {s['sync_wait_max_s']} | {s['episodes_in_flight_at_syncs']} "
            f"| {s['requests_switched']} | {s['turns_spanning_a_swap']} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--workdir", default="runs/async_grpo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fast", action="store_true", help="a short completion budget (smoke test)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument(
        "--no-precompile",
        action="store_true",
        help="the sampler's CPU default: batch shapes compile when first met, inside the iteration a swap waits for",
    )
    args = ap.parse_args()
    logs = [
        run(m, args.steps, args.workdir, fast=args.fast, seed=args.seed, precompile=not args.no_precompile)
        for m in args.modes
    ]
    print("\n" + table(logs))
    out = Path(args.workdir) / "async_grpo.json"
    out.write_text(json.dumps([dataclasses.asdict(log) for log in logs], indent=1))
    print(f"\nper-step logs: {out}")


if __name__ == "__main__":
    main()
