#!/usr/bin/env python3
"""A grader: run a student's submission against tests in an image built
from a description, with no network.

    python3 examples/grader.py

The image (Debian + Python + pytest from PyPI + the test files) is built
once; later runs are cache hits that take milliseconds. The submission is
written into the sandbox and run with no network at all.
"""

import os
import tempfile

from gworker_client import Image, Sandbox

TESTS = '''
from solution import fib

def test_small():
    assert [fib(n) for n in range(6)] == [0, 1, 1, 2, 3, 5]

def test_big():
    assert fib(50) == 12586269025
'''

SUBMISSION = '''
def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
'''


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "test_fib.py"), "w") as f:
            f.write(TESTS)
        image = (
            Image.debian_slim()
            .pip_install("pytest")
            .add_local_dir(d, "/grader")
            .env({"PYTHONDONTWRITEBYTECODE": "1"})
            .workdir("/grader")
        )
        # Build output (steps, pip's log) goes to stderr the first time.
        with Sandbox.create(image=image, block_network=True, timeout=120) as sb:
            w = sb.exec(["sh", "-c", "cat > solution.py"])
            w.stdin.write(SUBMISSION)
            w.stdin.write_eof()
            w.wait()
            p = sb.exec(["python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_fib.py"])
            out = p.stdout.read()
            code = p.wait()
            print(out.strip().splitlines()[-1])
            print("grade:", "pass" if code == 0 else "fail")


if __name__ == "__main__":
    main()
