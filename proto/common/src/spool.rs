//! A Mailman-compatible queue directory: listing by slice, dequeue, finish, preserve,
//! recovery of `.bak` entries, quarantine of files that are not entries, and enqueue.
//!
//! The contract matches Mailman's switchboard:
//! - an entry is `<queue dir>/<TIME>+<DIGEST>.pck`; writers create `<name>.pck.tmp` and
//!   rename it, and `.tmp` files are never touched here;
//! - dequeue renames `.pck` to `.bak`; finishing unlinks the `.bak`; a bad entry is
//!   preserved as `<spool root>/bad/<filebase>.psv` (Mailman's own bad queue);
//! - a new owner of a slice turns the slice's `.bak` files back into `.pck`, and preserves
//!   an entry in `bad/` at its third recovery. Nothing is ever renamed over another entry:
//!   a `.bak` whose `.pck` twin exists goes back under a fresh name of the same slice;
//! - an entry that cannot be opened (EMFILE, EIO, ESTALE, EACCES, ...) is put back and
//!   reported as an error to retry; only what can never be an entry (a malformed name, a
//!   directory, a symlink, a FIFO, an empty file) goes to quarantine.
//!
//! Where qslice keeps its own files, out of Mailman's way (Mailman lists only the queue
//! directories it is configured with, and only names ending in `.pck`/`.bak`):
//! - recovery counts: `<spool root>/.qslice/recovery/<queue>/<filebase>`, a decimal count.
//!   Mailman 3 keeps its own count inside the pickle, which qslice does not rewrite; the
//!   count lives on the shared spool so that the next owner, on any host, sees it.
//! - quarantine: `<spool root>/.qslice/quarantine/<queue>/<original name>`.
//! - stop marks: `<spool root>/.qslice/stopped/<queue>/<filebase>`, an empty file that says
//!   the `.bak` was left by qslice stopping its handler (a fence, a drain timeout), not by a
//!   crash: the next recovery of that entry does not count toward `bad/`.
//!
//! Polling is the source of truth: everything here works from a directory listing, which
//! is what NFS guarantees; change notification can only be a wake-up hint on top.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{renameat2, RenameFlags};

use qslice_proto::slice::{slice_bounds, slice_of, Digest, EntryName, NameError};
use sha1::{Digest as _, Sha1};

/// An entry is preserved in `bad/` at this recovery (Mailman's limit).
pub const MAX_RECOVERIES: u32 = 3;

/// A spool operation that failed; each names the path and the cause.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The queue directory could not be listed.
    #[error("cannot list queue directory {dir}: {source}")]
    ListQueue {
        /// The queue directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Renaming `.pck` to `.bak` failed for a reason other than "already taken".
    #[error("cannot dequeue {path}: {source}")]
    Dequeue {
        /// The `.pck` file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Unlinking a finished `.bak` failed.
    #[error("cannot finish {path}: {source}")]
    Finish {
        /// The `.bak` file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A taken entry could not be opened or looked at (too many open files, an I/O error,
    /// a stale NFS handle, a permission): a fault of the moment, not of the entry. It was
    /// put back as `.pck` (if that failed too it stays `.bak` for recovery) and is retried.
    #[error("cannot open entry {path}: {source}; it stays queued and is retried")]
    OpenEntry {
        /// The entry's file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing a stop mark failed.
    #[error("cannot write stop mark {path}: {source}")]
    StopMark {
        /// The mark file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Moving an entry to `bad/` failed.
    #[error("cannot preserve {path} in {bad_dir}: {source}")]
    Preserve {
        /// The file being preserved.
        path: PathBuf,
        /// The bad directory.
        bad_dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Putting an entry back as `.pck` failed.
    #[error("cannot requeue {path}: {source}")]
    Requeue {
        /// The `.bak` file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading or writing a recovery count failed.
    #[error("cannot update recovery count {path}: {source}")]
    RecoveryCount {
        /// The count file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Moving a file into quarantine failed.
    #[error("cannot quarantine {path} into {dir}: {source}")]
    Quarantine {
        /// The file being quarantined.
        path: PathBuf,
        /// The quarantine directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing a new entry failed.
    #[error("cannot enqueue into {dir}: {source}")]
    Enqueue {
        /// The queue directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Why a file in a queue directory is not a processable entry.
#[derive(Debug, thiserror::Error)]
pub enum ProblemReason {
    /// The name is not `<TIME>+<DIGEST>.<ext>`.
    #[error("malformed name: {0}")]
    BadName(#[from] NameError),
    /// A name that parses but whose extension is neither `pck`, `bak` nor `*.tmp`.
    #[error("unexpected extension .{0}")]
    UnexpectedExtension(String),
    /// A subdirectory.
    #[error("a directory, not a queue file")]
    Directory,
    /// A symbolic link (never followed).
    #[error("a symbolic link, not a queue file")]
    Symlink,
    /// A socket, fifo or device.
    #[error("not a regular file")]
    NotRegular,
    /// A zero-byte entry: Mailman writes entries whole, so this one holds no message.
    #[error("zero-byte entry")]
    Empty,
}

/// A file found in a queue directory that is not a processable entry.
#[derive(Debug)]
pub struct Problem {
    /// The file as found.
    pub path: PathBuf,
    /// Why it is not an entry.
    pub reason: ProblemReason,
}

/// A problem file after it was moved into quarantine.
#[derive(Debug)]
pub struct Quarantined {
    /// Where it was.
    pub from: PathBuf,
    /// Where it is now.
    pub to: PathBuf,
    /// Why it was moved.
    pub reason: ProblemReason,
}

/// A well-formed entry seen in a listing.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// The parsed name.
    pub name: EntryName,
    /// The entry's slice under the listing's slice count.
    pub slice: u32,
}

/// One listing of a queue directory, grouped by slice.
#[derive(Debug)]
pub struct Scan {
    /// The slice count the entries were grouped by.
    pub slices_total: u32,
    /// `.pck` entries per slice, oldest TIME first (ties by name, so the order is stable).
    pub pending: BTreeMap<u32, Vec<Entry>>,
    /// `.bak` entries per slice: in flight, or left by a crash.
    pub in_flight: BTreeMap<u32, Vec<Entry>>,
    /// The slices whose entries were not wanted ([`QueueDir::scan_for`]): counts only.
    pub others: BTreeMap<u32, SliceCounts>,
    /// Files that are not entries; see [`QueueDir::quarantine`].
    pub problems: Vec<Problem>,
    /// When the listing was taken.
    pub listed_at: SystemTime,
}

/// What a listing counted of a slice whose entries were not wanted.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SliceCounts {
    /// `.pck` entries.
    pub pending: usize,
    /// `.bak` entries.
    pub in_flight: usize,
    /// The oldest pending entry's TIME.
    pub oldest_time: Option<f64>,
}

impl Scan {
    /// Age in seconds of the oldest pending entry of `slice`, from its TIME, if any.
    pub fn oldest_age(&self, slice: u32) -> Option<f64> {
        let time = match self.pending.get(&slice) {
            Some(entries) => entries.first()?.name.time,
            None => self.others.get(&slice)?.oldest_time?,
        };
        let now = self.listed_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        Some((now - time).max(0.0))
    }

    /// Pending entries of `slice`.
    pub fn depth(&self, slice: u32) -> usize {
        self.pending.get(&slice).map_or_else(|| self.others.get(&slice).map_or(0, |c| c.pending), Vec::len)
    }

    /// `.bak` entries of `slice`.
    pub fn in_flight_count(&self, slice: u32) -> usize {
        self.in_flight.get(&slice).map_or_else(|| self.others.get(&slice).map_or(0, |c| c.in_flight), Vec::len)
    }

    /// Pending entries of every slice.
    pub fn total_depth(&self) -> usize {
        self.pending.values().map(Vec::len).sum::<usize>() + self.others.values().map(|c| c.pending).sum::<usize>()
    }

    /// The slices with any entry, pending or in flight.
    pub fn slices_with_entries(&self) -> std::collections::BTreeSet<u32> {
        self.pending.keys().chain(self.in_flight.keys()).chain(self.others.keys()).copied().collect()
    }
}

/// An entry this process took (renamed to `.bak`) and must finish, preserve or requeue.
#[derive(Debug, Clone, PartialEq)]
pub struct InFlight {
    /// The entry.
    pub entry: Entry,
    /// The `.bak` file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
}

/// What [`QueueDir::dequeue`] found.
#[derive(Debug)]
pub enum Dequeued {
    /// The entry is now ours, as `.bak`.
    Taken(InFlight),
    /// Another process took or removed it first (ENOENT on rename): not an error.
    Gone,
    /// It was taken but is not processable, and was moved to quarantine.
    Quarantined(Quarantined),
}

/// What [`QueueDir::recover`] did.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Entries turned back from `.bak` into `.pck`, with their new recovery count.
    pub requeued: Vec<(Entry, u32)>,
    /// `.bak` entries whose `.pck` twin was waiting: put back under a fresh name of the
    /// same slice (the new name), so that neither is lost.
    pub renamed: Vec<(Entry, EntryName)>,
    /// Entries requeued without counting: qslice had stopped their handler (stop mark).
    pub uncounted: usize,
    /// Entries preserved in `bad/` at their third recovery.
    pub preserved: Vec<Entry>,
    /// Malformed `.bak` files moved to quarantine.
    pub quarantined: Vec<Quarantined>,
    /// The recovered slices' `.pck` entries once the recovery is done (those requeued and
    /// put back under fresh names among them), per slice, oldest TIME first as in
    /// [`Scan::pending`]. Empty from [`QueueDir::recover_entries`].
    pub pending: BTreeMap<u32, Vec<Entry>>,
}

/// Sorts `entries` oldest TIME first, ties by name (a stable order).
fn sort_fifo(entries: &mut [Entry]) {
    entries.sort_by(|a, b| a.name.time.total_cmp(&b.name.time).then_with(|| a.name.filebase.cmp(&b.name.filebase)));
}

/// One queue directory of a Mailman spool, with qslice's places beside it.
#[derive(Clone, Debug)]
pub struct QueueDir {
    queue: String,
    dir: PathBuf,
    bad_dir: PathBuf,
    quarantine_dir: PathBuf,
    recovery_dir: PathBuf,
    stopped_dir: PathBuf,
    /// Whether `renameat2(RENAME_NOREPLACE)` may work here: cleared at its first EINVAL
    /// (NFS and other filesystems without it), after which a take looks for the `.bak`
    /// before an ordinary rename.
    noreplace: Arc<AtomicBool>,
}

impl QueueDir {
    /// The queue `queue` under spool root `root` (`qfiles/` in Mailman 2.1, `var/queue/`
    /// in Mailman 3). `queue` must be a plain directory name (see `keys::validate_name`).
    pub fn new(root: impl AsRef<Path>, queue: &str) -> QueueDir {
        let root = root.as_ref();
        let own = root.join(".qslice");
        QueueDir {
            queue: queue.to_owned(),
            dir: root.join(queue),
            bad_dir: root.join("bad"),
            quarantine_dir: own.join("quarantine").join(queue),
            recovery_dir: own.join("recovery").join(queue),
            stopped_dir: own.join("stopped").join(queue),
            noreplace: Arc::new(AtomicBool::new(true)),
        }
    }

    /// This queue directory with takes that never use `renameat2(RENAME_NOREPLACE)`, as on
    /// a filesystem without it.
    #[doc(hidden)]
    pub fn without_noreplace(self) -> QueueDir {
        self.noreplace.store(false, Ordering::Relaxed);
        self
    }

    /// Renames `from` to `to` unless `to` exists (then `AlreadyExists`): one
    /// `renameat2(RENAME_NOREPLACE)` where the filesystem has it, else a look for `to`
    /// and a rename (not atomic there: only this slice's owner takes its entries).
    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        if self.noreplace.load(Ordering::Relaxed) {
            match renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE) {
                Ok(()) => return Ok(()),
                Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => self.noreplace.store(false, Ordering::Relaxed),
                Err(e) => return Err(e.into()),
            }
        }
        if fs::symlink_metadata(to).is_ok() {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        fs::rename(from, to)
    }

    /// The queue name.
    pub fn queue(&self) -> &str {
        &self.queue
    }
    /// The queue directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Where preserved entries go (Mailman's bad queue).
    pub fn bad_dir(&self) -> &Path {
        &self.bad_dir
    }
    /// Where files that are not entries go.
    pub fn quarantine_dir(&self) -> &Path {
        &self.quarantine_dir
    }

    /// The `.pck` path of an entry.
    pub fn pck_path(&self, entry: &Entry) -> PathBuf {
        self.dir.join(format!("{}.pck", entry.name.filebase))
    }
    /// How long the oldest `.bak` of `entries` has been in flight, in seconds: from its
    /// inode change time, which the rename to `.bak` sets (its modification time is still
    /// the enqueue time). `None` without a `.bak` that can be looked at.
    pub fn oldest_in_flight_age(&self, entries: &[Entry]) -> Option<f64> {
        use std::os::unix::fs::MetadataExt;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs_f64();
        entries.iter().filter_map(|e| std::fs::symlink_metadata(self.bak_path(e)).ok()).map(|m| (now - (m.ctime() as f64 + m.ctime_nsec() as f64 / 1e9)).max(0.0)).reduce(f64::max)
    }

    /// The `.bak` path of an entry.
    pub fn bak_path(&self, entry: &Entry) -> PathBuf {
        self.dir.join(format!("{}.bak", entry.name.filebase))
    }

    /// Lists the queue directory once and groups its entries by slice among `n`.
    ///
    /// Files that are not entries are reported in [`Scan::problems`], not moved: moving is
    /// [`QueueDir::quarantine`]'s job, so a read-only caller can scan safely. `.tmp` files
    /// (being written) and hidden files (such as NFS's `.nfsXXXX` silly-renames of open,
    /// unlinked files) are not queue files and are left alone.
    pub fn scan(&self, n: u32) -> Result<Scan, SpoolError> {
        self.scan_for(n, |_| true)
    }

    /// Like [`QueueDir::scan`], keeping the entries only of the slices `wanted`; of the
    /// others only counts and the oldest time are kept ([`Scan::others`]), and their names
    /// cost no allocation: what a runner does per listing with the entries of slices it
    /// does not hold is counting them.
    pub fn scan_for(&self, n: u32, wanted: impl Fn(u32) -> bool) -> Result<Scan, SpoolError> {
        let list_err = |source| SpoolError::ListQueue { dir: self.dir.clone(), source };
        let mut scan = Scan { slices_total: n, pending: BTreeMap::new(), in_flight: BTreeMap::new(), others: BTreeMap::new(), problems: Vec::new(), listed_at: SystemTime::now() };
        for dirent in fs::read_dir(&self.dir).map_err(list_err)? {
            let dirent = match dirent {
                Ok(d) => d,
                // The entry vanished between getdents and its stat: another process moved it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(list_err(e)),
            };
            let file_name = dirent.file_name();
            if file_name.as_encoded_bytes().starts_with(b".") || file_name.as_encoded_bytes().ends_with(b".tmp") {
                continue;
            }
            let file_type = match dirent.file_type() {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(list_err(e)),
            };
            let type_problem = if file_type.is_symlink() {
                Some(ProblemReason::Symlink)
            } else if file_type.is_dir() {
                Some(ProblemReason::Directory)
            } else if !file_type.is_file() {
                Some(ProblemReason::NotRegular)
            } else {
                None
            };
            if let Some(reason) = type_problem {
                scan.problems.push(Problem { path: dirent.path(), reason });
                continue;
            }
            let parts = match file_name.to_str().ok_or(NameError::NotUtf8).and_then(EntryName::peek) {
                Ok(parts) => parts,
                Err(e) => {
                    scan.problems.push(Problem { path: dirent.path(), reason: e.into() });
                    continue;
                }
            };
            let pending = match parts.ext {
                "pck" => true,
                "bak" => false,
                other => {
                    let reason = ProblemReason::UnexpectedExtension(other.to_owned());
                    scan.problems.push(Problem { path: dirent.path(), reason });
                    continue;
                }
            };
            let slice = slice_of(&parts.digest, n);
            if !wanted(slice) {
                let counts = scan.others.entry(slice).or_default();
                if pending {
                    counts.pending += 1;
                    counts.oldest_time = Some(counts.oldest_time.map_or(parts.time, |t| t.min(parts.time)));
                } else {
                    counts.in_flight += 1;
                }
                continue;
            }
            let target = if pending { &mut scan.pending } else { &mut scan.in_flight };
            target.entry(slice).or_default().push(Entry { name: parts.to_name(), slice });
        }
        for entries in scan.pending.values_mut().chain(scan.in_flight.values_mut()) {
            sort_fifo(entries);
        }
        Ok(scan)
    }

    /// Takes an entry: renames its `.pck` to `.bak`, then checks that it is a non-empty
    /// regular file (an empty one, or one that is not a file, goes to quarantine). One that
    /// cannot be opened is put back and reported as [`SpoolError::OpenEntry`], to retry.
    ///
    /// A `.bak` of the same name (in flight, or left by a crash or a late NFS rename) is
    /// never overwritten: the take fails and [`QueueDir::recover`] resolves the pair.
    pub fn dequeue(&self, entry: &Entry) -> Result<Dequeued, SpoolError> {
        self.take(entry, true)
    }

    /// Like [`QueueDir::dequeue`], for a handler that never reads the entry (the move
    /// handler): the taken file's type and size are looked at (`lstat`, on the name just
    /// renamed) instead of opening it, which is not file work such a handler needs.
    pub fn dequeue_unread(&self, entry: &Entry) -> Result<Dequeued, SpoolError> {
        self.take(entry, false)
    }

    fn take(&self, entry: &Entry, open: bool) -> Result<Dequeued, SpoolError> {
        let pck = self.pck_path(entry);
        let bak = self.bak_path(entry);
        match self.rename_noreplace(&pck, &bak) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Dequeued::Gone),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // In flight here, or left over: either way a rename would destroy it.
                if fs::symlink_metadata(&pck).is_err() {
                    return Ok(Dequeued::Gone);
                }
                let why = format!("{} exists (taken earlier and not finished); the owner's recovery puts it back under a fresh name", bak.display());
                return Err(SpoolError::Dequeue { path: pck, source: io::Error::new(io::ErrorKind::AlreadyExists, why) });
            }
            Err(source) => return Err(SpoolError::Dequeue { path: pck, source }),
        }
        let looked = if open { File::open(&bak).and_then(|f| f.metadata()) } else { fs::symlink_metadata(&bak) };
        let problem = match looked {
            Ok(meta) if !meta.is_file() => ProblemReason::NotRegular,
            Ok(meta) if meta.len() == 0 => ProblemReason::Empty,
            Ok(meta) => return Ok(Dequeued::Taken(InFlight { entry: entry.clone(), path: bak, size: meta.len() })),
            Err(source) => {
                // Put it back for the next try; if even that fails it stays .bak, and the
                // owner's recovery of stranded entries brings it back.
                if fs::symlink_metadata(&pck).is_err() {
                    let _ = fs::rename(&bak, &pck);
                }
                return Err(SpoolError::OpenEntry { path: pck, source });
            }
        };
        self.quarantine(Problem { path: bak, reason: problem }).map(Dequeued::Quarantined)
    }

    /// Moves `from` (a `.bak` of `entry`) back into the queue under a name no file has:
    /// the same digest, so the same slice, and a time just after the entry's, so it keeps
    /// its place in the FIFO order. Its recovery count and stop mark move with it.
    fn requeue_under_fresh_name(&self, from: &Path, entry: &Entry) -> io::Result<EntryName> {
        let mut time = entry.name.time;
        if !time.is_finite() {
            time = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        }
        loop {
            time = time.next_up();
            let name = EntryName::parse(&format!("{time}+{}.pck", entry.name.digest.to_hex())).map_err(io::Error::other)?;
            let to = self.dir.join(format!("{}.pck", name.filebase));
            let taken = |filebase: &str| ["pck", "bak"].iter().any(|ext| fs::symlink_metadata(self.dir.join(format!("{filebase}.{ext}"))).is_ok());
            if taken(&name.filebase) {
                continue;
            }
            fs::rename(from, &to)?;
            for dir in [&self.recovery_dir, &self.stopped_dir] {
                let _ = fs::rename(dir.join(&entry.name.filebase), dir.join(&name.filebase));
            }
            return Ok(name);
        }
    }

    /// Finishes an entry: unlinks its `.bak`.
    pub fn finish(&self, taken: &InFlight) -> Result<(), SpoolError> {
        fs::remove_file(&taken.path).map_err(|source| SpoolError::Finish { path: taken.path.clone(), source })
    }

    /// Preserves an entry as `bad/<filebase>.psv`, creating `bad/` like Mailman.
    pub fn preserve(&self, taken: &InFlight) -> Result<PathBuf, SpoolError> {
        self.preserve_path(&taken.path, &taken.entry.name.filebase)
    }

    fn preserve_path(&self, path: &Path, filebase: &str) -> Result<PathBuf, SpoolError> {
        let err = |source| SpoolError::Preserve { path: path.to_owned(), bad_dir: self.bad_dir.clone(), source };
        fs::create_dir_all(&self.bad_dir).map_err(err)?;
        let psv = self.bad_dir.join(format!("{filebase}.psv"));
        fs::rename(path, &psv).map_err(err)?;
        Ok(psv)
    }

    /// Puts a taken entry back as `.pck` (for a temporary failure), under a fresh name if
    /// a `.pck` of the same name appeared meanwhile.
    pub fn requeue(&self, taken: &InFlight) -> Result<(), SpoolError> {
        let pck = self.pck_path(&taken.entry);
        let err = |source| SpoolError::Requeue { path: taken.path.clone(), source };
        if fs::symlink_metadata(&pck).is_ok() {
            return self.requeue_under_fresh_name(&taken.path, &taken.entry).map(drop).map_err(err);
        }
        fs::rename(&taken.path, pck).map_err(err)
    }

    /// Marks an in-flight entry as stopped by qslice (a fence, a drain timeout) rather than
    /// crashed: its next recovery does not count toward the third that moves it to `bad/`.
    /// Written before the handler is killed where the runner can (a runner that learns of
    /// its fence late writes it after the leash killed the handler).
    pub fn mark_stopped(&self, entry: &Entry) -> Result<(), SpoolError> {
        let path = self.stopped_dir.join(&entry.name.filebase);
        let err = |source| SpoolError::StopMark { path: path.clone(), source };
        fs::create_dir_all(&self.stopped_dir).map_err(err)?;
        File::create(&path).map(drop).map_err(err)
    }

    /// Whether the entry carries a stop mark.
    pub fn is_marked_stopped(&self, filebase: &str) -> bool {
        fs::symlink_metadata(self.stopped_dir.join(filebase)).is_ok()
    }

    /// Moves a problem file into quarantine, keeping its name (a numbered suffix is added
    /// if that name is already there). Never deletes anything.
    pub fn quarantine(&self, problem: Problem) -> Result<Quarantined, SpoolError> {
        let err = |source| SpoolError::Quarantine { path: problem.path.clone(), dir: self.quarantine_dir.clone(), source };
        fs::create_dir_all(&self.quarantine_dir).map_err(err)?;
        let name = problem.path.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "unnamed".into());
        let mut to = self.quarantine_dir.join(&name);
        let mut n = 0u32;
        while fs::symlink_metadata(&to).is_ok() {
            n += 1;
            let mut numbered = name.clone();
            numbered.push(format!(".{n}"));
            to = self.quarantine_dir.join(numbered);
        }
        fs::rename(&problem.path, &to).map_err(err)?;
        Ok(Quarantined { from: problem.path, to, reason: problem.reason })
    }

    /// Recovers the `.bak` entries of the slices `owned` accepts (among `n`): a dead
    /// owner's in-flight work goes back to `.pck`, except at its third recovery, when it is
    /// preserved in `bad/`. Malformed `.bak` files go to quarantine. Counts of entries that
    /// are gone are removed.
    pub fn recover(&self, n: u32, owned: impl Fn(u32) -> bool) -> Result<Recovery, SpoolError> {
        self.recover_while(n, owned, || true)
    }

    /// Like [`QueueDir::recover`], asking `go_on` before each entry (the claim's fence is
    /// still valid: a rename on NFS can block while the lease runs out) and stopping, with
    /// what was done so far, once it says no.
    ///
    /// The listing keeps only the `owned` slices' entries; their `.pck` entries after the
    /// recovery are [`Recovery::pending`], for the new owner to start on without listing
    /// again.
    pub fn recover_while(&self, n: u32, owned: impl Fn(u32) -> bool, go_on: impl Fn() -> bool) -> Result<Recovery, SpoolError> {
        let mut scan = self.scan_for(n, &owned)?;
        let mut report = Recovery::default();
        for problem in std::mem::take(&mut scan.problems) {
            let is_bak = problem.path.extension().is_some_and(|e| e == "bak");
            if is_bak && matches!(problem.reason, ProblemReason::BadName(_)) {
                report.quarantined.push(self.quarantine(problem)?);
            }
        }
        for (slice, entries) in &scan.in_flight {
            if !owned(*slice) {
                continue;
            }
            for entry in entries {
                if !go_on() {
                    return Ok(report);
                }
                self.recover_one(entry, &mut report)?;
            }
        }
        // The twins put back under fresh names are live too: keep their counts.
        for (entry, name) in &report.renamed {
            scan.pending.entry(entry.slice).or_default().push(Entry { name: name.clone(), slice: entry.slice });
        }
        self.sweep_recovery_counts(&scan, &owned)?;
        self.sweep_stop_marks(&scan, &owned);
        let mut pending = std::mem::take(&mut scan.pending);
        for (entry, _) in &report.requeued {
            pending.entry(entry.slice).or_default().push(entry.clone());
        }
        for entries in pending.values_mut() {
            sort_fifo(entries);
        }
        report.pending = pending;
        Ok(report)
    }

    /// Recovers exactly `entries` (`.bak` files listed earlier, e.g. stranded ones the
    /// owner has not in flight) as [`QueueDir::recover`] recovers a slice's: back to
    /// `.pck` (under a fresh name if a `.pck` twin waits), or to `bad/` at the third
    /// recovery. One that is gone meanwhile is skipped. Asks `go_on` before each entry.
    pub fn recover_entries(&self, entries: &[Entry], go_on: impl Fn() -> bool) -> Result<Recovery, SpoolError> {
        let mut report = Recovery::default();
        for entry in entries {
            if !go_on() {
                break;
            }
            if fs::symlink_metadata(self.bak_path(entry)).is_err() {
                continue;
            }
            self.recover_one(entry, &mut report)?;
        }
        Ok(report)
    }

    /// Recovers one `.bak` entry into `report`.
    fn recover_one(&self, entry: &Entry, report: &mut Recovery) -> Result<(), SpoolError> {
        let bak = self.bak_path(entry);
        let stopped = self.is_marked_stopped(&entry.name.filebase);
        let count = if stopped { self.recovery_count(&entry.name.filebase)? } else { self.bump_recovery_count(entry)? };
        if stopped {
            report.uncounted += 1;
            let _ = fs::remove_file(self.stopped_dir.join(&entry.name.filebase));
        }
        if fs::symlink_metadata(self.pck_path(entry)).is_ok() {
            match self.requeue_under_fresh_name(&bak, entry) {
                Ok(name) => report.renamed.push((entry.clone(), name)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(SpoolError::Requeue { path: bak, source }),
            }
            return Ok(());
        }
        if count >= MAX_RECOVERIES {
            match self.preserve_path(&bak, &entry.name.filebase) {
                Ok(_) => {
                    self.forget_recovery_count(&entry.name.filebase)?;
                    report.preserved.push(entry.clone());
                }
                Err(SpoolError::Preserve { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            return Ok(());
        }
        match fs::rename(&bak, self.pck_path(entry)) {
            Ok(()) => report.requeued.push((entry.clone(), count)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(SpoolError::Requeue { path: bak, source }),
        }
        Ok(())
    }

    fn count_path(&self, filebase: &str) -> PathBuf {
        self.recovery_dir.join(filebase)
    }

    /// How many times the entry was recovered so far.
    pub fn recovery_count(&self, filebase: &str) -> Result<u32, SpoolError> {
        let path = self.count_path(filebase);
        match fs::read_to_string(&path) {
            // A garbled count file counts as one recovery: never loop forever on it.
            Ok(text) => Ok(text.trim().parse().unwrap_or(1)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(source) => Err(SpoolError::RecoveryCount { path, source }),
        }
    }

    fn bump_recovery_count(&self, entry: &Entry) -> Result<u32, SpoolError> {
        let count = self.recovery_count(&entry.name.filebase)? + 1;
        let path = self.count_path(&entry.name.filebase);
        let err = |source| SpoolError::RecoveryCount { path: path.clone(), source };
        fs::create_dir_all(&self.recovery_dir).map_err(err)?;
        write_atomically(&path, count.to_string().as_bytes()).map_err(err)?;
        Ok(count)
    }

    fn forget_recovery_count(&self, filebase: &str) -> Result<(), SpoolError> {
        let path = self.count_path(filebase);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(SpoolError::RecoveryCount { path, source: e }),
            _ => Ok(()),
        }
    }

    /// Removes the counts of owned slices' entries that are neither pending nor in flight.
    fn sweep_recovery_counts(&self, scan: &Scan, owned: &impl Fn(u32) -> bool) -> Result<(), SpoolError> {
        let listing = match fs::read_dir(&self.recovery_dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(SpoolError::RecoveryCount { path: self.recovery_dir.clone(), source }),
        };
        let live = |slice: u32, filebase: &str| [&scan.pending, &scan.in_flight].iter().any(|m| m.get(&slice).is_some_and(|v| v.iter().any(|e| e.name.filebase == filebase)));
        for dirent in listing.flatten() {
            let file_name = dirent.file_name();
            let Some(filebase) = file_name.to_str() else { continue };
            let Ok(name) = EntryName::parse(&format!("{filebase}.pck")) else { continue };
            let slice = slice_of(&name.digest, scan.slices_total);
            if owned(slice) && !live(slice, filebase) {
                self.forget_recovery_count(filebase)?;
            }
        }
        Ok(())
    }

    /// Removes the stop marks of owned slices' entries that are no longer in flight.
    fn sweep_stop_marks(&self, scan: &Scan, owned: &impl Fn(u32) -> bool) {
        let Ok(listing) = fs::read_dir(&self.stopped_dir) else { return };
        for dirent in listing.flatten() {
            let file_name = dirent.file_name();
            let Some(filebase) = file_name.to_str() else { continue };
            let Ok(name) = EntryName::parse(&format!("{filebase}.bak")) else { continue };
            let slice = slice_of(&name.digest, scan.slices_total);
            let in_flight = scan.in_flight.get(&slice).is_some_and(|v| v.iter().any(|e| e.name.filebase == filebase));
            if owned(slice) && !in_flight {
                let _ = fs::remove_file(dirent.path());
            }
        }
    }

    /// Writes a new entry with a Mailman-style name (`<time>+<sha1>.pck`, written as
    /// `.pck.tmp`, synced, then renamed). For tests, demos and benchmarks.
    pub fn enqueue(&self, payload: &[u8]) -> Result<EntryName, SpoolError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let mut hasher = Sha1::new();
        hasher.update(payload);
        hasher.update(now.to_be_bytes());
        hasher.update(rand::random::<[u8; 16]>());
        let digest = Digest(hasher.finalize().into());
        self.enqueue_as(now, &digest, payload)
    }

    /// Writes a new entry whose digest falls in slice `slice` of `n`.
    pub fn enqueue_in_slice(&self, payload: &[u8], slice: u32, n: u32) -> Result<EntryName, SpoolError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let digest = random_digest_in(slice, n);
        self.enqueue_as(now, &digest, payload)
    }

    /// Writes a new entry with the given TIME and digest.
    pub fn enqueue_as(&self, time: f64, digest: &Digest, payload: &[u8]) -> Result<EntryName, SpoolError> {
        let err = |source| SpoolError::Enqueue { dir: self.dir.clone(), source };
        let filebase = format!("{time:.6}+{digest}");
        let name = EntryName::parse(&format!("{filebase}.pck")).map_err(|e| err(io::Error::other(e)))?;
        let final_path = self.dir.join(format!("{filebase}.pck"));
        write_atomically(&final_path, payload).map_err(err)?;
        Ok(name)
    }
}

/// Writes `path` the way Mailman does: `<path>.tmp`, fsync, rename.
fn write_atomically(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = File::create(&tmp)?;
    file.write_all(data)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)
}

/// A random digest inside slice `slice` of `n` (`n` of 0 or 1, or `slice >= n`: any digest).
pub fn random_digest_in(slice: u32, n: u32) -> Digest {
    let Some(bounds) = slice_bounds(slice, n.max(1)) else {
        return Digest(rand::random());
    };
    // A slice is a contiguous range: keep the bytes its bounds share, draw the rest, and
    // draw again when the result falls outside (rarely more than a few hundred tries).
    let shared = bounds.lower.0.iter().zip(bounds.upper.0.iter()).take_while(|(a, b)| a == b).count();
    loop {
        let mut d = bounds.lower;
        for byte in d.0.iter_mut().skip(shared) {
            *byte = rand::random();
        }
        if d >= bounds.lower && d <= bounds.upper {
            return d;
        }
    }
}

#[cfg(test)]
#[path = "spool_tests.rs"]
mod tests;
