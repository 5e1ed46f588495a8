//! The body of the `qslice-faultfs` binary: mount, serve the control socket, and
//! unmount when told to stop.
//!
//! Contract: once the control socket answers [`super::control::Request::Ping`], the
//! file system is mounted. It stops, unmounting first (lazily when the mount is busy),
//! on SIGINT, SIGTERM or SIGHUP, when the mount is unmounted from outside, and, with
//! `exit_with_stdin`, when its standard input reaches end of file: that pipe is the
//! lifeline a test holds, so the mount goes away even when the test process is killed.

use std::io::{self, Read};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::{Config, MountOption, SessionACL};
use nix::mount::{umount2, MntFlags};
use nix::sys::signal::{SigSet, Signal};

use super::control;
use super::fault::Switchboard;
use super::fs::FaultFilesystem;

/// What `qslice-faultfs` needs to run.
#[derive(Debug, Clone)]
pub struct ServeArgs {
    /// The directory every operation passes through to.
    pub backing: PathBuf,
    /// Where the file system is mounted (an existing directory).
    pub mountpoint: PathBuf,
    /// The control socket's path (replaced if it exists).
    pub control: PathBuf,
    /// Stop when standard input reaches end of file (or says `stop`).
    pub exit_with_stdin: bool,
    /// A directory of the owner's (holding the control socket and the log) to remove
    /// when the lifeline closes without a `stop`: the owner died and cannot remove it.
    pub owner_dir: Option<PathBuf>,
    /// FUSE event loop threads (blocked operations run on threads of their own anyway).
    pub threads: usize,
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The backing directory cannot be used.
    #[error("backing directory {path}: {source}")]
    Backing {
        /// The backing directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The mount point cannot be used.
    #[error("mount point {path}: {source}")]
    MountPoint {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The FUSE mount failed.
    #[error(
        "mount FUSE on {path}: {source} (a direct mount needs root, CAP_SYS_ADMIN and /dev/fuse; \
         without them fuser runs fusermount3, from the Debian package fuse3: apt-get install fuse3)"
    )]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The control socket cannot be bound.
    #[error("control socket {path}: {source}")]
    Control {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Signal handling or a thread could not be set up.
    #[error("set up {what}: {source}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Why the file system stops.
#[derive(Debug)]
enum Stop {
    Signal(Signal),
    /// The owner wrote `stop` on the lifeline.
    Asked,
    /// The lifeline closed without a `stop`: the owner died.
    LifelineClosed,
    UnmountedFromOutside,
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Signal(signal) => write!(f, "got {signal}"),
            Stop::Asked => write!(f, "the owner asked"),
            Stop::LifelineClosed => write!(f, "standard input closed without a stop: the owner is gone"),
            Stop::UnmountedFromOutside => write!(f, "unmounted from outside"),
        }
    }
}

/// The signals that stop the file system, waited for on a thread of their own.
fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set
}

/// How long the FUSE session may take to end after the unmount before the process exits
/// anyway (exiting closes /dev/fuse, which aborts whatever is left of the connection).
const SESSION_END_TIMEOUT: Duration = Duration::from_secs(2);

/// Unmounts `mountpoint`, lazily if it is busy (a process still has a file or its working
/// directory there).
pub fn unmount(mountpoint: &Path) -> nix::Result<()> {
    match umount2(mountpoint, MntFlags::empty()) {
        Err(nix::errno::Errno::EBUSY) => umount2(mountpoint, MntFlags::MNT_DETACH),
        other => other,
    }
}

/// Mounts and serves until told to stop; see the module doc.
pub fn serve(args: &ServeArgs) -> Result<(), ServeError> {
    // Block the stop signals before any thread starts, so every thread inherits the mask
    // and only the signal thread's sigwait receives them.
    let signals = stop_signals();
    signals.thread_block().map_err(|e| ServeError::Setup { what: "signal mask", source: e.into() })?;

    let board = Arc::new(Mutex::new(Switchboard::default()));
    let backing_error = |source| ServeError::Backing { path: args.backing.clone(), source };
    let filesystem = FaultFilesystem::new(&args.backing, Arc::clone(&board)).map_err(backing_error)?;
    let mountpoint = args.mountpoint.canonicalize().map_err(|source| ServeError::MountPoint { path: args.mountpoint.clone(), source })?;

    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("qslice-faultfs".into()), MountOption::Subtype("qslice-faultfs".into())];
    // allow_other: runners under test may run as another user than the mount.
    config.acl = SessionACL::All;
    config.n_threads = Some(args.threads.max(1));
    let session = fuser::spawn_mount(filesystem, &mountpoint, &config).map_err(|source| ServeError::Mount { path: mountpoint.clone(), source })?;

    let (stop_tx, stop_rx) = mpsc::channel();
    let result = start_watchers(args, &board, &stop_tx, signals);
    if let Err(e) = result {
        let _ = unmount(&mountpoint);
        return Err(e);
    }
    eprintln!("qslice-faultfs: {} mounted on {}", args.backing.display(), mountpoint.display());

    let stop = loop {
        match stop_rx.recv_timeout(Duration::from_millis(200)) {
            Ok(stop) => break stop,
            Err(mpsc::RecvTimeoutError::Timeout) if session.guard.is_finished() => break Stop::UnmountedFromOutside,
            Err(_) => {}
        }
    };
    eprintln!("qslice-faultfs: stopping: {stop}");
    if let Err(e) = unmount(&mountpoint) {
        if !session.guard.is_finished() {
            eprintln!("qslice-faultfs: unmount {}: {e}", mountpoint.display());
        }
    }
    let deadline = std::time::Instant::now() + SESSION_END_TIMEOUT;
    while !session.guard.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&args.control);
    if let (Stop::LifelineClosed, Some(dir)) = (&stop, &args.owner_dir) {
        let _ = std::fs::remove_dir_all(dir);
    }
    // The session is not dropped: its own unmount would only race with ours.
    std::mem::forget(session);
    Ok(())
}

fn start_watchers(args: &ServeArgs, board: &Arc<Mutex<Switchboard>>, stop_tx: &mpsc::Sender<Stop>, signals: SigSet) -> Result<(), ServeError> {
    let setup = |what| move |source| ServeError::Setup { what, source };
    let tx = stop_tx.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(signal) = signals.wait() {
                let _ = tx.send(Stop::Signal(signal));
            }
        })
        .map_err(setup("signal thread"))?;
    if args.exit_with_stdin {
        let tx = stop_tx.clone();
        std::thread::Builder::new()
            .name("lifeline".into())
            .spawn(move || {
                // Read to end of file (or an error, which also means the owner is gone).
                let mut said = Vec::new();
                let _ = io::stdin().lock().read_to_end(&mut said);
                let asked = said.windows(4).any(|w| w == b"stop");
                let _ = tx.send(if asked { Stop::Asked } else { Stop::LifelineClosed });
            })
            .map_err(setup("lifeline thread"))?;
    }
    let _ = std::fs::remove_file(&args.control);
    let listener = UnixListener::bind(&args.control).map_err(|source| ServeError::Control { path: args.control.clone(), source })?;
    control::serve(listener, Arc::clone(board)).map_err(setup("control thread"))?;
    Ok(())
}
