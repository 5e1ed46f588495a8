#!/usr/bin/env bash
# The test command: installs what the tests need (Debian), checks the format and the lints,
# builds the binaries the end-to-end tests run, and runs the whole suite.
# Usage: bash tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -x /usr/bin/etcd ] || need+=(etcd-server)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
# Headless Chromium drives the dashboard test (it skips, and says so, without it).
[ -x /usr/bin/chromium ] || need+=(chromium)
# promtool checks and unit-tests deploy/prometheus/qslice-alerts.yml (the test fails
# without it); the package is only here for promtool.
[ -x /usr/bin/promtool ] || need+=(prometheus)
# The whole-site Mailman tests start a PostgreSQL server of their own (Debian's server
# binaries, run on a Unix socket in a temporary directory); the package's own cluster is
# not started (the policy below).
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
# The NFS tests boot QEMU guests (software emulation) running Debian's kernel, built into
# an initramfs with busybox, cpio and kmod, against nfs-ganesha and rpcbind run by the
# tests in a network namespace of their own (the packages' own services are not started:
# the policy below).
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v cpio >/dev/null 2>&1 || need+=(cpio)
command -v depmod >/dev/null 2>&1 || need+=(kmod)
[ -x /usr/bin/ganesha.nfsd ] || need+=(nfs-ganesha nfs-ganesha-vfs)
command -v rpcbind >/dev/null 2>&1 || [ -x /usr/sbin/rpcbind ] || [ -x /sbin/rpcbind ] || need+=(rpcbind)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  # Debian's postinsts would start servers (Prometheus and the node exporter it
  # recommends, PostgreSQL, ganesha, rpcbind): a policy-rc.d that denies them (exit 101)
  # keeps them stopped during the install, unless the machine has a policy of its own;
  # and they are not enabled for the next boot either.
  policy=/usr/sbin/policy-rc.d
  own_policy=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# tests/run.sh: no Prometheus, PostgreSQL or NFS server while installing the tests tools\ncase "$1" in prometheus|prometheus-node-exporter|postgresql*|nfs-ganesha|rpcbind|nfs-common) exit 101 ;; esac\nexit 0\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
    own_policy=$policy
  fi
  installed=0
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" && installed=1
  [ -z "$own_policy" ] || $sudo rm -f "$own_policy"
  [ $installed -eq 1 ] || { echo "installing ${need[*]} failed" >&2; exit 1; }
  if [[ " ${need[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    $sudo systemctl disable --now prometheus.service prometheus-node-exporter.service >/dev/null 2>&1 || true
  fi
  if [[ " ${need[*]} " == *" postgresql "* ]] && [ -d /run/systemd/system ]; then
    $sudo systemctl disable --now postgresql.service >/dev/null 2>&1 || true
  fi
  if [[ " ${need[*]} " == *" nfs-ganesha "* || " ${need[*]} " == *" rpcbind "* ]] && [ -d /run/systemd/system ]; then
    $sudo systemctl disable --now nfs-ganesha.service rpcbind.service rpcbind.socket >/dev/null 2>&1 || true
  fi
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
# The marker holds the requirements the venv was built from: a changed list rebuilds it.
if ! cmp -s tests/fixtures/mailman3-requirements.txt "$venv/.qslice-complete"; then
  echo "== building the Mailman 3.3.10 venv in $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/fixtures/mailman3-requirements.txt
  cp tests/fixtures/mailman3-requirements.txt "$venv/.qslice-complete"
fi

# Format and lint (rustfmt.toml; clippy's warnings are errors).
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component"
  fi
done
# Each step says when it starts, in seconds since the test command began.
step() { echo "== [${SECONDS}s] $*"; }
step "format and lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

step "build"
# The tests' targets too: built with the binaries, the dependencies are compiled once with
# the features the tests add, and the test step starts at once.
cargo build --workspace --bins --tests
# The whole suite, with the benchmark programs in their short mode so that they cannot
# rot (tests/tests/benches.rs: each must finish and print figures that say it measured
# something; the figures are the README's full runs', and the short runs' figures, taken
# beside other tests, are in the log only to read).
step "tests"
cargo nextest run --workspace --no-fail-fast
# The parsers of outside input, fuzzed briefly (a longer run: bash tests/fuzz/run.sh 600).
step "fuzz"
bash tests/fuzz/run.sh "${QSLICE_FUZZ_SECONDS:-10}"
step "done"
