"""Images: the root filesystems a sandbox can start from.

An :class:`Image` is a description, a base plus ordered steps, built by the
daemon into cached layers the first time it is used::

    image = (
        Image.debian_slim()
        .apt_install("jq")
        .pip_install("requests")
        .add_local_file("main.py", "/app/main.py")
        .workdir("/app")
    )
    sb = Sandbox.create("python3 main.py", image=image)

The same description is the same image: a second build is a cache hit that
runs nothing. Files added with ``add_local_*`` are part of the description
by content.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import sys
import tarfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .exceptions import GworkerError, ImageBuildError, RegistryError, error_from_response

__all__ = ["Image", "ImageBuildError", "DEFAULT_IMAGE", "SUPPORTED_PYTHON_VERSIONS"]

#: The image used when ``Sandbox.create(image=None)``.
DEFAULT_IMAGE = "debian-slim"
#: Python versions ``Image.debian_slim()`` can provide, and the Debian release shipping each.
SUPPORTED_PYTHON_VERSIONS: Tuple[str, ...] = ("3.11", "3.13")
_DEBIAN_RELEASE = {"3.11": "bookworm", "3.13": "trixie"}
_BUILTIN_FOR_PYTHON = {"3.11": "debian-slim", "3.13": "debian-slim-trixie"}


def _check_remote(remote: str, what: str) -> str:
    if not isinstance(remote, str) or not remote.startswith("/"):
        raise ValueError(f"{what} must be an absolute path in the image, got {remote!r}")
    if ".." in remote.split("/"):
        raise ValueError(f"{what} {remote!r} contains '..', which could escape the image")
    if "\0" in remote:
        raise ValueError(f"{what} contains a NUL byte")
    return remote


def _words(kind: str, items: Sequence[object]) -> List[str]:
    out: List[str] = []
    for item in items:
        if isinstance(item, (list, tuple)):
            out.extend(_words(kind, item))
            continue
        if not isinstance(item, str) or not item:
            raise TypeError(f"{kind} takes non-empty strings, got {item!r}")
        out.append(item)
    if not out:
        raise ValueError(f"{kind} needs at least one argument")
    return out


def _tar_of(local: str, arcname: Optional[str]) -> bytes:
    """A deterministic tar: sorted entries, mtime 0, owner 0:0, permission
    bits kept. ``arcname`` set: one file under that name; else a directory's
    contents."""
    buf = io.BytesIO()

    def add(tf: tarfile.TarFile, path: str, name: str) -> None:
        info = tf.gettarinfo(path, arcname=name)
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode &= 0o7777
        if info.isreg():
            with open(path, "rb") as f:
                tf.addfile(info, f)
        elif info.isdir() or info.issym():
            tf.addfile(info)

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        if arcname is not None:
            add(tf, local, arcname)
        else:
            for root, dirs, files in os.walk(local):
                dirs.sort()
                rel_root = os.path.relpath(root, local)
                for name in sorted(dirs + files):
                    path = os.path.join(root, name)
                    rel = name if rel_root == "." else posixpath.join(rel_root.replace(os.sep, "/"), name)
                    add(tf, path, rel)
    return buf.getvalue()


class Image:
    """An image: a base (:meth:`debian_slim`, :meth:`from_registry`,
    :meth:`from_name`) plus build steps. Every method returns a new Image."""

    __slots__ = ("_base", "_steps", "_built")

    #: Print build output as it arrives (also ``GWORKER_BUILD_QUIET=1`` silences it).
    show_build_output: bool = os.environ.get("GWORKER_BUILD_QUIET", "") in ("", "0")

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("an image name is a non-empty string")
        self._base: Dict[str, Any] = {"name": name}
        self._steps: Tuple[Tuple[str, Any], ...] = ()
        self._built: Optional[str] = None

    # -- bases -----------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str) -> "Image":
        """An image the daemon knows by name: ``busybox``, ``debian-slim``, an
        image ID, or a tag given to a built image."""
        return cls(name)

    @classmethod
    def debian_slim(cls, python_version: Optional[str] = None) -> "Image":
        """A minimal Debian with Python and pip: Python 3.11 (Debian bookworm,
        the default) or 3.13 (Debian trixie). Another version raises
        ``ValueError`` listing the supported ones."""
        if python_version is not None and python_version not in SUPPORTED_PYTHON_VERSIONS:
            raise ValueError(
                f"python_version {python_version!r} is not available in debian_slim; supported: "
                + ", ".join(f"{v} (Debian {_DEBIAN_RELEASE[v]})" for v in SUPPORTED_PYTHON_VERSIONS)
            )
        return cls(_BUILTIN_FOR_PYTHON[python_version or "3.11"])

    @classmethod
    def from_registry(cls, reference: str, secret: Optional[Any] = None) -> "Image":
        """An image from an OCI / Docker registry, e.g. ``"python:3.12-slim"``
        or ``"127.0.0.1:5000/team/tool:1.0"``. ``secret`` is a stored
        :class:`Secret` (``Secret.from_name``) holding ``REGISTRY_USERNAME``
        and ``REGISTRY_PASSWORD``. The pull is cached by reference; ``gworker
        image pull`` fetches it again."""
        if not isinstance(reference, str) or not reference.strip():
            raise ValueError("a registry reference is a non-empty string")
        img = cls.__new__(cls)
        base: Dict[str, Any] = {"reference": reference}
        if secret is not None:
            name = getattr(secret, "name", None)
            if not isinstance(name, str):
                raise TypeError("secret must be a stored Secret (Secret.from_name(...))")
            base["secret"] = name
        img._base = {"registry": base}
        img._steps = ()
        img._built = None
        return img

    # -- steps -------------------------------------------------------------------

    def _with(self, kind: str, payload: Any) -> "Image":
        img = Image.__new__(Image)
        img._base = self._base
        img._steps = self._steps + ((kind, payload),)
        img._built = None
        return img

    def apt_install(self, *packages: str) -> "Image":
        """Install Debian packages (the build step gets network access)."""
        return self._with("apt_install", _words("apt_install", packages))

    def pip_install(self, *packages: str) -> "Image":
        """Install Python packages with pip (the build step gets network access)."""
        return self._with("pip_install", _words("pip_install", packages))

    def run_commands(self, *commands: str) -> "Image":
        """Run shell commands in order (``/bin/sh``, no network); a failing one fails the build."""
        return self._with("run_commands", _words("run_commands", commands))

    def env(self, vars: Mapping[str, str]) -> "Image":
        """Set environment variables of the image's processes."""
        if not isinstance(vars, Mapping):
            raise TypeError("env takes a mapping of names to values")
        for k, v in vars.items():
            if not isinstance(k, str) or not k or "=" in k or not isinstance(v, str):
                raise ValueError(f"bad environment variable {k!r}={v!r}")
        return self._with("env", dict(vars))

    def workdir(self, path: str) -> "Image":
        """Set (and create) the default working directory."""
        return self._with("workdir", _check_remote(path, "workdir"))

    def add_local_file(self, local_path: str, remote_path: str) -> "Image":
        """Copy a local file into the image at ``remote_path`` (absolute)."""
        local = os.fspath(local_path)
        _check_remote(remote_path, "remote_path")
        if remote_path.endswith("/"):
            raise ValueError(f"remote_path {remote_path!r} names a directory; give the file's path")
        if not os.path.isfile(local):
            raise FileNotFoundError(f"add_local_file: {local!r} is not a file")
        return self._with("add_local_file", (os.path.abspath(local), remote_path))

    def add_local_dir(self, local_path: str, remote_path: str) -> "Image":
        """Copy a local directory's contents into the image at ``remote_path`` (absolute)."""
        local = os.fspath(local_path)
        _check_remote(remote_path, "remote_path")
        if not os.path.isdir(local):
            raise FileNotFoundError(f"add_local_dir: {local!r} is not a directory")
        return self._with("add_local_dir", (os.path.abspath(local), remote_path))

    # -- building ------------------------------------------------------------------

    @property
    def name(self) -> str:
        """What ``Sandbox.create`` sends: the name of a plain image, or the
        ID of a built one (``build()`` first)."""
        if self._built is not None:
            return self._built
        if "name" in self._base and not self._steps:
            return str(self._base["name"])
        raise ValueError("this image has to be built first: call build()")

    def _needs_build(self) -> bool:
        return self._built is None and not ("name" in self._base and not self._steps)

    def _wire_steps(self, upload: Callable[[bytes], str]) -> List[Dict[str, Any]]:
        steps: List[Dict[str, Any]] = []
        for kind, payload in self._steps:
            if kind == "add_local_file":
                local, remote = payload
                if not os.path.isfile(local):
                    raise FileNotFoundError(f"add_local_file: {local!r} is not a file")
                blob = upload(_tar_of(local, posixpath.basename(remote)))
                steps.append({"add_files": {"blob": blob, "dest": posixpath.dirname(remote) or "/"}})
            elif kind == "add_local_dir":
                local, remote = payload
                if not os.path.isdir(local):
                    raise FileNotFoundError(f"add_local_dir: {local!r} is not a directory")
                steps.append({"add_files": {"blob": upload(_tar_of(local, None)), "dest": remote}})
            else:
                steps.append({kind: payload})
        return steps

    def build(self, *, tag: Optional[str] = None, quiet: Optional[bool] = None) -> str:
        """Build the image (a cache hit costs milliseconds) and return its ID.
        Build output is printed to stderr as it arrives unless ``quiet``.
        A failed build raises :class:`ImageBuildError`."""
        from ._transport import Transport

        transport = Transport.from_env()
        return self._build(transport, tag=tag, quiet=quiet)

    def _build(self, transport: Any, *, tag: Optional[str] = None, quiet: Optional[bool] = None) -> str:
        show = (not quiet) if quiet is not None else Image.show_build_output

        def upload(data: bytes) -> str:
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            transport.call(
                "POST",
                f"/v1/images/blobs?digest={digest}",
                raw_body=data,
                content_type="application/x-tar",
                timeout=None,
            )
            return digest

        spec = {"base": self._base, "steps": self._wire_steps(upload)}
        body: Dict[str, Any] = {"spec": spec}
        if tag is not None:
            body["tag"] = tag
        image_id = _run_build(transport, "/v1/images/build", body, show)
        self._built = image_id
        return image_id

    # -- identity ------------------------------------------------------------------

    def _key(self) -> Tuple[str, str]:
        return (json.dumps(self._base, sort_keys=True), json.dumps(self._steps, sort_keys=True, default=list))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Image) and other._key() == self._key()

    def __hash__(self) -> int:
        return hash(("Image",) + self._key())

    def __repr__(self) -> str:
        if "name" in self._base:
            r = f"Image.from_name({self._base['name']!r})"
        else:
            r = f"Image.from_registry({self._base['registry']['reference']!r})"
        for kind, payload in self._steps:
            r += f".{kind}({payload!r})"
        return r


def _run_build(transport: Any, path: str, body: Dict[str, Any], show: bool) -> str:
    """POST a build or pull and follow its NDJSON events to the end."""
    conn, resp = transport.open_post_stream(path, json.dumps(body).encode())
    last: Optional[Dict[str, Any]] = None
    try:
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            ev = json.loads(line)
            last = ev
            kind = ev.get("event")
            if not show:
                continue
            if kind == "step":
                cached = " (cached)" if ev.get("cached") else ""
                print(f"[{ev['index']}/{ev['total']}] {ev['description']}{cached}", file=sys.stderr, flush=True)
            elif kind == "log":
                print(f"    {ev['line']}", file=sys.stderr, flush=True)
            elif kind == "progress":
                total = ev.get("total")
                mb = ev["bytes"] / 1e6
                of = f"/{total / 1e6:.1f}" if total else ""
                print(f"    {ev['layer'][:19]} {mb:.1f}{of} MB", file=sys.stderr, flush=True)
            elif kind == "done":
                print(f"image {ev['image']['image_id']} ready in {ev['seconds']:.2f} s", file=sys.stderr, flush=True)
    finally:
        conn.close()
    if last is None:
        raise GworkerError("the daemon ended the build without a result")
    if last.get("event") == "done":
        return str(last["image"]["image_id"])
    if last.get("event") == "error":
        err = last.get("error") or {}
        code = err.get("code") or "image_build_failed"
        message = err.get("message") or "the image build failed"
        output = last.get("output")
        if code in ("image_build_failed", "registry_failed"):
            if output:
                message = f"{message}\n--- last output ---\n{output}"
            cls = RegistryError if code == "registry_failed" else ImageBuildError
            raise cls(message, code=code, exit_code=last.get("exit_code"), output=output)
        raise error_from_response(422, code, message)
    raise GworkerError("the daemon ended the build without a result")
