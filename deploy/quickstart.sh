#!/usr/bin/env bash
# qslice quick start: a whole cluster on this machine, on a demo spool.
#
#   deploy/quickstart.sh [DIR]          start; Ctrl-C stops everything it started
#   deploy/quickstart.sh --down [DIR]   stop a previous run (by its pid files), remove DIR
#
# DIR defaults to ./demo. Starting installs what is missing (protobuf-compiler,
# etcd-server) with apt-get, builds the release binaries, then starts a single-member etcd
# on free loopback ports (data in DIR/etcd), one coordinator (admin API and dashboard) and
# three runners (r1, r2, r3) on the spool DIR/spool, creates the queues `in` (8 slices)
# and `out` (4 slices), and keeps enqueueing Mailman-style entries. Each entry is handled
# by a small demo command that sleeps 0.3 s and appends a line to DIR/processed.log.
# Run it as root or as a user who may sudo (only apt-get runs through sudo).
#
# QSLICE_QUICKSTART_BIN=DIR uses the qslice binaries already built in DIR (e.g.
# target/debug) instead of building the release ones (the tests do this).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN="${QSLICE_QUICKSTART_BIN:-$ROOT/target/release}"
CLUSTER=demo
RUNNERS=(r1 r2 r3)
QUEUES=("in:8" "out:4")
LEASE_TTL=3s
MARKER=.qslice-demo

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# note FORMAT ARGS...: a message of the shutdown, which must never stop it: to stdout while
# stdout takes it, else to stderr (the reader of a pipe, `| tee log`, may be gone: a
# Ctrl-C kills it too), else nowhere; and to NOTES (the demo's log) when set. The
# shutdown ignores SIGPIPE, so a write to a dead pipe only fails.
OUT_GONE=0
NOTES=""
note() {
  # shellcheck disable=SC2059
  [ -z "$NOTES" ] || printf "$@" >>"$NOTES" 2>/dev/null || true
  if [ $OUT_GONE -eq 0 ]; then
    # shellcheck disable=SC2059
    printf "$@" 2>/dev/null && return 0
    OUT_GONE=1
  fi
  # shellcheck disable=SC2059
  printf "$@" >&2 2>/dev/null || true
}
die() { printf 'quickstart: %s\n' "$*" >&2; exit 1; }

# Whether pid $1 is a live (not zombie) process started in demo dir $2: every process
# the quick start starts runs with the demo dir as its working directory, so a recycled
# pid is never signalled.
ours() {
  local pid=$1 dir=$2 state
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  state=$(sed 's/^.*) \(.\).*$/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ "$state" != Z ] || return 1
  [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$dir" ]
}

HURRY=0
# Stops what DIR's pid files name, in order: the feeder, the runners (SIGTERM: they finish
# in-flight entries and release their slices while etcd is still up), the coordinator,
# etcd. Whatever does not exit in time gets SIGKILL (a second Ctrl-C hurries it up).
# Stops the demo process `name` of `dir` (SIGTERM, then SIGKILL after 40 s) and removes
# its pid file.
stop_one() {
  local dir=$1 name=$2 pid deadline
  local f="$dir/pids/$name.pid"
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if ours "$pid" "$dir"; then
    note '    stopping %-12s (pid %s)\n' "$name" "$pid"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 40))
    while ours "$pid" "$dir" && [ $SECONDS -lt $deadline ] && [ $HURRY -eq 0 ]; do sleep 0.1; done
    if ours "$pid" "$dir"; then
      note '    %s did not stop in time: SIGKILL\n' "$name"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$f"
}

stop_all() {
  local dir=$1 name
  [ -d "$dir/pids" ] || return 0
  for name in feeder "${RUNNERS[@]/#/runner-}" coordinator etcd quickstart; do
    stop_one "$dir" "$name"
  done
}

down() {
  local dir=${1:-./demo}
  [ -d "$dir" ] || { echo "nothing to stop: $dir does not exist"; return 0; }
  dir=$(cd "$dir" && pwd)
  [ -f "$dir/$MARKER" ] || die "$dir is not a quick-start demo dir (no $MARKER); not touching it"
  say "stopping the demo in $dir"
  # From here on, as in the quick start's own shutdown, no message may stop us halfway.
  trap '' PIPE
  # The quick start itself stops what it started, in order, when it gets SIGTERM.
  local pid deadline
  pid=$(cat "$dir/pids/quickstart.pid" 2>/dev/null || true)
  if ours "$pid" "$dir"; then
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 60))
    while ours "$pid" "$dir" && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  fi
  stop_all "$dir"
  rm -rf "$dir"
  echo "removed $dir"
}

if [ "${1:-}" = "--down" ]; then
  down "${2:-./demo}"
  exit 0
fi
case "${1:-}" in
  -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  -*) die "unknown option $1 (use --down or --help)" ;;
esac

# --- prerequisites ---------------------------------------------------------------------
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -x /usr/bin/etcd ] || need+=(etcd-server)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "need root or sudo to install ${need[*]}"
    sudo="sudo"
  fi
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
if [ -z "${QSLICE_QUICKSTART_BIN:-}" ]; then
  if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
  fi
  command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust 1.85 or later with rustup (https://rustup.rs), then run this again"
fi

# --- the demo dir ----------------------------------------------------------------------
DEMO=${1:-./demo}
case "$DEMO" in *'"'*|*'\'*) die "the demo dir must not contain quotes or backslashes" ;; esac
if [ -d "$DEMO" ] && [ -n "$(ls -A "$DEMO")" ]; then
  DEMO=$(cd "$DEMO" && pwd)
  [ -f "$DEMO/$MARKER" ] || die "$DEMO exists and is not a quick-start demo dir; give another dir"
  for f in "$DEMO"/pids/*.pid; do
    [ -f "$f" ] && ours "$(cat "$f")" "$DEMO" && die "a demo is already running in $DEMO: stop it with Ctrl-C or $0 --down $DEMO"
  done
  rm -rf "$DEMO"
fi
mkdir -p "$DEMO"
DEMO=$(cd "$DEMO" && pwd)
touch "$DEMO/$MARKER"
mkdir -p "$DEMO/pids" "$DEMO/logs" "$DEMO/state"
for q in "${QUEUES[@]}"; do mkdir -p "$DEMO/spool/${q%%:*}"; done

# --- build -----------------------------------------------------------------------------
if [ -z "${QSLICE_QUICKSTART_BIN:-}" ]; then
  say "building the release binaries (cargo build --release --bins; the first build takes several minutes)"
  (cd "$ROOT" && cargo build --release --bins)
fi
for b in qslice-runner qslice-coordinator qslicectl; do
  [ -x "$BIN/$b" ] || die "$BIN/$b was not built"
done

# From here on, everything started runs in the demo dir and is stopped on exit.
cd "$DEMO"
echo $$ >"$DEMO/pids/quickstart.pid"
SLEEPER=""
# Stops everything, whatever stdout is connected to: no message may kill it (SIGPIPE
# ignored, errexit off, messages through note) and none may fail it.
cleanup() {
  local status=$?
  set +e
  trap '' TERM PIPE
  trap 'HURRY=1' INT
  NOTES="$DEMO/logs/quickstart.log"
  note '\n\033[1m==> %s\033[0m\n' "stopping everything the quick start started"
  [ -z "$SLEEPER" ] || kill "$SLEEPER" 2>/dev/null
  rm -f "$DEMO/pids/quickstart.pid"
  stop_all "$DEMO"
  wait 2>/dev/null
  note 'stopped. Logs are in %s/logs; remove the demo with: %s --down %s\n' "$DEMO" "$0" "$DEMO"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# The reader of our output went away while we still print (`| head`): stop everything
# rather than die of SIGPIPE halfway and leave it running.
trap 'exit 141' PIPE

# start NAME COMMAND...: runs COMMAND in the background in a session of its own (so a
# Ctrl-C reaches only this script, which then stops things in order), output in
# logs/NAME.log.
start() {
  local name=$1
  shift
  setsid "$@" >"$DEMO/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$DEMO/pids/$name.pid"
  # No "Killed" job report when the user kills a runner on purpose.
  disown $!
}

# A loopback port nobody listens on (and not handed out before).
TAKEN=" "
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    case "$TAKEN" in *" $p "*) continue ;; esac
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      TAKEN="$TAKEN$p "
      echo "$p"
      return
    fi
  done
}

etcd_healthy() {
  timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && printf "GET /health HTTP/1.0\r\nHost: x\r\n\r\n" >&3 && grep -q "\"health\":\"true\"" <&3' _ "$1" 2>/dev/null
}

# --- etcd ------------------------------------------------------------------------------
say "starting etcd (single member, data in $DEMO/etcd)"
for attempt in 1 2 3; do
  ETCD_PORT=$(free_port)
  PEER_PORT=$(free_port)
  start etcd /usr/bin/etcd --name qslice-demo --data-dir "$DEMO/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" \
    --initial-cluster "qslice-demo=http://127.0.0.1:$PEER_PORT" --log-level warn --logger zap
  deadline=$((SECONDS + 30))
  while ! etcd_healthy "$ETCD_PORT" && ours "$(cat "$DEMO/pids/etcd.pid")" "$DEMO" && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  etcd_healthy "$ETCD_PORT" && break
  echo "etcd did not come up (attempt $attempt); log:"
  tail -5 "$DEMO/logs/etcd.log" || true
  # Only etcd: stop_all would stop the quick start itself (its own pid file) and end the
  # retry before it began (a port taken between free_port and etcd's bind did).
  stop_one "$DEMO" etcd
  rm -rf "$DEMO/etcd"
  [ "$attempt" -lt 3 ] || die "cannot start etcd"
done
ETCD="http://127.0.0.1:$ETCD_PORT"

# --- coordinator -----------------------------------------------------------------------
ADMIN_PORT=$(free_port)
HTTP_PORT=$(free_port)
ADMIN="127.0.0.1:$ADMIN_PORT"
cat >"$DEMO/coordinator.toml" <<EOF
# The quick start's coordinator (keys: deploy/config/coordinator.toml).
id = "coord1"
cluster = "$CLUSTER"
lease_ttl = "$LEASE_TTL"
http_addr = "127.0.0.1:$HTTP_PORT"
# A planned move may take this long before the old owner is fenced (above drain_timeout).
revoke_deadline = "20s"

[etcd]
endpoints = ["$ETCD"]

[admin]
addr = "$ADMIN"
EOF
say "starting the coordinator (admin API $ADMIN, dashboard http://127.0.0.1:$HTTP_PORT/)"
start coordinator "$BIN/qslice-coordinator" --config "$DEMO/coordinator.toml"

# --- runners ---------------------------------------------------------------------------
cat >"$DEMO/handler.sh" <<'EOF'
#!/bin/sh
# The demo's exec handler: "deliver" one entry (sleep a little), then log it.
sleep 0.3
echo "$(date +%T.%3N) $QSLICE_NODE $QSLICE_QUEUE/$QSLICE_SLICE epoch=$QSLICE_EPOCH $(basename "$1" .bak)" >>"$(dirname "$0")/processed.log"
EOF
cat >"$DEMO/runner.toml" <<EOF
# The quick start's runners (keys: deploy/config/runner.toml); node_id and state_dir are flags.
cluster = "$CLUSTER"
spool = "$DEMO/spool"
lease_ttl = "$LEASE_TTL"
drain_timeout = "10s"

[etcd]
endpoints = ["$ETCD"]

[handler]
kind = "exec"
command = ["/bin/sh", "$DEMO/handler.sh", "{path}"]
timeout = "30s"
EOF
say "starting runners ${RUNNERS[*]} on the spool $DEMO/spool"
for r in "${RUNNERS[@]}"; do
  start "runner-$r" "$BIN/qslice-runner" --config "$DEMO/runner.toml" --node-id "$r" --state-dir "$DEMO/state/$r"
done

CTL=("$BIN/qslicectl" --coordinator "$ADMIN")
deadline=$((SECONDS + 60))
until "${CTL[@]}" --timeout 2s status >/dev/null 2>&1; do
  ours "$(cat "$DEMO/pids/coordinator.pid")" "$DEMO" || { tail -20 "$DEMO/logs/coordinator.log"; die "the coordinator exited"; }
  [ $SECONDS -lt $deadline ] || { tail -20 "$DEMO/logs/coordinator.log"; die "the coordinator's admin API did not answer within 60 s"; }
  sleep 0.3
done

# --- queues and entries ----------------------------------------------------------------
total=0
for q in "${QUEUES[@]}"; do
  say "creating queue ${q%%:*} with ${q##*:} slices (qslicectl queue set ${q%%:*} --slices ${q##*:})"
  "${CTL[@]}" queue set "${q%%:*}" --slices "${q##*:}"
  total=$((total + ${q##*:}))
done
deadline=$((SECONDS + 60))
until [ "$("${CTL[@]}" --json status --slices 2>/dev/null | grep -o '"claim_holder": *"[^"]' | wc -l)" -eq "$total" ]; do
  [ $SECONDS -lt $deadline ] || die "the runners did not claim all $total slices within 60 s (see $DEMO/logs)"
  sleep 0.3
done

# enqueue QUEUE COUNT: Mailman-style entries, <time>+<sha1 hex>.pck, written as .pck.tmp
# and renamed, as Mailman does.
enqueue() {
  local q=$1 n=$2 i t d
  for ((i = 0; i < n; i++)); do
    t=$(date +%s.%6N)
    d=$(head -c 32 /dev/urandom | sha1sum | cut -c1-40)
    printf 'demo message %s queued at %s\n' "$d" "$t" >"$DEMO/spool/$q/$t+$d.pck.tmp"
    mv "$DEMO/spool/$q/$t+$d.pck.tmp" "$DEMO/spool/$q/$t+$d.pck"
  done
}
say "enqueueing 40 entries into in and 20 into out, then 3 a second"
enqueue in 40
enqueue out 20
feed() {
  while :; do
    enqueue in 2
    enqueue out 1
    sleep 1
  done
}
feed >"$DEMO/logs/feeder.log" 2>&1 </dev/null &
echo $! >"$DEMO/pids/feeder.pid"

cat >"$DEMO/env" <<EOF
# . $DEMO/env   puts qslicectl on PATH and points it at the demo coordinator.
export PATH="$BIN:\$PATH"
export QSLICE_COORDINATOR=$ADMIN
EOF

sleep 2
say "qslicectl status"
"${CTL[@]}" status
cat <<EOF

The demo runs (etcd $ETCD, coordinator admin API $ADMIN, lease TTL $LEASE_TTL).
In another shell, put qslicectl on PATH and point it at the demo:

  . $DEMO/env

then look around:

  qslicectl status --slices        # who holds which slice, depth, ages
  qslicectl events --follow        # membership, claims, failovers as they happen
  tail -f $DEMO/processed.log
  Dashboard: http://127.0.0.1:$HTTP_PORT/   (live slice map, failover timeline)

Kill a runner and watch its slices move to the others at once (its leash revokes its lease;
a whole host that dies takes about the lease TTL):

  kill -9 \$(cat $DEMO/pids/runner-r2.pid)
  qslicectl status --slices

Drain one for maintenance instead (a planned move, no gap):  qslicectl drain r3

Stop: Ctrl-C here (stops everything; logs stay in $DEMO/logs),
      or from another shell: $0 --down $DEMO (also removes $DEMO).
EOF

# Wait for Ctrl-C (or SIGTERM); the EXIT trap stops everything.
sleep infinity &
SLEEPER=$!
wait "$SLEEPER"
