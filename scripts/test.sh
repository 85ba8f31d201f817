#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit/property/integration tests (root tests use
# network namespaces they create and remove), and the conformance scenarios, offline and
# with real packets, and the images.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test"
# Root integration tests each build their own namespaces; one test thread per binary keeps
# the two-core machines from timing out probes.
cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-2}"

echo "== mutation check of the agreement property"
# Planted bugs in the compiled side must each make the property fail (a few minutes).
scripts/mutants.sh

echo "== conformance (offline)"
cargo build --release --locked -p palisadectl -p palisade-agent -p palisade-controller
bin=target/release
"$bin/palisadectl" verify tests/conformance/* ../shared/conformance/examples/*

echo "== images (buildah, then podman run: --version, and the agent applying its table)"
# The chart's default image names and tag, from the release binaries just built (~15 s).
scripts/images.sh --no-build

echo "== conformance (dataplane)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
"$bin/palisadectl" verify --dataplane --agent "$bin/palisade-agent" tests/conformance/* ../shared/conformance/examples/* \
    | tee "$log"
# The only probes this kernel may skip are SCTP ones (no SCTP module); anything else that
# could not be probed is a failure of the run, not a pass.
if grep '^SKIP ' "$log" | grep -v ': the kernel does not support SCTP$'; then
    echo "error: dataplane probes skipped for a reason other than missing SCTP support (above)" >&2
    exit 1
fi

echo "== conformance (through the API: apiserver, controller, agents, packets)"
# One control plane for the whole run (target/tools, from scripts/tools.sh); the same skip
# rule as the dataplane run.
"$bin/palisadectl" verify --api --agent "$bin/palisade-agent" --controller "$bin/palisade-controller" \
    --kube-bin target/tools/bin tests/conformance/* ../shared/conformance/examples/* \
    | tee "$log"
if grep '^SKIP ' "$log" | grep -v ': the kernel does not support SCTP$'; then
    echo "error: probes through the API skipped for a reason other than missing SCTP support (above)" >&2
    exit 1
fi

echo "== fuzzing (bounded: every target, 20 s each)"
# Unoptimized instrumented build (about 4 CPU-minutes; optimized, palisade-resources alone
# takes over 10).
FUZZ_DEV=1 FUZZ_SECONDS="${FUZZ_SECONDS:-20}" scripts/fuzz.sh
