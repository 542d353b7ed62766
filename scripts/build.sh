#!/usr/bin/env bash
# Build the whole workspace and the static agent.
# Usage: scripts/build.sh [--release]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"
cd "$repo"

profile=debug
cargo_flags=()
for arg in "$@"; do
    case "$arg" in
        --release) profile=release; cargo_flags+=(--release) ;;
        -h|--help) echo "usage: $0 [--release]"; exit 0 ;;
        *) echo "build: unknown argument $arg" >&2; exit 2 ;;
    esac
done

cargo build --workspace "${cargo_flags[@]}"
agent="$(bash "$repo/scripts/build-agent.sh" "${cargo_flags[@]}")"
echo "gworker: $repo/target/$profile/gworker"
echo "agent:   $agent"
