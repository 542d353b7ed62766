"""create / exec / wait / poll / terminate / lookup against real sandboxes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from helpers import BUSYBOX, client_env, run
from gworker_client import (
    GworkerError,
    NotFoundError,
    Sandbox,
    SandboxNotRunningError,
    SandboxProcess,
)
from gworker_client.sandbox import Sandbox as SandboxFromModule


def test_public_names_importable():
    import gworker_client
    from gworker_client.exceptions import DaemonUnavailableError, SandboxTimeoutError
    from gworker_client.sandbox import SandboxSnapshot

    assert SandboxFromModule is Sandbox
    assert gworker_client.SandboxSnapshot is SandboxSnapshot
    assert issubclass(SandboxTimeoutError, TimeoutError) and issubclass(SandboxTimeoutError, GworkerError)
    assert issubclass(DaemonUnavailableError, ConnectionError) and issubclass(DaemonUnavailableError, GworkerError)
    for name in gworker_client.__all__:
        assert hasattr(gworker_client, name), name


def test_create_runs_entry_command(sandboxes, daemon):
    t0 = time.monotonic()
    sb = sandboxes(["sh", "-c", "echo hello from $(uname -s); echo oops >&2; exit 0"])
    assert time.monotonic() - t0 < 5, "create returns at once"
    assert sb.sandbox_id.startswith("sb-") and sb.object_id == sb.sandbox_id
    assert sb.stdout.read() == "hello from Linux\n"
    assert sb.stderr.read() == "oops\n"
    assert sb.wait(timeout=60) == 0
    assert sb.poll() == 0
    assert sb.returncode == 0
    status, info = daemon.request("GET", f"/v1/sandboxes/{sb.sandbox_id}")
    assert status == 200 and info["state"] == "exited" and info["reason"] == "exited"
    assert info["image"] == "busybox" and info["entry_process_id"] == 0


def test_string_cmd_runs_through_sh(sandboxes):
    sb = sandboxes("echo $((6 * 7)) | tr 4 X")
    assert sb.stdout.read() == "X2\n"
    assert sb.wait(timeout=60) == 0


def test_poll_is_none_while_running(sandboxes):
    sb = sandboxes(["sh", "-c", "read line; echo got $line"])
    assert sb.poll() is None
    assert sb.returncode is None
    sb.stdin.write("it\n")
    assert sb.stdout.readline() == "got it\n"
    assert sb.wait(timeout=60) == 0
    assert sb.poll() == 0


def test_exec_shares_filesystem_and_processes(running_sandbox):
    sb = running_sandbox
    assert run(sb, ["sh", "-c", "echo state-1 > /tmp/f"]) == (0, "", "")
    assert run(sb, ["cat", "/tmp/f"]) == (0, "state-1\n", "")
    sleeper = sb.exec(["sh", "-c", "echo $$ > /tmp/pid; exec sleep 300"])
    assert isinstance(sleeper, SandboxProcess) and sleeper.process_id > 0
    assert sleeper.sandbox_id == sb.sandbox_id
    code, out, _ = run(sb, "while [ ! -s /tmp/pid ]; do sleep 0.05; done; kill -0 $(cat /tmp/pid) && echo alive")
    assert (code, out) == (0, "alive\n")
    assert sleeper.poll() is None and sleeper.returncode is None
    assert run(sb, "kill -TERM $(cat /tmp/pid)")[0] == 0
    assert sleeper.wait(timeout=30) == 143
    assert sleeper.returncode == 143


def test_exec_process_ids_are_distinct(running_sandbox):
    procs = [running_sandbox.exec(["sh", "-c", f"echo {i}"]) for i in range(5)]
    assert len({p.process_id for p in procs}) == 5
    assert [p.stdout.read() for p in procs] == [f"{i}\n" for i in range(5)]
    assert [p.wait() for p in procs] == [0] * 5


def test_processes_start_with_default_signal_handling(running_sandbox):
    # SIGPIPE at its default (the agent ignores it for itself): `yes` dies of
    # it when `head` is gone, 128 + 13.
    code, _, err = run(running_sandbox, ["sh", "-c", "(yes; echo yes-exit=$? >&2) | head -c1 >/dev/null"])
    assert code == 0 and err == "yes-exit=141\n", err
    # Nothing blocked (the agent blocks SIGCHLD for itself): TERM and CHLD reach
    # a child and its shell.
    code, out, _ = run(running_sandbox, ["sh", "-c", "sleep 30 & p=$!; kill -TERM $p; wait $p; echo $?"])
    assert (code, out) == (0, "143\n")
    # Also in a workdir other than "/" (the child changes into it itself).
    code, _, err = run(running_sandbox, ["sh", "-c", "(yes; echo yes-exit=$? >&2) | head -c1 >/dev/null; pwd >&2"], workdir="/tmp")
    assert code == 0 and err == "yes-exit=141\n/tmp\n", err


def test_send_signal(running_sandbox):
    proc = running_sandbox.exec(["sleep", "300"])
    assert proc.poll() is None
    proc.send_signal(9)
    assert proc.wait(timeout=30) == 137


def test_terminate_is_idempotent_and_removes(sandboxes, daemon):
    sb = sandboxes(["sleep", "300"])
    assert run(sb, ["echo", "up"])[1] == "up\n"
    sb.terminate()
    sb.terminate()
    assert sb.sandbox_id not in daemon.sandbox_ids()
    with pytest.raises(NotFoundError) as info:
        Sandbox.lookup(sb.sandbox_id)
    assert info.value.code == "not_found" and info.value.status == 404
    with pytest.raises(NotFoundError):
        sb.exec(["true"])
    with pytest.raises(NotFoundError):
        sb.poll()


def test_context_manager_terminates(daemon):
    with Sandbox.create(image=BUSYBOX, timeout=60) as sb:
        assert run(sb, ["echo", "inside"])[1] == "inside\n"
    assert sb.sandbox_id not in daemon.sandbox_ids()
    with pytest.raises(NotFoundError):
        Sandbox.lookup(sb.sandbox_id)


def test_context_manager_terminates_on_exception(daemon):
    with pytest.raises(ZeroDivisionError):
        with Sandbox.create(image=BUSYBOX, timeout=60) as sb:
            assert run(sb, ["echo", "inside"])[1] == "inside\n"
            1 / 0
    assert sb.sandbox_id not in daemon.sandbox_ids()


def test_lookup_gives_a_working_handle(running_sandbox):
    run(running_sandbox, "echo from-first-handle > /tmp/marker")
    other = Sandbox.lookup(running_sandbox.sandbox_id)
    assert other == running_sandbox and other.sandbox_id == running_sandbox.sandbox_id
    assert run(other, ["cat", "/tmp/marker"]) == (0, "from-first-handle\n", "")
    assert other.poll() is None


def test_lookup_from_another_process(running_sandbox, daemon):
    run(running_sandbox, "echo shared-state > /tmp/marker")
    code = textwrap.dedent(
        """
        import sys
        from gworker_client import Sandbox
        sb = Sandbox.lookup(sys.argv[1])
        p = sb.exec(["sh", "-c", "cat /tmp/marker; echo child > /tmp/child"])
        print(p.stdout.read(), end="")
        print("exit", p.wait())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, running_sandbox.sandbox_id],
        env=client_env(daemon.url), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "shared-state\nexit 0\n"
    assert run(running_sandbox, ["cat", "/tmp/child"])[1] == "child\n"


def test_lookup_unknown_raises_not_found(daemon):
    with pytest.raises(NotFoundError) as info:
        Sandbox.lookup("sb-" + "0" * 32)
    assert info.value.code == "not_found" and info.value.status == 404 and info.value.message
    with pytest.raises(NotFoundError):
        Sandbox.lookup("no-such-sandbox/../../health")


def test_lookup_of_exited_sandbox_still_works(sandboxes):
    sb = sandboxes(["sh", "-c", "exit 5"])
    assert sb.wait(timeout=60) == 5
    again = Sandbox.lookup(sb.sandbox_id)
    assert again.poll() == 5 and again.wait() == 5


def test_exec_on_exited_sandbox_raises_not_running(sandboxes):
    sb = sandboxes(["true"])
    assert sb.wait(timeout=60) == 0
    with pytest.raises(SandboxNotRunningError) as info:
        sb.exec(["echo", "too late"])
    assert info.value.code == "sandbox_not_running" and info.value.status == 409


def test_default_image_is_debian_slim(sandboxes, daemon):
    sb = sandboxes(["sh", "-c", ". /etc/os-release; echo $ID"], image=None, timeout=600)
    assert sb.stdout.read() == "debian\n"
    assert sb.wait(timeout=300) == 0
    assert daemon.request("GET", f"/v1/sandboxes/{sb.sandbox_id}")[1]["image"] == "debian-slim"
