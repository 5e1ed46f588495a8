//! Fixtures for end-to-end runs: a spool, runners and coordinators as real processes, a
//! recording handler, and direct reads and writes of etcd (the assignment the coordinator
//! leader writes, the claims runners hold). [`crate::testcluster::TestCluster`] puts them
//! together; the pieces here are for what it does not cover.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::Client;
use qslice_common::spool::QueueDir;
use qslice_proto::keys::Keys;
use qslice_proto::records::{Assignment, Record, RECORD_VERSION};

use crate::{qslice_bin, Etcd, Proc};

/// A temporary spool with a recording handler script. Clones share one spool (a test and
/// its [`crate::testcluster::TestCluster`], say); it goes with the last of them.
#[derive(Clone)]
pub struct Spool {
    inner: std::sync::Arc<SpoolDir>,
}

/// The spool's directory; dropping it kills what its handlers left running.
struct SpoolDir {
    dir: tempfile::TempDir,
    /// Where runners find the spool when not at its root: a mount of it (a faulty file
    /// system); the test itself keeps working on the root.
    runner_root: std::sync::OnceLock<PathBuf>,
}

/// One line the recording handler wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rec {
    /// "start" or "end".
    pub what: String,
    /// The entry's file base.
    pub filebase: String,
    /// The runner's node id.
    pub node: String,
    /// The claim epoch the entry was handed under.
    pub epoch: i64,
    /// The slice.
    pub slice: u32,
    /// Nanoseconds since the epoch.
    pub at_ns: u128,
    /// The queue's slice count the entry was handed over under (0 if not recorded).
    pub slices: u32,
}

impl Spool {
    /// A spool root with the given queue directories.
    pub fn new(queues: &[&str]) -> Result<Spool> {
        let dir = tempfile::Builder::new().prefix("qslice-spool-").tempdir()?;
        for q in queues {
            std::fs::create_dir_all(dir.path().join("spool").join(q))?;
        }
        Ok(Spool { inner: std::sync::Arc::new(SpoolDir { dir, runner_root: std::sync::OnceLock::new() }) })
    }

    fn dir(&self) -> &Path {
        self.inner.dir.path()
    }

    /// The spool root.
    pub fn root(&self) -> PathBuf {
        self.dir().join("spool")
    }

    /// Runners started from now on see the spool at `path` (a mount of [`Spool::root`]).
    pub fn serve_runners_from(&self, path: &Path) -> Result<()> {
        self.inner.runner_root.set(path.to_owned()).map_err(|p| anyhow::anyhow!("runners already see the spool at {}", p.display()))
    }

    /// Where runners see the spool: its root, or the mount given to [`Spool::serve_runners_from`].
    pub fn runner_root(&self) -> PathBuf {
        self.inner.runner_root.get().cloned().unwrap_or_else(|| self.root())
    }

    /// A scratch path for logs and state.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    /// One queue directory.
    pub fn queue(&self, queue: &str) -> QueueDir {
        QueueDir::new(self.root(), queue)
    }

    /// Where the recording handler appends its lines.
    pub fn records_path(&self) -> PathBuf {
        self.inner.records_path()
    }

    /// A worker coprocess command that records each entry like the exec handler and
    /// answers `ok`; it also records one `worker` line per coprocess start.
    pub fn recording_worker(&self) -> String {
        let rec = self.records_path();
        let script = format!(
            "echo \"worker - $QSLICE_NODE $QSLICE_EPOCH $QSLICE_SLICE $$\" >> {rec}; \
             while read p; do b=$(basename \"$p\" .bak); \
             echo \"start $b $QSLICE_NODE $QSLICE_EPOCH $QSLICE_SLICE $(date +%s%N)\" >> {rec}; \
             echo \"end $b $QSLICE_NODE $QSLICE_EPOCH $QSLICE_SLICE $(date +%s%N)\" >> {rec}; \
             echo ok; done",
            rec = rec.display()
        );
        serde_json::to_string(&["/bin/sh", "-c", &script]).expect("json")
    }

    /// The exec handler command that records start and end of each entry and sleeps
    /// `$QSLICE_TEST_DELAY` seconds (default 0) in between.
    pub fn recording_handler(&self) -> String {
        let rec = self.records_path();
        let script = format!(
            "echo $$ >> {pgids}; b=$(basename \"$QSLICE_PATH\" .bak); \
             echo \"start $b $QSLICE_NODE $QSLICE_EPOCH $QSLICE_SLICE $(date +%s%N) $QSLICE_SLICES\" >> {rec}; \
             sleep ${{QSLICE_TEST_DELAY:-0}}; \
             echo \"end $b $QSLICE_NODE $QSLICE_EPOCH $QSLICE_SLICE $(date +%s%N) $QSLICE_SLICES\" >> {rec}",
            rec = rec.display(),
            pgids = self.pgids_path().display()
        );
        serde_json::to_string(&["/bin/sh", "-c", &script]).expect("json")
    }

    /// Where each handler run records its process group id (it leads its own group).
    fn pgids_path(&self) -> PathBuf {
        self.inner.pgids_path()
    }

    /// Every line the handler wrote so far.
    pub fn records(&self) -> Vec<Rec> {
        let text = std::fs::read_to_string(self.records_path()).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some(Rec {
                    what: f.first()?.to_string(),
                    filebase: f.get(1)?.to_string(),
                    node: f.get(2)?.to_string(),
                    epoch: f.get(3)?.parse().ok()?,
                    slice: f.get(4)?.parse().ok()?,
                    at_ns: f.get(5)?.parse().ok()?,
                    slices: f.get(6).and_then(|s| s.parse().ok()).unwrap_or(0),
                })
            })
            .collect()
    }

    /// Entries (file bases) whose handler ended, with how many times.
    pub fn finished(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for r in self.records().into_iter().filter(|r| r.what == "end") {
            *out.entry(r.filebase).or_insert(0) += 1;
        }
        out
    }
}

impl SpoolDir {
    fn pgids_path(&self) -> PathBuf {
        self.dir.path().join("handler-pgids")
    }

    fn records_path(&self) -> PathBuf {
        self.dir.path().join("records.log")
    }
}

impl Drop for SpoolDir {
    /// A handler's own children outlive a runner killed with SIGKILL (only the handler
    /// itself dies with the runner): kill every handler process group so that nothing
    /// is left running after a test.
    fn drop(&mut self) {
        let text = std::fs::read_to_string(self.pgids_path()).unwrap_or_default();
        let groups: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        let records = self.records_path();
        let marker = format!("{}", records.display());
        let Ok(procs) = std::fs::read_dir("/proc") else { return };
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
            // Field 5 of /proc/<pid>/stat, counted after the ")" that ends the command name.
            let pgrp = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(2)).and_then(|g| g.parse::<i32>().ok());
            if !pgrp.is_some_and(|g| groups.contains(&g)) {
                continue;
            }
            // Only processes of this spool's handler: a recycled group id is left alone.
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let environ = std::fs::read(p.path().join("environ")).unwrap_or_default();
            let ours = String::from_utf8_lossy(&cmdline).contains(&marker) || String::from_utf8_lossy(&environ).contains("QSLICE_EPOCH=");
            if ours {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

/// Starts a runner with a recording exec handler; `extra` adds flags.
pub fn start_runner(etcd: &Etcd, spool: &Spool, node: &str, cluster: &str, extra: &[&str], envs: &[(&str, &str)]) -> Result<Proc> {
    start_runner_at(&etcd.endpoint(), spool, node, cluster, extra, envs)
}

/// Like [`start_runner`], against the given etcd endpoints (comma-separated).
pub fn start_runner_at(endpoints: &str, spool: &Spool, node: &str, cluster: &str, extra: &[&str], envs: &[(&str, &str)]) -> Result<Proc> {
    let state = spool.scratch(&format!("state-{node}"));
    let log = spool.scratch(&format!("{node}.log"));
    let handler = spool.recording_handler();
    let root = spool.runner_root();
    let mut args = vec!["--node-id", node, "--cluster", cluster, "--spool", root.to_str().context("utf8 spool path")?, "--state-dir", state.to_str().context("utf8 state path")?];
    // A short poll unless the test sets its own.
    if !extra.contains(&"--poll-interval") {
        args.extend_from_slice(&["--poll-interval", "50ms"]);
    }
    args.extend_from_slice(&["--etcd-endpoints", endpoints]);
    args.extend_from_slice(extra);
    // Append to an earlier log of the same node (restarts keep one log per node).
    let previous = std::fs::read_to_string(&log).unwrap_or_default();
    // The TTL defaults to 2 s through the environment, so that a flag can override it.
    // So are the handler settings (the recording exec handler).
    let mut all_envs = vec![("QSLICE_LEASE_TTL", "2s"), ("QSLICE_HANDLER", "exec"), ("QSLICE_HANDLER_COMMAND", handler.as_str())];
    all_envs.extend_from_slice(envs);
    let proc = Proc::spawn(&qslice_bin("qslice-runner")?, &args, &all_envs, &log)?;
    if !previous.is_empty() {
        let _ = std::fs::write(spool.scratch(&format!("{node}.previous.log")), previous);
    }
    Ok(proc)
}

/// A client of the test etcd.
pub async fn client(etcd: &Etcd) -> Result<Client> {
    client_at(&etcd.endpoints()).await
}

/// A client of the given etcd endpoints.
pub async fn client_at(endpoints: &[String]) -> Result<Client> {
    let options = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(5)).with_timeout(Duration::from_secs(5));
    Ok(Client::connect(endpoints, Some(options)).await?)
}

/// Writes the assignment of `slices` of `queue` (of `total`) to `node`, as the leader would.
pub async fn assign(client: &mut Client, cluster: &str, node: &str, queue: &str, total: u32, slices: impl IntoIterator<Item = u32>) -> Result<()> {
    let keys = Keys::new(cluster)?;
    let record = Assignment { v: RECORD_VERSION, queue: queue.into(), slices_total: total, slices: slices.into_iter().collect() };
    client.put(keys.assignment(node, queue), record.encode(), None).await?;
    Ok(())
}

/// Removes `node`'s assignment of `queue`.
pub async fn unassign(client: &mut Client, cluster: &str, node: &str, queue: &str) -> Result<()> {
    let keys = Keys::new(cluster)?;
    client.delete(keys.assignment(node, queue), None).await?;
    Ok(())
}

/// The claims of `queue`: slice -> (holder node, epoch).
pub async fn claims(client: &mut Client, cluster: &str, queue: &str) -> Result<BTreeMap<u32, (String, i64)>> {
    let keys = Keys::new(cluster)?;
    // With several endpoints a call can land on a dead member: try a few times.
    let mut attempt = 0;
    let resp = loop {
        match client.get(keys.queue_claims_prefix(queue), Some(etcd_client::GetOptions::new().with_prefix())).await {
            Ok(resp) => break resp,
            Err(e) if attempt >= 10 => return Err(e.into()),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let mut out = BTreeMap::new();
    for kv in resp.kvs() {
        if let Some(qslice_proto::keys::Key::Claim { slice, .. }) = keys.parse(kv.key()) {
            let claim = qslice_proto::records::Claim::decode(kv.value())?;
            out.insert(slice, (claim.node_id, kv.create_revision()));
        }
    }
    Ok(out)
}

/// Names of the files in a directory.
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    v.sort();
    v
}

/// A coordinator process and the URL of its admin API.
pub struct Coordinator {
    /// The process.
    pub proc: Proc,
    /// `http://127.0.0.1:<port>` of its admin API.
    pub admin: String,
    /// `127.0.0.1:<port>` of its dashboard, when it was started with one (`--http-addr`).
    pub http: Option<String>,
}

/// Starts a coordinator with a 2 s election lease, a 3 s revoke deadline and its admin
/// API on a free loopback port; `extra` adds or overrides flags.
pub fn start_coordinator(etcd: &Etcd, spool: &Spool, id: &str, cluster: &str, extra: &[&str]) -> Result<Coordinator> {
    start_coordinator_at(&etcd.endpoint(), spool, id, cluster, extra)
}

/// Like [`start_coordinator`], against the given etcd endpoints (comma-separated).
pub fn start_coordinator_at(endpoints: &str, spool: &Spool, id: &str, cluster: &str, extra: &[&str]) -> Result<Coordinator> {
    let log = spool.scratch(&format!("coordinator-{id}.log"));
    let admin_addr = format!("127.0.0.1:{}", crate::free_port()?);
    let mut args = vec!["--id", id, "--cluster", cluster, "--etcd-endpoints", endpoints, "--admin-addr", &admin_addr];
    args.extend_from_slice(extra);
    let envs = [("QSLICE_LEASE_TTL", "2s"), ("QSLICE_REVOKE_DEADLINE", "3s")];
    let proc = Proc::spawn(&qslice_bin("qslice-coordinator")?, &args, &envs, &log)?;
    Ok(Coordinator { proc, admin: format!("http://{admin_addr}"), http: None })
}

/// Writes a queue's configuration; returns the revision it was written at (the key's mod revision), as the admin API would.
pub async fn put_queue(client: &mut Client, cluster: &str, queue: &str, slices: u32) -> Result<i64> {
    let keys = Keys::new(cluster)?;
    let record = qslice_proto::records::QueueConfig { v: RECORD_VERSION, name: queue.into(), slices, paused: false, mailman3: false };
    let resp = client.put(keys.queue(queue), record.encode(), None).await?;
    Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
}

/// The id of the current coordinator leader, if any.
pub async fn leader(client: &mut Client, cluster: &str) -> Option<String> {
    let keys = Keys::new(cluster).ok()?;
    let resp = client.leader(keys.election()).await.ok()?;
    resp.kv().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
}

/// Slices held per node, from the claims of `queue`.
pub async fn holdings(client: &mut Client, cluster: &str, queue: &str) -> BTreeMap<String, Vec<u32>> {
    let mut out: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    if let Ok(claims) = claims(client, cluster, queue).await {
        for (slice, (node, _)) in claims {
            out.entry(node).or_default().push(slice);
        }
    }
    out
}

/// When a runner's log says it fenced itself (ns since the Unix epoch, from the RFC 3339
/// timestamps the runner writes), one per fence.
pub fn fence_times(log: &str) -> Vec<u128> {
    log.lines()
        .filter(|l| l.contains("fenced: stopped all work"))
        .filter_map(|l| humantime::parse_rfc3339_weak(l.split_whitespace().next()?.trim_end_matches('Z')).ok())
        .filter_map(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .collect()
}

/// How long a coordinator's admin API may take to answer after its start.
pub const ADMIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A gRPC client of the admin API at `url`, retried until it connects (bounded by
/// [`ADMIN_CONNECT_TIMEOUT`]); the error names the last connection failure.
pub async fn admin_client(url: &str) -> Result<qslice_proto::admin::admin_client::AdminClient<tonic::transport::Channel>> {
    use qslice_proto::admin::admin_client::AdminClient;
    let last = std::sync::Mutex::new(None);
    let what = format!("the admin API at {url} to answer");
    let connected = crate::wait::Wait::new(ADMIN_CONNECT_TIMEOUT, &what)
        .every(Duration::from_millis(100))
        .poll_async(|| async {
            match AdminClient::connect(url.to_owned()).await {
                Ok(c) => Ok(Some(c)),
                Err(e) => {
                    *last.lock().expect("lock") = Some(e);
                    Ok(None)
                }
            }
        })
        .await;
    connected.map_err(|e| anyhow::anyhow!("{e} (last error: {:?})", last.lock().expect("lock").take()))
}
