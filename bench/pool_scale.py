#!/usr/bin/env python3
"""A warm pool of N busybox slots (default 300): how long it takes to fill,
how many mounts the slots' volume directories leave in the host's mount
namespaces, and paced create -> first output (with and without a volume)
and terminate latencies at that size. Starts its own daemon from the
release build, as bench/suite.py does; run as root:

    N=300 python3 bench/pool_scale.py

What bench/RESULTS.md's "Mount propagation at 300 slots" (session 13) uses.
"""
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import Daemon, Image, Sandbox, Volume, gw_create_first_output, now, reap_all  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def mount_namespaces():
    """Mount namespaces of all processes: how many, their mounts in all,
    how many of those are slot volume directories, and the largest three."""
    seen = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            ns = os.readlink(f"/proc/{p}/ns/mnt")
            if ns in seen:
                continue
            lines = open(f"/proc/{p}/mountinfo").read().splitlines()
        except OSError:
            continue
        seen[ns] = (len(lines), sum("volbinds" in line for line in lines))
    total = sum(a for a, _ in seen.values())
    vb = sum(b for _, b in seen.values())
    top = sorted(seen.values(), reverse=True)[:3]
    return (f"{len(seen)} mount namespaces, {total} mounts in all, {vb} of them slot volume "
            f"directories; largest (mounts, slot directories): {top}")


def main():
    n = int(os.environ.get("N", "300"))
    tmp = tempfile.mkdtemp(prefix="pool-scale-")
    d = Daemon(tmp, "w", str(ROOT / "target/release/gworker"),
               str(ROOT / "target/x86_64-unknown-linux-gnu/release/gworker-agent"), {},
               pool={"busybox": n}, pool_mb=n * 50 + 512)
    try:
        d.use()
        t0, marks = now(), {}
        while True:
            c = d.pool_ready().get("busybox", 0)
            step = min(50, n)
            for m in range(step, n + 1, step):
                if c >= m and m not in marks:
                    marks[m] = now() - t0
            if c >= n:
                break
            time.sleep(0.5)
        print("filled:", "; ".join(f"{m} after {t:.1f}s" for m, t in sorted(marks.items())), flush=True)
        d.wait_pool_full(quiet=True)
        time.sleep(3)
        print("at full:", mount_namespaces(), flush=True)
        vol = {"/data": Volume.from_name("pool-scale-vol", create_if_missing=True)}
        for label, kw in (("no volume", {}), ("one volume", {"volumes": vol})):
            lat = []
            for _ in range(20):
                reap_all()
                d.wait_pool_full(quiet=True)
                lat.append(gw_create_first_output("busybox", **kw))
            print(f"paced create->output, {label}, {n} slots: p50 {statistics.median(lat):.1f} ms, "
                  f"max {max(lat):.1f} ms", flush=True)
        reap_all()
        d.wait_pool_full(quiet=True)
        lat = []
        for _ in range(10):
            sb = Sandbox.create(image=Image.from_name("busybox"), timeout=300, volumes=vol)
            assert sb.exec(["true"]).wait() == 0
            t = now()
            sb.terminate()
            lat.append((now() - t) * 1000)
            d.wait_pool_full(quiet=True)
        print(f"terminate with a volume, {n} slots: p50 {statistics.median(lat):.1f} ms, "
              f"max {max(lat):.1f} ms", flush=True)
        print("after 50 creates and terminates:", mount_namespaces(), flush=True)
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
