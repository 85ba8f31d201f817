#!/usr/bin/env bash
# Runs each cargo-fuzz target of fuzz/ for a bounded time and fails on a crash, a timeout
# or an out-of-memory, leaving the input in fuzz/artifacts/TARGET/ (replay it with
# `cargo +nightly fuzz run TARGET FILE`, then add it to fuzz/seeds/TARGET/ with the fix).
#
#   FUZZ_SECONDS   seconds per target (default 60)
#   FUZZ_TARGETS   space-separated targets (default: all of them)
#   FUZZ_DEV=1     build without optimization (`cargo fuzz build --dev`): about 4 CPU-minutes
#                  instead of more than 15 (palisade-resources alone takes over 10 optimized
#                  with coverage instrumentation), for fewer executions a second; CI uses it
#
# Toolchain: nightly when rustup has it installed; otherwise the stable toolchain with
# RUSTC_BOOTSTRAP=1 (nothing is downloaded from rustup's servers). AddressSanitizer when
# the toolchain ships its runtime, else `--sanitizer none`. cargo-fuzz is installed from
# crates.io when missing. The script says which it used.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-60}"
read -ra targets <<<"${FUZZ_TARGETS:-cluster_file policies_file rules_file stream_update differential}"
# Never let a `+toolchain` make rustup download one.
export RUSTUP_AUTO_INSTALL=0

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz from crates.io"
    cargo install cargo-fuzz --locked
fi

toolchain=()
if command -v rustup >/dev/null && rustup toolchain list | grep -q '^nightly'; then
    toolchain=(+nightly)
    echo "fuzz: toolchain: nightly ($(rustc +nightly --version))"
else
    export RUSTC_BOOTSTRAP=1
    echo "fuzz: toolchain: stable with RUSTC_BOOTSTRAP=1, no nightly installed ($(rustc --version))"
fi
sysroot=$(rustc "${toolchain[@]}" --print sysroot)
if compgen -G "$sysroot/lib/rustlib/*/lib/librustc-*_rt.asan.a" >/dev/null; then
    sanitizer=address
else
    sanitizer=none
fi
echo "fuzz: sanitizer: $sanitizer; $seconds s per target: ${targets[*]}"

profile=()
if [ "${FUZZ_DEV:-0}" = 1 ]; then profile=(--dev); fi
echo "fuzz: build: ${profile[*]:-release}"

start=$SECONDS
build_log=$(mktemp)
# All targets in one build (they share every dependency); `run` then finds them built.
if ! cargo "${toolchain[@]}" fuzz build "${profile[@]}" --sanitizer "$sanitizer" >"$build_log" 2>&1; then
    tail -n 60 "$build_log"
    echo "fuzz: build failed" >&2
    exit 1
fi
rm -f "$build_log"
echo "fuzz: built in $((SECONDS - start)) s"

# Seeds: the committed ones (past findings among them) and every conformance scenario's
# files; rules_file and stream_update compile theirs from the scenarios at start-up.
scenarios=$(printf '%s\n' "$PWD"/tests/conformance/*/ "$PWD"/../shared/conformance/examples/*/)
seed() {
    local target=$1 file=$2
    local dir=fuzz/corpus/$target
    mkdir -p "$dir"
    if [ -d "fuzz/seeds/$target" ]; then
        cp -n fuzz/seeds/"$target"/* "$dir"/ 2>/dev/null || true
    fi
    [ -n "$file" ] || return 0
    for f in tests/conformance/*/"$file" ../shared/conformance/examples/*/"$file"; do
        [ -f "$f" ] && cp -n "$f" "$dir/$(basename "$(dirname "$f")")-$file"
    done
    return 0
}

failed=()
for target in "${targets[@]}"; do
    case $target in
    cluster_file) seed "$target" cluster.yaml ;;
    policies_file) seed "$target" policies.yaml ;;
    *) seed "$target" "" ;;
    esac
    log=$(mktemp)
    echo "== fuzz $target ($seconds s)"
    if PALISADE_FUZZ_SEED_DIR="$PWD/fuzz/corpus/$target" PALISADE_FUZZ_SCENARIOS="$scenarios" \
        cargo "${toolchain[@]}" fuzz run "${profile[@]}" --sanitizer "$sanitizer" "$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1; then
        stat() { grep -o "stat::$1: *[0-9]*" "$log" | grep -o '[0-9]*$' || echo "?"; }
        echo "fuzz: $target: $(stat number_of_executed_units) execs in $seconds s," \
            "$(stat new_units_added) new inputs, peak RSS $(stat peak_rss_mb) MB"
    else
        tail -n 60 "$log"
        echo "fuzz: $target FAILED; the input is in fuzz/artifacts/$target/" >&2
        failed+=("$target")
    fi
    rm -f "$log"
done

echo "fuzz: total $((SECONDS - start)) s"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: failed: ${failed[*]}" >&2
    exit 1
fi
