"""Secrets: environment of the entry command and every exec, precedence,
stored encrypted, and never written anywhere in plain text."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from helpers import gworker_bin, run
from gworker_client import ConflictError, NotFoundError, Sandbox, Secret


def env_of(sb, **kw) -> dict:
    code, out, _ = run(sb, ["env"], **kw)
    assert code == 0
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def grep_tree(root: Path, needles) -> list:
    hits = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            try:
                if p.is_symlink() or not p.is_file():
                    continue
                data = p.read_bytes()
            except OSError:
                continue
            hits += [(str(p), n) for n in needles if n.encode() in data]
    return hits


def test_secret_values_never_reach_disk_or_logs(sandboxes, daemon):
    stored_value = f"stored-{uuid.uuid4().hex}"
    dict_value = f"dict-{uuid.uuid4().hex}"
    name = f"leak-{uuid.uuid4().hex[:8]}"
    Secret.create(name, {"STORED_SECRET": stored_value})
    try:
        sb = sandboxes(
            # Written whole (rename) so the exec below never reads half of it.
            cmd=["sh", "-c", "env > /tmp/entry-env.part && mv /tmp/entry-env.part /tmp/entry-env; sleep 600"],
            secrets=[Secret.from_name(name), Secret.from_dict({"DICT_SECRET": dict_value})],
        )
        env = env_of(sb)
        # The values did arrive (so the grep below can fail) ...
        assert env["STORED_SECRET"] == stored_value
        assert env["DICT_SECRET"] == dict_value
        # The entry command runs beside the execs: wait for its file.
        deadline = time.monotonic() + 30
        while True:
            code, entry, _ = run(sb, ["cat", "/tmp/entry-env"])
            if code == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert f"STORED_SECRET={stored_value}" in entry and f"DICT_SECRET={dict_value}" in entry
        # ... and survive a daemon restart (the supervisor keeps them in memory).
        daemon.restart()
        env = env_of(Sandbox.lookup(sb.sandbox_id))
        assert env["STORED_SECRET"] == stored_value and env["DICT_SECRET"] == dict_value
        # Nothing the daemon wrote holds them: SQLite db and -wal, launch.json,
        # config.json, logs (the daemon's log is in the data dir too).
        listed = str(daemon.request("GET", "/v1/sandboxes")[1]) + str(daemon.request("GET", "/v1/secrets")[1])
        assert stored_value not in listed and dict_value not in listed
        assert name in listed
        assert list(daemon.data_dir.glob("**/gworker.db-wal")) or list(daemon.data_dir.glob("**/gworker.db"))
        assert list(daemon.data_dir.glob(f"**/{sb.sandbox_id}/launch.json"))
        assert grep_tree(daemon.data_dir, [stored_value, dict_value]) == []
        assert stored_value not in daemon.log_path.read_text(errors="replace")
    finally:
        Secret.delete(name)


def test_precedence_image_then_secrets_in_order_then_env_then_exec_env(sandboxes):
    sb = sandboxes(
        secrets=[
            Secret.from_dict({"HOME": "/secret-home", "A": "s1", "B": "s1", "C": "s1"}),
            Secret.from_dict({"B": "s2", "C": "s2"}),
        ],
        env={"C": "env"},
    )
    env = env_of(sb)
    assert env["HOME"] == "/secret-home"  # a secret wins over the image's env
    assert (env["A"], env["B"], env["C"]) == ("s1", "s2", "env")
    env = env_of(sb, env={"A": "exec", "C": "exec"})
    assert (env["A"], env["B"], env["C"]) == ("exec", "s2", "exec")
    # The exec's env is for that exec only.
    assert env_of(sb)["A"] == "s1"


def test_stored_secrets_lifecycle_and_unknown_names(sandboxes):
    name = f"life-{uuid.uuid4().hex[:8]}"
    Secret.create(name, {"K": "v1"})
    with pytest.raises(ConflictError):
        Secret.create(name, {"K": "v2"})
    Secret.create(name, {"K": "v2"}, overwrite=True)
    assert name in Secret.list()
    sb = sandboxes(secrets=[Secret.from_name(name)])
    assert env_of(sb)["K"] == "v2"
    Secret.delete(name)
    with pytest.raises(NotFoundError):
        Secret.delete(name)
    with pytest.raises(NotFoundError):
        sandboxes(secrets=[Secret.from_name(name)])
    # A running sandbox keeps the values it was given.
    assert env_of(sb)["K"] == "v2"


def test_local_environ_and_dotenv(sandboxes, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("GW_LOCAL_ONE", "local-1")
    with pytest.raises(KeyError):
        Secret.from_local_environ(["GW_NOT_SET_ANYWHERE"])
    (tmp_path / ".env").write_text("# comment\nexport DOT_A=1\nDOT_B='two words'\nDOT_C=\"x\\ny\"\n")
    sb = sandboxes(secrets=[Secret.from_local_environ(["GW_LOCAL_ONE"]), Secret.from_dotenv(tmp_path)])
    env = env_of(sb)
    assert env["GW_LOCAL_ONE"] == "local-1"
    assert (env["DOT_A"], env["DOT_B"]) == ("1", "two words")
    assert run(sb, ["sh", "-c", 'printf %s "$DOT_C"'])[1] == "x\ny"


def test_cli_secret_commands(daemon, tmp_path: Path, sandboxes):
    name = f"cli-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, GWORKER_URL=daemon.url, FROM_ENV="env-value")

    def g(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([gworker_bin(), *args], env=env, capture_output=True, text=True, timeout=60)

    dotenv = tmp_path / "x.env"
    dotenv.write_text("FROM_FILE=file-value\n")
    r = g("secret", "create", name, "A=1", "FROM_ENV", "--from-dotenv", str(dotenv))
    assert r.returncode == 0, r.stderr
    assert "file-value" not in r.stderr + r.stdout
    ls = g("secret", "ls")
    assert name in ls.stdout.split() and "file-value" not in ls.stdout
    sb = sandboxes(secrets=[Secret.from_name(name)])
    e = env_of(sb)
    assert (e["A"], e["FROM_ENV"], e["FROM_FILE"]) == ("1", "env-value", "file-value")
    assert g("secret", "rm", name).returncode == 0
    assert g("secret", "rm", name).returncode == 1
