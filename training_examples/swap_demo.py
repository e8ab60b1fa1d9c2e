"""Push trainer weights into an in-process sglang-jax engine and generate with them.

    python -m training_examples.swap_demo [--workdir runs/demo]

Builds a tiny Qwen3 checkpoint locally, starts a dummy-weight engine, loads the
checkpoint into a Tunix model with Tunix's own loader, pushes it (Tunix layout,
fp32 -> bf16 copies), changes the weights as a train step would and pushes again,
then pushes bf16 params kept in engine layout (zero-copy), printing each update
report and checking the engine's fingerprint against the trainer's.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import converters  # noqa: E402
from sampler import SamplerConfig, SglangJaxSampler  # noqa: E402
from sampler.tiny import write_tiny_model  # noqa: E402
from sampler.tunix.models import load_tunix_model  # noqa: E402

PROMPTS = ["1+1=", "hello world the quick", "Q: what is 3+4? A:"]


def show(sampler: SglangJaxSampler, label: str) -> None:
    out = sampler(PROMPTS, max_generation_steps=8)
    print(f"  {label}:")
    for prompt, text, lps in zip(PROMPTS, out.text, out.logprobs):
        print(f"    {prompt!r:28} -> {text!r:30} mean logprob {float(lps.mean()) if len(lps) else 0.0:+.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/demo")
    args = ap.parse_args()
    model_dir = write_tiny_model(os.path.join(args.workdir, "tiny-qwen3"), "Qwen3ForCausalLM", seed=0)
    print(f"tiny Qwen3 checkpoint: {model_dir}")

    with SglangJaxSampler(
        config=SamplerConfig(model_path=str(model_dir), context_length=128, max_running_requests=4)
    ) as sampler:
        print(f"engine: {sampler.architecture}, mesh {dict(sampler.mesh.shape)}, {len(sampler.engine_params())} leaves")
        show(sampler, "dummy engine (all-zero weights)")

        model = load_tunix_model(model_dir, dtype=jnp.float32)  # Tunix's own HF loader, fp32 master params
        state = nnx.state(model, nnx.Param)
        report = sampler.update_params(state)
        print(f"\n1) push Tunix model: {report.summary()}")
        show(sampler, "after push")

        # a "train step": every parameter moves a little
        key = jax.random.PRNGKey(1)
        state = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(key, x.shape, x.dtype), state)
        report = sampler.update_params(state)
        print(f"\n2) push after a train step: {report.summary()} (plan reused: {report.plan_reused})")
        show(sampler, "after second push")
        assert sampler.fingerprint() == converters.fingerprint_params(state, model_dir)
        print("  engine fingerprint == trainer fingerprint: True")

        # a trainer that keeps bf16 params in engine layout, on the engine's shardings
        shardings = sampler.engine_shardings()
        engine_layout = {
            k: jax.device_put(v, shardings[k]) for k, v in converters.to_engine_layout(state, sampler.spec).items()
        }
        report = sampler.update_params(engine_layout)
        sharing = sampler.verify_sharing(engine_layout)
        print(f"\n3) push engine-layout bf16 params: {report.summary()}")
        print(f"  engine shares every buffer with the trainer: {sharing.all_shared} ({len(sharing.shared)} leaves)")
        show(sampler, "after zero-copy push (same weights as 2)")


if __name__ == "__main__":
    main()
