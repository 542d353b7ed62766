"""``gworker_client.sandbox``: sandboxes, their processes and snapshots.

A :class:`Sandbox` is a handle on a sandbox the daemon runs; it holds nothing
but the sandbox ID and what it last learnt from the daemon, so any number of
handles (in any process, see :meth:`Sandbox.lookup`) can drive one sandbox.
"""

from __future__ import annotations

import time
import urllib.parse
from types import TracebackType
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type

from ._streams import RESUME_WINDOW, StreamReader, StreamWriter
from ._transport import Transport
from .exceptions import (
    DaemonUnavailableError,
    NotFoundError,
    SandboxStartFailedError,
    SandboxTimeoutError,
)
from .image import Image
from .secret import Secret
from .volume import Volume

__all__ = ["Sandbox", "SandboxProcess", "SandboxSnapshot"]

#: Extra socket time allowed beyond a wait's own timeout.
_WAIT_SLACK = 30.0
#: How long the daemon holds a wait without a timeout (it then answers 408).
_SERVER_WAIT_CAP = 60.0
#: The process id of a sandbox's entry command.
_ENTRY_PROCESS_ID = 0


def _argv(cmd: object, what: str) -> List[str]:
    """``cmd`` as an argv: a string ``s`` runs as ``/bin/sh -c s``."""
    if isinstance(cmd, str):
        return ["/bin/sh", "-c", cmd]
    if isinstance(cmd, (bytes, bytearray)) or not hasattr(cmd, "__iter__"):
        raise TypeError(f"{what} is a string or a sequence of strings, not {type(cmd).__name__}")
    argv = list(cmd)
    for arg in argv:
        if not isinstance(arg, str):
            raise TypeError(f"{what} holds strings only, not {type(arg).__name__} ({arg!r})")
    return argv


def _env(env: Optional[Mapping[str, str]]) -> Optional[Dict[str, str]]:
    if env is None:
        return None
    out: Dict[str, str] = {}
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"env maps str to str, got {key!r}: {value!r}")
        out[key] = value
    return out


def _workdir(workdir: Optional[str]) -> Optional[str]:
    if workdir is not None and not isinstance(workdir, str):
        raise TypeError(f"workdir is a str, not {type(workdir).__name__}")
    return workdir


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _wait(transport: Transport, path: str, timeout: Optional[float], what: str) -> Optional[int]:
    """Block on a ``.../wait`` endpoint until it gives an exit code.

    Without a timeout, loops over the daemon's 408 answers; with one, passes
    the remaining time and raises :class:`SandboxTimeoutError` once it is
    spent. A daemon that goes away (a restart) is retried for
    :data:`RESUME_WINDOW` seconds. ``None`` means the sandbox failed before its
    entry command ran.
    """
    deadline = None if timeout is None else time.monotonic() + max(0.0, float(timeout))
    unreachable_since: Optional[float] = None
    while True:
        if deadline is None:
            url, http_timeout = path, _SERVER_WAIT_CAP + _WAIT_SLACK
        else:
            remaining = max(0.0, deadline - time.monotonic())
            url, http_timeout = f"{path}?timeout={remaining:.3f}", remaining + _WAIT_SLACK
        try:
            answer = transport.call("GET", url, timeout=http_timeout)
        except SandboxTimeoutError:
            unreachable_since = None
            if deadline is not None and time.monotonic() >= deadline:
                raise SandboxTimeoutError(
                    f"{what} did not exit within {timeout} s", code="wait_timeout", status=408
                ) from None
            continue
        except DaemonUnavailableError:
            now = time.monotonic()
            if unreachable_since is None:
                unreachable_since = now
            if now - unreachable_since >= RESUME_WINDOW:
                raise
            time.sleep(0.2)
            continue
        code = answer.get("exit_code")
        return None if code is None else int(code)


class SandboxSnapshot:
    """A memory checkpoint of a sandbox, made by :meth:`Sandbox.snapshot`; pass
    it as ``snapshot=`` to :meth:`Sandbox.create` to restore that state.

    ``snapshot_id`` is known at once; ``created_at``, ``size_bytes``,
    ``source_sandbox_id``, ``image``, ``pause_ms`` and ``processes`` come from
    the daemon (fetched on first use for a handle made with :meth:`from_id`).
    """

    __slots__ = ("snapshot_id", "_info")

    def __init__(self, snapshot_id: str, _info: Optional[Dict[str, Any]] = None) -> None:
        if not isinstance(snapshot_id, str) or not snapshot_id:
            raise ValueError("a snapshot ID is a non-empty string")
        self.snapshot_id: str = snapshot_id
        self._info = _info

    @classmethod
    def from_id(cls, snapshot_id: str) -> "SandboxSnapshot":
        """The snapshot with this ID (checked against the daemon when its
        details are first read, or when it is restored)."""
        return cls(snapshot_id)

    @classmethod
    def list(cls) -> "List[SandboxSnapshot]":
        """Every snapshot the daemon keeps, oldest first."""
        data = Transport.from_env().call("GET", "/v1/snapshots")
        return [cls(s["snapshot_id"], s) for s in data["snapshots"]]

    def delete(self) -> None:
        """Delete the snapshot's files. Sandboxes restored from it are not
        affected. Raises ``NotFoundError`` if it does not exist."""
        Transport.from_env().call("DELETE", f"/v1/snapshots/{_quote(self.snapshot_id)}")

    def info(self) -> Dict[str, Any]:
        """The daemon's description of the snapshot (raises ``NotFoundError``
        if it does not exist)."""
        if self._info is None:
            self._info = Transport.from_env().call("GET", f"/v1/snapshots/{_quote(self.snapshot_id)}")
        return self._info

    @property
    def created_at(self) -> float:
        """Unix time at which the snapshot was taken."""
        return float(self.info()["created_at"])

    @property
    def size_bytes(self) -> int:
        """Size of the checkpoint on disk."""
        return int(self.info()["size_bytes"])

    @property
    def source_sandbox_id(self) -> str:
        """The sandbox it was taken from."""
        return str(self.info()["source_sandbox_id"])

    @property
    def image(self) -> str:
        """The image of the sandbox it was taken from."""
        return str(self.info()["image"])

    @property
    def pause_ms(self) -> float:
        """How long the source sandbox was paused while it was taken."""
        return float(self.info()["pause_ms"])

    @property
    def processes(self) -> "List[int]":
        """Process ids that were running (they go on running after a restore)."""
        return [int(p) for p in self.info()["processes"]]

    def to_json(self) -> Dict[str, Any]:
        """The snapshot as it goes into the create request."""
        return {"snapshot_id": self.snapshot_id}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SandboxSnapshot) and other.snapshot_id == self.snapshot_id

    def __hash__(self) -> int:
        return hash(("SandboxSnapshot", self.snapshot_id))

    def __repr__(self) -> str:
        return f"SandboxSnapshot.from_id({self.snapshot_id!r})"


class SandboxProcess:
    """A process running in a sandbox, as returned by :meth:`Sandbox.exec`.

    ``stdout`` and ``stderr`` are readers, ``stdin`` a writer; ``wait()``
    blocks until the process exits and returns its exit code (128+N when killed
    by signal N).
    """

    def __init__(self, sandbox_id: str, process_id: int, *, _transport: Transport) -> None:
        self._sandbox_id = sandbox_id
        self._process_id = process_id
        self._transport = _transport
        self._path = f"/v1/sandboxes/{_quote(sandbox_id)}/processes/{process_id}"
        self._returncode: Optional[int] = None
        self.stdout: StreamReader = StreamReader(_transport, f"{self._path}/stdout")
        """The process's standard output."""
        self.stderr: StreamReader = StreamReader(_transport, f"{self._path}/stderr")
        """The process's standard error."""
        self.stdin: StreamWriter = StreamWriter(_transport, f"{self._path}/stdin")
        """The process's standard input."""

    @property
    def process_id(self) -> int:
        """The process's id within its sandbox (the entry command is 0)."""
        return self._process_id

    @property
    def sandbox_id(self) -> str:
        """The ID of the sandbox the process runs in."""
        return self._sandbox_id

    def __repr__(self) -> str:
        return f"SandboxProcess(sandbox_id={self._sandbox_id!r}, process_id={self._process_id})"

    def wait(self, timeout: Optional[float] = None) -> int:
        """Block until the process exits. Returns the exit code. Raises
        ``TimeoutError`` (:class:`SandboxTimeoutError`) if timeout elapses
        before the process exits."""
        if self._returncode is None:
            code = _wait(self._transport, f"{self._path}/wait", timeout, f"process {self._process_id}")
            if code is None:
                raise SandboxStartFailedError(f"process {self._process_id} never ran: its sandbox failed to start")
            self._returncode = code
        return self._returncode

    def poll(self) -> Optional[int]:
        """Non-blocking check. Returns the exit code if the process has
        finished, or ``None`` if it is still running."""
        if self._returncode is None:
            info = self._transport.call("GET", self._path)
            if info.get("state") == "exited" and info.get("exit_code") is not None:
                self._returncode = int(info["exit_code"])
        return self._returncode

    @property
    def returncode(self) -> Optional[int]:
        """The exit code if the process has finished, else ``None``."""
        return self.poll()

    def send_signal(self, signal: int) -> None:
        """Send a signal (a number, e.g. ``signal.SIGTERM``) to the process."""
        self._transport.call("POST", f"{self._path}/signal", {"signal": int(signal)})


class Sandbox:
    """An ephemeral, isolated execution environment. Useful for running
    untrusted code, one-shot scripts, or multi-step workflows with shared state
    between ``exec()`` calls. Destroyed automatically after ``terminate()`` or
    context exit.

    Make one with :meth:`create` or :meth:`lookup`, not with the constructor.
    """

    def __init__(self, sandbox_id: str, *, _transport: Transport, _info: Optional[Dict[str, Any]] = None) -> None:
        self._sandbox_id = sandbox_id
        self._transport = _transport
        self._path = f"/v1/sandboxes/{_quote(sandbox_id)}"
        self._info: Dict[str, Any] = dict(_info or {})
        self._returncode: Optional[int] = None
        self._entry: Optional[SandboxProcess] = None

    # -- identity ------------------------------------------------------------

    @property
    def sandbox_id(self) -> str:
        """The sandbox's ID (``sb-`` and 32 hex digits)."""
        return self._sandbox_id

    @property
    def object_id(self) -> str:
        """Same as :attr:`sandbox_id` (Modal's name for it)."""
        return self._sandbox_id

    def __repr__(self) -> str:
        return f"Sandbox(sandbox_id={self._sandbox_id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sandbox) and other._sandbox_id == self._sandbox_id

    def __hash__(self) -> int:
        return hash(("Sandbox", self._sandbox_id))

    # -- making handles --------------------------------------------------------

    @classmethod
    def create(
        cls,
        cmd: object = (),
        image: Optional[Image] = None,
        secrets: Sequence[Secret] = (),
        volumes: Optional[Mapping[str, Volume]] = None,
        timeout: float = 300.0,
        env: Optional[Mapping[str, str]] = None,
        workdir: Optional[str] = None,
        snapshot: Optional[SandboxSnapshot] = None,
        *,
        cpu: Optional[float] = None,
        memory: Optional[int] = None,
        max_processes: Optional[int] = None,
        block_network: bool = False,
        cidr_allowlist: Optional[Sequence[str]] = None,
    ) -> "Sandbox":
        """Start a sandbox running ``cmd``. If ``snapshot=`` is provided, the
        container is restored from that checkpoint instead of a cold start.
        Returns immediately; use ``wait()`` or ``poll()`` to block.

        ``cmd`` is an argv (a sequence of strings) or one string, run as
        ``/bin/sh -c cmd``; empty, the sandbox idles until ``timeout`` (seconds)
        or ``terminate()``. ``image`` defaults to ``Image.debian_slim()`` (with a
        ``snapshot``, to the snapshot's image).

        Beyond the spec, as Modal users know them: ``cpu`` (cores, fractional),
        ``memory`` (MiB; going over kills the sandbox, ``exit_reason`` is
        ``"oom"``) and ``max_processes``; the daemon's defaults apply otherwise.
        ``block_network=True`` leaves the sandbox loopback only;
        ``cidr_allowlist`` limits outbound traffic to those IPv4 CIDRs. By
        default a sandbox reaches the internet, but never the daemon's host,
        its private networks or other sandboxes.
        """
        if image is None and snapshot is None:
            image = Image.debian_slim()
        if image is not None and not isinstance(image, Image):
            raise TypeError(f"image is an Image, not {type(image).__name__}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout is a number of seconds, not {type(timeout).__name__}")
        body: Dict[str, Any] = {"cmd": _argv(cmd, "cmd"), "timeout": float(timeout)}
        transport = Transport.from_env()
        if image is not None:  # omitted with a snapshot: the snapshot's image
            if image._needs_build():
                image._build(transport)
            body["image"] = image.name
        if env is not None:
            body["env"] = _env(env)
        if workdir is not None:
            body["workdir"] = _workdir(workdir)
        if secrets:
            for secret in secrets:
                if not isinstance(secret, Secret):
                    raise TypeError(f"secrets holds Secret objects, not {type(secret).__name__}")
            body["secrets"] = [secret.to_json() for secret in secrets]
        if volumes:
            for path, volume in volumes.items():
                if not isinstance(path, str) or not isinstance(volume, Volume):
                    raise TypeError("volumes maps a path (str) to a Volume")
            body["volumes"] = {path: volume.to_json() for path, volume in volumes.items()}
        if snapshot is not None:
            if not isinstance(snapshot, SandboxSnapshot):
                raise TypeError(f"snapshot is a SandboxSnapshot, not {type(snapshot).__name__}")
            body["snapshot"] = snapshot.to_json()
        for key, value in (("cpu", cpu), ("memory", memory), ("max_processes", max_processes)):
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError(f"{key} is a number, not {type(value).__name__}")
                body[key] = float(value) if key == "cpu" else int(value)
        if block_network:
            body["block_network"] = True
        if cidr_allowlist is not None:
            if isinstance(cidr_allowlist, str) or not all(isinstance(c, str) for c in cidr_allowlist):
                raise TypeError("cidr_allowlist is a list of CIDR strings, e.g. ['203.0.113.0/24']")
            body["cidr_allowlist"] = list(cidr_allowlist)
        info = transport.call("POST", "/v1/sandboxes", body)
        return cls(info["sandbox_id"], _transport=transport, _info=info)

    @classmethod
    def lookup(cls, sandbox_id: str) -> "Sandbox":
        """Resolve a sandbox by its ID, e.g. to reconnect after a network
        interruption. Raises ``NotFoundError`` if the sandbox ID is unknown or
        has already been terminated."""
        if not isinstance(sandbox_id, str) or not sandbox_id:
            raise NotFoundError(f"no sandbox {sandbox_id!r}", status=None)
        transport = Transport.from_env()
        info = transport.call("GET", f"/v1/sandboxes/{_quote(sandbox_id)}")
        return cls(info["sandbox_id"], _transport=transport, _info=info)

    # -- running things --------------------------------------------------------

    def exec(
        self,
        cmd: object = (),
        env: Optional[Mapping[str, str]] = None,
        workdir: Optional[str] = None,
    ) -> SandboxProcess:
        """Run another command inside this sandbox and return its process
        handle. The sandbox must still be alive. Multiple ``exec()`` calls share
        the same filesystem and process namespace.

        ``cmd`` is an argv or one string (run as ``/bin/sh -c cmd``).
        """
        body: Dict[str, Any] = {"cmd": _argv(cmd, "cmd")}
        if env is not None:
            body["env"] = _env(env)
        if workdir is not None:
            body["workdir"] = _workdir(workdir)
        info = self._transport.call("POST", f"{self._path}/exec", body)
        return SandboxProcess(self._sandbox_id, int(info["process_id"]), _transport=self._transport)

    def _entry_process(self) -> SandboxProcess:
        if self._entry is None:
            self._entry = SandboxProcess(self._sandbox_id, _ENTRY_PROCESS_ID, _transport=self._transport)
        return self._entry

    @property
    def stdout(self) -> StreamReader:
        """The entry command's standard output."""
        return self._entry_process().stdout

    @property
    def stderr(self) -> StreamReader:
        """The entry command's standard error."""
        return self._entry_process().stderr

    @property
    def stdin(self) -> StreamWriter:
        """The entry command's standard input."""
        return self._entry_process().stdin

    # -- lifecycle ---------------------------------------------------------------

    def wait(self, timeout: Optional[float] = None) -> int:
        """Block until the entry command exits. Returns the exit code. Raises
        ``TimeoutError`` (:class:`SandboxTimeoutError`) if timeout elapses
        before the process exits."""
        if self._returncode is None:
            code = _wait(self._transport, f"{self._path}/wait", timeout, f"sandbox {self._sandbox_id}")
            if code is None:
                self.poll()  # raises SandboxStartFailedError with the daemon's reason
                raise SandboxStartFailedError(f"sandbox {self._sandbox_id} failed before its entry command ran")
            self._returncode = code
        return self._returncode

    def poll(self) -> Optional[int]:
        """Non-blocking check. Returns the exit code if the entry command has
        finished, or ``None`` if it is still running."""
        if self._returncode is None:
            info = self._transport.call("GET", self._path)
            self._info = info
            if info.get("state") == "exited":
                if info.get("exit_code") is None:
                    reason = info.get("message") or f"exited ({info.get('reason')}) without an exit code"
                    raise SandboxStartFailedError(f"sandbox {self._sandbox_id} failed: {reason}")
                self._returncode = int(info["exit_code"])
        return self._returncode

    @property
    def exit_reason(self) -> Optional[str]:
        """Why the sandbox ended: ``"exited"`` (its entry command did),
        ``"timeout"``, ``"oom"`` (over its memory limit), ``"failed"``; ``None``
        while it runs."""
        info = self._transport.call("GET", self._path)
        self._info = info
        return info.get("reason") if info.get("state") == "exited" else None

    @property
    def returncode(self) -> Optional[int]:
        """The entry command's exit code if it has finished, else ``None``."""
        return self.poll()

    def terminate(self) -> None:
        """Stop the sandbox immediately and remove it from the registry.
        Releases all resources. Idempotent — safe to call on an
        already-stopped sandbox."""
        try:
            self._transport.call("DELETE", self._path)
        except NotFoundError:
            pass

    def snapshot(self) -> SandboxSnapshot:
        """Capture a memory checkpoint of the running sandbox. The snapshot can
        be passed as ``snapshot=`` to ``Sandbox.create()`` to restore the
        container state on the next invocation, skipping cold-start setup."""
        info = self._transport.call("POST", f"{self._path}/snapshot")
        return SandboxSnapshot(info["snapshot_id"], info)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.terminate()
