"""The sampler/trainer mismatch (sampler.mismatch): its statistics on known values, and on a
real engine against a Tunix trainer, near 0 when both compute the same model and clearly not
when the trainer computes another one (a RoPE setting Tunix 0.1.7 ignores). The per-step
metric in Tunix GRPO, healthy and with an engine one step behind: tests/test_grpo.py."""

import math

import numpy as np
import pytest
from flax import nnx
from tunix.rl import common

from sampler import compat, logprob_mismatch
from sampler.mismatch import right_padded
from sampler.tunix.models import load_tunix_model
from tests import helpers

#: What a healthy bf16 engine against an fp32 Tunix trainer measures here (nats): about
#: 0.01 mean on these models; a trainer of another model is off by tenths.
HEALTHY_MEAN_ABS = 0.05


def test_statistics_on_known_values():
    sampler = np.log([[0.5, 0.25, 0.1, 0.9], [0.2, 0.2, 0.2, 0.2]])
    trainer = np.log([[0.5, 0.75, 0.1, 0.9], [0.2, 0.2, 0.2, 0.9]])
    mask = [[1, 1, 1, 1], [1, 1, 1, 0]]  # the last token is not counted
    m = logprob_mismatch(sampler, trainer, mask)
    delta = math.log(3)  # one token: ratio 3, outside [1/2, 2]
    assert m.tokens == 7
    assert m.mean_abs == pytest.approx(delta / 7) and m.max_abs == pytest.approx(delta)
    assert m.k3_kl == pytest.approx((3 - 1 - delta) / 7)
    assert m.outside_clip == pytest.approx(1 / 7)
    assert logprob_mismatch(sampler, trainer, mask, clip=4.0).outside_clip == 0.0
    same = logprob_mismatch(sampler, sampler)
    assert (same.mean_abs, same.max_abs, same.k3_kl, same.outside_clip) == (0.0, 0.0, 0.0, 0.0)
    assert logprob_mismatch(sampler, trainer, np.zeros((2, 4))).tokens == 0
    assert set(m.metrics()) == {
        "sampler_trainer/logp_diff_mean", "sampler_trainer/logp_diff_max", "sampler_trainer/k3_kl",
        "sampler_trainer/ratio_outside_clip", "sampler_trainer/tokens",
    }  # fmt: skip


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((np.zeros((2, 3)), np.zeros((2, 4))), {}, "shape"),
        ((np.zeros((2, 3)), np.zeros((2, 3)), np.ones((3, 2))), {}, "mask has shape"),
        ((np.zeros((1, 2)), np.zeros((1, 2))), {"clip": 1.0}, "clip"),
        ((np.zeros((1, 2)), np.zeros((1, 2))), {"clip": float("inf")}, "clip"),
        ((np.array([[0.0, np.nan]]), np.zeros((1, 2))), {}, "sampler_logprobs"),
        ((np.zeros((1, 2)), np.array([[0.0, 0.5]])), {}, "trainer_logprobs"),
    ],
)
def test_bad_input_names_what_is_wrong(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        logprob_mismatch(*args, **kwargs)


def test_right_padded_refuses_a_row_longer_than_the_width():
    assert right_padded([[1, 2], [3]], 3, 0).tolist() == [[1, 2, 0], [3, 0, 0]]
    with pytest.raises(ValueError, match="longer than 2"):
        right_padded([[1, 2, 3]], 2, 0)


def _trainer_logprobs(model, prompts, completions, pad, eos):
    graphdef, state = nnx.split(model)
    return np.asarray(
        common.compute_per_token_logps(
            graphdef, state, prompt_tokens=prompts, completion_tokens=completions, pad_id=pad, eos_id=eos
        )
    )


@pytest.mark.engine
def test_engine_against_a_tunix_trainer_of_the_same_and_of_another_model(tmp_path, engines):
    """A checkpoint with rope_theta 1e4: the engine's sampled logprobs against a Tunix trainer
    that follows it (patched) and one that computes with Tunix 0.1.7's fixed 1e6."""
    path = helpers.write_varied_case(tmp_path / "theta", rope_theta=10_000.0)
    sampler = engines.get(path, load_format="safetensors")
    out = sampler(helpers.PROMPTS, max_generation_steps=12, temperature=1.0)
    pad, eos = sampler.tokenizer.pad_id(), sampler.tokenizer.eos_id()
    completions = right_padded(out.tokens, 12, pad)
    engine = right_padded(out.logprobs, 12, 0.0)
    mask = completions != pad
    healthy = logprob_mismatch(
        engine, _trainer_logprobs(load_tunix_model(path), out.padded_prompt_tokens, completions, pad, eos), mask
    )
    wrong_trainer = load_tunix_model(path, rope_theta=compat.TUNIX_FIXED_ROPE_THETA)  # what unpatched Tunix computes
    wrong = logprob_mismatch(
        engine, _trainer_logprobs(wrong_trainer, out.padded_prompt_tokens, completions, pad, eos), mask
    )
    assert healthy.tokens == wrong.tokens > 20
    assert healthy.mean_abs < HEALTHY_MEAN_ABS and healthy.k3_kl < HEALTHY_MEAN_ABS**2, healthy
    assert wrong.mean_abs > 4 * HEALTHY_MEAN_ABS and wrong.k3_kl > 10 * healthy.k3_kl, (healthy, wrong)
    engines.drop(path, load_format="safetensors")
