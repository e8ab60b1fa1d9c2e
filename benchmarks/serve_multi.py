"""HTTP serving of several engines in one process: tokens/s of N engines behind one port
(``python -m sampler.serve --data-parallel-size N``) vs one engine over the same N devices
(``--tp-size N``), under concurrent clients (the official ``openai`` client), and the latency
of one weight reload for all engines.

Each set-up is a real ``python -m sampler.serve`` child process on loopback, started from
the same tiny Qwen3 checkpoint. Every client sends ``--requests`` completions one after
another (greedy, ``ignore_eos``, so every run generates the same number of tokens); a run's
tokens/s is the completion tokens of all clients over the run's wall time (median of
``--runs`` runs after a warm-up run, fixed seed). The reload row alternates two checkpoints
(median of ``--reloads``); the machine's limit beside it is one host memcpy of the bytes the
reload copied (``benchmarks.common.memcpy_seconds``), measured in the same run. Writes both tables
to docs/benchmarks/results/serve_multi.json (``--json PATH`` elsewhere, ``--no-json`` not at all).

    .venv/bin/python benchmarks/serve_multi.py [--engines 4] [--clients 8] [--requests 4]
        [--new-tokens 32] [--runs 3] [--reloads 5]
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import Results, add_output_args, memcpy_seconds, num  # noqa: E402
from sampler.tiny import write_tiny_model  # noqa: E402

TOKEN = "bench-admin-token"
WORDS = "the quick brown fox jumps over a lazy dog while numbers one two three four".split()
#: Generous bound for a child server to start (compiling included).
READY_TIMEOUT_S = 900


def prompts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 12)))) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``python -m sampler.serve`` child on a free loopback port."""

    def __init__(self, model: Path, devices: int, log: Path, *args: str):
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        port = self.url.rsplit(":", 1)[1]
        cmd = [sys.executable, "-m", "sampler.serve", "--model-path", str(model), "--port", port]
        cmd += ["--admin-token", TOKEN, "--context-length", "256", *args]
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "listening on" not in log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def reload(self, path: Path) -> dict:
        req = urllib.request.Request(
            self.url + "/admin/reload_weights",
            data=json.dumps({"model_path": str(path)}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
        )
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def load_run(url: str, batch: list[str], clients: int, requests: int, new_tokens: int) -> tuple[float, int]:
    """``clients`` concurrent openai clients, ``requests`` completions each: (wall s, tokens)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def one_client(c: int) -> int:
        made = 0
        for r in range(requests):
            answer = client.completions.create(
                model="m",
                prompt=batch[(c * requests + r) % len(batch)],
                max_tokens=new_tokens,
                temperature=0.0,
                extra_body={"ignore_eos": True},
            )
            made += answer.usage.completion_tokens
        return made

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        made = sum(pool.map(one_client, range(clients)))
    return time.perf_counter() - t0, made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", type=int, default=4, help="engines (and devices) of the data-parallel set-up")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="completions per client per run")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--reloads", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    add_output_args(ap)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-serve-multi-"))
    shape = dict(hidden_size=384, num_heads=4, num_kv_heads=2, num_layers=4, tie_word_embeddings=True)
    ckpts = [write_tiny_model(work / f"qwen3-{s}", "Qwen3ForCausalLM", seed=args.seed + s, **shape) for s in (0, 1)]
    batch = prompts(args.clients * args.requests, args.seed)
    n = args.engines
    running = str(max(1, args.clients))
    setups = [
        (f"{n} engines tp=1 behind one port (--data-parallel-size {n})", ["--data-parallel-size", str(n)]),
        (f"1 engine tp={n} (--tp-size {n})", ["--tp-size", str(n)]),
    ]
    rows, reload_rows = [], []
    for name, extra in setups:
        server = Server(ckpts[0], n, work / f"{extra[0].strip('-')}.log", "--max-running-requests", running, *extra)
        try:
            load_run(server.url, batch, args.clients, args.requests, args.new_tokens)  # warm-up: compile
            runs = [load_run(server.url, batch, args.clients, args.requests, args.new_tokens) for _ in range(args.runs)]
            walls = [wall for wall, _ in runs]
            tokens = runs[0][1]
            rows.append((name, statistics.median(walls), tokens / statistics.median(walls)))
            latencies, server_s, copied = [], [], 0
            for i in range(args.reloads):
                t0 = time.perf_counter()
                answer = server.reload(ckpts[(i + 1) % 2])
                latencies.append(time.perf_counter() - t0)
                server_s.append(answer["report"]["seconds"])
                copied = answer["report"]["copied_bytes"]
            reload_rows.append((name, statistics.median(latencies), statistics.median(server_s), copied))
        finally:
            server.stop()

    res = Results("serve_multi", args)
    table = res.table(
        ["set-up (HTTP, one process)", "wall (s)", "completion tokens/s"],
        key="throughput",
        caption=(
            f"{args.clients} concurrent openai clients x {args.requests} completions x {args.new_tokens} new tokens "
            f"(greedy, ignore_eos), Qwen3 hidden 384, 4 layers, {n} simulated CPU devices on {os.cpu_count()} "
            f"cores; median of {args.runs} runs"
        ),
    )
    for name, wall, tps in rows:
        table.add(name, num(wall, "{:.2f}", "s"), num(tps, "{:.0f}", "tokens/s"))
    table = res.table(
        ["set-up", "HTTP latency (s)", "server-side swap (s)", "bytes copied", "limit: memcpy of those bytes (s)"],
        key="reload",
        caption=f"One reload of every engine (POST /admin/reload_weights), median of {args.reloads}:",
    )
    for name, latency, swap, copied in reload_rows:
        limit = memcpy_seconds(copied) if copied else 0.0
        table.add(
            name,
            num(latency, "{:.3f}", "s"),
            num(swap, "{:.3f}", "s"),
            num(copied / 2**20, "{:.1f} MiB", "MiB"),
            num(limit, "{:.4f}", "s"),
        )
    res.emit()


if __name__ == "__main__":
    main()
