"""Memory snapshots in depth: running processes carry on in restored copies,
forks are independent, snapshots survive a daemon restart, corruption and
incompatible restores are refused (docs/snapshots.md)."""

from __future__ import annotations

import glob
import os
import time

import pytest

from helpers import run
from gworker_client import Image, NotFoundError, Sandbox, SandboxSnapshot
from gworker_client.exceptions import SnapshotCorruptError, SnapshotIncompatibleError


def read_line(stream) -> str:
    return next(iter(stream))


def test_python_repl_state_survives_restore(sandboxes):
    sb = sandboxes(image=Image.debian_slim(), timeout=300)
    repl = sb.exec(["python3", "-u", "-i", "-q"])
    repl.stdin.write("x = 41\nprint('set', x)\n")
    assert read_line(repl.stdout) == "set 41\n"
    snap = sb.snapshot()
    copy = sandboxes(snapshot=snap, image=None, timeout=300)
    # The REPL is a live process of the copy, with the same process id.
    procs = {p["process_id"]: p for p in copy._transport.call("GET", f"/v1/sandboxes/{copy.sandbox_id}/processes")["processes"]}
    assert procs[repl.process_id]["state"] == "running"
    from gworker_client.sandbox import SandboxProcess
    restored = SandboxProcess(copy.sandbox_id, repl.process_id, _transport=copy._transport)
    restored.stdin.write("print(x + 1)\n")
    assert read_line(restored.stdout) == "42\n"
    restored.stdin.write_eof()
    assert restored.wait(timeout=30) == 0
    # The source's REPL still has its own state.
    repl.stdin.write("print(x)\n")
    assert read_line(repl.stdout) == "41\n"


def test_running_exec_continues_and_new_execs_work(sandboxes):
    sb = sandboxes()
    counter = sb.exec(["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done"])
    it = iter(counter.stdout)
    first = int(next(it))
    snap = sb.snapshot()
    assert counter.process_id in snap.processes
    # The source's counter carried on through the pause.
    later = [int(next(it)) for _ in range(3)]
    assert later[0] > first and later == sorted(later)
    copy = sandboxes(snapshot=snap, image=None)
    from gworker_client.sandbox import SandboxProcess
    restored = SandboxProcess(copy.sandbox_id, counter.process_id, _transport=copy._transport)
    # Its output after the restore continues the count (it starts at offset 0 of the copy).
    got = int(next(iter(restored.stdout)))
    assert got > first
    assert restored.poll() is None
    # New execs work at once and get new ids.
    p = copy.exec(["echo", "fresh"])
    assert p.process_id > counter.process_id
    assert p.stdout.read() == "fresh\n"
    restored._transport.call("POST", f"/v1/sandboxes/{copy.sandbox_id}/processes/{counter.process_id}/signal", {"signal": 9})
    assert restored.wait(timeout=30) == 137


def test_five_concurrent_forks_diverge(sandboxes):
    sb = sandboxes()
    run(sb, "echo base > /tmp/state; mkdir -p /work")
    snap = sb.snapshot()
    t0 = time.monotonic()
    forks = [sandboxes(snapshot=snap, image=None) for _ in range(5)]
    procs = [f.exec(["sh", "-c", f"cat /tmp/state; echo fork-{i} > /tmp/state"]) for i, f in enumerate(forks)]
    for p in procs:
        assert p.stdout.read() == "base\n"
        assert p.wait(timeout=30) == 0
    elapsed = time.monotonic() - t0
    for i, f in enumerate(forks):
        assert run(f, ["cat", "/tmp/state"]) == (0, f"fork-{i}\n", "")
    # The source is unaffected by any fork.
    assert run(sb, ["cat", "/tmp/state"]) == (0, "base\n", "")
    assert len({f.sandbox_id for f in forks}) == 5
    assert elapsed < 60


def test_snapshot_metadata_list_and_delete(running_sandbox):
    snap = running_sandbox.snapshot()
    assert snap.source_sandbox_id == running_sandbox.sandbox_id
    assert snap.image == "busybox"
    assert snap.size_bytes > 0 and snap.created_at > 0 and snap.pause_ms > 0
    again = SandboxSnapshot.from_id(snap.snapshot_id)
    assert again.size_bytes == snap.size_bytes
    assert snap.snapshot_id in {s.snapshot_id for s in SandboxSnapshot.list()}
    snap.delete()
    assert snap.snapshot_id not in {s.snapshot_id for s in SandboxSnapshot.list()}
    with pytest.raises(NotFoundError):
        Sandbox.create(snapshot=SandboxSnapshot.from_id(snap.snapshot_id), timeout=30)


def test_terminating_the_source_keeps_the_snapshot(sandboxes):
    sb = sandboxes()
    run(sb, "echo kept > /tmp/k")
    snap = sb.snapshot()
    sb.terminate()
    copy = sandboxes(snapshot=snap, image=None)
    assert run(copy, ["cat", "/tmp/k"]) == (0, "kept\n", "")


def test_snapshot_survives_a_daemon_restart(daemon, sandboxes):
    sb = sandboxes()
    run(sb, "echo persisted > /tmp/p")
    snap = sb.snapshot()
    daemon.restart()
    assert snap.snapshot_id in {s.snapshot_id for s in SandboxSnapshot.list()}
    copy = sandboxes(snapshot=SandboxSnapshot.from_id(snap.snapshot_id), image=None)
    assert run(copy, ["cat", "/tmp/p"]) == (0, "persisted\n", "")


def test_corrupt_snapshot_is_refused_without_a_sandbox(daemon, sandboxes):
    sb = sandboxes()
    snap = sb.snapshot()
    files = glob.glob(os.path.join(str(daemon.data_dir), "snapshots", snap.snapshot_id, "image", "*"))
    assert files
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    before = {s.sandbox_id for s in Sandbox.list()} if hasattr(Sandbox, "list") else None
    with pytest.raises(SnapshotCorruptError) as info:
        sandboxes(snapshot=snap, image=None).wait(timeout=60)
    assert "corrupt" in str(info.value)
    if before is not None:
        assert {s.sandbox_id for s in Sandbox.list()} - before == set()


def test_incompatible_restore_is_refused(sandboxes):
    sb = sandboxes()
    snap = sb.snapshot()
    with pytest.raises(SnapshotIncompatibleError) as info:
        Sandbox.create(snapshot=snap, image=Image.debian_slim(), timeout=30)
    assert "busybox" in str(info.value)
