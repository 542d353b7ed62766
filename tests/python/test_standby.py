"""The standby supervisor (crates/engine/src/standby.rs): the daemon keeps
one supervisor process started, and the next cold create's sandbox runs
under it."""

from __future__ import annotations

import subprocess
import time
from typing import List, Tuple

from helpers import BUSYBOX, run, short_tempdir, side_daemon
from gworker_client import Sandbox


def processes(pattern: str) -> List[Tuple[int, str]]:
    out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        pid, _, cmd = line.partition(" ")
        if "pgrep" not in cmd:
            rows.append((int(pid), cmd))
    return rows


def standbys(data_dir) -> List[int]:
    return [pid for pid, _ in processes(f"supervise-standby {data_dir}/sandboxes/sb-")]


def wait_for(cond, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    return cond()


def test_a_cold_create_runs_under_the_standby_and_a_new_one_replaces_it(daemon, monkeypatch):
    d2 = side_daemon(daemon, short_tempdir("gwsb-"), "gwsb-", {})
    data = d2.data_dir
    try:
        first = wait_for(lambda: standbys(data))
        assert len(first) == 1, processes("supervise-standby")
        monkeypatch.setenv("GWORKER_URL", d2.url)
        with Sandbox.create(image=BUSYBOX, timeout=60, block_network=True) as sb:
            assert run(sb, ["echo", "hi"]) == (0, "hi\n", "")
            # The standby became this sandbox's supervisor, and shows as one.
            sup = [pid for pid, cmd in processes(sb.sandbox_id) if f"supervise {data}/sandboxes/" in cmd]
            assert sup == first, (sup, first, processes(sb.sandbox_id))
            # Another one waits for the next create.
            second = wait_for(lambda: [p for p in standbys(data) if p not in first])
            assert len(second) == 1, processes("supervise-standby")
    finally:
        d2.stop()
    # It goes with the daemon that kept it.
    assert wait_for(lambda: not standbys(data)), processes("supervise-standby")
