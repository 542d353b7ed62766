"""The daemon's host tuning: /sys/kernel/rcu_expedited (crates/runtime/src/host.rs)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import BUSYBOX, run, short_tempdir, side_daemon
from gworker_client import Sandbox

SWITCH = Path("/sys/kernel/rcu_expedited")


def switch_writable() -> bool:
    try:
        SWITCH.write_text(SWITCH.read_text().strip())
        return True
    except OSError:
        return False


def test_the_daemon_expedites_rcu_unless_told_not_to(daemon, monkeypatch):
    if not switch_writable():
        # The daemon then logs a warning and runs untuned (the other tests
        # show that sandboxes work either way).
        pytest.skip(f"this host does not let root write {SWITCH}")
    # The session's daemon set it when it started.
    assert SWITCH.read_text().strip() == "1"
    SWITCH.write_text("0")
    try:
        base = short_tempdir("gwht-")
        d2 = side_daemon(daemon, base, "gwht-", {}, ["--no-host-tuning"])
        try:
            assert SWITCH.read_text().strip() == "0"
            # Untuned, sandboxes work the same (only slower to start).
            monkeypatch.setenv("GWORKER_URL", d2.url)
            with Sandbox.create(image=BUSYBOX, timeout=60, block_network=True) as sb:
                assert run(sb, ["echo", "hi"]) == (0, "hi\n", "")
        finally:
            d2.stop()
            shutil.rmtree(base, ignore_errors=True)
        base = short_tempdir("gwht-")
        d3 = side_daemon(daemon, base, "gwht-", {})
        try:
            assert SWITCH.read_text().strip() == "1"
            assert f"set {SWITCH} to 1" in d3.log_tail(), d3.log_tail()
        finally:
            d3.stop()
            shutil.rmtree(base, ignore_errors=True)
    finally:
        SWITCH.write_text("1")
