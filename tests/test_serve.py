"""`python -m sampler.serve` as a real server process on loopback, driven over real HTTP.

The server starts from checkpoint A (sglang-jax's own safetensors loader) and hot-reloads
A and B; what it serves is checked against fingerprints of the checkpoints' tensors and
against in-process engines that loaded the same checkpoints with sglang-jax's loader.
"""

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from converters import fingerprint_params
from sampler.serve.admin_client import AdminClient
from sampler.serve.admin_client import main as admin_main
from tests import helpers
from tests.http_helpers import free_port

pytestmark = pytest.mark.engine

TOKEN = "test-admin-token"
PROMPT_IDS = [5, 17, 42, 99, 7]
LONG_TOKENS = 700  # held in flight by pausing the engine while it runs (see _hold_long_request)
HOLD_ATTEMPTS = 5


def _post(url, body, headers=None, timeout=120):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), {k.lower(): v for k, v in e.headers.items()}


class Server:
    def __init__(self, model_path: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sampler.serve",
                "--model-path",
                str(model_path),
                "--port",
                str(self.port),
                "--admin-token",
                TOKEN,
                "--enable-weight-perturb",
                "--context-length",
                "1024",
                "--max-running-requests",
                "4",
                "--log-level",
                "info",
            ],
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
        )
        self.admin = AdminClient(self.url, TOKEN, timeout=120)

    def wait_ready(self):
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited:\n{self.log.read_text()[-3000:]}"
            if "listening on" in self.log.read_text():
                return
            time.sleep(0.5)
        raise AssertionError(f"server not ready:\n{self.log.read_text()[-3000:]}")

    def generate(self, ids=PROMPT_IDS, n=8, **extra):
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": 0.0, **extra}}
        return _post(self.url + "/generate", body, timeout=300)

    def tokens(self, ids=PROMPT_IDS, n=8, **extra):
        status, body, _ = self.generate(ids, n, **extra)
        assert status == 200, body
        return body["output_ids"]

    def status(self):
        code, body = self.admin.status()
        assert code == 200, body
        return body

    def checksum(self):
        code, body = self.admin.checksum()
        assert code == 200, body
        return body["checksum"]

    def reload(self, path):
        return self.admin.reload(str(path))


@pytest.fixture(scope="module")
def ckpts(model_dir, tmp_path_factory):
    a, b = model_dir("qwen3-tied", 0), model_dir("qwen3-tied", 1)
    return {
        "a": a,
        "b": b,
        "llama": model_dir("llama-tied", 0),
        "wider": model_dir("qwen3-tp", 0),  # same architecture, hidden 256 instead of 128
        "fp_a": fingerprint_params(helpers.hf_tensors(a), a),
        "fp_b": fingerprint_params(helpers.hf_tensors(b), b),
    }


@pytest.fixture(scope="module")
def server(ckpts, tmp_path_factory):
    srv = Server(ckpts["a"], tmp_path_factory.mktemp("serve") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(30)


@pytest.fixture(scope="module")
def reference_tokens(ckpts, engines):
    """Greedy tokens of PROMPT_IDS from in-process engines loaded by sglang-jax's own loader."""
    out = {}
    for name in ("a", "b"):
        ref = engines.get(ckpts[name], load_format="safetensors")
        res = ref.generate_ids([PROMPT_IDS], {"max_new_tokens": 8, "temperature": 0.0}, return_logprob=False)
        out[name] = res[0]["output_ids"]
        engines.drop(ckpts[name], load_format="safetensors")
    assert out["a"] != out["b"]
    return out


def test_serves_upstream_routes_and_checkpoint(server, ckpts, reference_tokens):
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert r.status == 200
    assert server.checksum() == ckpts["fp_a"]
    assert server.tokens() == reference_tokens["a"]
    code, body, _ = _post(
        server.url + "/v1/completions", {"model": "m", "prompt": "1+1=", "max_tokens": 4, "temperature": 0}
    )
    assert code == 200 and body["choices"][0]["finish_reason"] in ("length", "stop"), body


def test_reload_switches_weights_and_version(server, ckpts, reference_tokens):
    v0 = server.status()["version"]
    code, body = server.reload(ckpts["b"])
    assert code == 200 and body["ok"], body
    assert body["version"] == v0 + 1 and body["report"]["copied_leaves"] > 0
    assert server.checksum() == ckpts["fp_b"]
    assert server.tokens() == reference_tokens["b"]
    status = server.status()
    assert status["state"] == "idle" and status["version"] == v0 + 1 and status["last_error"] is None
    assert status["last_report"]["model_path"] == str(ckpts["b"])

    code, body = server.reload(ckpts["a"])
    assert code == 200 and body["version"] == v0 + 2
    assert server.checksum() == ckpts["fp_a"]
    assert server.tokens() == reference_tokens["a"]


def _hold_long_request(server, long_ids):
    """Start a long request and pause the engine in place (sglang-jax's /pause_generation) while
    it runs, so it stays in flight until /continue_generation, whatever the machine's speed.
    Returns (thread, results); retried if the request managed to finish before the pause."""
    admin = {"Authorization": f"Bearer {TOKEN}"}
    for _ in range(HOLD_ATTEMPTS):
        results: dict = {}

        def send(results=results):
            results["long"] = server.generate(long_ids, LONG_TOKENS, ignore_eos=True)

        long_req = threading.Thread(target=send)
        long_req.start()
        deadline = time.monotonic() + 60
        while server.status()["engine_requests"] < 1:
            assert time.monotonic() < deadline, "the long request never reached the engine"
            time.sleep(0.01)
        code, body, _ = _post(server.url + "/pause_generation", {"mode": "in_place"}, admin)
        assert code == 200, body
        if results.get("long") is None and server.status()["engine_requests"] >= 1:
            return long_req, results
        _post(server.url + "/continue_generation", {}, admin)  # it finished first: try again
        long_req.join(120)
    raise AssertionError(f"a {LONG_TOKENS}-token request finished before a pause {HOLD_ATTEMPTS} times")


def test_in_flight_requests_finish_on_old_weights_new_ones_get_503(server, ckpts):
    assert server.checksum() == ckpts["fp_a"]
    long_ids = [3, 1, 4, 1, 5]
    old_long = server.tokens(long_ids, LONG_TOKENS, ignore_eos=True)
    assert len(old_long) == LONG_TOKENS

    long_req, results = _hold_long_request(server, long_ids)
    reload_req = threading.Thread(target=lambda: results.setdefault("reload", server.reload(ckpts["b"])))
    reload_req.start()
    deadline = time.monotonic() + 60
    while server.status()["accepting"]:
        assert time.monotonic() < deadline, "the reload never started gating"
        time.sleep(0.01)
    # the reload waits for the held request: new requests get 503, a second reload 409
    code, body, headers = server.generate()
    assert code == 503, body
    assert int(headers["retry-after"]) >= 1 and "changing its weights" in body["error"]["message"]
    code, body = server.reload(ckpts["a"])
    assert code == 409, body
    assert server.status()["state"] == "reloading" and results.get("long") is None

    code, body, _ = _post(server.url + "/continue_generation", {}, {"Authorization": f"Bearer {TOKEN}"})
    assert code == 200, body
    long_req.join(120)
    reload_req.join(120)
    code, body, _ = results["long"]
    assert code == 200 and body["output_ids"] == old_long, "an in-flight request saw the new weights"
    code, body = results["reload"]
    assert code == 200 and body["ok"], body
    assert server.checksum() == ckpts["fp_b"]
    new_long = server.tokens(long_ids, LONG_TOKENS, ignore_eos=True)
    assert new_long != old_long


#: Reloads keep coming until every client has seen both checkpoints (and at least this many ran).
MIN_RELOADS, MAX_RELOADS = 6, 60


def test_no_request_sees_mixed_weights_across_reloads(server, ckpts, reference_tokens):
    expected = {tuple(reference_tokens["a"]): "a", tuple(reference_tokens["b"]): "b"}
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(3)]

    def client(mine):
        while not stop.is_set():
            code, body, headers = server.generate()
            if code == 503:
                assert "retry-after" in headers
                mine.append("503")
            else:
                mine.append(expected.get(tuple(body["output_ids"]), f"mixed {body['output_ids']}"))

    threads = [threading.Thread(target=client, args=(mine,)) for mine in seen]
    for t in threads:
        t.start()
    reloads = 0
    try:
        while reloads < MAX_RELOADS and (reloads < MIN_RELOADS or not all({"a", "b"} <= set(m) for m in seen)):
            name = "a" if reloads % 2 == 0 else "b"
            code, body = server.reload(ckpts[name])
            assert code == 200, body
            reloads += 1
            time.sleep(0.05)  # pacing only: the loop ends on what the clients saw
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    answers = [s for mine in seen for s in mine]
    assert all(s in ("a", "b", "503") for s in answers), [s for s in answers if s not in ("a", "b", "503")]
    assert all({"a", "b"} <= set(m) for m in seen), (reloads, seen)
    assert server.checksum() == ckpts["fp_" + name]


def test_bad_reloads_keep_the_old_weights(server, ckpts, tmp_path):
    before, tokens, version = server.checksum(), server.tokens(), server.status()["version"]

    code, body = server.reload(tmp_path / "missing")
    assert code == 404 and "does not exist" in body["error"]["message"]
    code, body = server.reload(ckpts["llama"])
    assert code == 400 and "LlamaForCausalLM" in body["error"]["message"]
    code, body = server.reload(ckpts["wider"])
    assert code == 400 and "model.layers.0.self_attn.q_proj.weight" in body["error"]["message"], body
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((Path(ckpts["a"]) / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code, body = server.reload(corrupt)
    assert code == 400 and body["error"]["type"] == "CheckpointError", body
    code, body = server.admin.request(
        "POST", "/admin/reload_weights", {"model_path": str(ckpts["a"]), "load_format": "pt"}
    )
    assert code == 400

    status = server.status()
    assert status["state"] == "failed" and status["last_error"]["status"] == 400
    assert status["version"] == version
    assert server.checksum() == before and server.tokens() == tokens

    for token in (None, "wrong"):
        client = AdminClient(server.url, token)
        for call in (functools.partial(client.reload, str(ckpts["a"])), client.status, client.checksum):
            code, body = call()
            assert code == 401, body
    code, _, headers = _post(server.url + "/flush_cache", {})
    assert code == 401 and headers.get("www-authenticate") == "Bearer"
    assert server.checksum() == before


def test_perturb_changes_the_served_weights(server, ckpts):
    code, body = server.reload(ckpts["a"])
    assert code == 200
    tokens = server.tokens()
    code, body = server.admin.perturb(seed=3, scale=0.5, num_leaves=4)
    assert code == 200 and len(body["perturbed"]) == 4, body
    assert server.checksum() != ckpts["fp_a"]
    assert server.tokens() != tokens
    code, body = server.admin.perturb(seed=3, scale=0.5, num_leaves=0)
    assert code == 400
    code, body = server.reload(ckpts["a"])
    assert code == 200 and server.checksum() == ckpts["fp_a"] and server.tokens() == tokens


def test_admin_client_cli(server, ckpts, capsys):
    assert admin_main(["--base-url", server.url, "--token", TOKEN, "checksum"]) == 0
    assert json.loads(capsys.readouterr().out)["checksum"] == ckpts["fp_a"]
    assert admin_main(["--base-url", server.url, "--token", TOKEN, "reload", "--model-path", str(ckpts["b"])]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert admin_main(["--base-url", server.url, "--token", TOKEN, "status"]) == 0
    assert json.loads(capsys.readouterr().out)["last_report"]["model_path"] == str(ckpts["b"])
    assert admin_main(["--base-url", server.url, "--token", "nope", "status"]) == 1
    assert "wrong admin token" in capsys.readouterr().out


def test_in_flight_reload_refuses_nothing_and_switches_the_running_request(server, ckpts, reference_tokens):
    """A "recompute" reload with a request held in flight (the engine paused in place by
    sglang-jax's /pause_generation): the reload completes while the request still runs,
    new requests are accepted meanwhile (no 503), and the held request's answer says which
    tokens came from which weights: its prefix is A's output, the rest follows B."""
    code, _ = server.reload(ckpts["a"])
    assert code == 200
    v = server.status()["version"]
    long_ids = [3, 1, 4, 1, 5]
    old_long = server.tokens(long_ids, LONG_TOKENS, ignore_eos=True)
    long_req, results = _hold_long_request(server, long_ids)
    code, body = server.admin.reload(str(ckpts["b"]), in_flight="recompute")
    assert code == 200 and body["version"] == v + 1, body
    assert body["report"]["in_flight"] == "recompute" and body["report"]["requests_in_flight"] == 1
    assert results.get("long") is None and server.status()["engine_requests"] >= 1  # did not wait for it
    assert server.status()["accepting"]
    short: dict = {}
    short_req = threading.Thread(target=lambda: short.setdefault("r", server.generate()))
    short_req.start()  # accepted (the engine is still paused: it waits, it is not refused)
    code, body, _ = _post(server.url + "/continue_generation", {}, {"Authorization": f"Bearer {TOKEN}"})
    assert code == 200, body
    long_req.join(120)
    short_req.join(120)
    code, body, _ = short["r"]
    assert code == 200 and body["output_ids"] == reference_tokens["b"]
    assert body["meta_info"]["weight_versions"] == [[v + 1, 0]]
    code, body, _ = results["long"]
    assert code == 200
    (first, start_a), (second, k) = body["meta_info"]["weight_versions"]
    assert (first, start_a, second) == (v, 0, v + 1) and 0 < k < LONG_TOKENS
    assert body["output_ids"][:k] == old_long[:k] and body["output_ids"][k:] != old_long[k:]


def test_no_503_and_consistent_stamps_across_in_flight_reloads(server, ckpts, reference_tokens):
    """Clients keep generating while "continue" reloads alternate A and B: no request is ever
    refused, and each answer matches its stamps: one version -> exactly that checkpoint's
    greedy output; two -> the first checkpoint's output up to the switch."""
    code, body = server.reload(ckpts["a"])
    assert code == 200
    served = {body["version"]: "a"}
    stop = threading.Event()
    seen: list[list] = [[] for _ in range(3)]

    def client(mine):
        while not stop.is_set():
            code, body, _ = server.generate()
            mine.append((code, body["output_ids"] if code == 200 else body, body.get("meta_info", {})))

    threads = [threading.Thread(target=client, args=(mine,)) for mine in seen]
    for t in threads:
        t.start()
    reloads = 0
    try:
        while reloads < MAX_RELOADS and (
            reloads < MIN_RELOADS or not all({"a", "b"} <= {served.get(m["weight_versions"][-1][0]) for *_, m in mine
                                               if m.get("weight_versions")} for mine in seen)
        ):  # fmt: skip
            name = "b" if reloads % 2 == 0 else "a"
            code, body = server.admin.reload(str(ckpts[name]), in_flight="continue")
            assert code == 200, body
            served[body["version"]] = name
            reloads += 1
            time.sleep(0.05)  # pacing only: the loop ends on what the clients saw
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    answers = [a for mine in seen for a in mine]
    assert all(code == 200 for code, *_ in answers), [a for a in answers if a[0] != 200][:3]
    for _, tokens, meta in answers:
        stamps = meta["weight_versions"]
        first = reference_tokens[served[stamps[0][0]]]
        if len(stamps) == 1:
            assert tokens == first, (stamps, tokens)
        else:
            assert tokens[: stamps[1][1]] == first[: stamps[1][1]], (stamps, tokens)


def test_sigterm_shuts_down_cleanly(server):
    server.proc.send_signal(signal.SIGTERM)
    rc = server.proc.wait(90)
    log = server.log.read_text()
    assert rc == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
