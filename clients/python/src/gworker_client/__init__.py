"""gworker_client: the Python client of gworker, a self-hosted gVisor sandbox
service.

    from gworker_client import Sandbox, Image

    with Sandbox.create(image=Image.from_name("busybox")) as sb:
        p = sb.exec(["echo", "hello"])
        print(p.stdout.read(), p.wait())

The daemon is found through ``GWORKER_URL`` (``unix:///path`` or
``http://host:port``, with ``GWORKER_TOKEN`` over TCP), else its default socket
(see :func:`default_socket_path`).
"""

from ._streams import StreamReader, StreamWriter
from ._transport import default_socket_path, resolve_url
from .exceptions import (
    CommandNotFoundError,
    ConflictError,
    DaemonUnavailableError,
    ExecFailedError,
    GworkerError,
    InternalError,
    InvalidRequestError,
    NoSpaceError,
    NotFoundError,
    NotSupportedError,
    OutputDiscardedError,
    PayloadTooLargeError,
    RegistryError,
    SandboxNotRunningError,
    SandboxStartFailedError,
    SandboxTimeoutError,
    SnapshotCorruptError,
    SnapshotError,
    SnapshotFailedError,
    SnapshotIncompatibleError,
    UnauthorizedError,
    WorkdirNotFoundError,
)
from .image import Image, ImageBuildError
from .sandbox import Sandbox, SandboxProcess, SandboxSnapshot
from .secret import Secret
from .volume import Volume, VolumeEntry

__version__ = "0.1.0"

__all__ = [
    "Sandbox",
    "SandboxProcess",
    "SandboxSnapshot",
    "Image",
    "ImageBuildError",
    "RegistryError",
    "Secret",
    "Volume",
    "VolumeEntry",
    "StreamReader",
    "StreamWriter",
    "default_socket_path",
    "resolve_url",
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
    "NoSpaceError",
    "SnapshotError",
    "SnapshotFailedError",
    "SnapshotCorruptError",
    "SnapshotIncompatibleError",
    "InternalError",
    "SandboxStartFailedError",
    "DaemonUnavailableError",
    "__version__",
]
