#!/usr/bin/env python3
"""Snapshot benchmark, side by side with raw runsc in the same run.

Figures (issue: memory snapshots):
  1. snapshot time (API call, and the source's pause) and size: an idle busybox
     sandbox, and a Python sandbox that imported heavy standard modules and
     holds 100 MB in memory;
  2. restore -> first exec output, p50 over N runs (busybox), against a cold
     create -> first exec output, and against raw `runsc restore` of a raw
     checkpoint of the same rootfs -> first output;
  3. Python case: restore + first answer from the warmed interpreter, against a
     cold start + redoing the warm-up;
  4. 10 forks of one snapshot started together: time until all 10 answered.

Uses the Python client; starts its own daemon on a temporary data dir unless
GWORKER_URL is set.   python3 bench/snapshots.py [--runs 20] [--json out.json]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine import start_daemon, pct, summary, raw_bundle, runsc_cmd  # noqa: E402

from gworker_client import Image, Sandbox  # noqa: E402

WARMUP = (
    "import json, decimal, email.parser, http.client, sqlite3, xml.etree.ElementTree, asyncio, unittest;"
    "blob = bytearray(100 * 1024 * 1024);"
    "_ = [blob.__setitem__(i, 1) for i in range(0, len(blob), 4096)];"
    "print('warm', flush=True)"
)


def first_output(sb, cmd):
    p = sb.exec(cmd)
    return p.stdout.read()


def restore_to_output(snap, cmd):
    t = time.perf_counter()
    sb = Sandbox.create(snapshot=snap, timeout=120)
    out = first_output(sb, cmd)
    dt = (time.perf_counter() - t) * 1000
    sb.terminate()
    return dt, out


def cold_to_output(image, cmd):
    t = time.perf_counter()
    sb = Sandbox.create(image=image, timeout=120)
    out = first_output(sb, cmd)
    dt = (time.perf_counter() - t) * 1000
    sb.terminate()
    return dt, out


def raw_restore(tmp, rootfs, runs):
    """Raw runsc: checkpoint a shell that answers lines, restore it N times."""
    root = tempfile.mkdtemp(dir=tmp)
    b = raw_bundle(tmp, rootfs, ["/bin/sh", "-c", "while read l; do echo $l; done"])
    img = tempfile.mkdtemp(dir=tmp)
    R = runsc_cmd(root)
    p = subprocess.Popen(R + ["run", "--bundle", b, "raw-src"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    p.stdin.write(b"x\n")
    p.stdin.flush()
    p.stdout.readline()
    t = time.perf_counter()
    subprocess.run(R + ["checkpoint", "--image-path", img, "raw-src"], check=True, timeout=60)
    ck_ms = (time.perf_counter() - t) * 1000
    p.wait(timeout=30)
    lat = []
    for i in range(runs):
        t = time.perf_counter()
        q = subprocess.Popen(R + ["restore", "--image-path", img, "--bundle", b, f"raw-r{i}"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        q.stdin.write(b"hi\n")
        q.stdin.flush()
        line = q.stdout.readline()
        lat.append((time.perf_counter() - t) * 1000)
        assert line == b"hi\n", line
        q.stdin.close()
        q.wait(timeout=30)
        subprocess.run(R + ["delete", "--force", f"raw-r{i}"], stderr=subprocess.DEVNULL)
    return ck_ms, lat


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--python-runs", type=int, default=5)
    ap.add_argument("--forks", type=int, default=10)
    ap.add_argument("--json")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="gw-snapbench-")
    daemon = None
    data = None
    if not os.environ.get("GWORKER_URL"):
        daemon, sock, data = start_daemon(tmp)
        os.environ["GWORKER_URL"] = "unix://" + sock
    res = {}
    try:
        bb = Image.from_name("busybox")
        # 1. idle busybox
        src = Sandbox.create(image=bb, timeout=600)
        assert first_output(src, ["echo", "ready"]) == "ready\n"
        t = time.perf_counter()
        snap = src.snapshot()
        res["busybox_snapshot"] = {"api_ms": (time.perf_counter() - t) * 1000, "pause_ms": snap.pause_ms,
                                   "size_bytes": snap.size_bytes}
        # 2. restore -> first output vs cold create -> first output
        cmd = ["echo", "hi"]
        rest = [restore_to_output(snap, cmd)[0] for _ in range(a.runs)]
        cold = [cold_to_output(bb, cmd)[0] for _ in range(a.runs)]
        res["busybox_restore_to_first_output_ms"] = summary(rest)
        res["busybox_cold_create_to_first_output_ms"] = summary(cold)
        rootfs = os.path.join(data, "images", "busybox", "rootfs") if data else None
        if rootfs and os.path.isdir(rootfs):
            ck_ms, raw = raw_restore(tmp, rootfs, a.runs)
            res["raw_runsc_checkpoint_ms"] = ck_ms
            res["raw_runsc_restore_to_first_output_ms"] = summary(raw)
        # 4. forks
        t = time.perf_counter()
        done = []

        def fork():
            sb = Sandbox.create(snapshot=snap, timeout=120)
            done.append((first_output(sb, ["echo", "fork"]), sb))

        ths = [threading.Thread(target=fork) for _ in range(a.forks)]
        [th.start() for th in ths]
        [th.join() for th in ths]
        res["forks_all_answered_ms"] = (time.perf_counter() - t) * 1000
        res["forks"] = a.forks
        assert all(o == "fork\n" for o, _ in done) and len(done) == a.forks
        for _, sb in done:
            sb.terminate()
        src.terminate()
        # 1+3. Python sandbox with heavy imports and 100 MB in memory
        py = Image.debian_slim()
        pysrc = Sandbox.create(image=py, timeout=900)
        repl = pysrc.exec(["python3", "-u", "-i", "-q"])
        t = time.perf_counter()
        repl.stdin.write(WARMUP + "\n")
        assert next(iter(repl.stdout)) == "warm\n"
        warm_ms = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        psnap = pysrc.snapshot()
        res["python_snapshot"] = {"api_ms": (time.perf_counter() - t) * 1000, "pause_ms": psnap.pause_ms,
                                  "size_bytes": psnap.size_bytes, "warmup_ms": warm_ms}
        from gworker_client.sandbox import SandboxProcess
        restored_lat, cold_lat = [], []
        for _ in range(a.python_runs):
            t = time.perf_counter()
            sb = Sandbox.create(snapshot=psnap, timeout=120)
            p = SandboxProcess(sb.sandbox_id, repl.process_id, _transport=sb._transport)
            p.stdin.write("print(len(blob))\n")
            assert next(iter(p.stdout)) == f"{100 * 1024 * 1024}\n"
            restored_lat.append((time.perf_counter() - t) * 1000)
            sb.terminate()
            t = time.perf_counter()
            sb = Sandbox.create(image=py, timeout=120)
            p = sb.exec(["python3", "-u", "-i", "-q"])
            p.stdin.write(WARMUP + "\n")
            assert next(iter(p.stdout)) == "warm\n"
            p.stdin.write("print(len(blob))\n")
            assert next(iter(p.stdout)) == f"{100 * 1024 * 1024}\n"
            cold_lat.append((time.perf_counter() - t) * 1000)
            sb.terminate()
        res["python_restore_to_answer_ms"] = summary(restored_lat)
        res["python_cold_plus_warmup_to_answer_ms"] = summary(cold_lat)
        pysrc.terminate()
        res["ratios"] = {
            "busybox_restore_vs_cold_p50": res["busybox_restore_to_first_output_ms"]["p50"] / res["busybox_cold_create_to_first_output_ms"]["p50"],
            "python_restore_vs_cold_warmup_p50": res["python_restore_to_answer_ms"]["p50"] / res["python_cold_plus_warmup_to_answer_ms"]["p50"],
        }
        if "raw_runsc_restore_to_first_output_ms" in res:
            res["ratios"]["busybox_restore_vs_raw_restore_p50"] = res["busybox_restore_to_first_output_ms"]["p50"] / res["raw_runsc_restore_to_first_output_ms"]["p50"]
        print(json.dumps(res, indent=2))
        if a.json:
            json.dump(res, open(a.json, "w"), indent=2)
    finally:
        if daemon:
            daemon.kill()
            daemon.wait()


if __name__ == "__main__":
    sys.exit(main())
