#!/usr/bin/env bash
# Least-privilege etcd access for one qslice cluster: a role and user per part, each
# limited to the cluster's key prefix /qslice/<cluster>/.
#
#   qslice-runner-<cluster>       read the cluster's keys; write only node records, claims
#                                 and slice figures (nodes/, claims/, status/)
#   qslice-coordinator-<cluster>  read and write the cluster's keys: the assignment and the
#                                 election, the configuration the admin API writes (the admin
#                                 API runs inside the coordinator), and revoking a runner's
#                                 lease (etcd requires write access to the lease's keys)
#
# Usage (etcdctl from the etcd-client package; talks to the cluster in ETCDCTL_ENDPOINTS,
# with ETCDCTL_CACERT/ETCDCTL_CERT/ETCDCTL_KEY for TLS):
#   CLUSTER=prod ROOT_PASSWORD=... RUNNER_PASSWORD=... COORDINATOR_PASSWORD=... \
#     bash deploy/etcd/roles.sh
# Then give runners `etcd.user = "qslice-runner-prod"` and coordinators
# `etcd.user = "qslice-coordinator-prod"` (with their passwords) in their configs.
# Re-running is safe: existing users and roles are kept and permissions re-granted.
# If auth is already enabled, also set ETCDCTL_USER=root:<root password>.
set -euo pipefail

: "${CLUSTER:?set CLUSTER to the qslice cluster name (the key prefix /qslice/<cluster>/)}"
: "${RUNNER_PASSWORD:?set RUNNER_PASSWORD}"
: "${COORDINATOR_PASSWORD:?set COORDINATOR_PASSWORD}"
prefix="/qslice/${CLUSTER}/"
runner="qslice-runner-${CLUSTER}"
coordinator="qslice-coordinator-${CLUSTER}"

ctl() { etcdctl "$@"; }
exists() { ctl "$1" get "$2" >/dev/null 2>&1; }

# etcd needs a root user with the root role before auth can be enabled.
if ! exists user root; then
  : "${ROOT_PASSWORD:?set ROOT_PASSWORD (etcd needs a root user to enable auth)}"
  ctl user add "root:${ROOT_PASSWORD}" >/dev/null
  ctl user grant-role root root >/dev/null
fi

for role in "$runner" "$coordinator"; do
  exists role "$role" || ctl role add "$role" >/dev/null
done
# Runners: read the whole cluster prefix, write only their own kinds of keys.
ctl role grant-permission "$runner" --prefix=true read "$prefix" >/dev/null
for kind in nodes claims status; do
  ctl role grant-permission "$runner" --prefix=true readwrite "${prefix}${kind}/" >/dev/null
done
# Coordinators: the whole cluster prefix (assignment, election, configuration, revokes).
ctl role grant-permission "$coordinator" --prefix=true readwrite "$prefix" >/dev/null

exists user "$runner" || ctl user add "${runner}:${RUNNER_PASSWORD}" >/dev/null
exists user "$coordinator" || ctl user add "${coordinator}:${COORDINATOR_PASSWORD}" >/dev/null
ctl user grant-role "$runner" "$runner" >/dev/null
ctl user grant-role "$coordinator" "$coordinator" >/dev/null

ctl auth enable >/dev/null 2>&1 || true
echo "qslice roles for cluster ${CLUSTER}: users ${runner} and ${coordinator}; auth enabled"
