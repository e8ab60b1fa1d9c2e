"""Oracle tests: a Tunix model built by Tunix's own HF loader, pushed through
update_params into a dummy engine, must equal an engine that loaded the same
checkpoint with sglang-jax's own safetensors loader: every leaf bit for bit, and
greedy generation token for token."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import converters
from sampler.tunix.models import load_tunix_model
from tests import helpers

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def reference():
    """Leaves and greedy outputs of engines loaded by sglang-jax's own loader."""
    cache = {}

    def get(engines, path):
        if path not in cache:
            ref = engines.get(path, load_format="safetensors")
            leaves = {k: np.asarray(v) for k, v in ref.engine_params().items()}
            tokens, out = helpers.greedy(ref)
            cache[path] = (leaves, tokens, out, ref.fingerprint())
            engines.drop(path, load_format="safetensors")
        return cache[path]

    return get


@pytest.mark.parametrize("case", sorted(helpers.CASES))
def test_tunix_model_into_dummy_engine_matches_safetensors_engine(case, model_dir, engines, reference):
    path = model_dir(case)
    ref_leaves, ref_tokens, ref_out, ref_fp = reference(engines, path)
    # the upstream loader agrees with the upstream mapping table (oracle sanity)
    helpers.assert_same_bits(ref_leaves, helpers.upstream_engine_leaves(path))

    sampler = engines.get(path)  # may be shared: other tests push weights into it too
    served = {p: x for p, x in sampler.engine_params().items() if p in set(sampler.weight_paths())}
    sampler.update_params({p: jnp.zeros_like(x) for p, x in served.items()}, source_format="sglang")
    zero_tokens, _ = helpers.greedy(sampler)
    model = load_tunix_model(path, dtype=jnp.float32)  # fp32 master params, like a trainer
    state = nnx.state(model, nnx.Param)
    report = sampler.update_params(state)

    assert report.source_format == "tunix"
    # fp32 -> bf16 casts; the leaves the engine keeps in float32 (Gemma norms, MoE routers) alias
    float32 = {p for p, x in ref_leaves.items() if x.dtype == np.float32}
    assert set(report.aliased) == float32 and len(report.copied) == len(ref_leaves) - len(float32)
    helpers.assert_same_bits({k: np.asarray(v) for k, v in sampler.engine_params().items()}, ref_leaves)
    tokens, out = helpers.greedy(sampler)
    assert tokens == ref_tokens
    assert tokens != zero_tokens  # the engine really served other weights (zeros) before
    for got, want in zip(out.logprobs, ref_out.logprobs):
        np.testing.assert_array_equal(got, want)
    assert sampler.fingerprint() == ref_fp == converters.fingerprint_params(state, path)
