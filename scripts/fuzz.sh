#!/usr/bin/env bash
# Fuzzes what the host controls (fuzz/: the ACPI/MADT parser, the PVH and
# boot_params boot information, #VE info decoding, the emulator's kernel
# loaders) with libFuzzer, on the stable toolchain.
#
#   scripts/fuzz.sh SECONDS [TARGET...]
#
# 1. fmt of the fuzz crate, and its replay tests (every seed and every saved
#    crash in fuzz/regressions/ through its target, no libFuzzer);
# 2. builds the targets with libfuzzer-sys (libFuzzer compiled from source by
#    its build script, hence a C++ compiler) and LLVM's SanitizerCoverage
#    through stable rustc flags (-C passes=sancov-module and -C llvm-args),
#    overflow checks and debug assertions on (fuzz/Cargo.toml's release
#    profile), then clippy of the crate with those flags; no sanitizer: safe
#    Rust's bounds checks are the oracle, with the targets' own properties;
# 3. runs each target for SECONDS (-max_total_time) from the seeds and its
#    corpus in target/fuzz/corpus/TARGET (kept between runs, minimised after
#    each with -merge=1), a crash's input written to
#    target/fuzz/artifacts/TARGET/.
# Fails if any step fails or any target crashes.
set -euo pipefail

seconds=${1:?usage: scripts/fuzz.sh SECONDS [TARGET...]}
shift
all_targets=(acpi_madt boot_info ve_info kernel_image)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all_targets[@]}"); fi

root=$(cd "$(dirname "$0")/.." && pwd)
manifest=$root/fuzz/Cargo.toml
export PATH="$HOME/.cargo/bin:$PATH"
# Inside the ignored target/, apart from the main workspace's artifacts
# (other flags, another lock file).
export CARGO_TARGET_DIR=$root/target/fuzz
work=$CARGO_TARGET_DIR
cargo=${CARGO:-cargo}

# libfuzzer-sys builds libFuzzer (C++17) with the system's C++ compiler.
if ! command -v c++ >/dev/null 2>&1; then
    echo "fuzz: no C++ compiler; installing g++"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++
fi

"$cargo" fmt --manifest-path "$manifest" --check
"$cargo" test --manifest-path "$manifest" --locked 2>&1

host=$(rustc -vV | sed -n 's/^host: //p')
# What cargo-fuzz passes, less the nightly-only sanitizer flags. With an
# explicit --target these reach the targets' crates but not build scripts.
export RUSTFLAGS="-C passes=sancov-module \
-C llvm-args=-sanitizer-coverage-level=4 \
-C llvm-args=-sanitizer-coverage-inline-8bit-counters \
-C llvm-args=-sanitizer-coverage-pc-table \
-C llvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing"
instrumented=(--manifest-path "$manifest" --locked --release --features libfuzzer --target "$host")
"$cargo" build "${instrumented[@]}" "${targets[@]/#/--bin=}"
# Same profile, target and flags as the build: libFuzzer is compiled once.
"$cargo" clippy "${instrumented[@]}" --all-targets -- -D warnings
unset RUSTFLAGS
bin=$work/$host/release

"$cargo" run --quiet --manifest-path "$manifest" --locked --bin write-seeds -- "$work/corpus"

max_len() {
    case $1 in
        kernel_image) echo 16384 ;;
        ve_info) echo 1024 ;;
        *) echo 8192 ;;
    esac
}

summary=()
failed=0
for target in "${targets[@]}"; do
    corpus=$work/corpus/$target
    artifacts=$work/artifacts/$target
    log=$work/logs/$target.log
    mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
    # The saved crashes are read too (never written: new inputs go to the
    # first directory).
    saved=()
    [ -d "$root/fuzz/regressions/$target" ] && saved=("$root/fuzz/regressions/$target")
    echo "fuzz: $target for ${seconds}s (corpus $corpus)"
    start=$SECONDS
    status=0
    # -timeout: an input that takes 10 s is a hang, and a failure.
    "$bin/$target" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -max_len="$(max_len "$target")" -use_value_profile=1 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" "$corpus" "${saved[@]}" \
        >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    fuzzed=$((SECONDS - start))
    if [ "$status" -eq 0 ]; then
        # Keep only the inputs that add coverage, so the next run (the
        # smoke run in make test too) does not spend its seconds reloading
        # thousands of redundant ones.
        rm -rf "$corpus.min" && mkdir "$corpus.min"
        if "$bin/$target" -merge=1 -timeout=10 -rss_limit_mb=2048 \
            -max_len="$(max_len "$target")" "$corpus.min" "$corpus" >"$log.merge" 2>&1; then
            rm -rf "$corpus" && mv "$corpus.min" "$corpus"
        else
            rm -rf "$corpus.min"
        fi
    fi
    units=$(find "$corpus" -type f | wc -l)
    line="$target: ${runs:-?} runs in ${fuzzed}s, corpus $units inputs"
    if [ "$status" -ne 0 ]; then
        failed=$((failed + 1))
        tail -n 60 "$log"
        line="$line, FAILED (exit $status): input in $artifacts/; replay: $bin/$target FILE"
    fi
    echo "fuzz: $line"
    summary+=("$line")
done
echo "fuzz: summary"
printf '  %s\n' "${summary[@]}"
echo "fuzz: $((${#targets[@]} - failed)) passed, $failed failed"
[ "$failed" -eq 0 ]
