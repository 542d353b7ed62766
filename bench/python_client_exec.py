"""Exec round trip: the Python client against raw HTTP over the unix socket.

One round trip = exec `true` in an idle busybox sandbox, then wait for it.
Measured ≥200 times each way (after a warm-up) on one sandbox; prints a table
of p50/p95 and writes the figures as JSON.

    GWORKER_URL=unix:///path/gw.sock python bench/python_client_exec.py [--runs 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python" / "src"))

from gworker_client import Image, Sandbox, resolve_url  # noqa: E402


class RawClient:
    """A minimal hand-rolled HTTP/1.1 client on one keep-alive unix socket:
    the floor the Python client's overhead is measured against."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""

    def request(self, method: str, path: str, body: bytes = b"") -> Tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + body)
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        header, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:])}
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(self.buf) < n:
                self._fill()
            data, self.buf = self.buf[:n], self.buf[n:]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            data = self._chunked()
        else:
            data = b""
        return status, data

    def _fill(self) -> None:
        more = self.sock.recv(65536)
        if not more:
            raise ConnectionError("daemon closed the connection")
        self.buf += more

    def _chunked(self) -> bytes:
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                self._fill()
            size_line, self.buf = self.buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(self.buf) < size + 2:
                self._fill()
            out, self.buf = out + self.buf[:size], self.buf[size + 2 :]
            if size == 0:
                return out


def measure(fn: Callable[[], None], runs: int, warmup: int = 10) -> List[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def summary(samples: List[float]) -> Dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "runs": len(samples),
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p95_ms": round(pick(0.95) * 1000, 3),
        "min_ms": round(ordered[0] * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--json", default="bench-python-client-exec.json", help="where to write the results")
    args = parser.parse_args()
    url = resolve_url()
    if not url.startswith("unix://"):
        sys.exit(f"the raw client speaks over a unix socket; GWORKER_URL is {url}")

    with Sandbox.create(image=Image.from_name("busybox"), timeout=3600) as sb:
        def via_client() -> None:
            assert sb.exec(["true"]).wait() == 0

        raw = RawClient(url[len("unix://"):])
        exec_body = json.dumps({"cmd": ["true"]}).encode()

        def via_raw() -> None:
            status, data = raw.request("POST", f"/v1/sandboxes/{sb.sandbox_id}/exec", exec_body)
            assert status == 201, data
            pid = json.loads(data)["process_id"]
            status, data = raw.request("GET", f"/v1/sandboxes/{sb.sandbox_id}/processes/{pid}/wait")
            assert status == 200 and json.loads(data)["exit_code"] == 0, data

        results = {
            "python_client": summary(measure(via_client, args.runs)),
            "raw_http": summary(measure(via_raw, args.runs)),
        }

    print(f"exec `true` + wait, {args.runs} runs each, daemon at {url}")
    print(f"{'path':<15}{'p50 ms':>10}{'p95 ms':>10}{'min ms':>10}{'max ms':>10}")
    for name, r in results.items():
        print(f"{name:<15}{r['p50_ms']:>10.2f}{r['p95_ms']:>10.2f}{r['min_ms']:>10.2f}{r['max_ms']:>10.2f}")
    overhead = results["python_client"]["p50_ms"] - results["raw_http"]["p50_ms"]
    print(f"client overhead at p50: {overhead:.2f} ms")
    report = {"benchmark": "python_client_exec", "url": url, "python": sys.version.split()[0],
              "time": time.time(), "results": results, "p50_overhead_ms": round(overhead, 3)}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {os.path.abspath(args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
