#!/usr/bin/env python3
"""A local OCI / Docker v2 registry for tests, and a test image to push to it.

Standard library only. Usable as a module (``sys.path.insert(0, <repo>/tests/registry)``
then ``import push``) and as a command line tool::

    # start a registry (blocks until Ctrl-C / SIGTERM; prints one JSON line)
    python3 tests/registry/serve.py --dir /tmp/reg
    # push the test image to it (prints one JSON line)
    python3 tests/registry/push.py http://127.0.0.1:PORT --name test/img --tag v1 [--index] [--oci] [--big-mb 1000]

Functions:

``start_registry(tmpdir, htpasswd=None) -> (url, Popen)``
    Runs Debian's ``docker-registry`` (package ``docker-registry``) on
    127.0.0.1:<free port> with filesystem storage in ``tmpdir/storage``;
    ``htpasswd`` is ``(user, password)`` (hashed with ``htpasswd -B`` from
    ``apache2-utils``) or the path of an existing bcrypt htpasswd file.
    Returns once ``/v2/`` answers. Stop it with ``stop_registry(proc)``.

``push_test_image(registry_url, name, tag, big_mb=0, index=False, ...) -> dict``
    Builds the test image and pushes its blobs and manifest. Returns
    ``manifest_digest`` (the linux/amd64 manifest), ``index_digest`` (the
    manifest list / OCI index when ``index``, else None), ``config_digest``,
    ``layers`` (compressed blob digests, bottom to top), ``diff_ids``,
    ``layer_sizes``, ``reference`` (``host:port/name:tag``), ``config``
    (the image config's ``config`` object).

The test image (``EXPECTED`` describes it for checks):

- layer "busybox" (if ``/bin/busybox`` exists and ``busybox=True``): a static
  busybox in ``/bin`` with its applet symlinks, so the image can run commands;
- layer "base": ``/etc/keep.txt``, ``/etc/deleted.txt`` (deleted above),
  ``/opq/old1.txt`` (hidden above by an opaque dir), ``/bin/hello``
  (0755 shell script), ``/bin/suid`` (04755), ``/home/user/owned.txt``
  (uid/gid 1000, 0640), ``/app/link`` (symlink to ``../etc/keep.txt``),
  ``/app/hard`` (hard link to ``/etc/keep.txt``), ``/app/data.txt`` ("v1");
- layer "top": whiteout ``/etc/.wh.deleted.txt``, opaque ``/opq/.wh..wh..opq``
  with ``/opq/new.txt``, ``/app/data.txt`` ("v2"), ``/etc/salt`` (``salt``);
  this layer is an *uncompressed* tar when ``oci=True`` (OCI media type);
- layer "big" (``big_mb > 0``): ``/big/data.bin`` of ``big_mb`` MiB of
  incompressible data, generated fast (a random pool, reshuffled), gzipped
  with stored (level 0) deflate blocks, so the blob is as big as the data and
  pushing 1000 MiB takes seconds; written through a temp file, never held in
  memory.

Config: ``Env`` PATH + ``GREETING=hello world`` + ``EMPTY=``, ``WorkingDir``
``/app``, ``User`` ``1000:1000``, ``Entrypoint`` ``["/bin/sh", "-c"]``,
``Cmd`` ``["echo hello"]``. Tars and gzip are deterministic: pushing twice
gives the same digests (use ``salt`` for distinct ones).

With ``index=True`` a manifest list (Docker) or OCI index (``oci=True``) is
pushed under the tag, listing linux/arm64 (a manifest with an arm64 config
and the same layers) first and then linux/amd64.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import http.client
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"

REGISTRY_BIN = os.environ.get("GWORKER_DOCKER_REGISTRY", "/usr/bin/docker-registry")
BUSYBOX = "/bin/busybox"
MTIME = 1_700_000_000

ENV = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "GREETING=hello world",
    "EMPTY=",
]

#: What a correct pull of the test image shows in the merged (overlay) view.
EXPECTED: Dict[str, Any] = {
    "absent": ["etc/deleted.txt", "opq/old1.txt"],
    "files": {
        "etc/keep.txt": b"keep me\n",
        "opq/new.txt": b"new in opaque dir\n",
        "app/data.txt": b"v2\n",
        "home/user/owned.txt": b"owned by 1000\n",
        "bin/hello": b"#!/bin/sh\necho hello\n",
    },
    "modes": {"bin/hello": 0o755, "bin/suid": 0o4755, "home/user/owned.txt": 0o640},
    "owners": {"home/user/owned.txt": (1000, 1000), "etc/keep.txt": (0, 0)},
    "symlinks": {"app/link": "../etc/keep.txt"},
    "hardlinks": [("app/hard", "etc/keep.txt")],
    "whiteouts": {"top": ["etc/deleted.txt"]},
    "opaque": {"top": ["opq"]},
    "env": ENV,
    "workdir": "/app",
    "user": "1000:1000",
    "entrypoint": ["/bin/sh", "-c"],
    "cmd": ["echo hello"],
}


# --- the registry ------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def registry_available() -> bool:
    return os.access(REGISTRY_BIN, os.X_OK)


def make_htpasswd(path: Path, user: str, password: str) -> None:
    """Write a bcrypt htpasswd file (the registry accepts bcrypt only)."""
    out = subprocess.run(
        ["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True
    ).stdout
    path.write_text(out.strip() + "\n")


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the process that started it exits."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


def start_registry(
    tmpdir: Union[str, Path],
    htpasswd: Union[None, Tuple[str, str], str, Path] = None,
    port: Optional[int] = None,
    timeout: float = 20.0,
) -> Tuple[str, subprocess.Popen]:
    """Start docker-registry on 127.0.0.1; returns ("http://127.0.0.1:PORT", Popen).

    Storage: ``tmpdir/storage``; config: ``tmpdir/config.yml``; log:
    ``tmpdir/registry.log``. The process gets SIGTERM when its parent exits.
    """
    if not registry_available():
        raise RuntimeError(f"{REGISTRY_BIN} not found: apt-get install docker-registry")
    tmp = Path(tmpdir)
    tmp.mkdir(parents=True, exist_ok=True)
    storage = tmp / "storage"
    storage.mkdir(exist_ok=True)
    auth = ""
    if htpasswd is not None:
        if isinstance(htpasswd, tuple):
            hpath = tmp / "htpasswd"
            make_htpasswd(hpath, htpasswd[0], htpasswd[1])
        else:
            hpath = Path(htpasswd)
        auth = f"auth:\n  htpasswd:\n    realm: gworker-test\n    path: {hpath}\n"
    last_err = ""
    for _attempt in range(5):
        p = port or free_port()
        config = tmp / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
            "  delete:\n    enabled: true\n"
            "  maintenance:\n    uploadpurging:\n      enabled: false\n"
            f"http:\n  addr: 127.0.0.1:{p}\n  secret: gworker-test-secret\n"
            f"{auth}"
        )
        log = open(tmp / "registry.log", "ab")
        proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        log.close()
        url = f"http://127.0.0.1:{p}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                status, _, _ = _request(url, "GET", "/v2/")
                if status in (200, 401):
                    return url, proc
            except OSError:
                pass
            time.sleep(0.05)
        stop_registry(proc)
        last_err = (tmp / "registry.log").read_text(errors="replace")[-2000:]
        if port:
            break
    raise RuntimeError(f"docker-registry did not start:\n{last_err}")


def stop_registry(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def blob_path(storage_dir: Union[str, Path], digest: str) -> Path:
    """The file holding blob ``digest`` in a filesystem-storage registry."""
    algo, hexd = digest.split(":", 1)
    return Path(storage_dir) / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"


# --- HTTP --------------------------------------------------------------------


def _request(
    base: str,
    method: str,
    path: str,
    body: Union[None, bytes, io.BufferedIOBase] = None,
    headers: Optional[Dict[str, str]] = None,
    auth: Optional[Tuple[str, str]] = None,
    length: Optional[int] = None,
) -> Tuple[int, Dict[str, str], bytes]:
    u = urllib.parse.urlsplit(base)
    if u.scheme != "http":
        raise ValueError(f"only http:// registries are supported here, got {base}")
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=300)
    h = dict(headers or {})
    if auth:
        h["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    if body is not None:
        h["Content-Length"] = str(length if length is not None else len(body))  # type: ignore[arg-type]
    try:
        conn.request(method, path, body=body, headers=h)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def _check(status: int, data: bytes, what: str, ok: Tuple[int, ...]) -> None:
    if status not in ok:
        raise RuntimeError(f"{what}: HTTP {status}: {data[:500]!r}")


def _location(base: str, loc: str) -> str:
    """Path+query of an upload Location header (absolute or relative)."""
    u = urllib.parse.urlsplit(urllib.parse.urljoin(base + "/", loc))
    return u.path + ("?" + u.query if u.query else "")


def push_blob(
    base: str,
    name: str,
    digest: str,
    data: Union[bytes, Path],
    auth: Optional[Tuple[str, str]] = None,
) -> None:
    """Upload one blob (bytes or a file, streamed) unless the registry has it."""
    status, _, _ = _request(base, "HEAD", f"/v2/{name}/blobs/{digest}", auth=auth)
    if status == 200:
        return
    status, hdrs, resp = _request(base, "POST", f"/v2/{name}/blobs/uploads/", body=b"", auth=auth)
    _check(status, resp, f"start upload of {digest}", (202,))
    loc = _location(base, hdrs["location"])
    sep = "&" if "?" in loc else "?"
    put = f"{loc}{sep}digest={urllib.parse.quote(digest)}"
    hdr = {"Content-Type": "application/octet-stream"}
    if isinstance(data, Path):
        size = data.stat().st_size
        with open(data, "rb") as f:
            status, _, resp = _request(base, "PUT", put, body=f, headers=hdr, auth=auth, length=size)
    else:
        status, _, resp = _request(base, "PUT", put, body=data, headers=hdr, auth=auth)
    _check(status, resp, f"upload of {digest}", (201,))


def push_manifest(
    base: str,
    name: str,
    ref: str,
    body: bytes,
    media_type: str,
    auth: Optional[Tuple[str, str]] = None,
) -> str:
    status, hdrs, resp = _request(
        base, "PUT", f"/v2/{name}/manifests/{ref}", body=body,
        headers={"Content-Type": media_type}, auth=auth,
    )
    _check(status, resp, f"manifest {name}:{ref}", (201,))
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    got = hdrs.get("docker-content-digest")
    if got and got != digest:
        raise RuntimeError(f"registry says manifest digest {got}, computed {digest}")
    return digest


# --- the image ---------------------------------------------------------------


class _Layer:
    def __init__(self, name: str, media_type: str, digest: str, diff_id: str, size: int,
                 data: Union[bytes, Path]):
        self.name, self.media_type, self.digest = name, media_type, digest
        self.diff_id, self.size, self.data = diff_id, size, data


class _HashWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through to ``inner``."""

    def __init__(self, inner: Any):
        self.inner, self.h, self.n = inner, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:  # type: ignore[override]
        b = bytes(b)
        self.h.update(b)
        self.n += len(b)
        if self.inner is not None:
            self.inner.write(b)
        return len(b)


def _info(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, size: int = 0,
          uid: int = 0, gid: int = 0, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.size, ti.uid, ti.gid = kind, mode, size, uid, gid
    ti.mtime, ti.linkname = MTIME, link
    ti.uname = ti.gname = ""
    return ti


def _add_file(tf: tarfile.TarFile, name: str, data: bytes, **kw: Any) -> None:
    tf.addfile(_info(name, size=len(data), **kw), io.BytesIO(data))


def _add_dir(tf: tarfile.TarFile, name: str, mode: int = 0o755, **kw: Any) -> None:
    tf.addfile(_info(name, kind=tarfile.DIRTYPE, mode=mode, **kw))


def _finish_layer(name: str, tar_bytes: bytes, compress: bool, oci: bool) -> _Layer:
    diff_id = "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    if compress:
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
            gz.write(tar_bytes)
        blob = buf.getvalue()
        media = MEDIA_OCI_LAYER_GZIP if oci else MEDIA_DOCKER_LAYER_GZIP
    else:
        blob = tar_bytes
        media = MEDIA_OCI_LAYER_TAR
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    return _Layer(name, media, digest, diff_id, len(blob), blob)


def _tar(build: Any) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        build(tf)
    return buf.getvalue()


def _busybox_layer(oci: bool) -> Optional[_Layer]:
    if not os.access(BUSYBOX, os.X_OK):
        return None
    data = Path(BUSYBOX).read_bytes()
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True).stdout.split()

    def build(tf: tarfile.TarFile) -> None:
        for d in ("bin", "tmp", "etc", "root", "proc", "dev", "sys"):
            _add_dir(tf, d, mode=0o1777 if d == "tmp" else 0o755)
        _add_file(tf, "bin/busybox", data, mode=0o755)
        for a in sorted(set(applets)):
            if a != "busybox" and "/" not in a:
                tf.addfile(_info(f"bin/{a}", kind=tarfile.SYMTYPE, mode=0o777, link="busybox"))

    return _finish_layer("busybox", _tar(build), True, oci)


def _base_layer(oci: bool) -> _Layer:
    def build(tf: tarfile.TarFile) -> None:
        for d in ("etc", "bin", "opq", "home", "app"):
            _add_dir(tf, d)
        _add_dir(tf, "home/user", mode=0o750, uid=1000, gid=1000)
        _add_file(tf, "etc/keep.txt", b"keep me\n")
        _add_file(tf, "etc/deleted.txt", b"delete me\n")
        _add_file(tf, "opq/old1.txt", b"hidden by the opaque dir\n")
        _add_file(tf, "bin/hello", b"#!/bin/sh\necho hello\n", mode=0o755)
        _add_file(tf, "bin/suid", b"#!/bin/sh\nid\n", mode=0o4755)
        _add_file(tf, "home/user/owned.txt", b"owned by 1000\n", mode=0o640, uid=1000, gid=1000)
        tf.addfile(_info("app/link", kind=tarfile.SYMTYPE, mode=0o777, link="../etc/keep.txt"))
        tf.addfile(_info("app/hard", kind=tarfile.LNKTYPE, link="etc/keep.txt"))
        _add_file(tf, "app/data.txt", b"v1\n")

    return _finish_layer("base", _tar(build), True, oci)


def _top_layer(oci: bool, salt: str) -> _Layer:
    def build(tf: tarfile.TarFile) -> None:
        _add_dir(tf, "etc")
        _add_file(tf, "etc/.wh.deleted.txt", b"")
        _add_file(tf, "etc/salt", salt.encode())
        _add_dir(tf, "opq")
        _add_file(tf, "opq/.wh..wh..opq", b"")
        _add_file(tf, "opq/new.txt", b"new in opaque dir\n")
        _add_dir(tf, "app")
        _add_file(tf, "app/data.txt", b"v2\n")

    # OCI: the top layer is an uncompressed tar, to cover that media type.
    return _finish_layer("top", _tar(build), not oci, oci)


def _big_layer(big_mb: int, oci: bool, workdir: Path, seed: int = 1) -> _Layer:
    """/big/data.bin of big_mb MiB, incompressible, gzip level 0, via a temp file."""
    size = big_mb * 1024 * 1024
    rnd = random.Random(seed)
    pool = rnd.randbytes(8 * 1024 * 1024)
    block = 64 * 1024
    path = workdir / f"big-{big_mb}.tar.gz"
    with open(path, "wb") as out:
        hw = _HashWriter(out)
        with gzip.GzipFile(filename="", mode="wb", fileobj=hw, mtime=0, compresslevel=0) as gz:
            dw = _HashWriter(gz)
            with tarfile.open(fileobj=dw, mode="w|", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
                _add_dir(tf, "big")

                class Gen(io.RawIOBase):
                    def __init__(self) -> None:
                        self.left = size
                        self.counter = 0

                    def readable(self) -> bool:
                        return True

                    def readinto(self, b: Any) -> int:
                        n = min(len(b), self.left, 1024 * 1024)
                        if n <= 0:
                            return 0
                        out = bytearray()
                        while len(out) < n:
                            off = rnd.randrange(0, len(pool) - block)
                            out += self.counter.to_bytes(8, "little") + pool[off : off + block - 8]
                            self.counter += 1
                        b[:n] = out[:n]
                        self.left -= n
                        return n

                tf.addfile(_info("big/data.bin", size=size), io.BufferedReader(Gen(), 1024 * 1024))
        diff_id = "sha256:" + dw.h.hexdigest()
    digest = "sha256:" + hw.h.hexdigest()
    media = MEDIA_OCI_LAYER_GZIP if oci else MEDIA_DOCKER_LAYER_GZIP
    return _Layer("big", media, digest, diff_id, hw.n, path)


def _config(arch: str, layers: List[_Layer]) -> Dict[str, Any]:
    return {
        "architecture": arch,
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {
            "Env": ENV,
            "WorkingDir": "/app",
            "User": "1000:1000",
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo hello"],
        },
        "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]},
        "history": [{"created_by": f"gworker test layer {l.name}"} for l in layers],
    }


def _manifest(config_blob: bytes, layers: List[_Layer], oci: bool) -> bytes:
    m = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST if oci else MEDIA_DOCKER_MANIFEST,
        "config": {
            "mediaType": MEDIA_OCI_CONFIG if oci else MEDIA_DOCKER_CONFIG,
            "size": len(config_blob),
            "digest": "sha256:" + hashlib.sha256(config_blob).hexdigest(),
        },
        "layers": [{"mediaType": l.media_type, "size": l.size, "digest": l.digest} for l in layers],
    }
    return json.dumps(m, indent=2).encode()


def push_test_image(
    registry_url: str,
    name: str,
    tag: str,
    big_mb: int = 0,
    index: bool = False,
    oci: bool = False,
    busybox: bool = True,
    salt: str = "",
    auth: Optional[Tuple[str, str]] = None,
    workdir: Optional[Union[str, Path]] = None,
) -> Dict[str, Any]:
    """Build and push the test image; see the module doc. ``auth``: Basic credentials."""
    base = registry_url.rstrip("/")
    tmp = Path(tempfile.mkdtemp(prefix="gw-push-", dir=workdir))
    try:
        layers: List[_Layer] = []
        if busybox:
            bb = _busybox_layer(oci)
            if bb:
                layers.append(bb)
        layers.append(_base_layer(oci))
        layers.append(_top_layer(oci, salt))
        if big_mb > 0:
            layers.append(_big_layer(big_mb, oci, tmp))
        for l in layers:
            push_blob(base, name, l.digest, l.data, auth)

        def push_platform(arch: str, ref: str) -> Tuple[str, int]:
            cfg = json.dumps(_config(arch, layers), indent=2).encode()
            cfg_digest = "sha256:" + hashlib.sha256(cfg).hexdigest()
            push_blob(base, name, cfg_digest, cfg, auth)
            body = _manifest(cfg, layers, oci)
            media = MEDIA_OCI_MANIFEST if oci else MEDIA_DOCKER_MANIFEST
            return push_manifest(base, name, ref, body, media, auth), len(body)

        cfg_amd64 = json.dumps(_config("amd64", layers), indent=2).encode()
        result: Dict[str, Any] = {
            "reference": f"{urllib.parse.urlsplit(base).netloc}/{name}:{tag}",
            "config_digest": "sha256:" + hashlib.sha256(cfg_amd64).hexdigest(),
            "layers": [l.digest for l in layers],
            "layer_names": [l.name for l in layers],
            "diff_ids": [l.diff_id for l in layers],
            "layer_sizes": [l.size for l in layers],
            "layer_media_types": [l.media_type for l in layers],
            "config": _config("amd64", layers)["config"],
            "index_digest": None,
        }
        if index:
            arm_digest, arm_size = push_platform("arm64", f"{tag}-arm64")
            amd_digest, amd_size = push_platform("amd64", f"{tag}-amd64")
            media = MEDIA_OCI_MANIFEST if oci else MEDIA_DOCKER_MANIFEST
            lst = {
                "schemaVersion": 2,
                "mediaType": MEDIA_OCI_INDEX if oci else MEDIA_DOCKER_LIST,
                "manifests": [
                    {"mediaType": media, "size": arm_size, "digest": arm_digest,
                     "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
                    {"mediaType": media, "size": amd_size, "digest": amd_digest,
                     "platform": {"architecture": "amd64", "os": "linux"}},
                ],
            }
            body = json.dumps(lst, indent=2).encode()
            result["index_digest"] = push_manifest(
                base, name, tag, body, MEDIA_OCI_INDEX if oci else MEDIA_DOCKER_LIST, auth
            )
            result["manifest_digest"] = amd_digest
            result["arm64_manifest_digest"] = arm_digest
        else:
            result["manifest_digest"], _ = push_platform("amd64", tag)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Build the gworker test image and push it to a registry.")
    ap.add_argument("registry_url", help="e.g. http://127.0.0.1:5000")
    ap.add_argument("--name", default="gworker/test")
    ap.add_argument("--tag", default="latest")
    ap.add_argument("--big-mb", type=int, default=0, help="add a layer with this many MiB of incompressible data")
    ap.add_argument("--index", action="store_true", help="push a manifest list / OCI index (amd64 + arm64)")
    ap.add_argument("--oci", action="store_true", help="OCI media types (and an uncompressed top layer)")
    ap.add_argument("--no-busybox", action="store_true", help="leave out the busybox layer")
    ap.add_argument("--salt", default="", help="content of /etc/salt (distinct digests per salt)")
    ap.add_argument("--user", help="Basic auth user")
    ap.add_argument("--password", help="Basic auth password")
    a = ap.parse_args(argv)
    auth = (a.user, a.password or "") if a.user else None
    res = push_test_image(a.registry_url, a.name, a.tag, big_mb=a.big_mb, index=a.index,
                          oci=a.oci, busybox=not a.no_busybox, salt=a.salt, auth=auth)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
