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

# The real-Mailman tests run Mailman 3.3.10 from PyPI in a venv under the target dir,
# built here once (about a minute on a fresh machine) and reused by later runs.
if ! python3 -m venv --help >/dev/null 2>&1; then
  echo "installing python3-venv"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv
fi
target_dir="${CARGO_TARGET_DIR:-target}"
venv="$target_dir/mailman-3.3.10-venv"
if [ ! -f "$venv/.qslice-complete" ]; then
  echo "== building the Mailman 3.3.10 venv in $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/fixtures/mailman3-requirements.txt
  echo 3.3.10 > "$venv/.qslice-complete"
fi

cargo build --workspace --bins
# The benchmark programs in their short mode, so they cannot rot (figures: README).
bin_dir="$target_dir/debug"
for bench in bench_failover bench_mailman3 bench_throughput bench_scale bench_footprint; do
  echo "== $bench --quick"
  "$bin_dir/$bench" --quick | tail -n 12
done
cargo nextest run --workspace --no-fail-fast
# The parsers of outside input, fuzzed briefly (a longer run: bash tests/fuzz/run.sh 600).
bash tests/fuzz/run.sh "${QSLICE_FUZZ_SECONDS:-15}"
