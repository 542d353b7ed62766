#!/usr/bin/env python3
"""Image benchmark (issue: images), through the Python client and a daemon
of its own on a fresh data dir, so "cold" really is cold.

Figures:
  1. cold build of Image.debian_slim() (mmdebstrap from the machine's Debian
     mirror) and of Image.debian_slim().pip_install("six") on top of it (the
     pip step alone, base cached), and each again as a cache hit (end to end
     through the client: target <= 200 ms);
  2. create -> first exec output with a 1 GB image against a 10 MB one
     (busybox plus a file of that size written by a build step), p50 over N
     runs each, interleaved (target: within 10 %), beside raw `runsc run` of
     the same two root filesystems (the image's overlay mount) in the same run.

    python3 bench/images.py [--runs 20] [--big-mb 1000] [--json out.json]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "clients", "python", "src"))
from engine import pct, raw_bundle, runsc_cmd, start_daemon, summary  # noqa: E402

from gworker_client import Image, Sandbox  # noqa: E402


def timed_build(image):
    t = time.perf_counter()
    image_id = image.build(quiet=True)
    return image_id, (time.perf_counter() - t) * 1000


def timed_spec_build(spec):
    """A build request for a description, end to end (the Python client
    sends a plain name without asking the daemon at all)."""
    from gworker_client._transport import Transport

    t = time.perf_counter()
    conn, resp = Transport.from_env().open_post_stream("/v1/images/build", json.dumps({"spec": spec}).encode())
    events = [json.loads(line) for line in resp if line.strip()]
    conn.close()
    assert events[-1]["event"] == "done", events[-1]
    return (time.perf_counter() - t) * 1000


def create_to_output(image_id):
    t = time.perf_counter()
    sb = Sandbox.create(image=Image.from_name(image_id), timeout=120)
    p = sb.exec(["echo", "hi"])
    out = p.stdout.read()
    dt = (time.perf_counter() - t) * 1000
    sb.terminate()
    assert out == "hi\n", out
    return dt


def raw_run(tmp, rootfs, i):
    b = raw_bundle(tmp, rootfs, ["/bin/echo", "hi"])
    root = tempfile.mkdtemp(dir=tmp)
    t = time.perf_counter()
    out = subprocess.run(runsc_cmd(root) + ["run", "--bundle", b, f"rawimg{i}"],
                         capture_output=True, timeout=60).stdout
    dt = (time.perf_counter() - t) * 1000
    subprocess.run(runsc_cmd(root) + ["delete", "--force", f"rawimg{i}"], capture_output=True)
    assert out == b"hi\n", out
    return dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--big-mb", type=int, default=1000)
    ap.add_argument("--json")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="gw-imgbench-")
    proc, sock, data = start_daemon(tmp)
    os.environ["GWORKER_URL"] = f"unix://{sock}"
    res = {}
    try:
        _, res["debian_slim_cold_ms"] = timed_build(Image.debian_slim())
        hits = [timed_spec_build({"base": {"debian_slim": {}}, "steps": []}) for _ in range(5)]
        res["debian_slim_cache_hit_ms"] = summary(hits)
        six = Image.debian_slim().pip_install("six")
        _, res["pip_six_cold_ms"] = timed_build(six)
        hits = [timed_build(Image.debian_slim().pip_install("six"))[1] for _ in range(5)]
        res["pip_six_cache_hit_ms"] = summary(hits)

        small_id, _ = timed_build(Image.from_name("busybox").run_commands(
            "dd if=/dev/urandom of=/data.bin bs=1M count=10 2>/dev/null"))
        big_id, res["big_image_build_ms"] = timed_build(Image.from_name("busybox").run_commands(
            f"dd if=/dev/urandom of=/data.bin bs=1M count={a.big_mb} 2>/dev/null"))
        small_root = os.path.join(data, "images", "mnt", small_id)
        big_root = os.path.join(data, "images", "mnt", big_id)
        for _ in range(2):  # warm both
            create_to_output(small_id)
            create_to_output(big_id)
        small, big, raw_small, raw_big = [], [], [], []
        for i in range(a.runs):
            small.append(create_to_output(small_id))
            big.append(create_to_output(big_id))
            raw_small.append(raw_run(tmp, small_root, 2 * i))
            raw_big.append(raw_run(tmp, big_root, 2 * i + 1))
        res["create_small_ms"] = summary(small)
        res["create_big_ms"] = summary(big)
        res["raw_small_ms"] = summary(raw_small)
        res["raw_big_ms"] = summary(raw_big)
        res["big_vs_small_p50_ratio"] = pct(big, 50) / pct(small, 50)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        subprocess.run(f"grep ' {tmp}' /proc/self/mounts | cut -d' ' -f2 | xargs -r -n1 umount -l",
                       shell=True, check=False)
    print(json.dumps(res, indent=2))
    if a.json:
        json.dump(res, open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()
