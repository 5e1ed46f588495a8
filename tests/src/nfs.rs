//! qslice on real NFS clients: qslice-runners and an entry writer in the guests of the NFS
//! bed ([`qslice_testbeds::nfs`]), etcd and the coordinator on the host side, and what the
//! guests' handlers record, timestamped by the host as it sees each line (the guests'
//! clocks are not the host's, and a paused guest's may not move at all).
//!
//! A guest's handler records `start|end <filebase> <node> <epoch> <slice> <forked>
//! <slices>` in its work directory, where `<forked>` is the handler process's start time in
//! the guest's clock ticks since boot (`/proc/<pid>/stat` field 22): when its runner
//! dispatched the entry, as the guest saw it.

use crate::now_ns;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use qslice_proto::slice::EntryName;
use qslice_testbeds::nfs::Guest;

use crate::cluster::Rec;
use crate::qslice_bin;

/// The guests' lease TTL: qslice's default. Emulated guests on a loaded two-core machine
/// run a hundred times slower than the host at moments; 2 s fences them for nothing.
pub const GUEST_TTL: Duration = Duration::from_secs(5);

/// The shell script that runs a qslice-runner in `guest` against etcd at `etcd_port` (the
/// test's, seen from the guest at 10.0.2.2) on the spool at `spool`, with the recording
/// handler of [`write_recording_handler`]; `env` adds `NAME=value` words to its
/// environment, `extra` flags.
pub fn runner_script(guest: &Guest, cluster: &str, etcd_port: u16, spool: &Path, env: &str, extra: &str) -> String {
    let work = guest.work();
    let handler = write_recording_handler(guest);
    let command = serde_json::to_string(&["/bin/sh", handler.to_str().expect("utf8 path")]).expect("json");
    format!(
        "mkdir -p {work}/state\n\
         exec env QSLICE_LEASE_TTL={ttl}s QSLICE_HANDLER=exec QSLICE_HANDLER_COMMAND='{command}' {env} \
         {runner} --node-id {name} --cluster {cluster} --spool {spool} --state-dir {work}/state \
         --etcd-endpoints http://10.0.2.2:{etcd_port} --poll-interval 100ms {extra}\n",
        work = work.display(),
        ttl = GUEST_TTL.as_secs(),
        runner = qslice_bin("qslice-runner").expect("qslice-runner built").display(),
        name = guest.name(),
        spool = spool.display(),
    )
}

/// Writes the guest's recording handler (a script in its work directory) and returns its path.
pub fn write_recording_handler(guest: &Guest) -> PathBuf {
    let path = guest.work().join("handler.sh");
    let records = records_path(guest);
    // Field 22 of /proc/<pid>/stat (the 21 fields before it hold no spaces for "sh").
    let script = format!(
        "b=$(basename \"$QSLICE_PATH\" .bak)\n\
         read -r _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ forked _ < /proc/$$/stat\n\
         echo \"start $b $QSLICE_NODE $QSLICE_EPOCH $QSLICE_SLICE $forked $QSLICE_SLICES\" >> {rec}\n\
         sleep ${{QSLICE_TEST_DELAY:-0}}\n\
         echo \"end $b $QSLICE_NODE $QSLICE_EPOCH $QSLICE_SLICE $forked $QSLICE_SLICES\" >> {rec}\n",
        rec = records.display()
    );
    std::fs::write(&path, script).expect("write the recording handler");
    path
}

/// Where a guest's handler records (a host path too).
pub fn records_path(guest: &Guest) -> PathBuf {
    guest.work().join("records.log")
}

/// Where the writer of [`writer_script`] logs the entries it enqueued.
pub fn enqueued_path(guest: &Guest) -> PathBuf {
    guest.work().join("enqueued.log")
}

/// The shell script that writes `count` entries into `queue_dir` through the guest's NFS
/// mount, one every `interval`, logging each to [`enqueued_path`].
pub fn writer_script(guest: &Guest, queue_dir: &Path, count: usize, interval: Duration) -> String {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/nfs_writer.py");
    format!("exec python3 {} {} {count} {} {}\n", fixture.display(), queue_dir.display(), interval.as_secs_f64(), enqueued_path(guest).display())
}

/// The shell script of a heartbeat: the guest's uptime (seconds since boot, the clock of
/// `<forked>`) appended to `hb` in its work directory every 0.1 s.
pub fn heartbeat_script() -> String {
    "while :; do read -r up _ < /proc/uptime; echo $up >> hb; sleep 0.1; done\n".to_owned()
}

/// One line as the host saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// When the host first saw the line (ns since the Unix epoch).
    pub at_ns: u128,
    /// The file it was in (index into the watched paths).
    pub file: usize,
    /// The line.
    pub line: String,
}

/// Follows files the guests append to (in their work directories, shared over 9p, so a
/// line is on the host as soon as the guest wrote it) and timestamps each new line.
pub struct Tail {
    paths: Arc<Mutex<Vec<PathBuf>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tail {
    /// Starts following `paths` (polled every 10 ms).
    pub fn follow(paths: Vec<PathBuf>) -> Tail {
        let paths = Arc::new(Mutex::new(paths));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (paths, seen, stop) = (paths.clone(), seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut offsets = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let paths = paths.lock().expect("paths").clone();
                    offsets.resize(paths.len(), 0usize);
                    for (i, path) in paths.iter().enumerate() {
                        let Ok(text) = std::fs::read(path) else { continue };
                        let at_ns = now_ns();
                        // Complete lines only: a line being written is taken next round.
                        let Some(end) = text.iter().rposition(|b| *b == b'\n').map(|p| p + 1) else { continue };
                        if end <= offsets[i] {
                            continue;
                        }
                        let new = String::from_utf8_lossy(&text[offsets[i]..end]).into_owned();
                        offsets[i] = end;
                        let mut s = seen.lock().expect("seen");
                        s.extend(new.lines().map(|l| Seen { at_ns, file: i, line: l.to_owned() }));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        Tail { paths, seen, stop, thread: Some(thread) }
    }

    /// Follows `path` too (its index is the number of paths followed before).
    pub fn add(&self, path: PathBuf) {
        self.paths.lock().expect("paths").push(path);
    }

    /// Every line seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The fences each runner logged (`nodes[i]` names the node of watched file `i`, a
/// runner's log): a fence ends the node's handlers, so what they had in flight may run
/// again elsewhere, as after a kill. When is the time the runner's line carries (the
/// guest's clock, set from the host's at boot), or when the host saw it.
pub fn fences(seen: &[Seen], nodes: &BTreeMap<usize, String>) -> Vec<crate::checker::Disruption> {
    seen.iter()
        .filter(|s| s.line.contains("fenced: stopped all work") || s.line.contains("the fence deadline passed without a renewal"))
        .filter_map(|s| {
            let node = nodes.get(&s.file)?;
            let stamp = s.line.split_whitespace().next().and_then(|w| humantime::parse_rfc3339(w).ok());
            let at_ns = stamp.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(s.at_ns, |d| d.as_nanos().min(s.at_ns));
            Some(crate::checker::Disruption { node: node.clone(), at_ns, what: "fenced".into() })
        })
        .collect()
}

/// When the host first saw, after `since_ns`, a runner's log line saying it recovered
/// `entry` (a `.bak` of the previous owner, at its claim), among `seen`. (An entry can be
/// recovered more than once: left in flight by a killed runner, then again by its next
/// owner's death.)
pub fn recovered_at(seen: &[Seen], entry: &str, since_ns: u128) -> Option<u128> {
    let needle = format!("entry={entry}");
    seen.iter().filter(|s| s.at_ns > since_ns && s.line.contains("recovered an in-flight entry of the previous owner") && s.line.contains(&needle)).map(|s| s.at_ns).min()
}

/// A handler's record as the host saw it.
#[derive(Clone, Debug)]
pub struct GuestRec {
    /// The record, `at_ns` being when the host saw it.
    pub rec: Rec,
    /// When the handler process was forked, in the guest's ticks (1/100 s) since its boot.
    pub forked_ticks: u64,
}

/// The handler records among `seen`.
pub fn records(seen: &[Seen]) -> Vec<GuestRec> {
    seen.iter()
        .filter_map(|s| {
            let f: Vec<&str> = s.line.split_whitespace().collect();
            let what = *f.first()?;
            if what != "start" && what != "end" {
                return None;
            }
            let rec = Rec {
                what: what.to_owned(),
                filebase: f.get(1)?.to_string(),
                node: f.get(2)?.to_string(),
                epoch: f.get(3)?.parse().ok()?,
                slice: f.get(4)?.parse().ok()?,
                at_ns: s.at_ns,
                slices: f.get(6).and_then(|v| v.parse().ok()).unwrap_or(0),
            };
            Some(GuestRec { rec, forked_ticks: f.get(5)?.parse().ok()? })
        })
        .collect()
}

/// The entries the writer logged among `seen`: file base -> (when the host saw it, slice of `slices`).
pub fn enqueued(seen: &[Seen], slices: u32) -> BTreeMap<String, (u128, u32)> {
    seen.iter()
        .filter_map(|s| {
            let base = s.line.strip_prefix("enq ")?;
            let name = EntryName::parse(&format!("{base}.pck")).ok()?;
            Some((base.to_owned(), (s.at_ns, name.slice(slices))))
        })
        .collect()
}

/// File bases of the queue files in `dir` (any extension).
pub fn file_bases_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir).map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str().map(base_of)).collect()).unwrap_or_default()
}

/// `<TIME>+<DIGEST>` of a queue file name (`1700000000.123456+ab...cd.pck` and the like).
fn base_of(name: &str) -> String {
    // TIME holds one '.', the digest none: the file base ends at the second '.'.
    name.splitn(3, '.').take(2).collect::<Vec<_>>().join(".")
}

/// The `.bak` file bases in a queue directory (read on the host: the server's truth).
pub fn baks_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir).map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".bak")).map(str::to_owned)).collect()).unwrap_or_default()
}
