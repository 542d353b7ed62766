#!/usr/bin/env bash
# The project's whole test suite: debug build + static agent, Rust tests
# (slow ones included), then the Python client's tests against the real binary.
# Exits non-zero if any phase fails; every phase is bounded by `timeout`.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
cd "$repo"

phase() { echo; echo "=== test.sh: $* ($(date +%T))"; }
failed=()

# What /tmp holds before: the tests must not leave anything of theirs there.
tmp_before="$(ls -1A /tmp 2>/dev/null | sort || true)"

phase "build (debug) and static agent"
timeout -k 30s 20m cargo build --workspace
GWORKER_AGENT="$(timeout -k 30s 15m bash "$repo/scripts/build-agent.sh" | tail -n 1)"
GWORKER_BIN="$repo/target/debug/gworker"
export GWORKER_AGENT GWORKER_BIN GWORKER_SLOW_TESTS=1
echo "GWORKER_BIN=$GWORKER_BIN"
echo "GWORKER_AGENT=$GWORKER_AGENT"

phase "cargo test --workspace"
if ! timeout -k 30s 20m cargo test --workspace --no-fail-fast; then
    failed+=("cargo test")
fi

if [ -d "$repo/tests/python" ]; then
    phase "pytest tests/python"
    rc=0
    # A passing run removes its ~0.5 GB basetemp (daemon data, built
    # images); a failing one keeps it for inspection.
    timeout -k 30s 20m python3 -m pytest -q -o tmp_path_retention_policy=failed tests/python || rc=$?
    case "$rc" in
        0) ;;
        5) echo "test.sh: pytest collected no tests in tests/python" ;;
        *) failed+=("pytest (exit $rc)") ;;
    esac
else
    echo "test.sh: no tests/python; skipping pytest"
fi

phase "nothing left in /tmp"
# The tests' directories are named gw* (pytest's basetemp, kept when a
# test failed, is under pytest-of-*).
left="$(comm -13 <(printf '%s\n' "$tmp_before") <(ls -1A /tmp 2>/dev/null | sort) | grep '^gw' || true)"
if [ -n "$left" ]; then
    echo "test.sh: the tests left these in /tmp:"
    printf '%s\n' "$left" | sed 's/^/  /'
    failed+=("leftovers in /tmp")
else
    echo "none"
fi

echo
if [ "${#failed[@]}" -gt 0 ]; then
    echo "=== test.sh: FAILED: ${failed[*]}"
    exit 1
fi
echo "=== test.sh: all phases passed"
