#!/usr/bin/env bash
# Install what gworker needs to build and test on Debian 12 (x86_64).
# Idempotent: only missing pieces are installed, so a second run takes ~1 s.
# Runs as root (or uses sudo). Needs only the package registries.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"
export DEBIAN_FRONTEND=noninteractive

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi

log() { echo "install-deps: $*"; }

# --- Debian packages ---------------------------------------------------------
# runsc: gVisor; busybox-static + mmdebstrap: the built-in images;
# iproute2 + iptables: sandbox networking (netns, veth, NAT);
# util-linux: flock/unshare; gcc + libc6-dev: linker and static glibc for the
# agent; binutils: readelf (static check); sqlite3: inspecting the daemon's DB.
apt_pkgs=(runsc busybox-static mmdebstrap iproute2 iptables util-linux gcc libc6-dev binutils sqlite3 docker-registry apache2-utils)
missing=()
for p in "${apt_pkgs[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    $sudo apt-get update -q
    $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    log "debian packages present"
fi

# --- Rust --------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: cargo not found (expected rustup's toolchain in ~/.cargo/bin)" >&2
    exit 1
fi
target=x86_64-unknown-linux-gnu
if command -v rustup >/dev/null 2>&1; then
    if ! rustup target list --installed | grep -qx "$target"; then
        log "rustup target add $target"
        rustup target add "$target"
    fi
fi
log "$(cargo --version)"

# --- Python: pytest and the client (editable) ------------------------------
py=python3
pip_flags=(-q --disable-pip-version-check --root-user-action=ignore)
# Debian's own python3 refuses system-wide pip installs (PEP 668).
if "$py" -c 'import os, sys, sysconfig; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED")) else 1)'; then
    pip_flags+=(--break-system-packages)
fi
if ! "$py" -m pip --version >/dev/null 2>&1; then
    log "apt-get install python3-pip"
    $sudo apt-get update -q
    $sudo apt-get install -y -q python3-pip
fi
if ! "$py" -c 'import pytest' >/dev/null 2>&1; then
    log "pip install pytest"
    "$py" -m pip install "${pip_flags[@]}" pytest
fi
# schemathesis: API fuzzing against /v1/openapi.json (tests/python/test_faults.py).
if ! "$py" -c 'import schemathesis' >/dev/null 2>&1; then
    log "pip install schemathesis"
    "$py" -m pip install "${pip_flags[@]}" schemathesis
fi

client="$repo/clients/python"
if [ -f "$client/pyproject.toml" ] || [ -f "$client/setup.py" ]; then
    dist="$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$client/pyproject.toml" 2>/dev/null | head -n 1)"
    location=""
    if [ -n "$dist" ]; then
        # pip show exits 1 for a package that is not installed.
        location="$({ "$py" -m pip show "$dist" 2>/dev/null || true; } | sed -n 's/^Editable project location: //p')"
    fi
    if [ -z "$dist" ] || [ "$location" != "$client" ]; then
        log "pip install -e clients/python"
        "$py" -m pip install "${pip_flags[@]}" -e "$client"
    else
        log "python client installed (editable, $client)"
    fi
fi
log "done"
