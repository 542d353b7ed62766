"""Hostile code: attacks from inside a sandbox and abuse of the API.

Every attack here must fail (or stay confined to the sandbox), and each test
proves it from the host: canary files the test writes on the host keep their
content and their access time (``atime`` is set older than ``mtime``, so with
``relatime`` any read would move it), their random token never shows up in
anything a sandbox prints, host processes and mounts are untouched.

Floods (1 GiB of stdout, huge argv/env, invalid UTF-8) check that the daemon's
memory stays bounded, clients get every byte (or a clear 4xx), and nothing
crashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from helpers import BUSYBOX, Daemon, run
from gworker_client import GworkerError, Sandbox
from gworker_client._transport import UnixHTTPConnection

CANARY_ENV = "GWORKER_HOSTILE_CANARY"


# --------------------------------------------------------------------------
# Canary: host files (and a daemon environment variable) holding a token
# --------------------------------------------------------------------------


class Canary:
    def __init__(self, daemon: Daemon) -> None:
        self.token = "GWC" + secrets.token_hex(16)
        self.dir = Path(f"/tmp/gwcanary-{secrets.token_hex(6)}")
        self.dir.mkdir(mode=0o755)
        self.paths = [daemon.data_dir / "hostile-canary.txt", self.dir / "canary.txt"]
        self.snap: Dict[Path, Tuple[float, str]] = {}
        for p in self.paths:
            p.write_text(f"secret {self.token}\n")
            os.chmod(p, 0o644)
            st = os.stat(p)
            # atime < mtime: under relatime the next read of the file moves atime.
            os.utime(p, ns=(st.st_mtime_ns - 10**12, st.st_mtime_ns))
            self.snap[p] = (os.stat(p).st_atime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            os.utime(p, ns=(self.snap[p][0], st.st_mtime_ns))  # our own read above moved it back
            self.snap[p] = (os.stat(p).st_atime_ns, self.snap[p][1])

    def check_output(self, *outputs: object) -> None:
        for out in outputs:
            text = out.decode("latin-1") if isinstance(out, bytes) else str(out)
            assert self.token not in text, f"the canary token leaked into a sandbox's output: {text[:2000]!r}"

    def check_untouched(self) -> None:
        for p in self.paths:
            atime, digest = self.snap[p]
            st = os.stat(p)
            assert st.st_atime_ns == atime, f"{p} was read (atime moved) during the attack"
            assert stat.S_IMODE(st.st_mode) == 0o644
            assert hashlib.sha256(p.read_bytes()).hexdigest() == digest, f"{p} was modified"
            os.utime(p, ns=(atime, st.st_mtime_ns))  # undo our own read
        assert sorted(os.listdir(self.dir)) == ["canary.txt"], "something was written next to the host canary"

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        for p in self.paths:
            try:
                p.unlink()
            except OSError:
                pass


@pytest.fixture(scope="module")
def canary(daemon: Daemon) -> Iterator[Canary]:
    c = Canary(daemon)
    # Put the token in the daemon's environment too (its supervisors inherit it),
    # so /proc/*/environ hunting from inside would find it if it could.
    daemon.env[CANARY_ENV] = c.token
    daemon.restart()
    try:
        yield c
    finally:
        daemon.env.pop(CANARY_ENV, None)
        c.cleanup()


def sh(sb: Sandbox, script: str, timeout: float = 120) -> Tuple[int, bytes, bytes]:
    proc = sb.exec(["sh", "-c", script])
    out = proc.stdout.read_bytes()
    err = proc.stderr.read_bytes()
    return proc.wait(timeout=timeout), out, err


def supervisor_pids(sandbox_id: str) -> List[int]:
    out = subprocess.run(["pgrep", "-f", f"supervise .*{sandbox_id}"], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def sandbox_host_pids(sandbox_id: str) -> List[int]:
    out = subprocess.run(["pgrep", "-f", sandbox_id], capture_output=True, text=True).stdout
    return [int(x) for x in out.split() if int(x) != os.getpid()]


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def send_oversized(daemon: Daemon, method: str, path: str, body: bytes, content_type: str) -> Tuple[int, bytes]:
    """Send a big body the daemon may refuse before reading it all (it then
    closes the connection under us): the answer is read in any case."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(str(daemon.socket_path))
    try:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
        try:
            for i in range(0, len(body), 1 << 20):
                s.sendall(body[i:i + (1 << 20)])
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            pass
    finally:
        s.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), data[:200]
    return int(head.split()[1]), rest


def raw_request(daemon: Daemon, method: str, path: str, body: bytes = None,
                headers: Dict[str, str] = None, timeout: float = 60) -> Tuple[int, bytes]:
    conn = UnixHTTPConnection(str(daemon.socket_path), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------
# Reading host files
# --------------------------------------------------------------------------


def test_reading_host_files_fails(sandboxes, daemon, canary):
    sb = sandboxes()
    paths = " ".join(str(p) for p in canary.paths)
    data = str(daemon.data_dir)
    script = f"""
for p in {paths}; do cat "$p"; cat "/proc/1/root$p"; cat "/proc/self/root$p"; cat "/proc/1/cwd$p"; done
ls -la {data} {canary.dir} /proc/1/root/ /proc/1/cwd/
cat {data}/gworker.db {data}/daemon-test.log {data}/sandboxes/*/launch.json {data}/sandboxes/*/supervisor.log
for p in {paths}; do ln -s "$p" /tmp/l-$$; cat /tmp/l-$$; rm -f /tmp/l-$$; ln "$p" /tmp/h-$$; done
cat /proc/self/mountinfo /proc/mounts /proc/self/cgroup
for f in /proc/*/environ /proc/*/cmdline /proc/*/task/*/environ; do echo "== $f"; cat "$f" | tr '\\0' ' '; echo; done
ls -la /proc/*/fd/ /proc/*/cwd /proc/*/exe /proc/*/root 2>&1
for f in /proc/[0-9]*/fd/*; do case "$f" in /proc/1/*) ;; *) [ -f "$f" ] && head -c 4096 "$f";; esac; done
cat /.gworker/../../../../{data}/hostile-canary.txt
cd / && cd .. && cd .. && pwd && ls
dmesg; cat /proc/kmsg & sleep 0.2; kill $! 2>/dev/null
P=$(printf 'GW%s' C); for d in /bin /etc /root /run /sbin /tmp /usr /var /.gworker; do grep -rl "$P" $d 2>/dev/null; done
echo done
"""
    code, out, err = sh(sb, script, timeout=180)
    assert b"done" in out, (code, out[-2000:], err[-2000:])
    canary.check_output(out, err)
    canary.check_untouched()
    # And not via the API's workdir or the create path either.
    code, out, err = run(sb, ["cat", "hostile-canary.txt"], workdir="/tmp")
    canary.check_output(out, err)
    sb2 = sandboxes(["cat", str(canary.paths[0]), str(canary.paths[1])], workdir=str(daemon.data_dir))
    assert sb2.wait(timeout=60) != 0
    canary.check_output(sb2.stdout.read_bytes(), sb2.stderr.read_bytes())
    canary.check_untouched()


def test_daemon_environment_is_not_visible(sandboxes, daemon, canary):
    # The token really is in the daemon's (and its supervisors') environment...
    env = Path(f"/proc/{daemon.proc.pid}/environ").read_bytes()
    assert canary.token.encode() in env
    sb = sandboxes()
    run(sb, ["true"])
    sup = supervisor_pids(sb.sandbox_id)
    code, out, err = sh(sb, "env; cat /proc/*/environ | tr '\\0' '\\n'; cat /proc/1/environ; echo end")
    assert code == 0 and b"end" in out
    # ...and nothing of it reaches the sandbox: not the token, not the daemon's variables.
    canary.check_output(out, err)
    assert CANARY_ENV.encode() not in out
    assert b"GWORKER_" not in out and b"RUST_BACKTRACE" not in out, out
    assert sup and canary.token.encode() in Path(f"/proc/{sup[0]}/environ").read_bytes(), \
        "the supervisor (which inherits the token) was not found on the host"


def test_host_pids_mounts_and_devices_are_invisible(sandboxes, daemon, canary):
    sb = sandboxes()
    run(sb, ["true"])
    pids = [daemon.proc.pid, *sandbox_host_pids(sb.sandbox_id)]
    assert len(pids) >= 3
    probe = " ".join(f"ls -d /proc/{p} && echo SEEN\"\"-{p}; kill -9 {p} && echo KILLED\"\"-{p};" for p in pids)
    code, out, err = sh(sb, probe + " ps; cat /proc/self/mountinfo; ls /dev; echo end")
    assert b"end" in out
    for p in pids:
        assert f"SEEN-{p}".encode() not in out and f"KILLED-{p}".encode() not in out
        assert Path(f"/proc/{p}").exists(), f"host process {p} died"
    assert daemon.alive()
    # The sandbox's mount table names none of the host's paths.
    for needle in (str(daemon.data_dir), "/work", "/dev/vda", "ext4"):
        assert needle.encode() not in out, needle
    assert not (set(out.decode().split()) & {"vda", "sda", "nvme0n1", "kmsg", "mem", "kvm"}), out
    canary.check_output(out, err)
    assert run(sb, ["echo", "still fine"])[1] == "still fine\n"


def test_daemon_and_supervisor_sockets_are_unreachable(sandboxes, daemon, canary):
    sb = sandboxes()
    run(sb, ["true"])
    sock = daemon.data_dir / "sock" / sb.sandbox_id
    assert daemon.socket_path.exists() and sock.exists()
    code, out, err = sh(sb, f"ls -la {daemon.socket_path} {sock} {daemon.socket_path.parent} {sock.parent}; "
                            f"find / -type s 2>/dev/null | grep -v '^/proc'; "
                            f"nc local:{daemon.socket_path} </dev/null; echo end")
    assert b"end" in out
    assert b"gw.sock" not in out and sb.sandbox_id.encode() not in out, out
    assert b"No such file" in err


@pytest.mark.xfail(strict=True, reason=(
    "BUG: any process in the sandbox (root, no CAP_SYS_PTRACE) can open /proc/1/fd/0 and /proc/1/fd/1 -- the "
    "agent's protocol pipes to the supervisor -- and steal frames meant for the agent or forge frames to the "
    "supervisor (confined to that sandbox). The agent sets PR_SET_DUMPABLE=0, but this gVisor (20221219) does not "
    "check dumpability for /proc/PID/fd"))
def test_agent_control_pipes_are_unreachable(sandboxes):
    sb = sandboxes()
    code, out, err = sh(sb, "exec 3</proc/1/fd/0 && echo OPENED-R; exec 4>/proc/1/fd/1 && echo OPENED-W; "
                            "ls -l /proc/1/fd/ 2>&1; cat /proc/1/environ >/dev/null && echo ENVIRON; echo end")
    assert b"end" in out
    assert b"OPENED-R" not in out and b"OPENED-W" not in out, (out, err)


# --------------------------------------------------------------------------
# Writing outside the sandbox
# --------------------------------------------------------------------------


def test_writes_stay_inside(sandboxes, daemon, canary):
    sb = sandboxes()
    run(sb, ["true"])
    rootfs = daemon.data_dir / "images" / "busybox" / "rootfs"
    config = json.loads((daemon.data_dir / "sandboxes" / sb.sandbox_id / "bundle" / "config.json").read_text())
    agent = Path(next(m["source"] for m in config["mounts"] if m["destination"] == "/.gworker/agent"))
    agent_digest = hashlib.sha256(agent.read_bytes()).hexdigest()
    sysrq_path = Path("/proc/sys/kernel/sysrq")
    sysrq = sysrq_path.read_text() if sysrq_path.exists() else None
    image_before = sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*"))
    marker = "gwpwn-" + secrets.token_hex(6)
    c = canary.paths
    script = f"""
mkdir -p {canary.dir} {daemon.data_dir}; echo pwned > {canary.dir}/{marker}; echo pwned >> {c[0]}; echo pwned >> {c[1]}
echo pwned > {daemon.data_dir}/{marker}; echo pwned > /proc/1/root/{marker}; echo pwned > /bin/{marker}
echo pwned > /.gworker/agent && echo AGENT-WRITTEN; cp /bin/busybox /.gworker/agent && echo AGENT-REPLACED
mount -o remount,rw /.gworker/agent && echo REMOUNTED
echo pwned > /sys/kernel/{marker}; echo 1 > /proc/sys/kernel/sysrq && echo SYSRQ
rm -rf /bin /etc /usr /sbin 2>/dev/null
/bin/busybox echo still-here; echo end
"""
    code, out, err = sh(sb, script)
    assert b"end" in out
    for bad in (b"AGENT-WRITTEN", b"AGENT-REPLACED", b"REMOUNTED"):
        assert bad not in out, (out, err)
    # Nothing of it reached the host.
    assert not (daemon.data_dir / marker).exists()
    assert not Path("/" + marker).exists()
    assert not (rootfs / "bin" / marker).exists()
    assert hashlib.sha256(agent.read_bytes()).hexdigest() == agent_digest
    assert sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*")) == image_before, "the image changed"
    assert (sysrq_path.read_text() if sysrq_path.exists() else None) == sysrq
    assert not Path("/sys/kernel", marker).exists()
    canary.check_untouched()
    # A fresh sandbox of the same image is whole.
    fresh = sandboxes()
    assert run(fresh, ["sh", "-c", "ls /bin/ls /etc >/dev/null && echo whole"])[1] == "whole\n"


# --------------------------------------------------------------------------
# Syscall attacks (Python in debian-slim)
# --------------------------------------------------------------------------

ATTACK_SCRIPT = r"""
import ctypes, errno, json, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
host_pids = [int(x) for x in sys.argv[1].split(",")]
host_dev = int(sys.argv[2]); mnt_name = sys.argv[3]; sockets = sys.argv[4].split(",")
canary_paths = sys.argv[5].split(",")
res = {}

def err(e):
    return errno.errorcode.get(e, str(e))

def sc(name, nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(nr, *args)
    res[name] = "ok" if r >= 0 else err(ctypes.get_errno())

def tryf(name, f):
    try:
        f()
        res[name] = "ok"
    except OSError as e:
        res[name] = err(e.errno)
    except Exception as e:
        res[name] = type(e).__name__

# Raw and packet sockets.
tryf("raw_icmp", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
tryf("raw_tcp", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP))
tryf("raw_ip6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6))
tryf("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0x0300))
# ptrace / kill / process_vm_readv of the host's processes.
for p in host_pids:
    sc(f"ptrace_attach_{p}", 101, 16, p, 0, 0)
    sc(f"ptrace_seize_{p}", 101, 0x4206, p, 0, 0)
    sc(f"kill0_{p}", 62, p, 0)
    tryf(f"proc_{p}", lambda p=p: os.stat(f"/proc/{p}"))
# mount, directly and from a new user + mount namespace (confined if it works).
os.makedirs("/" + mnt_name, exist_ok=True)
sc("mount_tmpfs", 165, b"none", ("/" + mnt_name).encode(), b"tmpfs", 0, None)
sc("mount_proc", 165, b"proc", ("/" + mnt_name).encode(), b"proc", 0, None)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    out = {}
    ctypes.set_errno(0)
    out["unshare"] = "ok" if libc.unshare(0x10000000 | 0x00020000) == 0 else err(ctypes.get_errno())
    ctypes.set_errno(0)
    out["userns_mount"] = "ok" if libc.mount(b"none", ("/" + mnt_name).encode(), b"tmpfs", 0, None) == 0 else err(ctypes.get_errno())
    os.write(w, json.dumps(out).encode()); os._exit(0)
os.close(w); os.waitpid(pid, 0)
res.update(json.loads(os.read(r, 4096) or b"{}"))
# Kernel modules and other host-kernel doors.
buf = ctypes.create_string_buffer(b"\x7fELF" + b"\0" * 60)
sc("init_module", 175, buf, 64, b"")
fd = os.open("/dev/null", os.O_RDONLY)
sc("finit_module", 313, fd, b"", 0)
sc("delete_module", 176, b"ext4", 0)
sc("kexec_load", 246, 0, 0, None, 0)
# "Shocker": open a host inode by handle.
handle = ctypes.create_string_buffer(8 + 8)
ctypes.memmove(handle, (8).to_bytes(4, "little") + (1).to_bytes(4, "little") + (2).to_bytes(8, "little"), 16)
rootfd = os.open("/", os.O_RDONLY)
sc("open_by_handle_at", 304, rootfd, handle, 0)
sc("bpf", 321, 0, None, 0)
sc("perf_event_open", 298, None, 0, -1, -1, 0)
# A block device node for the host's root disk.
def blockdev():
    os.mknod("/tmp/hostdisk", 0o600 | 0o060000, host_dev)
    with open("/tmp/hostdisk", "rb") as f:
        data = f.read(65536)
    if not data:
        raise OSError(errno.ENXIO, "empty")
tryf("blockdev_read", blockdev)
def mem():
    with open("/dev/mem", "rb") as f:
        f.read(16)
tryf("dev_mem", mem)
# The chroot escape (CAP_SYS_CHROOT is granted): it only ever reaches the sandbox's root.
def chroot_escape():
    os.makedirs("/tmp/jail", exist_ok=True)
    keep = os.open("/", os.O_RDONLY)
    os.chroot("/tmp/jail"); os.fchdir(keep)
    for _ in range(64):
        os.chdir("..")
    os.chroot(".")
    for p in canary_paths:
        try:
            open(p).read(); res["escaped_read_" + p] = "ok"
        except OSError as e:
            res["escaped_read_" + p] = err(e.errno)
    res["escaped_sees_work"] = os.path.exists("/work") or os.path.exists("/root/.cargo")
pid = os.fork()
if pid == 0:
    try:
        chroot_escape()
    except OSError as e:
        res["chroot"] = err(e.errno)
    print(json.dumps(res)); sys.stdout.flush(); os._exit(0)
os.waitpid(pid, 0)
# The daemon's and supervisor's sockets.
for i, path in enumerate(sockets):
    def conn(path=path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(path)
    tryf(f"unix_connect_{i}", conn)
# Host canaries, directly.
for p in canary_paths:
    tryf("open_" + p, lambda p=p: open(p).read())
print(json.dumps(res))
"""


def test_syscall_attacks_fail(py_sandbox, daemon, canary):
    sb = py_sandbox
    host_pids = [daemon.proc.pid, *sandbox_host_pids(sb.sandbox_id)]
    mnt_name = "gwmnt-" + secrets.token_hex(6)
    sockets = [str(daemon.socket_path), str(daemon.data_dir / "sock" / sb.sandbox_id)]
    modules_path = Path("/proc/modules")  # absent on a kernel without module support
    modules = modules_path.read_text() if modules_path.exists() else None
    host_dev = os.stat(daemon.data_dir).st_dev
    code, out, err = run(sb, ["python3", "-c", ATTACK_SCRIPT, ",".join(map(str, host_pids)), str(host_dev),
                              mnt_name, ",".join(sockets), ",".join(str(p) for p in canary.paths)])
    assert code == 0, err
    lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    assert len(lines) == 2, out
    escaped, res = lines
    print(json.dumps(res, indent=1), json.dumps(escaped))
    canary.check_output(out, err)
    for name in ("raw_icmp", "raw_tcp", "raw_ip6", "packet", "mount_tmpfs", "mount_proc", "init_module",
                 "finit_module", "delete_module", "kexec_load", "open_by_handle_at", "bpf", "perf_event_open",
                 "blockdev_read", "dev_mem", "unix_connect_0", "unix_connect_1"):
        assert res[name] != "ok", f"{name} succeeded inside the sandbox: {res}"
    for p in host_pids:
        for what in ("ptrace_attach", "ptrace_seize", "kill0", "proc"):
            assert res[f"{what}_{p}"] != "ok", f"{what} of host pid {p} worked: {res}"
        assert Path(f"/proc/{p}").exists()
        assert "TracerPid:\t0" in Path(f"/proc/{p}/status").read_text()
    for p in canary.paths:
        assert res["open_" + str(p)] != "ok"
        assert escaped.get("escaped_read_" + str(p), "fail") != "ok", escaped
    assert escaped.get("escaped_sees_work") is not True, escaped
    # A mount that worked in a user namespace stayed inside the sandbox.
    assert mnt_name not in Path("/proc/self/mountinfo").read_text()
    assert mnt_name not in Path("/proc/1/mountinfo").read_text()
    assert not Path("/" + mnt_name).exists()
    assert (modules_path.read_text() if modules_path.exists() else None) == modules
    canary.check_untouched()
    assert daemon.alive()
    assert run(sb, ["echo", "ok"])[1] == "ok\n"


# --------------------------------------------------------------------------
# Other sandboxes
# --------------------------------------------------------------------------


def test_other_sandbox_is_invisible(sandboxes, daemon, canary):
    secret = "GWS" + secrets.token_hex(16)
    victim = sandboxes()
    marker = 31000 + secrets.randbelow(999)  # an unusual `sleep` argument to look for
    assert run(victim, ["sh", "-c", f"echo {secret} > /tmp/secret-file; echo ok"])[1] == "ok\n"
    assert run(victim, ["cat", "/tmp/secret-file"])[1] == secret + "\n"
    sleeper = victim.exec(["sleep", str(marker)])
    attacker = sandboxes()
    script = f"""
ls -la /tmp; cat /tmp/secret-fi""le; ps; ps -ef
for f in /proc/[0-9]*/cmdline; do cat "$f" | tr '\\0' ' '; echo; done
pkill sleep; killall sleep; kill -9 -1
grep -rs "$(printf 'GW%s' S)" /tmp /proc/[0-9]*/cwd 2>/dev/null
cat /proc/1/root/tmp/secret-fi""le
echo end
"""
    code, out, err = sh(attacker, script)
    assert b"end" in out or code != 0
    assert secret.encode() not in out + err
    assert str(marker).encode() not in out, out
    assert b"secret-file" not in out
    # The victim is unharmed: its process, its file.
    assert sleeper.poll() is None
    assert run(victim, ["cat", "/tmp/secret-file"])[1] == secret + "\n"
    sleeper.send_signal(9)
    assert sleeper.wait(timeout=30) == 137
    canary.check_untouched()


def test_guessing_sandbox_ids_finds_nothing(sandboxes, daemon):
    real = sandboxes()
    run(real, ["true"])
    known = daemon.sandbox_ids()
    statuses = {}
    for _ in range(60):
        sid = "sb-" + secrets.token_hex(16)
        assert sid not in known
        for method, path, body in (("GET", f"/v1/sandboxes/{sid}", None),
                                   ("POST", f"/v1/sandboxes/{sid}/exec", {"cmd": ["true"]}),
                                   ("GET", f"/v1/sandboxes/{sid}/processes/0/stdout", None),
                                   ("DELETE", f"/v1/sandboxes/{sid}", None)):
            status, answer = daemon.request(method, path, body)
            statuses.setdefault((method, status), 0)
            statuses[(method, status)] += 1
            assert status == 404 and answer["error"]["code"] == "not_found", (method, path, status, answer)
    # Near misses of a real ID and hostile spellings: never 2xx, never 5xx, never another sandbox.
    rid = real.sandbox_id
    variants = [rid[:-1], rid[:-1] + ("0" if rid[-1] != "0" else "1"), rid.upper(), rid + "0",
                rid + "/..", f"..%2F..%2F{rid}", "..", "%2e%2e", "sb-" + "0" * 32, "sb-" + "a" * 4096,
                "sb-%00" + rid[3:], rid.replace("sb-", "sn-"), "sb-..%2F..%2Fetc%2Fpasswd", "*", "%2A", "%20" + rid]
    for v in variants:
        for method in ("GET", "DELETE"):
            status, body = raw_request(daemon, method, f"/v1/sandboxes/{v}")
            assert 400 <= status < 500, (v, method, status, body)
    assert rid in daemon.sandbox_ids()
    assert run(real, ["echo", "alive"])[1] == "alive\n"


# --------------------------------------------------------------------------
# Floods and odd bytes
# --------------------------------------------------------------------------


class RssSampler(threading.Thread):
    def __init__(self, pids: Dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = {k: 0 for k in pids}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for k, p in self.pids.items():
                self.peak[k] = max(self.peak[k], rss_kib(p))
            time.sleep(0.05)


def test_one_gib_stdout_flood_in_bounded_memory(sandboxes, daemon):
    sb = sandboxes()
    neighbour = sandboxes()
    run(neighbour, ["true"])
    run(sb, ["true"])
    sup = supervisor_pids(sb.sandbox_id)
    assert len(sup) == 1
    sampler = RssSampler({"daemon": daemon.proc.pid, "supervisor": sup[0]})
    sampler.start()
    latencies: List[float] = []
    stop = threading.Event()

    def neighbour_execs() -> None:
        while not stop.is_set():
            t = time.monotonic()
            p = neighbour.exec(["echo", "n"])
            assert p.stdout.read() == "n\n"
            p.wait(timeout=60)
            latencies.append(time.monotonic() - t)
            time.sleep(0.1)

    nt = threading.Thread(target=neighbour_execs, daemon=True)
    nt.start()
    t0 = time.monotonic()
    proc = sb.exec(["dd", "if=/dev/zero", "bs=1048576", "count=1024"])
    n = 0
    bad = 0
    for chunk in proc.stdout.iter_bytes():
        n += len(chunk)
        if chunk.count(0) != len(chunk):
            bad += 1
    elapsed = time.monotonic() - t0
    stop.set()
    nt.join(timeout=60)
    sampler.stop.set()
    sampler.join()
    assert proc.wait(timeout=60) == 0
    assert n == 1 << 30 and bad == 0
    latencies.sort()
    p95 = latencies[int(0.95 * (len(latencies) - 1))] if latencies else None
    print(f"\n1 GiB flood: {elapsed:.1f} s ({n / elapsed / 1e6:.0f} MB/s); peak RSS daemon "
          f"{sampler.peak['daemon'] / 1024:.1f} MiB, supervisor {sampler.peak['supervisor'] / 1024:.1f} MiB; "
          f"neighbour exec n={len(latencies)} p95={p95 and p95 * 1000:.0f} ms")
    assert sampler.peak["daemon"] < 200 * 1024, sampler.peak
    assert sampler.peak["supervisor"] < 200 * 1024, sampler.peak
    assert latencies and p95 < 5.0, latencies


def test_unread_flood_is_paused_not_buffered(sandboxes, daemon):
    sb = sandboxes()
    run(sb, ["true"])
    sup = supervisor_pids(sb.sandbox_id)[0]
    sampler = RssSampler({"daemon": daemon.proc.pid, "supervisor": sup})
    sampler.start()
    proc = sb.exec(["dd", "if=/dev/zero", "bs=1048576", "count=512"])
    time.sleep(5)  # at ~200 MB/s, 512 MiB would be done by now without back-pressure
    assert proc.poll() is None, "a flood nobody reads should be paused"
    sampler.stop.set()
    sampler.join()
    print(f"\nunread flood: peak RSS daemon {sampler.peak['daemon'] / 1024:.1f} MiB, "
          f"supervisor {sampler.peak['supervisor'] / 1024:.1f} MiB")
    assert sampler.peak["daemon"] < 200 * 1024 and sampler.peak["supervisor"] < 200 * 1024, sampler.peak
    # Nothing was truncated: every byte arrives once someone reads.
    n = sum(len(c) for c in proc.stdout.iter_bytes())
    assert n == 512 << 20
    assert proc.wait(timeout=60) == 0


def test_argv_of_100kb_works(sandboxes):
    sb = sandboxes()
    run(sb, ["true"])
    args = [f"{i:06d}" + "x" * 94 for i in range(1000)]
    proc = sb.exec(["sh", "-c", 'echo $#; for a; do :; done; echo "$a"', "_", *args])
    assert proc.stdout.read() == f"1000\n{args[-1]}\n"
    assert proc.wait(timeout=60) == 0


def test_huge_argv_and_env_fail_clearly(sandboxes, daemon):
    sb = sandboxes()
    run(sb, ["true"])
    big = "y" * (1 << 20)
    cases = [
        ("10k args", dict(cmd=["sh", "-c", "echo $#", "_", *[f"{i:06d}" + "x" * 94 for i in range(10_000)]])),
        ("1 MB arg", dict(cmd=["sh", "-c", "echo ${#1}", "_", big])),
        ("1 MB env", dict(cmd=["sh", "-c", "echo ${#BIG}"], env={"BIG": big})),
        ("20k env", dict(cmd=["sh", "-c", "env | wc -l"], env={f"V{i}": "z" * 40 for i in range(20_000)})),
    ]
    outcomes = {}
    for name, kwargs in cases:
        try:
            p = sb.exec(**kwargs)
            outcomes[name] = ("ran", p.wait(timeout=60), p.stdout.read()[:40])
        except GworkerError as e:
            outcomes[name] = ("refused", e.status, e.code, str(e)[:120])
        assert sb.poll() is None, "the sandbox died"
    print("\n", outcomes)
    for name, o in outcomes.items():
        if o[0] == "refused":
            _, status, code, msg = o
            assert status in (400, 413) and code in ("invalid_request", "payload_too_large", "exec_failed"), (name, o)
            assert "EOF while parsing" not in msg, (name, o)
    assert run(sb, ["echo", "alive"])[1] == "alive\n"


def test_oversized_bodies_are_refused(sandboxes, daemon):
    sb = sandboxes()
    run(sb, ["true"])
    status, body = send_oversized(daemon, "POST", f"/v1/sandboxes/{sb.sandbox_id}/exec",
                                  json.dumps({"cmd": ["echo", "z" * (17 << 20)]}).encode(), "application/json")
    assert status == 413 and b"payload_too_large" in body, (status, body[:200])
    cat = sb.exec(["cat"])
    status, body = send_oversized(daemon, "POST", f"/v1/sandboxes/{sb.sandbox_id}/processes/{cat.process_id}/stdin",
                                  b"z" * (17 << 20), "application/octet-stream")
    assert status == 413, (status, body[:200])
    cat.send_signal(9)
    # A create with a 1 MB env: accepted or refused, never a 5xx.
    status, body = raw_request(daemon, "POST", "/v1/sandboxes",
                               body=json.dumps({"image": "busybox", "cmd": ["true"], "timeout": 30,
                                                "env": {"BIG": "y" * (1 << 20)}}).encode(),
                               headers={"Content-Type": "application/json"})
    assert status < 500, (status, body[:300])
    if status == 201:
        Sandbox.lookup(json.loads(body)["sandbox_id"]).terminate()
    assert daemon.alive()
    assert run(sb, ["echo", "alive"])[1] == "alive\n"


def test_invalid_utf8_output_stdin_args_and_env(sandboxes, daemon):
    sb = sandboxes()
    raw = bytes(range(256)) + b"\xff\xfe\x80\xc3\x28\xed\xa0\x80\xf4\x90\x80\x80" + b"tail"
    octal = "".join(f"\\{b:03o}" for b in raw)
    proc = sb.exec(["sh", "-c", f"printf '{octal}'; printf '{octal}' >&2"])
    assert proc.stdout.read_bytes() == raw
    assert proc.stderr.read_bytes() == raw
    assert proc.wait(timeout=30) == 0
    # stdin round trip of invalid UTF-8.
    cat = sb.exec(["cat"])
    cat.stdin.write(raw * 100)
    cat.stdin.write_eof()
    assert cat.stdout.read_bytes() == raw * 100
    assert cat.wait(timeout=30) == 0
    # Invalid UTF-8 / lone surrogates in argv and env: JSON cannot carry them;
    # the daemon must answer 400, not 500, and not run anything.
    path = f"/v1/sandboxes/{sb.sandbox_id}/exec"
    bodies = [b'{"cmd": ["echo", "\xff\xfe"]}',
              b'{"cmd": ["echo", "\\udcff"]}',
              b'{"cmd": ["echo", "\\ud800\\u0041"]}',
              b'{"cmd": ["echo"], "env": {"A": "\xc3\x28"}}',
              b'{"cmd": ["echo"], "env": {"\xff": "x"}}',
              b'{"cmd": ["echo", "a\\u0000b"]}',
              b'{"cmd": ["echo"], "env": {"A": "a\\u0000b"}}']
    for body in bodies:
        status, answer = raw_request(daemon, "POST", path, body=body, headers={"Content-Type": "application/json"})
        assert status == 400, (body, status, answer)
        assert json.loads(answer)["error"]["code"] == "invalid_request"
    status, answer = raw_request(daemon, "POST", "/v1/sandboxes", body=b'{"image": "busybox", "cmd": ["\xff"]}',
                                 headers={"Content-Type": "application/json"})
    assert status == 400, answer
    # Valid non-ASCII arguments arrive intact.
    text = "héllo ✓ 𝄞 \u202e"
    assert run(sb, ["printf", "%s", text])[1] == text
    assert run(sb, ["sh", "-c", 'printf %s "$X"'], env={"X": text})[1] == text
