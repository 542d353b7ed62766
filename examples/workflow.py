"""A multi-step workflow: each step is its own exec, and the steps share the
sandbox's filesystem, so state written by one step is read by the next.

    GWORKER_URL=unix:///run/gworker/gworker.sock python examples/workflow.py
"""

from __future__ import annotations

import json
import sys

from gworker_client import Image, Sandbox


def step(sb: Sandbox, name: str, code: str) -> str:
    """Run one Python step in the sandbox; fail loudly if it fails."""
    proc = sb.exec(["python3", "-c", code], workdir="/work")
    out, err = proc.stdout.read(), proc.stderr.read()
    code_ = proc.wait()
    print(f"step {name}: exit {code_}")
    if code_ != 0:
        raise SystemExit(f"step {name} failed:\n{err}")
    return out


def main() -> int:
    with Sandbox.create(image=Image.debian_slim(), workdir="/work", timeout=300) as sb:
        # 1. Produce data and write it to a file.
        step(sb, "generate", "import json; json.dump([{'n': n, 'sq': n * n} for n in range(1, 11)], open('data.json', 'w'))")
        # 2. Read it back, transform it, write the next file.
        step(sb, "transform", "import json; rows = json.load(open('data.json')); "
                              "json.dump({'count': len(rows), 'total': sum(r['sq'] for r in rows)}, open('summary.json', 'w'))")
        # 3. Report: read the final state.
        summary = json.loads(step(sb, "report", "print(open('summary.json').read())"))
        listing = sb.exec(["ls", "/work"]).stdout.read().split()
    print("files:", " ".join(listing))
    print("summary:", json.dumps(summary, sort_keys=True))
    return 0 if summary == {"count": 10, "total": 385} else 1


if __name__ == "__main__":
    sys.exit(main())
