"""Property-based fuzz of the Python entry points (hypothesis) on one shared real engine:
malformed and extreme prompts, sampling parameters and logprob options through
``generate_ids``, raw engine requests (what every HTTP route sends), the Tunix call and
``score_completions``. Every call either returns or raises a ``ValueError``; after each, the
engine is healthy and a known request returns its known answer. The HTTP routes are fuzzed
in tests/test_serve_guard.py."""

import math
import os
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sampler import EngineFaultError
from sampler.engine.validation import SAMPLING_PARAMS
from tests.test_validation import KNOWN_IDS, KNOWN_PARAMS, request

pytestmark = pytest.mark.engine

#: Fuzzed calls per test (FUZZ_EXAMPLES overrides).
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
TALLY: Counter = Counter()

NASTY = st.sampled_from(
    [
        None, True, False, -1, 0, 2**31, -(2**31) - 1, 2**63, 2**64, 10**30, 1.5, -0.0, 1e308, math.nan, math.inf,
        -math.inf, "", "5", "x", "\x00", "💥", [], {}, [None], [-1], [2**31], [[1]], np.int64(-3), np.float32(2.5),
        np.uint64(2**63), np.bool_(True),
    ]
)  # fmt: skip
TOKEN = st.integers(0, 383) | st.integers(0, 383) | st.integers(0, 383) | NASTY
PROMPT = (
    st.lists(TOKEN, min_size=0, max_size=8)
    | st.lists(st.integers(0, 383), min_size=1, max_size=6)
    | st.builds(np.array, st.lists(st.integers(-5, 400), min_size=1, max_size=6))
    | st.builds(lambda xs: np.array(xs, np.float32), st.lists(st.integers(0, 50), min_size=1, max_size=4))
    | st.integers(122, 130).map(lambda n: [5] * n)
)
#: Values each sampling parameter takes when it is meant to be valid (small: cheap to serve).
VALID = {
    "max_new_tokens": st.integers(0, 4),
    "min_new_tokens": st.just(0),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.sampled_from([-1, 1, 5, 383, 1 << 30]),
    "min_p": st.floats(0, 1),
    "frequency_penalty": st.floats(-2, 2),
    "presence_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0, 2),
    "n": st.integers(1, 2),
    "stop": st.sampled_from(["x", ["1", "2"], None]),
    "stop_token_ids": st.lists(st.integers(0, 383), max_size=3),
    "regex": st.sampled_from([None, "[0-9]+", "("]),
    "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "spaces_between_special_tokens": st.booleans(),
    "no_stop_trim": st.booleans(),
    "stream_interval": st.integers(1, 4),
    "logit_bias": st.dictionaries(st.integers(0, 383).map(str), st.floats(-5, 5), max_size=2),
    "sampling_seed": st.integers(-(2**31), 2**31 - 1),
}


@st.composite
def sampling_params(draw):
    params = {"max_new_tokens": draw(st.integers(0, 4))}
    for key in draw(st.lists(st.sampled_from(sorted(SAMPLING_PARAMS)), max_size=4, unique=True)):
        valid = VALID.get(key)
        params[key] = draw(valid | NASTY if valid is not None else NASTY)
    if draw(st.integers(0, 9)) == 0:
        params[draw(st.text(min_size=1, max_size=6))] = draw(NASTY)
    return params


@pytest.fixture(scope="module")
def sampler(model_dir, engines):
    return engines.get(model_dir("qwen3-tied"), load_format="safetensors")


@pytest.fixture(scope="module")
def known(sampler):
    return sampler.generate_ids([KNOWN_IDS], KNOWN_PARAMS, return_logprob=False)[0]["output_ids"]


def outcome(name, call):
    """Run one fuzzed call: it returns or raises a ValueError, never anything else."""
    try:
        call()
        TALLY[(name, "served")] += 1
    except EngineFaultError:
        raise
    except ValueError as e:
        TALLY[(name, type(e).__name__)] += 1


def assert_untouched(sampler, known):
    assert sampler.healthy, sampler.fault
    assert sampler.generate_ids([KNOWN_IDS], KNOWN_PARAMS, return_logprob=False)[0]["output_ids"] == known


@FUZZ
@given(
    prompts=st.lists(PROMPT, min_size=0, max_size=3) | NASTY,
    params=sampling_params() | st.lists(sampling_params(), max_size=4) | NASTY,
    return_logprob=st.booleans() | NASTY,
    start=st.none() | st.integers(-3, 10) | NASTY | st.lists(st.integers(-2, 5), max_size=4),
)
def test_fuzz_generate_ids(sampler, known, prompts, params, return_logprob, start):
    outcome(
        "generate_ids",
        lambda: sampler.generate_ids(prompts, params, return_logprob=return_logprob, logprob_start_len=start),
    )
    assert_untouched(sampler, known)


@FUZZ
@given(
    prompt=PROMPT | st.lists(PROMPT, min_size=1, max_size=3) | NASTY,
    text=st.none() | st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=3),
    params=sampling_params() | st.lists(sampling_params(), max_size=3) | NASTY,
    extra=st.dictionaries(
        st.sampled_from(
            ["return_logprob", "logprob_start_len", "top_logprobs_num", "token_ids_logprob", "rid", "stream"]
        ),
        NASTY | st.integers(-2, 400) | st.booleans() | st.lists(st.integers(-2, 400), max_size=3),
        max_size=3,
    ),
)
def test_fuzz_engine_requests(sampler, known, prompt, text, params, extra):
    """What any HTTP route hands the engine's tokenizer manager."""
    fields = dict(extra, sampling_params=params)
    fields["text" if text is not None and not isinstance(prompt, list) else "input_ids"] = (
        text if text is not None and not isinstance(prompt, list) else prompt
    )

    async def one():
        out = sampler.engine.tokenizer_manager.generate_request(request(**fields), None)
        return await out.__anext__()

    outcome("engine request", lambda: sampler._handle.run(one(), 120))
    assert_untouched(sampler, known)


@FUZZ
@given(
    texts=st.text(max_size=20) | st.lists(st.text(max_size=12), max_size=3) | NASTY,
    steps=st.integers(-1, 6) | NASTY,
    temperature=st.floats(0, 2) | NASTY,
    top_k=st.none() | st.integers(-2, 500) | NASTY,
    multi=st.integers(0, 2) | NASTY,
    seed=st.none() | st.integers(-5, 2**40) | NASTY,
    prompt_rows=st.lists(st.lists(st.integers(-2, 400), min_size=3, max_size=3), min_size=0, max_size=3),
    completion_rows=st.lists(st.lists(st.integers(-2, 400), min_size=2, max_size=2), min_size=0, max_size=3),
)
def test_fuzz_tunix_call_and_scoring(
    sampler, known, texts, steps, temperature, top_k, multi, seed, prompt_rows, completion_rows
):
    outcome(
        "__call__",
        lambda: sampler(
            texts, max_generation_steps=steps, temperature=temperature, top_k=top_k, multi_sampling=multi, seed=seed
        ),
    )
    outcome(
        "score_completions",
        lambda: sampler.score_completions(
            np.array(prompt_rows, np.int64).reshape(len(prompt_rows), -1),
            np.array(completion_rows, np.int64).reshape(len(completion_rows), -1),
        ),
    )
    assert_untouched(sampler, known)


def test_fuzz_report():
    """Prints how many fuzzed calls ran and how they ended (``pytest -s`` shows it)."""
    total = sum(TALLY.values())
    print(f"\nPython fuzz: {total} calls, each followed by a health and known-answer check")
    for (name, how), n in sorted(TALLY.items()):
        print(f"  {name:18s} {how:22s} {n}")
    if total == 0:
        pytest.skip("run with the fuzz tests of this file")
    # every fuzz test ran its examples; each one went through outcome() (served or a named error)
    assert total >= 3 * EXAMPLES, TALLY
