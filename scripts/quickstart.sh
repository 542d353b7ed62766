#!/usr/bin/env bash
# Quick start on a fresh Debian 12 machine: install what is missing, build
# gworker, start the daemon (if it is not running yet), build the default
# image with progress, and run Python code inside a real gVisor sandbox
# through the Python client.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"
cd "$repo"

bash scripts/install-deps.sh
echo "quickstart: building (release)…"
bash scripts/build.sh --release >/dev/null
gw="$repo/target/release/gworker"
agent="$repo/target/x86_64-unknown-linux-gnu/release/gworker-agent"

sock="$(python3 -c 'from gworker_client._transport import default_socket_path; print(default_socket_path())' 2>/dev/null || echo /run/gworker/gworker.sock)"
if ! curl -sf --unix-socket "$sock" http://gworker/v1/health >/dev/null 2>&1; then
    log=/tmp/gworker-daemon.log
    echo "quickstart: starting the daemon (socket $sock, log $log)"
    nohup "$gw" serve --agent "$agent" >"$log" 2>&1 &
    for _ in $(seq 100); do
        curl -sf --unix-socket "$sock" http://gworker/v1/health >/dev/null 2>&1 && break
        sleep 0.1
    done
fi

echo "quickstart: building the default image (debian-slim; cached after the first time)"
"$gw" image build debian-slim >/dev/null

echo "quickstart: running Python in a gVisor sandbox"
python3 examples/quickstart.py
