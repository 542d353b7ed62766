"""env / workdir handling and every error the API reports for bad input."""

from __future__ import annotations

import pytest

from helpers import BUSYBOX, run
from gworker_client import (
    CommandNotFoundError,
    Image,
    InvalidRequestError,
    NotFoundError,
    Sandbox,
    SandboxSnapshot,
    Secret,
    Volume,
    WorkdirNotFoundError,
)
from gworker_client.exceptions import ExecFailedError, GworkerError


def test_create_env_and_workdir_created_if_missing(sandboxes):
    sb = sandboxes(["sh", "-c", 'pwd; echo "$GREETING|$OTHER"; ls -ld . | cut -c1'],
                   env={"GREETING": "hello world", "OTHER": "a=b;c"}, workdir="/work/new/dir")
    assert sb.stdout.read() == "/work/new/dir\nhello world|a=b;c\nd\n"
    assert sb.wait(timeout=60) == 0


def test_exec_env_and_workdir(running_sandbox):
    code, out, _ = run(running_sandbox, ["sh", "-c", 'pwd; echo "$X"'], env={"X": "exec-value"}, workdir="/tmp")
    assert (code, out) == (0, "/tmp\nexec-value\n")


def test_exec_inherits_sandbox_env_and_workdir(sandboxes):
    sb = sandboxes(env={"FROM_SANDBOX": "yes", "OVERRIDE": "sandbox"}, workdir="/srv/app")
    code, out, _ = run(sb, ["sh", "-c", 'pwd; echo "$FROM_SANDBOX $OVERRIDE"'], env={"OVERRIDE": "exec"})
    assert (code, out) == (0, "/srv/app\nyes exec\n")


def test_exec_into_missing_workdir(running_sandbox):
    with pytest.raises(WorkdirNotFoundError) as info:
        running_sandbox.exec(["pwd"], workdir="/does/not/exist")
    assert info.value.code == "workdir_not_found" and info.value.status == 404
    assert isinstance(info.value, ExecFailedError)
    assert run(running_sandbox, "test -e /does/not/exist || echo absent")[1] == "absent\n"


def test_exec_into_a_workdir_that_is_a_file(running_sandbox):
    # Found by the agent's spawn child (its chdir), not by a check before.
    run(running_sandbox, "echo x > /tmp/plain-file")
    with pytest.raises(WorkdirNotFoundError) as info:
        running_sandbox.exec(["pwd"], workdir="/tmp/plain-file")
    assert info.value.code == "workdir_not_found" and info.value.status == 404
    assert "/tmp/plain-file" in str(info.value) and "not a directory" in str(info.value), str(info.value)
    assert run(running_sandbox, ["echo", "still fine"])[1] == "still fine\n"


def test_exec_missing_program(running_sandbox):
    with pytest.raises(CommandNotFoundError) as info:
        running_sandbox.exec(["/no/such/program", "arg"])
    assert info.value.code == "command_not_found" and info.value.status == 404
    assert run(running_sandbox, ["echo", "still fine"])[1] == "still fine\n"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"workdir": "relative/dir"},
        {"env": {"1BAD": "x"}},
        {"env": {"A-B": "x"}},
        {"env": {"": "x"}},
        {"env": {"OK": "nul\x00inside"}},
        {"timeout": 0},
        {"timeout": -1},
        {"timeout": 86401},
    ],
    ids=["relative-workdir", "env-digit", "env-dash", "env-empty", "env-nul", "timeout-0", "timeout-neg", "timeout-big"],
)
def test_create_invalid_request(daemon, kwargs):
    before = daemon.sandbox_ids()
    with pytest.raises(InvalidRequestError) as info:
        Sandbox.create(["true"], image=BUSYBOX, **{"timeout": 60, **kwargs})
    assert info.value.code == "invalid_request" and info.value.status == 400 and info.value.message
    assert daemon.sandbox_ids() - before == set(), "no sandbox was made"


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((), {}),
        ([], {}),
        (["pwd"], {"workdir": "relative"}),
        (["true"], {"env": {"BAD NAME": "x"}}),
        (["true"], {"env": {"9X": "x"}}),
    ],
    ids=["no-cmd", "empty-argv", "relative-workdir", "env-space", "env-digit"],
)
def test_exec_invalid_request(running_sandbox, args, kwargs):
    with pytest.raises(InvalidRequestError) as info:
        running_sandbox.exec(*((args,) if args != () else ()), **kwargs)
    assert info.value.code == "invalid_request" and info.value.status == 400
    assert run(running_sandbox, ["echo", "unharmed"])[1] == "unharmed\n"


def test_client_side_type_errors():
    with pytest.raises(TypeError):
        Sandbox.create([1, 2], image=BUSYBOX)
    with pytest.raises(TypeError):
        Sandbox.create(["true"], image="busybox")  # type: ignore[arg-type]
    with pytest.raises(ValueError) as info:
        Image.debian_slim(python_version="3.12")
    assert "3.11" in str(info.value)
    assert Image.debian_slim() == Image.debian_slim("3.11") == Image.from_name("debian-slim")


def test_unknown_image_not_found(daemon):
    before = daemon.sandbox_ids()
    with pytest.raises(NotFoundError) as info:
        Sandbox.create(["true"], image=Image.from_name("no-such-image"), timeout=60)
    assert info.value.status == 404
    assert daemon.sandbox_ids() - before == set()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"secrets": [Secret.from_name("no-such-secret")]},
        {"volumes": {"/data": Volume.from_name("no-such-volume")}},
    ],
    ids=["secret-name", "volume"],
)
def test_create_with_unknown_names(daemon, kwargs):
    before = daemon.sandbox_ids()
    with pytest.raises(NotFoundError) as info:
        Sandbox.create(["true"], image=BUSYBOX, timeout=60, **kwargs)
    assert info.value.code == "not_found" and info.value.status == 404
    assert isinstance(info.value, GworkerError)
    assert daemon.sandbox_ids() - before == set(), "no sandbox was made"


def test_secret_repr_hides_values():
    assert "s3cr3t" not in repr(Secret.from_dict({"K": "s3cr3t"}))
    assert SandboxSnapshot.from_id("x").snapshot_id == "x"
