#!/usr/bin/env python3
"""Creates N busybox sandboxes back to back (create, `echo hi`, read the
output; terminate in the background) against a running daemon and prints
each create slower than 100 ms, then p50/p95/p99/max.

What bench/RESULTS.md's "warm pool under a steady stream" figures use:

    gworker serve --data-dir /tmp/b2b --pool busybox=50 --pool-memory-mb 3000 &
    sleep 30   # let the pool fill
    GWORKER_URL=unix:///run/gworker/gworker.sock python3 bench/back_to_back.py 100
"""
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python" / "src"))
from gworker_client import Image, Sandbox  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    reaper = ThreadPoolExecutor(8)
    pending, lat = [], []
    for i in range(n):
        t = time.monotonic()
        sb = Sandbox.create(image=Image.from_name("busybox"), timeout=300)
        out = sb.exec(["echo", "hi"]).stdout.read()
        dt = (time.monotonic() - t) * 1000
        assert out == "hi\n", out
        lat.append(dt)
        pending.append(reaper.submit(sb.terminate))
        if dt > 100:
            print(f"run {i}: {dt:.0f} ms {sb.sandbox_id}", flush=True)
    for f in pending:
        f.result()
    lat.sort()
    print("p50 %.1f p95 %.1f p99 %.1f max %.1f ms" % (
        lat[n // 2], lat[int(n * 0.95)], lat[int(n * 0.99)], lat[-1]))


if __name__ == "__main__":
    main()
