"""Command-line client of ``sampler.serve``'s admin endpoints; prints the JSON answer.

    python -m sampler.serve.admin_client --base-url http://127.0.0.1:30000 --token T reload --model-path DIR \
        [--in-flight drain|continue|recompute]
    python -m sampler.serve.admin_client ... status | checksum | perturb --seed 0 --scale 0.01 --num-leaves 2
    python -m sampler.serve.admin_client ... wait-ready --timeout 300

The token may also come from $SAMPLER_ADMIN_TOKEN. Exit status 0 on a 2xx answer, 1 otherwise.

``--base-url`` may repeat (the one-port-per-engine layout, ``--num-servers``): reads
(status, checksum, wait-ready) ask every URL and print ``{"servers": {url: answer}}`` (the
checksum also says whether every engine behind every URL ``agree``s); weight changes go
once to each server process (the ports of one process share its admin endpoints, which
change all its engines or none), to its first URL.
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from sampler.serve.admission import ADMIN_TOKEN_ENV

DEFAULT_BASE_URL = "http://127.0.0.1:30000"


class AdminClient:
    """Calls the admin endpoints; each method returns (HTTP status, decoded JSON body)."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, {"raw": raw.decode(errors="replace")}

    def reload(self, model_path: str, load_format: str = "safetensors", in_flight: str = "drain") -> tuple[int, Any]:
        body = {"model_path": model_path, "load_format": load_format, "in_flight": in_flight}
        return self.request("POST", "/admin/reload_weights", body)

    def status(self) -> tuple[int, Any]:
        return self.request("GET", "/admin/reload_status")

    def checksum(self) -> tuple[int, Any]:
        return self.request("GET", "/admin/weights_checksum")

    def perturb(self, seed: int = 0, scale: float = 0.01, num_leaves: int = 1) -> tuple[int, Any]:
        return self.request("POST", "/admin/perturb_weights", {"seed": seed, "scale": scale, "num_leaves": num_leaves})

    def wait_ready(self, timeout: float = 300.0) -> tuple[int, Any]:
        """Poll ``/health`` until the server answers 200."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return 200, {"ready": True}
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                last = str(e)
            time.sleep(0.5)
        return 504, {"ready": False, "error": f"no answer from {self.base_url}/health in {timeout:.0f} s: {last}"}


#: Commands that change the weights: sent once per server process.
WRITE_COMMANDS = frozenset({"reload", "perturb"})


def run_command(client: AdminClient, args: argparse.Namespace) -> tuple[int, Any]:
    if args.command == "reload":
        return client.reload(args.model_path, args.load_format, args.in_flight)
    if args.command == "status":
        return client.status()
    if args.command == "checksum":
        return client.checksum()
    if args.command == "perturb":
        return client.perturb(args.seed, args.scale, args.num_leaves)
    return client.wait_ready(args.timeout)


def fan_out(clients: list[AdminClient], args: argparse.Namespace) -> tuple[int, Any]:
    """One command over several base URLs (see the module docstring): (worst status, answers)."""
    answers: dict[str, Any] = {}
    statuses: list[int] = []
    targets = clients
    if args.command in WRITE_COMMANDS:  # one per server process, told apart by its server_id
        seen: set[str] = set()
        targets = []
        for client in clients:
            code, body = client.status()
            server_id = body.get("server_id") if code == 200 and isinstance(body, dict) else None
            if server_id is None or server_id not in seen:
                targets.append(client)
                seen.add(server_id or client.base_url)
    for client in targets:
        code, body = run_command(client, args)
        statuses.append(code)
        answers[client.base_url] = body
    result: dict[str, Any] = {"servers": answers}
    if args.command == "checksum":
        prints = [e.get("checksum") for b in answers.values() if isinstance(b, dict) for e in b.get("engines", [b])]
        result["agree"] = len(prints) > 0 and None not in prints and len(set(prints)) == 1
        statuses.append(200 if result["agree"] else 409)
    worst = next((code for code in statuses if not 200 <= code < 300), 200)
    return worst, result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sampler.serve.admin_client", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--base-url",
        action="append",
        default=None,
        help="server URL (default http://127.0.0.1:30000); repeat for one port per engine",
    )
    p.add_argument("--token", default=None, help=f"admin token (default: ${ADMIN_TOKEN_ENV})")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for an answer")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reload", help="load a safetensors checkpoint into the running server")
    r.add_argument("--model-path", required=True)
    r.add_argument("--load-format", default="safetensors")
    r.add_argument(
        "--in-flight",
        default="drain",
        choices=["drain", "continue", "recompute"],
        help="requests running at the swap: finish first (503 meanwhile), or go on under the new weights",
    )
    sub.add_parser("status", help="idle / reloading / failed, version, last report and error")
    sub.add_parser("checksum", help="fingerprint of the served weights")
    q = sub.add_parser("perturb", help="add seeded noise to some leaves (server needs --enable-weight-perturb)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--scale", type=float, default=0.01)
    q.add_argument("--num-leaves", type=int, default=1)
    sub.add_parser("wait-ready", help="wait until the server answers /health")
    args = p.parse_args(argv)

    urls = args.base_url or [DEFAULT_BASE_URL]
    token = args.token or os.environ.get(ADMIN_TOKEN_ENV)
    clients = [AdminClient(url, token, timeout=args.timeout) for url in urls]
    try:
        status, body = run_command(clients[0], args) if len(clients) == 1 else fan_out(clients, args)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        print(json.dumps({"ok": False, "error": {"message": f"cannot reach {', '.join(urls)}: {e}"}}))
        return 1
    print(json.dumps(body, indent=2))
    return 0 if 200 <= status < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
