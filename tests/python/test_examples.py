"""The scripts in examples/ run and print what they should."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO, client_env


def run_example(daemon, name: str, *args: str, stdin: "str | None" = None) -> str:
    out = subprocess.run([sys.executable, str(REPO / "examples" / name), *args], input=stdin,
                         env=client_env(daemon.url), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_code_interpreter(daemon):
    out = run_example(daemon, "code_interpreter.py")
    assert "area = 28.27\n" in out
    assert "285\n" in out
    assert "error: ZeroDivisionError: division by zero\n" in out
    assert "still alive, radius is 3\n" in out


def test_code_interpreter_from_stdin(daemon):
    out = run_example(daemon, "code_interpreter.py", "-", stdin="x = 5\nprint(x * 7)\n")
    assert "35\n" in out


def test_workflow(daemon):
    out = run_example(daemon, "workflow.py")
    assert "files: data.json summary.json\n" in out
    assert 'summary: {"count": 10, "total": 385}\n' in out


def test_reconnect(daemon):
    out = run_example(daemon, "reconnect.py")
    lines = out.splitlines()
    sid = lines[0].split()[1]
    assert lines[1] == f"reattached {sid}"
    assert "entry output: finished" in lines
    assert "still running: True" in lines
    assert "progress: tick-1 tick-2 tick-3 tick-4 tick-5" in lines
    assert "note: note from the first process" in lines
    assert lines[-1] == "terminated: lookup now raises NotFoundError"


def test_grader(daemon):
    out = run_example(daemon, "grader.py")
    assert "2 passed" in out
    assert out.endswith("grade: pass\n")
