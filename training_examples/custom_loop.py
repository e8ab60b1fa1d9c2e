"""update_params inside a plain optax + nnx train step (no Tunix learner).

    python -m training_examples.custom_loop [--steps 20]

The trainer keeps its parameters in bf16, as many RL setups do. After every step it
pushes them into the in-process engine; on CPU the engine then aliases every
trainer buffer (Tunix's (D, N, H) attention kernels through reshaped views), so a
sync moves no bytes. The task is supervised: make the model answer "7" after
"Q: 3+4=" -- greedy generation from the engine shows when it has learned it.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from sampler import SamplerConfig, SglangJaxSampler  # noqa: E402
from sampler.tiny import write_tiny_model  # noqa: E402
from sampler.tunix.models import load_tunix_model  # noqa: E402

PROMPT, TARGET = "Q: 3+4=", "7"


def run(steps: int = 20, workdir: str = "runs/custom_loop", verbose: bool = True) -> list:
    model_dir = write_tiny_model(os.path.join(workdir, "tiny-qwen3"), "Qwen3ForCausalLM", seed=0)
    model = load_tunix_model(model_dir, dtype=jnp.bfloat16)
    optimizer = nnx.Optimizer(model, optax.adam(2e-3), wrt=nnx.Param)
    sampler = SglangJaxSampler(
        config=SamplerConfig(model_path=str(model_dir), context_length=64, max_running_requests=2)
    )
    prompt = sampler.tokenize(PROMPT)
    target = sampler.tokenizer.encode(TARGET) + [sampler.tokenizer.eos_id()]
    tokens = jnp.asarray([prompt + target])
    n = tokens.shape[1]
    positions = jnp.arange(n)[None]
    mask = jnp.tril(jnp.ones((n, n), bool))[None]

    @nnx.jit
    def train_step(model, optimizer, tokens):
        def loss_fn(model):
            logits, _ = model(tokens[:, :-1], positions[:, :-1], None, mask[:, :-1, :-1])
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
            return -picked[:, len(prompt) - 1 :].mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    reports = []
    if verbose:
        print(f"before training the engine says {sampler([PROMPT], max_generation_steps=4).text[0]!r}")
    try:
        for step in range(1, steps + 1):
            loss = train_step(model, optimizer, tokens)
            report = sampler.update_params(nnx.state(model, nnx.Param))  # the weight sync
            reports.append(report)
            text = sampler([PROMPT], max_generation_steps=4).text[0]
            if verbose:
                print(
                    f"step {step:3d} loss {float(loss):.3f}  sync {report.seconds * 1e3:5.1f} ms "
                    f"aliased {len(report.aliased)} copied {len(report.copied)}  engine says {text!r}",
                    flush=True,
                )
        sharing = sampler.verify_sharing(nnx.state(model, nnx.Param))
        if verbose:
            print(f"engine shares every trainer buffer: {sharing.all_shared} ({len(sharing.shared)} leaves)")
    finally:
        sampler.shutdown()
    return reports


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workdir", default="runs/custom_loop")
    args = ap.parse_args()
    run(args.steps, args.workdir)


if __name__ == "__main__":
    main()
