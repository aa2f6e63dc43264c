#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 30), one after
# the other, from the checked-in seed corpus. Exits non-zero at the first
# crash, leak or failed property (libFuzzer writes the input to
# fuzz/artifacts/<target>/). See fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-30}"

# cargo-fuzz builds with nightly-only flags (-Zsanitizer, ...); the
# project's toolchain is stable, and RUSTC_BOOTSTRAP=1 lets it use them.
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# The lock file is checked in: fail if it does not match, as --locked does.
cargo fetch --locked --quiet

# Fewer, larger codegen units would fuzz a little faster but build much
# slower; builds dominate short runs.
opts=(--codegen-units 16 --target-dir "${CARGO_TARGET_DIR:-$PWD/target}/fuzz")
cargo fuzz build "${opts[@]}"

# New inputs go to a scratch corpus, so a run never changes the checked-in
# one (add an input there by hand when it is worth keeping).
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in $(cargo fuzz list); do
    echo "fuzz: $target for ${secs}s"
    mkdir -p "$scratch/$target"
    cargo fuzz run "${opts[@]}" "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
