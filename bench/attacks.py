#!/usr/bin/env python3
"""Attacks and load: how a neighbour and the daemon fare while one sandbox
attacks, and what a create -> exec -> terminate load leaves behind.

Issue: "Resource limits, network policy, and holding up against hostile code,
load and faults".

  1. Neighbour exec latency: a separate busybox sandbox runs `echo n` exec
     round trips (exec + read stdout + wait, Python client) in a loop, in its
     own process (so the GIL of this one does not skew it). Measured while
     idle (a baseline window right before each attack, on this noisy machine)
     and while another sandbox runs an attack:
       - memory bomb: python3 in debian-slim allocating until OOM-killed under
         `memory=` (expected exit 137, reason `oom`);
       - fork bomb: `b(){ b|b& }; b` under `max_processes=`;
       - CPU hog: busy loops on all host cores under `cpu=1`, ~10 s (the
         sandbox's CPU use and CFS throttling are recorded);
       - root filesystem fill: `dd` into / until it fails (the root overlay is
         in memory, so it counts against `memory=`);
       - stdout flood: 1 GiB from `dd` read by the client (throughput, the
         daemon's and the attacked supervisor's peak RSS from VmRSS every 50 ms).
     Memory bomb, fork bomb, fill and flood are repeated within a window; only
     the time from the attack's exec to its end counts (the attacker's boot
     does not). Every single attack is bounded (<= 30 s). Ratios: attack p95 /
     idle p95 (the idle window just before, and all idle windows pooled).
  2. Daemon responsiveness: `GET /v1/health` latency (its own process, every
     50 ms) in the same windows.
  3. Load: T client threads x C create -> exec `echo` -> terminate cycles on
     busybox (default network policy): throughput and p50/p95 of each step,
     then a leak check (processes, DATA/sandboxes, DATA/sock, DATA/runsc,
     /run/netns/gw-ID, DATA/net/ID.json, mounts) for those IDs.

Builds the release CLI (`cargo build --release -p gworker-cli`, default target
dir) unless --no-build, starts its own daemon on a temporary data dir, prints
a table and optionally writes JSON. As root:

  python3 bench/attacks.py [--load-threads 10] [--load-cycles 100] [--json out.json]
"""
import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "clients", "python", "src"))
from engine import Api, pct, start_daemon  # noqa: E402

from gworker_client import Image, Sandbox  # noqa: E402

MEMORY_BOMB = "b = []\nwhile True:\n    b.append(b'\\x01' * (32 << 20))\n"
ID_RE = re.compile(r"sb-[0-9a-f]{32}")
ATTACKS = ["memory_bomb", "fork_bomb", "cpu_hog", "rootfs_fill", "stdout_flood"]


# --------------------------------------------------------------------------
# Probe processes (neighbour exec, /v1/health): one line per sample
# --------------------------------------------------------------------------


def probe_main(a):
    stop = threading.Event()

    def watch_stdin():
        try:
            sys.stdin.read()
        finally:
            stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    out = open(a.out, "w", buffering=1)
    if a.probe == "exec":
        sb = Sandbox.lookup(a.sandbox)
    else:
        api = Api(a.sock)
    while not stop.is_set():
        t0 = time.monotonic()
        ok, err = True, ""
        try:
            if a.probe == "exec":
                p = sb.exec(["echo", "n"])
                got = p.stdout.read()
                code = p.wait(timeout=60)
                ok = got == "n\n" and code == 0
                if not ok:
                    err = f"out={got!r} code={code}"
            else:
                r = api.call("GET", "/v1/health")
                ok = isinstance(r, dict) and r.get("status") == "ok"
                if not ok:
                    err = repr(r)[:100]
        except Exception as e:  # recorded, the loop goes on
            ok, err = False, f"{type(e).__name__}: {e}"[:200]
            if a.probe == "health":
                api = Api(a.sock)
        lat = (time.monotonic() - t0) * 1000
        out.write(json.dumps([t0, lat, ok, err]) + "\n")
        stop.wait(a.interval)
    out.close()


class Probe:
    def __init__(self, kind, sock, sandbox_id, tmp, interval):
        self.path = os.path.join(tmp, f"probe-{kind}.jsonl")
        env = dict(os.environ, GWORKER_URL="unix://" + sock)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--probe", kind, "--sock", sock,
             "--sandbox", sandbox_id or "", "--out", self.path, "--interval", str(interval)],
            stdin=subprocess.PIPE, env=env)

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def samples(self):
        rows = []
        try:
            with open(self.path) as f:
                for line in f:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass
        except OSError:
            pass
        return rows


# --------------------------------------------------------------------------
# RSS sampling (VmRSS every 50 ms)
# --------------------------------------------------------------------------


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler(threading.Thread):
    def __init__(self, interval=0.05):
        super().__init__(daemon=True)
        self.pids = {}
        self.rows = []  # (t, key, kib)
        self.interval = interval
        self.halt = threading.Event()
        self.lock = threading.Lock()

    def watch(self, key, pid):
        with self.lock:
            if pid:
                self.pids[key] = pid
            else:
                self.pids.pop(key, None)

    def run(self):
        while not self.halt.is_set():
            t = time.monotonic()
            with self.lock:
                pids = dict(self.pids)
            for k, p in pids.items():
                v = rss_kib(p)
                if v:
                    self.rows.append((t, k, v))
            self.halt.wait(self.interval)

    def peak(self, key, intervals):
        vals = [v for t, k, v in self.rows if k == key and any(a <= t <= b for a, b in intervals)]
        return max(vals) if vals else None


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def stats(rows, intervals):
    sel = [r for r in rows if any(a <= r[0] <= b for a, b in intervals)]
    lat = [r[1] for r in sel if r[2]]
    errs = [r[3] for r in sel if not r[2]]
    out = {"n": len(lat), "errors": len(errs)}
    if errs:
        out["first_errors"] = errs[:3]
    if lat:
        out.update({"p50": pct(lat, 50), "p95": pct(lat, 95), "max": max(lat), "min": min(lat)})
    return out


def lat_summary(xs):
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "p50": pct(xs, 50), "p95": pct(xs, 95), "max": max(xs), "min": min(xs)}


def pgrep(pattern):
    out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        pid, _, cmd = line.partition(" ")
        if int(pid) != os.getpid() and "pgrep" not in cmd:
            rows.append((int(pid), cmd))
    return rows


def supervisor_pid(data, sid):
    for pid, cmd in pgrep(sid):
        if " supervise " in cmd and os.path.join(data, "sandboxes", sid) in cmd:
            return pid
    return None


def read_kv(path):
    try:
        with open(path) as f:
            return {k: int(v) for k, v in (line.split() for line in f if line.strip())}
    except OSError:
        return {}


def cgroup_cpu_ticks(sid):
    """utime+stime (clock ticks) of the processes in the sandbox's cpu cgroup."""
    total = 0
    try:
        with open(f"/sys/fs/cgroup/cpu/gworker/{sid}/cgroup.procs") as f:
            pids = [int(x) for x in f.read().split()]
    except OSError:
        return None
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total


def host_net_counts():
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    chains = subprocess.run(["iptables", "-S"], capture_output=True, text=True).stdout
    return {"gwh_links": len(re.findall(r"\d+: gwh-", links)),
            "gw_slot_chains": len(re.findall(r"^-N GW-\d+$", chains, re.M))}


def leftovers(data, ids, daemon_pid, live=()):
    """Everything on the host for these sandbox IDs, plus processes mentioning
    the data dir that belong to no live sandbox (the daemon excepted)."""
    ids = set(ids)
    live = set(live)
    found = {}
    mountinfo = open("/proc/self/mountinfo").read()
    runsc_dir = os.path.join(data, "runsc")
    runsc_state = os.listdir(runsc_dir) if os.path.isdir(runsc_dir) else []
    procs = pgrep(data)
    for sid in ids:
        items = [f"process {pid}: {cmd[:160]}" for pid, cmd in procs if sid in cmd]
        for sub in ("sandboxes", "sock"):
            if os.path.exists(os.path.join(data, sub, sid)):
                items.append(f"{sub}/{sid}")
        items += [f"runsc/{n}" for n in runsc_state if sid in n]
        items += [f"mount: {line[:200]}" for line in mountinfo.splitlines() if sid in line]
        if os.path.exists(f"/run/netns/gw-{sid}"):
            items.append(f"netns gw-{sid}")
        if os.path.exists(os.path.join(data, "net", f"{sid}.json")):
            items.append(f"net/{sid}.json")
        if items:
            found[sid] = items
    stray = [f"{pid}: {cmd[:160]}" for pid, cmd in procs
             if pid != daemon_pid and not (set(ID_RE.findall(cmd)) & live)
             and not any(sid in cmd for sid in ids)]
    if stray:
        found["processes mentioning the data dir (no sandbox id of ours)"] = stray
    return found


def wait_no_leftovers(data, ids, daemon_pid, live=(), timeout=30.0):
    t0 = time.monotonic()
    first = leftovers(data, ids, daemon_pid, live)
    left = first
    while left and time.monotonic() - t0 < timeout:
        time.sleep(0.5)
        left = leftovers(data, ids, daemon_pid, live)
    return {"at_first_check": first, "after_wait": left,
            "clean_after_s": None if left else round(time.monotonic() - t0, 1), "waited_max_s": timeout}


# --------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------


class Bench:
    def __init__(self, a, tmp, data, sock, daemon):
        self.a = a
        self.tmp = tmp
        self.data = data
        self.sock = sock
        self.daemon = daemon
        self.ids = []  # every sandbox this run created
        self.live = set()
        self.intervals = []  # (phase name, t0, t1)
        self.sampler = RssSampler()
        self.bb = Image.from_name("busybox")
        self.py = Image.debian_slim()

    def create(self, **kw):
        kw.setdefault("image", self.bb)
        sb = Sandbox.create(**kw)
        self.ids.append(sb.sandbox_id)
        self.live.add(sb.sandbox_id)
        return sb

    def terminate(self, sb):
        try:
            sb.terminate()
        finally:
            self.live.discard(sb.sandbox_id)

    def ready(self, sb):
        p = sb.exec(["true"])
        p.wait(timeout=120)

    def mark(self, name, t0, t1):
        self.intervals.append((name, t0, t1))

    # ----- attacks -----

    def repeat(self, name, once, max_reps):
        reps = []
        end = time.monotonic() + self.a.attack_window
        while time.monotonic() < end and len(reps) < max_reps:
            reps.append(once(name))
        return reps

    def _attacker(self, image, **limits):
        sb = self.create(image=image, timeout=90, **limits)
        self.ready(sb)
        self.sampler.watch("attacked_supervisor", supervisor_pid(self.data, sb.sandbox_id))
        return sb

    def _finish(self, sb, rec, t0):
        rec["duration_s"] = round(time.monotonic() - t0, 2)
        rec.setdefault("peak_rss_supervisor_mib",
                       _mib(self.sampler.peak("attacked_supervisor", [(t0, time.monotonic())])))
        self.mark(rec["attack"], t0, time.monotonic())
        self.sampler.watch("attacked_supervisor", None)
        self.terminate(sb)
        return rec

    def memory_bomb(self, name):
        sb = self._attacker(self.py, memory=self.a.memory)
        rec = {"attack": name, "memory_mib": self.a.memory, "sandbox_id": sb.sandbox_id}
        t0 = time.monotonic()
        try:
            sb.exec(["python3", "-c", MEMORY_BOMB])
            rec["exit_code"] = sb.wait(timeout=30)
            rec["reason"] = sb.exit_reason
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"
        return self._finish(sb, rec, t0)

    def fork_bomb(self, name):
        sb = self._attacker(self.bb, max_processes=self.a.max_processes)
        rec = {"attack": name, "max_processes": self.a.max_processes, "sandbox_id": sb.sandbox_id}
        t0 = time.monotonic()
        try:
            sb.exec(["sh", "-c", "b(){ b|b& }; b"])
            rec["exit_code"] = sb.wait(timeout=30)
            rec["reason"] = sb.exit_reason
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["reason"] = reason_of(sb)
        return self._finish(sb, rec, t0)

    def cpu_hog(self, name):
        ncpu = os.cpu_count() or 1
        sb = self._attacker(self.bb, cpu=1)
        sid = sb.sandbox_id
        rec = {"attack": name, "cpu_limit": 1.0, "busy_loops": ncpu, "sandbox_id": sid}
        st0, ticks0 = read_kv(f"/sys/fs/cgroup/cpu/gworker/{sid}/cpu.stat"), cgroup_cpu_ticks(sid)
        t0 = time.monotonic()
        try:
            sb.exec(["sh", "-c", f"for i in $(seq {ncpu}); do (while :; do :; done) & done; wait"])
            time.sleep(self.a.cpu_secs)
            t1 = time.monotonic()
            st1, ticks1 = read_kv(f"/sys/fs/cgroup/cpu/gworker/{sid}/cpu.stat"), cgroup_cpu_ticks(sid)
            if ticks0 is not None and ticks1 is not None:
                rec["cores_used"] = round((ticks1 - ticks0) / os.sysconf("SC_CLK_TCK") / (t1 - t0), 3)
            if st0 and st1:
                rec["nr_throttled"] = st1.get("nr_throttled", 0) - st0.get("nr_throttled", 0)
                rec["nr_periods"] = st1.get("nr_periods", 0) - st0.get("nr_periods", 0)
                rec["throttled_s"] = round((st1.get("throttled_time", 0) - st0.get("throttled_time", 0)) / 1e9, 2)
            rec["still_running"] = sb.poll() is None
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"
        return self._finish(sb, rec, t0)

    def rootfs_fill(self, name):
        sb = self._attacker(self.bb, memory=self.a.memory)
        rec = {"attack": name, "memory_mib": self.a.memory, "sandbox_id": sb.sandbox_id}
        t0 = time.monotonic()
        try:
            p = sb.exec(["sh", "-c", "dd if=/dev/zero of=/fill bs=1048576; echo dd_exit=$?; ls -l /fill"])
            try:
                rec["process_exit_code"] = p.wait(timeout=30)
            except Exception as e:
                rec["process_error"] = f"{type(e).__name__}: {e}"[:200]
            try:
                rec["exit_code"] = sb.wait(timeout=5)
                rec["reason"] = sb.exit_reason
            except Exception:
                rec["exit_code"], rec["reason"] = None, "sandbox still running"
                try:
                    rec["output"] = (p.stdout.read() + p.stderr.read())[-300:]
                except Exception:
                    pass
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"
        return self._finish(sb, rec, t0)

    def stdout_flood(self, name):
        sb = self._attacker(self.bb)
        rec = {"attack": name, "bytes_expected": self.a.flood_mib << 20, "sandbox_id": sb.sandbox_id}
        t0 = time.monotonic()
        try:
            p = sb.exec(["dd", "if=/dev/zero", "bs=1048576", f"count={self.a.flood_mib}"])
            n = 0
            for chunk in p.stdout.iter_bytes():
                n += len(chunk)
                if time.monotonic() - t0 > 30:
                    rec["cut_at_30s"] = True
                    break
            dt = time.monotonic() - t0
            rec["bytes"] = n
            rec["seconds"] = round(dt, 2)
            rec["MBps"] = round(n / dt / 1e6, 1)
            if not rec.get("cut_at_30s"):
                rec["exit_code"] = p.wait(timeout=30)
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"
        t_end = time.monotonic()
        rec["peak_rss_daemon_mib"] = _mib(self.sampler.peak("daemon", [(t0, t_end)]))
        rec["peak_rss_supervisor_mib"] = _mib(self.sampler.peak("attacked_supervisor", [(t0, t_end)]))
        return self._finish(sb, rec, t0)

    def idle(self, name):
        t0 = time.monotonic()
        time.sleep(self.a.idle_secs)
        self.mark(name, t0, time.monotonic())

    # ----- load -----

    def load(self):
        threads, cycles = self.a.load_threads, self.a.load_cycles
        lat = {"create": [], "exec": [], "terminate": [], "cycle": []}
        ids, errors = [], []
        lock = threading.Lock()

        def worker(n):
            for i in range(cycles):
                sb = None
                try:
                    t0 = time.monotonic()
                    sb = Sandbox.create(image=self.bb, timeout=120)
                    t1 = time.monotonic()
                    with lock:
                        ids.append(sb.sandbox_id)
                        self.ids.append(sb.sandbox_id)
                    proc = sb.exec(["echo", f"{n}-{i}"])
                    out = proc.stdout.read()
                    code = proc.wait(timeout=120)
                    t2 = time.monotonic()
                    sb.terminate()
                    sb = None
                    t3 = time.monotonic()
                    if out != f"{n}-{i}\n" or code != 0:
                        raise AssertionError(f"exec gave {out!r}, {code}")
                    with lock:
                        lat["create"].append((t1 - t0) * 1000)
                        lat["exec"].append((t2 - t1) * 1000)
                        lat["terminate"].append((t3 - t2) * 1000)
                        lat["cycle"].append((t3 - t0) * 1000)
                except Exception as e:
                    with lock:
                        errors.append(f"thread {n} cycle {i}: {type(e).__name__}: {e}"[:300])
                    if sb is not None:
                        try:
                            sb.terminate()
                        except Exception:
                            pass

        nets0 = host_net_counts()
        start = time.monotonic()
        pool = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(timeout=max(60, threads * cycles * 30) - (time.monotonic() - start))
        elapsed = time.monotonic() - start
        self.mark("load", start, time.monotonic())
        hung = sum(t.is_alive() for t in pool)
        done = len(lat["cycle"])
        res = {"threads": threads, "cycles_per_thread": cycles, "cycles_done": done,
               "cycles_failed": len(errors), "threads_still_running": hung, "elapsed_s": round(elapsed, 1),
               "cycles_per_s": round(done / elapsed, 2), "errors": errors[:20],
               "peak_rss_daemon_mib": _mib(self.sampler.peak("daemon", [(start, time.monotonic())]))}
        for k, v in lat.items():
            res[k + "_ms"] = lat_summary(v)
        try:
            listed = {s["sandbox_id"] for s in Api(self.sock).call("GET", "/v1/sandboxes")["sandboxes"]}
            res["still_listed"] = sorted(set(ids) & listed)
        except Exception as e:
            res["still_listed"] = f"could not list: {e}"
        res["leaks"] = wait_no_leftovers(self.data, ids, self.daemon.pid, self.live)
        res["host_net_counts_before_after"] = [nets0, host_net_counts()]
        return res


def reason_of(sb):
    try:
        return sb.exit_reason
    except Exception as e:
        return f"(could not get: {type(e).__name__})"


def _mib(kib):
    return None if kib is None else round(kib / 1024, 1)


def build():
    env = dict(os.environ)
    env.pop("CARGO_TARGET_DIR", None)
    t = time.monotonic()
    r = subprocess.run(["cargo", "build", "--release", "-p", "gworker-cli"], cwd=REPO, env=env)
    if r.returncode != 0:
        sys.exit(f"cargo build --release -p gworker-cli failed ({r.returncode})")
    return round(time.monotonic() - t, 1)


def unmount_under(path):
    try:
        lines = open("/proc/self/mountinfo").read().splitlines()
    except OSError:
        return []
    done = []
    for line in lines:
        target = line.split(" ")[4]
        if target.startswith(path.rstrip("/") + "/"):
            subprocess.run(["umount", "-l", target], capture_output=True)
            done.append(target)
    return done


def fmt(v, w=8, d=1):
    if v is None:
        return f"{'-':>{w}}"
    if isinstance(v, float):
        return f"{v:>{w}.{d}f}"
    return f"{v!s:>{w}}"


def outcome_text(name, reps):
    if not reps:
        return ""
    if name in ("memory_bomb", "fork_bomb", "rootfs_fill"):
        outs = {}
        for r in reps:
            k = r.get("error") or f"{r.get('exit_code')}/{r.get('reason')}"
            outs[k] = outs.get(k, 0) + 1
        durs = [r["duration_s"] for r in reps]
        return (", ".join(f"{k} x{v}" for k, v in outs.items())
                + f"; ends after {min(durs):.1f}-{max(durs):.1f} s")
    if name == "cpu_hog":
        r = reps[0]
        return (f"{r.get('busy_loops')} loops, cores used {r.get('cores_used')}, throttled "
                f"{r.get('nr_throttled')}/{r.get('nr_periods')} periods ({r.get('throttled_s')} s)"
                + (f"; {r['error']}" if r.get("error") else ""))
    if name == "stdout_flood":
        return "; ".join(
            (f"{r.get('bytes', 0) / (1 << 20):.0f} MiB {r.get('MBps')} MB/s, peak RSS daemon "
             f"{r.get('peak_rss_daemon_mib')} MiB, supervisor {r.get('peak_rss_supervisor_mib')} MiB")
            + (f" ERROR {r['error']}" if r.get("error") else "") for r in reps)
    return ""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--load-threads", type=int, default=10)
    ap.add_argument("--load-cycles", type=int, default=100)
    ap.add_argument("--idle-secs", type=float, default=10.0, help="idle baseline window before each attack")
    ap.add_argument("--attack-window", type=float, default=20.0,
                    help="repeat short attacks (bombs, fill, flood) within this many seconds")
    ap.add_argument("--memory", type=int, default=256, help="MiB limit for the memory bomb and the fill")
    ap.add_argument("--max-processes", type=int, default=64)
    ap.add_argument("--cpu-secs", type=float, default=10.0)
    ap.add_argument("--flood-mib", type=int, default=1024)
    ap.add_argument("--only", default=",".join(ATTACKS), help="comma-separated attacks to run")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--probe-interval", type=float, default=0.05)
    # internal: the probe processes
    ap.add_argument("--probe", choices=["exec", "health"], help=argparse.SUPPRESS)
    ap.add_argument("--sock", help=argparse.SUPPRESS)
    ap.add_argument("--sandbox", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--interval", type=float, default=0.05, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.probe:
        return probe_main(a)

    res = {"started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "command": " ".join(sys.argv),
           "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "loadavg_start": os.getloadavg()}}
    try:
        res["git_head"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                         capture_output=True, text=True).stdout.strip()
        res["host"]["runsc"] = subprocess.run(["runsc", "--version"], capture_output=True,
                                              text=True).stdout.splitlines()[0]
    except Exception:
        pass
    if not a.no_build:
        res["build_s"] = build()
    os.environ.pop("GWORKER_BENCH_DATA", None)
    os.environ.pop("GWORKER_BIN", None)  # the release binary just built
    tmp = tempfile.mkdtemp(prefix="gw-atk-", dir="/tmp")
    daemon = None
    bench = None
    probes = []
    failures = []
    try:
        daemon, sock, data = start_daemon(tmp)
        os.environ["GWORKER_URL"] = "unix://" + sock
        os.environ.pop("GWORKER_TOKEN", None)
        bench = Bench(a, tmp, data, sock, daemon)
        # Images first (a fresh data dir: debian-slim is built here, ~30 s+).
        t = time.monotonic()
        warm = bench.create(image=bench.py, timeout=300)
        p = warm.exec(["python3", "-c", "print(1)"])
        assert p.stdout.read() == "1\n", "debian-slim does not run python3"
        bench.terminate(warm)
        res["image_build_and_first_python_s"] = round(time.monotonic() - t, 1)
        neighbour = bench.create(timeout=7200)
        bench.ready(neighbour)
        bench.sampler.watch("daemon", daemon.pid)
        bench.sampler.start()
        probes = [Probe("exec", sock, neighbour.sandbox_id, tmp, a.probe_interval),
                  Probe("health", sock, None, tmp, a.probe_interval)]
        time.sleep(2)  # let the probes connect
        attacks = {}
        for name in [x for x in a.only.split(",") if x]:
            if name not in ATTACKS:
                raise SystemExit(f"unknown attack {name}; known: {ATTACKS}")
            bench.idle(f"idle before {name}")
            max_reps = {"cpu_hog": 1, "stdout_flood": 3}.get(name, 40)
            try:
                if name == "cpu_hog":
                    attacks[name] = [bench.cpu_hog(name)]
                else:
                    attacks[name] = bench.repeat(name, getattr(bench, name), max_reps)
            except Exception as e:
                failures.append(f"{name}: {type(e).__name__}: {e}")
                attacks.setdefault(name, [])
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {outcome_text(name, attacks[name])}", flush=True)
        bench.idle("idle at the end" if a.skip_load else "idle before load")
        res["attacks"] = attacks
        if not a.skip_load:
            print(f"[{time.strftime('%H:%M:%S')}] load: {a.load_threads} threads x {a.load_cycles} cycles",
                  flush=True)
            res["load"] = bench.load()
        for pr in probes:
            pr.stop()
        exec_rows, health_rows = probes[0].samples(), probes[1].samples()
        # Per phase: neighbour exec, health, daemon RSS.
        phases = {}
        for name, t0, t1 in bench.intervals:
            phases.setdefault(name, []).append((t0, t1))
        idle_all = [iv for n, ivs in phases.items() if n.startswith("idle") for iv in ivs]
        pooled = {"neighbour_exec_ms": stats(exec_rows, idle_all), "health_ms": stats(health_rows, idle_all),
                  "peak_rss_daemon_mib": _mib(bench.sampler.peak("daemon", idle_all))}
        table = {"idle (all windows pooled)": pooled}
        for name, ivs in phases.items():
            table[name] = {"neighbour_exec_ms": stats(exec_rows, ivs), "health_ms": stats(health_rows, ivs),
                           "peak_rss_daemon_mib": _mib(bench.sampler.peak("daemon", ivs)),
                           "windows": len(ivs), "seconds": round(sum(b - a_ for a_, b in ivs), 1)}
        for name in list(attacks) + (["load"] if "load" in table else []):
            if name not in table:
                continue
            row = table[name]
            before = table.get(f"idle before {name}")
            row["ratios"] = {}
            for k in ("neighbour_exec_ms", "health_ms"):
                p95 = row[k].get("p95")
                if p95 is not None and before and before[k].get("p95"):
                    row["ratios"][k + "_p95_vs_idle_before"] = p95 / before[k]["p95"]
                if p95 is not None and pooled[k].get("p95"):
                    row["ratios"][k + "_p95_vs_idle_pooled"] = p95 / pooled[k]["p95"]
        res["phases"] = table
        bench.sampler.halt.set()
        # Everything this run made, after the neighbour too is gone.
        bench.terminate(neighbour)
        res["leaks_all_sandboxes_of_this_run"] = wait_no_leftovers(data, bench.ids, daemon.pid, bench.live)
        res["sandboxes_created"] = len(bench.ids)
        res["loadavg_end"] = os.getloadavg()
        res["failures"] = failures
        report(res, a)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=2)
    finally:
        for pr in probes:
            try:
                pr.stop()
            except Exception:
                pass
        if bench is not None:
            bench.sampler.halt.set()
            for sid in list(bench.live):
                try:
                    Api(sock).call("DELETE", f"/v1/sandboxes/{sid}", raw=True)
                except Exception:
                    pass
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
            data_dir = os.path.join(tmp, "data")
            after = [(pid, cmd) for pid, cmd in pgrep(data_dir)]
            if after:
                print(f"WARNING: processes still mention {data_dir} after the daemon stopped: {after[:5]}")
            unmount_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(tmp):
            print(f"WARNING: could not remove {tmp}")


def report(res, a):
    print()
    print(f"run {res['started_utc']} UTC; load average at start {res['host']['loadavg_start'][0]:.2f}, "
          f"at end {res['loadavg_end'][0]:.2f}; {res['host']['cpus']} CPUs")
    hdr = (f"{'phase':<26}{'exec n':>7}{'p50':>8}{'p95':>8}{'max':>8}{'err':>5}{'x idle':>8}{'x pool':>8}"
           f"{'hlth n':>7}{'p50':>7}{'p95':>7}{'max':>8}{'x idle':>7}{'RSS d':>7}")
    print("neighbour exec `echo n` round trip and GET /v1/health, ms; x idle = p95 / p95 of the idle window "
          "just before; x pool = p95 / all idle windows; RSS d = daemon peak VmRSS, MiB")
    print(hdr)
    print("-" * len(hdr))
    for name, row in res["phases"].items():
        e, h, r = row["neighbour_exec_ms"], row["health_ms"], row.get("ratios", {})
        print(f"{name[:26]:<26}{e['n']:>7}{fmt(e.get('p50'))}{fmt(e.get('p95'))}{fmt(e.get('max'))}"
              f"{e['errors']:>5}{fmt(r.get('neighbour_exec_ms_p95_vs_idle_before'), 8, 2)}"
              f"{fmt(r.get('neighbour_exec_ms_p95_vs_idle_pooled'), 8, 2)}"
              f"{h['n']:>7}{fmt(h.get('p50'), 7, 2)}{fmt(h.get('p95'), 7, 2)}{fmt(h.get('max'), 8, 1)}"
              f"{fmt(r.get('health_ms_p95_vs_idle_before'), 7, 2)}{fmt(row.get('peak_rss_daemon_mib'), 7)}")
    print()
    for name, reps in res.get("attacks", {}).items():
        print(f"{name:<14} {outcome_text(name, reps)}")
    if res.get("failures"):
        print("FAILURES:", res["failures"])
    ld = res.get("load")
    if ld:
        print()
        print(f"load: {ld['threads']} threads x {ld['cycles_per_thread']} cycles: {ld['cycles_done']} done, "
              f"{ld['cycles_failed']} failed, in {ld['elapsed_s']} s = {ld['cycles_per_s']} cycles/s; "
              f"daemon peak RSS {ld['peak_rss_daemon_mib']} MiB")
        for k in ("create", "exec", "terminate", "cycle"):
            s = ld[k + "_ms"]
            print(f"  {k:<10} p50 {fmt(s.get('p50'), 8)} ms  p95 {fmt(s.get('p95'), 8)} ms  max {fmt(s.get('max'), 8)} ms")
        if ld["errors"]:
            print("  errors:", ld["errors"][:5])
        print(f"  still listed after terminate: {ld['still_listed'] or 'none'}")
        lk = ld["leaks"]
        print(f"  leftovers at first check: {len(lk['at_first_check'])} ids/items; after waiting up to "
              f"{lk['waited_max_s']} s: {lk['after_wait'] or 'none'}"
              + (f" (clean after {lk['clean_after_s']} s)" if lk["clean_after_s"] is not None else ""))
        print(f"  host-wide gwh-* links / GW-n chains before, after: {ld['host_net_counts_before_after']}")
    lk = res["leaks_all_sandboxes_of_this_run"]
    print(f"all {res['sandboxes_created']} sandboxes of this run, after terminate: "
          f"{lk['after_wait'] or 'nothing left'}"
          + (f" (clean after {lk['clean_after_s']} s)" if lk["clean_after_s"] is not None else ""))


if __name__ == "__main__":
    sys.exit(main())
