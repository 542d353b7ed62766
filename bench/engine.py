#!/usr/bin/env python3
"""Engine benchmark: gworker side by side with raw runsc, in the same run.

Figures (issue: sandbox engine):
  1. exec round trip (exec `true`, get its exit code) in a running sandbox,
     vs `runsc exec` of `true` in a raw runsc container;
  2. create -> first exec output received (busybox), vs a raw `runsc run` of
     the same rootfs printing the same line;
  3. stdout throughput of one exec writing N MB to the client (`dd bs=1MB`),
     vs raw runsc writing the same bytes to a pipe.

Talks raw HTTP/1.1 over the daemon's unix socket (standard library only), so
what is measured is the daemon, not a client library. Starts its own daemon
on a temporary data dir unless GWORKER_URL=unix:///path is set.

  python3 bench/engine.py [--exec-runs 300] [--create-runs 30] [--mb 500] [--json out.json]
"""
import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=120)
        self.path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(120)
        s.connect(self.path)
        self.sock = s


class Api:
    def __init__(self, sock):
        self.conn = UnixHTTP(sock)

    def call(self, method, path, body=None, raw=False):
        data = json.dumps(body).encode() if body is not None else None
        self.conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = self.conn.getresponse()
        out = r.read()
        if r.status >= 300:
            raise RuntimeError(f"{method} {path}: {r.status} {out[:200]!r}")
        return out if raw else (json.loads(out) if out else None)


def pct(xs, p):
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(xs):
    return {"n": len(xs), "p50": pct(xs, 50), "p95": pct(xs, 95), "min": min(xs), "max": max(xs),
            "mean": statistics.mean(xs)}


def start_daemon(tmp):
    binp = os.environ.get("GWORKER_BIN", os.path.join(REPO, "target/release/gworker"))
    if not os.path.exists(binp):
        binp = os.path.join(REPO, "target/debug/gworker")
    sock = os.path.join(tmp, "gw.sock")
    data = os.environ.get("GWORKER_BENCH_DATA", os.path.join(tmp, "data"))
    log = open(os.path.join(tmp, "daemon.log"), "w")
    p = subprocess.Popen([binp, "serve", "--data-dir", data, "--socket", sock], stdout=log, stderr=log)
    for _ in range(200):
        if os.path.exists(sock):
            try:
                Api(sock).call("GET", "/v1/health")
                return p, sock, data
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError("daemon did not start; see " + log.name)


def raw_bundle(tmp, rootfs, args):
    b = tempfile.mkdtemp(dir=tmp)
    subprocess.run(["runsc", "spec", "--bundle", b], check=True)
    cfg = json.load(open(os.path.join(b, "config.json")))
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = args
    cfg["root"] = {"path": rootfs, "readonly": False}
    json.dump(cfg, open(os.path.join(b, "config.json"), "w"))
    return b


def runsc_cmd(root):
    return ["runsc", "--root", root, "--network=none", "--overlay2=root:memory"]


def bench_exec(api, sid, runs):
    lat = []
    for _ in range(runs):
        t = time.perf_counter()
        p = api.call("POST", f"/v1/sandboxes/{sid}/exec", {"cmd": ["true"]})
        r = api.call("GET", f"/v1/sandboxes/{sid}/processes/{p['process_id']}/wait?timeout=30")
        lat.append((time.perf_counter() - t) * 1000)
        assert r["exit_code"] == 0, r
    return lat


def bench_raw_exec(tmp, rootfs, runs):
    root = tempfile.mkdtemp(dir=tmp)
    b = raw_bundle(tmp, rootfs, ["sleep", "1000"])
    cid = "bench-raw-exec"
    p = subprocess.Popen(runsc_cmd(root) + ["run", "--bundle", b, cid], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    lat = []
    try:
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run(runsc_cmd(root) + ["exec", cid, "true"], check=True, timeout=30)
            lat.append((time.perf_counter() - t) * 1000)
    finally:
        subprocess.run(runsc_cmd(root) + ["kill", cid, "KILL"], stderr=subprocess.DEVNULL)
        p.wait(timeout=30)
        subprocess.run(runsc_cmd(root) + ["delete", "--force", cid], stderr=subprocess.DEVNULL)
    return lat


def first_byte(api, path):
    api.conn.request("GET", path)
    r = api.conn.getresponse()
    b = r.read1(1) if hasattr(r, "read1") else r.read(1)
    rest = r.read()
    return b + rest


def bench_create(api, runs):
    lat = []
    for _ in range(runs):
        t = time.perf_counter()
        sb = api.call("POST", "/v1/sandboxes", {"image": "busybox", "timeout": 60})
        p = api.call("POST", f"/v1/sandboxes/{sb['sandbox_id']}/exec", {"cmd": ["echo", "hi"]})
        out = first_byte(api, f"/v1/sandboxes/{sb['sandbox_id']}/processes/{p['process_id']}/stdout")
        lat.append((time.perf_counter() - t) * 1000)
        assert out == b"hi\n", out
        api.call("DELETE", f"/v1/sandboxes/{sb['sandbox_id']}", raw=True)
    return lat


def bench_raw_run(tmp, rootfs, runs):
    root = tempfile.mkdtemp(dir=tmp)
    lat = []
    for i in range(runs):
        b = raw_bundle(tmp, rootfs, ["echo", "hi"])
        cid = f"bench-raw-run-{i}"
        t = time.perf_counter()
        p = subprocess.Popen(runsc_cmd(root) + ["run", "--bundle", b, cid], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        line = p.stdout.readline()
        lat.append((time.perf_counter() - t) * 1000)
        assert line == b"hi\n", line
        p.wait(timeout=30)
        subprocess.run(runsc_cmd(root) + ["delete", "--force", cid], stderr=subprocess.DEVNULL)
    return lat


def bench_throughput(api, sid, mb):
    n = mb * 1000 * 1000
    p = api.call("POST", f"/v1/sandboxes/{sid}/exec", {"cmd": ["dd", "if=/dev/zero", "bs=1000000", f"count={mb}"]})
    t = time.perf_counter()
    api.conn.request("GET", f"/v1/sandboxes/{sid}/processes/{p['process_id']}/stdout")
    r = api.conn.getresponse()
    got = 0
    while True:
        b = r.read1(1 << 20)
        if not b:
            break
        got += len(b)
    dt = time.perf_counter() - t
    assert got == n, (got, n)
    return n / dt / 1e6


def bench_raw_throughput(tmp, rootfs, mb):
    root = tempfile.mkdtemp(dir=tmp)
    n = mb * 1000 * 1000
    b = raw_bundle(tmp, rootfs, ["dd", "if=/dev/zero", "bs=1000000", f"count={mb}"])
    t = time.perf_counter()
    p = subprocess.Popen(runsc_cmd(root) + ["run", "--bundle", b, "bench-raw-tp"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    got = 0
    while True:
        c = p.stdout.read1(1 << 20)
        if not c:
            break
        got += len(c)
    dt = time.perf_counter() - t
    p.wait(timeout=60)
    subprocess.run(runsc_cmd(root) + ["delete", "--force", "bench-raw-tp"], stderr=subprocess.DEVNULL)
    assert got == n
    return n / dt / 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exec-runs", type=int, default=300)
    ap.add_argument("--raw-exec-runs", type=int, default=50)
    ap.add_argument("--create-runs", type=int, default=30)
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="gw-bench-")
    daemon = None
    try:
        url = os.environ.get("GWORKER_URL", "")
        if url.startswith("unix://"):
            sock, data = url[len("unix://"):], None
        else:
            daemon, sock, data = start_daemon(tmp)
        api = Api(sock)
        sb = api.call("POST", "/v1/sandboxes", {"image": "busybox", "timeout": 3600})
        sid = sb["sandbox_id"]
        bench_exec(api, sid, 10)  # warm up (also waits for the image build)
        rootfs = os.path.join(data, "images", "busybox", "rootfs") if data else None
        if not rootfs or not os.path.isdir(rootfs):
            import glob
            cands = glob.glob(os.path.join(data or "", "images", "**", "rootfs"), recursive=True)
            rootfs = next((c for c in cands if "busybox" in c), None)
        res = {}
        res["exec_roundtrip_ms"] = summary(bench_exec(api, sid, a.exec_runs))
        res["raw_runsc_exec_ms"] = summary(bench_raw_exec(tmp, rootfs, a.raw_exec_runs))
        res["create_to_first_output_ms"] = summary(bench_create(api, a.create_runs))
        res["raw_runsc_run_to_first_output_ms"] = summary(bench_raw_run(tmp, rootfs, a.create_runs))
        res["stdout_MBps"] = bench_throughput(api, sid, a.mb)
        res["raw_runsc_stdout_MBps"] = bench_raw_throughput(tmp, rootfs, a.mb)
        api.call("DELETE", f"/v1/sandboxes/{sid}", raw=True)
        res["ratios"] = {
            "exec_p50_vs_raw_exec": res["exec_roundtrip_ms"]["p50"] / res["raw_runsc_exec_ms"]["p50"],
            "create_p50_vs_raw_run": res["create_to_first_output_ms"]["p50"] / res["raw_runsc_run_to_first_output_ms"]["p50"],
            "stdout_vs_raw": res["stdout_MBps"] / res["raw_runsc_stdout_MBps"],
        }
        print(f"{'figure':<36}{'p50':>10}{'p95':>10}{'min':>10}{'max':>10}")
        for k, v in res.items():
            if isinstance(v, dict) and "p50" in v:
                print(f"{k:<36}{v['p50']:>10.2f}{v['p95']:>10.2f}{v['min']:>10.2f}{v['max']:>10.2f}")
        print(f"{'stdout_MBps (gworker)':<36}{res['stdout_MBps']:>10.1f}")
        print(f"{'stdout_MBps (raw runsc)':<36}{res['raw_runsc_stdout_MBps']:>10.1f}")
        for k, v in res["ratios"].items():
            print(f"ratio {k:<30}{v:>10.3f}")
        if a.json:
            json.dump(res, open(a.json, "w"), indent=2)
    finally:
        if daemon:
            daemon.kill()
            daemon.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
