//! The quick start (`deploy/quickstart.sh`) stops everything it started on Ctrl-C,
//! whatever its output is connected to. Here its stdout is a pipe whose reader is gone by
//! the time Ctrl-C comes, as with `bash deploy/quickstart.sh | tee log`, where the same
//! Ctrl-C kills `tee`: the shutdown's messages then go to a dead pipe, and once they
//! killed it (SIGPIPE) halfway, leaving etcd, the coordinator and the runners running.
//!
//! The script runs with the binaries the test command built (`QSLICE_QUICKSTART_BIN`), in
//! a temporary demo dir, on the free ports it picks itself. Every process it starts runs
//! in the demo dir (the script's own `ours` check relies on it); the test finds them by
//! that working directory or by the dir in their command line, and kills whatever is left
//! when it ends, pass or fail.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use qslice_tests::{process_alive, qslice_bin, tail, wait_for};

/// Start-up (a few seconds) on a loaded two-core machine: etcd, the coordinator, three
/// runners claiming 12 slices, 60 entries enqueued by shell commands, and the script's own
/// 2 s pause.
const START_TIMEOUT: Duration = Duration::from_secs(180);
/// The shutdown: each runner finishes its in-flight entries (0.3 s each) and releases
/// its slices, then the coordinator and etcd stop; the script SIGKILLs after 40 s each.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// The last line the quick start prints once the demo runs.
const UP_MARKER: &str = "--down";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Live processes that run in `dir` or name it in their command line (zombies left out),
/// with their command line.
fn demo_processes(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && process_alive(pid))
        .filter_map(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let in_dir = fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir);
            let names_dir = cmdline.windows(needle.len()).any(|w| w == needle);
            (in_dir || names_dir).then(|| (pid, String::from_utf8_lossy(&cmdline).replace('\0', " ").trim().to_owned()))
        })
        .collect()
}

/// The quick start and its demo dir; on drop, kills the script's process group and every
/// process of the demo that is left.
struct Quickstart {
    child: Child,
    /// The demo dir, as the script sees it (canonical: compared with /proc/PID/cwd).
    dir: PathBuf,
    /// The script's stderr (where its messages go once stdout is gone).
    stderr: PathBuf,
    /// Holds the demo dir and the stderr file.
    _tmp: tempfile::TempDir,
}

impl Quickstart {
    fn start() -> Quickstart {
        let tmp = tempfile::tempdir().expect("temporary dir");
        let base = tmp.path().canonicalize().expect("canonical temporary dir");
        let dir = base.join("demo");
        let stderr = base.join("quickstart.stderr");
        let bin_dir = qslice_bin("qslice-runner").expect("binaries built").parent().expect("bin dir").to_owned();
        let mut cmd = Command::new("bash");
        cmd.arg(workspace().join("deploy/quickstart.sh"))
            .arg(&dir)
            .env("QSLICE_QUICKSTART_BIN", &bin_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).expect("create the stderr file"))
            // Its own process group, as a shell job in a terminal: Ctrl-C goes to the group.
            .process_group(0);
        stop_with_parent(&mut cmd);
        let child = cmd.spawn().expect("start deploy/quickstart.sh");
        Quickstart { child, dir, stderr, _tmp: tmp }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The pid a pid file of the demo names.
    fn pid_of(&self, name: &str) -> u32 {
        let path = self.dir.join("pids").join(format!("{name}.pid"));
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        text.trim().parse().unwrap_or_else(|e| panic!("{}: {text:?}: {e}", path.display()))
    }
}

/// If the test process dies without running its drops, the quick start gets SIGTERM
/// and stops what it started itself.
#[allow(unsafe_code)]
fn stop_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Drop for Quickstart {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- quick start stderr ---\n{}", self.stderr());
            for log in ["quickstart", "coordinator", "runner-r1", "etcd"] {
                eprintln!("--- {log}.log (last lines) ---\n{}", tail(&self.dir.join(format!("logs/{log}.log")), 20));
            }
        }
        let _ = kill(Pid::from_raw(-(self.child.id() as i32)), Signal::SIGKILL);
        // The runners, coordinator and etcd run in sessions of their own; what they fork
        // (handlers) may appear while we kill: look again until nothing is left.
        for _ in 0..20 {
            let left = demo_processes(&self.dir);
            if left.is_empty() {
                break;
            }
            for (pid, _) in left {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.wait();
    }
}

#[test]
fn ctrl_c_stops_everything_after_the_output_pipe_reader_died() {
    let mut qs = Quickstart::start();

    // Read the quick start's output until it says the demo runs, then close the pipe's
    // read end (the reader thread ends and drops it).
    let stdout = qs.child.stdout.take().expect("piped stdout");
    let (up_tx, up_rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut seen = String::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            seen.push_str(&line);
            seen.push('\n');
            if line.contains(UP_MARKER) {
                let _ = up_tx.send(seen);
                return;
            }
        }
        // Stdout ended before the demo was up: the script died (its reason is on stderr).
        let _ = up_tx.send(String::new());
    });
    let output = up_rx.recv_timeout(START_TIMEOUT).unwrap_or_else(|_| panic!("the quick start did not report the demo up within {START_TIMEOUT:?}"));
    assert!(!output.is_empty(), "the quick start ended before the demo was up");
    reader.join().expect("the reader thread ends once the demo is up");
    assert!(output.contains("The demo runs"), "{output}");

    // What it started, by its pid files, is running.
    let started: Vec<(&str, u32)> = ["etcd", "coordinator", "runner-r1", "runner-r2", "runner-r3", "feeder"].into_iter().map(|name| (name, qs.pid_of(name))).collect();
    let running = demo_processes(&qs.dir);
    for (name, pid) in &started {
        assert!(running.iter().any(|(p, _)| p == pid), "{name} (pid {pid}) is not running in the demo dir: {running:#?}");
    }

    // Ctrl-C: SIGINT to the quick start's process group, as a terminal sends it.
    kill(Pid::from_raw(-(qs.child.id() as i32)), Signal::SIGINT).expect("send SIGINT to the quick start's group");

    let mut status = None;
    wait_for(STOP_TIMEOUT, "the quick start to exit after Ctrl-C", || {
        status = qs.child.try_wait().expect("try_wait");
        status.is_some()
    })
    .unwrap_or_else(|e| panic!("{e}; still running: {:#?}", demo_processes(&qs.dir)));
    let status = status.expect("set when the wait succeeded");
    // An exit by its INT trap (130), not a death by SIGPIPE in the middle of the shutdown.
    assert_eq!(status.code(), Some(130), "the quick start's exit after Ctrl-C: {status:?}");

    // Everything it started is gone: by pid, and nothing else runs in the demo dir (a
    // feeder's `sleep 1` may outlive the feeder by up to a second).
    wait_for(Duration::from_secs(10), "every process of the demo to exit", || demo_processes(&qs.dir).is_empty()).unwrap_or_else(|e| panic!("{e}: {:#?}", demo_processes(&qs.dir)));
    for (name, pid) in &started {
        assert!(!process_alive(*pid), "{name} (pid {pid}) still runs");
    }

    // With stdout gone, the shutdown's messages went to stderr and to the demo's log.
    let stderr = qs.stderr();
    assert!(stderr.contains("stopping everything the quick start started") && stderr.contains("stopped."), "stderr:\n{stderr}");
    // (The feeder, a background subshell of the script, gets the Ctrl-C itself.)
    let log = fs::read_to_string(qs.dir.join("logs/quickstart.log")).unwrap_or_default();
    for name in ["etcd", "coordinator", "runner-r1", "runner-r2", "runner-r3"] {
        assert!(log.contains(&format!("stopping {name}")), "logs/quickstart.log does not name {name}:\n{log}");
    }
}
