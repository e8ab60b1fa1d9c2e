"""Mixed-traffic soak of ``python -m sampler.serve``: good clients, a client sending fuzzed bad
requests, and weight reloads, for a few minutes.

A real server child on loopback serves tiny Qwen3 checkpoint A. The run is cut into rounds;
in each round ``--good-clients`` threads send good requests (greedy ``/generate``, streamed
``/generate``, ``/v1/completions``, ``/v1/chat/completions``) while one thread sends bad ones
(malformed values, wrong types, NaN, huge numbers, bad JSON, oversized bodies, no or wrong
keys) to every inference route; between rounds the server reloads the other checkpoint (the
good clients wait for it, the bad client keeps going). Checked and printed:

- every good answer is exactly the greedy answer of the checkpoint served in that round
  (reference answers taken from the same server before the soak; the served checksum equals
  ``converters.fingerprint_params`` of the checkpoint);
- no good request gets a 5xx, no bad request gets a 5xx (503 while a reload swaps is counted
  apart: it is the documented "retry shortly");
- the engine never restarts (``/health`` restarts 0);
- the server's resident memory (VmRSS of the child, sampled every second) stays flat.

Prints the table and writes it to docs/benchmarks/results/soak_mixed.json (``--json PATH``
elsewhere, ``--no-json`` not at all); exits 1 if a check failed (the file is written either way).

    .venv/bin/python benchmarks/soak_mixed.py [--duration 300] [--round-seconds 10] [--seed 0]
    .venv/bin/python benchmarks/soak_mixed.py --duration 20 --round-seconds 5   # a quick check
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Results, add_output_args, num  # noqa: E402
from converters import fingerprint_params  # noqa: E402
from sampler.tiny import write_tiny_model  # noqa: E402
from tests.helpers import hf_tensors  # noqa: E402
from tests.http_helpers import API_KEY, ServerProcess, call  # noqa: E402

MiB = 1 << 20
#: Body cap of the soaked server (oversized bad bodies go just past it).
MAX_BODY = MiB
#: How often the server's RSS is sampled (s).
RSS_EVERY_S = 1.0
#: Fraction of the samples at each end of the run compared for the memory trend.
EDGE = 0.1
#: "Flat": the last samples' peak at most this fraction above the first samples' peak.
RSS_GROWTH_LIMIT = 0.05


def good_requests(max_new: int) -> list[tuple[str, dict]]:
    greedy = {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True}
    return [
        ("/generate", {"input_ids": [5, 17, 42, 99, 7], "sampling_params": greedy}),
        ("/generate", {"input_ids": [3, 1, 4, 1, 5], "sampling_params": greedy, "stream": True}),
        ("/generate", {"input_ids": [[8, 9, 10], [11, 12]], "sampling_params": greedy}),
        ("/v1/completions", {"model": "m", "prompt": [5, 6, 7], "max_tokens": max_new, "temperature": 0}),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "1+1="}], "max_tokens": max_new, "temperature": 0},
        ),
    ]


def answer_of(path: str, body) -> object:
    """What identifies a greedy answer: its token ids (or text for the chat route)."""
    if path == "/generate" and isinstance(body, bytes):  # a stream: the last event's ids
        events = [e for e in body.decode().split("\n\n") if e.startswith("data: {")]
        return json.loads(events[-1][len("data: ") :])["output_ids"]
    if path == "/generate":
        return [o["output_ids"] for o in body] if isinstance(body, list) else body["output_ids"]
    if path == "/v1/completions":
        return body["choices"][0]["text"]
    return body["choices"][0]["message"]["content"]


NASTY = [
    None, True, -1, 0, 2**31, 2**63, 10**30, 1.5, math.nan, math.inf, -math.inf, "", "x" * 2000, "\x00", "💥",
    [], {}, [None], [-1], [2**31], [[1]], {"a": 1},
]  # fmt: skip


def bad_request(rng: random.Random, good: list[tuple[str, dict]]) -> tuple[str, bytes, str | None]:
    """A malformed request to an inference route: (path, body, API key)."""
    path, template = rng.choice(good)
    kind = rng.choice(["mutate", "mutate", "mutate", "json", "bytes", "oversized", "key"])
    token = API_KEY
    if kind == "mutate":
        body = json.loads(json.dumps(template))
        target = rng.choice([body] + [v for v in body.values() if isinstance(v, dict)])
        target[rng.choice(sorted(target) + ["extra"])] = rng.choice(NASTY)
        raw = json.dumps(body, allow_nan=True).encode()
    elif kind == "json":
        raw = json.dumps(rng.choice(NASTY), allow_nan=True).encode()
    elif kind == "bytes":
        raw = rng.choice([b"", b"{", b"\xff\xfe", b'{"input_ids": [5,', b"null"])
    elif kind == "oversized":
        raw = b"[" + b"5," * (MAX_BODY // 2) + b"5]"
    else:
        raw, token = json.dumps(template).encode(), rng.choice([None, "wrong"])
    return path, raw, token


class RoundGate:
    """Good requests run only inside a round; ``end`` waits for those under way."""

    def __init__(self):
        self._cond = threading.Condition()
        self.open = False
        self.closings = 0  # how many times the gate closed: a reload window passed when it moved
        self._active = 0

    def overlapped_a_reload(self, was_open: bool, closings: int) -> bool:
        """Whether a call that began with ``(was_open, closings)`` and ends now may have met a
        reload: the gate was closed at either end, or closed in between."""
        return not (was_open and self.open and self.closings == closings)

    def start(self) -> None:
        with self._cond:
            self.open = True
            self._cond.notify_all()

    def end(self) -> None:
        with self._cond:
            self.open = False
            self.closings += 1
            self._cond.wait_for(lambda: self._active == 0)

    @contextlib.contextmanager
    def request(self):
        with self._cond:
            running = self._cond.wait_for(lambda: self.open, timeout=0.1)
            self._active += running
        try:
            yield running
        finally:
            with self._cond:
                self._active -= running
                self._cond.notify_all()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise KeyError("VmRSS")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=300.0, help="seconds of mixed traffic")
    p.add_argument("--round-seconds", type=float, default=10.0, help="traffic between two reloads")
    p.add_argument("--good-clients", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bad-clients", type=int, default=1)
    add_output_args(p)
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="soak-mixed-"))
    ckpts = {name: write_tiny_model(tmp / name, "Qwen3ForCausalLM", seed=seed) for name, seed in (("a", 0), ("b", 1))}
    fingerprints = {name: fingerprint_params(hf_tensors(path), path) for name, path in ckpts.items()}
    server = ServerProcess(
        ckpts["a"],
        tmp / "server.log",
        "--api-key",
        API_KEY,
        "--context-length",
        "128",
        "--max-running-requests",
        "4",
        "--max-body-bytes",
        str(MAX_BODY),
    ).wait_ready()
    try:
        return soak(args, server, ckpts, fingerprints)
    finally:
        server.stop()


def reload(server: ServerProcess, path: Path) -> None:
    code, body, _ = server.admin("/admin/reload_weights", {"model_path": str(path)})
    if code != 200:
        raise RuntimeError(f"reload failed: {code} {body}")


def soak(args, server: ServerProcess, ckpts: dict, fingerprints: dict) -> int:
    good = good_requests(args.max_new_tokens)
    expected: dict[str, list] = {}
    for name in ("b", "a"):  # references from the server itself, checksum-verified
        reload(server, ckpts[name])
        assert server.admin("/admin/weights_checksum")[1]["checksum"] == fingerprints[name]
        expected[name] = []
        for path, body in good:
            code, answer, _ = server.call(path, body, token=API_KEY)
            assert code == 200, (path, code, answer)
            expected[name].append(answer_of(path, answer))
    assert expected["a"] != expected["b"], "the two checkpoints answer alike: nothing would be checked"

    serving = ["a"]
    rounds = RoundGate()
    stop = threading.Event()
    tally: Counter = Counter()
    problems: list[str] = []
    rss: list[tuple[float, int]] = []
    lock = threading.Lock()

    def good_client(i: int) -> None:
        rng = random.Random(args.seed * 1000 + i)
        while not stop.is_set():
            k = rng.randrange(len(good))
            path, body = good[k]
            with rounds.request() as running:
                if not running:
                    continue
                name = serving[0]
                code, answer, _ = server.call(path, body, token=API_KEY)
            with lock:
                if code != 200:
                    tally["good 5xx" if code >= 500 else f"good {code}"] += 1
                    problems.append(f"good {path} -> {code}: {str(answer)[:200]}")
                elif answer_of(path, answer) != expected[name][k]:
                    tally["good wrong answer"] += 1
                    got = answer_of(path, answer)
                    other = "the other checkpoint's" if got in [e[k] for e in expected.values()] else "neither's"
                    problems.append(
                        f"good {path} on {name}: {other} {str(got)[:100]} for {str(expected[name][k])[:100]}"
                    )
                else:
                    tally["good exact"] += 1

    def bad_client() -> None:
        rng = random.Random(args.seed)
        while not stop.is_set():
            path, raw, token = bad_request(rng, good)
            was_open, closings = rounds.open, rounds.closings
            code, answer, _ = call(server.url + path, raw=raw, token=token)
            with lock:
                # the client decides late whether its call met a reload (a thread may run late on
                # a busy machine): a 503 counts as the reload's only if the two overlapped and
                # the server said so
                if code == 503 and rounds.overlapped_a_reload(was_open, closings) and "reload" in str(answer):
                    tally["bad 503 during a reload"] += 1
                elif code >= 500:
                    tally["bad 5xx"] += 1
                    problems.append(f"bad {path} {raw[:120]!r} -> {code}: {str(answer)[:200]}")
                else:
                    tally[f"bad {code // 100}xx"] += 1

    def watch_memory() -> None:
        t0 = time.monotonic()
        while not stop.wait(RSS_EVERY_S):
            rss.append((time.monotonic() - t0, rss_bytes(server.proc.pid)))

    threads = [threading.Thread(target=good_client, args=(i,)) for i in range(args.good_clients)]
    threads += [threading.Thread(target=bad_client) for _ in range(args.bad_clients)]
    threads += [threading.Thread(target=watch_memory)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    reloads = 0
    try:
        while time.monotonic() - t0 < args.duration:
            rounds.start()
            time.sleep(min(args.round_seconds, max(0.0, args.duration - (time.monotonic() - t0))))
            rounds.end()  # waits for the good requests under way (they run on this round's weights)
            name = "b" if serving[0] == "a" else "a"
            reload(server, ckpts[name])
            serving[0] = name
            reloads += 1
    finally:
        stop.set()
        rounds.start()
        for t in threads:
            t.join(120)
    elapsed = time.monotonic() - t0
    health = server.call("/health")[1]
    restarts = health.get("restarts") if isinstance(health, dict) else None

    samples = [b for _, b in rss]
    edge = max(1, int(len(samples) * EDGE))
    first, last = max(samples[:edge]), max(samples[-edge:])
    good_total = sum(n for k, n in tally.items() if k.startswith("good"))
    bad_total = sum(n for k, n in tally.items() if k.startswith("bad"))
    ok = (
        tally["good exact"] == good_total
        and tally["bad 5xx"] == 0
        and restarts == 0
        and good_total > 0
        and bad_total > 0
        and last <= first * (1 + RSS_GROWTH_LIMIT)
    )
    res = Results(
        "soak_mixed",
        args,
        context={
            "ok": ok,
            "elapsed_s": elapsed,
            "reloads": reloads,
            "tally": dict(tally),
            "rss_samples": len(samples),
            "rss_growth_limit": RSS_GROWTH_LIMIT,
            "problems": problems[:10],
        },
    )
    table = res.table(
        ["what", "value"],
        align=[None, "right"],
        key="soak",
        caption=(
            f"soak_mixed: tiny Qwen3 (context 128), {args.good_clients} good clients + {args.bad_clients} bad, "
            f"seed {args.seed}, {elapsed:.0f} s, {reloads} reloads between rounds of {args.round_seconds:.0f} s"
        ),
    )
    table.add("good requests", good_total)
    table.add("good answers exactly the served checkpoint's", tally["good exact"])
    table.add("good requests with a 5xx", tally["good 5xx"])
    table.add("good requests with a wrong answer or another status", good_total - tally["good exact"])
    table.add("bad requests", bad_total)
    table.add("bad requests answered 4xx / 2xx", num([tally["bad 4xx"], tally["bad 2xx"]], "{} / {}"))
    table.add("bad requests with a 5xx (503 while a reload swaps not counted)", tally["bad 5xx"])
    table.add("bad requests with a 503 while a reload swapped", tally["bad 503 during a reload"])
    table.add("engine restarts", num(restarts, "{}"))
    table.add("server RSS at start (MiB)", num(samples[0] / MiB, "{:.1f}", "MiB"))
    table.add("server RSS min..max (MiB)", num([min(samples) / MiB, max(samples) / MiB], "{:.1f}..{:.1f}", "MiB"))
    table.add(
        f"server RSS max of first / last {EDGE:.0%} of the run (MiB)",
        num([first / MiB, last / MiB], "{:.1f} / {:.1f}", "MiB"),
    )
    table.add("server RSS median (MiB)", num(statistics.median(samples) / MiB, "{:.1f}", "MiB"))
    table.add(
        f"server RSS growth, last vs first {EDGE:.0%} (limit {RSS_GROWTH_LIMIT:.0%})",
        num(last / first - 1, "{:+.1%}", "fraction"),
    )
    for line in problems[:10]:
        table.note(f"problem: {line}")
    table.note(f"result: {'OK' if ok else 'FAILED'}")
    res.emit()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
