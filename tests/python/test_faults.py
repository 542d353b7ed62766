"""Load and faults: many create → exec → terminate cycles, SIGKILL of the
daemon / a supervisor / runsc at awkward moments, a full data disk, and API
fuzzing (schemathesis).

After every fault: the registry is consistent, every sandbox either works or
is reported exited with a reason, nothing is orphaned (processes, sandbox
dirs, sockets, runsc state, mounts), and acknowledged data (snapshots) is
kept.

Load size: ``GWORKER_LOAD_FULL=1`` runs the issue's 10 threads × 100 cycles;
the default is a CI-sized 4 × 10 (``GWORKER_LOAD_THREADS`` /
``GWORKER_LOAD_CYCLES`` override either).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import pytest

from helpers import BUSYBOX, Daemon, gworker_bin, run, short_tempdir, side_daemon
from gworker_client import GworkerError, Image, Sandbox, SandboxSnapshot
from gworker_client.sandbox import SandboxProcess

ID_RE = re.compile(r"sb-[0-9a-f]{32}")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def pgrep(pattern: str) -> List[Tuple[int, str]]:
    out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
    me = os.getpid()
    rows = []
    for line in out.splitlines():
        pid, _, cmd = line.partition(" ")
        if int(pid) != me and "pgrep" not in cmd:
            rows.append((int(pid), cmd))
    return rows


def sandbox_cgroups(sid: str) -> List[str]:
    """The controllers in which the sandbox's cgroup still exists."""
    return [c for c in ("memory", "cpu", "pids") if os.path.exists(f"/sys/fs/cgroup/{c}/gworker/{sid}")]


def leftovers(daemon: Daemon, ids: Iterable[str]) -> Dict[str, List[str]]:
    """Everything that still exists on the host for these sandbox IDs."""
    ids = set(ids)
    found: Dict[str, List[str]] = {}
    mountinfo = Path("/proc/self/mountinfo").read_text()
    runsc_state = os.listdir(daemon.data_dir / "runsc") if (daemon.data_dir / "runsc").exists() else []
    procs = pgrep(str(daemon.data_dir))
    for sid in ids:
        items = [f"process {pid}: {cmd[:160]}" for pid, cmd in procs if sid in cmd]
        for sub in ("sandboxes", "sock"):
            if (daemon.data_dir / sub / sid).exists():
                items.append(f"{sub}/{sid}")
        items += [f"runsc/{n}" for n in runsc_state if sid in n]
        items += [f"mount: {line}" for line in mountinfo.splitlines() if sid in line]
        if os.path.exists(f"/run/netns/gw-{sid}"):
            items.append(f"netns gw-{sid}")
        if (daemon.data_dir / "net" / f"{sid}.json").exists():
            items.append(f"net/{sid}.json")
        items += [f"cgroup {c}/gworker/{sid}" for c in sandbox_cgroups(sid)]
        if items:
            found[sid] = items
    return found


def wait_no_leftovers(daemon: Daemon, ids: Iterable[str], timeout: float = 20.0) -> Dict[str, List[str]]:
    ids = list(ids)
    deadline = time.monotonic() + timeout
    while True:
        left = leftovers(daemon, ids)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def on_host_ids(daemon: Daemon) -> Set[str]:
    """Sandbox IDs that have anything on the host: dirs, sockets, runsc state, processes."""
    ids: Set[str] = set()
    for sub in ("sandboxes", "sock", "runsc"):
        d = daemon.data_dir / sub
        if d.exists():
            for name in os.listdir(d):
                ids.update(ID_RE.findall(name))
    for _, cmd in pgrep(str(daemon.data_dir)):
        ids.update(ID_RE.findall(cmd))
    return ids


def wait_no_checkpoint(sid: str, timeout: float = 60.0, quiet: float = 2.0) -> None:
    """Wait until no `runsc ... checkpoint` of sandbox `sid` runs, and none
    has for `quiet` s (its supervisor pauses the sandbox before starting
    one). A supervisor goes on with a snapshot its daemon was killed during;
    the directory that checkpoint writes would appear after a restarted
    daemon removed the unfinished ones."""
    deadline = time.monotonic() + timeout
    last_seen = time.monotonic()
    while True:
        now = time.monotonic()
        running = [cmd for _, cmd in pgrep(sid)
                   if os.path.basename(cmd.split()[0]).startswith("runsc") and "checkpoint" in cmd.split()]
        if running:
            last_seen = now
        elif now - last_seen >= quiet:
            return
        if now > deadline:
            pytest.fail(f"a checkpoint of {sid} still runs after {timeout} s: {running}")
        time.sleep(0.05)


def registry(daemon: Daemon) -> Dict[str, Dict[str, Any]]:
    status, body = daemon.request("GET", "/v1/sandboxes")
    assert status == 200, body
    return {s["sandbox_id"]: s for s in body["sandboxes"]}


def settle(sid: str, timeout: float = 30.0) -> Dict[str, Any]:
    """Wait until the sandbox is running (an exec works) or is reported exited;
    return its final info. Fails on a 5xx or a hang."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            sb = Sandbox.lookup(sid)
        except GworkerError as e:
            assert e.status is None or e.status < 500, f"{sid}: {e.status} {e}"
            last = e
            time.sleep(0.2)
            continue
        info = sb._info
        if info["state"] == "exited":
            assert info.get("reason"), f"{sid} exited without a reason: {info}"
            return info
        if info["state"] == "running":
            try:
                proc = sb.exec(["echo", "ok"])
                if proc.stdout.read() == "ok\n" and proc.wait(timeout=15) == 0:
                    return info
            except GworkerError as e:
                assert e.status is None or e.status < 500, f"{sid}: {e.status} {e}"
                last = e
        time.sleep(0.2)
    pytest.fail(f"{sid} neither works nor is reported exited after {timeout} s (last: {last!r})")


def check_consistent(daemon: Daemon, before_on_host: Set[str]) -> Dict[str, Dict[str, Any]]:
    """Every sandbox in the registry works or exited with a reason, and every
    sandbox with something on the host is in the registry (nothing orphaned)."""
    reg = registry(daemon)
    for sid in reg:
        settle(sid)
    orphans = (on_host_ids(daemon) - before_on_host) - set(registry(daemon))
    assert not orphans, f"orphaned on the host, unknown to the registry: {leftovers(daemon, orphans)}"
    return reg


def raw_send(daemon: Daemon, method: str, path: str, body: Optional[dict] = None) -> socket.socket:
    """Send a request and return the socket without waiting for the answer."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(daemon.socket_path))
    data = json.dumps(body).encode() if body is not None else b""
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    return s


def raw_answer(s: socket.socket) -> Tuple[Optional[int], bytes]:
    """The answer on a raw_send socket, or (None, b"") if the daemon died first."""
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    finally:
        s.close()
    if not data.startswith(b"HTTP/1.1 "):
        return None, b""
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


def cleanup(daemon: Daemon, ids: Iterable[str]) -> None:
    for sid in ids:
        try:
            daemon.request("DELETE", f"/v1/sandboxes/{sid}")
        except OSError:
            pass


def percentile(values: List[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))] if v else float("nan")


# --------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------


def test_load_create_exec_terminate(daemon):
    full = os.environ.get("GWORKER_LOAD_FULL") == "1"
    threads = int(os.environ.get("GWORKER_LOAD_THREADS") or (10 if full else 4))
    cycles = int(os.environ.get("GWORKER_LOAD_CYCLES") or (100 if full else 10))
    lat: Dict[str, List[float]] = {"create": [], "exec": [], "terminate": [], "cycle": []}
    ids: List[str] = []
    errors: List[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(cycles):
            try:
                t0 = time.monotonic()
                sb = Sandbox.create(image=BUSYBOX, timeout=120)
                t1 = time.monotonic()
                with lock:
                    ids.append(sb.sandbox_id)
                proc = sb.exec(["echo", f"{n}-{i}"])
                out = proc.stdout.read()
                code = proc.wait(timeout=120)
                t2 = time.monotonic()
                sb.terminate()
                t3 = time.monotonic()
                if out != f"{n}-{i}\n" or code != 0:
                    raise AssertionError(f"exec gave {out!r}, {code}")
                with lock:
                    lat["create"].append(t1 - t0)
                    lat["exec"].append(t2 - t1)
                    lat["terminate"].append(t3 - t2)
                    lat["cycle"].append(t3 - t0)
            except Exception as e:  # collected and reported below
                with lock:
                    errors.append(f"thread {n} cycle {i}: {e!r}")

    start = time.monotonic()
    pool = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=threads * cycles * 30)
    elapsed = time.monotonic() - start
    done = len(lat["cycle"])
    summary = ", ".join(f"{k} p50 {percentile(v, .5) * 1000:.0f} ms p95 {percentile(v, .95) * 1000:.0f} ms"
                        for k, v in lat.items())
    print(f"\nload: {threads} threads x {cycles} cycles: {done} cycles in {elapsed:.1f} s = "
          f"{done / elapsed:.2f} cycles/s; {summary}")
    try:
        assert not errors, errors[:10]
        assert done == threads * cycles
        assert not set(ids) & set(registry(daemon)), "terminated sandboxes are still listed"
        left = wait_no_leftovers(daemon, ids)
        assert not left, f"leaked after terminate: {left}"
    finally:
        cleanup(daemon, ids)


# --------------------------------------------------------------------------
# SIGKILL of the daemon at awkward moments
# --------------------------------------------------------------------------


def test_daemon_sigkill_during_create(daemon):
    before_host = on_host_ids(daemon)
    before_reg = set(registry(daemon))
    acked: List[str] = []
    try:
        for delay in (0.0, 0.003, 0.01, 0.03, 0.1, 0.3):
            s = raw_send(daemon, "POST", "/v1/sandboxes",
                         {"image": "busybox", "cmd": ["sleep", "300"], "timeout": 120})
            time.sleep(delay)
            daemon.kill()
            status, body = raw_answer(s)
            if status is not None:
                assert status == 201, (status, body)
                acked.append(json.loads(body)["sandbox_id"])
            daemon.start()
        reg = check_consistent(daemon, before_host)
        new = set(reg) - before_reg
        # An acknowledged create is never lost.
        assert set(acked) <= new, (acked, new)
        print(f"\ncreate interrupted 6 times: {len(acked)} acknowledged, {len(new)} in the registry: "
              f"{ {sid: reg[sid]['state'] + '/' + str(reg[sid]['reason']) for sid in new} }")
        cleanup(daemon, new)
        assert not wait_no_leftovers(daemon, new)
    finally:
        cleanup(daemon, set(registry(daemon)) - before_reg)


def test_daemon_sigkill_during_exec(sandboxes, daemon):
    sb = sandboxes()
    run(sb, ["true"])
    acked: Dict[int, str] = {}
    stop = threading.Event()

    def execs() -> None:
        i = 0
        while not stop.is_set():
            try:
                p = sb.exec(["echo", f"exec-{i}"])
            except Exception:
                return  # the daemon went away mid-request
            acked[p.process_id] = f"exec-{i}\n"
            i += 1

    t = threading.Thread(target=execs, daemon=True)
    t.start()
    # Kill it while execs go on, once at least two were acknowledged.
    deadline = time.monotonic() + 30
    while len(acked) < 2 and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(acked) >= 2 and t.is_alive(), (acked, t.is_alive())
    daemon.kill()
    stop.set()
    t.join(timeout=30)
    daemon.start()
    assert len(acked) >= 2, acked
    again = Sandbox.lookup(sb.sandbox_id)
    status, body = daemon.request("GET", f"/v1/sandboxes/{sb.sandbox_id}/processes")
    assert status == 200, body
    listed = {p["process_id"]: p for p in body["processes"]}
    for pid, expected in acked.items():
        assert pid in listed, f"acknowledged process {pid} lost"
        h = SandboxProcess(sb.sandbox_id, pid, _transport=again._transport)
        assert h.stdout.read() == expected
        assert h.wait(timeout=30) == 0
    for pid, p in listed.items():
        assert p["state"] in ("running", "exited")
    assert run(again, ["echo", "after"])[1] == "after\n"


def test_daemon_sigkill_during_terminate(daemon):
    before_host = on_host_ids(daemon)
    ids = []
    for delay in (0.0, 0.005, 0.02, 0.08):
        sb = Sandbox.create(["sleep", "300"], image=BUSYBOX, timeout=120)
        ids.append(sb.sandbox_id)
        run(sb, ["true"])
        s = raw_send(daemon, "DELETE", f"/v1/sandboxes/{sb.sandbox_id}")
        time.sleep(delay)
        daemon.kill()
        raw_answer(s)
        daemon.start()
        # The registry is consistent: the sandbox is gone, or it is there and works or exited.
        reg = registry(daemon)
        if sb.sandbox_id in reg:
            settle(sb.sandbox_id)
        status, _ = daemon.request("DELETE", f"/v1/sandboxes/{sb.sandbox_id}")
        assert status in (204, 404)
        assert sb.sandbox_id not in registry(daemon)
    left = wait_no_leftovers(daemon, ids)
    assert not left, f"leaked after an interrupted terminate: {left}"
    check_consistent(daemon, before_host)


def test_daemon_sigkill_during_snapshot(sandboxes, daemon):
    before_host = on_host_ids(daemon)
    made: List[str] = []
    strays: Set[str] = set()
    try:
        for delay in (0.02, 0.15, 0.5):
            sb = sandboxes(["sh", "-c", "i=0; while true; do i=$((i+1)); sleep 0.1; done"])
            run(sb, "mkdir -p /data && echo snapshot-state > /data/f")
            s = raw_send(daemon, "POST", f"/v1/sandboxes/{sb.sandbox_id}/snapshot")
            time.sleep(delay)
            daemon.kill()
            status, body = raw_answer(s)
            acked = json.loads(body)["snapshot_id"] if status == 201 else None
            assert status in (None, 201, 409, 503), (status, body)
            # The supervisor may still be checkpointing: let it finish before
            # the restart, which removes unfinished snapshot dirs only once.
            wait_no_checkpoint(sb.sandbox_id)
            daemon.start()
            # The source works or is reported exited with a reason.
            settle(sb.sandbox_id, timeout=60)
            st, snaps = daemon.request("GET", "/v1/snapshots")
            assert st == 200, snaps
            mine = [x["snapshot_id"] for x in snaps["snapshots"] if x["source_sandbox_id"] == sb.sandbox_id]
            made += mine
            if acked:
                assert acked in mine, f"acknowledged snapshot {acked} lost"
            # Every snapshot listed restores, with the state at snapshot time.
            for snap_id in mine:
                restored = sandboxes(snapshot=SandboxSnapshot.from_id(snap_id), image=None)
                assert run(restored, ["cat", "/data/f"])[1] == "snapshot-state\n"
            # No half-made snapshot left on disk unlisted.
            st, snaps = daemon.request("GET", "/v1/snapshots")
            listed = {x["snapshot_id"] for x in snaps["snapshots"]}
            on_disk = set(os.listdir(daemon.data_dir / "snapshots"))
            strays |= {n for n in on_disk - listed if not n.startswith(".")}
        check_consistent(daemon, before_host)
        assert not strays, f"snapshot dirs on disk that the registry does not know (orphans): {strays}"
    finally:
        for snap_id in made:
            daemon.request("DELETE", f"/v1/snapshots/{snap_id}")


# --------------------------------------------------------------------------
# SIGKILL of a sandbox's own processes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("target", [
    "supervise",
    "runsc --root", "runsc-sandbox", "runsc-gofer"])
def test_sigkill_of_sandbox_process(daemon, target):
    sb = Sandbox.create(["sleep", "300"], image=BUSYBOX, timeout=120)
    try:
        run(sb, ["true"])
        victims = [pid for pid, cmd in pgrep(sb.sandbox_id) if target in cmd and str(daemon.data_dir) in cmd]
        if target == "runsc --root":
            victims = [pid for pid, cmd in pgrep(sb.sandbox_id) if cmd.split()[0].endswith("runsc") and " run " in cmd]
        assert len(victims) == 1, (target, pgrep(sb.sandbox_id))
        os.kill(victims[0], signal.SIGKILL)
        t0 = time.monotonic()
        info = settle(sb.sandbox_id, timeout=30)
        print(f"\nSIGKILL {target}: after {time.monotonic() - t0:.1f} s state={info['state']} "
              f"reason={info.get('reason')} exit={info.get('exit_code')} message={info.get('message')}")
        assert daemon.alive()
    finally:
        sb.terminate()
    assert sb.sandbox_id not in registry(daemon)
    # (A killed supervisor's cgroups go once its runsc has ended, in the background.)
    left = wait_no_leftovers(daemon, [sb.sandbox_id])
    assert not left, f"leaked after SIGKILL of {target} + terminate: {left}"


def test_sigterm_of_the_supervisor_stops_its_sandbox_cleanly(daemon):
    """An operator's `kill` (SIGTERM) of a supervisor stops its sandbox and
    removes what it made (processes, netns, veth, cgroups), instead of
    leaving them as a SIGKILL must; the daemon reports the sandbox exited."""
    sb = Sandbox.create(["sleep", "300"], image=BUSYBOX, timeout=120)
    try:
        run(sb, ["true"])
        sup = [pid for pid, cmd in pgrep(sb.sandbox_id) if "supervise" in cmd and str(daemon.data_dir) in cmd]
        assert len(sup) == 1, pgrep(sb.sandbox_id)
        assert os.path.exists(f"/run/netns/gw-{sb.sandbox_id}")
        os.kill(sup[0], signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:
            procs = pgrep(sb.sandbox_id)
            cgroups = sandbox_cgroups(sb.sandbox_id)
            netns = os.path.exists(f"/run/netns/gw-{sb.sandbox_id}")
            if not (procs or cgroups or netns) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert (procs, cgroups, netns) == ([], [], False)
        rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
        assert f"gw:{sb.sandbox_id}" not in rules
        info = settle(sb.sandbox_id, timeout=30)
        assert info["state"] == "exited", info
        assert daemon.alive()
    finally:
        sb.terminate()
    assert not wait_no_leftovers(daemon, [sb.sandbox_id])


# --------------------------------------------------------------------------
# Wedged sandboxes: every wait on a sandbox is bounded
# --------------------------------------------------------------------------


def exec_fails_the_sandbox(d2: Daemon, sid: str, within: float, what: str, *message_parts: str) -> None:
    """An exec on `sid` answers 409 `sandbox_not_running` within `within`
    seconds; the sandbox is exited `failed` with every `message_parts` in its
    message; a terminate then leaves nothing of it on the host."""
    t0 = time.monotonic()
    status, body = d2.request("POST", f"/v1/sandboxes/{sid}/exec", {"cmd": ["echo", "hi"]}, timeout=30)
    waited = time.monotonic() - t0
    assert status == 409 and body["error"]["code"] == "sandbox_not_running", (status, body)
    assert waited < within, f"the exec waited {waited:.1f} s for {what}"
    info = d2.request("GET", f"/v1/sandboxes/{sid}")[1]
    assert info["state"] == "exited" and info["reason"] == "failed", info
    for part in message_parts:
        assert part in info["message"], info
    assert d2.request("DELETE", f"/v1/sandboxes/{sid}")[0] == 204
    left = wait_no_leftovers(d2, [sid])
    assert not left, f"a sandbox failed on {what} left: {left}"


# --------------------------------------------------------------------------
# A stuck holder of the host network lock
# --------------------------------------------------------------------------


def test_stuck_network_lock_fails_the_sandbox_instead_of_hanging(daemon, tmp_path):
    """Setups and teardowns serialise on /run/gworker-net.lock. Whoever holds
    it too long (here: a plain `flock`) makes a networked sandbox fail with a
    message naming the holder, and an exec waiting for that sandbox answers,
    instead of both waiting forever. Nothing of the sandbox is left."""
    d2 = side_daemon(daemon, short_tempdir("gwlk-"), "gwlk-", {"GWORKER_NET_LOCK_WAIT_SECS": "2"})
    ready = tmp_path / "lock-held"
    # Held 10 s from when it is taken (then the terminate's teardown gets it);
    # its own process group: the kill below also ends the `sleep`, which inherited the lock.
    holder = subprocess.Popen(["flock", "/run/gworker-net.lock", "sh", "-c", f"touch {ready}; exec sleep 10"],
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.exists(), f"flock did not take the lock (exit {holder.poll()})"
        status, body = d2.request("POST", "/v1/sandboxes", {"image": "busybox", "cmd": [], "timeout": 60})
        assert status == 201, body
        exec_fails_the_sandbox(d2, body["sandbox_id"], 7, "a lock wait of 2 s",
                               "host network lock", f"pid {holder.pid}")
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
        d2.stop()


def test_a_boot_that_never_answers_fails_the_sandbox(daemon, tmp_path):
    """A runsc whose sandbox never comes up (here: a stand-in that hangs in
    `run`) does not leave the sandbox `starting` and its execs waiting
    forever: the supervisor's boot watchdog fails it with a message, and a
    terminate leaves nothing behind."""
    fake = tmp_path / "runsc"
    fake.write_text("#!/bin/sh\n"
                    "for a in \"$@\"; do [ \"$a\" = run ] && exec sleep 300; done\n"
                    "exec /usr/bin/runsc \"$@\"\n")
    fake.chmod(0o755)
    d2 = side_daemon(daemon, short_tempdir("gwbt-"), "gwbt-", {"GWORKER_BOOT_LIMIT_SECS": "2"}, ["--runsc", str(fake)])
    try:
        status, body = d2.request("POST", "/v1/sandboxes", {"image": "busybox", "timeout": 60, "block_network": True})
        assert status == 201, body
        exec_fails_the_sandbox(d2, body["sandbox_id"], 10, "a boot limit of 2 s", "did not start within 2 s")
    finally:
        d2.stop()


def test_a_frozen_sandbox_fails_its_exec_instead_of_hanging(daemon, tmp_path):
    """A sandbox whose agent stops answering (here: its gVisor sentry is
    SIGSTOPped on the host) answers an exec with 409 after the agent's
    answer limit, and is failed with a message saying why, instead of every
    exec hanging forever. A terminate then leaves nothing."""
    d2 = side_daemon(daemon, short_tempdir("gwfr-"), "gwfr-", {"GWORKER_AGENT_ANSWER_SECS": "2"})
    stopped: List[int] = []
    try:
        status, body = d2.request("POST", "/v1/sandboxes", {"image": "busybox", "timeout": 60, "block_network": True})
        assert status == 201, body
        sid = body["sandbox_id"]
        status, body = d2.request("POST", f"/v1/sandboxes/{sid}/exec", {"cmd": ["true"]}, timeout=60)
        assert status == 201, body
        stopped = [pid for pid, cmd in pgrep(sid) if "runsc-sandbox" in cmd and " boot " in cmd]
        assert len(stopped) == 1, pgrep(sid)
        os.kill(stopped[0], signal.SIGSTOP)
        exec_fails_the_sandbox(d2, sid, 10, "an answer limit of 2 s", "did not answer an exec within 2 s")
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        d2.stop()


# --------------------------------------------------------------------------
# Disk full
# --------------------------------------------------------------------------


def test_data_disk_full(daemon):
    mnt = short_tempdir("gwfull-")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    d2: Optional[Daemon] = None
    ids: List[str] = []
    try:
        data = mnt / "data"
        sock_dir = short_tempdir("gwfs-")
        d2 = Daemon(gworker_bin(), data, sock_dir / "gw.sock")
        d2.log_path = mnt.parent / (mnt.name + "-daemon.log")
        d2.start()
        ok = d2.request("POST", "/v1/sandboxes", {"image": "busybox", "cmd": [], "timeout": 120})
        assert ok[0] == 201, ok
        first = ok[1]["sandbox_id"]
        ids.append(first)
        status, proc = d2.request("POST", f"/v1/sandboxes/{first}/exec", {"cmd": ["echo", "hi"]}, timeout=120)
        assert status == 201, proc
        # Fill the disk.
        filler = mnt / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=100"], capture_output=True)
        assert shutil.disk_usage(mnt).free < 1 << 20
        answers = []
        status, body = d2.request("POST", "/v1/sandboxes", {"image": "busybox", "cmd": ["echo", "x"], "timeout": 60})
        answers.append(("create", status, body))
        if status == 201:
            ids.append(body["sandbox_id"])
        status, body = d2.request("POST", f"/v1/sandboxes/{first}/exec", {"cmd": ["echo", "full"]}, timeout=60)
        answers.append(("exec", status, body))
        status, body = d2.request("POST", f"/v1/sandboxes/{first}/snapshot", timeout=120)
        answers.append(("snapshot", status, body))
        snap_acked = body.get("snapshot_id") if status == 201 else None
        print(f"\ndisk full answers: {[(a, s, (b or {}).get('error', {}).get('code') if isinstance(b, dict) else b) for a, s, b in answers]}")
        assert d2.alive(), d2.log_tail()
        problems = [(what, status, body) for what, status, body in answers
                    if status >= 500 and not (status == 503 and body["error"]["code"] in
                                              ("sandbox_starting_failed", "snapshot_failed"))
                    and not (status == 507 and body["error"]["code"] == "no_space")]
        # Space again: everything works, acknowledged snapshots restore.
        filler.unlink()
        reg = {s["sandbox_id"]: s for s in d2.request("GET", "/v1/sandboxes")[1]["sandboxes"]}
        for sid, info in reg.items():
            assert info["state"] in ("starting", "running", "exited"), info
            if info["state"] == "exited":
                assert info.get("reason"), info
        status, body = d2.request("POST", "/v1/sandboxes", {"image": "busybox", "cmd": [], "timeout": 60})
        assert status == 201, body
        ids.append(body["sandbox_id"])
        status, proc = d2.request("POST", f"/v1/sandboxes/{body['sandbox_id']}/exec", {"cmd": ["echo", "hi"]},
                                  timeout=120)
        assert status == 201, proc
        if snap_acked:
            status, body = d2.request("POST", "/v1/sandboxes", {"snapshot": {"snapshot_id": snap_acked}, "timeout": 60})
            assert status == 201, f"acknowledged snapshot taken on a full disk does not restore: {body}"
            ids.append(body["sandbox_id"])
        assert not problems, f"a full disk gave 5xx internal errors: {problems}"
    finally:
        if d2 is not None and d2.alive():
            for sid in set(ids) | {s["sandbox_id"] for s in d2.request("GET", "/v1/sandboxes")[1]["sandboxes"]}:
                d2.request("DELETE", f"/v1/sandboxes/{sid}")
            # Supervisors remove their sandbox's network just after answering
            # the terminate: let them finish before their data dir goes away.
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and list((data / "net").glob("sb-*.json")):
                time.sleep(0.05)
            d2.stop()
        for pid, cmd in pgrep(str(mnt)):
            if any(sid in cmd for sid in ids):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        subprocess.run(["umount", "-l", str(mnt)])
        shutil.rmtree(mnt, ignore_errors=True)
        if d2 is not None:
            shutil.rmtree(d2.socket_path.parent, ignore_errors=True)
            d2.log_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------
# API fuzzing
# --------------------------------------------------------------------------


def test_schemathesis_fuzz(daemon, tmp_path):
    exe = shutil.which("schemathesis") or shutil.which("st")
    if exe is None:
        pytest.skip("schemathesis is not installed (scripts/install-deps.sh installs it)")
    token = secrets.token_hex(16)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = short_tempdir("gwfzd-") / "data"  # supervisor socket paths must stay short
    data.mkdir()
    # Share the session daemon's built images (builders lock each other out),
    # and build the default image first: a request on a sandbox still starting
    # waits for it, and the first debian-slim build takes ~30 s.
    with Sandbox.create(image=Image.debian_slim(), timeout=120) as warm:
        assert run(warm, ["true"])[0] == 0
    (data / "images").symlink_to(daemon.data_dir / "images")
    d2 = Daemon(gworker_bin(), data, short_tempdir("gwfz-") / "gw.sock", ["--listen", f"127.0.0.1:{port}"],
                env={"GWORKER_TOKEN": token})
    d2.start()
    try:
        # The wait and output endpoints block by design (up to 60 s, or while a
        # process runs), and image builds and pulls do real work (a Debian
        # build takes a minute; a generated registry reference would send
        # traffic to a real registry): they are left to the dedicated tests.
        cmd = [exe, "run", f"http://127.0.0.1:{port}/v1/openapi.json", "-H", f"Authorization: Bearer {token}",
               "--checks", "not_a_server_error", "--max-examples", os.environ.get("GWORKER_FUZZ_EXAMPLES", "8"),
               "--max-time", os.environ.get("GWORKER_FUZZ_SECONDS", "30"), "--phases", "examples,coverage,fuzzing",
               "--request-timeout", "30", "--no-shrink", "--workers", "1", "--seed", "20251126",
               "--exclude-path-regex", "/(wait|stdout|stderr)$|^/v1/images/(build|pull)$"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        print("\n" + proc.stdout)
        # The summary comes last; the failing requests (with a curl line to
        # reproduce each) come before it, so the message keeps both.
        lines = proc.stdout.splitlines()
        tail = "\n".join(lines[:-40][-80:] + ["..."] + lines[-40:]) if len(lines) > 40 else proc.stdout
        assert d2.alive(), "the daemon died under fuzzing:\n" + d2.log_tail()
        assert "panicked" not in d2.log_path.read_text(errors="replace")
        assert proc.returncode == 0, f"schemathesis found failures (exit {proc.returncode}):\n{tail}\n{proc.stderr[-2000:]}"
        assert re.search(r"\d+ generated", proc.stdout), tail
        status, body = d2.request("GET", "/v1/health")
        assert status == 200
    finally:
        if d2.alive():
            status, body = d2.request("GET", "/v1/sandboxes")
            ids = [s["sandbox_id"] for s in body["sandboxes"]] if status == 200 else []
            for sid in ids:
                d2.request("DELETE", f"/v1/sandboxes/{sid}")
            status, body = d2.request("GET", "/v1/snapshots")
            for snap in (body or {}).get("snapshots", []):
                d2.request("DELETE", f"/v1/snapshots/{snap['snapshot_id']}")
            d2.stop()
            left = wait_no_leftovers(d2, ids)
            assert not left, f"fuzzing left sandboxes behind after terminate: {left}"


def test_daemon_sigkill_during_image_build(daemon):
    """A build cut short by a daemon crash leaves nothing: no half-made layer,
    no build sandbox, no overlay mount; the same build then succeeds."""
    from gworker_client._transport import Transport

    marker = secrets.token_hex(4)
    spec = {"base": {"name": "busybox"}, "steps": [{"run_commands": [f"echo {marker} > /m", "sleep 30"]}]}
    conn, resp = Transport.from_env().open_post_stream("/v1/images/build", json.dumps({"spec": spec}).encode())
    # Wait until the step runs in its build sandbox.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if pgrep("gwb-") and any(str(daemon.data_dir) in cmd for _, cmd in pgrep("gwb-")):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the build sandbox never started")
    layers = daemon.data_dir / "images" / "layers"
    assert [n for n in os.listdir(layers) if n.startswith(".tmp-")], "a layer is being made"
    # The step runs without cgroups of runsc's own: a step cut short left
    # them behind. Those an older daemon left go at the next start.
    old_pid = daemon.proc.pid
    cgroups = Path("/sys/fs/cgroup")
    assert not list(cgroups.glob(f"*/gwb-*-{old_pid}-*")) + list(cgroups.glob(f"gwb-*-{old_pid}-*"))
    hierarchy = cgroups / "pids" if (cgroups / "pids").is_dir() else cgroups
    stale = hierarchy / f"gwb-00000000000a-{old_pid}-1"
    daemon.kill()
    conn.close()
    stale.mkdir()
    try:
        daemon.start()
        assert not stale.exists(), "a stale build cgroup of the killed daemon is removed at start"
    finally:
        if stale.exists():
            stale.rmdir()
    assert not [n for n in os.listdir(layers) if n.startswith(".tmp-")]
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(layers / ".tmp-") not in mounts
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and [p for p, cmd in pgrep("gwb-") if str(daemon.data_dir) in cmd]:
        time.sleep(0.2)
    assert not [p for p, cmd in pgrep("gwb-") if str(daemon.data_dir) in cmd]
    # The same step, without the sleep, builds from scratch.
    image_id = Image.from_name("busybox").run_commands(f"echo {marker} > /m", "true").build(quiet=True)
    sb = Sandbox.create(["cat", "/m"], image=Image.from_name(image_id), timeout=60)
    try:
        assert sb.wait() == 0
        assert sb.stdout.read() == f"{marker}\n"
    finally:
        sb.terminate()
