"""Images from an OCI registry: a real Debian `docker-registry` on loopback,
an image pushed to it by the test (tests/registry/push.py), pulled and run
through the daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from gworker_client import Image, ImageBuildError, InvalidRequestError, Sandbox
from gworker_client._transport import Transport

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "registry"))
import push  # noqa: E402

pytestmark = pytest.mark.skipif(not push.registry_available(), reason="docker-registry is not installed")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[str, Dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("registry")
    url, proc = push.start_registry(tmp)
    try:
        pushed = push.push_test_image(url, "test/img", "v1", index=True)
        pushed["storage"] = tmp / "storage"
        yield url.replace("http://", ""), pushed
    finally:
        push.stop_registry(proc)


def run(sb: Sandbox, *cmd: str) -> Tuple[int, str]:
    p = sb.exec(list(cmd))
    out = p.stdout.read()
    return p.wait(), out


def events(path: str, body: Dict[str, Any]) -> List[Dict[str, Any]]:
    conn, resp = Transport.from_env().open_post_stream(path, json.dumps(body).encode())
    try:
        return [json.loads(line) for line in resp if line.strip()]
    finally:
        conn.close()


def test_pull_applies_layers_env_and_workdir(daemon: Any, sandboxes: Any, registry: Any) -> None:
    host, pushed = registry
    sb = sandboxes(image=Image.from_registry(f"{host}/test/img:v1"))
    assert run(sb, "cat", "/etc/keep.txt")[0] == 0
    # Whiteouts and opaque directories of the upper layer are applied.
    assert run(sb, "cat", "/etc/deleted.txt")[0] != 0
    assert run(sb, "cat", "/opq/old1.txt")[0] != 0
    assert run(sb, "cat", "/opq/new.txt")[0] == 0
    assert run(sb, "cat", "/app/data.txt") == (0, "v2\n")
    assert run(sb, "cat", "/app/link")[0] == 0
    # The image's env and workdir are the sandbox's defaults.
    assert run(sb, "sh", "-c", "echo $GREETING") == (0, "hello world\n")
    assert run(sb, "pwd") == (0, "/app\n")
    # ... and its user (1000:1000) runs every process.
    assert run(sb, "id", "-u") == (0, "1000\n")
    assert run(sb, "id", "-g") == (0, "1000\n")
    code, out = run(sb, "stat", "-c", "%u:%g %a", "/home/user/owned.txt")
    assert (code, out) == (0, "1000:1000 640\n")


def test_second_use_is_cached_and_steps_build_on_it(daemon: Any, sandboxes: Any, registry: Any) -> None:
    host, _ = registry
    spec = {"base": {"registry": {"reference": f"{host}/test/img:v1"}}, "steps": []}
    first = events("/v1/images/build", {"spec": spec})
    assert first[-1]["event"] == "done", first
    again = events("/v1/images/build", {"spec": spec})
    assert again[-1]["event"] == "done"
    assert [e for e in again if e["event"] == "step"][0]["cached"] is True
    assert not [e for e in again if e["event"] == "log"], again
    img = Image.from_registry(f"{host}/test/img:v1").run_commands("echo on top > /top.txt")
    sb = sandboxes(image=img)
    assert run(sb, "cat", "/top.txt") == (0, "on top\n")
    assert run(sb, "cat", "/app/data.txt") == (0, "v2\n")


def test_explicit_pull_reports_layers(daemon: Any, registry: Any) -> None:
    host, pushed = registry
    evs = events("/v1/images/pull", {"reference": f"{host}/test/img:v1"})
    assert evs[-1]["event"] == "done", evs[-3:]
    layers = evs[-1]["image"]["layers"]
    for digest in pushed["layers"]:
        assert digest.split(":", 1)[1] in layers


def test_registry_errors_are_clear(daemon: Any, registry: Any, tmp_path: Path) -> None:
    host, _ = registry
    with pytest.raises(ImageBuildError, match="no-such-tag|not found|unknown") as e:
        Image.from_registry(f"{host}/test/img:no-such-tag").build(quiet=True)
    assert e.value.code == "registry_failed"
    port = push.free_port()
    with pytest.raises(ImageBuildError, match=f"127.0.0.1:{port}") as e:
        Image.from_registry(f"127.0.0.1:{port}/test/img:v1").build(quiet=True)
    assert e.value.code == "registry_failed"
    for bad in ["img:tag with space", "img@sha256:short", ":nope", "a//b:c"]:
        with pytest.raises(InvalidRequestError):
            Image.from_registry(bad).build(quiet=True)


def test_wrong_digest_is_refused_and_nothing_stored(daemon: Any, registry: Any, tmp_path: Path) -> None:
    host, _ = registry
    url = f"http://{host}"
    pushed = push.push_test_image(url, "test/corrupt", "v1", salt="corrupt-me")
    top = pushed["layers"][-1]
    blob = push.blob_path(registry[1]["storage"], top)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    layers_dir = Path(daemon.data_dir) / "images" / "layers"
    with pytest.raises(ImageBuildError, match="digest") as e:
        Image.from_registry(f"{host}/test/corrupt:v1").build(quiet=True)
    assert e.value.code == "registry_failed"
    assert not (layers_dir / top.split(":", 1)[1]).exists()
    assert not [p for p in layers_dir.iterdir() if p.name.startswith(".tmp-")]


def test_credentials_come_from_a_secret(daemon: Any, tmp_path: Path) -> None:
    from gworker_client import Secret

    url, proc = push.start_registry(tmp_path, htpasswd=("puller", "s3cret-pw"))
    try:
        push.push_test_image(url, "private/img", "v1", auth=("puller", "s3cret-pw"), salt="auth")
        host = url.replace("http://", "")
        with pytest.raises(ImageBuildError, match="(?i)unauthorized") as e:
            Image.from_registry(f"{host}/private/img:v1").build(quiet=True)
        assert e.value.code == "registry_failed"
        name = f"reg-{tmp_path.name[-8:]}".replace("_", "-")
        Transport.from_env().call("POST", "/v1/secrets", {
            "name": name, "values": {"REGISTRY_USERNAME": "puller", "REGISTRY_PASSWORD": "s3cret-pw"}})
        try:
            image_id = Image.from_registry(f"{host}/private/img:v1", secret=Secret.from_name(name)).build(quiet=True)
            assert image_id.startswith("im-")
            # A secret without the two keys is refused before anything is fetched.
            Transport.from_env().call("POST", "/v1/secrets", {"name": name + "-bad", "values": {"X": "y"}})
            with pytest.raises(InvalidRequestError, match="REGISTRY_USERNAME"):
                Image.from_registry(f"{host}/private/img:v2", secret=Secret.from_name(name + "-bad")).build(quiet=True)
        finally:
            for n in (name, name + "-bad"):
                try:
                    Transport.from_env().call("DELETE", f"/v1/secrets/{n}")
                except Exception:
                    pass
    finally:
        push.stop_registry(proc)


def test_glibc_coreutils_work_in_a_registry_image(daemon: Any, sandboxes: Any, registry: Any) -> None:
    """Debian's coreutils fail under this gVisor without the statx shim
    (docs/images.md); registry images get it too."""
    import hashlib
    import io
    import tarfile

    host, _ = registry
    libs = subprocess.run(["ldd", "/bin/ls"], capture_output=True, text=True, check=True).stdout
    files = ["/bin/ls"] + [w for line in libs.splitlines() for w in line.split() if w.startswith("/")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for d in ("bin", "etc", "lib", "lib64", "lib/x86_64-linux-gnu", "tmp", "proc", "dev", "sys"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(ti)
        for f in files:
            real = os.path.realpath(f)
            data = Path(real).read_bytes()
            ti = tarfile.TarInfo(f.lstrip("/"))
            ti.size, ti.mode = len(data), 0o755
            tf.addfile(ti, io.BytesIO(data))
    layer = push._finish_layer("glibc-ls", buf.getvalue(), True, False)
    url = f"http://{host}"
    push.push_blob(url, "test/glibc", layer.digest, layer.data)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/bin"]},
                         "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]}}).encode()
    cfg_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    push.push_blob(url, "test/glibc", cfg_digest, config)
    push.push_manifest(url, "test/glibc", "v1", push._manifest(config, [layer], False), push.MEDIA_DOCKER_MANIFEST)
    sb = sandboxes(image=Image.from_registry(f"{host}/test/glibc:v1"))
    p = sb.exec(["/bin/ls", "/bin"])
    out = p.stdout.read()
    assert p.wait() == 0, p.stderr.read()
    assert "ls" in out.split()
    # The fix is what makes it work (coreutils 9 + this gVisor: see
    # crates/images/src/statx.rs): a bookworm glibc (this host's, copied into
    # the image) is patched in a layer of its own; another is preloaded a fix.
    preloaded = sb.exec(["/bin/ls", "/etc/ld.so.preload"]).wait() == 0
    patched = sb.exec(["/bin/ls", "/usr/lib/gworker/statx-guard"]).wait() == 0
    assert preloaded != patched
    if "VERSION_CODENAME=bookworm" in Path("/etc/os-release").read_text():
        assert patched


def test_a_warm_pool_of_a_tagged_registry_image_runs_as_its_user(daemon: Any, registry: Any, tmp_path: Path) -> None:
    from helpers import short_tempdir, side_daemon

    host, _ = registry
    Image.from_registry(f"{host}/test/img:v1").build(tag="pooled-reg", quiet=True)
    # A second daemon sharing the session's images keeps one slot of the tag warm.
    d2 = side_daemon(daemon, short_tempdir("gwpl-"), "gwpl-", {}, ["--pool", "pooled-reg=1"])
    data = d2.data_dir
    try:
        # The slot boots in the background; a create before it is ready starts cold.
        sid = _create_from_pool(d2, data, {"image": "pooled-reg", "timeout": 60})
        out = _exec_output(d2, sid, "id -u; id -g; echo $GREETING; pwd")
        assert out == b"1000\n1000\nhello world\n/app\n", out
        assert d2.request("DELETE", f"/v1/sandboxes/{sid}")[0] == 204
        # A create with a volume claims a slot too: its agent, running as the
        # image's user, mounts the volume before the user's command runs.
        status, _ = d2.request("POST", "/v1/volumes", {"name": "regvol"})
        assert status == 201
        (data / "volumes" / "regvol" / "data" / "x.txt").write_text("on the volume\n")
        sid = _create_from_pool(d2, data, {"image": "pooled-reg", "timeout": 60,
                                           "volumes": {"/vol": {"name": "regvol"}}})
        assert _exec_output(d2, sid, "id -u; cat /vol/x.txt") == b"1000\non the volume\n"
        assert d2.request("DELETE", f"/v1/sandboxes/{sid}")[0] == 204
    finally:
        # A start without the pool removes the refilled slot.
        d2.extra_args = []
        d2.restart()
        for _ in range(300):
            if not list((data / "sandboxes").glob("sb-*")):
                break
            time.sleep(0.1)
        d2.stop()
        Transport.from_env().call("DELETE", "/v1/images/pooled-reg")


def _create_from_pool(d: Any, data: Path, body: Dict[str, Any]) -> str:
    """Creates until a sandbox comes from the pool (deleting the cold ones); its ID."""
    for _ in range(60):
        slots = [p.name for p in (data / "sandboxes").glob("sb-*")]
        status, sb = d.request("POST", "/v1/sandboxes", body)
        assert status == 201, sb
        if sb["sandbox_id"] in slots:
            return str(sb["sandbox_id"])
        d.request("DELETE", f"/v1/sandboxes/{sb['sandbox_id']}")
        time.sleep(0.5)
    pytest.fail(f"no sandbox came from the pool for {body}")


def _exec_output(d: Any, sid: str, script: str) -> bytes:
    """Runs `sh -c script` in the sandbox; asserts it exits 0; its stdout."""
    status, p = d.request("POST", f"/v1/sandboxes/{sid}/exec", {"cmd": ["sh", "-c", script]})
    assert status == 201, p
    status, w = d.request("GET", f"/v1/sandboxes/{sid}/processes/{p['process_id']}/wait?timeout=30")
    assert (status, w["exit_code"]) == (200, 0), w
    return _raw_get(d, f"/v1/sandboxes/{sid}/processes/{p['process_id']}/stdout")[1]


def _raw_get(d: Any, path: str) -> Tuple[int, bytes]:
    from helpers import UnixHTTPConnection

    conn = UnixHTTPConnection(str(d.socket_path), timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
