//! The faults the file system can inject, and the switchboard that decides, per
//! operation, which of them fires.
//!
//! Contract: at most one fault of each kind is active at a time (one per [`Op`] for
//! [`Fault::Block`]); setting a fault replaces the active one of its kind. A fault limited
//! to `times` matches is spent after that many and then stops matching. Every fault
//! that fires is counted in [`Counters`]. The decisions are plain Rust, tested without
//! FUSE.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Which operations a fault applies to: names ending in a suffix, and how many times.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Match {
    /// Only names ending in this suffix (e.g. `".pck"`); every name when `None`.
    pub suffix: Option<String>,
    /// Only the next this-many matching operations; every one when `None`.
    pub times: Option<u32>,
}

impl Match {
    /// Every operation, for as long as the fault is set.
    pub fn any() -> Match {
        Match::default()
    }

    /// Only names ending in `suffix`.
    pub fn suffix(suffix: &str) -> Match {
        Match { suffix: Some(suffix.to_owned()), times: None }
    }

    /// Limits the fault to the next `n` matching operations.
    pub fn times(mut self, n: u32) -> Match {
        self.times = Some(n);
        self
    }

    fn matches_name(&self, name: &str) -> bool {
        self.suffix.as_deref().is_none_or(|suffix| name.ends_with(suffix))
    }
}

/// An operation that [`Fault::Block`] can hold back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    /// Opening (or creating) a file; the name is the file's.
    Open,
    /// Renaming; the name is the source's.
    Rename,
    /// Unlinking a file; the name is the file's.
    Unlink,
    /// Listing a directory (the kernel's opendir, where the listing is read); the name
    /// is the directory's.
    Readdir,
}

/// The error [`Fault::OpenError`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OpenErrno {
    /// Too many open files (a process out of descriptors).
    Emfile,
    /// An I/O error (a failing disk or server).
    Eio,
    /// A stale file handle (an NFS server that lost the file).
    Estale,
}

impl OpenErrno {
    /// The errno value a caller sees.
    pub fn raw(self) -> i32 {
        match self {
            OpenErrno::Emfile => libc::EMFILE,
            OpenErrno::Eio => libc::EIO,
            OpenErrno::Estale => libc::ESTALE,
        }
    }
}

/// One fault to inject while the file system is mounted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fault {
    /// The rename is really done in the backing directory, and the caller is told
    /// ENOENT (an NFS client whose retried RENAME finds the source gone). The suffix is
    /// matched against the source name.
    RenameThenEnoent(Match),
    /// Directory listings come from a snapshot up to `ttl` old, and the kernel is told it
    /// may cache names (also missing ones) and attributes for `ttl` (NFS's attribute
    /// cache, `acdirmax`). Changes made through the mount drop the snapshot of their
    /// directory, as an NFS client sees its own changes; changes made in the backing
    /// directory (another host) stay hidden until the snapshot or cache entry expires.
    CachedListings {
        /// How old a listing or cached attribute may be.
        ttl: Duration,
    },
    /// Opening (or creating) a matching file fails with `errno`.
    OpenError {
        /// The error returned.
        errno: OpenErrno,
        /// Which opens fail.
        matching: Match,
    },
    /// A matching `op` waits `duration` before it is performed (a hung server); other
    /// operations go on meanwhile.
    Block {
        /// The operation held back.
        op: Op,
        /// How long it waits before it is performed.
        duration: Duration,
        /// Which operations are held back.
        matching: Match,
    },
}

/// How many faults fired since the mount.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Renames performed and then reported as ENOENT.
    pub renames_then_enoent: u64,
    /// Directory listings answered from a cached snapshot.
    pub cached_listings: u64,
    /// Opens (and creates) failed with an injected errno.
    pub open_errors: u64,
    /// Operations held back by [`Fault::Block`].
    pub blocked_ops: u64,
}

/// A matching rule and how many more times it may fire.
#[derive(Debug)]
struct Armed {
    matching: Match,
    /// Matches left; `None` for unlimited.
    left: Option<u32>,
}

impl Armed {
    fn new(matching: Match) -> Armed {
        let left = matching.times;
        Armed { matching, left }
    }

    /// Whether the rule fires for `name`, using up one of its times if so.
    fn fire(&mut self, name: &str) -> bool {
        if !self.matching.matches_name(name) || self.left == Some(0) {
            return false;
        }
        if let Some(left) = &mut self.left {
            *left -= 1;
        }
        true
    }
}

/// The active faults and the counters; owned by the file system behind a mutex.
#[derive(Debug, Default)]
pub struct Switchboard {
    rename_then_enoent: Option<Armed>,
    cache_ttl: Option<Duration>,
    open_error: Option<(OpenErrno, Armed)>,
    /// One entry per blocked operation kind: (op, duration, rule).
    blocks: Vec<(Op, Duration, Armed)>,
    counters: Counters,
}

impl Switchboard {
    /// Activates `fault`, replacing the active fault of the same kind.
    pub fn set(&mut self, fault: Fault) {
        match fault {
            Fault::RenameThenEnoent(matching) => self.rename_then_enoent = Some(Armed::new(matching)),
            Fault::CachedListings { ttl } => self.cache_ttl = Some(ttl),
            Fault::OpenError { errno, matching } => self.open_error = Some((errno, Armed::new(matching))),
            Fault::Block { op, duration, matching } => {
                self.blocks.retain(|(o, _, _)| *o != op);
                self.blocks.push((op, duration, Armed::new(matching)));
            }
        }
    }

    /// Deactivates every fault; the counters stay.
    pub fn clear(&mut self) {
        let counters = self.counters;
        *self = Switchboard { counters, ..Switchboard::default() };
    }

    /// The counters so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Whether a rename of `source_name` is to be reported as ENOENT after it is done.
    pub fn rename_then_enoent(&mut self, source_name: &str) -> bool {
        let fire = self.rename_then_enoent.as_mut().is_some_and(|a| a.fire(source_name));
        if fire {
            self.counters.renames_then_enoent += 1;
        }
        fire
    }

    /// How long the kernel may cache names and attributes, and listings may be reused.
    pub fn cache_ttl(&self) -> Option<Duration> {
        self.cache_ttl
    }

    /// Whether a listing snapshot taken at `taken` may answer at `now`; counts it if so.
    pub fn use_snapshot(&mut self, taken: Instant, now: Instant) -> bool {
        let fresh = self.cache_ttl.is_some_and(|ttl| now.saturating_duration_since(taken) < ttl);
        if fresh {
            self.counters.cached_listings += 1;
        }
        fresh
    }

    /// The errno an open of `name` fails with, if any.
    pub fn open_error(&mut self, name: &str) -> Option<i32> {
        let (errno, armed) = self.open_error.as_mut()?;
        if !armed.fire(name) {
            return None;
        }
        self.counters.open_errors += 1;
        Some(errno.raw())
    }

    /// How long `op` on `name` is held back, if at all.
    pub fn block(&mut self, op: Op, name: &str) -> Option<Duration> {
        let (_, duration, armed) = self.blocks.iter_mut().find(|(o, _, _)| *o == op)?;
        if !armed.fire(name) {
            return None;
        }
        self.counters.blocked_ops += 1;
        Some(*duration)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suffix_rule_fires_only_for_matching_names_and_only_its_times() {
        let mut board = Switchboard::default();
        board.set(Fault::RenameThenEnoent(Match::suffix(".pck").times(2)));
        assert!(!board.rename_then_enoent("a.pck.tmp"));
        assert!(board.rename_then_enoent("a.pck"));
        assert!(board.rename_then_enoent("b.pck"));
        assert!(!board.rename_then_enoent("c.pck"), "spent after two");
        assert_eq!(board.counters().renames_then_enoent, 2);
    }

    #[test]
    fn setting_a_fault_replaces_its_kind_and_clear_keeps_counters() {
        let mut board = Switchboard::default();
        board.set(Fault::OpenError { errno: OpenErrno::Eio, matching: Match::any() });
        board.set(Fault::OpenError { errno: OpenErrno::Estale, matching: Match::any() });
        assert_eq!(board.open_error("x"), Some(libc::ESTALE));
        let second = Duration::from_secs(1);
        board.set(Fault::Block { op: Op::Open, duration: second, matching: Match::any() });
        board.set(Fault::Block { op: Op::Unlink, duration: second * 2, matching: Match::any() });
        assert_eq!(board.block(Op::Open, "x"), Some(second));
        assert_eq!(board.block(Op::Unlink, "x"), Some(second * 2));
        assert_eq!(board.block(Op::Rename, "x"), None);
        board.clear();
        assert_eq!(board.open_error("x"), None);
        assert_eq!(board.block(Op::Open, "x"), None);
        assert_eq!(board.counters().open_errors, 1);
        assert_eq!(board.counters().blocked_ops, 2);
    }

    #[test]
    fn a_snapshot_answers_only_while_younger_than_the_ttl() {
        let mut board = Switchboard::default();
        let taken = Instant::now();
        assert!(!board.use_snapshot(taken, taken), "no cache without the fault");
        board.set(Fault::CachedListings { ttl: Duration::from_millis(100) });
        assert!(board.use_snapshot(taken, taken + Duration::from_millis(99)));
        assert!(!board.use_snapshot(taken, taken + Duration::from_millis(100)));
        assert_eq!(board.counters().cached_listings, 1);
    }
}
