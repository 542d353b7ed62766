"""Build steps that need the network (apt_install, pip_install) get it for
the build only, through a network namespace of the daemon's making; the
sandboxes started from the image have none. These fetch from the machine's
Debian mirror and PyPI, as the host's apt and pip do."""

from __future__ import annotations

import json
from typing import Any, Dict, List

import pytest

from gworker_client import Image, ImageBuildError, Sandbox
from gworker_client._transport import Transport


def run(sb: Sandbox, *cmd: str) -> str:
    p = sb.exec(list(cmd))
    out = p.stdout.read()
    assert p.wait() == 0, (cmd, out, p.stderr.read())
    return out


def events(spec: Dict[str, Any]) -> List[Dict[str, Any]]:
    conn, resp = Transport.from_env().open_post_stream("/v1/images/build", json.dumps({"spec": spec}).encode())
    try:
        return [json.loads(line) for line in resp if line.strip()]
    finally:
        conn.close()


def test_debian_slim_has_python_and_pip(daemon: Any, sandboxes: Any) -> None:
    sb = sandboxes(image=Image.debian_slim())
    assert run(sb, "python3", "-c", "import sys; print(sys.version_info[:2])") == "(3, 11)\n"
    assert "pip" in run(sb, "python3", "-m", "pip", "--version")


def test_apt_and_pip_install(daemon: Any, sandboxes: Any) -> None:
    image = Image.debian_slim().apt_install("jq").pip_install("six")
    sb = sandboxes(image=image)
    assert run(sb, "sh", "-c", "echo '{\"a\": 5}' | jq .a") == "5\n"
    assert run(sb, "python3", "-c", "import six; print(six.__name__)") == "six\n"
    # A sandbox with block_network has loopback only, whatever its image's build had.
    blocked = sandboxes(image=image, block_network=True)
    out = run(blocked, "python3", "-c", "import socket; print(sorted(n for _, n in socket.if_nameindex()))")
    assert out == "['lo']\n"
    # The same description again is all cache hits.
    spec = {"base": {"name": "debian-slim"}, "steps": [{"apt_install": ["jq"]}, {"pip_install": ["six"]}]}
    evs = events(spec)
    assert evs[-1]["event"] == "done"
    assert all(e["cached"] for e in evs if e["event"] == "step")


def test_unknown_package_fails_clearly(daemon: Any) -> None:
    with pytest.raises(ImageBuildError) as e:
        Image.debian_slim().apt_install("no-such-package-gworker").build(quiet=True)
    assert e.value.exit_code == 100
    assert "no-such-package-gworker" in (e.value.output or "")
    with pytest.raises(ImageBuildError) as e:
        Image.debian_slim().pip_install("no-such-package-gworker-xyz").build(quiet=True)
    assert e.value.exit_code != 0
    assert "no-such-package-gworker-xyz" in (e.value.output or "").lower()


def test_debian_slim_python_3_13_is_trixie(daemon: Any, sandboxes: Any) -> None:
    sb = sandboxes(image=Image.debian_slim("3.13"), timeout=300)
    assert run(sb, "python3", "-c", "import sys; print(sys.version_info[:2])") == "(3, 13)\n"
    assert "trixie" in run(sb, "cat", "/etc/os-release")
    assert "pip" in run(sb, "python3", "-m", "pip", "--version")
    # coreutils 9 under this gVisor needs the statx shim here too.
    assert "bin" in run(sb, "ls", "/").split()
