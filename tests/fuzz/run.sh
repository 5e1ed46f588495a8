#!/usr/bin/env bash
# Runs each fuzz target for a while: bash tests/fuzz/run.sh [SECONDS_PER_TARGET] (default 20).
# Needs cargo-fuzz (installed here if missing) and, on a stable toolchain, RUSTC_BOOTSTRAP=1
# for the unstable flags of its instrumentation. New inputs go to a scratch corpus; the committed seeds are only
# read. A crash leaves its input under the scratch dir, named in the output: turn it into
# a unit test beside the parser it broke.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-20}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${QSLICE_FUZZ_TARGET_DIR:-$PWD/target}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for target in $(cargo fuzz list --fuzz-dir .); do
  mkdir -p "$scratch/$target"
  echo "== fuzz $target for ${seconds}s"
  # No sanitizer: the parsers are safe Rust (no `unsafe` in qslice-proto), where a bug is a
  # panic libFuzzer catches anyway; the build is a quarter faster and runs faster.
  if ! cargo fuzz run --sanitizer none --fuzz-dir . "$target" "$scratch/$target" "seeds/$target" -- \
      -max_total_time="$seconds" -artifact_prefix="$scratch/" -print_final_stats=1 2>"$scratch/$target.log"; then
    tail -n 40 "$scratch/$target.log"
    keep="$(mktemp -d /tmp/qslice-fuzz-crash.XXXXXX)"
    cp -r "$scratch"/. "$keep"/
    echo "fuzz target $target failed; its inputs and log are kept in $keep" >&2
    exit 1
  fi
  grep -E "stat::number_of_executed_units|stat::new_units_added" "$scratch/$target.log" | tr '\n' ' '
  echo
done
