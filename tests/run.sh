#!/usr/bin/env bash
# The test command: installs what the tests need (Debian), builds the binaries the
# end-to-end tests run, and runs the whole suite. Usage: bash tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -x /usr/bin/etcd ] || need+=(etcd-server)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
# Headless Chromium drives the dashboard test (it skips, and says so, without it).
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
if ! command -v cargo-nextest >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

cargo build --workspace --bins
# The benchmark programs in their short mode, so they cannot rot (figures: README).
bin_dir="${CARGO_TARGET_DIR:-target}/debug"
for bench in bench_failover bench_throughput bench_scale bench_footprint; do
  echo "== $bench --quick"
  "$bin_dir/$bench" --quick | tail -n 12
done
cargo nextest run --workspace --no-fail-fast
