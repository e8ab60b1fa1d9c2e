"""The HTTP server rebuilds its engine after a real engine-thread fault, over real HTTP with a
``python -m sampler.serve`` child. The faults are real: requests that crash the scheduler or
the detokenizer thread, sent past request validation through the test-only
``/admin/inject_fault`` (``--enable-fault-injection``), while client requests are held in
flight by parking the scheduler (deterministic, whatever the machine's speed)."""

import json
import threading
import time

import pytest

import converters
from tests import helpers
from tests.http_helpers import KNOWN_BODY, ServerProcess, error_message

pytestmark = pytest.mark.engine

#: Rebuilds the server may do: the third fault leaves it down for good (tested last).
MAX_RESTARTS = 2
#: Upper bound on waiting for a rebuild; only a broken server reaches it.
RECOVERY_BOUND_S = 300
LONG = {"max_new_tokens": 100, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def ckpts(model_dir):
    a, b = model_dir("qwen3-tied", 0), model_dir("qwen3-tied", 1)
    return {"a": a, "b": b, "fp_b": converters.fingerprint_params(helpers.hf_tensors(b), b)}


@pytest.fixture(scope="module")
def server(ckpts, tmp_path_factory):
    srv = ServerProcess(
        ckpts["a"],
        tmp_path_factory.mktemp("recovery") / "server.log",
        "--enable-fault-injection",
        "--enable-weight-perturb",
        "--max-engine-restarts",
        str(MAX_RESTARTS),
        "--context-length",
        "128",
        "--max-running-requests",
        "4",
    )
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def served(server, ckpts):
    """Serve checkpoint B, then a seeded perturbation of it: what a rebuild must restore."""
    assert server.admin("/admin/reload_weights", {"model_path": str(ckpts["b"])})[0] == 200
    assert server.admin("/admin/weights_checksum")[1]["checksum"] == ckpts["fp_b"]
    code, body, _ = server.admin("/admin/perturb_weights", {"seed": 7, "scale": 0.05, "num_leaves": 3})
    assert code == 200, body
    checksum = server.admin("/admin/weights_checksum")[1]["checksum"]
    assert checksum != ckpts["fp_b"]
    code, body, _ = server.call("/generate", KNOWN_BODY)
    assert code == 200
    return {"checksum": checksum, "tokens": body["output_ids"], "version": server.status()["version"]}


def fault_with_requests_in_flight(server, thread):
    """Park the scheduler, send three client requests (/generate, streamed /generate,
    /v1/completions) so they sit in the engine, then crash ``thread``. Returns their answers."""
    code, body, _ = server.admin("/admin/inject_fault", {"park": True})
    assert code == 200, body
    answers: dict[str, tuple] = {}
    requests = {
        "generate": ("/generate", {"input_ids": [5, 6, 7], "sampling_params": LONG}),
        "stream": ("/generate", {"input_ids": [8, 9, 10], "sampling_params": LONG, "stream": True}),
        "v1": ("/v1/completions", {"model": "m", "prompt": [5, 6], "max_tokens": 100, "temperature": 0}),
    }
    clients = [
        threading.Thread(target=lambda k=k, p=p, b=b: answers.setdefault(k, server.call(p, b)))
        for k, (p, b) in requests.items()
    ]
    for c in clients:
        c.start()
    deadline = time.monotonic() + 60
    while server.status()["engine_requests"] < len(requests):
        assert time.monotonic() < deadline, "the requests never reached the engine"
        time.sleep(0.01)
    code, body, _ = server.admin("/admin/inject_fault", {"thread": thread})
    assert code == 200, body
    for c in clients:
        c.join(RECOVERY_BOUND_S)
    assert not any(c.is_alive() for c in clients), "a request in flight got no answer"
    return answers


def wait_recovered(server, restarts):
    """Generate until the rebuilt engine answers; every answer meanwhile is a 503 naming the
    fault (with Retry-After) or the served tokens. Returns what was seen."""
    seen = []
    deadline = time.monotonic() + RECOVERY_BOUND_S
    while True:
        code, body, headers = server.call("/generate", KNOWN_BODY)
        health = server.call("/health")
        seen.append((code, health[0]))
        if code == 200:
            assert health[0] == 200 and health[1]["restarts"] == restarts, health
            return seen, body
        assert code == 503 and "retry-after" in headers, (code, body)
        if health[0] == 200:  # the engine came back between the two calls
            assert health[1]["restarts"] == restarts, health
        else:
            assert health[0] == 503 and health[1]["status"] in ("faulted", "recovering"), health
            assert "failed" in health[1]["reason"], health
        assert time.monotonic() < deadline, "the engine was not rebuilt"
        time.sleep(0.05)


@pytest.mark.parametrize("thread, thread_name", [("scheduler", "scheduler"), ("detokenizer", "detokenizer")])
def test_server_rebuilds_its_engine_after_a_fault(server, served, thread, thread_name):
    restarts = server.call("/health")[1]["restarts"]
    answers = fault_with_requests_in_flight(server, thread)
    for name, (code, body, _) in answers.items():
        # a 503 naming the fault (before: 200 with an empty "abort" output; /v1 a 500 KeyError);
        # a stream whose first tokens went out already ends with an error event naming it
        if name == "stream" and code == 200:
            events = body.decode().strip().split("\n\n")
            assert events[-1] == "data: [DONE]" and '"abort"' not in body.decode(), body
            message = error_message(json.loads(events[-2][len("data: ") :]))
        else:
            assert code == 503, (name, code, body)
            message = error_message(body)
        assert thread_name in message and "failed" in message, (name, body)

    _, body = wait_recovered(server, restarts + 1)
    assert body["output_ids"] == served["tokens"]  # exactly the weights served before the fault
    assert server.admin("/admin/weights_checksum")[1]["checksum"] == served["checksum"]
    status = server.status()
    assert status["version"] == served["version"]
    engine = status["engine"]
    assert engine["state"] == "serving" and engine["restarts"] == restarts + 1
    assert thread_name in engine["last_fault"]["reason"]
    assert engine["last_restart"]["restored"] == "arrays"
    # and it keeps serving: other routes, weight changes
    code, body, _ = server.call("/v1/completions", {"model": "m", "prompt": [5, 6], "max_tokens": 2})
    assert code == 200, body


def test_server_gives_up_after_its_restart_budget(server, served):
    """One fault more than --max-engine-restarts allows: the server stays down, and says why."""
    assert server.call("/health")[1]["restarts"] == MAX_RESTARTS
    fault_with_requests_in_flight(server, "scheduler")
    deadline = time.monotonic() + RECOVERY_BOUND_S
    while server.call("/health")[1]["status"] != "failed":
        assert time.monotonic() < deadline, "the server did not give up"
        time.sleep(0.05)
    code, body, _ = server.call("/health")
    assert code == 503 and "--max-engine-restarts" in body["reason"] and "scheduler" in body["reason"], body
    code, body, _ = server.call("/generate", KNOWN_BODY)
    assert code == 503 and "scheduler" in error_message(body), body
    assert server.status()["engine"]["state"] == "failed"
    assert server.proc.poll() is None  # the process lives
