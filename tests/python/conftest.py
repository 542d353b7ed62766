"""Fixtures for the Python client's tests: a real daemon, real gVisor sandboxes.

Layers: ``daemon`` (session: ``gworker serve`` on a temporary data dir and
socket) → ``sandbox`` (an idle busybox sandbox, terminated after the test) →
``running_sandbox`` (the same, once an exec proved it runs). ``sandboxes``
creates more and terminates them all; ``py_sandbox`` is a debian-slim sandbox
(Python 3.11) shared by a test module.

Environment: ``GWORKER_BIN`` (default ``<repo>/target/debug/gworker``),
``GWORKER_AGENT`` (passed through to the daemon), ``GWORKER_TEST_DATA_DIR``
(reuse a data dir, and so its built images, across runs).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest

from helpers import BUSYBOX, Daemon, gworker_bin, remove_short_tempdirs, short_tempdir
from gworker_client import Image, Sandbox


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The session's daemon; GWORKER_URL points at it for the whole session."""
    binary = gworker_bin()
    data_dir = Path(os.environ.get("GWORKER_TEST_DATA_DIR") or tmp_path_factory.mktemp("gworker-data"))
    sock_dir = short_tempdir("gwt-")
    d = Daemon(binary, data_dir, sock_dir / "gw.sock")
    d.start()
    mp = pytest.MonkeyPatch()
    mp.setenv("GWORKER_URL", d.url)
    mp.delenv("GWORKER_TOKEN", raising=False)
    try:
        yield d
    finally:
        mp.undo()
        d.stop()
        d.unmount_images()
        shutil.rmtree(sock_dir, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The tests' short directories under /tmp go with the session (its
    fixtures, and so its daemons, are torn down by now)."""
    for d in remove_short_tempdirs():
        print(f"\nleft {d}: something is still mounted under it")


@pytest.fixture(autouse=True)
def _daemon_survives(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test during which the daemon died on its own, and bring it back."""
    yield
    if "daemon" not in request.fixturenames:
        return
    d: Daemon = request.getfixturevalue("daemon")
    if not d.alive():
        code = d.proc.returncode if d.proc else None
        tail = d.log_tail()
        d.start()
        pytest.fail(f"the daemon died during the test (exit {code}):\n{tail}")


@pytest.fixture
def sandboxes(daemon: Daemon) -> Iterator[Callable[..., Sandbox]]:
    """``sandboxes(**create_kwargs)`` creates a sandbox (busybox unless told);
    all are terminated after the test."""
    made: List[Sandbox] = []

    def make(*args: Any, **kwargs: Any) -> Sandbox:
        kwargs.setdefault("image", BUSYBOX)
        kwargs.setdefault("timeout", 120.0)
        sb = Sandbox.create(*args, **kwargs)
        made.append(sb)
        return sb

    yield make
    for sb in made:
        try:
            sb.terminate()
        except Exception:  # the daemon may be down after a test that killed it
            pass


@pytest.fixture
def sandbox(sandboxes: Callable[..., Sandbox]) -> Sandbox:
    """An idle busybox sandbox (maybe still starting), terminated after the test."""
    return sandboxes()


@pytest.fixture
def running_sandbox(sandbox: Sandbox) -> Sandbox:
    """The idle busybox sandbox, once an exec in it has run."""
    proc = sandbox.exec(["true"])
    assert proc.wait(timeout=60) == 0
    return sandbox


@pytest.fixture(scope="module")
def py_sandbox(daemon: Daemon) -> Iterator[Sandbox]:
    """A debian-slim sandbox with Python 3.11, shared by a test module (the
    first build of the image takes about 30 s)."""
    sb = Sandbox.create(image=Image.debian_slim(python_version="3.11"), timeout=900.0)
    try:
        proc = sb.exec(["python3", "-c", "print('ready')"])
        assert proc.stdout.read() == "ready\n"
        assert proc.wait(timeout=300) == 0
        yield sb
    finally:
        sb.terminate()

