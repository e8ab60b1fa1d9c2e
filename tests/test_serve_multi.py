"""Several engines in one ``python -m sampler.serve`` process, over real loopback HTTP.

Two child servers on simulated CPU devices, started once for the module:

- ``--data-parallel-size 2``: one port, requests routed to the least busy engine;
- ``--num-servers 4 --base-port P``: one port per engine (the four-server set-up).

What they serve is checked against in-process engines that loaded the same checkpoints with
sglang-jax's own safetensors loader, and against fingerprints of the checkpoints' tensors.
"""

import json
import threading
import time
import urllib.request

import pytest

from converters import fingerprint_params
from sampler.serve.admin_client import main as admin_main
from sampler.serve.cli import parse_args
from sampler.serve.routing import EngineRouter, request_cost
from tests import helpers
from tests.http_helpers import ADMIN_TOKEN, READY_TIMEOUT_S, ServerProcess, call, error_message, free_ports

pytestmark = pytest.mark.engine

PROMPT_IDS = [5, 17, 42, 99, 7]
NEW_TOKENS = 8
LONG_IDS, LONG_TOKENS = [3, 1, 4, 1, 5], 300
#: Reloads keep coming until every client has seen both checkpoints (and at least this many ran).
MIN_RELOADS, MAX_RELOADS = 4, 40
ENGINE_HEADER = "x-sampler-engine"


def generate_body(ids=PROMPT_IDS, n=NEW_TOKENS, **extra):
    return {"input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": 0.0, **extra}}


class MultiServer(ServerProcess):
    """A ``python -m sampler.serve`` child; ``urls`` lists every port it serves."""

    def __init__(self, model_path, log, *extra, base_port=None, servers=1):
        super().__init__(model_path, log, "--max-running-requests", "4", *extra)
        if base_port is None:
            self.urls = [self.url]
        else:
            self.urls = [f"http://127.0.0.1:{base_port + i}" for i in range(servers)]
            self.url = self.urls[0]

    def status(self) -> dict:
        code, body, _ = call(self.url + "/admin/reload_status", token=ADMIN_TOKEN)
        assert code == 200, body
        return body

    def checksum(self) -> dict:
        code, body, _ = call(self.url + "/admin/weights_checksum", token=ADMIN_TOKEN)
        assert code == 200, body
        return body

    def reload(self, path):
        return call(self.url + "/admin/reload_weights", {"model_path": str(path)}, token=ADMIN_TOKEN)


@pytest.fixture(scope="module")
def ckpts(model_dir):
    a, b = model_dir("qwen3-tied", 0), model_dir("qwen3-tied", 1)
    return {
        "a": a,
        "b": b,
        "llama": model_dir("llama-tied", 0),
        "fp_a": fingerprint_params(helpers.hf_tensors(a), a),
        "fp_b": fingerprint_params(helpers.hf_tensors(b), b),
    }


@pytest.fixture(scope="module")
def dp(ckpts, tmp_path_factory):
    log = tmp_path_factory.mktemp("dp") / "server.log"
    srv = MultiServer(ckpts["a"], log, "--data-parallel-size", "2", "--enable-fault-injection")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def per_port(ckpts, tmp_path_factory):
    base = free_ports(4)
    log = tmp_path_factory.mktemp("ports") / "server.log"
    srv = MultiServer(
        ckpts["a"],
        log,
        "--num-servers",
        "4",
        "--base-port",
        str(base),
        "--enable-weight-perturb",
        base_port=base,
        servers=4,
    )
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def reference(ckpts, engines):
    """Greedy tokens from in-process engines loaded by sglang-jax's own loader."""
    out = {}
    for name in ("a", "b"):
        ref = engines.get(ckpts[name], load_format="safetensors")
        params = {"max_new_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}
        out[name, "short"] = ref.generate_ids([PROMPT_IDS], params, return_logprob=False)[0]["output_ids"]
        engines.drop(ckpts[name], load_format="safetensors")
    assert out["a", "short"] != out["b", "short"]
    return out


def tokens(url, ids=PROMPT_IDS, n=NEW_TOKENS, field="output_ids"):
    code, body, headers = call(url + "/generate", generate_body(ids, n, ignore_eos=True))
    assert code == 200, body
    return body[field], int(headers[ENGINE_HEADER])


def stream_completion(url, ids, n) -> tuple[int, str, dict]:
    """A streamed /generate: (status, its text, lower-cased headers)."""
    body = {**generate_body(ids, n, ignore_eos=True), "stream": True}
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            events = [json.loads(line[6:]) for line in r.read().decode().splitlines() if line.startswith("data: {")]
            return r.status, events[-1]["text"], {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, "", {k.lower(): v for k, v in e.headers.items()}


def from_every_engine(srv, ids=PROMPT_IDS, n=NEW_TOKENS, field="output_ids") -> set:
    """{(answer, engine)} of sequential requests until every engine answered: idle engines
    take requests by fewest served so far, so the gap between them plus one round does it."""
    routed = [e["routed"] for e in srv.status()["engines"]]
    seen = set()
    for _ in range(max(routed) - min(routed) + len(routed)):
        answer, engine = tokens(srv.url, ids, n, field)
        seen.add((tuple(answer) if isinstance(answer, list) else answer, engine))
    return seen


def wait_for(predicate, what: str):
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


# ---------------------------------------------------------------------------- routing policy
def test_router_sends_work_to_the_least_busy_engine():
    router = EngineRouter(2)
    long, short = request_cost("/generate", json.dumps(generate_body(LONG_IDS, LONG_TOKENS)).encode()), 13
    assert long == len(LONG_IDS) + LONG_TOKENS
    assert request_cost("/v1/completions", b'{"prompt": [1, 2], "max_tokens": 3, "n": 2}') == 10
    assert request_cost("/v1/models", b"") == 0
    first = router.choose()
    router.begin(first, long)
    picks = []
    for _ in range(3):  # round-robin would send the second one back to the busy engine
        picks.append(router.choose())
        router.begin(picks[-1], short)
    assert first == 0 and picks == [1, 1, 1]
    router.end(first, long)
    assert router.choose() == 0
    for i in picks:
        router.end(i, short)
    assert [router.choose() for _ in range(1)] == [0]  # idle: fewest served so far, then index


# ---------------------------------------------------------------------------- one port, two engines
def test_one_port_answers_as_one_server_from_every_engine(dp, ckpts, reference):
    code, body, _ = dp.call("/health")
    assert code == 200 and body["status"] == "ok", body
    code, body, _ = dp.call("/v1/models")
    assert code == 200 and len(body["data"]) == 1, body
    served = [tokens(dp.url) for _ in range(4)]
    assert {engine for _, engine in served} == {0, 1}, served  # idle engines take turns
    assert all(out == reference["a", "short"] for out, _ in served), served
    status = dp.status()
    assert [e["devices"] for e in status["engines"]] == [[0], [1]]
    assert all(e["routed"] >= 2 for e in status["engines"]), status["engines"]
    checksum = dp.checksum()
    assert checksum["agree"] and [e["checksum"] for e in checksum["engines"]] == [ckpts["fp_a"]] * 2

    completion = {"model": "m", "prompt": PROMPT_IDS, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    texts = set()
    for stream in (False, True, False):
        code, body, headers = dp.call("/v1/completions", {**completion, "stream": stream})
        assert code == 200, body
        if stream:
            events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: {")]
            texts.add("".join(e["choices"][0]["text"] for e in events))
        else:
            texts.add(body["choices"][0]["text"])
    assert len(texts) == 1, texts  # both engines, streamed or not, say the same
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    answers = {dp.call("/v1/chat/completions", chat)[1]["choices"][0]["message"]["content"] for _ in range(2)}
    assert len(answers) == 1, answers


def test_bad_input_gets_400_naming_the_field_and_engines_keep_serving(dp, reference):
    cases = [
        ("/generate", {"input_ids": [-5, 3]}, "input_ids[0]"),
        ("/v1/completions", {"model": "m", "prompt": "x", "n": 0}, "n=0"),
        ("/v1/chat/completions", {"model": "m", "messages": []}, "messages"),
    ]
    for path, body, field in cases:
        code, answer, _ = dp.call(path, body)
        assert code == 400 and field in error_message(answer), (path, answer)
    code, answer, _ = call(dp.url + "/admin/reload_weights", {"load_format": "safetensors"}, token=ADMIN_TOKEN)
    assert code == 400 and "model_path" in error_message(answer), answer
    code, answer, _ = call(dp.url + "/admin/reload_status")
    assert code == 401, answer
    assert {tuple(tokens(dp.url)[0]) for _ in range(2)} == {tuple(reference["a", "short"])}


def hold_long_stream(dp):
    """A long streamed request on an engine, held in flight by pausing every engine (upstream's
    /pause_generation, sent to all of them) once it runs: (thread, result)."""
    for _ in range(5):
        result: dict = {}
        thread = threading.Thread(
            target=lambda r=result: r.setdefault("long", stream_completion(dp.url, LONG_IDS, LONG_TOKENS))
        )
        thread.start()
        wait_for(lambda: dp.status()["engine_requests"] >= 1, "the long request never reached an engine")
        code, body, _ = dp.call("/pause_generation", {"mode": "in_place"}, token=ADMIN_TOKEN)
        assert code == 200, body
        assert all(e["paused"] for e in dp.status()["engines"]), "an engine-control route missed an engine"
        if "long" not in result and dp.status()["engine_requests"] >= 1:
            return thread, result
        dp.call("/continue_generation", {}, token=ADMIN_TOKEN)  # it finished first: again
        thread.join(300)
    raise AssertionError("the long request finished before the pause 5 times")


def test_busy_engine_gets_no_new_work_and_a_stream_finishes_on_old_weights_across_a_reload(dp, ckpts, reference):
    assert dp.checksum()["checksum"] == ckpts["fp_a"]
    # the long answer of each engine (longer than the reference engines' context)
    old_long = from_every_engine(dp, LONG_IDS, LONG_TOKENS, field="text")
    assert len({text for text, _ in old_long}) == 1 and {e for _, e in old_long} == {0, 1}, old_long
    long_thread, result = hold_long_stream(dp)
    busy = next(e["index"] for e in dp.status()["engines"] if e["outstanding_requests"])
    # short requests go to the other engine, however many (each costs less than the long one)
    shorts = [threading.Thread(target=lambda i=i: result.setdefault(i, tokens(dp.url))) for i in range(3)]
    for t in shorts:
        t.start()
    wait_for(lambda: dp.status()["in_flight"] == 4, "the short requests never reached the router")
    loads = [e["outstanding_requests"] for e in dp.status()["engines"]]
    assert loads[busy] == 1 and loads[1 - busy] == 3, loads

    reload = threading.Thread(target=lambda: result.setdefault("reload", dp.reload(ckpts["b"])))
    reload.start()
    wait_for(lambda: not dp.status()["accepting"], "the reload never started gating")
    code, body, headers = dp.call("/generate", generate_body())
    assert code == 503 and int(headers["retry-after"]) >= 1, body
    code, body, headers = dp.call("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 2, "stream": True})
    assert code == 503 and "retry-after" in headers, body
    code, body, _ = dp.reload(ckpts["a"])
    assert code == 409, body

    code, body, _ = dp.call("/continue_generation", {}, token=ADMIN_TOKEN)
    assert code == 200, body
    for t in [long_thread, *shorts, reload]:
        t.join(300)
    code, streamed, headers = result["long"]
    assert code == 200 and int(headers[ENGINE_HEADER]) == busy
    assert (streamed, busy) in old_long, "the stream in flight saw the new weights"
    # (each on one set of weights: the old, or the new if the pause let it wait out the swap)
    assert all(result[i][1] == 1 - busy for i in range(3)), result
    assert all(result[i][0] in (reference["a", "short"], reference["b", "short"]) for i in range(3)), result
    code, body, _ = result["reload"]
    assert code == 200 and body["ok"], body
    checksum = dp.checksum()
    assert checksum["agree"] and checksum["checksum"] == ckpts["fp_b"], checksum
    assert {tuple(tokens(dp.url)[0]) for _ in range(2)} == {tuple(reference["b", "short"])}
    assert not any(e["paused"] for e in dp.status()["engines"])


def test_reload_under_load_never_mixes_weights(dp, ckpts, reference):
    """Clients keep generating while reloads alternate the checkpoints: every answer is one
    checkpoint's (never a mix) and after every reload every engine serves the same weights."""
    expected = {tuple(reference["a", "short"]): "a", tuple(reference["b", "short"]): "b"}
    stop = threading.Event()
    seen: list[list[tuple[str, int]]] = [[] for _ in range(3)]
    errors: list = []

    def client(mine):
        while not stop.is_set():
            code, body, headers = dp.call("/generate", generate_body(ignore_eos=True))
            if code == 503:
                if "retry-after" not in headers:
                    errors.append(body)
            elif code != 200:
                errors.append((code, body))
            else:
                mine.append(
                    (
                        expected.get(tuple(body["output_ids"]), f"mixed {body['output_ids']}"),
                        int(headers[ENGINE_HEADER]),
                    )
                )

    threads = [threading.Thread(target=client, args=(mine,)) for mine in seen]
    for t in threads:
        t.start()
    reloads, name = 0, "b"
    answers = lambda: {a for mine in seen for a in mine}  # noqa: E731
    try:
        while reloads < MAX_RELOADS and (
            reloads < MIN_RELOADS or not {(c, e) for c in "ab" for e in (0, 1)} <= answers()
        ):
            name = "a" if reloads % 2 else "b"
            code, body, _ = dp.reload(ckpts[name])
            assert code == 200, body
            reloads += 1
            checksum = dp.checksum()
            assert checksum["agree"] and checksum["checksum"] == ckpts["fp_" + name], checksum
            assert len({e["version"] for e in checksum["engines"]}) == 1, checksum
            time.sleep(0.05)  # pacing only: the loop ends on what the clients saw
    finally:
        stop.set()
        for t in threads:
            t.join(300)
    assert not errors, errors
    assert all(c in ("a", "b") for c, _ in answers()), answers()
    assert {(c, e) for c in "ab" for e in (0, 1)} <= answers(), (reloads, answers())
    code, body, _ = dp.reload(ckpts["a"])
    assert code == 200, body


def test_bad_reload_changes_no_engine(dp, ckpts, tmp_path):
    before = dp.checksum()
    code, body, _ = dp.reload(tmp_path / "missing")
    assert code == 404 and "does not exist" in error_message(body)
    code, body, _ = dp.reload(ckpts["llama"])
    assert code == 400 and "LlamaForCausalLM" in error_message(body), body
    after = dp.checksum()
    assert after == before and after["agree"]


def test_a_faulted_engine_is_rebuilt_with_the_weights_all_engines_serve(dp, reference):
    """A real scheduler-thread fault on engine 1 (sent past validation): the server rebuilds
    it, and both engines serve the same weights and version as before."""
    before, version = dp.checksum(), dp.status()["version"]
    restarts = dp.call("/health")[1]["restarts"]
    code, body, _ = dp.admin("/admin/inject_fault", {"park": True, "engine": 2})
    assert code == 400 and "engine" in error_message(body), body
    code, body, _ = dp.admin("/admin/inject_fault", {"park": True, "engine": 1})
    assert code == 200, body
    code, body, _ = dp.admin("/admin/inject_fault", {"thread": "scheduler", "engine": 1})
    assert code == 200, body
    health = lambda: dp.call("/health")[1]  # noqa: E731
    wait_for(lambda: health()["restarts"] == restarts + 1 and health()["status"] == "ok", "engine 1 not rebuilt")
    assert "engine 1" in health()["last_fault"]["reason"] and "scheduler" in health()["last_fault"]["reason"]
    assert dp.checksum() == before and before["agree"]
    assert [e["version"] for e in dp.status()["engines"]] == [version] * 2
    served = from_every_engine(dp)
    assert served == {(tuple(reference["a", "short"]), e) for e in (0, 1)}, served


# ---------------------------------------------------------------------------- one port per engine
def test_every_port_answers_and_one_reload_swaps_every_engine(per_port, ckpts, reference, capsys):
    assert [tokens(url) for url in per_port.urls] == [(reference["a", "short"], i) for i in range(4)]
    for url in per_port.urls:
        code, body, _ = call(url + "/v1/models")
        assert code == 200 and body["data"], body
        code, body, _ = call(url + "/v1/completions", {"model": "m", "prompt": PROMPT_IDS, "max_tokens": 2})
        assert code == 200, body
    base = [arg for url in per_port.urls for arg in ("--base-url", url)] + ["--token", ADMIN_TOKEN]
    assert admin_main([*base, "checksum"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["agree"] and len(out["servers"]) == 4
    assert {e["checksum"] for s in out["servers"].values() for e in s["engines"]} == {ckpts["fp_a"]}

    # one process behind the four ports: the reload is sent once and swaps all four engines
    assert admin_main([*base, "reload", "--model-path", str(ckpts["b"])]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["servers"]) == [per_port.urls[0]] and out["servers"][per_port.urls[0]]["ok"], out
    assert [tokens(url) for url in per_port.urls] == [(reference["b", "short"], i) for i in range(4)]
    code, body, _ = call(per_port.urls[3] + "/admin/weights_checksum", token=ADMIN_TOKEN)
    assert code == 200 and body["agree"] and body["checksum"] == ckpts["fp_b"], body
    assert [e["version"] for e in body["engines"]] == [1] * 4
    assert admin_main([*base, "status"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len({s["server_id"] for s in out["servers"].values()}) == 1

    # the seed's hot update: perturb through the ports, every engine gets the same noise
    assert admin_main([*base, "perturb", "--seed", "0", "--scale", "0.5", "--num-leaves", "4"]) == 0
    assert len(json.loads(capsys.readouterr().out)["servers"]) == 1
    assert admin_main([*base, "checksum"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["agree"] and out["servers"][per_port.urls[0]]["checksum"] != ckpts["fp_b"], out
    answers = [tokens(url) for url in per_port.urls]
    assert len({tuple(ids) for ids, _ in answers}) == 1 and answers[0][0] != reference["b", "short"], answers


# ---------------------------------------------------------------------------- command line
def test_non_loopback_bind_needs_an_admin_token(monkeypatch, capsys):
    monkeypatch.delenv("SAMPLER_ADMIN_TOKEN", raising=False)
    for host in ("0.0.0.0", "10.1.2.3", "example.com"):
        with pytest.raises(SystemExit):
            parse_args(["--model-path", "m", "--host", host])
        err = capsys.readouterr().err
        assert "without an admin token" in err and "--admin-token" in err, err
    for argv in (["--host", "0.0.0.0", "--admin-token", "t"], ["--host", "127.0.0.1"], ["--host", "localhost"]):
        parse_args(["--model-path", "m", *argv])
    monkeypatch.setenv("SAMPLER_ADMIN_TOKEN", "t")
    parse_args(["--model-path", "m", "--host", "0.0.0.0"])
    for argv, words in [
        (["--data-parallel-size", "0"], "--data-parallel-size"),
        (["--num-servers", "0"], "--num-servers"),
        (["--num-servers", "2", "--data-parallel-size", "3"], "--data-parallel-size"),
        (["--num-servers", "4", "--base-port", "65534"], "--base-port"),
        (["--tp-size", "0"], "--tp-size"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(["--model-path", "m", *argv])
        assert words in capsys.readouterr().err, argv
