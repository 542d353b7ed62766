#!/usr/bin/env python3
"""Run a throw-away docker-registry on 127.0.0.1 for tests (standard library only).

    python3 tests/registry/serve.py [--dir DIR] [--user U --password P] [--push NAME:TAG ...]

Prints one JSON line once the registry answers::

    {"url": "http://127.0.0.1:PORT", "host": "127.0.0.1:PORT", "pid": N,
     "dir": DIR, "storage": DIR/storage, "pushed": {"NAME:TAG": {...}}}

then runs until SIGTERM / SIGINT / its parent exits (with --die-with-parent)
or stdin closes (with --stdin-eof), stops the registry and (without --dir)
removes its temp dir. ``--push`` pushes the test image of push.py (see there).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import push  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="registry dir (config, storage, log); default a temp dir removed at exit")
    ap.add_argument("--port", type=int, help="port (default: a free one)")
    ap.add_argument("--user", help="require Basic auth (htpasswd, bcrypt) with this user")
    ap.add_argument("--password", default="", help="... and this password")
    ap.add_argument("--push", action="append", default=[], metavar="NAME:TAG",
                    help="push the test image under NAME:TAG (repeatable)")
    ap.add_argument("--index", action="store_true", help="pushed images are manifest lists (amd64+arm64)")
    ap.add_argument("--big-mb", type=int, default=0, help="pushed images get a big layer of this many MiB")
    ap.add_argument("--die-with-parent", action="store_true", help="exit when the parent process exits")
    ap.add_argument("--stdin-eof", action="store_true", help="exit when stdin reaches end of file")
    a = ap.parse_args()

    if a.die_with_parent:
        push._die_with_parent()
    own_dir = a.dir is None
    d = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="gw-registry-"))
    auth = (a.user, a.password) if a.user else None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    url, proc = push.start_registry(d, htpasswd=auth, port=a.port)
    try:
        pushed = {}
        for ref in a.push:
            name, _, tag = ref.partition(":")
            pushed[ref] = push.push_test_image(url, name, tag or "latest", big_mb=a.big_mb,
                                               index=a.index, auth=auth)
        print(json.dumps({"url": url, "host": url.split("://", 1)[1], "pid": proc.pid,
                          "dir": str(d), "storage": str(d / "storage"), "pushed": pushed}), flush=True)
        if a.stdin_eof:
            def watch() -> None:
                try:
                    while sys.stdin.buffer.read(4096):
                        pass
                finally:
                    stop.set()
            threading.Thread(target=watch, daemon=True).start()
        while not stop.is_set() and proc.poll() is None:
            stop.wait(0.5)
    finally:
        push.stop_registry(proc)
        if own_dir:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
