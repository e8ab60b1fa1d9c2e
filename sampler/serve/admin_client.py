"""Command-line client of ``sampler.serve``'s admin endpoints; prints the JSON answer.

    python -m sampler.serve.admin_client --base-url http://127.0.0.1:30000 --token T reload --model-path DIR \
        [--in-flight drain|continue|recompute]
    python -m sampler.serve.admin_client ... status | checksum | perturb --seed 0 --scale 0.01 --num-leaves 2
    python -m sampler.serve.admin_client ... wait-ready --timeout 300

The token may also come from $SAMPLER_ADMIN_TOKEN. Exit status 0 on a 2xx answer, 1 otherwise.
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

ADMIN_TOKEN_ENV = "SAMPLER_ADMIN_TOKEN"


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sampler.serve.admin_client", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
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

    client = AdminClient(args.base_url, args.token or os.environ.get(ADMIN_TOKEN_ENV), timeout=args.timeout)
    try:
        if args.command == "reload":
            status, body = client.reload(args.model_path, args.load_format, args.in_flight)
        elif args.command == "status":
            status, body = client.status()
        elif args.command == "checksum":
            status, body = client.checksum()
        elif args.command == "perturb":
            status, body = client.perturb(args.seed, args.scale, args.num_leaves)
        else:
            status, body = client.wait_ready(args.timeout)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        print(json.dumps({"ok": False, "error": {"message": f"cannot reach {args.base_url}: {e}"}}))
        return 1
    print(json.dumps(body, indent=2))
    return 0 if 200 <= status < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
