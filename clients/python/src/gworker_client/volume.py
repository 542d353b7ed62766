"""Volumes: named, persistent directories kept by the daemon and mounted
read-write into sandboxes (``Sandbox.create(volumes={"/data": vol})``), with
host-side access to their files. See ``docs/volumes.md``.

    vol = Volume.from_name("models", create_if_missing=True)
    vol.write_file("/config.json", b"{}")
    with Sandbox.create(volumes={"/models": vol}) as sb:
        ...
    for entry in vol.listdir("/"):
        print(entry.path, entry.type, entry.size)
    data = b"".join(vol.read_file("/out/result.bin"))

Paths inside a volume are relative to its root (a leading ``/`` is the
volume's root); ``..`` is refused and symlinks resolve inside the volume.
"""

from __future__ import annotations

import http.client
import os
from typing import IO, Any, Dict, Iterator, List, Optional, Union
from urllib.parse import quote

from ._transport import Transport
from .exceptions import DaemonUnavailableError, GworkerError

__all__ = ["Volume", "VolumeEntry"]

_CHUNK = 1 << 20


class VolumeEntry:
    """One entry of :meth:`Volume.listdir`: ``path`` (from the volume's root,
    without a leading ``/``), ``type`` (``file``, ``dir``, ``symlink``,
    ``other``), ``size`` (bytes) and ``mtime`` (Unix time)."""

    __slots__ = ("path", "type", "size", "mtime")

    def __init__(self, path: str, type: str, size: int, mtime: float) -> None:
        self.path, self.type, self.size, self.mtime = path, type, size, mtime

    def __repr__(self) -> str:
        return f"VolumeEntry(path={self.path!r}, type={self.type!r}, size={self.size})"


def _q(path: str) -> str:
    return quote(path, safe="")


class Volume:
    """A named volume on the daemon."""

    __slots__ = ("name", "create_if_missing", "_transport", "_ensured")

    def __init__(self, name: str, create_if_missing: bool = False, *, _transport: Optional[Transport] = None) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("a volume name is a non-empty string")
        self.name: str = name
        self.create_if_missing: bool = bool(create_if_missing)
        self._transport = _transport
        self._ensured = False

    # -- handles ---------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str, create_if_missing: bool = False) -> "Volume":
        """The volume called ``name``. With ``create_if_missing`` it is created
        (without quota) on first use: by ``Sandbox.create`` or a file method.
        Otherwise using a missing volume raises ``NotFoundError``."""
        return cls(name, create_if_missing)

    @classmethod
    def create(cls, name: str, *, quota_bytes: Optional[int] = None, exist_ok: bool = False) -> "Volume":
        """Create a volume now. ``quota_bytes`` (at least 16 MiB) limits its size:
        writes past it fail with ENOSPC inside sandboxes (``NoSpaceError`` from
        the file methods). ``ConflictError`` if it exists and not ``exist_ok``."""
        t = Transport.from_env()
        body: Dict[str, Any] = {"name": name, "exist_ok": bool(exist_ok)}
        if quota_bytes is not None:
            body["quota_bytes"] = int(quota_bytes)
        t.call("POST", "/v1/volumes", body)
        v = cls(name, _transport=t)
        v._ensured = True
        return v

    @classmethod
    def list(cls) -> "List[Volume]":
        """Every volume of the daemon."""
        t = Transport.from_env()
        return [cls(v["name"], _transport=t) for v in t.call("GET", "/v1/volumes")["volumes"]]

    @staticmethod
    def delete(name: str) -> None:
        """Delete the volume ``name`` and every file in it (``ConflictError``
        while a running sandbox mounts it; ``NotFoundError`` if unknown)."""
        Transport.from_env().call("DELETE", f"/v1/volumes/{_q(name)}")

    def info(self) -> Dict[str, Any]:
        """``{"name", "created_at", "quota_bytes"}``."""
        self._ensure()
        return self._t().call("GET", f"/v1/volumes/{_q(self.name)}")

    def to_json(self) -> Dict[str, Any]:
        """The volume as it goes into the create request."""
        return {"name": self.name, "create_if_missing": self.create_if_missing}

    def __repr__(self) -> str:
        return f"Volume.from_name({self.name!r}, create_if_missing={self.create_if_missing})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Volume) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("Volume", self.name))

    # -- files -----------------------------------------------------------------

    def _t(self) -> Transport:
        if self._transport is None:
            self._transport = Transport.from_env()
        return self._transport

    def _ensure(self) -> None:
        if self.create_if_missing and not self._ensured:
            self._t().call("POST", "/v1/volumes", {"name": self.name, "exist_ok": True})
            self._ensured = True

    def _url(self, what: str, path: str, recursive: bool = False) -> str:
        url = f"/v1/volumes/{_q(self.name)}/{what}?path={_q(path)}"
        return url + ("&recursive=true" if recursive else "")

    def listdir(self, path: str = "/", recursive: bool = False) -> List[VolumeEntry]:
        """Entries of the directory ``path`` (or the one file ``path``)."""
        self._ensure()
        data = self._t().call("GET", self._url("files", path, recursive))
        return [VolumeEntry(e["path"], e["type"], e["size"], e["mtime"]) for e in data["entries"]]

    def read_file(self, path: str) -> Iterator[bytes]:
        """The file's content, streamed in chunks: ``b"".join(vol.read_file(p))``."""
        self._ensure()
        conn, resp = self._t().open_stream(self._url("file", path))

        def chunks() -> Iterator[bytes]:
            try:
                while True:
                    try:
                        b = resp.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as e:
                        raise self._t().unavailable(f"connection lost: {e!r}") from e
                    if not b:
                        return
                    yield b
            finally:
                conn.close()

        return chunks()

    def read_file_into_fileobj(self, path: str, fileobj: IO[bytes]) -> int:
        """Write the file's content into ``fileobj``; returns the byte count."""
        n = 0
        for b in self.read_file(path):
            fileobj.write(b)
            n += len(b)
        return n

    def write_file(self, path: str, data: Union[bytes, bytearray, str, IO[bytes]]) -> None:
        """Write ``data`` (bytes, str as UTF-8, or a binary file object, streamed)
        to ``path``, creating parent directories. The file is replaced
        atomically and is on disk (fsynced) when this returns."""
        self._ensure()
        if isinstance(data, str):
            data = data.encode()
        t = self._t()
        conn = t._new_connection(None)
        try:
            t._connect(conn)
            headers = t._headers("application/octet-stream")
            if isinstance(data, (bytes, bytearray)):
                headers["Content-Length"] = str(len(data))
            try:
                conn.request("PUT", self._url("file", path), body=data, headers=headers)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon answered early (e.g. quota exceeded): read why
            resp = conn.getresponse()
            body = resp.read()
        except DaemonUnavailableError:
            raise
        except (OSError, http.client.HTTPException) as e:
            raise t.unavailable(f"connection lost: {e!r}") from e
        finally:
            conn.close()
        if resp.status >= 300:
            raise t.error(resp.status, body)

    def mkdir(self, path: str) -> None:
        """Make the directory ``path`` and its parents."""
        self._ensure()
        self._t().call("PUT", self._url("dir", path))

    def remove_file(self, path: str, recursive: bool = False) -> None:
        """Remove a file, symlink or empty directory (any directory with
        ``recursive=True``)."""
        self._ensure()
        self._t().call("DELETE", self._url("file", path, recursive))

    def put_file(self, local_path: Union[str, "os.PathLike[str]"], remote_path: str) -> None:
        """Upload one local file (streamed)."""
        with open(local_path, "rb") as f:
            self.write_file(remote_path, f)

    def put_directory(self, local_path: Union[str, "os.PathLike[str]"], remote_path: str) -> int:
        """Upload a local directory recursively (symlinks are skipped); returns
        the number of files uploaded."""
        n = 0
        local_path = os.fspath(local_path)
        self.mkdir(remote_path)
        for root, dirs, files in os.walk(local_path):
            rel = os.path.relpath(root, local_path)
            base = remote_path.rstrip("/") + ("" if rel == "." else "/" + rel.replace(os.sep, "/"))
            for d in dirs:
                if not os.path.islink(os.path.join(root, d)):
                    self.mkdir(f"{base}/{d}")
            for name in files:
                full = os.path.join(root, name)
                if os.path.islink(full) or not os.path.isfile(full):
                    continue
                self.put_file(full, f"{base}/{name}")
                n += 1
        return n

    def upload(self, local_path: Union[str, "os.PathLike[str]"], remote_path: str) -> int:
        """Upload a local file or directory; returns the number of files."""
        if os.path.isdir(local_path):
            return self.put_directory(local_path, remote_path)
        self.put_file(local_path, remote_path)
        return 1

    def download(self, remote_path: str, local_path: Union[str, "os.PathLike[str]"]) -> int:
        """Download a file or directory (recursively) of the volume to
        ``local_path``; returns the number of files."""
        local_path = os.fspath(local_path)
        top = self.listdir(remote_path)
        base = remote_path.strip("/")
        if len(top) == 1 and top[0].type == "file" and top[0].path == base:
            os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
            with open(local_path, "wb") as f:
                self.read_file_into_fileobj(remote_path, f)
            return 1
        n = 0
        os.makedirs(local_path, exist_ok=True)
        for e in self.listdir(remote_path, recursive=True):
            rel = e.path[len(base):].lstrip("/") if base and e.path.startswith(base) else e.path
            dest = os.path.join(local_path, *rel.split("/"))
            if e.type == "dir":
                os.makedirs(dest, exist_ok=True)
            elif e.type == "file":
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with open(dest, "wb") as f:
                    self.read_file_into_fileobj(e.path, f)
                n += 1
        return n


_ = GworkerError  # re-exported errors live in .exceptions
