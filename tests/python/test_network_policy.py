"""Network policy through the real daemon: the default (internet, never the
host, its networks or other sandboxes), block_network and cidr_allowlist.
The only hosts talked to are the test's own: servers in network namespaces
it makes, and loopback servers on the host (which must stay unreachable)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

from gworker_client import Image, InvalidRequestError, Sandbox

PROBE = (
    "import socket,sys\n"
    "try:\n"
    "    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=4)\n"
    "    print('OPEN', s.recv(64).decode())\n"
    "except OSError as e:\n"
    "    print('REFUSED', type(e).__name__)\n"
)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def wait_until_answers(addr: str, port: int, expected: bytes, proc: subprocess.Popen, timeout: float = 30) -> None:
    """Retry a connection from the host until the server at addr:port answers
    `expected` (it may still be starting)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the test server exited with {proc.returncode}"
        try:
            with socket.create_connection((addr, port), timeout=2) as s:
                got = s.recv(64)
            if got == expected:
                return
            last = got
        except OSError as e:
            last = e
        time.sleep(0.05)
    pytest.fail(f"the test server {addr}:{port} did not answer {expected!r} in {timeout} s (last: {last!r})")


@pytest.fixture(scope="module")
def test_hosts() -> Iterator[Dict[str, Any]]:
    """A netns holding a 'public' address (198.51.100.x, routed through a
    link, not directly connected) and a 'private' one (the link's 10.x
    address), each with a TCP server that answers its own name."""
    tag = uuid.uuid4().hex[:6]
    ns, h, p = f"gwtest-{tag}", f"gwth{tag}", f"gwtp{tag}"
    octet = int(tag[:2], 16) % 200 + 20
    link_host, link_peer = f"10.198.{octet}.1", f"10.198.{octet}.2"
    public = f"198.51.100.{octet}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", h, "type", "veth", "peer", "name", p)
        sh("ip", "link", "set", p, "netns", ns)
        sh("ip", "addr", "add", f"{link_host}/30", "dev", h)
        sh("ip", "link", "set", h, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{link_peer}/30", "dev", p)
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{public}/32", "dev", "lo")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", p, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", link_host)
        sh("ip", "route", "add", f"{public}/32", "via", link_peer)
        server = (
            "import socket,threading,sys\n"
            "def serve(addr, name):\n"
            "    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "    s.bind((addr, 8000)); s.listen(16)\n"
            "    while True:\n"
            "        c, _ = s.accept(); c.sendall(name.encode()); c.close()\n"
            f"threading.Thread(target=serve, args=('{public}', 'public'), daemon=True).start()\n"
            f"serve('{link_peer}', 'private')\n"
        )
        proc = subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-c", server])
        try:
            # Both servers answer before any test relies on them (or on their
            # being unreachable from a sandbox).
            for addr, name in ((public, "public"), (link_peer, "private")):
                wait_until_answers(addr, 8000, name.encode(), proc)
            yield {"public": public, "private": link_peer, "ns": ns}
        finally:
            proc.kill()
            proc.wait()
    finally:
        subprocess.run(["ip", "route", "del", f"{public}/32"], capture_output=True)
        subprocess.run(["ip", "link", "del", h], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture(scope="module")
def host_server() -> Iterator[int]:
    """A server on the host's loopback: never reachable from a sandbox."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 0))
    s.listen(16)
    hits = []

    def loop() -> None:
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            hits.append(1)
            c.sendall(b"host")
            c.close()

    threading.Thread(target=loop, daemon=True).start()
    yield s.getsockname()[1]
    s.close()


def probe(sb: Sandbox, host: str, port: int) -> str:
    p = sb.exec(["python3", "-c", PROBE, host, str(port)])
    out = p.stdout.read().strip()
    assert p.wait() == 0, p.stderr.read()
    return out


def host_address() -> str:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True).stdout
    return out.split()[3].split("/")[0]


def test_default_reaches_public_but_never_host_or_private(daemon: Any, sandboxes: Any, test_hosts: Any,
                                                         host_server: int) -> None:
    sb = sandboxes(image=Image.debian_slim())
    assert sb._info["network"] == "internet"
    assert probe(sb, test_hosts["public"], 8000) == "OPEN public"
    assert probe(sb, test_hosts["private"], 8000).startswith("REFUSED")
    assert probe(sb, "127.0.0.1", host_server).startswith("REFUSED")
    assert probe(sb, host_address(), host_server).startswith("REFUSED")
    assert probe(sb, "169.254.169.254", 80).startswith("REFUSED")


def test_allowlist_allows_only_what_it_lists(daemon: Any, sandboxes: Any, test_hosts: Any, host_server: int) -> None:
    sb = sandboxes(image=Image.debian_slim(), cidr_allowlist=[test_hosts["private"] + "/32"])
    assert probe(sb, test_hosts["private"], 8000) == "OPEN private"
    assert probe(sb, test_hosts["public"], 8000).startswith("REFUSED")
    assert probe(sb, host_address(), host_server).startswith("REFUSED")


def test_block_network_is_loopback_only(daemon: Any, sandboxes: Any, test_hosts: Any) -> None:
    sb = sandboxes(image=Image.debian_slim(), block_network=True)
    p = sb.exec(["python3", "-c", "import socket; print(sorted(n for _, n in socket.if_nameindex()))"])
    assert p.stdout.read() == "['lo']\n"
    assert probe(sb, test_hosts["public"], 8000).startswith("REFUSED")


def test_sandboxes_cannot_reach_each_other(daemon: Any, sandboxes: Any) -> None:
    server = sandboxes(image=Image.debian_slim(),
                       cmd=["python3", "-c", "import socket; s=socket.socket(); s.bind(('0.0.0.0', 9000)); s.listen();"
                            "print('listening', flush=True)\n"
                            "while True: c,_=s.accept(); c.sendall(b'x'); c.close()"])
    assert server.stdout.readline() == "listening\n"
    p = server.exec(["python3", "-c", "import socket,time; time.sleep(0.5);"
                     "s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(('192.0.2.1', 9));"
                     "print(s.getsockname()[0])"])
    addr = p.stdout.read().strip()
    assert addr.startswith("10.231."), addr
    # The server answers on that address (so a refusal below is the policy's).
    assert probe(server, addr, 9000) == "OPEN x"
    client = sandboxes(image=Image.debian_slim())
    assert probe(client, addr, 9000).startswith("REFUSED")


def test_network_is_removed_with_the_sandbox(daemon: Any, sandboxes: Any) -> None:
    sb = sandboxes(image=Image.from_name("busybox"))
    sid = sb.object_id
    assert sb.exec(["true"]).wait() == 0  # up
    assert os.path.exists(f"/run/netns/gw-{sid}")
    assert (Path(daemon.data_dir) / "net" / f"{sid}.json").exists()
    sb.terminate()
    # The supervisor removes it just after answering the terminate, the state file last.
    netns, state = Path(f"/run/netns/gw-{sid}"), Path(daemon.data_dir) / "net" / f"{sid}.json"
    deadline = time.monotonic() + 10
    while (netns.exists() or state.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not netns.exists()
    assert not state.exists()
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    assert f"gw:{sid}" not in rules


def test_bad_network_requests(daemon: Any) -> None:
    with pytest.raises(InvalidRequestError, match="cidr_allowlist"):
        Sandbox.create(image=Image.from_name("busybox"), cidr_allowlist=["10.0.0.0/33"])
    with pytest.raises(InvalidRequestError, match="contradict"):
        Sandbox.create(image=Image.from_name("busybox"), block_network=True, cidr_allowlist=["1.2.3.4"])


def test_network_of_a_killed_sandbox_is_removed_at_daemon_start(daemon: Any) -> None:
    import signal
    import time

    sb = Sandbox.create(["sleep", "300"], image=Image.from_name("busybox"), timeout=120)
    sid = sb.object_id
    try:
        assert sb.exec(["true"]).wait() == 0
        assert os.path.exists(f"/run/netns/gw-{sid}")
        # Kill the daemon, then the sandbox's supervisor and runsc: nobody is
        # left to remove the network but the next daemon.
        daemon.kill()
        out = subprocess.run(["pgrep", "-f", sid], capture_output=True, text=True).stdout.split()
        for pid in out:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        assert os.path.exists(f"/run/netns/gw-{sid}"), "the network outlived its sandbox (as expected so far)"
        daemon.start()
        assert not os.path.exists(f"/run/netns/gw-{sid}")
        assert not (Path(daemon.data_dir) / "net" / f"{sid}.json").exists()
        rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
        assert f"gw:{sid}" not in rules
    finally:
        if not daemon.alive():
            daemon.start()
        sb.terminate()


def test_snapshot_copies_get_their_own_working_network(daemon: Any, sandboxes: Any, test_hosts: Any) -> None:
    src = sandboxes(image=Image.debian_slim())
    assert probe(src, test_hosts["public"], 8000) == "OPEN public"
    # This runsc cannot checkpoint with a TCP connection in TIME_WAIT (about
    # 60 s after the probe's close); a fresh sandbox has none.
    src2 = sandboxes(image=Image.debian_slim())
    snap = src2.snapshot()
    copy = sandboxes(snapshot=snap, image=Image.debian_slim())
    assert copy._info["network"] == "internet"
    assert probe(copy, test_hosts["public"], 8000) == "OPEN public"
    assert probe(copy, test_hosts["private"], 8000).startswith("REFUSED")
    assert probe(src2, test_hosts["public"], 8000) == "OPEN public"
    # The snapshot of a sandbox without network yields copies without one.
    blocked = sandboxes(image=Image.debian_slim(), block_network=True)
    bsnap = blocked.snapshot()
    bcopy = sandboxes(snapshot=bsnap, image=Image.debian_slim())
    assert bcopy._info["network"] == "blocked"
    with pytest.raises(Exception, match="network"):
        Sandbox.create(snapshot=bsnap, image=Image.debian_slim(), cidr_allowlist=["1.2.3.4"])


def test_an_allowlist_create_claims_a_pool_slot_and_gets_exactly_its_list(daemon: Any, test_hosts: Any,
                                                                          host_server: int,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A slot boots with the default policy; claimed with an allowlist, its
    rules are replaced before anything runs: it reaches what the list names
    and nothing else, like a cold allowlist sandbox."""
    from helpers import short_tempdir, side_daemon

    base = short_tempdir("gwpn-")  # supervisor socket paths must stay short
    d2 = side_daemon(daemon, base, "gwpn-", {}, ["--pool", "debian-slim=1"])  # the session's built images
    data = d2.data_dir
    monkeypatch.setenv("GWORKER_URL", d2.url)
    try:
        deadline = time.monotonic() + 180  # a first debian-slim build included
        while time.monotonic() < deadline:
            _, health = d2.request("GET", "/v1/health")
            if health["pool"][0]["ready"] == 1:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the slot never booted: {health}")
        slots = [p.name for p in (data / "sandboxes").glob("sb-*")]
        sb = Sandbox.create(image=Image.debian_slim(), cidr_allowlist=[test_hosts["private"] + "/32"], timeout=120)
        try:
            assert sb.object_id in slots, "the allowlist create came from the pool"
            assert sb._info["network"] == "allowlist"
            assert probe(sb, test_hosts["private"], 8000) == "OPEN private"
            assert probe(sb, test_hosts["public"], 8000).startswith("REFUSED")
            assert probe(sb, host_address(), host_server).startswith("REFUSED")
        finally:
            sb.terminate()
    finally:
        d2.stop()
        shutil.rmtree(base, ignore_errors=True)
