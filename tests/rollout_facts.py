"""What an engine's answers say about its own ids, logprobs and text, measured the same way on
unpatched upstream (tests/upstream_probe.py, mode ``rollout_facts``: a child process) and on
our patched engines (tests/test_compat.py): each count of broken answers must be above 0 there
and 0 here. Run on ``helpers.write_special_prone_case`` (special ids mid-answer)."""

from __future__ import annotations

import asyncio
from collections import Counter

import orjson

#: Prompt texts (their ids end on a character boundary, so an answer's text is the decoding of
#: its ids alone); greedy answers of the special-prone checkpoint hold special ids, and
#: characters split across tokens, for several of them.
PROMPTS = [f"{k}+{k + 1}= the {'é' * (k % 3)}" for k in range(10)]
SPECIAL_IDS = (0, 1, 2)
NEW_TOKENS = 12


def ids_of(records) -> list[int]:
    return [tid for _, tid, *_ in records]


async def _one(engine, prompt, params, **kw) -> dict:
    return await engine.async_generate(input_ids=prompt, sampling_params=params, **kw)


async def _stream(engine, prompt, params) -> list[dict]:
    gen = await engine.async_generate(input_ids=prompt, sampling_params=params, return_logprob=True, stream=True)
    return [dict(event) async for event in gen]


async def facts(engine, tokenizer) -> dict:
    """Counts of answers that break each claim ("broken_*") and of what was exercised."""
    out: Counter = Counter()
    greedy = {"max_new_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}
    for text in PROMPTS:
        prompt = tokenizer.encode(text)
        res = await _one(engine, prompt, greedy, return_logprob=True)
        ids = ids_of(res["meta_info"]["output_token_logprobs"])
        out["special_mid_answer"] += any(t in SPECIAL_IDS for t in ids[:-1])
        out["broken_ids"] += res["output_ids"] != ids

        # a stop token the answer reaches: it ends the answer and is one of its ids
        stop = {**greedy, "ignore_eos": False, "stop_token_ids": [ids[len(ids) // 2]]}
        res = await _one(engine, prompt, stop, return_logprob=True)
        out["broken_stop_token"] += res["output_ids"] != ids_of(res["meta_info"]["output_token_logprobs"])

        # streamed: ids, logprobs and text of the last (cumulative) event
        events = await _stream(engine, prompt, greedy)
        last = events[-1]
        records = last["meta_info"]["output_token_logprobs"]
        out["broken_stream_ids"] += last["output_ids"] != ids
        out["broken_stream_logprobs"] += len(records) != last["meta_info"]["completion_tokens"]
        out["broken_stream_text"] += last["text"] != tokenizer.decode(ids, skip_special_tokens=True)
        try:
            orjson.dumps(last, option=orjson.OPT_NON_STR_KEYS)  # what the streamed /generate route sends
        except TypeError:
            out["broken_stream_json"] += 1

        # one batch, two decoding options: each answer's text under its own
        both = await _one(
            engine, [prompt, prompt], [{**greedy, "skip_special_tokens": s} for s in (True, False)], return_logprob=True
        )
        for res, skip in zip(both, (True, False)):
            want = tokenizer.decode(ids_of(res["meta_info"]["output_token_logprobs"]), skip_special_tokens=skip)
            out["broken_mixed_options_text"] += res["text"] != want

        # one batch: output logprobs only, input logprobs too (a scoring request), output only
        batch = await _one(
            engine,
            [prompt, tokenizer.encode("1+1="), prompt],
            greedy,
            return_logprob=True,
            logprob_start_len=[-1, 0, -1],
        )
        for res in batch:
            out["broken_mixed_logprob_rows"] += res["output_ids"] != ids_of(res["meta_info"]["output_token_logprobs"])
    return dict(out)


async def join_after_scoring(engine) -> list[int]:
    """A scoring request (input logprobs) finishes first in a running batch of requests that
    want output logprobs only; a new request joins that batch; an earlier one finishes. Returns
    each request's number of generated ids (upstream's scheduler thread dies at the last step)."""
    tm = engine.tokenizer_manager

    def params(n):
        return {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}

    first = asyncio.ensure_future(
        engine.async_generate(
            input_ids=[[5, 6, 7], [8, 9, 10], [11, 12, 13]],
            sampling_params=[params(2), params(JOIN_TOKENS // 2), params(JOIN_TOKENS)],
            return_logprob=True,
            logprob_start_len=[0, -1, -1],
        )
    )
    while len(tm.rid_to_state) != 2:  # the scoring request has its answer
        await asyncio.sleep(JOIN_POLL_S)
    joined = await engine.async_generate(
        input_ids=[14, 15, 16], sampling_params=params(JOIN_TOKENS), return_logprob=True
    )
    return [len(r["output_ids"]) for r in await first] + [len(joined["output_ids"])]


#: How often ``join_after_scoring`` looks whether the scoring request has finished (s).
JOIN_POLL_S = 0.001
#: Tokens of the requests that outlive the scoring request (the joining one arrives while the
#: first of them still has about JOIN_TOKENS / 2 decode steps to go).
JOIN_TOKENS = 80
