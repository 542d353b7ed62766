#!/usr/bin/env bash
# Build the in-sandbox agent as a fully static binary (static-pie, glibc,
# no musl needed) and print its path. Usage: scripts/build-agent.sh [--release]
# The binary runs inside any image: the engine bind-mounts it at /.gworker/agent.
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
        *) echo "build-agent: unknown argument $arg" >&2; exit 2 ;;
    esac
done

target=x86_64-unknown-linux-gnu
# --target keeps these RUSTFLAGS away from build scripts and proc macros, and
# puts the result in target/$target/, apart from the normal (dynamic) builds.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --target "$target" -p gworker-agent "${cargo_flags[@]}" >&2

bin="$repo/target/$target/$profile/gworker-agent"
if [ ! -x "$bin" ]; then
    echo "build-agent: $bin was not produced" >&2
    exit 1
fi

# Static means no program interpreter (PT_INTERP) and no shared libraries.
if command -v readelf >/dev/null 2>&1; then
    if readelf -lW "$bin" | grep -q 'INTERP' || readelf -dW "$bin" | grep -q '(NEEDED)'; then
        echo "build-agent: $bin is not static:" >&2
        readelf -lW "$bin" | grep -A1 INTERP >&2 || true
        readelf -dW "$bin" | grep NEEDED >&2 || true
        exit 1
    fi
else
    out="$(ldd "$bin" 2>&1 || true)"
    case "$out" in
        *"not a dynamic executable"*|*"statically linked"*) ;;
        *) echo "build-agent: $bin is not static: $out" >&2; exit 1 ;;
    esac
fi
echo "$bin"
