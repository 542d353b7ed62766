"""Snapshots: sb.snapshot() and Sandbox.create(snapshot=...)."""

from __future__ import annotations

import pytest

from helpers import run
from gworker_client import NotFoundError, Sandbox, SandboxSnapshot


def test_snapshot_and_restore(running_sandbox, sandboxes):
    run(running_sandbox, "mkdir -p /data && echo kept-state > /data/state")
    snap = running_sandbox.snapshot()
    assert isinstance(snap, SandboxSnapshot) and snap.snapshot_id
    assert SandboxSnapshot.from_id(snap.snapshot_id) == snap
    # The source sandbox runs on after the snapshot.
    assert run(running_sandbox, ["cat", "/data/state"]) == (0, "kept-state\n", "")
    run(running_sandbox, "echo changed-after > /data/state")
    # A restore (no image given: the snapshot's own) sees the state at snapshot time.
    restored = sandboxes(snapshot=SandboxSnapshot.from_id(snap.snapshot_id), image=None)
    assert restored.sandbox_id != running_sandbox.sandbox_id
    assert run(restored, ["cat", "/data/state"]) == (0, "kept-state\n", "")
    assert run(running_sandbox, ["cat", "/data/state"])[1] == "changed-after\n"


def test_restore_unknown_snapshot(daemon):
    before = daemon.sandbox_ids()
    with pytest.raises(NotFoundError) as info:
        Sandbox.create(["true"], snapshot=SandboxSnapshot.from_id("snap-0123"), timeout=60)
    assert info.value.status == 404
    assert daemon.sandbox_ids() - before == set()
