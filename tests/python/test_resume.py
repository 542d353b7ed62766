"""Output streams resume across broken connections and daemon restarts."""

from __future__ import annotations

import hashlib
import socket
import threading
import time

from helpers import run
from gworker_client import Sandbox

COUNT_SCRIPT = 'i=0; while [ $i -lt {n} ]; do echo "line-$i"; i=$((i+1)); sleep {pause}; done'


def test_stream_resumes_after_connection_breaks(running_sandbox):
    proc = running_sandbox.exec(["sh", "-c", COUNT_SCRIPT.format(n=60, pause=0.02)])
    reader = proc.stdout
    lines = [reader.readline() for _ in range(10)]
    # Break the body's connection under the reader, as a network failure would.
    assert reader._conn is not None and reader._conn.sock is not None
    reader._conn.sock.shutdown(socket.SHUT_RDWR)
    lines.extend(reader)
    assert lines == [f"line-{i}\n" for i in range(60)]
    assert proc.wait(timeout=30) == 0


def test_stream_resumes_across_daemon_restart(running_sandbox, daemon):
    proc = running_sandbox.exec(["sh", "-c", COUNT_SCRIPT.format(n=200, pause=0.02)])
    lines = []
    reader_done = threading.Event()
    failure = []

    def read_all():
        try:
            for line in proc.stdout:
                lines.append(line)
        except BaseException as e:  # reported below
            failure.append(e)
        finally:
            reader_done.set()

    thread = threading.Thread(target=read_all, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while len(lines) < 20 and time.monotonic() < deadline and not reader_done.is_set():
        time.sleep(0.01)
    assert len(lines) >= 20, (lines, failure)
    daemon.restart()  # SIGKILL while the reader is in the middle of the body
    assert reader_done.wait(timeout=90), "the reader did not finish"
    assert not failure, failure
    assert lines == [f"line-{i}\n" for i in range(200)], "no line lost or repeated"
    assert proc.wait(timeout=30) == 0
    # The sandbox and its state survived the restart.
    again = Sandbox.lookup(running_sandbox.sandbox_id)
    assert run(again, ["echo", "after restart"])[1] == "after restart\n"


def test_bulk_stream_resumes_across_daemon_restart(running_sandbox, daemon):
    n = 1_500_000  # ~10.9 MB: more than the daemon's 4 MiB unread buffer
    expected = hashlib.sha256("".join(f"{i}\n" for i in range(1, n + 1)).encode()).hexdigest()
    proc = running_sandbox.exec(["seq", "1", str(n)])
    reader = proc.stdout
    h = hashlib.sha256()
    got = 0
    restarted = False
    for chunk in reader.iter_bytes():
        h.update(chunk)
        got += len(chunk)
        if not restarted and got > 2_000_000:
            daemon.restart()
            restarted = True
    assert restarted
    assert h.hexdigest() == expected
    assert proc.wait(timeout=60) == 0


def test_wait_rides_out_a_daemon_restart(sandboxes, daemon):
    sb = sandboxes(["sh", "-c", "sleep 3; exit 7"])
    result = []
    thread = threading.Thread(target=lambda: result.append(sb.wait()), daemon=True)
    thread.start()
    time.sleep(0.5)
    daemon.restart()
    thread.join(timeout=60)
    assert result == [7]
