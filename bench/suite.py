#!/usr/bin/env python3
"""gworker benchmark suite: every figure side by side with its raw baseline.

    python3 bench/suite.py [--quick] [--json out.json] [--only f1,f2,...]

Figures (issue "Performance: a benchmark suite against the baselines"):
  f1  create -> first command's output through the Python client (busybox,
      debian-slim): warm pool and cold, vs raw `runsc run` of the same rootfs
      printing the same line, and vs podman (runsc / runc) where it runs
  f2  the same with 50 creates at once
  f3  exec round trip (`true` + its exit code), raw HTTP and Python client,
      vs `runsc exec` (and `podman exec`)
  f4  snapshot time, restore -> first output, 10 forks started together,
      vs raw `runsc checkpoint` / `runsc restore`
  f5  density: idle sandboxes that fit, PSS per sandbox (host processes),
      vs raw idle `runsc run` containers
  f6  stdout throughput, one exec and 10 at once, vs raw runsc to a pipe
  f7  daemon (and supervisor, runsc) CPU per create, vs raw `runsc run`

Starts its own daemons on temporary data dirs (one without a pool, then one
with a warm pool), using target/release/gworker (or $GWORKER_BIN) and the
static agent. Baselines run in the same process, interleaved with the
gworker runs where it matters, so ratios come from the same moment of a noisy
machine. Every measured run checks its output; failures count against the
success rate. Prints a table and writes JSON (--json, default
bench-suite.json); exits 1 when a target is not met. `--quick` (small run
counts) takes about 2-3 minutes; the full run about 10. Needs root (it drives
runsc directly). `--render out.json` prints an earlier run's table.
"""
import argparse
import glob
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "clients", "python", "src"))
from engine import Api, pct  # noqa: E402

from gworker_client import Image, Sandbox, Volume  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")
RUNSC = shutil.which("runsc") or "/usr/bin/runsc"

# The daemon's host tuning (crates/runtime/src/host.rs). The suite applies it
# itself before anything runs, so the raw baselines run on the same host
# settings as gworker; `--no-host-tuning` measures both without it.
RCU_EXPEDITED = "/sys/kernel/rcu_expedited"
HOST_TUNING = True


def rcu_expedited():
    return (read(RCU_EXPEDITED) or "?").strip()


def apply_host_tuning(on):
    """Sets the switch for this run; returns what it was."""
    global HOST_TUNING
    HOST_TUNING = on
    before = rcu_expedited()
    set_rcu_expedited("1" if on else "0")
    return before


def set_rcu_expedited(value):
    try:
        with open(RCU_EXPEDITED, "w") as f:
            f.write(value)
    except OSError as e:
        log(f"cannot set {RCU_EXPEDITED}: {e}")


ALL = ["f1", "f2", "f3", "f4", "f5", "f6", "f7"]


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def now():
    return time.perf_counter()


def summ(xs):
    if not xs:
        return None
    return {"n": len(xs), "p50": pct(xs, 50), "p95": pct(xs, 95), "p99": pct(xs, 99),
            "min": min(xs), "max": max(xs), "mean": sum(xs) / len(xs)}


class Samples:
    """Latencies of successful runs plus a failure count (the success rate)."""

    def __init__(self):
        self.ok, self.fail, self.errors = [], 0, []
        self.lock = threading.Lock()

    def run(self, fn, *args):
        try:
            v = fn(*args)
        except Exception as e:  # a failed run counts, and the suite goes on
            with self.lock:
                self.fail += 1
                if len(self.errors) < 5:
                    self.errors.append(repr(e)[:300])
            return None
        with self.lock:
            self.ok.append(v)
        return v

    def to_json(self):
        n = len(self.ok) + self.fail
        return {"stats": summ(self.ok), "runs": n, "failures": self.fail,
                "success_rate": (len(self.ok) / n) if n else None, "errors": self.errors}


# ---------------------------------------------------------------- host processes

def read(path, mode="r"):
    try:
        with open(path, mode) as f:
            return f.read()
    except OSError:
        return None


def proc_table():
    """pid -> (ppid, cmdline bytes) for every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        st = read(f"/proc/{d}/stat")
        cmd = read(f"/proc/{d}/cmdline", "rb")
        if st is None or cmd is None:
            continue
        out[int(d)] = (int(st[st.rfind(")") + 2:].split()[1]), cmd)
    return out


def family(needles, table=None, roots=()):
    """Pids whose command line holds any of `needles`, plus their descendants."""
    table = table or proc_table()
    nb = [n.encode() for n in needles]
    hit = {p for p, (_, c) in table.items() if any(n in c for n in nb)} | set(roots)
    grew = True
    while grew:
        grew = False
        for p, (pp, _) in table.items():
            if pp in hit and p not in hit:
                hit.add(p)
                grew = True
    return hit


def cpu_s(pid, children=True):
    st = read(f"/proc/{pid}/stat")
    if st is None:
        return 0.0
    f = st[st.rfind(")") + 2:].split()
    t = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if children else 0)
    return t / CLK


def pss_kb(pid):
    txt = read(f"/proc/{pid}/smaps_rollup") or ""
    m = re.search(r"^Pss:\s+(\d+) kB", txt, re.M)
    r = re.search(r"^Rss:\s+(\d+) kB", txt, re.M)
    return (int(m.group(1)) if m else 0), (int(r.group(1)) if r else 0)


def mem_available_mb():
    m = re.search(r"MemAvailable:\s+(\d+) kB", read("/proc/meminfo"))
    return int(m.group(1)) / 1024


# ---------------------------------------------------------------- daemons

def find_binaries():
    binp = os.environ.get("GWORKER_BIN", os.path.join(REPO, "target/release/gworker"))
    agent = os.environ.get("GWORKER_AGENT",
                           os.path.join(REPO, "target/x86_64-unknown-linux-gnu/release/gworker-agent"))
    for p in (binp, agent):
        if not os.path.exists(p):
            sys.exit(f"missing {p}: build with `cargo build --release -p gworker-cli` and "
                     "`RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release "
                     "--target x86_64-unknown-linux-gnu -p gworker-agent`")
    return binp, agent


def recipe_version():
    txt = read(os.path.join(REPO, "crates/images/src/recipe.rs")) or ""
    m = re.search(r"RECIPE_VERSION: u32 = (\d+)", txt)
    return int(m.group(1)) if m else None


def prepare_images(binp, data, images_cache):
    """busybox builds in a second; debian-slim is copied from an already-built
    image dir (preferring one of the current recipe) to skip a 25 s build."""
    os.makedirs(os.path.join(data, "images"), exist_ok=True)
    for name in ("busybox", "debian-slim"):
        dst = os.path.join(data, "images", name)
        if name in images_cache:
            subprocess.run(["cp", "-a", images_cache[name], dst], check=True)
            continue
        if name == "debian-slim":
            want = recipe_version()
            cands = ["/var/lib/gworker/images/debian-slim"] + sorted(
                glob.glob("/tmp/*/data/images/debian-slim") + glob.glob("/tmp/*/images/debian-slim"))
            good = []
            for c in cands:
                try:
                    meta = json.load(open(os.path.join(c, "image.json")))
                except (OSError, ValueError):
                    continue
                if os.path.isdir(os.path.join(c, "rootfs")):
                    good.append((meta.get("recipe_version") != want, c, meta.get("recipe_version")))
            if good:
                good.sort(key=lambda g: g[0])
                _, src, rv = good[0]
                log(f"debian-slim: copying {src} (recipe {rv}, current {want})")
                subprocess.run(["cp", "-a", src, dst], check=True)
                images_cache[name] = dst
                images_cache["debian-slim-recipe"] = rv
                continue
        log(f"building image {name}")
        subprocess.run([binp, "image", "build", name, "--data-dir", data], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        images_cache[name] = dst


class Daemon:
    def __init__(self, tmp, name, binp, agent, images_cache, pool=None, pool_mb=None, pool_blocked=None):
        self.dir = os.path.join(tmp, name)
        self.data = os.path.join(self.dir, "data")
        self.sock = os.path.join(self.dir, "gw.sock")
        os.makedirs(self.dir)
        prepare_images(binp, self.data, images_cache)
        args = [binp, "serve", "--data-dir", self.data, "--socket", self.sock, "--agent", agent]
        if not HOST_TUNING:
            args.append("--no-host-tuning")
        for img, n in (pool or {}).items():
            args += ["--pool", f"{img}={n}"]
        for img, n in (pool_blocked or {}).items():
            args += ["--pool-blocked", f"{img}={n}"]
        if pool_mb:
            args += ["--pool-memory-mb", str(pool_mb)]
        self.pool = pool or {}
        self.pool_blocked = pool_blocked or {}
        self.logf = open(os.path.join(self.dir, "daemon.log"), "w")
        self.proc = subprocess.Popen(args, stdout=self.logf, stderr=self.logf)
        for _ in range(400):
            if os.path.exists(self.sock):
                try:
                    Api(self.sock).call("GET", "/v1/health")
                    break
                except OSError:
                    pass
            time.sleep(0.05)
        else:
            raise RuntimeError("daemon did not start; see " + self.logf.name)
        self.url = "unix://" + self.sock

    def use(self):
        os.environ["GWORKER_URL"] = self.url

    def api(self):
        return Api(self.sock)

    def cpu(self):
        return cpu_s(self.proc.pid, children=False)

    def sup_call(self, sid, op):
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(10)
        try:
            c.connect(os.path.join(self.data, "sock", sid))
            c.sendall(json.dumps({"op": op}).encode() + b"\n")
            return json.loads(c.makefile().readline())
        finally:
            c.close()

    def pool_ready(self, network="default"):
        """Ready warm-pool slots per configured image of the pools with
        `network` (`default` or `blocked`), as `GET /v1/health` counts them."""
        try:
            pools = self.api().call("GET", "/v1/health")["pool"]
        except Exception:
            return {}
        return {p["image"]: p["ready"] for p in pools if p.get("network", "default") == network}

    def wait_pool_full(self, timeout=240, quiet=False):
        t = now()
        while now() - t < timeout:
            c = self.pool_ready()
            # Full, and the sandboxes terminated before have finished their
            # teardowns (network, cgroups: ~15 ms of CPU each), which would
            # otherwise run beside what is measured next.
            blocked = self.pool_ready("blocked") if self.pool_blocked else {}
            if all(c.get(i, 0) >= n for i, n in self.pool.items()) and \
                    all(blocked.get(i, 0) >= n for i, n in self.pool_blocked.items()) and \
                    self.supervisors() <= sum(self.pool.values()) + sum(self.pool_blocked.values()):
                if not quiet:
                    log(f"pool full {c} after {now() - t:.1f}s")
                return True
            time.sleep(0.2)
        log(f"pool not full after {timeout}s: {self.pool_ready()}")
        return False

    def supervisors(self):
        """Live supervisors of this daemon (pool slots included)."""
        r = subprocess.run(["pgrep", "-fc", f"supervise {self.data}/"], capture_output=True, text=True)
        return int(r.stdout.strip() or 0)

    def stop(self):
        # Terminate what is registered, shut down unclaimed pool slots, stop.
        # (in parallel: each terminate takes ~2 s here)
        def delete(sid):
            try:
                self.api().call("DELETE", f"/v1/sandboxes/{sid}", raw=True)
            except Exception:
                pass

        def shutdown(sid):
            try:
                self.sup_call(sid, "shutdown")
            except Exception:
                pass

        try:
            ids = [s["sandbox_id"] for s in self.api().call("GET", "/v1/sandboxes")["sandboxes"]]
            list(ThreadPoolExecutor(16).map(delete, ids))
        except Exception:
            pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        sockdir = os.path.join(self.data, "sock")
        list(ThreadPoolExecutor(16).map(shutdown, os.listdir(sockdir) if os.path.isdir(sockdir) else []))
        # Each shutdown is answered at once; the supervisors then stop runsc
        # and remove the network (~50 ms each, serialised on the host lock):
        # a few hundred slots take seconds.
        deadline = now() + 30
        left = family([self.data])
        while left and now() < deadline:
            time.sleep(0.5)
            left = family([self.data])
        return sorted(left)


# ---------------------------------------------------------------- raw runsc

class Raw:
    """Plain runsc driven directly, on the same rootfs and flags gworker uses."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.root = tempfile.mkdtemp(dir=tmp, prefix="runsc-root-")
        self.n = 0
        self.bundles = {}

    def cmd(self):
        return [RUNSC, "--root", self.root, "--network=none", "--overlay2=root:memory"]

    def bundle(self, rootfs, args, tag=None):
        key = (rootfs, tuple(args), tag)
        if key in self.bundles:
            return self.bundles[key]
        b = tempfile.mkdtemp(dir=self.tmp, prefix=f"bundle-{tag or 'x'}-")
        subprocess.run([RUNSC, "spec", "--bundle", b], check=True)
        cfg = json.load(open(os.path.join(b, "config.json")))
        cfg["process"]["terminal"] = False
        cfg["process"]["args"] = list(args)
        cfg["root"] = {"path": rootfs, "readonly": False}
        json.dump(cfg, open(os.path.join(b, "config.json"), "w"))
        self.bundles[key] = b
        return b

    def cid(self, what):
        self.n += 1
        return f"bench-{what}-{os.getpid()}-{self.n}"

    def delete(self, cid):
        subprocess.run(self.cmd() + ["delete", "--force", cid], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)

    def run_first_output(self, rootfs, args=("echo", "hi"), expect=b"hi\n"):
        b = self.bundle(rootfs, args)
        cid = self.cid("run")
        try:
            return first_line_ms(self.cmd() + ["run", "--bundle", b, cid], expect)
        finally:
            self.delete(cid)

    def run_first_output_vol(self, rootfs, volume, args=("echo", "hi"), expect=b"hi\n"):
        """As run_first_output, with host directory `volume` bind-mounted
        read-write at /data (as gworker mounts a volume on a cold start)."""
        b = self.bundle(rootfs, args, tag="vol")
        cfg_path = os.path.join(b, "config.json")
        cfg = json.load(open(cfg_path))
        if not any(m["destination"] == "/data" for m in cfg["mounts"]):
            cfg["mounts"].append({"destination": "/data", "type": "bind", "source": volume,
                                  "options": ["rbind", "rw"]})
            json.dump(cfg, open(cfg_path, "w"))
        cid = self.cid("run")
        try:
            return first_line_ms(self.cmd() + ["run", "--bundle", b, cid], expect)
        finally:
            self.delete(cid)

    def run_first_output_net(self, rootfs, args=("echo", "hi"), expect=b"hi\n"):
        """As run_first_output, with gVisor's network stack (`--network=sandbox`)
        in a netns holding a fresh veth (made before the clock starts, as a
        sandbox needs one each), through the platform notes' work-around."""
        ns = f"gwbench-{os.getpid()}"
        b = self.bundle(rootfs, args, tag=f"net-{ns}")
        cfg_path = os.path.join(b, "config.json")
        cfg = json.load(open(cfg_path))
        cfg["linux"]["namespaces"] = [n if n["type"] != "network" else {"type": "network", "path": f"/run/netns/{ns}"}
                                      for n in cfg["linux"]["namespaces"]]
        json.dump(cfg, open(cfg_path, "w"))
        host_if = f"gwbh{os.getpid() % 100000}"
        sh = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        sh("ip", "netns", "add", ns)
        try:
            sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "addr", "add", "10.233.0.1/30", "dev", host_if)
            sh("ip", "link", "set", host_if, "up")
            sh("ip", "-n", ns, "addr", "add", "10.233.0.2/30", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            cid = self.cid("netrun")
            wrap = ["unshare", "-m", "--propagation", "slave", "sh", "-c",
                    "mount -t tmpfs -o ro,size=4k none /proc/sys/net && exec \"$@\"", "sh"]
            cmd = wrap + [RUNSC, "--root", self.root, "--network=sandbox", "--overlay2=root:memory",
                          "run", "--bundle", b, cid]
            try:
                return first_line_ms(cmd, expect)
            finally:
                subprocess.run([RUNSC, "--root", self.root, "--network=sandbox", "delete", "--force", cid],
                               capture_output=True, timeout=60)
        finally:
            subprocess.run(["ip", "link", "del", host_if], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def start_idle(self, rootfs, args=("sleep", "3600")):
        b = self.bundle(rootfs, args)
        cid = self.cid("idle")
        p = subprocess.Popen(self.cmd() + ["run", "--bundle", b, cid], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Ready when `runsc state` says running.
        for _ in range(300):
            r = subprocess.run(self.cmd() + ["state", cid], capture_output=True, text=True)
            if r.returncode == 0 and '"running"' in r.stdout:
                return cid, p
            time.sleep(0.05)
        raise RuntimeError(f"raw container {cid} did not start")

    def stop_idle(self, cid, p):
        subprocess.run(self.cmd() + ["kill", cid, "KILL"], stderr=subprocess.DEVNULL, timeout=30)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        self.delete(cid)


# ---------------------------------------------------------------- podman (peer)

class Podman:
    def __init__(self, tmp, runtime):
        self.runtime = runtime
        self.tmp = tmp
        self.ok = False
        self.reason = None
        self.rootfs = {}
        self.n = 0
        exe = shutil.which("podman")
        rt = shutil.which(runtime)
        if not exe:
            self.reason = "podman is not installed (apt-get install -y podman)"
            return
        if not rt:
            self.reason = f"{runtime} is not installed"
            return
        self.base = [exe, "--runtime", rt]
        self.opts = ["--network", "none"]
        if runtime == "runsc":
            self.base += ["--runtime-flag", "network=none"]
        else:
            # podman's default rlimits are refused here by runc (EPERM on
            # RLIMIT_NOFILE / RLIMIT_NPROC): ask for modest ones.
            self.opts += ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]

    def root_for(self, image, src):
        # podman writes mount points into a --rootfs dir: give it its own copy.
        if image not in self.rootfs:
            d = os.path.join(self.tmp, f"podman-{self.runtime}-{image}")
            subprocess.run(["cp", "-a", src, d], check=True)
            self.rootfs[image] = d
        return self.rootfs[image]

    def probe(self, image, src):
        if self.reason:
            return False
        try:
            r = subprocess.run(self.base + ["run", "--rm"] + self.opts + ["--rootfs",
                                            self.root_for(image, src), "echo", "hi"],
                               capture_output=True, timeout=120)
        except subprocess.TimeoutExpired:
            self.reason = "podman run timed out (120 s)"
            return False
        if r.stdout != b"hi\n":
            self.reason = f"podman run failed (exit {r.returncode}): {r.stderr.decode(errors='replace')[-300:].strip()}"
            return False
        self.ok = True
        return True

    def run_first_output(self, image):
        t = now()
        p = subprocess.Popen(self.base + ["run", "--rm"] + self.opts + ["--rootfs",
                                          self.rootfs[image], "echo", "hi"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        line = p.stdout.readline()
        dt = (now() - t) * 1000
        p.wait(timeout=120)
        assert line == b"hi\n", line
        return dt

    def start_idle(self, image):
        self.n += 1
        name = f"gwbench-{os.getpid()}-{self.runtime}-{self.n}"
        subprocess.run(self.base + ["run", "-d", "--name", name] + self.opts + ["--rootfs",
                                    self.rootfs[image], "sleep", "3600"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        return name

    def exec_true(self, name):
        t = now()
        subprocess.run(self.base + ["exec", name, "true"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)
        return (now() - t) * 1000

    def rm(self, name):
        subprocess.run(self.base + ["rm", "-f", "-t", "0", name], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120)


# ---------------------------------------------------------------- gworker actions

# terminate takes ~15-120 ms (it waits for runsc to end): done in the background,
# off the clock; cold runs wait for it (reap_all) before their next create, as
# raw runsc's delete is synchronous.
REAPER = ThreadPoolExecutor(16)
REAPING = []


HELD = []  # sandboxes whose terminate waits until a burst has all answered
HOLDING = threading.Event()


def machine_probe(rounds=20000):
    """How fast this machine is right now, beside the figures: the round trip
    of one byte between two processes over pipes (on these VMs 6 us when the
    two share a vCPU, 30-50 us when an idle vCPU must be woken through the
    hypervisor: every hop of a request pays it), and a pure-Python CPU loop."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for _ in range(rounds):
                os.read(r1, 1)
                os.write(w2, b"x")
        finally:
            os._exit(0)
    t = now()
    for _ in range(rounds):
        os.write(w1, b"x")
        os.read(r2, 1)
    rtt = (now() - t) / rounds * 1e6
    os.waitpid(pid, 0)
    for fd in (r1, w1, r2, w2):
        os.close(fd)
    t = now()
    x = 0
    for i in range(3_000_000):
        x += i
    return {"pipe_round_trip_us": round(rtt, 1), "cpu_loop_s": round(now() - t, 3)}


def exit0_elf():
    """A 129-byte static x86-64 program that only calls exit_group(0): the
    least a process can cost, so that its exec round trip is the service's
    own (HTTP, daemon, supervisor, agent, gVisor's clone/execve/exit)."""
    code = bytes.fromhex("b8e7000000" "31ff" "0f05")  # mov eax, 231; xor edi, edi; syscall
    base, hdr = 0x400000, 64 + 56
    size = hdr + len(code)
    ehdr = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, base + hdr, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    return ehdr + phdr + code


def first_line_ms(cmd, expect):
    """Starts cmd, returns ms until its first stdout line (which must be
    `expect`), then lets it finish (killed if it has not within 60 s)."""
    t = now()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        line = p.stdout.readline()
        dt = (now() - t) * 1000
        assert line == expect, line
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return dt


def terminate_later(sb):
    if HOLDING.is_set():
        HELD.append(sb)
    else:
        REAPING.append(REAPER.submit(sb.terminate))


def release_held():
    """Ends a hold (`HOLDING`): what waited is terminated now."""
    HOLDING.clear()
    while HELD:
        terminate_later(HELD.pop())


def reap_all():
    while REAPING:
        try:
            REAPING.pop().result(timeout=120)
        except Exception as e:
            log("terminate failed:", repr(e)[:200])


def gw_create_first_output(image, cmd=("echo", "hi"), expect="hi\n", block_network=False, volumes=None):
    """The leaderboard's method: create, run the first command, get its output."""
    t = now()
    sb = Sandbox.create(image=Image.from_name(image), timeout=300, block_network=block_network,
                        volumes=volumes)
    try:
        out = sb.exec(list(cmd)).stdout.read()
        dt = (now() - t) * 1000
    finally:
        terminate_later(sb)
    assert out == expect, out
    return dt


def at_once(n, fn, *args):
    """Runs fn(*args) in n threads released together; returns Samples of each
    one's latency and the time until all had answered."""
    s = Samples()
    barrier = threading.Barrier(n + 1)
    ends = []

    def worker():
        barrier.wait()
        t = now()
        v = s.run(fn, *args)  # fn returns its own latency in ms (cleanup after it is not counted)
        if v is not None:
            ends.append(t + v / 1000)

    ths = [threading.Thread(target=worker) for _ in range(n)]
    for th in ths:
        th.start()
    # The first to answer are terminated only when all have: a burst of
    # creates is measured, not creates beside terminates.
    HOLDING.set()
    t0 = now()
    barrier.wait()
    for th in ths:
        th.join()
    release_held()
    reap_all()
    return s, ((max(ends) - t0) * 1000 if ends else None)


def read_stream(api, path):
    api.conn.request("GET", path)
    r = api.conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"GET {path}: {r.status} {r.read()[:200]!r}")
    got, first = 0, None
    while True:
        b = r.read1(1 << 20)
        if not b:
            break
        if first is None:
            first = b[:4096]
        got += len(b)
    return got, first


# ---------------------------------------------------------------- figures

class Suite:
    def __init__(self, a, tmp):
        self.a = a
        self.q = a.quick
        self.tmp = tmp
        self.rows = []
        self.extra = {}
        self.binp, self.agent = find_binaries()
        self.images = {}
        self.raw = Raw(tmp)
        self.peers = {rt: Podman(tmp, rt) for rt in ("runsc", "runc")}
        self.cold = None
        self.warm = None

    def n(self, full, quick):
        return quick if self.q else full

    def rootfs(self, image):
        return os.path.join(self.cold.data if self.cold else self.warm.data, "images", image, "rootfs")

    def row(self, fig, what, samples=None, value=None, unit="ms", raw=None, peers=None, target=None,
            met=None, ratio=None, note=None, lower_is_better=True):
        r = {"figure": fig, "what": what, "unit": unit, "target": target, "met": met, "note": note}
        if samples is not None:
            r["gworker"] = samples.to_json()
        if value is not None:
            r["value"] = value
        if raw is not None:
            r["raw"] = raw.to_json() if isinstance(raw, Samples) else raw
        if peers:
            r["peers"] = {k: (v.to_json() if isinstance(v, Samples) else v) for k, v in peers.items()}
        if ratio is None:
            g = self._p50(r.get("gworker")) if samples is not None else value
            b = self._p50(r.get("raw"))
            if g is not None and b:
                ratio = g / b
        r["ratio"] = ratio
        r["lower_is_better"] = lower_is_better
        self.rows.append(r)
        self.flush()
        return r

    @staticmethod
    def _p50(x):
        if x is None:
            return None
        if isinstance(x, (int, float)):
            return x
        if "stats" in x:
            return x["stats"]["p50"] if x["stats"] else None
        return x.get("p50", x.get("value"))

    def peer_probe(self, image):
        out = {}
        for rt, p in self.peers.items():
            if p.reason is None and image not in p.rootfs:
                p.probe(image, self.rootfs(image))
        for rt, p in self.peers.items():
            out[rt] = p if p.ok and image in p.rootfs else None
        return out

    def peer_na(self):
        return {f"podman+{rt}": f"not available: {p.reason}" for rt, p in self.peers.items() if p.reason}

    # f1 cold + f2 cold + f3 + f4 + f6 + f7 + f5 run on the daemon without a pool.
    def f1_cold(self):
        runs = self.n(100, 10)
        peer_runs = self.n(30, 5)
        self.cold.use()
        for image in ("busybox", "debian-slim"):
            log(f"f1 cold {image}: {runs} runs, interleaved with raw runsc run and podman")
            gw_create_first_output(image)  # warm the page cache
            self.raw.run_first_output(self.rootfs(image))
            peers = self.peer_probe(image)
            gw, raw = Samples(), Samples()
            ps = {rt: Samples() for rt, p in peers.items() if p}
            for i in range(runs):
                # Each side starts with its previous run torn down: raw's
                # `runsc delete` is synchronous, gworker's terminates run in
                # the background and are waited for here, off the clock.
                reap_all()
                gw.run(gw_create_first_output, image)
                raw.run(self.raw.run_first_output, self.rootfs(image))
                if i < peer_runs:
                    for rt, s in ps.items():
                        s.run(peers[rt].run_first_output, image)
            self.extra[f"raw_run_{image}"] = raw
            ratio_ok = gw.ok and raw.ok and pct(gw.ok, 50) <= 1.15 * pct(raw.ok, 50)
            self.row("f1", f"create->output {image} cold", gw, raw=raw,
                     peers={**{f"podman+{k}": v for k, v in ps.items()}, **self.peer_na()},
                     target="p50 <= 1.15x raw runsc run, 100% ok",
                     met=bool(ratio_ok and gw.fail == 0),
                     note="gworker's default network (own netns, veth, rules) against raw --network=none")
            # Like with like: no network on either side, and a network on both.
            blocked, raw_net, gw_net = Samples(), Samples(), Samples()
            for _ in range(self.n(30, 8)):
                reap_all()
                blocked.run(lambda: gw_create_first_output(image, block_network=True))
                raw_net.run(self.raw.run_first_output_net, self.rootfs(image))
                reap_all()
                gw_net.run(gw_create_first_output, image)
            ok = blocked.ok and pct(blocked.ok, 50) <= 1.15 * pct(raw.ok, 50)
            self.row("f1", f"create->output {image} cold, block_network", blocked, raw=raw,
                     target="p50 <= 1.15x raw runsc run, 100% ok", met=bool(ok and blocked.fail == 0),
                     note="no network on either side")
            ok = gw_net.ok and raw_net.ok and pct(gw_net.ok, 50) <= 1.15 * pct(raw_net.ok, 50)
            self.row("f1", f"create->output {image} cold, networked both sides", gw_net, raw=raw_net,
                     target="p50 <= 1.15x raw runsc run (--network=sandbox)", met=bool(ok and gw_net.fail == 0),
                     note="raw: runsc --network=sandbox in a netns with a fresh veth made before the clock")
        # With a volume, against raw runsc with a bind mount; the baseline of
        # the warm pool's volume row.
        vol = {"/data": Volume.from_name("bench-vol", create_if_missing=True)}
        raw_dir = tempfile.mkdtemp(dir=self.raw.tmp, prefix="vol-")
        withvol, raw_vol = Samples(), Samples()
        for _ in range(self.n(30, 5)):
            reap_all()
            withvol.run(lambda: gw_create_first_output("busybox", volumes=vol))
            raw_vol.run(self.raw.run_first_output_vol, self.rootfs("busybox"), raw_dir)
        self.extra["raw_run_busybox_vol"] = raw_vol
        self.row("f1", "create->output busybox cold, one volume", withvol, raw=raw_vol,
                 note="raw: runsc run with a host directory bind-mounted at /data")

    def f1_warm(self):
        runs = self.n(100, 10)
        self.warm.use()
        for image in ("busybox", "debian-slim"):
            self.warm.wait_pool_full()
            log(f"f1 warm {image}: {runs} runs")
            gw = Samples()
            c0 = self.warm.cpu()
            for _ in range(runs):
                gw.run(gw_create_first_output, image)
            dcpu = (self.warm.cpu() - c0) / runs * 1000
            raw = self.extra.get(f"raw_run_{image}")
            st = summ(gw.ok)
            met = bool(st and st["p50"] <= 50 and st["p95"] <= 100 and gw.fail == 0)
            self.row("f1", f"create->output {image} warm pool", gw, raw=raw,
                     target="p50 <= 50, p95 <= 100 ms, 100% ok", met=met,
                     note=f"back to back, pool of {self.warm.pool[image]} (refills wait for the burst to end); "
                          f"daemon CPU {dcpu:.1f} ms/create (pool refill bookkeeping included)")
            # The same, paced (the claim alone, without refill contention).
            self.f1_warm_paced(f"{image} warm pool, paced", lambda: gw_create_first_output(image), raw,
                               "pool refilled and earlier sandboxes terminated before each run")
        # block_network creates come from a pool of slots without a network.
        self.f1_warm_paced("busybox warm pool, block_network, paced",
                           lambda: gw_create_first_output("busybox", block_network=True),
                           self.extra.get("raw_run_busybox"),
                           f"--pool-blocked busybox={self.warm.pool_blocked.get('busybox')}; "
                           "raw: runsc run --network=none")
        # Creates with volumes are claimed too: the claim mounts them.
        vol = {"/data": Volume.from_name("bench-vol", create_if_missing=True)}
        self.f1_warm_paced("busybox warm pool, one volume, paced",
                           lambda: gw_create_first_output("busybox", volumes=vol),
                           self.extra.get("raw_run_busybox_vol"),
                           "the volume mounted at claim; raw: runsc run with a bind mount at /data")

    def f1_warm_paced(self, what, create, raw, note):
        """A warm-pool f1 row, paced: before each run the pool is refilled and
        the earlier sandboxes are torn down."""
        s = Samples()
        for _ in range(self.n(30, 5)):
            reap_all()
            self.warm.wait_pool_full(quiet=True)
            s.run(create)
        st = summ(s.ok)
        self.row("f1", f"create->output {what}", s, raw=raw, target="p50 <= 50, p95 <= 100 ms, 100% ok",
                 met=bool(st and st["p50"] <= 50 and st["p95"] <= 100 and s.fail == 0), note=note)

    def f2(self, daemon, label):
        n = self.n(50, 10)
        daemon.use()
        # A single burst's p95 is its 3rd slowest create: on a noisy 2-CPU
        # host it moves by +-100 ms between runs. The warm pool's bursts are
        # cheap, so that row pools several (each on a full, settled pool).
        bursts = self.n(3, 1) if daemon.pool else 1
        for image in ("busybox", "debian-slim"):
            gw, alls, p95s = Samples(), [], []
            for _ in range(bursts):
                if daemon.pool:
                    daemon.wait_pool_full()
                log(f"f2 {label} {image}: {n} creates at once")
                one, one_all = at_once(n, gw_create_first_output, image)
                gw.ok += one.ok
                gw.fail += one.fail
                gw.errors += one.errors
                alls.append(one_all or 0)
                p95s.append((summ(one.ok) or {}).get("p95", 0))
            gw_all = max(alls)
            if label == "cold" or f"raw50_{image}" not in self.extra:
                raw, raw_all = at_once(n, self.raw.run_first_output, self.rootfs(image))
                self.extra[f"raw50_{image}"] = (raw, raw_all)
            raw, raw_all = self.extra[f"raw50_{image}"]
            peers = {}
            if label == "cold":
                for rt, p in self.peer_probe(image).items():
                    if p:
                        s, _ = at_once(n, p.run_first_output, image)
                        peers[f"podman+{rt}"] = s
                peers.update(self.peer_na())
            st = summ(gw.ok)
            if label == "warm pool":
                met = bool(st and st["p95"] <= 250 and gw.fail == 0)
                target = "p95 <= 250 ms, 100% ok"
            else:
                met = None
                target = "(no target cold)"
            each = (f"; {bursts} bursts pooled, each burst's p95: " + ", ".join(f"{v:.0f}" for v in p95s)
                    if bursts > 1 else "")
            self.row("f2", f"{n} at once {image} {label}", gw, raw=raw, peers=peers, target=target, met=met,
                     note=f"all answered: gworker {gw_all or 0:.0f} ms, raw {raw_all or 0:.0f} ms{each}")

    def f3(self):
        runs = self.n(1000, 200)
        raw_runs = self.n(100, 20)
        peer_runs = self.n(30, 5)
        self.cold.use()
        api = self.cold.api()
        sb = api.call("POST", "/v1/sandboxes", {"image": "busybox", "timeout": 3600})
        sid = sb["sandbox_id"]

        def http_exec(cmd=("true",)):
            t = now()
            p = api.call("POST", f"/v1/sandboxes/{sid}/exec", {"cmd": list(cmd)})
            r = api.call("GET", f"/v1/sandboxes/{sid}/processes/{p['process_id']}/wait?timeout=30")
            dt = (now() - t) * 1000
            assert r["exit_code"] == 0, r
            return dt

        client_sb = Sandbox.lookup(sid)

        def client_exec():
            t = now()
            code = client_sb.exec(["true"]).wait()
            dt = (now() - t) * 1000
            assert code == 0, code
            return dt

        up = client_sb.exec(["sh", "-c", "cat > /tmp/exit0 && chmod +x /tmp/exit0"])
        up.stdin.write(exit0_elf())
        up.stdin.write_eof()
        assert up.wait() == 0

        exit0 = ("/tmp/exit0",)

        for _ in range(20):
            http_exec()
            client_exec()
            http_exec(exit0)
        log(f"f3 exec round trip: {runs} runs (raw HTTP and Python client; {runs // 2} of a minimal program), "
            f"{raw_runs} runsc exec")
        gw_http, gw_client, gw_exit0 = Samples(), Samples(), Samples()
        for i in range(runs):
            gw_http.run(http_exec)
            gw_client.run(client_exec)
            if i % 2 == 0:
                gw_exit0.run(http_exec, exit0)
        raw = Samples()
        cid, p = self.raw.start_idle(self.rootfs("busybox"))

        def raw_exec():
            t = now()
            subprocess.run(self.raw.cmd() + ["exec", cid, "true"], check=True, timeout=30)
            return (now() - t) * 1000

        try:
            raw_exec()
            for _ in range(raw_runs):
                raw.run(raw_exec)
        finally:
            self.raw.stop_idle(cid, p)
        peers = {}
        for rt, pp in self.peer_probe("busybox").items():
            if pp:
                s = Samples()
                name = pp.start_idle("busybox")
                try:
                    pp.exec_true(name)
                    for _ in range(peer_runs):
                        s.run(pp.exec_true, name)
                finally:
                    pp.rm(name)
                peers[f"podman+{rt}"] = s
        peers.update(self.peer_na())
        api.call("DELETE", f"/v1/sandboxes/{sid}", raw=True)
        for label, s in (("raw HTTP", gw_http), ("Python client", gw_client)):
            st = summ(s.ok)
            self.row("f3", f"exec `true` round trip, {label}", s, raw=raw, peers=peers,
                     target="p50 <= 3 ms", met=bool(st and st["p50"] <= 3 and s.fail == 0))
        self.row("f3", "exec of a minimal static program (exit only), raw HTTP", gw_exit0,
                 note="the service's own round trip; the rest of `true`'s is busybox's start-up inside gVisor")

    def f4(self):
        snaps = self.n(5, 2)
        runs = self.n(20, 5)
        fork_reps = self.n(3, 1)
        forks = 10
        self.cold.use()
        bb = Image.from_name("busybox")
        rootfs = self.rootfs("busybox")
        # snapshot time: an idle busybox sandbox vs raw checkpoint of a shell loop
        log(f"f4 snapshot x{snaps}, restore x{runs}, {forks} forks x{fork_reps}")
        src = Sandbox.create(image=bb, timeout=1800)
        assert src.exec(["echo", "ready"]).stdout.read() == "ready\n"
        gw_snap, pause = Samples(), []
        snap = None

        def take():
            nonlocal snap
            t = now()
            s = src.snapshot()
            dt = (now() - t) * 1000
            assert s.size_bytes > 0 and src.exec(["echo", "alive"]).stdout.read() == "alive\n"
            pause.append(s.pause_ms)
            if snap is None:
                snap = s
            else:
                s.delete()
            return dt

        shell = ["/bin/sh", "-c", "while read l; do echo $l; done"]
        b = self.raw.bundle(rootfs, shell, tag="shell")
        img = tempfile.mkdtemp(dir=self.tmp, prefix="ckpt-")
        R = self.raw.cmd()

        def raw_ckpt(keep):
            cid = self.raw.cid("ck")
            d = img if keep else tempfile.mkdtemp(dir=self.tmp, prefix="ckpt-")
            p = subprocess.Popen(R + ["run", "--bundle", b, cid], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL)
            try:
                p.stdin.write(b"x\n")
                p.stdin.flush()
                assert p.stdout.readline() == b"x\n"
                t = now()
                subprocess.run(R + ["checkpoint", "--image-path", d, cid], check=True, timeout=60,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                dt = (now() - t) * 1000
                p.wait(timeout=30)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                self.raw.delete(cid)
            if not keep:
                shutil.rmtree(d, ignore_errors=True)
            return dt

        raw_snap = Samples()
        for i in range(snaps):
            gw_snap.run(take)
            raw_snap.run(raw_ckpt, i == 0)
        self.row("f4", "snapshot (API call; idle busybox)", gw_snap, raw=raw_snap, target=None, met=None,
                 note=f"source paused p50 {pct(pause, 50):.0f} ms (checkpoint + restore in place)" if pause else None)
        if snap is None:
            src.terminate()
            return

        def gw_restore(of=None):
            t = now()
            sb = Sandbox.create(snapshot=of or snap, timeout=300)
            try:
                out = sb.exec(["echo", "hi"]).stdout.read()
                dt = (now() - t) * 1000
            finally:
                terminate_later(sb)
            assert out == "hi\n", out
            return dt

        def raw_restore():
            cid = self.raw.cid("rs")
            t = now()
            q = subprocess.Popen(R + ["restore", "--image-path", img, "--bundle", b, cid],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            try:
                q.stdin.write(b"hi\n")
                q.stdin.flush()
                line = q.stdout.readline()
                dt = (now() - t) * 1000
                assert line == b"hi\n", line
                q.stdin.close()
                q.wait(timeout=30)
            finally:
                if q.poll() is None:
                    q.kill()
                    q.wait()
                self.raw.delete(cid)
            return dt

        def restore_row(what, of, note):
            gw_restore(of)
            gw_r, raw_r = Samples(), Samples()
            for _ in range(runs):
                gw_r.run(gw_restore, of)
                raw_r.run(raw_restore)
            st = summ(gw_r.ok)
            self.row("f4", what, gw_r, raw=raw_r, target="p50 <= 120 ms",
                     met=bool(st and st["p50"] <= 120 and gw_r.fail == 0), note=note)

        restore_row("restore -> first output", snap,
                    "gworker's default network (restored into a fresh netns and veth) against raw --network=none")
        # Like with like: a snapshot of a sandbox without a network.
        src_nn = Sandbox.create(image=bb, timeout=1800, block_network=True)
        try:
            assert src_nn.exec(["echo", "ready"]).stdout.read() == "ready\n"
            snap_nn = src_nn.snapshot()
        finally:
            src_nn.terminate()
        restore_row("restore -> first output, block_network", snap_nn, "no network on either side")
        snap_nn.delete()
        gw_f, raw_f = Samples(), Samples()
        fails = 0
        for _ in range(fork_reps):
            s, all_ms = at_once(forks, gw_restore)
            fails += s.fail
            if s.fail == 0:
                gw_f.ok.append(all_ms)
            else:
                gw_f.fail += 1
                gw_f.errors += s.errors[:2]
            s, all_ms = at_once(forks, raw_restore)
            if s.fail == 0:
                raw_f.ok.append(all_ms)
            else:
                raw_f.fail += 1
                raw_f.errors += s.errors[:2]
        st = summ(gw_f.ok)
        self.row("f4", f"{forks} forks at once, all answered", gw_f, raw=raw_f, target="<= 1000 ms, all answer",
                 met=bool(st and st["max"] <= 1000 and gw_f.fail == 0),
                 note=f"{fork_reps} repetitions; {fails} fork(s) failed")
        snap.delete()
        src.terminate()

    def f6(self):
        mb = self.n(500, 100)
        mb10 = self.n(200, 50)
        reps = self.n(3, 1)
        self.cold.use()
        rootfs = self.rootfs("busybox")
        log(f"f6 stdout throughput: 1 x {mb} MB (x{reps}), 10 x {mb10} MB")

        def dd(m):
            return ["dd", "if=/dev/zero", "bs=1000000", f"count={m}"]

        def gw_one(api, sid, m):
            p = api.call("POST", f"/v1/sandboxes/{sid}/exec", {"cmd": dd(m)})
            t = now()
            got, first = read_stream(api, f"/v1/sandboxes/{sid}/processes/{p['process_id']}/stdout")
            dt = now() - t
            assert got == m * 1000000 and first.count(0) == len(first), (got, m)
            return got / dt / 1e6, t, now()

        def raw_one(m):
            b = self.raw.bundle(rootfs, ["sh", "-c", "echo go; " + " ".join(dd(m))], tag=f"dd{m}")
            cid = self.raw.cid("dd")
            p = subprocess.Popen(self.raw.cmd() + ["run", "--bundle", b, cid], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            try:
                assert p.stdout.readline() == b"go\n"
                t = now()
                got, first = 0, None
                while True:
                    c = p.stdout.read1(1 << 20)
                    if not c:
                        break
                    if first is None:
                        first = c[:4096]
                    got += len(c)
                t1 = now()
                p.wait(timeout=60)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                self.raw.delete(cid)
            assert got == m * 1000000 and first.count(0) == len(first), got
            return got / (t1 - t) / 1e6, t, t1

        apis = [self.cold.api() for _ in range(10)]
        sids = [apis[i].call("POST", "/v1/sandboxes", {"image": "busybox", "timeout": 3600})["sandbox_id"]
                for i in range(10)]
        for i in range(10):
            gw_one(apis[i], sids[i], 1)
        one, raw1 = Samples(), Samples()
        for _ in range(reps):
            one.run(lambda: gw_one(apis[0], sids[0], mb)[0])
            raw1.run(lambda: raw_one(mb)[0])
        self.row("f6", f"stdout throughput, 1 exec ({mb} MB)", one, unit="MB/s", raw=raw1,
                 target=">= 300 MB/s", met=bool(one.ok and pct(one.ok, 50) >= 300 and one.fail == 0),
                 lower_is_better=False)

        def aggregate(fn_list):
            res, errs = [None] * len(fn_list), []
            barrier = threading.Barrier(len(fn_list))

            def w(i):
                barrier.wait()
                try:
                    res[i] = fn_list[i]()
                except Exception as e:
                    errs.append(repr(e)[:200])

            ths = [threading.Thread(target=w, args=(i,)) for i in range(len(fn_list))]
            [th.start() for th in ths]
            [th.join() for th in ths]
            if errs:
                raise RuntimeError("; ".join(errs[:3]))
            t0 = min(r[1] for r in res)
            t1 = max(r[2] for r in res)
            return len(fn_list) * mb10 * 1e6 / (t1 - t0) / 1e6

        ten, raw10 = Samples(), Samples()
        ten.run(aggregate, [(lambda i=i: gw_one(apis[i], sids[i], mb10)) for i in range(10)])
        raw10.run(aggregate, [(lambda: raw_one(mb10)) for _ in range(10)])
        self.row("f6", f"stdout throughput, 10 execs at once (aggregate, 10 sandboxes x {mb10} MB)", ten,
                 unit="MB/s", raw=raw10, target=None, met=None, lower_is_better=False)
        for i in range(10):
            apis[i].call("DELETE", f"/v1/sandboxes/{sids[i]}", raw=True)

    def f7(self):
        n = self.n(20, 8)
        self.cold.use()
        api = self.cold.api()
        log(f"f7 CPU per create: {n} creates (create + exec echo + read + terminate)")
        rootfs = self.rootfs("busybox")
        d0 = self.cold.cpu()
        sup, sbx, term, fail = [], [], Samples(), 0
        t0 = now()
        for _ in range(n):
            try:
                sid = api.call("POST", "/v1/sandboxes", {"image": "busybox", "timeout": 300})["sandbox_id"]
                p = api.call("POST", f"/v1/sandboxes/{sid}/exec", {"cmd": ["echo", "hi"]})
                got = api.call("GET", f"/v1/sandboxes/{sid}/processes/{p['process_id']}/stdout", raw=True)
                assert got == b"hi\n", got
                table = proc_table()
                fam = family([sid], table)
                sups = [q for q in fam if b"supervise" in table[q][1]]
                # supervisor incl. what it reaped; runsc run, gofer, sentry (live)
                sup.append(sum(cpu_s(q) for q in sups))
                sbx.append(sum(cpu_s(q, children=False) for q in fam if q not in sups))

                def delete():
                    t = now()
                    api.call("DELETE", f"/v1/sandboxes/{sid}", raw=True)
                    return (now() - t) * 1000
                term.ok.append(delete())
            except Exception as e:
                fail += 1
                log("f7 failure:", repr(e)[:200])
        ok = len(term.ok)
        wall = now() - t0
        dcpu = (self.cold.cpu() - d0) / max(ok, 1) * 1000

        def raw_run_cpu():
            # CPU of `runsc run` and everything it reaped (gofer, sentry), via wait4
            b = self.raw.bundle(rootfs, ("echo", "hi"))
            cid = self.raw.cid("cpu")
            p = subprocess.Popen(self.raw.cmd() + ["run", "--bundle", b, cid], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            line = p.stdout.readline()
            _, status, ru = os.wait4(p.pid, 0)
            p.returncode = status
            self.raw.delete(cid)
            assert line == b"hi\n", line
            return (ru.ru_utime + ru.ru_stime) * 1000

        raw = Samples()
        for _ in range(n):
            raw.run(raw_run_cpu)
        raw_cpu = summ(raw.ok)["mean"] if raw.ok else None
        sup_ms = sum(sup) / len(sup) * 1000 if sup else 0
        sbx_ms = sum(sbx) / len(sbx) * 1000 if sbx else 0
        total = dcpu + sup_ms + sbx_ms
        s = Samples()
        s.ok, s.fail = [dcpu], fail
        self.row("f7", "daemon CPU per cold create (mean)", s, unit="ms CPU", raw={"p50": raw_cpu},
                 target=None, met=None,
                 note=f"2 cores sustain ~{2000 / max(dcpu, 0.01):.0f} creates/s on daemon CPU alone; "
                      "raw = CPU of one `runsc run` incl. gofer and sentry")
        s2 = Samples()
        s2.ok, s2.fail = [total], fail
        self.row("f7", "host CPU per cold create, daemon+supervisor+runsc (mean)", s2, unit="ms CPU",
                 raw={"p50": raw_cpu}, target=None, met=None,
                 note=f"supervisor {sup_ms:.1f} ms, runsc+gofer+sentry {sbx_ms:.1f} ms (mean, before teardown; "
                      f"10 ms tick resolution); 2 cores sustain ~{2000 / max(total, 0.01):.1f} creates/s "
                      f"(raw runsc run: ~{2000 / raw_cpu:.1f}/s); sequential wall "
                      f"{wall / max(ok, 1) * 1000:.0f} ms per create+exec+terminate" if raw_cpu else None)
        # terminate latency vs raw kill + wait + delete of an idle container
        rawt = Samples()

        def raw_term():
            cid, p = self.raw.start_idle(rootfs)
            t = now()
            self.raw.stop_idle(cid, p)
            return (now() - t) * 1000
        for _ in range(self.n(10, 3)):
            rawt.run(raw_term)
        self.row("f7", "terminate (DELETE) latency", term, raw=rawt, target=None, met=None,
                 note="raw: `runsc kill KILL` + wait for `runsc run` + `runsc delete --force`")

    def f5(self):
        limit = self.n(300, 20)
        floor_mb = 4096
        batch = 10
        budget_s = self.n(300, 90)
        self.cold.use()
        api = self.cold.api()
        rootfs = self.rootfs("busybox")
        # raw baseline: 10 idle runsc containers
        log("f5 density: raw baseline, 10 idle runsc containers")
        raw_kb = []
        raws = []
        try:
            for _ in range(batch):
                raws.append(self.raw.start_idle(rootfs))
            time.sleep(1)
            table = proc_table()
            for cid, p in raws:
                fam = family([], table, roots=[p.pid])
                raw_kb.append(sum(pss_kb(q)[0] for q in fam))
        finally:
            for cid, p in raws:
                self.raw.stop_idle(cid, p)
        log(f"f5 density: gworker idle busybox sandboxes in batches of {batch}, up to {limit}, "
            f"while MemAvailable >= {floor_mb} MiB")
        mem0 = mem_available_mb()
        sids, fails, stop_reason = [], 0, f"reached the limit of {limit}"
        pss_at_10 = None
        t0 = now()
        lock = threading.Lock()

        def one():
            a = self.cold.api()
            sid = a.call("POST", "/v1/sandboxes", {"image": "busybox", "timeout": 3600})["sandbox_id"]
            with lock:
                sids.append(sid)
            p = a.call("POST", f"/v1/sandboxes/{sid}/exec", {"cmd": ["echo", "up"]})
            got = a.call("GET", f"/v1/sandboxes/{sid}/processes/{p['process_id']}/stdout", raw=True)
            assert got == b"up\n", got

        def pss_of(ids):
            table = proc_table()
            out = []
            for sid in ids:
                fam = family([sid], table)
                vals = [pss_kb(q) for q in fam]
                out.append((sum(v[0] for v in vals), sum(v[1] for v in vals), len(fam)))
            return out

        while len(sids) < limit:
            if mem_available_mb() < floor_mb:
                stop_reason = f"MemAvailable under {floor_mb} MiB"
                break
            if now() - t0 > budget_s:
                stop_reason = f"time budget of {budget_s} s"
                break
            s, _ = at_once(min(batch, limit - len(sids)), one)
            if s.fail:
                fails += s.fail
                stop_reason = f"a create failed: {s.errors[:1]}"
                break
            if pss_at_10 is None:
                pss_at_10 = pss_of(list(sids))
            if len(sids) % 50 == 0:
                log(f"  {len(sids)} idle sandboxes, MemAvailable {mem_available_mb():.0f} MiB")
        n = len(sids)
        mem1 = mem_available_mb()
        pss_all = pss_of(list(sids))
        # are they all still alive and answering?
        alive = 0
        for sid in list(sids):
            try:
                p = api.call("POST", f"/v1/sandboxes/{sid}/exec", {"cmd": ["echo", "ok"]})
                got = api.call("GET", f"/v1/sandboxes/{sid}/processes/{p['process_id']}/stdout", raw=True)
                alive += got == b"ok\n"
            except Exception:
                pass
        log(f"f5: {n} sandboxes, {alive} answering; terminating all")
        def kill(sid):
            try:
                self.cold.api().call("DELETE", f"/v1/sandboxes/{sid}", raw=True)
            except Exception:
                pass
        list(ThreadPoolExecutor(16).map(kill, list(sids)))
        left = []
        for _ in range(60):
            left = sorted(family(sids))
            if not left:
                break
            time.sleep(0.5)
        left_socks = [s for s in sids if os.path.exists(os.path.join(self.cold.data, "sock", s))]
        pss_mib = [x[0] / 1024 for x in pss_all]
        s = Samples()
        s.ok = pss_mib
        s.fail = fails + (n - alive)
        rawp = Samples()
        rawp.ok = [k / 1024 for k in raw_kb]
        self.row("f5", f"PSS per idle sandbox at {n} sandboxes", s, unit="MiB", raw=rawp,
                 target="<= 30 MiB", met=bool(pss_mib and pct(pss_mib, 50) <= 30),
                 note=f"host processes per sandbox: {pct([x[2] for x in pss_all], 50):.0f}; "
                      f"RSS p50 {pct([x[1] / 1024 for x in pss_all], 50):.0f} MiB; "
                      f"MemAvailable fell {(mem0 - mem1) / max(n, 1):.0f} MiB per sandbox" if pss_all else None)
        if pss_at_10:
            s10 = Samples()
            s10.ok = [x[0] / 1024 for x in pss_at_10]
            self.row("f5", f"PSS per idle sandbox at {len(pss_at_10)} sandboxes", s10, unit="MiB", raw=rawp,
                     target="<= 30 MiB", met=bool(pct(s10.ok, 50) <= 30),
                     note="raw: 10 idle `runsc run sleep` containers (runsc + gofer + sentry)")
        cnt = Samples()
        cnt.ok = [n]
        cnt.fail = fails
        self.row("f5", "idle sandboxes at once (all answering)", cnt, unit="count", target=">= 300",
                 met=bool(n >= 300 and alive == n), lower_is_better=False,
                 note=f"stopped: {stop_reason}; {alive}/{n} answered an exec; "
                      f"after terminate: {len(left)} host processes and {len(left_socks)} sockets left")
        self.extra["density"] = {"count": n, "alive": alive, "stop_reason": stop_reason,
                                 "leftover_pids": left, "leftover_socks": left_socks,
                                 "mem_available_mb_before": mem0, "mem_available_mb_after": mem1}

    # ------------------------------------------------------------ running

    def flush(self):
        if self.a.json:
            with open(self.a.json, "w") as f:
                json.dump(self.to_json(), f, indent=2, default=lambda o: o.to_json())

    def to_json(self):
        return {"suite": "gworker bench/suite.py", "quick": self.q, "started": self.started,
                "host": os.uname().nodename, "kernel": os.uname().release, "cpus": os.cpu_count(),
                "loadavg_start": self.load0, "loadavg_now": os.getloadavg(),
                "machine_at_start": self.machine, "machine_at_end": machine_probe(),
                "rcu_expedited": rcu_expedited(),
                "runsc": subprocess.run([RUNSC, "--version"], capture_output=True, text=True).stdout.splitlines()[:1],
                "debian_slim_recipe_copied": self.images.get("debian-slim-recipe"),
                "rows": self.rows, "notes": {k: v for k, v in self.extra.items() if k == "density"}}

    def run(self, only):
        self.started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.load0 = os.getloadavg()
        self.machine = machine_probe()
        log(f"machine: pipe round trip {self.machine['pipe_round_trip_us']} us, "
            f"CPU loop {self.machine['cpu_loop_s']} s")
        cold_figs = [f for f in ["f1", "f2", "f3", "f4", "f6", "f7", "f5"] if f in only]
        warm_figs = [f for f in ["f1", "f2"] if f in only]
        try:
            if cold_figs:
                log("starting the daemon without a pool")
                self.cold = Daemon(self.tmp, "cold", self.binp, self.agent, self.images)
                for f in cold_figs:
                    try:
                        {"f1": self.f1_cold, "f2": lambda: self.f2(self.cold, "cold"), "f3": self.f3,
                         "f4": self.f4, "f5": self.f5, "f6": self.f6, "f7": self.f7}[f]()
                        reap_all()
                    except Exception as e:
                        log(f"{f} broke: {e!r}")
                        self.row(f, "figure failed to run", Samples(), note=repr(e)[:300], met=False)
                left = self.cold.stop()
                self.extra["cold_leftovers"] = left
                if left:
                    log(f"left behind by the cold daemon: {left}")
            if warm_figs:
                # Sized for the largest burst measured: f1's back-to-back
                # runs (f2's 50 at once fit too). A pool smaller than a burst
                # leaves its tail waiting for refill boots (~100-300 ms each
                # on 2 cores): that is capacity, not the claim path.
                n = max(self.n(100, 10), self.n(50, 10))
                pool = {"busybox": n, "debian-slim": n}
                log(f"starting the daemon with a warm pool {pool}")
                # A few slots without a network for f1's block_network row.
                blocked = {"busybox": self.n(4, 2)} if "f1" in warm_figs else {}
                self.warm = Daemon(self.tmp, "warm", self.binp, self.agent, self.images, pool=pool,
                                   pool_mb=(sum(pool.values()) + sum(blocked.values())) * 50 + 512,
                                   pool_blocked=blocked)
                for f in warm_figs:
                    try:
                        {"f1": self.f1_warm, "f2": lambda: self.f2(self.warm, "warm pool")}[f]()
                        reap_all()
                    except Exception as e:
                        log(f"{f} warm broke: {e!r}")
                        self.row(f, "figure failed to run (warm)", Samples(), note=repr(e)[:300], met=False)
                left = self.warm.stop()
                if left:
                    log(f"left behind by the warm daemon: {left}")
        finally:
            for d in (self.cold, self.warm):
                if d and d.proc.poll() is None:
                    d.stop()
        self.flush()


def fmt(v, unit):
    if v is None:
        return "-"
    if unit == "count":
        return f"{v:.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def table(rows):
    hdr = ["fig", "what", "unit", "ok", "p50", "p95", "p99", "min", "max", "raw p50", "ratio", "peer p50",
           "target", "met?"]
    lines = []
    for r in rows:
        g = r.get("gworker") or {}
        st = g.get("stats") or {}
        ok = f"{g['success_rate'] * 100:.0f}% ({g['runs']})" if g.get("success_rate") is not None else "-"
        raw = Suite._p50(r.get("raw"))
        peers = []
        for k, v in (r.get("peers") or {}).items():
            if isinstance(v, str):
                peers.append(f"{k}: n/a")
            else:
                p = Suite._p50(v)
                peers.append(f"{k} {fmt(p, r['unit'])}" if p is not None else f"{k}: failed")
        met = {True: "yes", False: "NO", None: "-"}[r.get("met")]
        u = r["unit"]
        lines.append([r["figure"], r["what"], u, ok, fmt(st.get("p50"), u), fmt(st.get("p95"), u),
                      fmt(st.get("p99"), u), fmt(st.get("min"), u), fmt(st.get("max"), u), fmt(raw, u),
                      f"{r['ratio']:.2f}x" if r.get("ratio") else "-", "; ".join(peers) or "-",
                      r.get("target") or "-", met])
    out = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    out += ["| " + " | ".join(l) + " |" for l in lines]
    notes = [f"- {r['figure']} {r['what']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(out) + ("\n\nNotes:\n" + "\n".join(notes) if notes else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run counts (~3 minutes)")
    ap.add_argument("--json", default="bench-suite.json", help="write the results here (default %(default)s)")
    ap.add_argument("--only", default=",".join(ALL), help="comma-separated figures, e.g. f1,f3")
    ap.add_argument("--render", metavar="JSON", help="only print the table of an earlier run's JSON")
    ap.add_argument("--no-host-tuning", action="store_true",
                    help=f"run raw runsc and gworker with {RCU_EXPEDITED} = 0 (the daemon's default sets it "
                         "to 1); the setting is restored afterwards")
    a = ap.parse_args()
    if a.render:
        d = json.load(open(a.render))
        print(f"run started {d['started']} on {d['host']} ({d['cpus']} CPUs, kernel {d['kernel']}), "
              f"{'quick' if d['quick'] else 'full'}; load average at start {d['loadavg_start'][0]:.2f}, "
              f"at end {d['loadavg_now'][0]:.2f}; {(d.get('runsc') or [''])[0]}\n")
        print(table(d["rows"]))
        return 0
    only = [f.strip() for f in a.only.split(",") if f.strip()]
    bad = [f for f in only if f not in ALL]
    if bad:
        sys.exit(f"unknown figure(s) {bad}; known: {ALL}")
    if os.geteuid() != 0:
        sys.exit("runs runsc directly: run as root")
    rcu_before = apply_host_tuning(not a.no_host_tuning)
    rcu_during = rcu_expedited()
    tmp = tempfile.mkdtemp(prefix="gw-suite-", dir="/tmp")
    s = Suite(a, tmp)
    t = now()
    try:
        s.run(only)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        # An untuned run leaves the host as it found it (a tuned one leaves
        # it as any gworker daemon would).
        if a.no_host_tuning and rcu_before in ("0", "1"):
            set_rcu_expedited(rcu_before)
    print(f"gworker benchmark suite ({'quick' if a.quick else 'full'}), {s.started}, "
          f"{os.cpu_count()} CPUs, load at start {s.load0[0]:.2f}, {RCU_EXPEDITED} = {rcu_during}, "
          f"took {now() - t:.0f} s")
    m = machine_probe()
    print(f"machine: pipe round trip between two processes {s.machine['pipe_round_trip_us']} us at start, "
          f"{m['pipe_round_trip_us']} us at the end (6 us on a vCPU kept awake, 30-50 us when each hop "
          f"wakes one through the hypervisor); CPU loop {s.machine['cpu_loop_s']} / {m['cpu_loop_s']} s")
    print("ratio = gworker p50 / raw baseline p50 (same run); peers: podman with that OCI runtime\n")
    print(table(s.rows))
    print(f"\nJSON: {os.path.abspath(a.json)}")
    return 0 if all(r.get("met") is not False for r in s.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
