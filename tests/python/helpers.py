"""Helpers for the Python client's tests: the daemon process, running commands.

Importing this puts ``clients/python/src`` first on ``sys.path``, so the tests
exercise the source tree (installed or not).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest

REPO = Path(__file__).resolve().parents[2]
CLIENT_SRC = REPO / "clients" / "python" / "src"
sys.path.insert(0, str(CLIENT_SRC))

from gworker_client import Image, Sandbox  # noqa: E402
from gworker_client._transport import UnixHTTPConnection  # noqa: E402

BUSYBOX = Image.from_name("busybox")
START_TIMEOUT = 60.0  # seconds for the daemon to answer /v1/health


class Daemon:
    """A ``gworker serve`` process the tests own."""

    def __init__(self, binary: str, data_dir: Path, socket_path: Path, extra_args: Sequence[str] = (),
                 env: Optional[Dict[str, str]] = None) -> None:
        self.binary = binary
        self.data_dir = Path(data_dir)
        self.socket_path = Path(socket_path)
        self.extra_args = list(extra_args)
        self.env = dict(os.environ)
        self.env.pop("GWORKER_URL", None)
        self.env.setdefault("RUST_BACKTRACE", "1")
        if env:
            self.env.update(env)
        self.log_path = self.data_dir / "daemon-test.log"
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"\n==== test start #{self.starts} ====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [self.binary, "serve", "--data-dir", str(self.data_dir), "--socket", str(self.socket_path),
             *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gworker serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, body = self.request("GET", "/v1/health", timeout=2)
                if status == 200 and body.get("status") == "ok":
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"gworker serve did not answer /v1/health in {START_TIMEOUT} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the daemon (and nothing else: its sandboxes live on)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def restart(self) -> None:
        """SIGKILL the daemon and start it again on the same data dir and socket."""
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def unmount_images(self) -> None:
        """Lazily unmount the image mounts the daemon left (they outlive it on
        purpose, for its sandboxes), so the test's temp dir can be removed."""
        mnt = str(self.data_dir / "images" / "mnt")
        for target in mount_points():
            if target.startswith(mnt + "/"):
                subprocess.run(["umount", "-l", target], check=False, capture_output=True)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Tuple[int, Any]:
        """A raw request over the socket, independent of the client under test."""
        conn = UnixHTTPConnection(str(self.socket_path), timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw else None)
        finally:
            conn.close()

    def sandbox_ids(self) -> set:
        status, body = self.request("GET", "/v1/sandboxes")
        assert status == 200, body
        return {s["sandbox_id"] for s in body["sandboxes"]}


def gworker_bin() -> str:
    binary = os.environ.get("GWORKER_BIN") or str(REPO / "target" / "debug" / "gworker")
    if not os.access(binary, os.X_OK):
        pytest.fail(f"no gworker binary at {binary}: build it with `cargo build -p gworker-cli` or set GWORKER_BIN")
    return binary


def mount_points() -> List[str]:
    """Every mount point of this process's mount namespace
    (``/proc/self/mountinfo``, its octal escapes such as ``\\040`` decoded);
    none if it cannot be read."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    points = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4:
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


#: What ``short_tempdir`` made; ``remove_short_tempdirs`` removes it at the session's end.
_SHORT_TEMPDIRS: List[Path] = []


def short_tempdir(prefix: str) -> Path:
    """A directory with a short path (a unix socket path is limited to 107
    bytes), removed when the test session ends."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    _SHORT_TEMPDIRS.append(d)
    return d


def remove_short_tempdirs() -> List[Path]:
    """Remove every ``short_tempdir`` (the session's end: its daemons are
    stopped). One that something is still mounted under is left as it is,
    so that no mount's contents are deleted; those are returned."""
    mounted = []
    points = [Path(p) for p in mount_points()]
    while _SHORT_TEMPDIRS:
        d = _SHORT_TEMPDIRS.pop()
        if any(p == d or d in p.parents for p in points):
            mounted.append(d)
            continue
        shutil.rmtree(d, ignore_errors=True)
    return mounted



def run(sb: Sandbox, cmd: object, **kwargs: Any) -> Tuple[int, str, str]:
    """Exec ``cmd`` in ``sb`` and return ``(exit code, stdout, stderr)``."""
    proc = sb.exec(cmd, **kwargs)
    out = proc.stdout.read()
    err = proc.stderr.read()
    return proc.wait(timeout=120), out, err


def client_env(url: str, **extra: str) -> Dict[str, str]:
    """The environment for a child Python process that uses the client."""
    env = dict(os.environ)
    env["GWORKER_URL"] = url
    env.pop("GWORKER_TOKEN", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CLIENT_SRC), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def side_daemon(daemon: Daemon, tmp_path: Path, prefix: str, env: Dict[str, str],
                args: Sequence[str] = ()) -> Daemon:
    """A second daemon with its own data dir (sharing the session daemon's
    built images) and `env`, started."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "images").symlink_to(daemon.data_dir / "images")
    d2 = Daemon(gworker_bin(), tmp_path / "data", short_tempdir(prefix) / "gw.sock", list(args), env=env)
    d2.start()
    return d2
