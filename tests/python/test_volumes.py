"""Volumes: shared between running sandboxes, persistent across sandboxes and
daemon restarts, host-side file access confined to the volume, quotas."""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from helpers import gworker_bin, run
from gworker_client import (
    ConflictError,
    InvalidRequestError,
    NoSpaceError,
    NotFoundError,
    Volume,
)


@pytest.fixture
def vol(daemon):
    """A fresh volume; list it before ``sandboxes`` in a test's arguments so
    that it is deleted after them."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    v = Volume.from_name(name, create_if_missing=True)
    yield v
    try:
        Volume.delete(name)
    except NotFoundError:
        pass


def test_shared_between_running_sandboxes_and_persistent_across_restart(vol, daemon, sandboxes):
    a = sandboxes(volumes={"/data": vol})
    b = sandboxes(volumes={"/mnt/shared": vol})
    assert run(a, "echo from-a > /data/a.txt") == (0, "", "")
    # B, running at the same time, sees A's write at once ...
    assert run(b, "cat /mnt/shared/a.txt")[1] == "from-a\n"
    # ... and A sees B's.
    assert run(b, "mkdir -p /mnt/shared/d && echo from-b > /mnt/shared/d/b.txt")[0] == 0
    assert run(a, "cat /data/d/b.txt")[1] == "from-b\n"
    # A write a sandbox finished survives a daemon crash.
    assert run(a, "echo durable > /data/c.txt")[0] == 0
    daemon.restart()
    assert b"".join(vol.read_file("/c.txt")) == b"durable\n"
    a.terminate()
    b.terminate()
    daemon.restart()
    c = sandboxes(volumes={"/data": Volume.from_name(vol.name)})
    assert run(c, "cat /data/a.txt /data/d/b.txt /data/c.txt")[1] == "from-a\nfrom-b\ndurable\n"
    # The volume is a real directory in the sandbox (not the in-memory overlay).
    assert run(c, "grep ' /data ' /proc/mounts")[0] == 0


def test_host_side_round_trip(vol, sandboxes, tmp_path: Path):
    vol.write_file("/in/hello.txt", b"hello from the host\n")
    big = os.urandom(20 << 20)  # over the 16 MiB JSON body limit: streamed
    vol.write_file("big.bin", big)
    names = {e.path: e for e in vol.listdir("/", recursive=True)}
    assert names["in"].type == "dir"
    assert names["in/hello.txt"].size == 20
    assert names["big.bin"].size == len(big)
    assert b"".join(vol.read_file("big.bin")) == big

    sb = sandboxes(volumes={"/v": vol})
    assert run(sb, "cat /v/in/hello.txt")[1] == "hello from the host\n"
    assert run(sb, "md5sum /v/big.bin | cut -d' ' -f1")[1].strip() == hashlib.md5(big).hexdigest()
    assert run(sb, "echo made-inside > /v/in/inside.txt")[0] == 0
    assert b"".join(vol.read_file("in/inside.txt")) == b"made-inside\n"

    # A local directory up and down again.
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "top.txt").write_text("top")
    (src / "sub" / "deeper" / "leaf.txt").write_text("leaf")
    assert vol.upload(src, "/tree") == 2
    out = tmp_path / "out"
    assert vol.download("/tree", out) == 2
    assert (out / "top.txt").read_text() == "top"
    assert (out / "sub" / "deeper" / "leaf.txt").read_text() == "leaf"

    vol.remove_file("in/hello.txt")
    with pytest.raises(NotFoundError):
        b"".join(vol.read_file("in/hello.txt"))
    with pytest.raises(InvalidRequestError):
        vol.remove_file("tree")  # not empty
    vol.remove_file("tree", recursive=True)
    assert "tree" not in {e.path for e in vol.listdir("/")}


def test_paths_cannot_escape_the_volume(vol, sandboxes, tmp_path: Path):
    marker = tmp_path / "host-secret.txt"
    marker.write_text("host only")
    for bad in ["../x", "a/../../x", "/../etc/passwd"]:
        with pytest.raises(InvalidRequestError):
            vol.write_file(bad, b"x")
        with pytest.raises(InvalidRequestError):
            b"".join(vol.read_file(bad))
    # An absolute path means the volume's root.
    with pytest.raises(NotFoundError):
        b"".join(vol.read_file("/etc/passwd"))
    vol.write_file("/etc/passwd", b"inside")
    assert b"".join(vol.read_file("etc/passwd")) == b"inside"
    assert Path("/etc/passwd").read_bytes() != b"inside"

    # Symlinks made inside a sandbox resolve inside the volume on the host side.
    sb = sandboxes(volumes={"/v": vol})
    cmd = f"ln -s {tmp_path} /v/tolocal && ln -s / /v/toroot && ln -s ../../.. /v/up"
    assert run(sb, cmd)[0] == 0
    for link in ["tolocal/host-secret.txt", "up/" + str(marker).lstrip("/")]:
        with pytest.raises(NotFoundError):
            b"".join(vol.read_file(link))
    try:
        vol.write_file(f"toroot{tmp_path}/escaped.txt", b"x")
    except NotFoundError:
        pass
    assert not (tmp_path / "escaped.txt").exists()
    listed = {e.path: e.type for e in vol.listdir("/")}
    assert listed["toroot"] == "symlink"
    vol.remove_file("toroot")  # removes the link, not what it points to
    assert marker.read_text() == "host only"


def test_mount_paths_and_names_are_checked(vol, sandboxes):
    for path in ["relative", "/", "/proc/x", "/sys", "/dev/shm", "/a/../b"]:
        with pytest.raises(InvalidRequestError):
            sandboxes(volumes={path: vol})
    with pytest.raises(InvalidRequestError):
        sandboxes(volumes={"/a": vol, "/a/b": vol})
    with pytest.raises(NotFoundError):
        sandboxes(volumes={"/data": Volume.from_name(f"missing-{uuid.uuid4().hex[:8]}")})
    with pytest.raises(NotFoundError):
        Volume.from_name(f"missing-{uuid.uuid4().hex[:8]}").listdir("/")
    with pytest.raises(InvalidRequestError):
        Volume.create("bad/name")


def test_delete_refused_while_mounted(vol, sandboxes):
    sb = sandboxes(volumes={"/data": vol})
    assert run(sb, "true")[0] == 0
    with pytest.raises(ConflictError):
        Volume.delete(vol.name)
    sb.terminate()
    Volume.delete(vol.name)
    assert vol.name not in {v.name for v in Volume.list()}


@pytest.mark.skipif(os.geteuid() != 0, reason="quotas loop-mount an ext4 image: root only")
def test_quota_gives_enospc_inside_and_on_the_host(sandboxes, daemon):
    name = f"q-{uuid.uuid4().hex[:12]}"
    vol = Volume.create(name, quota_bytes=32 << 20)
    try:
        assert vol.info()["quota_bytes"] == 32 << 20
        sb = sandboxes(volumes={"/q": vol})
        try:
            code, out, err = run(sb, "dd if=/dev/zero of=/q/fill bs=1M count=64")
            assert code != 0
            assert "No space left on device" in err
            with pytest.raises(NoSpaceError):
                vol.write_file("more.bin", b"\0" * (8 << 20))
            # Freeing space makes room again.
            assert run(sb, "rm /q/fill")[0] == 0
            vol.write_file("more.bin", b"\0" * (8 << 20))
        finally:
            sb.terminate()
    finally:
        Volume.delete(name)


def test_cli_volume_commands(daemon, tmp_path: Path):
    name = f"cli-{uuid.uuid4().hex[:10]}"
    env = dict(os.environ, GWORKER_URL=daemon.url)

    def g(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([gworker_bin(), *args], env=env, capture_output=True, text=True, timeout=60)

    assert g("volume", "create", name).returncode == 0
    assert name in g("volume", "ls").stdout
    (tmp_path / "f.txt").write_text("cli data")
    assert g("volume", "put", name, str(tmp_path / "f.txt"), "/dir/f.txt").returncode == 0
    assert "dir/f.txt" in g("volume", "ls", name, "/", "-r").stdout
    assert g("volume", "get", name, "/dir/f.txt", str(tmp_path / "back.txt")).returncode == 0
    assert (tmp_path / "back.txt").read_text() == "cli data"
    assert g("volume", "get", name, "dir/f.txt", "-").stdout == "cli data"
    assert g("volume", "rm", name, "dir", "-r").returncode == 0
    assert g("volume", "rm", name).returncode == 0
    r = g("volume", "rm", name)
    assert r.returncode == 1 and "no volume" in r.stderr


def test_half_made_volume_is_cleaned_up_at_restart(daemon, sandboxes):
    # A crash between mkdir and meta.json leaves a directory that is no volume.
    name = f"t-half-{uuid.uuid4().hex[:8]}"
    half = Path(daemon.data_dir) / "volumes" / name
    (half / "data").mkdir(parents=True)
    with pytest.raises(ConflictError):
        Volume.from_name(name, create_if_missing=True).listdir("/")
    daemon.restart()
    assert not half.exists()
    v = Volume.from_name(name, create_if_missing=True)
    v.write_file("/f", b"ok")
    sb = sandboxes(volumes={"/v": v})
    assert run(sb, ["cat", "/v/f"]) == (0, "ok", "")
    sb.terminate()
    Volume.delete(name)
