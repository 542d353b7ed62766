"""Exceptions raised by the gworker client.

Every error the daemon reports carries a stable ``code`` (see the HTTP API's
error table); each code maps to one class here. All of them derive from
:class:`GworkerError` and keep ``.code``, ``.status`` (the HTTP status, or
``None`` when the error never reached the daemon) and ``.message``.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

__all__ = [
    "GworkerError",
    "InvalidRequestError",
    "NotSupportedError",
    "UnauthorizedError",
    "NotFoundError",
    "ExecFailedError",
    "WorkdirNotFoundError",
    "CommandNotFoundError",
    "SandboxTimeoutError",
    "SandboxNotRunningError",
    "OutputDiscardedError",
    "PayloadTooLargeError",
    "ConflictError",
    "SnapshotError",
    "SnapshotFailedError",
    "SnapshotCorruptError",
    "SnapshotIncompatibleError",
    "InternalError",
    "RegistryError",
    "ImageBuildError",
    "SandboxStartFailedError",
    "DaemonUnavailableError",
    "error_from_response",
]


class GworkerError(Exception):
    """Base class of every error raised by the gworker client."""

    #: The stable error code this class stands for (``None`` for the base class).
    default_code: Optional[str] = None

    def __init__(self, message: str, *, code: Optional[str] = None, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.message: str = message
        self.code: Optional[str] = code if code is not None else self.default_code
        self.status: Optional[int] = status

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status!r}, message={self.message!r})"


class InvalidRequestError(GworkerError):
    """The request was malformed: bad argv, env name, relative workdir, ..."""

    default_code = "invalid_request"


class NotSupportedError(GworkerError):
    """The API accepts this feature but the daemon does not implement it yet
    (secrets, volumes, snapshots)."""

    default_code = "not_supported"


class UnauthorizedError(GworkerError):
    """A TCP request without the right bearer token (``GWORKER_TOKEN``)."""

    default_code = "unauthorized"


class NotFoundError(GworkerError):
    """The sandbox ID is unknown or has already been terminated (or an unknown
    process or image)."""

    default_code = "not_found"


class ExecFailedError(GworkerError):
    """A command could not be started inside the sandbox."""

    default_code = "exec_failed"


class WorkdirNotFoundError(ExecFailedError):
    """``exec`` with a ``workdir`` that does not exist in the sandbox."""

    default_code = "workdir_not_found"


class CommandNotFoundError(ExecFailedError):
    """``exec`` of a program that does not exist in the sandbox."""

    default_code = "command_not_found"


class SandboxTimeoutError(GworkerError, TimeoutError):
    """The timeout elapsed before the process exited (a built-in ``TimeoutError``)."""

    default_code = "wait_timeout"


class SandboxNotRunningError(GworkerError):
    """exec / stdin / signal on a sandbox that has already exited."""

    default_code = "sandbox_not_running"


class OutputDiscardedError(GworkerError):
    """A stream read from an offset older than what the daemon still keeps."""

    default_code = "output_discarded"


class PayloadTooLargeError(GworkerError):
    """A request body over the daemon's limit (16 MiB)."""

    default_code = "payload_too_large"


class ConflictError(GworkerError):
    """The request conflicts with work in progress (e.g. a snapshot already
    being taken)."""

    default_code = "conflict"


class NoSpaceError(GworkerError, OSError):
    """A write into a volume went over its quota (or the host disk is full)."""

    default_code = "no_space"


class SnapshotError(GworkerError):
    """Base class of the errors about snapshots."""


class SnapshotFailedError(SnapshotError):
    """Taking a snapshot failed on the daemon's side."""

    default_code = "snapshot_failed"


class SnapshotCorruptError(SnapshotError):
    """A snapshot's files do not match their recorded content hash."""

    default_code = "snapshot_corrupt"


class SnapshotIncompatibleError(SnapshotError):
    """A snapshot cannot be restored here (different runsc, image or CPU)."""

    default_code = "snapshot_incompatible"


class ImageBuildError(GworkerError):
    """An image build failed: a step's command exited non-zero (``exit_code``,
    and the last lines of its output in ``output``), a package is unknown, a
    registry could not be reached, ..."""

    default_code = "image_build_failed"

    def __init__(
        self,
        message: str,
        *,
        code: Optional[str] = None,
        status: Optional[int] = None,
        exit_code: Optional[int] = None,
        output: Optional[str] = None,
    ) -> None:
        super().__init__(message, code=code, status=status)
        self.exit_code: Optional[int] = exit_code
        self.output: Optional[str] = output


class RegistryError(ImageBuildError):
    """A registry could not be reached, refused the pull, or sent bad data."""

    default_code = "registry_failed"


class InternalError(GworkerError):
    """A bug in the daemon; never expected."""

    default_code = "internal"


class SandboxStartFailedError(GworkerError):
    """The sandbox could not be started (image build failed, runsc failed)."""

    default_code = "sandbox_starting_failed"


class DaemonUnavailableError(GworkerError, ConnectionError):
    """The gworker daemon could not be reached (a built-in ``ConnectionError``)."""

    default_code = "daemon_unavailable"


_BY_CODE: Dict[str, Type[GworkerError]] = {
    cls.default_code: cls
    for cls in (
        InvalidRequestError,
        NotSupportedError,
        UnauthorizedError,
        NotFoundError,
        ExecFailedError,
        WorkdirNotFoundError,
        CommandNotFoundError,
        SandboxTimeoutError,
        SandboxNotRunningError,
        OutputDiscardedError,
        PayloadTooLargeError,
        ConflictError,
        NoSpaceError,
        SnapshotFailedError,
        SnapshotCorruptError,
        SnapshotIncompatibleError,
        InternalError,
        SandboxStartFailedError,
        ImageBuildError,
        RegistryError,
    )
}


def error_from_response(status: int, code: Optional[str], message: str) -> GworkerError:
    """Build the exception for an error answer of the daemon.

    An unknown code gives a plain :class:`GworkerError` that still carries it.
    """
    cls = _BY_CODE.get(code or "", GworkerError)
    return cls(message, code=code, status=status)
