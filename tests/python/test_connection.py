"""Finding the daemon: GWORKER_URL, the default socket, a daemon that is away."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from helpers import BUSYBOX, CLIENT_SRC, Daemon, gworker_bin, run, short_tempdir
from gworker_client import (
    DaemonUnavailableError,
    NotFoundError,
    Sandbox,
    UnauthorizedError,
    default_socket_path,
)
from gworker_client._transport import Transport, resolve_url


def default_path_as(uid: int, xdg: "str | None") -> str:
    """default_socket_path() computed by a child process whose effective uid
    is ``uid`` (it switches after importing the client)."""
    env = {"PYTHONPATH": str(CLIENT_SRC), "PATH": os.environ.get("PATH", "")}
    if xdg is not None:
        env["XDG_RUNTIME_DIR"] = xdg
    code = "import os, sys; from gworker_client import default_socket_path as d; os.seteuid(int(sys.argv[1])); print(d())"
    out = subprocess.run([sys.executable, "-c", code, str(uid)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_default_socket_path():
    if os.geteuid() != 0:
        pytest.skip("checks the root and non-root paths; needs root to switch user")
    assert default_socket_path() == "/run/gworker/gworker.sock"
    assert default_path_as(0, "/run/user/0") == "/run/gworker/gworker.sock"
    assert default_path_as(65534, "/run/user/65534") == "/run/user/65534/gworker.sock"
    assert default_path_as(65534, None) == "/tmp/gworker-65534/gworker.sock"


def test_resolve_url(monkeypatch):
    monkeypatch.setenv("GWORKER_URL", "unix:///x/y.sock")
    assert resolve_url() == "unix:///x/y.sock"
    monkeypatch.delenv("GWORKER_URL")
    monkeypatch.setenv("GWORKER_SOCKET", "/a/b.sock")
    assert resolve_url() == "unix:///a/b.sock"
    monkeypatch.delenv("GWORKER_SOCKET")
    assert resolve_url() == "unix://" + default_socket_path()
    with pytest.raises(ValueError):
        Transport("https://example.invalid")
    with pytest.raises(ValueError):
        Transport("unix://")


@pytest.mark.parametrize("url", ["unix:///nonexistent/gworker/gw.sock", "http://127.0.0.1:1"])
def test_daemon_unavailable(monkeypatch, url):
    monkeypatch.setenv("GWORKER_URL", url)
    t0 = time.monotonic()
    with pytest.raises(DaemonUnavailableError) as info:
        Sandbox.create(["true"], image=BUSYBOX)
    assert time.monotonic() - t0 < 5
    assert isinstance(info.value, ConnectionError)
    assert url in str(info.value) and "gworker serve" in str(info.value)
    with pytest.raises(ConnectionError):
        Sandbox.lookup("sb-" + "0" * 32)


def test_killed_daemon_is_unavailable_then_back(running_sandbox, daemon):
    run(running_sandbox, "echo before-kill > /tmp/state")
    daemon.kill()
    try:
        with pytest.raises(DaemonUnavailableError) as info:
            Sandbox.lookup(running_sandbox.sandbox_id)
        assert daemon.url in str(info.value)
        with pytest.raises(DaemonUnavailableError):
            running_sandbox.exec(["true"])
    finally:
        daemon.restart()
    # The sandbox outlived its daemon, state and all.
    again = Sandbox.lookup(running_sandbox.sandbox_id)
    assert run(again, ["cat", "/tmp/state"]) == (0, "before-kill\n", "")
    assert run(running_sandbox, ["echo", "same handle"])[1] == "same handle\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tcp_daemon(tmp_path, daemon):
    """A second daemon that also listens on loopback TCP with a token."""
    port = free_port()
    d = Daemon(gworker_bin(), short_tempdir("gwtcpd-") / "data", short_tempdir("gwtcp-") / "gw.sock",
               extra_args=["--listen", f"127.0.0.1:{port}"], env={"GWORKER_TOKEN": "test-token-123"})
    d.start()
    d.tcp_url = f"http://127.0.0.1:{port}"
    try:
        yield d
    finally:
        d.stop()


def test_tcp_with_token(tcp_daemon, monkeypatch):
    monkeypatch.setenv("GWORKER_URL", tcp_daemon.tcp_url)
    monkeypatch.setenv("GWORKER_TOKEN", "wrong-token")
    with pytest.raises(UnauthorizedError) as info:
        Sandbox.lookup("sb-" + "0" * 32)
    assert info.value.status == 401 and info.value.code == "unauthorized"
    monkeypatch.delenv("GWORKER_TOKEN")
    with pytest.raises(UnauthorizedError):
        Sandbox.lookup("sb-" + "0" * 32)
    monkeypatch.setenv("GWORKER_TOKEN", "test-token-123")
    with pytest.raises(NotFoundError):
        Sandbox.lookup("sb-" + "0" * 32)
    with Sandbox.create(["sh", "-c", "echo over tcp"], image=BUSYBOX, timeout=60) as sb:
        assert sb.stdout.read() == "over tcp\n"
        assert sb.wait(timeout=60) == 0


def test_output_streams_read_to_their_end_share_one_connection(running_sandbox):
    # A stream read to its end leaves its connection for the next stream:
    # run() reads stdout, then stderr, each to the end.
    t = running_sandbox._transport
    with t._idle_lock:
        t._idle.clear()
    assert run(running_sandbox, ["echo", "a"]) == (0, "a\n", "")
    assert len(t._idle) == 1
    kept = t._idle[0]
    for word in ("b", "c"):
        assert run(running_sandbox, ["echo", word]) == (0, f"{word}\n", "")
    assert t._idle == [kept]
    # One dropped before its end closes its connection instead.
    p = running_sandbox.exec(["sh", "-c", "echo start; sleep 3"])
    assert p.stdout.readline() == "start\n"
    assert t._idle == []  # its connection is the stream's
    p.stdout.close()
    assert t._idle == []
