//! The FUSE file system: every operation passes through to a backing directory, after
//! the [`Switchboard`] has had its say.
//!
//! Contract: with no fault set it behaves like the backing directory (names, data,
//! modes, sizes, times, renames and hard links within the mount; no symlinks, xattrs or
//! FUSE locks, so the kernel keeps POSIX locks locally), with attribute and entry lifetimes of zero so
//! changes made in the backing directory behind its back are seen at once. Inode numbers
//! are its own, one per backing (device, inode) pair, mapped to the last path it saw for
//! them. A blocked operation waits on a thread of its own, so the FUSE event loops keep
//! serving everything else.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, DirEntryExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use super::fault::{Op, Switchboard};

/// One entry of a directory listing, as handed to the kernel.
#[derive(Clone, Debug)]
struct Listed {
    ino: u64,
    kind: FileType,
    name: OsString,
}

/// A directory listing shared by the open handles and the snapshot cache.
type Listing = Arc<Vec<Listed>>;

/// The inode table: our inode numbers, and the backing path each stands for.
#[derive(Debug, Default)]
struct Inodes {
    /// Our inode for a backing (device, inode) pair.
    by_key: HashMap<(u64, u64), u64>,
    /// The backing path of each inode, relative to the backing root (`""` for the root).
    paths: HashMap<u64, PathBuf>,
    /// The next inode number to hand out.
    next: u64,
}

/// The state shared by the event loops and the threads of blocked operations.
#[derive(Debug)]
pub struct Inner {
    /// The backing directory, canonical.
    backing: PathBuf,
    /// Inode numbers and their paths.
    inodes: Mutex<Inodes>,
    /// Open files by handle.
    files: Mutex<HashMap<u64, Arc<File>>>,
    /// Open directories by handle: the listing read at opendir.
    dirs: Mutex<HashMap<u64, Listing>>,
    /// The last listing read of each directory inode and when, for [`super::Fault::CachedListings`].
    snapshots: Mutex<HashMap<u64, (Instant, Listing)>>,
    /// The next file or directory handle.
    next_fh: AtomicU64,
    /// The active faults and counters; shared with the control socket.
    pub board: Arc<Mutex<Switchboard>>,
}

/// The [`Filesystem`] fuser runs; a handle on [`Inner`].
#[derive(Debug)]
pub struct FaultFilesystem {
    inner: Arc<Inner>,
}

/// Locks a mutex, going on with the data if a panicking thread poisoned it (every
/// critical section here leaves the data consistent).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn errno(e: &io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::EIO, Errno::from_i32)
}

fn system_time(secs: i64, nsecs: i64) -> SystemTime {
    let nanos = u32::try_from(nsecs).unwrap_or(0);
    match u64::try_from(secs) {
        Ok(secs) => UNIX_EPOCH + Duration::new(secs, nanos),
        Err(_) => UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(u64::from(nanos)),
    }
}

fn kind_of(meta: &fs::FileType) -> FileType {
    FileType::from_std(*meta).unwrap_or(FileType::RegularFile)
}

fn attr(ino: u64, meta: &Metadata) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: meta.size(),
        blocks: meta.blocks(),
        atime: system_time(meta.atime(), meta.atime_nsec()),
        mtime: system_time(meta.mtime(), meta.mtime_nsec()),
        ctime: system_time(meta.ctime(), meta.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: kind_of(&meta.file_type()),
        perm: (meta.mode() & 0o7777) as u16,
        nlink: u32::try_from(meta.nlink()).unwrap_or(u32::MAX),
        uid: meta.uid(),
        gid: meta.gid(),
        rdev: u32::try_from(meta.rdev()).unwrap_or(0),
        blksize: u32::try_from(meta.blksize()).unwrap_or(4096),
        flags: 0,
    }
}

fn name_str(name: &OsStr) -> String {
    name.to_string_lossy().into_owned()
}

impl FaultFilesystem {
    /// A file system passing through to `backing`, with faults from `board`.
    pub fn new(backing: &Path, board: Arc<Mutex<Switchboard>>) -> io::Result<FaultFilesystem> {
        let backing = backing.canonicalize()?;
        let root = fs::symlink_metadata(&backing)?;
        let mut inodes = Inodes { next: 2, ..Inodes::default() };
        inodes.by_key.insert((root.dev(), root.ino()), INodeNo::ROOT.0);
        inodes.paths.insert(INodeNo::ROOT.0, PathBuf::new());
        let inner = Inner {
            backing,
            inodes: Mutex::new(inodes),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            snapshots: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            board,
        };
        Ok(FaultFilesystem { inner: Arc::new(inner) })
    }

    /// Runs `work` now, or on a thread of its own after `delay` if the board holds `op`
    /// on `name` back.
    fn maybe_blocked(&self, op: Op, name: &str, work: impl FnOnce(&Inner) + Send + 'static) {
        let delay = lock(&self.inner.board).block(op, name);
        match delay {
            None => work(&self.inner),
            Some(delay) => {
                let inner = Arc::clone(&self.inner);
                let spawned = std::thread::Builder::new().name(format!("blocked-{op:?}")).spawn(move || {
                    std::thread::sleep(delay);
                    work(&inner);
                });
                if let Err(e) = spawned {
                    eprintln!("qslice-faultfs: cannot start a thread for a blocked {op:?}: {e}");
                }
            }
        }
    }
}

impl Inner {
    /// The lifetime the kernel may cache names and attributes for: zero unless
    /// [`super::Fault::CachedListings`] is set.
    fn ttl(&self) -> Duration {
        lock(&self.board).cache_ttl().unwrap_or(Duration::ZERO)
    }

    fn rel_path(&self, ino: u64) -> Result<PathBuf, Errno> {
        lock(&self.inodes).paths.get(&ino).cloned().ok_or(Errno::ESTALE)
    }

    fn path(&self, ino: u64) -> Result<PathBuf, Errno> {
        Ok(self.backing.join(self.rel_path(ino)?))
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<(PathBuf, PathBuf), Errno> {
        let rel = self.rel_path(parent)?.join(name);
        Ok((self.backing.join(&rel), rel))
    }

    /// Our inode for the backing file `meta` found at `rel`, recording `rel` as its path.
    fn register(&self, rel: &Path, dev: u64, ino: u64) -> u64 {
        let mut inodes = lock(&self.inodes);
        let ours = match inodes.by_key.get(&(dev, ino)) {
            Some(&ours) => ours,
            None => {
                let ours = inodes.next;
                inodes.next += 1;
                inodes.by_key.insert((dev, ino), ours);
                ours
            }
        };
        if ours != INodeNo::ROOT.0 {
            inodes.paths.insert(ours, rel.to_owned());
        }
        ours
    }

    /// After a rename from `old` to `new`: every inode at or under `old` now lives under `new`.
    fn moved(&self, old: &Path, new: &Path) {
        let mut inodes = lock(&self.inodes);
        for path in inodes.paths.values_mut() {
            if let Ok(rest) = path.strip_prefix(old) {
                *path = if rest.as_os_str().is_empty() { new.to_owned() } else { new.join(rest) };
            }
        }
    }

    /// After a change made through the mount in directory `parent`: its snapshot is
    /// dropped, since a client sees its own changes (an NFS client updates its cache of a
    /// directory it changed; only changes from elsewhere stay hidden).
    fn changed(&self, parent: u64) {
        lock(&self.snapshots).remove(&parent);
    }

    fn entry(&self, rel: &Path, meta: &Metadata) -> FileAttr {
        let ino = self.register(rel, meta.dev(), meta.ino());
        attr(ino, meta)
    }

    fn file(&self, fh: FileHandle) -> Result<Arc<File>, Errno> {
        lock(&self.files).get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// Gives a file made for `req` to the caller, as a kernel file system would (we run as root).
    fn own(&self, path: &Path, req_uid: u32, req_gid: u32) {
        if req_uid != 0 || req_gid != 0 {
            let _ = std::os::unix::fs::lchown(path, Some(req_uid), Some(req_gid));
        }
    }

    fn read_listing(&self, ino: u64) -> io::Result<Vec<Listed>> {
        let path = self.path(ino).map_err(|e| io::Error::from_raw_os_error(e.code()))?;
        let rel = self.rel_path(ino).map_err(|e| io::Error::from_raw_os_error(e.code()))?;
        let dir_meta = fs::symlink_metadata(&path)?;
        let parent_ino = match rel.parent() {
            Some(parent) if ino != INodeNo::ROOT.0 => fs::symlink_metadata(self.backing.join(parent)).map(|m| self.register(parent, m.dev(), m.ino())),
            _ => Ok(INodeNo::ROOT.0),
        }
        .unwrap_or(INodeNo::ROOT.0);
        let mut listing = vec![Listed { ino, kind: FileType::Directory, name: ".".into() }, Listed { ino: parent_ino, kind: FileType::Directory, name: "..".into() }];
        for entry in fs::read_dir(&path)? {
            let entry = entry?;
            let kind = entry.file_type().map(|t| kind_of(&t)).unwrap_or(FileType::RegularFile);
            let child_rel = rel.join(entry.file_name());
            let child_ino = self.register(&child_rel, dir_meta.dev(), entry.ino());
            listing.push(Listed { ino: child_ino, kind, name: entry.file_name() });
        }
        Ok(listing)
    }

    fn opendir(&self, ino: u64, reply: ReplyOpen) {
        let now = Instant::now();
        let snapshot = lock(&self.snapshots).get(&ino).cloned();
        let cached = snapshot.filter(|(taken, _)| lock(&self.board).use_snapshot(*taken, now)).map(|(_, l)| l);
        let listing = match cached {
            Some(listing) => listing,
            None => match self.read_listing(ino) {
                Ok(listing) => {
                    let listing = Arc::new(listing);
                    lock(&self.snapshots).insert(ino, (now, Arc::clone(&listing)));
                    listing
                }
                Err(e) => return reply.error(errno(&e)),
            },
        };
        let fh = self.new_fh();
        lock(&self.dirs).insert(fh, listing);
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn open(&self, ino: u64, flags: OpenFlags, reply: ReplyOpen) {
        let path = match self.path(ino) {
            Ok(path) => path,
            Err(e) => return reply.error(e),
        };
        let name = path.file_name().map(name_str).unwrap_or_default();
        if let Some(code) = lock(&self.board).open_error(&name) {
            return reply.error(Errno::from_i32(code));
        }
        match open_backing(&path, flags.0, None) {
            Ok(file) => {
                let fh = self.new_fh();
                lock(&self.files).insert(fh, Arc::new(file));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn create(&self, parent: u64, name: &OsStr, mode: u32, umask: u32, flags: i32, owner: (u32, u32), reply: ReplyCreate) {
        let (path, rel) = match self.child(parent, name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        if let Some(code) = lock(&self.board).open_error(&name_str(name)) {
            return reply.error(Errno::from_i32(code));
        }
        let made = open_backing(&path, flags | libc::O_CREAT, Some(mode & !umask & 0o7777)).and_then(|file| {
            let meta = file.metadata()?;
            Ok((file, meta))
        });
        match made {
            Ok((file, meta)) => {
                self.changed(parent);
                self.own(&path, owner.0, owner.1);
                let meta = fs::symlink_metadata(&path).unwrap_or(meta);
                let attr = self.entry(&rel, &meta);
                let fh = self.new_fh();
                lock(&self.files).insert(fh, Arc::new(file));
                reply.created(&self.ttl(), &attr, Generation(0), FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rename(&self, parent: u64, name: &OsStr, newparent: u64, newname: &OsStr, flags: RenameFlags, reply: ReplyEmpty) {
        let ((from, from_rel), (to, to_rel)) = match (self.child(parent, name), self.child(newparent, newname)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        let done = if flags.is_empty() {
            fs::rename(&from, &to)
        } else {
            let nix_flags = nix::fcntl::RenameFlags::from_bits_truncate(flags.bits());
            nix::fcntl::renameat2(None, &from, None, &to, nix_flags).map_err(io::Error::from)
        };
        if let Err(e) = done {
            return reply.error(errno(&e));
        }
        self.moved(&from_rel, &to_rel);
        self.changed(parent);
        self.changed(newparent);
        if lock(&self.board).rename_then_enoent(&name_str(name)) {
            return reply.error(Errno::ENOENT);
        }
        reply.ok();
    }

    fn unlink(&self, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        match self.child(parent, name) {
            Ok((path, _)) => match fs::remove_file(path) {
                Ok(()) => {
                    self.changed(parent);
                    reply.ok();
                }
                Err(e) => reply.error(errno(&e)),
            },
            Err(e) => reply.error(e),
        }
    }
}

/// Opens a backing file with the caller's flags (`mode` when creating).
fn open_backing(path: &Path, flags: i32, mode: Option<u32>) -> io::Result<File> {
    let mut options = OpenOptions::new();
    match flags & libc::O_ACCMODE {
        libc::O_WRONLY => options.write(true),
        libc::O_RDWR => options.read(true).write(true),
        _ => options.read(true),
    };
    if flags & libc::O_CREAT != 0 {
        if flags & libc::O_EXCL != 0 {
            options.create_new(true);
        } else {
            options.create(true);
        }
        // std refuses create without write access; O_CREAT|O_RDONLY is legal in POSIX.
        if flags & libc::O_ACCMODE == libc::O_RDONLY {
            options.write(true);
        }
    }
    if let Some(mode) = mode {
        options.mode(mode);
    }
    let passed = flags & !(libc::O_ACCMODE | libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY);
    options.custom_flags(passed);
    options.open(path)
}

fn to_timespec(time: Option<TimeOrNow>) -> nix::sys::time::TimeSpec {
    use nix::sys::time::TimeSpec;
    match time {
        None => TimeSpec::UTIME_OMIT,
        Some(TimeOrNow::Now) => TimeSpec::UTIME_NOW,
        Some(TimeOrNow::SpecificTime(t)) => {
            let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            TimeSpec::from_duration(since)
        }
    }
}

impl Filesystem for FaultFilesystem {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let inner = &self.inner;
        let (path, rel) = match inner.child(parent.0, name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let ttl = inner.ttl();
        match fs::symlink_metadata(&path) {
            Ok(meta) => reply.entry(&ttl, &inner.entry(&rel, &meta), Generation(0)),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !ttl.is_zero() => {
                // An entry with inode 0 is a negative entry: the kernel caches "no such
                // name" for the ttl, as an NFS client caches a failed lookup.
                let mut negative = attr(0, &fs::symlink_metadata(&inner.backing).unwrap_or_else(|_| fs::symlink_metadata("/").expect("the root directory exists")));
                negative.ino = INodeNo(0);
                reply.entry(&ttl, &negative, Generation(0));
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let inner = &self.inner;
        let meta = match fh.map(|fh| inner.file(fh)) {
            Some(Ok(file)) => file.metadata(),
            _ => match inner.path(ino.0) {
                Ok(path) => fs::symlink_metadata(path),
                Err(e) => return reply.error(e),
            },
        };
        match meta {
            Ok(meta) => reply.attr(&inner.ttl(), &attr(ino.0, &meta)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let inner = &self.inner;
        let path = match inner.path(ino.0) {
            Ok(path) => path,
            Err(e) => return reply.error(e),
        };
        let result = (|| -> io::Result<Metadata> {
            if let Some(mode) = mode {
                fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777))?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::lchown(&path, uid, gid)?;
            }
            if let Some(size) = size {
                match fh.map(|fh| inner.file(fh)) {
                    Some(Ok(file)) => file.set_len(size)?,
                    _ => OpenOptions::new().write(true).open(&path)?.set_len(size)?,
                }
            }
            if atime.is_some() || mtime.is_some() {
                nix::sys::stat::utimensat(None, &path, &to_timespec(atime), &to_timespec(mtime), nix::sys::stat::UtimensatFlags::NoFollowSymlink)?;
            }
            fs::symlink_metadata(&path)
        })();
        match result {
            Ok(meta) => reply.attr(&inner.ttl(), &attr(ino.0, &meta)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let inner = &self.inner;
        let (path, rel) = match inner.child(parent.0, name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let made = fs::DirBuilder::new().mode(mode & !umask & 0o7777).create(&path).and_then(|()| {
            inner.changed(parent.0);
            inner.own(&path, req.uid(), req.gid());
            fs::symlink_metadata(&path)
        });
        match made {
            Ok(meta) => reply.entry(&inner.ttl(), &inner.entry(&rel, &meta), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        // Mailman's lock files (flufl.lock) are made with link(2). An inode keeps one
        // path, the newest name it was given.
        let inner = &self.inner;
        let (from, (to, to_rel)) = match (inner.path(ino.0), inner.child(newparent.0, newname)) {
            (Ok(from), Ok(to)) => (from, to),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        match fs::hard_link(&from, &to).and_then(|()| fs::symlink_metadata(&to)) {
            Ok(meta) => {
                inner.changed(newparent.0);
                reply.entry(&inner.ttl(), &inner.entry(&to_rel, &meta), Generation(0));
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.maybe_blocked(Op::Unlink, &name_str(&name), move |inner| inner.unlink(parent.0, &name, reply));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.inner.child(parent.0, name) {
            Ok((path, _)) => match fs::remove_dir(path) {
                Ok(()) => {
                    self.inner.changed(parent.0);
                    reply.ok();
                }
                Err(e) => reply.error(errno(&e)),
            },
            Err(e) => reply.error(e),
        }
    }

    fn rename(&self, _req: &Request, parent: INodeNo, name: &OsStr, newparent: INodeNo, newname: &OsStr, flags: RenameFlags, reply: ReplyEmpty) {
        let (name, newname) = (name.to_owned(), newname.to_owned());
        self.maybe_blocked(Op::Rename, &name_str(&name), move |inner| {
            inner.rename(parent.0, &name, newparent.0, &newname, flags, reply);
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let name = self.inner.path(ino.0).ok().and_then(|p| p.file_name().map(name_str)).unwrap_or_default();
        self.maybe_blocked(Op::Open, &name, move |inner| inner.open(ino.0, flags, reply));
    }

    fn read(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, size: u32, _flags: OpenFlags, _lock_owner: Option<LockOwner>, reply: ReplyData) {
        let file = match self.inner.file(fh) {
            Ok(file) => file,
            Err(e) => return reply.error(e),
        };
        let mut buf = vec![0u8; size as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return reply.error(errno(&e)),
            }
        }
        reply.data(&buf[..filled]);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let file = match self.inner.file(fh) {
            Ok(file) => file,
            Err(e) => return reply.error(e),
        };
        match file.write_all_at(data, offset) {
            Ok(()) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // Writes go straight to the backing file; there is nothing buffered to flush.
        reply.ok();
    }

    fn release(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, _lock_owner: Option<LockOwner>, _flush: bool, reply: ReplyEmpty) {
        lock(&self.inner.files).remove(&fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let synced = self.inner.file(fh).map(|file| if datasync { file.sync_data() } else { file.sync_all() });
        match synced {
            Ok(Ok(())) => reply.ok(),
            Ok(Err(e)) => reply.error(errno(&e)),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let name = self.inner.path(ino.0).ok().and_then(|p| p.file_name().map(name_str)).unwrap_or_default();
        self.maybe_blocked(Op::Readdir, &name, move |inner| inner.opendir(ino.0, reply));
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(listing) = lock(&self.inner.dirs).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, entry) in listing.iter().enumerate().skip(start) {
            // The offset of an entry is where the next readdir resumes.
            if reply.add(INodeNo(entry.ino), (i + 1) as u64, entry.kind, &entry.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        lock(&self.inner.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let synced = self.inner.path(ino.0).map(|path| File::open(path).and_then(|dir| dir.sync_all()));
        match synced {
            Ok(Ok(())) => reply.ok(),
            Ok(Err(e)) => reply.error(errno(&e)),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match nix::sys::statvfs::statvfs(&self.inner.backing) {
            Ok(st) => reply.statfs(
                st.blocks(),
                st.blocks_free(),
                st.blocks_available(),
                st.files(),
                st.files_free(),
                u32::try_from(st.block_size()).unwrap_or(4096),
                u32::try_from(st.name_max()).unwrap_or(255),
                u32::try_from(st.fragment_size()).unwrap_or(4096),
            ),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let path = match self.inner.path(ino.0) {
            Ok(path) => path,
            Err(e) => return reply.error(e),
        };
        let mode = nix::unistd::AccessFlags::from_bits_truncate(mask.bits());
        match nix::unistd::access(&path, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn create(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, flags: i32, reply: ReplyCreate) {
        let name = name.to_owned();
        let owner = (req.uid(), req.gid());
        self.maybe_blocked(Op::Open, &name_str(&name), move |inner| {
            inner.create(parent.0, &name, mode, umask, flags, owner, reply);
        });
    }
}
