"""stdin, stdout and stderr: round trips, streaming, 50 MB of output."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import threading

import pytest

from helpers import client_env


def seq_bytes_hash(n: int) -> "tuple[int, str]":
    """Length and sha256 of what `seq 1 n` prints."""
    h = hashlib.sha256()
    size = 0
    step = 100_000
    for start in range(1, n + 1, step):
        block = "".join(f"{i}\n" for i in range(start, min(start + step, n + 1))).encode()
        h.update(block)
        size += len(block)
    return size, h.hexdigest()


def test_stdin_round_trip_exec(running_sandbox):
    proc = running_sandbox.exec(["cat"])
    proc.stdin.write("hello ")
    proc.stdin.write(b"bytes\n")
    proc.stdin.write("ünïcode ✓\n")
    proc.stdin.drain()
    proc.stdin.write_eof()
    assert proc.stdout.read() == "hello bytes\nünïcode ✓\n"
    assert proc.wait(timeout=30) == 0
    with pytest.raises(ValueError):
        proc.stdin.write("after eof")


def test_stdin_interactive_line_by_line(running_sandbox):
    proc = running_sandbox.exec(["sh", "-c", 'while read l; do echo "got:$l"; done; echo bye'])
    for word in ("one", "two", "three"):
        proc.stdin.write(word + "\n")
        assert proc.stdout.readline() == f"got:{word}\n"
    proc.stdin.close()
    assert proc.stdout.read() == "bye\n"
    assert proc.wait(timeout=30) == 0


def test_stdin_large_binary(running_sandbox):
    blob = bytes(range(256)) * 40_000  # ~10 MB: more than one request
    proc = running_sandbox.exec(["sh", "-c", "cat > /tmp/blob; wc -c < /tmp/blob; md5sum /tmp/blob"])
    proc.stdin.write(blob)
    proc.stdin.write_eof()
    out = proc.stdout.read().split()
    assert proc.wait(timeout=60) == 0
    assert int(out[0]) == len(blob)
    assert out[1] == hashlib.md5(blob).hexdigest()


def test_entry_stdin_round_trip(sandboxes):
    sb = sandboxes(["cat"])
    sb.stdin.write("to the entry command\n")
    sb.stdin.write_eof()
    assert sb.stdout.read() == "to the entry command\n"
    assert sb.wait(timeout=30) == 0


def test_stdout_and_stderr_are_separate(running_sandbox):
    proc = running_sandbox.exec(["sh", "-c", "echo out1; echo err1 >&2; echo out2; echo err2 >&2; exit 2"])
    assert proc.stderr.read() == "err1\nerr2\n"
    assert proc.stdout.read() == "out1\nout2\n"
    assert proc.wait() == 2


def test_binary_output_and_partial_last_line(running_sandbox):
    proc = running_sandbox.exec(["sh", "-c", r"printf 'a\nb\000\377c'"])
    assert proc.stdout.read_bytes() == b"a\nb\x00\xffc"
    proc = running_sandbox.exec(["sh", "-c", r"printf 'x\ny\nlast'"])
    assert list(proc.stdout) == ["x\n", "y\n", "last"]
    assert proc.stdout.read() == "", "a finished stream stays finished"


def test_output_arrives_while_process_runs(running_sandbox):
    # The process prints a line, then blocks on its stdin: it cannot print
    # more or end until the test writes, so that line must arrive while it runs.
    proc = running_sandbox.exec(["sh", "-c", "echo a; read go; echo b $go"])
    lines = iter(proc.stdout)
    first: "list[str]" = []
    reader = threading.Thread(target=lambda: first.append(next(lines)), daemon=True)
    reader.start()
    reader.join(timeout=30)  # only a bound on a hang, not on speed
    assert first == ["a\n"], "the first line did not arrive while the process ran"
    assert proc.poll() is None
    proc.stdin.write("now\n")
    proc.stdin.write_eof()
    assert next(lines) == "b now\n"
    assert list(lines) == []
    assert proc.wait(timeout=30) == 0


def test_50mb_output_read(running_sandbox):
    n = 6_000_000  # `seq 1 6000000` prints 52.9 MB
    size, digest = seq_bytes_hash(n)
    proc = running_sandbox.exec(["seq", "1", str(n)])
    data = proc.stdout.read_bytes()
    assert proc.wait(timeout=120) == 0
    assert len(data) == size
    assert hashlib.sha256(data).hexdigest() == digest
    assert proc.stdout.offset == size


def test_50mb_output_lines_in_bounded_memory(running_sandbox, daemon):
    """Iterating 50 MB of lines in a fresh process keeps its peak RSS small."""
    n = 6_000_000
    code = textwrap.dedent(
        """
        import resource, sys
        from gworker_client import Sandbox
        sb = Sandbox.lookup(sys.argv[1])
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        proc = sb.exec(["seq", "1", sys.argv[2]])
        expected = 1
        for line in proc.stdout:
            if line != f"{expected}\\n":
                sys.exit(f"line {expected}: {line!r}")
            expected += 1
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(expected - 1, proc.wait(), base, peak)
        """
    )
    out = subprocess.run([sys.executable, "-c", code, running_sandbox.sandbox_id, str(n)],
                         env=client_env(daemon.url), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    lines, exit_code, base_kb, peak_kb = map(int, out.stdout.split())
    assert (lines, exit_code) == (n, 0)
    assert peak_kb - base_kb < 20 * 1024, f"RSS grew by {(peak_kb - base_kb) // 1024} MiB while reading 50 MB"

