"""A code interpreter: feed snippets of Python to one long-lived interpreter in
a sandbox and get each one's output back, with variables kept between them.

    GWORKER_URL=unix:///run/gworker/gworker.sock python examples/code_interpreter.py
    echo 'print(6*7)' | python examples/code_interpreter.py -     # snippets from stdin, one per line
"""

from __future__ import annotations

import json
import sys
from typing import Iterable, Tuple

from gworker_client import Image, Sandbox, SandboxProcess

# Runs inside the sandbox: one JSON-encoded snippet per line in, one JSON
# result per line out. Output of the snippet is captured, exceptions reported.
DRIVER = r"""
import contextlib, io, json, sys, traceback
namespace = {"__name__": "__main__"}
for line in sys.stdin:
    code = json.loads(line)
    out, err = io.StringIO(), io.StringIO()
    ok = True
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            exec(compile(code, "<cell>", "exec"), namespace)
        except BaseException:
            ok = False
            traceback.print_exc(limit=-1)
    print(json.dumps({"ok": ok, "stdout": out.getvalue(), "stderr": err.getvalue()}), flush=True)
"""

DEMO = [
    "import math\nradius = 3",
    "area = math.pi * radius ** 2\nprint(f'area = {area:.2f}')",
    "print(sum(i * i for i in range(10)))",
    "1 / 0",
    "print('still alive, radius is', radius)",
]


def run_cell(interpreter: SandboxProcess, code: str) -> Tuple[bool, str, str]:
    """Send one snippet and wait for its result."""
    interpreter.stdin.write(json.dumps(code) + "\n")
    answer = interpreter.stdout.readline()
    if not answer:
        raise RuntimeError("the interpreter exited: " + interpreter.stderr.read())
    result = json.loads(answer)
    return result["ok"], result["stdout"], result["stderr"]


def main(snippets: Iterable[str]) -> int:
    with Sandbox.create(image=Image.debian_slim(python_version="3.11"), timeout=600) as sb:
        interpreter = sb.exec(["python3", "-u", "-c", DRIVER])
        for i, code in enumerate(snippets, 1):
            ok, out, err = run_cell(interpreter, code)
            print(f"[{i}] >>> " + code.replace("\n", "\n        "))
            if out:
                print(out, end="")
            if not ok:
                print("error: " + err.strip().splitlines()[-1])
        interpreter.stdin.write_eof()
        return interpreter.wait(timeout=60)


if __name__ == "__main__":
    source = (line.rstrip("\n").replace("\\n", "\n") for line in sys.stdin) if sys.argv[1:] == ["-"] else DEMO
    sys.exit(main(source))
