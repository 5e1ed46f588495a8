//! A FUSE file system over a backing directory that injects spool faults on request.
//!
//! [`FaultFs::mount`] starts the `qslice-faultfs` binary on a mount point and waits until
//! it is mounted; [`FaultFs::set`] and [`FaultFs::clear`] switch [`Fault`]s while it is
//! mounted; dropping the [`FaultFs`] unmounts it and stops the binary, also while a test
//! panics. The binary holds its standard input as a lifeline from the test process: if
//! the test process dies outright (SIGKILL), the pipe closes and the binary unmounts and
//! exits by itself, so nothing stays mounted or running.
//!
//! Mounting needs root (or CAP_SYS_ADMIN) and /dev/fuse: fuser then mounts with mount(2)
//! directly and needs no fusermount. Without those rights fuser falls back to
//! `fusermount3`, from the Debian package `fuse3`.

mod control;
mod fault;
mod fs;
mod serve;

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use control::{Request, Response};
pub use fault::{Counters, Fault, Match, Op, OpenErrno, Switchboard};
pub use fs::FaultFilesystem;
pub use serve::{serve, unmount, ServeArgs, ServeError};

/// The binary's name.
pub const BINARY: &str = "qslice-faultfs";

/// How long the binary may take to mount and answer on a loaded two-core machine.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the binary may take to unmount and exit once its lifeline is closed: it
/// waits up to 2 s for the FUSE session to end, so this leaves room for a slow machine.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a [`FaultFs`] operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FaultFsError {
    /// The binary is not where it was looked for.
    #[error("{path} not found: build it first (`cargo build -p qslice-testbeds --bins`) or set QSLICE_FAULTFS_BIN")]
    BinaryNotFound {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The temporary directory for the control socket and the log could not be made.
    #[error("make the control directory: {0}")]
    ControlDir(#[source] io::Error),
    /// The binary could not be started.
    #[error("start {binary}: {source}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The binary exited before it was mounted (its log says why).
    #[error("qslice-faultfs exited at start ({status}); if the mount was refused, run as root or install fusermount3 (Debian package fuse3); log:\n{log}")]
    MountFailed {
        /// How it exited.
        status: ExitStatus,
        /// The end of its log.
        log: String,
    },
    /// The binary did not answer in time.
    #[error("qslice-faultfs did not mount within {timeout:?}; log:\n{log}")]
    MountTimeout {
        /// How long it was given.
        timeout: Duration,
        /// The end of its log.
        log: String,
    },
    /// A control request failed.
    #[error("control request {request}: {source}")]
    Control {
        /// The request.
        request: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The binary refused a control request.
    #[error("control request refused: {0}")]
    Refused(String),
    /// The file system did not go away cleanly.
    #[error("unmount {mountpoint}: {reason}")]
    Unmount {
        /// The mount point.
        mountpoint: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// The `qslice-faultfs` binary: `$QSLICE_FAULTFS_BIN`, else the one beside the running
/// test executable's `deps/` directory (where cargo puts the workspace's binaries).
pub fn faultfs_binary() -> Result<PathBuf, FaultFsError> {
    if let Some(path) = std::env::var_os("QSLICE_FAULTFS_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(FaultFsError::ControlDir)?;
    let mut dir = exe.parent().unwrap_or(Path::new(".")).to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(BINARY);
    if path.exists() {
        Ok(path)
    } else {
        Err(FaultFsError::BinaryNotFound { path })
    }
}

/// Undoes the octal escapes of /proc/self/mountinfo (`\040` for a space, and so on).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether something is mounted exactly at `path` (as /proc/self/mountinfo spells it:
/// pass a canonical path).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    table.lines().filter_map(|line| line.split(' ').nth(4)).any(|field| unescape_mountinfo(field) == wanted)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A mounted fault-injecting file system; unmounted and stopped on drop.
#[derive(Debug)]
pub struct FaultFs {
    /// The `qslice-faultfs` process; `None` once stopped.
    child: Option<Child>,
    /// The write end of the binary's standard input: closing it stops the binary.
    lifeline: Option<ChildStdin>,
    /// Where it is mounted (canonical).
    mountpoint: PathBuf,
    /// The control socket.
    control: PathBuf,
    /// The binary's log (standard output and error).
    log_path: PathBuf,
    /// Holds the control socket and the log; removed on drop (by the binary if this
    /// process dies).
    _dir: tempfile::TempDir,
}

impl FaultFs {
    /// Mounts a pass-through of `backing` on `mountpoint` (an existing empty directory),
    /// running the binary found by [`faultfs_binary`].
    pub fn mount(backing: &Path, mountpoint: &Path) -> Result<FaultFs, FaultFsError> {
        FaultFs::mount_with(&faultfs_binary()?, backing, mountpoint)
    }

    /// Like [`FaultFs::mount`], with the binary at `binary`.
    pub fn mount_with(binary: &Path, backing: &Path, mountpoint: &Path) -> Result<FaultFs, FaultFsError> {
        let dir = tempfile::Builder::new().prefix("qslice-faultfs-").tempdir().map_err(FaultFsError::ControlDir)?;
        let control = dir.path().join("control.sock");
        let log_path = dir.path().join("faultfs.log");
        let log = File::create(&log_path).map_err(FaultFsError::ControlDir)?;
        let log_err = log.try_clone().map_err(FaultFsError::ControlDir)?;
        let mountpoint = mountpoint.canonicalize().map_err(|e| FaultFsError::Unmount { mountpoint: mountpoint.to_owned(), reason: format!("mount point unusable: {e}") })?;
        let mut child = Command::new(binary)
            .arg(backing)
            .arg(&mountpoint)
            .arg(&control)
            .arg("--exit-with-stdin")
            .arg("--owner-dir")
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|source| FaultFsError::Spawn { binary: binary.to_owned(), source })?;
        let lifeline = child.stdin.take();
        let mut fs = FaultFs { child: Some(child), lifeline, mountpoint, control, log_path, _dir: dir };
        fs.wait_mounted()?;
        Ok(fs)
    }

    fn wait_mounted(&mut self) -> Result<(), FaultFsError> {
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(FaultFsError::MountFailed { status, log: tail(&self.log_path, 20) });
            }
            let answered = matches!(control::call(&self.control, &Request::Ping), Ok(Response::Ok));
            if answered && is_mounted(&self.mountpoint) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        Err(FaultFsError::MountTimeout { timeout: MOUNT_TIMEOUT, log: tail(&self.log_path, 20) })
    }

    /// Where the file system is mounted (canonical).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The path under the mount point of `relative`.
    pub fn path(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.mountpoint.join(relative)
    }

    /// The binary's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The directory holding the control socket and the binary's log.
    pub fn control_dir(&self) -> &Path {
        self._dir.path()
    }

    /// The end of the binary's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path, lines)
    }

    fn request(&self, request: &Request) -> Result<Response, FaultFsError> {
        match control::call(&self.control, request) {
            Ok(Response::Error(e)) => Err(FaultFsError::Refused(e)),
            Ok(response) => Ok(response),
            Err(source) => Err(FaultFsError::Control { request: format!("{request:?}"), source }),
        }
    }

    /// Activates `fault` (replacing the active fault of its kind) for operations that
    /// start from now on.
    pub fn set(&self, fault: Fault) -> Result<(), FaultFsError> {
        self.request(&Request::Set(fault)).map(drop)
    }

    /// Deactivates every fault (the counters stay).
    pub fn clear(&self) -> Result<(), FaultFsError> {
        self.request(&Request::Clear).map(drop)
    }

    /// The faults injected since the mount.
    pub fn counters(&self) -> Result<Counters, FaultFsError> {
        match self.request(&Request::Counters)? {
            Response::Counters(counters) => Ok(counters),
            other => Err(FaultFsError::Refused(format!("unexpected answer {other:?}"))),
        }
    }

    /// Unmounts and stops the binary, reporting what did not go cleanly (drop does the
    /// same and only prints).
    pub fn unmount(mut self) -> Result<(), FaultFsError> {
        match self.stop() {
            Some(reason) => Err(FaultFsError::Unmount { mountpoint: self.mountpoint.clone(), reason }),
            None => Ok(()),
        }
    }

    /// Closes the lifeline, waits for the binary to unmount and exit (killing it past
    /// [`STOP_TIMEOUT`]) and detaches a mount it left behind. Returns what went wrong.
    fn stop(&mut self) -> Option<String> {
        let mut problems = Vec::new();
        if let Some(mut lifeline) = self.lifeline.take() {
            // "stop" tells the binary the owner is alive and removes the directory itself.
            let _ = lifeline.write_all(b"stop\n");
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + STOP_TIMEOUT;
            let status = loop {
                match child.try_wait() {
                    Ok(Some(status)) => break Some(status),
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                    _ => break None,
                }
            };
            match status {
                Some(status) if status.success() => {}
                Some(status) => problems.push(format!("qslice-faultfs exited with {status}")),
                None => {
                    problems.push(format!("qslice-faultfs did not stop within {STOP_TIMEOUT:?}; killed"));
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        if is_mounted(&self.mountpoint) {
            problems.push("still mounted after the binary stopped; detached".into());
            if let Err(e) = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH) {
                problems.push(format!("detach failed: {e}"));
            }
        }
        if problems.is_empty() {
            None
        } else {
            problems.push(format!("log:\n{}", tail(&self.log_path, 20)));
            Some(problems.join("; "))
        }
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- qslice-faultfs log (last lines) ---\n{}", tail(&self.log_path, 20));
        }
        if let Some(problem) = self.stop() {
            eprintln!("qslice-faultfs on {}: {problem}", self.mountpoint.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b\134c"), r"/tmp/a b\c");
        assert_eq!(unescape_mountinfo(r"/plain\0"), r"/plain\0");
    }
}
