"""Images built from descriptions, through the real daemon and real gVisor
build sandboxes: each step, the cache, tags, removal, and bad input."""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path
from typing import Any, Dict, List

import pytest

from gworker_client import Image, ImageBuildError, InvalidRequestError, NotFoundError, Sandbox
from gworker_client._transport import Transport


def build_events(body: Dict[str, Any]) -> List[Dict[str, Any]]:
    """POST a build and return all its events."""
    conn, resp = Transport.from_env().open_post_stream("/v1/images/build", json.dumps(body).encode())
    try:
        return [json.loads(line) for line in resp if line.strip()]
    finally:
        conn.close()


def run(sb: Sandbox, *cmd: str) -> str:
    p = sb.exec(list(cmd))
    out = p.stdout.read()
    assert p.wait() == 0, (cmd, out, p.stderr.read())
    return out


def layer_dirs(daemon: Any) -> List[str]:
    d = Path(daemon.data_dir) / "images" / "layers"
    return sorted(os.listdir(d)) if d.is_dir() else []


def test_steps_end_up_in_the_sandbox(daemon: Any, sandboxes: Any, tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text("print('hello from main')\n")
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "mod.txt").write_text("module\n")
    (src / "run.sh").write_text("#!/bin/sh\necho run\n")
    (src / "run.sh").chmod(0o755)
    image = (
        Image.from_name("busybox")
        .run_commands("echo built > /built.txt", "rm /etc/group")
        .env({"GREETING": "hi there", "PATH": "/usr/local/bin:/bin:/usr/bin"})
        .workdir("/app")
        .add_local_file(str(tmp_path / "main.py"), "/app/main.py")
        .add_local_dir(str(src), "/opt/src")
    )
    sb = sandboxes(image=image)
    assert run(sb, "cat", "/built.txt") == "built\n"
    # A file of the base deleted by a step is gone (an overlay whiteout).
    p = sb.exec(["cat", "/etc/group"])
    assert p.wait() != 0
    assert run(sb, "sh", "-c", "echo $GREETING") == "hi there\n"
    assert run(sb, "pwd") == "/app\n"
    assert run(sb, "cat", "main.py") == "print('hello from main')\n"
    assert run(sb, "cat", "/opt/src/pkg/mod.txt") == "module\n"
    assert run(sb, "/opt/src/run.sh") == "run\n"
    # The image on the host is untouched by what the sandbox writes.
    run(sb, "sh", "-c", "echo scribble > /built.txt")
    sb2 = sandboxes(image=image)
    assert run(sb2, "cat", "/built.txt") == "built\n"


def test_same_description_is_a_cache_hit(daemon: Any) -> None:
    spec = {"base": {"name": "busybox"}, "steps": [{"run_commands": ["echo cache-test > /c"]}]}
    first = build_events({"spec": spec})
    assert first[-1]["event"] == "done", first
    layers_after_first = layer_dirs(daemon)
    second = build_events({"spec": spec})
    assert second[-1]["event"] == "done", second
    assert second[-1]["image"]["image_id"] == first[-1]["image"]["image_id"]
    steps = [e for e in second if e["event"] == "step"]
    assert steps and all(e["cached"] for e in steps), steps
    assert not [e for e in second if e["event"] == "log"]
    assert layer_dirs(daemon) == layers_after_first
    # A different step is a different image.
    spec2 = {"base": {"name": "busybox"}, "steps": [{"run_commands": ["echo other > /c"]}]}
    third = build_events({"spec": spec2})
    assert third[-1]["image"]["image_id"] != first[-1]["image"]["image_id"]


def test_local_file_content_is_part_of_the_id(daemon: Any, tmp_path: Path) -> None:
    f = tmp_path / "data.txt"
    f.write_text("one")
    a = Image.from_name("busybox").add_local_file(str(f), "/data.txt").build(quiet=True)
    again = Image.from_name("busybox").add_local_file(str(f), "/data.txt").build(quiet=True)
    f.write_text("two")
    b = Image.from_name("busybox").add_local_file(str(f), "/data.txt").build(quiet=True)
    assert a == again
    assert a != b


def test_failing_step_reports_output_and_keeps_nothing(daemon: Any) -> None:
    before = layer_dirs(daemon)
    image = Image.from_name("busybox").run_commands("echo about to fail; echo oops >&2; exit 3")
    with pytest.raises(ImageBuildError) as e:
        image.build(quiet=True)
    assert e.value.exit_code == 3
    assert "about to fail" in (e.value.output or "")
    assert "oops" in (e.value.output or "")
    assert layer_dirs(daemon) == before
    leftovers = [n for n in layer_dirs(daemon) if n.startswith(".tmp-")]
    assert leftovers == []


def test_tag_names_a_built_image(daemon: Any, sandboxes: Any) -> None:
    image_id = Image.from_name("busybox").run_commands("echo tagged > /t").build(tag="team/tool:v1", quiet=True)
    assert image_id.startswith("im-")
    sb = sandboxes(image=Image.from_name("team/tool:v1"))
    assert run(sb, "cat", "/t") == "tagged\n"
    info = Transport.from_env().call("GET", "/v1/images/" + urllib.parse.quote("team/tool:v1", safe=""))
    assert info["image_id"] == image_id
    assert "team/tool:v1" in info["tags"]
    # A later image built on top of the tag.
    top = Image.from_name("team/tool:v1").run_commands("cat /t > /t2")
    sb2 = sandboxes(image=top)
    assert run(sb2, "cat", "/t2") == "tagged\n"


def test_remove_and_gc(daemon: Any) -> None:
    t = Transport.from_env()
    image_id = Image.from_name("busybox").run_commands("echo gc-me > /g").build(quiet=True)
    listed = [i["image_id"] for i in t.call("GET", "/v1/images")["images"]]
    assert image_id in listed
    t.call("DELETE", f"/v1/images/{image_id}")
    with pytest.raises(NotFoundError):
        t.call("GET", f"/v1/images/{image_id}")
    res = t.call("POST", "/v1/images/gc")
    assert res["removed_layers"] >= 1
    # Rebuilding works after gc.
    assert Image.from_name("busybox").run_commands("echo gc-me > /g").build(quiet=True) == image_id


def test_bad_input_is_refused_before_anything_runs(daemon: Any, tmp_path: Path) -> None:
    t = Transport.from_env()
    with pytest.raises(ValueError, match=r"\.\."):
        Image.from_name("busybox").add_local_file(__file__, "/app/../../etc/x")
    with pytest.raises(ValueError, match="absolute"):
        Image.from_name("busybox").workdir("relative/dir")
    with pytest.raises(FileNotFoundError, match="nope"):
        Image.from_name("busybox").add_local_dir(str(tmp_path / "nope"), "/x")
    with pytest.raises(ValueError, match="3.13"):
        Image.debian_slim("2.7")
    # The daemon checks too, for clients that skip the checks.
    bad_specs = [
        {"base": {"name": "busybox"}, "steps": [{"workdir": "/a/../../b"}]},
        {"base": {"name": "busybox"}, "steps": [{"add_files": {"blob": "sha256:" + "0" * 64, "dest": "/x"}}]},
        {"base": {"name": "busybox"}, "steps": [{"apt_install": ["--allow-unauthenticated"]}]},
        {"base": {"debian_slim": {"python_version": "3.9"}}, "steps": []},
        {"base": {"name": "busybox"}, "steps": [{"no_such_step": []}]},
    ]
    for spec in bad_specs:
        with pytest.raises(InvalidRequestError):
            t.call("POST", "/v1/images/build", {"spec": spec})
    with pytest.raises(NotFoundError, match="no-such-image"):
        Sandbox.create(image=Image.from_name("no-such-image"))
    with pytest.raises(InvalidRequestError, match="digest"):
        t.call("POST", "/v1/images/blobs?digest=sha256:" + "1" * 64, raw_body=b"abc",
               content_type="application/x-tar")


def test_a_builtin_without_steps_is_the_builtin(daemon: Any, sandboxes: Any) -> None:
    evs = build_events({"spec": {"base": {"name": "busybox"}, "steps": []}, "tag": "my-busybox"})
    assert evs[-1]["event"] == "done", evs
    assert evs[-1]["image"]["image_id"] == "busybox"
    assert "my-busybox" in evs[-1]["image"]["tags"]
    sb = sandboxes(image=Image.from_name("my-busybox"))
    assert sb._info["image"] == "busybox"
    assert run(sb, "echo", "ok") == "ok\n"


def test_the_daemon_warns_about_a_builtin_of_an_older_recipe(tmp_path: Path) -> None:
    # An existing data dir keeps its built-in images when the recipe changes;
    # the daemon says so at start, with what to do.
    from helpers import Daemon, gworker_bin, short_tempdir

    data = short_tempdir("gwoldd-") / "data"  # supervisor socket paths must stay short
    img = data / "images" / "busybox"
    (img / "rootfs").mkdir(parents=True)
    meta = {"name": "busybox", "recipe_version": 1, "size_bytes": 0, "built_at_unix_secs": 0, "env": []}
    (img / "image.json").write_text(json.dumps(meta))
    d = Daemon(gworker_bin(), data, short_tempdir("gwold-") / "gw.sock")
    d.start()
    try:
        log = d.log_path.read_text()
    finally:
        d.stop()
    assert "image busybox was built by recipe 1" in log, log[-2000:]
    assert "`gworker image rm busybox`" in log
    assert "debian-slim was built" not in log  # not built at all: nothing to say
