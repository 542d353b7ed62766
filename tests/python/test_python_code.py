"""Running Python code in the debian-slim image."""

from __future__ import annotations

import json

from helpers import run


def test_python_version(py_sandbox):
    code, out, _ = run(py_sandbox, ["python3", "-c", "import sys; print(sys.version_info[:2])"])
    assert (code, out) == (0, "(3, 11)\n")


def test_python_code_via_stdin(py_sandbox):
    proc = py_sandbox.exec(["python3", "-"])
    proc.stdin.write("import math\nprint(math.factorial(20))\nraise SystemExit(9)\n")
    proc.stdin.write_eof()
    assert proc.stdout.read() == "2432902008176640000\n"
    assert proc.wait(timeout=60) == 9


def test_python_exception_goes_to_stderr(py_sandbox):
    code, out, err = run(py_sandbox, ["python3", "-c", "print('partial'); 1/0"])
    assert code == 1 and out == "partial\n"
    assert "ZeroDivisionError" in err


def test_workflow_state_between_execs(py_sandbox):
    write = "import json; json.dump({'step': 1, 'items': [1, 2, 3]}, open('/tmp/state.json', 'w'))"
    assert run(py_sandbox, ["python3", "-c", write])[0] == 0
    read = "import json; s = json.load(open('/tmp/state.json')); s['step'] += 1; print(json.dumps(s))"
    code, out, _ = run(py_sandbox, ["python3", "-c", read])
    assert code == 0 and json.loads(out) == {"step": 2, "items": [1, 2, 3]}


def test_interactive_interpreter_loop(py_sandbox):
    """A long-lived interpreter fed one snippet at a time keeps its variables."""
    driver = (
        "import sys\n"
        "ns = {}\n"
        "for line in sys.stdin:\n"
        "    exec(line.replace('\\\\n', '\\n'), ns)\n"
        "    print('--done--', flush=True)\n"
    )
    proc = py_sandbox.exec(["python3", "-u", "-c", driver])
    outputs = []
    for snippet in ["x = 21", "print(x * 2)", "import os\\nprint(os.getpid() > 1, x)"]:
        proc.stdin.write(snippet + "\n")
        chunk = []
        for line in proc.stdout:
            if line == "--done--\n":
                break
            chunk.append(line)
        outputs.append("".join(chunk))
    proc.stdin.write_eof()
    assert proc.wait(timeout=60) == 0
    assert outputs == ["", "42\n", "True 21\n"]
