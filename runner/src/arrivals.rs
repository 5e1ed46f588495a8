//! A wake-up hint for a queue loop that is waiting: inotify on the queue directory, so
//! that an entry renamed into place (Mailman's `.tmp` -> `.pck`, a recovery's `.bak` ->
//! `.pck`) is taken at once instead of at the next poll.
//!
//! Polling stays the source of truth: inotify sees only what this host does to the
//! directory (on NFS, another host's writes come with the next listing), and any failure
//! (no inotify, the per-user watch or instance limit) only means waiting for the poll.
//!
//! The watch is armed only while the loop is idle. While it is busy it lists again at
//! once anyway, and a watch would queue an event for every rename of its own (`.pck` ->
//! `.bak`): the loop disarms it after a pass that started many entries ([`BUSY_PASS`])
//! and, when a pass starts nothing, arms it and lists once more before it waits, so that
//! nothing that arrived in between is missed. Putting a watch on a directory and taking
//! it off cost the kernel a walk over every name of it it has cached (tens of thousands
//! after a backlog), so the watch is taken off only if it was put on at least
//! [`TOGGLE_INTERVAL`] ago, and put back only after it was taken off: at most two walks
//! a second, the one of putting it back paid by a loop that is idle. A loop that goes
//! between busy and idle passes quickly keeps the watch (and reads past the events of its
//! own renames); one that has just finished a backlog is watching again at its first idle
//! pass, not at its next poll.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tokio::time::{Duration, Instant};

/// A pass that started at least this many entries means the loop is busy: disarm.
pub(crate) const BUSY_PASS: usize = 32;
/// The least time between putting the watch on and taking it off, or back.
pub(crate) const TOGGLE_INTERVAL: Duration = Duration::from_secs(1);

/// An inotify instance, as tokio's `AsyncFd` wants it.
struct Instance(Inotify);

impl AsRawFd for Instance {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Registers an inotify instance with tokio's reactor.
#[allow(unsafe_code)]
fn register(inotify: Inotify) -> std::io::Result<AsyncFd<Instance>> {
    // SAFETY: `Instance` owns the descriptor (an `OwnedFd` inside `Inotify`), which stays
    // open and the same for as long as the `AsyncFd` holds it.
    unsafe { AsyncFd::register_with_interest(Instance(inotify), tokio::io::Interest::READABLE) }.map_err(|e| e.into_parts().1)
}

/// The inotify watch of one queue directory.
pub(crate) struct Arrivals {
    /// The inotify instance (`None`: unavailable here; the loop only polls).
    fd: Option<AsyncFd<Instance>>,
    /// The queue directory.
    dir: PathBuf,
    /// The watch while armed.
    watch: Option<WatchDescriptor>,
    /// Whether the unavailability was logged (once per loop).
    warned: bool,
    /// When the watch was last put on or taken off.
    toggled: Option<Instant>,
}

/// What [`Arrivals::arm`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Armed {
    /// The watch was already in place.
    Already,
    /// The watch was just put in place: list once more before waiting.
    Now,
    /// No watch (none can be had here): wait for the poll.
    Unavailable,
}

impl Arrivals {
    /// The hint for `dir`, unarmed.
    pub(crate) fn new(dir: &Path) -> Arrivals {
        let fd = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(std::io::Error::from).and_then(register);
        let (fd, warned) = match fd {
            Ok(fd) => (Some(fd), false),
            Err(e) => {
                tracing::info!(dir = %dir.display(), error = %e, "no inotify for the queue directory; new entries are found by polling alone");
                (None, true)
            }
        };
        Arrivals { fd, dir: dir.to_owned(), watch: None, warned, toggled: None }
    }

    /// Forgets the last toggle, as if [`TOGGLE_INTERVAL`] had passed.
    #[cfg(test)]
    fn forget_toggle(&mut self) {
        self.toggled = None;
    }

    /// Whether the watch was put on or taken off less than [`TOGGLE_INTERVAL`] ago.
    fn toggled_lately(&self) -> bool {
        self.toggled.is_some_and(|t| t.elapsed() < TOGGLE_INTERVAL)
    }

    /// Puts the watch in place if it is not.
    pub(crate) fn arm(&mut self) -> Armed {
        if self.watch.is_some() {
            return Armed::Already;
        }
        let Some(fd) = &self.fd else { return Armed::Unavailable };
        self.toggled = Some(Instant::now());
        match fd.get_ref().0.add_watch(&self.dir, AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE) {
            Ok(wd) => {
                self.watch = Some(wd);
                Armed::Now
            }
            Err(e) => {
                if !self.warned {
                    self.warned = true;
                    tracing::info!(dir = %self.dir.display(), error = %e, "cannot watch the queue directory with inotify; new entries are found by polling alone");
                }
                Armed::Unavailable
            }
        }
    }

    /// Removes the watch and forgets what it queued (unless it was put on less than
    /// [`TOGGLE_INTERVAL`] ago).
    pub(crate) fn disarm(&mut self) {
        if self.watch.is_none() || self.toggled_lately() {
            return;
        }
        self.toggled = Some(Instant::now());
        let (Some(fd), Some(wd)) = (&self.fd, self.watch.take()) else { return };
        let _ = fd.get_ref().0.rm_watch(wd);
        while fd.get_ref().0.read_events().is_ok_and(|events| !events.is_empty()) {}
    }

    /// Returns once a new entry may have arrived (a `.pck` renamed or written into the
    /// directory, or events lost to an overflow); never while unarmed. Events of other
    /// names (this node's own `.bak` renames, `.tmp` files being written) are read and
    /// ignored.
    ///
    /// A watch the kernel ended (the directory was removed or replaced) wakes the loop and
    /// counts as unarmed, so that the next idle spell watches the directory now there.
    pub(crate) async fn arrived(&mut self) {
        let Some(fd) = self.fd.as_ref().filter(|_| self.watch.is_some()) else {
            return std::future::pending().await;
        };
        loop {
            let Ok(mut ready) = fd.readable().await else { return std::future::pending().await };
            match ready.get_inner().0.read_events() {
                Ok(events) if events.iter().any(|e| e.mask.contains(AddWatchFlags::IN_IGNORED)) => {
                    self.watch = None;
                    return;
                }
                Ok(events) if events.iter().any(is_arrival) => return,
                Ok(_) => {}
                Err(Errno::EAGAIN) => ready.clear_ready(),
                // Not expected of inotify; the poll is still there.
                Err(_) => return std::future::pending().await,
            }
        }
    }
}

/// Whether an inotify event may be a new entry.
fn is_arrival(event: &InotifyEvent) -> bool {
    event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) || event.name.as_deref().is_some_and(|n: &OsStr| n.as_encoded_bytes().ends_with(b".pck"))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn arrives(a: &mut Arrivals) -> bool {
        tokio::time::timeout(Duration::from_millis(500), a.arrived()).await.is_ok()
    }

    #[tokio::test]
    async fn an_entry_renamed_into_place_wakes_an_armed_loop_and_its_own_bak_renames_do_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = Arrivals::new(dir.path());
        assert_eq!(a.arm(), Armed::Now);
        assert_eq!(a.arm(), Armed::Already);
        std::fs::write(dir.path().join("1+ab.pck.tmp"), b"x").expect("write");
        std::fs::rename(dir.path().join("1+ab.pck.tmp"), dir.path().join("1+ab.pck")).expect("rename");
        assert!(arrives(&mut a).await, "a .pck renamed into place wakes the loop");
        // The loop's own take and a finish are not arrivals.
        std::fs::rename(dir.path().join("1+ab.pck"), dir.path().join("1+ab.bak")).expect("take");
        std::fs::remove_file(dir.path().join("1+ab.bak")).expect("finish");
        assert!(!arrives(&mut a).await, "the loop's own .bak rename does not wake it");
        // A writer that creates the .pck itself wakes it when it closes the file.
        std::fs::write(dir.path().join("2+cd.pck"), b"x").expect("write");
        assert!(arrives(&mut a).await, "a .pck written in place wakes the loop");
    }

    #[tokio::test]
    async fn a_disarmed_watch_never_wakes_and_forgets_what_it_queued() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = Arrivals::new(dir.path());
        assert_eq!(a.arm(), Armed::Now);
        std::fs::write(dir.path().join("1+ab.pck"), b"x").expect("write");
        a.disarm();
        assert!(a.watch.is_some(), "not taken off just after it was put on");
        a.forget_toggle();
        a.disarm();
        std::fs::write(dir.path().join("2+ab.pck"), b"x").expect("write");
        assert!(!arrives(&mut a).await, "unarmed: no wake-up");
        assert_eq!(a.arm(), Armed::Now, "put back at the first idle pass after it was taken off");
        assert!(!arrives(&mut a).await, "what came before the watch was armed is the listing's, not a wake-up");
    }

    #[tokio::test]
    async fn a_queue_directory_replaced_under_the_watch_wakes_the_loop_and_is_watched_anew() {
        let root = tempfile::tempdir().expect("tempdir");
        let (dir, staged) = (root.path().join("in"), root.path().join("staged"));
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::create_dir(&staged).expect("mkdir");
        let mut a = Arrivals::new(&dir);
        assert_eq!(a.arm(), Armed::Now);
        std::fs::rename(&staged, &dir).expect("replace the queue directory");
        assert!(arrives(&mut a).await, "the end of the old directory's watch wakes the loop");
        assert_eq!(a.arm(), Armed::Now, "the directory now there is watched");
        std::fs::write(dir.join("1+ab.pck"), b"x").expect("write");
        assert!(arrives(&mut a).await);
    }

    #[tokio::test]
    async fn a_directory_that_cannot_be_watched_leaves_the_loop_to_its_poll() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = Arrivals::new(&dir.path().join("missing"));
        assert_eq!(a.arm(), Armed::Unavailable);
        assert!(!arrives(&mut a).await);
    }
}
