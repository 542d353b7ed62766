"""Reconnect to a sandbox by its ID: a first process starts work in a sandbox
and goes away; a second one (here: this script started again with the ID)
finds the sandbox with Sandbox.lookup and picks up where it was.

    GWORKER_URL=unix:///run/gworker/gworker.sock python examples/reconnect.py
"""

from __future__ import annotations

import subprocess
import sys

from gworker_client import Image, NotFoundError, Sandbox

# Counts into a file, says so, then stays up for whoever comes back.
ENTRY = "i=0; while [ $i -lt 5 ]; do i=$((i+1)); echo tick-$i >> /tmp/progress; sleep 0.2; done; echo finished; exec sleep 3600"


def start() -> str:
    """Create a sandbox and leave a note in it; return its ID."""
    sb = Sandbox.create(["sh", "-c", ENTRY], image=Image.from_name("busybox"), timeout=120)
    sb.exec(["sh", "-c", "echo 'note from the first process' > /tmp/note"]).wait()
    print("started", sb.sandbox_id)
    return sb.sandbox_id  # the handle is dropped here; the sandbox runs on


def attach(sandbox_id: str) -> int:
    """In a fresh process: look the sandbox up and continue with it."""
    sb = Sandbox.lookup(sandbox_id)
    print("reattached", sb.sandbox_id)
    for line in sb.stdout:  # the entry command's output since its start, then live
        print("entry output:", line.strip())
        if line == "finished\n":
            break
    print("still running:", sb.poll() is None)
    print("progress:", " ".join(sb.exec(["cat", "/tmp/progress"]).stdout.read().split()))
    print("note:", sb.exec(["cat", "/tmp/note"]).stdout.read().strip())
    sb.terminate()
    try:
        Sandbox.lookup(sandbox_id)
    except NotFoundError:
        print("terminated: lookup now raises NotFoundError")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "attach":
        sys.exit(attach(sys.argv[2]))
    sandbox_id = start()
    sys.exit(subprocess.call([sys.executable, __file__, "attach", sandbox_id]))
