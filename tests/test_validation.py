"""Request validation: every malformed input is refused before it reaches the engine, through
every Python entry point, with an error naming the field and the allowed range; the engine
keeps serving and a known request keeps its known answer. The inputs are those that crashed an
engine thread, killed the process or were served as garbage on unvalidated sglang-jax 0.1.0rc0
(see ``sampler.serve.faults.POISON_REQUESTS`` and tests/test_compat.py for the unvalidated side)."""

import inspect
import math

import numpy as np
import pytest

from sampler.compat import UPSTREAM_CRASHES
from sampler.engine.validation import SAMPLING_PARAMS, RequestLimits, RequestValidator
from sampler.errors import InvalidRequestError
from sampler.serve.faults import POISON_REQUESTS
from tests import helpers

KNOWN_IDS = [5, 6, 7]
KNOWN_PARAMS = {"max_new_tokens": 4, "temperature": 0.0}
#: The limits of the pooled tiny engine (context 128): checked against the engine below.
LIMITS = RequestLimits(vocab_size=384, context_len=128, max_req_len=127, max_req_input_len=122, max_batch_size=64)


def request(**fields):
    from sgl_jax.srt.managers.io_struct import GenerateReqInput

    fields.setdefault("sampling_params", dict(KNOWN_PARAMS))
    return GenerateReqInput(**fields)


def sp(**params):
    return {**KNOWN_PARAMS, **params}


#: (request fields, the field the error must name, a phrase of the allowed range)
BAD_REQUESTS = [
    # token ids: negative (detokenizer crash / process kill), beyond the vocabulary (garbage),
    # beyond int32 (scheduler crash), not integers
    (dict(input_ids=[-5, 3]), "input_ids[0]", "[0, 384)"),
    (dict(input_ids=[5, 6, 7, 8, 9, -1]), "input_ids[5]", "[0, 384)"),
    (dict(input_ids=[384]), "input_ids[0]", "[0, 384)"),
    (dict(input_ids=[10**9]), "input_ids[0]", "[0, 384)"),
    (dict(input_ids=[2**31]), "input_ids[0]", "[0, 384)"),
    (dict(input_ids=[2**64]), "input_ids[0]", "[0, 384)"),
    (dict(input_ids=[5, None]), "input_ids[1]", "token id"),
    (dict(input_ids=[5, 5.0]), "input_ids[1]", "token id"),
    (dict(input_ids=[5, True]), "input_ids[1]", "token id"),
    (dict(input_ids=[[5, 6], [7, "8"]]), "input_ids[1][1]", "token id"),
    (dict(input_ids=[[[5, 6]]]), "input_ids[0][0]", "token id"),
    (dict(input_ids=[[5], 6]), "input_ids[1]", "list of token ids"),
    (dict(input_ids=[]), "input_ids", "non-empty"),
    (dict(input_ids=[[5, 6], []]), "input_ids[1]", "non-empty"),
    (dict(input_ids="567"), "input_ids", "list"),
    # lengths: the scheduler's prompt limit (121 here) and the request limit (127)
    (dict(input_ids=[5] * 122), "input_ids", "1 to 121 tokens"),
    (dict(input_ids=[5] * 128), "input_ids", "1 to 121 tokens"),
    (dict(input_ids=[5, 6, 7], sampling_params=sp(max_new_tokens=125)), "sampling_params.max_new_tokens", "[0, 124]"),
    (dict(input_ids=[5, 6, 7], sampling_params=sp(max_new_tokens=10**9)), "max_new_tokens", "[0, 124]"),
    (dict(input_ids=[5, 6, 7], sampling_params=sp(max_new_tokens=-1)), "max_new_tokens", ">= 0"),
    (dict(input_ids=[5, 6, 7], sampling_params=sp(max_new_tokens=4.5)), "max_new_tokens", "integer"),
    (dict(input_ids=[5, 6, 7], sampling_params=sp(max_new_tokens="4")), "max_new_tokens", "integer"),
    (dict(input_ids=[5, 6, 7], sampling_params=sp(max_new_tokens=math.nan)), "max_new_tokens", "integer"),
    (dict(input_ids=[5, 6, 7], sampling_params=sp(min_new_tokens=5)), "min_new_tokens", "[0, 4]"),
    # sampling parameters: out of range, NaN / inf, beyond int32, wrong types, unknown keys
    (dict(input_ids=[5], sampling_params=sp(temperature=-1)), "temperature", ">= 0"),
    (dict(input_ids=[5], sampling_params=sp(temperature=math.nan)), "temperature", "finite"),
    (dict(input_ids=[5], sampling_params=sp(temperature=math.inf)), "temperature", "finite"),
    (dict(input_ids=[5], sampling_params=sp(temperature="0.5")), "temperature", "finite number"),
    (dict(input_ids=[5], sampling_params=sp(top_p=0)), "top_p", "(0, 1]"),
    (dict(input_ids=[5], sampling_params=sp(top_p=1.5)), "top_p", "(0, 1]"),
    (dict(input_ids=[5], sampling_params=sp(top_p=math.nan)), "top_p", "(0, 1]"),
    (dict(input_ids=[5], sampling_params=sp(top_k=0)), "top_k", "or -1"),
    (dict(input_ids=[5], sampling_params=sp(top_k=-2)), "top_k", "or -1"),
    (dict(input_ids=[5], sampling_params=sp(top_k=2**31)), "top_k", "1073741824"),
    (dict(input_ids=[5], sampling_params=sp(top_k=math.inf)), "top_k", "integer"),
    (dict(input_ids=[5], sampling_params=sp(top_k=4.5)), "top_k", "integer"),
    (dict(input_ids=[5], sampling_params=sp(min_p=2)), "min_p", "[0, 1]"),
    (dict(input_ids=[5], sampling_params=sp(frequency_penalty=3)), "frequency_penalty", "[-2, 2]"),
    (dict(input_ids=[5], sampling_params=sp(presence_penalty=math.nan)), "presence_penalty", "[-2, 2]"),
    (dict(input_ids=[5], sampling_params=sp(repetition_penalty=-1)), "repetition_penalty", "[0, 2]"),
    (dict(input_ids=[5], sampling_params=sp(n=0)), "sampling_params.n", "[1, 64]"),
    (dict(input_ids=[5], sampling_params=sp(n=2.5)), "sampling_params.n", "integer"),
    (dict(input_ids=[5], sampling_params=sp(n=65)), "sampling_params.n", "[1, 64]"),
    (dict(input_ids=[5], sampling_params=sp(sampling_seed=2**31)), "sampling_seed", "2147483647"),
    (dict(input_ids=[5], sampling_params=sp(sampling_seed="abc")), "sampling_seed", "integer"),
    (dict(input_ids=[5], sampling_params=sp(stop="")), "stop", "non-empty string"),
    (dict(input_ids=[5], sampling_params=sp(stop=123)), "stop", "non-empty string"),
    (dict(input_ids=[5], sampling_params=sp(stop=[None])), "stop", "non-empty string"),
    (dict(input_ids=[5], sampling_params=sp(stop_token_ids=[-1])), "stop_token_ids[0]", "[0, 384)"),
    (dict(input_ids=[5], sampling_params=sp(stop_token_ids=5)), "stop_token_ids", "list of token ids"),
    (dict(input_ids=[5], sampling_params=sp(stop_token_ids="abc")), "stop_token_ids", "list of token ids"),
    (dict(input_ids=[5], sampling_params=sp(skip_special_tokens="x")), "skip_special_tokens", "true or false"),
    (dict(input_ids=[5], sampling_params=sp(ignore_eos="no")), "ignore_eos", "true or false"),
    (dict(input_ids=[5], sampling_params=sp(stream_interval=0)), "stream_interval", ">= 1"),
    (dict(input_ids=[5], sampling_params=sp(logit_bias={"400": 1.0})), "logit_bias", "[0, 384)"),
    (dict(input_ids=[5], sampling_params=sp(logit_bias={"5": math.nan})), "logit_bias", "finite"),
    (dict(input_ids=[5], sampling_params=sp(regex=5)), "regex", "a non-empty string"),
    (dict(input_ids=[5], sampling_params=sp(structural_tag="")), "structural_tag", "non-empty"),
    (dict(input_ids=[5], sampling_params=sp(json_schema=[1])), "json_schema", "non-empty string or object"),
    (dict(input_ids=[5], sampling_params=sp(regex="a", ebnf="b")), "ebnf", "regex is set already"),
    (dict(input_ids=[5], sampling_params=sp(foo=1)), "sampling_params.foo", "known parameters"),
    (dict(input_ids=[5], sampling_params="abc"), "sampling_params", "object"),
    (dict(input_ids=[5], sampling_params=[sp()]), "sampling_params", "one object for a single prompt"),
    (dict(input_ids=[[5], [6]], sampling_params=[sp()]), "sampling_params", "a list of 2"),
    (dict(input_ids=[[5], [6]], sampling_params=[sp(), sp(), sp()]), "sampling_params", "a list of 2"),
    (dict(input_ids=[[5], [6]], sampling_params=[sp(n=2), sp()]), "sampling_params.n", "the same n"),
    (dict(input_ids=[[5]] * 33, sampling_params=sp(n=2)), "request", "at most 64 prompts x n"),
    # logprob options: these crash the scheduler or kill the process upstream
    (dict(input_ids=[5, 6], return_logprob=True, token_ids_logprob=[-1]), "token_ids_logprob[0]", "[0, 384)"),
    (dict(input_ids=[5, 6], return_logprob=True, token_ids_logprob=[400]), "token_ids_logprob[0]", "[0, 384)"),
    (dict(input_ids=[5, 6], return_logprob=True, token_ids_logprob="ab"), "token_ids_logprob", "list"),
    (dict(input_ids=[5, 6], return_logprob=True, top_logprobs_num=385), "top_logprobs_num", "[0, 384]"),
    (dict(input_ids=[5, 6], return_logprob=True, top_logprobs_num=2.5), "top_logprobs_num", "integer"),
    (dict(input_ids=[5, 6], return_logprob=True, top_logprobs_num=-1), "top_logprobs_num", "[0, 384]"),
    (dict(input_ids=[5, 6], return_logprob=True, logprob_start_len=-2), "logprob_start_len", "[0, 1] or -1"),
    (dict(input_ids=[5, 6], return_logprob=True, logprob_start_len=2), "logprob_start_len", "[0, 1] or -1"),
    (dict(input_ids=[5, 6], return_logprob=True, logprob_start_len=1.5), "logprob_start_len", "integer"),
    (dict(input_ids=[5, 6], return_logprob=True, logprob_start_len="0"), "logprob_start_len", "integer"),
    (dict(input_ids=[5, 6], return_logprob="yes"), "return_logprob", "true or false"),
    (dict(input_ids=[[5], [6]], return_logprob=[True]), "return_logprob", "a list of 2"),
    (dict(input_ids=[[5], [6]], logprob_start_len=[-1, -1, -1]), "logprob_start_len", "a list of 2"),
    # inputs this engine does not take; request ids
    (dict(input_ids=[5], input_embeds=[[0.5, 0.5]]), "input_embeds", "unset"),
    (dict(input_ids=[5], image_data="x.png"), "image_data", "unset"),
    (dict(text="hi", input_ids=[5]), "text/input_ids", "exactly one"),
    (dict(), "text/input_ids", "exactly one"),
    (dict(text=123), "text", "a string"),
    (dict(text=[]), "text", "a string"),
    (dict(text=["a", None]), "text", "a string"),
    (dict(input_ids=[[5], [6]], rid=["a", "a"]), "rid", "distinct"),
    (dict(input_ids=[[5], [6]], rid=["a"]), "rid", "a list of 2"),
    (dict(input_ids=[5], rid=5), "rid", "non-empty string"),
    (dict(input_ids=[5], stream="yes"), "stream", "true or false"),
]


@pytest.mark.parametrize("fields, field, allowed", BAD_REQUESTS, ids=lambda x: repr(x)[:60])
def test_bad_requests_are_refused_with_the_field_and_range(fields, field, allowed):
    validator = RequestValidator(LIMITS)
    with pytest.raises(InvalidRequestError) as err:
        validator.check(request(**fields))
    assert err.value.field.startswith(field) or field in err.value.field, str(err.value)
    assert allowed in str(err.value), str(err.value)
    assert isinstance(err.value, ValueError)


GOOD_REQUESTS = [
    dict(input_ids=[5, 6, 7]),
    dict(input_ids=[[5, 6, 7], [0, 383]]),
    dict(input_ids=np.array([5, 6, 7])),
    dict(input_ids=[5] * 121, sampling_params=sp(max_new_tokens=6)),
    dict(input_ids=[5, 6, 7], sampling_params=sp(max_new_tokens=124, min_new_tokens=124)),
    dict(input_ids=[5, 6, 7], sampling_params=sp(max_new_tokens=None)),
    dict(input_ids=[5, 6, 7], sampling_params={}),
    dict(input_ids=[5, 6, 7], sampling_params=None),
    dict(input_ids=[5], sampling_params=sp(temperature=1e9, top_p=1, top_k=-1, min_p=0, n=64, sampling_seed=-(2**31))),
    dict(input_ids=[5], sampling_params=sp(top_k=2**30, stop=["x", "y"], stop_token_ids=[1], logit_bias={"5": 1.0})),
    dict(input_ids=[5], sampling_params=sp(regex="[0-9]+", ignore_eos=True, skip_special_tokens=False)),
    dict(input_ids=[[5], [6]], sampling_params=[sp(), sp(temperature=1.0)]),
    dict(input_ids=[5, 6], return_logprob=True, logprob_start_len=0, top_logprobs_num=384, token_ids_logprob=[0, 383]),
    dict(input_ids=[[5, 6], [7]], return_logprob=[True, False], logprob_start_len=[1, -1]),
    dict(input_ids=[[5, 6], [7]], token_ids_logprob=[[1, 2], None]),
    dict(input_ids=[[5], [6]], rid=["a", "b"]),
]


@pytest.mark.parametrize("fields", GOOD_REQUESTS, ids=lambda x: repr(x)[:60])
def test_good_requests_pass(fields):
    RequestValidator(LIMITS).check(request(**fields))


def test_sampling_table_covers_upstreams_parameters():
    """Every parameter sglang-jax's SamplingParams takes has a check here, and no other."""
    from sgl_jax.srt.sampling.sampling_params import SamplingParams

    upstream = set(inspect.signature(SamplingParams.__init__).parameters) - {"self"}
    assert upstream == set(SAMPLING_PARAMS), upstream ^ set(SAMPLING_PARAMS)


def test_rid_in_flight_is_refused():
    with pytest.raises(InvalidRequestError, match="no request in flight"):
        RequestValidator(LIMITS).check(request(input_ids=[5], rid="busy"), in_flight={"busy": object()})


# ---------------------------------------------------------------------------- real engine


@pytest.fixture(scope="module")
def sampler(model_dir, engines):
    return engines.get(model_dir("qwen3-tied"), load_format="safetensors")


@pytest.fixture(scope="module")
def known(sampler):
    return sampler.generate_ids([KNOWN_IDS], KNOWN_PARAMS, return_logprob=False)[0]["output_ids"]


def send(sampler, **fields):
    """A request straight to the engine's tokenizer manager, as every HTTP route sends it."""

    async def one():
        return await sampler.engine.tokenizer_manager.generate_request(request(**fields), None).__anext__()

    return sampler._handle.run(one(), 120)


def assert_untouched(sampler, known):
    assert sampler.healthy
    assert sampler.generate_ids([KNOWN_IDS], KNOWN_PARAMS, return_logprob=False)[0]["output_ids"] == known


@pytest.mark.engine
def test_limits_are_read_from_the_engine(sampler):
    limits = sampler.request_limits
    assert (limits.vocab_size, limits.context_len, limits.max_req_len, limits.max_req_input_len) == (
        LIMITS.vocab_size,
        LIMITS.context_len,
        LIMITS.max_req_len,
        LIMITS.max_req_input_len,
    )


@pytest.mark.engine
@pytest.mark.parametrize("thread", sorted(POISON_REQUESTS))
def test_inputs_that_crash_upstream_are_refused_through_every_python_entry(sampler, known, thread):
    """The poison requests (each crashes an engine thread or kills the process unvalidated) are
    refused through generate_ids and raw engine calls (the route the HTTP server takes)."""
    fields = POISON_REQUESTS[thread]
    with pytest.raises(InvalidRequestError):
        send(sampler, **fields)
    with pytest.raises(InvalidRequestError):
        sampler._handle.run(sampler.engine.async_generate(**fields, sampling_params=KNOWN_PARAMS), 120)
    if "token_ids_logprob" not in fields:
        with pytest.raises(InvalidRequestError, match=r"\[0, 384\)"):
            sampler.generate_ids([fields["input_ids"]], KNOWN_PARAMS)
    assert_untouched(sampler, known)


@pytest.mark.engine
def test_every_bad_request_is_refused_by_the_engine_itself(sampler, known):
    """The table above, sent straight to the engine (as any route does): refused, nothing
    served, and the known answer holds after all of them."""
    refused = 0
    for fields, field, _ in BAD_REQUESTS:
        if field == "request" or (isinstance(fields.get("sampling_params"), dict) and "n" in fields["sampling_params"]):
            continue  # the batch cap of LIMITS is not the pooled engine's (unbounded)
        with pytest.raises(InvalidRequestError):
            send(sampler, **fields)
        refused += 1
    assert refused > 60
    assert_untouched(sampler, known)


@pytest.mark.engine
def test_a_bad_item_sends_no_item_of_its_batch(sampler, known):
    """Upstream sends a batch item by item: a bad item k left 0..k-1 running. Checked with the
    scheduler parked, so anything sent would still be in the tokenizer manager's table."""
    tm = sampler.engine.tokenizer_manager
    assert sampler._handle._park.park(60)
    try:
        for params in (
            [KNOWN_PARAMS, KNOWN_PARAMS, {**KNOWN_PARAMS, "temperature": -1}],  # refused by upstream too
            [KNOWN_PARAMS, KNOWN_PARAMS, {**KNOWN_PARAMS, "max_new_tokens": 125}],
        ):
            with pytest.raises(InvalidRequestError):
                sampler.generate_ids([KNOWN_IDS, KNOWN_IDS, KNOWN_IDS], params)
            assert len(tm.rid_to_state) == 0
        with pytest.raises(InvalidRequestError, match=r"input_ids\[2\]"):
            sampler.generate_ids([KNOWN_IDS, KNOWN_IDS, [5] * 122], KNOWN_PARAMS)
        assert len(tm.rid_to_state) == 0
    finally:
        sampler._handle._park.release()
    assert_untouched(sampler, known)


@pytest.mark.engine
def test_upstreams_own_clear_errors_still_reach_every_caller(sampler, known):
    """What upstream already refused clearly stays a ValueError through generate_ids, the Tunix
    call and raw engine calls (now named by the validator, before upstream sees it)."""
    for params, match in (
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": 4, "temperature": -1.0}, "temperature"),
        ({"max_new_tokens": 4, "top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 4, "top_k": 0, "temperature": 1.0}, "top_k"),
        ({"max_new_tokens": 200}, "max_new_tokens"),
    ):
        with pytest.raises(ValueError, match=match):
            sampler.generate_ids([KNOWN_IDS], params)
        with pytest.raises(ValueError, match=match):
            sampler._handle.run(sampler.engine.async_generate(input_ids=KNOWN_IDS, sampling_params=params), 120)
    with pytest.raises(ValueError, match="1 to 121 tokens"):
        sampler.generate_ids([[5] * 200], KNOWN_PARAMS)
    with pytest.raises(ValueError, match="max_generation_steps"):
        sampler(["1+1="], max_generation_steps=500)
    with pytest.raises(ValueError, match="temperature"):
        sampler(["1+1="], max_generation_steps=4, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        sampler(["1+1="], max_generation_steps=4, top_p=2.0)
    assert_untouched(sampler, known)


@pytest.mark.engine
def test_python_front_ends_refuse_what_they_used_to_coerce(sampler, known):
    bad_prompts = (
        ([[5.7, 6]], r"prompts\[0\]\[0\]"),
        ([["5", 6]], r"prompts\[0\]\[0\]"),
        ([[True, 6]], r"prompts\[0\]\[0\]"),
        ("567", "prompts"),
        ([], "prompts"),
        ([[]], r"prompts\[0\]"),
        ([np.array([5.0, 6.0])], r"prompts\[0\]"),
        ([[5, 6], [7]], "sampling_params"),  # two prompts, three parameter sets
    )
    for prompts, match in bad_prompts:
        with pytest.raises(InvalidRequestError, match=match):
            sampler.generate_ids(prompts, [KNOWN_PARAMS] * 3 if len(prompts) == 2 else KNOWN_PARAMS)
    out = sampler.generate_ids([np.array(KNOWN_IDS, np.int32), np.array(KNOWN_IDS, np.uint16)], KNOWN_PARAMS)
    assert [o["output_ids"] for o in out] == [known, known]

    for kwargs, match in (
        (dict(input_strings=[""]), r"input_strings\[0\]"),
        (dict(input_strings=[None]), r"input_strings\[0\]"),
        (dict(input_strings=[]), "input_strings"),
        (dict(input_strings=["1+1="], multi_sampling=0), "multi_sampling"),
        (dict(input_strings=["1+1="], max_generation_steps=2.5), "max_generation_steps"),
        (dict(input_strings=["1+1="], top_k=2**31), "top_k"),
        (dict(input_strings=["1+1="], foo=1), "foo"),
    ):
        kwargs.setdefault("max_generation_steps", 4)
        with pytest.raises(InvalidRequestError, match=match):
            sampler(**kwargs)

    prompt = np.array([[0, 5, 6]])
    for completion, match in (
        (np.array([[7, -1, 0]]), r"completion_tokens\[0\]\[1\]"),
        (np.array([[7, 400, 0]]), r"completion_tokens\[0\]\[1\]"),
        (np.array([[7.0, 7.0, 0.0]]), "completion_tokens"),
        (np.array([[7, 7, 0], [7, 7, 0]]), "completion_tokens"),  # two rows for one prompt
    ):
        with pytest.raises(InvalidRequestError, match=match):
            sampler.score_completions(prompt, completion)
    with pytest.raises(InvalidRequestError, match=r"input_ids\[0\]\[0\]"):
        sampler.score_completions(np.array([[0, -3, 6]]), np.array([[7, 7, 0]]))
    assert_untouched(sampler, known)


@pytest.mark.engine
def test_score_completions_and_greedy_unchanged(sampler, known):
    """Valid calls behave as before: scoring equals the engine's own prompt logprobs."""
    scores = sampler.score_completions(np.array([[0, 5, 6, 7]]), np.array([known + [0]]))
    out = sampler.generate_ids([KNOWN_IDS], KNOWN_PARAMS, return_logprob=True)[0]
    expected = [lp for lp, *_ in out["meta_info"]["output_token_logprobs"]]
    np.testing.assert_allclose(scores[0, :4], expected, atol=1e-2)
    assert helpers.raw_generate(sampler, KNOWN_IDS, 4) == known


@pytest.mark.parametrize("name", sorted(UPSTREAM_CRASHES))
def test_every_known_upstream_crash_is_refused(name):
    crash = UPSTREAM_CRASHES[name]
    with pytest.raises(InvalidRequestError) as err:
        RequestValidator(LIMITS).check(request(**crash.request))
    assert err.value.field == crash.refused_as, str(err.value)


def test_tp_over_the_devices_of_the_process_is_refused_before_the_engine_starts(model_dir):
    """Upstream fails such an engine in its scheduler and SIGQUITs the whole process."""
    import jax

    from sampler import SamplerConfig, SglangJaxSampler

    config = SamplerConfig(model_path=str(model_dir("qwen3-tied")), tp_size=2 * jax.device_count())
    with pytest.raises(ValueError, match="tp_size=.*devices"):
        SglangJaxSampler(config=config)
