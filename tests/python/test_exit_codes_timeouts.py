"""Exit codes, signals and timeouts, observed from inside real sandboxes."""

from __future__ import annotations

import time

import pytest

from gworker_client import SandboxTimeoutError


def test_entry_exit_code(sandboxes):
    sb = sandboxes(["sh", "-c", "exit 3"])
    assert sb.wait(timeout=60) == 3
    assert sb.poll() == 3 and sb.returncode == 3


def test_exec_exit_code(running_sandbox):
    proc = running_sandbox.exec(["sh", "-c", "echo before; exit 3"])
    assert proc.stdout.read() == "before\n"
    assert proc.wait(timeout=60) == 3
    assert proc.poll() == 3 and proc.returncode == 3


def test_entry_killed_by_signal_9(sandboxes):
    sb = sandboxes(["sh", "-c", "echo dying; kill -9 $$"])
    assert sb.stdout.read() == "dying\n"
    assert sb.wait(timeout=60) == 137


def test_exec_killed_by_signal_9(running_sandbox):
    proc = running_sandbox.exec(["sh", "-c", "kill -9 $$"])
    assert proc.wait(timeout=60) == 137


# The deadline counts from the create, so the boot eats into it: long enough
# for a slow boot on a loaded host, far below the entry command's own 60 s.
SHORT_TIMEOUT = 8.0


def test_sandbox_timeout_kills_it(sandboxes, daemon):
    sb = sandboxes(["sh", "-c", "echo started; sleep 60; echo never"], timeout=SHORT_TIMEOUT)
    assert sb.stdout.read() == "started\n"
    assert sb.wait(timeout=60) == 137
    ended = time.time()
    status, info = daemon.request("GET", f"/v1/sandboxes/{sb.sandbox_id}")
    assert status == 200 and info["reason"] == "timeout" and info["exit_code"] == 137
    # Killed at its deadline: not before, and not long after.
    late = ended - info["deadline"]
    assert -0.5 < late < 15, late


def test_idle_sandbox_times_out(sandboxes):
    sb = sandboxes(timeout=SHORT_TIMEOUT)
    assert sb.exec(["echo", "alive"]).stdout.read() == "alive\n"
    assert sb.wait(timeout=60) == 137
    assert sb.exit_reason == "timeout"


def test_wait_timeout_raises_timeout_error(sandboxes):
    sb = sandboxes(["sleep", "60"])
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        sb.wait(timeout=0.5)
    elapsed = time.monotonic() - t0
    assert isinstance(info.value, SandboxTimeoutError)
    assert info.value.code == "wait_timeout"
    assert 0.4 < elapsed < 5, elapsed
    assert sb.poll() is None, "the sandbox goes on after a client-side wait timeout"
    assert sb.exec(["echo", "still here"]).stdout.read() == "still here\n"


def test_wait_zero_timeout_on_running(sandboxes):
    sb = sandboxes(["sleep", "60"])
    with pytest.raises(SandboxTimeoutError):
        sb.wait(timeout=0)


def test_process_wait_timeout(running_sandbox):
    # Held on its stdin: still running whatever the wait and poll take.
    proc = running_sandbox.exec(["sh", "-c", "read go; echo done $go"])
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        proc.wait(timeout=0.5)
    assert 0.4 < time.monotonic() - t0 < 5
    assert proc.poll() is None
    proc.stdin.write("now\n")
    proc.stdin.write_eof()
    assert proc.stdout.read() == "done now\n"
    assert proc.wait(timeout=30) == 0


def test_wait_without_timeout_blocks_until_exit(sandboxes):
    sb = sandboxes(["sh", "-c", "sleep 1.5; exit 4"])
    t0 = time.monotonic()
    assert sb.wait() == 4
    assert time.monotonic() - t0 > 1.0
