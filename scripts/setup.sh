#!/usr/bin/env bash
# Installs what `make run` and `make test` need and is not there yet:
# a C toolchain, QEMU (TCG, no KVM needed), a Rust toolchain with the
# x86_64-unknown-none target, clippy and rustfmt, and the crates.
# Idempotent: a machine that has everything is left alone.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }
apt_updated=
apt_install() {
    [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

have cc || apt_install build-essential
have qemu-system-x86_64 || apt_install qemu-system-x86

export PATH="$HOME/.cargo/bin:$PATH"
if ! have cargo; then
    echo "setup: no Rust toolchain; installing rustup (stable)"
    have curl || apt_install curl ca-certificates
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
fi
if have rustup; then
    grep -qx x86_64-unknown-none <<<"$(rustup target list --installed)" \
        || rustup target add x86_64-unknown-none
    installed_components=$(rustup component list --installed)
    for component in clippy rustfmt; do
        grep -q "^$component" <<<"$installed_components" || rustup component add "$component"
    done
fi
cargo fetch --quiet
