#!/usr/bin/env bash
# Installs what `make run` and `make test` need and is not there yet.
# Idempotent: a machine that has everything is left alone.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if ! have cargo && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! have cargo; then
    echo "setup: no Rust toolchain; installing rustup (stable)"
    have curl || { apt-get update -qq && apt-get install -y -qq curl ca-certificates; }
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    export PATH="$HOME/.cargo/bin:$PATH"
fi
have cc || { apt-get update -qq && apt-get install -y -qq build-essential; }

if have rustup; then
    installed_targets=$(rustup target list --installed)
    grep -qx x86_64-unknown-none <<<"$installed_targets" || rustup target add x86_64-unknown-none
    installed_components=$(rustup component list --installed)
    for component in clippy rustfmt; do
        grep -q "^$component" <<<"$installed_components" || rustup component add "$component"
    done
fi

cargo fetch --quiet
