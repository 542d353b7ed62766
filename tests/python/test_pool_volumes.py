"""Warm-pool slots serve creates with volumes: the volumes are bound under
the slot's volume directory at claim and mounted at their paths by the agent,
which then drops CAP_SYS_ADMIN for good. A claimed sandbox must be
indistinguishable from a cold one, snapshots of it must restore onto the same
volumes, and nothing may be left mounted on the host after it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator, List

import pytest

from helpers import Daemon, mount_points, run, short_tempdir, side_daemon
from gworker_client import ConflictError, Image, Sandbox, Volume

CAP_SYS_ADMIN = 21


@pytest.fixture(scope="module")
def pooled(daemon: Daemon) -> Iterator[Daemon]:
    """A second daemon with two busybox slots, the session's images shared."""
    base = short_tempdir("gwpv-")  # supervisor socket paths must stay short
    d2 = side_daemon(daemon, base, "gwpv-", {}, ["--pool", "busybox=2"])
    old = os.environ.get("GWORKER_URL")
    os.environ["GWORKER_URL"] = d2.url
    try:
        yield d2
    finally:
        if old is None:
            del os.environ["GWORKER_URL"]
        else:
            os.environ["GWORKER_URL"] = old
        d2.stop()
        shutil.rmtree(base, ignore_errors=True)


def ready_slots(d: Daemon) -> List[str]:
    """Waits for a ready slot; returns the IDs of the sandboxes that exist now."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        _, health = d.request("GET", "/v1/health")
        if health["pool"] and health["pool"][0]["ready"] >= 1:
            return [p.name for p in (d.data_dir / "sandboxes").glob("sb-*")]
        time.sleep(0.1)
    pytest.fail(f"no slot became ready: {health}")


def host_mounts_under(path: Path) -> List[str]:
    return [p for p in mount_points() if p.startswith(str(path))]


def assert_unmounted(vb: Path) -> None:
    """Nothing stays mounted at or under a slot's volume directory (its
    removal runs as the sandbox ends: allow it 10 s), and the directory is gone."""
    deadline = time.monotonic() + 10
    while host_mounts_under(vb) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert host_mounts_under(vb) == []
    assert not vb.exists()


def read_count(v: Volume) -> int:
    """The counter a sandbox rewrites (`echo` truncates first: retry an empty read)."""
    for _ in range(100):
        b = b"".join(v.read_file("/count")).strip()
        if b:
            return int(b)
        time.sleep(0.01)
    pytest.fail("the counter stayed empty")


def cap_bits(status: str) -> dict:
    return {k: int(v, 16) for k, v in re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$", status, re.M)}


@pytest.fixture
def two_vols(pooled: Daemon) -> Iterator[List[Volume]]:
    names = [f"pv-{uuid.uuid4().hex[:10]}" for _ in range(2)]
    vols = [Volume.from_name(n, create_if_missing=True) for n in names]
    yield vols
    for n in names:
        try:
            Volume.delete(n)
        except Exception:
            pass


def test_a_create_with_volumes_claims_a_slot_and_sees_them(pooled: Daemon, two_vols: List[Volume]) -> None:
    a, b = two_vols
    a.write_file("/in.txt", b"from the host\n")
    slots = ready_slots(pooled)
    sb = Sandbox.create(["sh", "-c", "cat /data/in.txt > /deep/er/b/copy.txt; grep Cap /proc/self/status"],
                        image=Image.from_name("busybox"), volumes={"/data": a, "/deep/er/b": b}, timeout=120)
    try:
        assert sb.object_id in slots, "the create came from the pool"
        assert sb.wait(timeout=60) == 0, sb.stderr.read()
        # The entry command read one volume and wrote the other.
        assert b"".join(b.read_file("/copy.txt")) == b"from the host\n"
        # Neither it nor an exec has CAP_SYS_ADMIN, in any set.
        caps = cap_bits(sb.stdout.read())
        assert set(caps) >= {"CapInh", "CapPrm", "CapEff", "CapBnd"}, caps
        assert all(not v & (1 << CAP_SYS_ADMIN) for v in caps.values()), caps
    finally:
        sb.terminate()
    slots = ready_slots(pooled)
    sb = Sandbox.create(image=Image.from_name("busybox"), volumes={"/data": a}, timeout=120)
    try:
        assert sb.object_id in slots
        code, out, _ = run(sb, "grep Cap /proc/self/status")
        assert code == 0
        assert all(not v & (1 << CAP_SYS_ADMIN) for v in cap_bits(out).values()), out
        # Nor does any thread of the agent (capabilities are per thread).
        code, out, _ = run(sb, "for t in /proc/1/task/*; do grep CapPrm $t/status; done")
        prm = re.findall(r"CapPrm:\s+([0-9a-f]+)", out)
        assert code == 0 and len(prm) >= 2, out
        assert all(not int(v, 16) & (1 << CAP_SYS_ADMIN) for v in prm), out
        # No process can mount, and the slot's volume mount is gone: the
        # sandbox's mounts are a cold one's.
        code, _, err = run(sb, "mkdir -p /m && mount -t tmpfs none /m")
        assert code != 0, "a user process mounted a file system"
        _, mounts, _ = run(sb, "cat /proc/mounts")
        points = [l.split()[1] for l in mounts.splitlines()]
        assert "/data" in points and not any(p.startswith("/.gworker/vols") for p in points), mounts
        # Writes go both ways at once.
        assert run(sb, "echo from-sandbox > /data/out.txt")[0] == 0
        assert b"".join(a.read_file("/out.txt")) == b"from-sandbox\n"
        a.write_file("/later.txt", b"later\n")
        assert run(sb, "cat /data/later.txt")[1] == "later\n"
        # A volume in use is not deleted.
        with pytest.raises(ConflictError):
            Volume.delete(a.name)
        # The sandbox and its volume survive a daemon restart.
        pooled.restart()
        assert run(sb, "cat /data/out.txt")[1] == "from-sandbox\n"
    finally:
        sb.terminate()
    # Nothing of it is left mounted on the host; the volume's files stay.
    vb = pooled.data_dir / "volbinds" / sb.object_id
    assert_unmounted(vb)
    assert b"".join(a.read_file("/out.txt")) == b"from-sandbox\n"


def test_a_snapshot_of_a_claimed_sandbox_restores_onto_its_volumes(pooled: Daemon, two_vols: List[Volume]) -> None:
    a, _ = two_vols
    slots = ready_slots(pooled)
    src = Sandbox.create(["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i > /data/count; sleep 0.05; done"],
                         image=Image.from_name("busybox"), volumes={"/data": a}, timeout=120)
    try:
        assert src.object_id in slots
        time.sleep(0.3)
        snap = src.snapshot()
    finally:
        src.terminate()
    copy = Sandbox.create(snapshot=snap, image=Image.from_name("busybox"), timeout=120)
    try:
        # The restored loop goes on writing into the volume.
        first = read_count(a)
        deadline = time.monotonic() + 10
        while read_count(a) <= first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_count(a) > first
        assert run(copy, "echo restored > /data/r.txt")[0] == 0
        assert b"".join(a.read_file("/r.txt")) == b"restored\n"
        code, out, _ = run(copy, "grep CapBnd /proc/self/status")
        assert not cap_bits(out)["CapBnd"] & (1 << CAP_SYS_ADMIN)
    finally:
        copy.terminate()
        snap.delete()
    vb = pooled.data_dir / "volbinds" / copy.object_id
    assert_unmounted(vb)


def test_a_snapshot_of_a_slot_claimed_without_volumes_restores(pooled: Daemon) -> None:
    """Every slot boots with the volume mount, used or not: its snapshots
    restore with the same mounts."""
    slots = ready_slots(pooled)
    src = Sandbox.create(["sh", "-c", "echo kept > /tmp/state; sleep 600"], image=Image.from_name("busybox"),
                         timeout=120)
    try:
        assert src.object_id in slots
        deadline = time.monotonic() + 10
        while run(src, "cat /tmp/state")[1] != "kept\n" and time.monotonic() < deadline:
            time.sleep(0.05)
        snap = src.snapshot()
    finally:
        src.terminate()
    copy = Sandbox.create(snapshot=snap, image=Image.from_name("busybox"), timeout=120)
    try:
        assert run(copy, "cat /tmp/state")[1] == "kept\n"
    finally:
        copy.terminate()
        snap.delete()


@pytest.mark.skipif(os.geteuid() != 0, reason="quotas loop-mount an ext4 image: root only")
def test_a_quota_volume_from_the_pool_keeps_its_quota(pooled: Daemon) -> None:
    """A quota'd volume's data/ is itself a mount (its ext4 image): the
    claim's host bind must carry it, or writes would land on the host disk."""
    name = f"pq-{uuid.uuid4().hex[:10]}"
    vol = Volume.create(name, quota_bytes=32 << 20)
    try:
        slots = ready_slots(pooled)
        sb = Sandbox.create(image=Image.from_name("busybox"), volumes={"/q": vol}, timeout=120)
        try:
            assert sb.object_id in slots
            code, _, err = run(sb, "dd if=/dev/zero of=/q/fill bs=1M count=64")
            assert code != 0 and "No space left on device" in err, err
            assert run(sb, "rm /q/fill && echo ok > /q/after")[0] == 0
            assert b"".join(vol.read_file("/after")) == b"ok\n"
        finally:
            sb.terminate()
    finally:
        Volume.delete(name)


def test_a_killed_supervisors_volume_mounts_are_removed_by_terminate(pooled: Daemon, two_vols: List[Volume]) -> None:
    """The supervisor unmounts a slot's volume directory when its sandbox
    ends; one that was SIGKILLed cannot, so `terminate` does."""
    a, _ = two_vols
    slots = ready_slots(pooled)
    sb = Sandbox.create(["sleep", "600"], image=Image.from_name("busybox"), volumes={"/data": a}, timeout=120)
    vb = pooled.data_dir / "volbinds" / sb.object_id
    try:
        assert sb.object_id in slots
        assert len(host_mounts_under(vb)) == 2  # the slot's directory and the volume under it
        pids = subprocess.run(["pgrep", "-f", f"supervise {pooled.data_dir}/sandboxes/{sb.object_id}"],
                              capture_output=True, text=True).stdout.split()
        assert len(pids) == 1, pids
        os.kill(int(pids[0]), signal.SIGKILL)
    finally:
        sb.terminate()
    assert_unmounted(vb)
