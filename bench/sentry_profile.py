#!/usr/bin/env python3
"""Where a sandbox's CPU goes. Starts its own daemon from the release build,
as bench/suite.py does; run as root:

    python3 bench/sentry_profile.py [--image debian-slim] [--seconds 10] [--creates 30]

1. **The sentry during execs.** runsc runs with `--profile` (through a
   wrapper script named by GWORKER_RUNSC) and `runsc debug --profile-cpu`
   records one sandbox's sentry while `echo hi` is exec'd in it back to
   back. The Go CPU profile is decoded here (no Go toolchain needed): the
   sentry's CPU per exec, its share in gVisor's ptrace platform (switching
   to the application and back, once per system call and page fault), in
   system calls, page faults and the Go runtime, and its top functions.
2. **Host CPU per claimed create**, by process: one create at a time from a
   warm pool (create, exec `echo hi`, read its output), each process's
   CPU (all threads, from schedstat) read before and after. "sentry"
   counts runsc's sandbox process and its children (the ptrace stubs that
   run the sandbox's processes).

What bench/RESULTS.md's "Session 14" uses.
"""
import argparse
import gzip
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402
from suite import RUNSC, Daemon, family, gw_create_first_output, proc_table, read, reap_all  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- pprof

def _varint(b, i):
    x = shift = 0
    while True:
        c = b[i]
        i += 1
        x |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return x, i


def _fields(b):
    """(field number, wire type, value) of each field of a protobuf message."""
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        field, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(b, i)
        elif wt == 2:
            n, i = _varint(b, i)
            v, i = b[i:i + n], i + n
        elif wt == 1:
            v, i = b[i:i + 8], i + 8
        elif wt == 5:
            v, i = b[i:i + 4], i + 4
        else:
            raise ValueError(f"protobuf wire type {wt} at {i}")
        yield field, wt, v


def _ints(wt, v):
    """A repeated integer field's values: packed (wire type 2) or one."""
    if wt == 0:
        return [v]
    out, i = [], 0
    while i < len(v):
        x, i = _varint(v, i)
        out.append(x)
    return out


def parse_pprof(data):
    """A Go CPU profile (profile.proto) as a list of (stack, nanoseconds),
    each stack the function names from the innermost out."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    strings, types, raw_samples, locs, funcs = [], [], [], {}, {}
    for f, wt, v in _fields(data):
        if f == 1:  # sample_type: ValueType {type, unit} (string indexes)
            t = {ff: vv for ff, _, vv in _fields(v)}
            types.append((t.get(1, 0), t.get(2, 0)))
        elif f == 2:  # sample: location ids (leaf first), values
            ids, vals = [], []
            for ff, w2, vv in _fields(v):
                if ff == 1:
                    ids += _ints(w2, vv)
                elif ff == 2:
                    vals += _ints(w2, vv)
            raw_samples.append((ids, vals))
        elif f == 4:  # location: id, lines (inlined callee first), each a function id
            lid, fids = 0, []
            for ff, _, vv in _fields(v):
                if ff == 1:
                    lid = vv
                elif ff == 4:
                    fids.append({a: c for a, _, c in _fields(vv)}.get(1, 0))
            locs[lid] = fids
        elif f == 5:  # function: id, name (string index)
            d = {ff: vv for ff, _, vv in _fields(v)}
            funcs[d.get(1, 0)] = d.get(2, 0)
        elif f == 6:
            strings.append(v.decode(errors="replace"))
    names = {fid: strings[si] for fid, si in funcs.items()}
    kinds = [strings[t] for t, _ in types]
    col = kinds.index("cpu") if "cpu" in kinds else len(kinds) - 1
    out = []
    for ids, vals in raw_samples:
        stack = [names.get(fid, "?") for lid in ids for fid in locs.get(lid, [])]
        out.append((stack, vals[col]))
    return out


#: Where the sentry's time goes, by a function on the stack (first match wins).
CATEGORIES = [
    ("ptrace platform: switch to the application and back",
     "platform/ptrace.(*context).Switch"),
    ("page faults (HandleUserFault)", "mm.(*MemoryManager).HandleUserFault"),
    ("execve (loading the program)", "syscalls/linux.Execve"),
    ("other system calls", "kernel.(*Task).executeSyscall"),
    ("Go garbage collector", "runtime.gcBgMarkWorker"),
]


def report_profile(samples, execs, top):
    total = sum(ns for _, ns in samples)
    print(f"sentry CPU: {total / 1e9:.2f} s for {execs} execs = {total / 1e6 / max(execs, 1):.2f} ms per exec")
    cat = Counter()
    for stack, ns in samples:
        for label, fn in CATEGORIES:
            if any(fn in s for s in stack):
                cat[label] += ns
                break
        else:
            cat["everything else"] += ns
    for label, _ in CATEGORIES + [("everything else", "")]:
        print(f"  {cat[label] / total * 100:5.1f}%  {label}")
    flat, cum = Counter(), Counter()
    for stack, ns in samples:
        if stack:
            flat[stack[0]] += ns
        for s in set(stack):
            cum[s] += ns
    print(f"top {top} functions by own time (flat) and with callees (cum):")
    for (fn, ns), (cfn, cns) in zip(flat.most_common(top), cum.most_common(top)):
        print(f"  {ns / total * 100:5.1f}% {fn[-58:]:58}  {cns / total * 100:5.1f}% {cfn[-58:]}")


def profile_execs(d, image, seconds, top):
    api = d.api()
    sid = api.call("POST", "/v1/sandboxes", {"image": image, "timeout": 600})["sandbox_id"]

    def one_exec():
        p = api.call("POST", f"/v1/sandboxes/{sid}/exec", {"cmd": ["echo", "hi"]})
        r = api.call("GET", f"/v1/sandboxes/{sid}/processes/{p['process_id']}/wait?timeout=30")
        assert r["exit_code"] == 0, r

    for _ in range(20):  # warm-up: the image's files in gVisor's caches
        one_exec()
    out = os.path.join(d.dir, "sentry.pprof")
    prof = subprocess.Popen([RUNSC, "--root", os.path.join(d.data, "runsc"), "debug", "--profile-cpu", out,
                             "--duration", f"{seconds + 1}s", sid],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    t, n = time.monotonic(), 0
    while time.monotonic() - t < seconds:
        one_exec()
        n += 1
    _, err = prof.communicate()
    if prof.returncode != 0 or not os.path.exists(out):
        raise RuntimeError(f"runsc debug --profile-cpu failed: {err.decode(errors='replace')[-500:]}")
    api.call("DELETE", f"/v1/sandboxes/{sid}", raw=True)
    print(f"\n== {image}: the sentry during {n} execs of `echo hi` ({n / seconds:.0f}/s, one at a time)")
    report_profile(parse_pprof(open(out, "rb").read()), n, top)


# ---------------------------------------------------------------- per create

def task_ns(pid):
    """CPU of all of a process's threads, in ns (schedstat)."""
    total = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            s = read(f"/proc/{pid}/task/{t}/schedstat")
            if s:
                total += int(s.split()[0])
    except OSError:
        pass
    return total


def by_kind(daemon_pid):
    table = proc_table()
    sentry = family(["runsc-sandbox"], table)
    kinds = {}
    for pid, (_, cmd) in table.items():
        if pid in sentry:
            k = "sentry (with its ptrace stubs)"
        elif b"gofer" in cmd:
            k = "gofer"
        elif b"supervise" in cmd:
            k = "supervisor"
        elif pid == daemon_pid:
            k = "daemon"
        else:
            continue
        kinds[pid] = (k, task_ns(pid))
    return kinds


def host_cpu(d, fn):
    """Host CPU of each kind of process (ms) while fn() runs."""
    suite.HOLDING.set()  # a terminate waits until after the second reading
    a = by_kind(d.proc.pid)
    c0 = time.process_time()
    fn()
    c1 = time.process_time()
    b = by_kind(d.proc.pid)
    suite.release_held()
    sums = Counter()
    for pid, (k, ns) in b.items():
        sums[k] += ns - (a[pid][1] if pid in a and a[pid][0] == k else 0)
    sums["client (this Python process)"] = (c1 - c0) * 1e9
    return {k: ns / 1e6 for k, ns in sums.items()}


def print_cpu(title, runs):
    print(title)
    kinds = {k for r in runs for k in r}
    for k in sorted(kinds, key=lambda k: -statistics.median(r.get(k, 0) for r in runs)):
        print(f"  {statistics.median(r.get(k, 0) for r in runs):6.2f} ms  {k}")
    print(f"  {statistics.median(sum(r.values()) for r in runs):6.2f} ms  all of them (median of the sums)")


def per_create(d, image, n):
    runs = []
    for _ in range(n):
        reap_all()
        d.wait_pool_full(quiet=True)
        time.sleep(0.5)
        runs.append(host_cpu(d, lambda: gw_create_first_output(image)))
    reap_all()
    print_cpu(f"\n== {image}: host CPU per claimed create (create, exec `echo hi`, read it), {n} one at a time",
              runs)
    # The same exec in a sandbox that has run 20 already: what the claim
    # and the sandbox's first command add.
    sb = suite.Sandbox.create(image=suite.Image.from_name(image), timeout=600)
    try:
        for _ in range(20):
            assert sb.exec(["echo", "hi"]).stdout.read() == "hi\n"
        runs = []
        for _ in range(n):
            time.sleep(0.2)
            runs.append(host_cpu(d, lambda: sb.exec(["echo", "hi"]).stdout.read()))
        print_cpu(f"== {image}: host CPU per exec `echo hi` (and read it) in a sandbox that ran 20 already", runs)
    finally:
        sb.terminate()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", action="append", help="busybox and/or debian-slim (default both)")
    ap.add_argument("--seconds", type=float, default=10, help="length of the exec profile (default 10)")
    ap.add_argument("--creates", type=int, default=30, help="claimed creates measured (default 30)")
    ap.add_argument("--top", type=int, default=25, help="functions listed (default 25)")
    a = ap.parse_args()
    images = a.image or ["busybox", "debian-slim"]
    tmp = tempfile.mkdtemp(prefix="gw-sentry-prof-", dir="/tmp")
    wrapper = os.path.join(tmp, "runsc-profile")
    with open(wrapper, "w") as f:
        f.write(f'#!/bin/sh\nexec {RUNSC} --profile "$@"\n')
    os.chmod(wrapper, 0o755)
    old = os.environ.get("GWORKER_RUNSC")
    os.environ["GWORKER_RUNSC"] = wrapper
    binp = str(ROOT / "target/release/gworker")
    agent = str(ROOT / "target/x86_64-unknown-linux-gnu/release/gworker-agent")
    try:
        d = Daemon(tmp, "prof", binp, agent, {})
        try:
            for image in images:
                profile_execs(d, image, a.seconds, a.top)
        finally:
            d.stop()
        if old is None:
            del os.environ["GWORKER_RUNSC"]
        else:
            os.environ["GWORKER_RUNSC"] = old
        d = Daemon(tmp, "pool", binp, agent, {}, pool={i: 4 for i in images}, pool_mb=len(images) * 4 * 50 + 512)
        try:
            d.use()
            for image in images:
                per_create(d, image, a.creates)
        finally:
            d.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
