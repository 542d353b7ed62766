"""Many sandboxes at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from helpers import BUSYBOX, run
from gworker_client import Sandbox

N = 20


def test_twenty_sandboxes_at_once(daemon):
    with ThreadPoolExecutor(N) as pool:
        made = list(pool.map(lambda i: Sandbox.create(image=BUSYBOX, timeout=180, env={"N": str(i)}), range(N)))
        try:
            assert len({sb.sandbox_id for sb in made}) == N
            # Each writes its own number into its own filesystem, then reads it back.
            results = list(pool.map(lambda sb: run(sb, 'echo "$N" > /tmp/n; cat /tmp/n'), made))
            assert results == [(0, f"{i}\n", "") for i in range(N)]
            listed = {s["sandbox_id"]: s for s in daemon.request("GET", "/v1/sandboxes")[1]["sandboxes"]}
            assert all(listed[sb.sandbox_id]["state"] == "running" for sb in made)
            # Sandboxes are isolated: none sees another's file.
            probe = list(pool.map(lambda sb: run(sb, "ls /tmp"), made))
            assert all(out == "n\n" for _, out, _ in probe), probe
        finally:
            list(pool.map(lambda sb: sb.terminate(), made))
    assert not {sb.sandbox_id for sb in made} & daemon.sandbox_ids()
