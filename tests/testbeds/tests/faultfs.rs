//! The fault-injecting file system: it passes a Mailman-style spool through unchanged,
//! each fault does what it claims, and nothing stays mounted or running afterwards.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::{wait_for, Dirs};
use qslice_testbeds::faultfs::{is_mounted, Fault, FaultFs, Match, Op, OpenErrno};

/// A queue entry name as Mailman writes it.
const ENTRY: &str = "1490350277.837968+0123456789abcdef0123456789abcdef01234567";

fn listing(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> =
        fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))?.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned())).collect::<Result<_, _>>()?;
    names.sort();
    Ok(names)
}

/// Whether a process is gone (a zombie counts: it runs nothing and holds no mount).
fn process_gone(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn a_spool_written_through_the_mount_lands_in_the_backing_dir() -> Result<()> {
    let dirs = Dirs::new()?;
    let fs = FaultFs::mount(&dirs.backing(), &dirs.mnt())?;
    let queue = fs.path("qfiles/in");
    fs::create_dir_all(&queue)?;

    // Enqueue as Mailman does: write .pck.tmp, sync, rename to .pck.
    let tmp = queue.join(format!("{ENTRY}.pck.tmp"));
    let mut file = File::create(&tmp)?;
    file.write_all(b"pickled message")?;
    file.sync_all()?;
    drop(file);
    let pck = queue.join(format!("{ENTRY}.pck"));
    fs::rename(&tmp, &pck)?;
    let backing_queue = dirs.backing().join("qfiles/in");
    assert_eq!(fs::read(backing_queue.join(format!("{ENTRY}.pck")))?, b"pickled message");
    assert_eq!(listing(&queue)?, vec![format!("{ENTRY}.pck")]);

    // Dequeue: .pck to .bak, read it, finish by unlinking.
    let bak = queue.join(format!("{ENTRY}.bak"));
    fs::rename(&pck, &bak)?;
    let mut text = String::new();
    File::open(&bak)?.read_to_string(&mut text)?;
    assert_eq!(text, "pickled message");
    assert_eq!(listing(&backing_queue)?, vec![format!("{ENTRY}.bak")]);

    // Appends, truncation and modes pass through.
    OpenOptions::new().append(true).open(&bak)?.write_all(b"!")?;
    assert_eq!(fs::read(backing_queue.join(format!("{ENTRY}.bak")))?, b"pickled message!");
    OpenOptions::new().write(true).open(&bak)?.set_len(7)?;
    fs::set_permissions(&bak, fs::Permissions::from_mode(0o600))?;
    let meta = fs::metadata(backing_queue.join(format!("{ENTRY}.bak")))?;
    assert_eq!((meta.len(), meta.permissions().mode() & 0o777), (7, 0o600));
    assert_eq!(fs::metadata(&bak)?.len(), 7, "the mount reports the backing size");

    // A file put in the backing dir behind the mount's back is seen at once.
    fs::write(backing_queue.join("behind.pck"), b"x")?;
    assert!(listing(&queue)?.contains(&"behind.pck".to_owned()));
    assert_eq!(fs::read(queue.join("behind.pck"))?, b"x");

    // A lock made as flufl.lock makes it: a unique file hard-linked to the lock's name.
    let claim = queue.join("in.lck.host.1234");
    fs::write(&claim, b"host")?;
    fs::hard_link(&claim, queue.join("in.lck"))?;
    assert_eq!(std::os::unix::fs::MetadataExt::nlink(&fs::metadata(&claim)?), 2);
    fs::remove_file(&claim)?;
    assert_eq!(fs::read(queue.join("in.lck"))?, b"host");
    fs::remove_file(queue.join("in.lck"))?;

    fs::remove_file(&bak)?;
    fs::remove_file(queue.join("behind.pck"))?;
    fs::remove_dir(&queue)?;
    assert!(!backing_queue.exists());
    let stat = nix::sys::statvfs::statvfs(fs.mountpoint())?;
    assert!(stat.blocks() > 0, "statfs passes through");
    assert_eq!(fs.counters()?, Default::default(), "no fault was set, none fired");
    fs.unmount()?;
    assert!(!is_mounted(&dirs.mnt().canonicalize()?));
    Ok(())
}

#[test]
fn a_faulted_rename_is_done_on_disk_but_reports_enoent() -> Result<()> {
    let dirs = Dirs::new()?;
    let fs = FaultFs::mount(&dirs.backing(), &dirs.mnt())?;
    for name in ["a", "b"] {
        fs::write(fs.path(format!("{name}.pck.tmp")), name)?;
    }
    fs.set(Fault::RenameThenEnoent(Match::suffix(".pck").times(1)))?;

    // The source name ends in .pck.tmp, not .pck: untouched by the fault.
    fs::rename(fs.path("a.pck.tmp"), fs.path("a.pck"))?;
    let err = fs::rename(fs.path("a.pck"), fs.path("a.bak")).expect_err("the faulted rename reports an error");
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    assert!(dirs.backing().join("a.bak").exists(), "the rename was performed");
    assert!(!dirs.backing().join("a.pck").exists());
    assert!(fs.path("a.bak").exists() && !fs.path("a.pck").exists(), "the mount shows the renamed file");

    // Once only: the next .pck rename goes through and says so.
    fs::rename(fs.path("b.pck.tmp"), fs.path("b.pck"))?;
    fs::rename(fs.path("b.pck"), fs.path("b.bak"))?;
    assert_eq!(fs.counters()?.renames_then_enoent, 1);
    Ok(())
}

#[test]
fn a_cached_listing_hides_a_new_backing_file_until_the_ttl_passes() -> Result<()> {
    let dirs = Dirs::new()?;
    let fs = FaultFs::mount(&dirs.backing(), &dirs.mnt())?;
    let ttl = Duration::from_secs(2);
    fs.set(Fault::CachedListings { ttl })?;
    // A fresh directory per attempt, so its first listing takes a new snapshot; an
    // attempt whose second listing came after the ttl (a starved machine) proves nothing.
    for attempt in 0..3 {
        let dir = format!("queue{attempt}");
        fs::create_dir(fs.path(&dir))?;
        let snapshot_not_before = Instant::now();
        assert_eq!(listing(&fs.path(&dir))?, Vec::<String>::new());
        fs::write(dirs.backing().join(&dir).join("new.pck"), b"x")?;
        let second = listing(&fs.path(&dir))?;
        if snapshot_not_before.elapsed() >= ttl {
            continue;
        }
        assert_eq!(second, Vec::<String>::new(), "the listing comes from the snapshot");
        wait_for(Duration::from_secs(10), "the new file to appear in the listing", || listing(&fs.path(&dir)).is_ok_and(|names| names == ["new.pck"]))?;
        assert!(fs.counters()?.cached_listings >= 1);
        // A change made through the mount is seen at once, as an NFS client sees its own.
        fs::write(fs.path(&dir).join("mine.pck"), b"x")?;
        assert_eq!(listing(&fs.path(&dir))?, ["mine.pck", "new.pck"]);
        return Ok(());
    }
    anyhow::bail!("the machine was too slow: no attempt listed twice within {ttl:?}")
}

#[test]
fn a_cached_lookup_hides_a_new_backing_file_from_stat_until_the_ttl_passes() -> Result<()> {
    let dirs = Dirs::new()?;
    let fs = FaultFs::mount(&dirs.backing(), &dirs.mnt())?;
    let ttl = Duration::from_secs(2);
    fs.set(Fault::CachedListings { ttl })?;
    for attempt in 0..3 {
        let name = format!("late{attempt}.pck");
        let cached_not_before = Instant::now();
        let missing = fs::metadata(fs.path(&name)).expect_err("not there yet");
        assert_eq!(missing.kind(), ErrorKind::NotFound);
        fs::write(dirs.backing().join(&name), b"x")?;
        let second = fs::metadata(fs.path(&name));
        if cached_not_before.elapsed() >= ttl {
            continue;
        }
        assert!(second.is_err(), "the kernel keeps the cached 'no such file'");
        wait_for(Duration::from_secs(10), "stat to find the new file", || fs.path(&name).exists())?;
        return Ok(());
    }
    anyhow::bail!("the machine was too slow: no attempt looked up twice within {ttl:?}")
}

#[test]
fn injected_open_errors_are_seen_as_their_errno() -> Result<()> {
    let dirs = Dirs::new()?;
    let fs = FaultFs::mount(&dirs.backing(), &dirs.mnt())?;
    fs::write(fs.path("a.pck"), b"x")?;
    fs::write(fs.path("a.txt"), b"x")?;
    for errno in [OpenErrno::Emfile, OpenErrno::Eio, OpenErrno::Estale] {
        fs.set(Fault::OpenError { errno, matching: Match::suffix(".pck") })?;
        let err = File::open(fs.path("a.pck")).expect_err("the open fails");
        assert_eq!(err.raw_os_error(), Some(errno.raw()), "{errno:?}: {err}");
        let err = File::create(fs.path("new.pck")).expect_err("a create is an open too");
        assert_eq!(err.raw_os_error(), Some(errno.raw()), "{errno:?} on create: {err}");
        assert!(!dirs.backing().join("new.pck").exists(), "a failed create makes no file");
        File::open(fs.path("a.txt")).with_context(|| format!("{errno:?}: other names open"))?;
    }
    fs.clear()?;
    File::open(fs.path("a.pck")).context("cleared: opens again")?;
    // ESTALE is counted twice per open: the kernel retries a stale open once itself.
    assert!(fs.counters()?.open_errors >= 6);
    Ok(())
}

#[test]
fn an_open_error_for_the_next_n_opens_spends_itself() -> Result<()> {
    let dirs = Dirs::new()?;
    let fs = FaultFs::mount(&dirs.backing(), &dirs.mnt())?;
    fs::write(fs.path("a"), b"x")?;
    fs.set(Fault::OpenError { errno: OpenErrno::Eio, matching: Match::any().times(2) })?;
    for n in 0..2 {
        let err = File::open(fs.path("a")).expect_err("one of the next two opens");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "open {n}");
    }
    File::open(fs.path("a")).context("the third open")?;
    assert_eq!(fs.counters()?.open_errors, 2);
    Ok(())
}

/// Holds `op` back on `held/` for 3 s and proves other operations on the mount complete
/// while it waits, and that it is then performed.
fn a_blocked_op_waits_while_others_complete(op: Op) -> Result<()> {
    let dirs = Dirs::new()?;
    let fs = FaultFs::mount(&dirs.backing(), &dirs.mnt())?;
    fs::create_dir(fs.path("held"))?;
    fs::create_dir(fs.path("free"))?;
    fs::write(fs.path("held/a.pck"), b"x")?;
    let hold = Duration::from_secs(3);
    // Only the held operation matches: the others use other names.
    let matching = match op {
        Op::Readdir => Match::suffix("held"),
        _ => Match::suffix(".pck"),
    };
    fs.set(Fault::Block { op, duration: hold, matching: matching.times(1) })?;

    let held = fs.path("held");
    let (done_tx, done_rx) = mpsc::channel();
    let started = Instant::now();
    let blocked = std::thread::spawn(move || {
        let result = match op {
            Op::Open => File::open(held.join("a.pck")).map(drop),
            Op::Rename => fs::rename(held.join("a.pck"), held.join("a.bak")),
            Op::Unlink => fs::remove_file(held.join("a.pck")),
            Op::Readdir => fs::read_dir(&held).map(drop),
        };
        let _ = done_tx.send(started.elapsed());
        result
    });
    wait_for(Duration::from_secs(10), "the operation to be held", || fs.counters().is_ok_and(|c| c.blocked_ops == 1))?;

    // Meanwhile: create, write, read, rename, list and unlink elsewhere on the mount.
    let free = fs.path("free");
    fs::write(free.join("b.txt"), b"meanwhile")?;
    assert_eq!(fs::read(free.join("b.txt"))?, b"meanwhile");
    fs::rename(free.join("b.txt"), free.join("c.txt"))?;
    assert_eq!(listing(&free)?, ["c.txt"]);
    fs::remove_file(free.join("c.txt"))?;
    ensure!(done_rx.try_recv().is_err(), "the held {op:?} finished before the others: it was not held");

    let waited = done_rx.recv_timeout(hold + Duration::from_secs(20)).context("the held operation to finish")?;
    blocked.join().expect("no panic").with_context(|| format!("the held {op:?} is performed"))?;
    assert!(waited >= hold, "{op:?} waited {waited:?}, less than {hold:?}");
    let backing = dirs.backing().join("held");
    match op {
        Op::Rename => assert!(backing.join("a.bak").exists() && !backing.join("a.pck").exists()),
        Op::Unlink => assert!(!backing.join("a.pck").exists()),
        Op::Open | Op::Readdir => assert!(backing.join("a.pck").exists()),
    }
    Ok(())
}

#[test]
fn a_blocked_open_waits_while_others_complete() -> Result<()> {
    a_blocked_op_waits_while_others_complete(Op::Open)
}

#[test]
fn a_blocked_rename_waits_while_others_complete() -> Result<()> {
    a_blocked_op_waits_while_others_complete(Op::Rename)
}

#[test]
fn a_blocked_unlink_waits_while_others_complete() -> Result<()> {
    a_blocked_op_waits_while_others_complete(Op::Unlink)
}

#[test]
fn a_blocked_readdir_waits_while_others_complete() -> Result<()> {
    a_blocked_op_waits_while_others_complete(Op::Readdir)
}

#[test]
fn a_panicking_test_leaves_nothing_mounted_or_running() -> Result<()> {
    let dirs = Dirs::new()?;
    let (backing, mnt) = (dirs.backing(), dirs.mnt());
    let (tx, rx) = mpsc::channel();
    let panicked = std::thread::spawn(move || {
        let fs = FaultFs::mount(&backing, &mnt).expect("mount");
        // This thread's owner keeps a file open on the mount: the unmount has to be lazy.
        let open = File::create(fs.path("open.pck")).expect("create");
        let _ = tx.send((fs.pid(), open));
        panic!("a test fails while the mount is up");
    })
    .join();
    assert!(panicked.is_err());
    let (pid, open) = rx.recv()?;
    let pid = pid.context("the binary ran")?;
    assert!(!is_mounted(&dirs.mnt().canonicalize()?), "unmounted");
    assert!(process_gone(pid), "qslice-faultfs {pid} stopped");
    assert!(dirs.backing().join("open.pck").exists());
    drop(open);
    Ok(())
}

/// Set for the helper process of [`a_killed_owner_leaves_nothing_mounted_or_running`].
const HELPER_DIR: &str = "QSLICE_TESTBEDS_HELPER_DIR";

/// Not a test on its own: run by the test below as a separate process, which mounts and
/// then waits to be killed. Without the variable it does nothing.
#[test]
fn helper_holds_a_mount_until_killed() -> Result<()> {
    let Some(dir) = std::env::var_os(HELPER_DIR).map(PathBuf::from) else {
        return Ok(());
    };
    let fs = FaultFs::mount(&dir.join("backing"), &dir.join("mnt"))?;
    let pid = fs.pid().context("running")?;
    fs::write(dir.join("ready.tmp"), format!("{pid}\n{}", fs.control_dir().display()))?;
    fs::rename(dir.join("ready.tmp"), dir.join("ready"))?;
    // Bounded, so a helper that is never killed still ends.
    std::thread::sleep(Duration::from_secs(60));
    Ok(())
}

#[test]
fn a_killed_owner_leaves_nothing_mounted_or_running() -> Result<()> {
    let dirs = Dirs::new()?;
    let mut helper = Command::new(std::env::current_exe()?)
        .args(["helper_holds_a_mount_until_killed", "--exact", "--nocapture", "--test-threads=1"])
        .env(HELPER_DIR, dirs.root.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let ready = dirs.root.path().join("ready");
    let waited = wait_for(Duration::from_secs(30), "the helper to mount", || ready.exists());
    if let Err(e) = waited {
        let _ = helper.kill();
        let _ = helper.wait();
        return Err(e);
    }
    let ready = fs::read_to_string(&ready)?;
    let (pid, control_dir) = ready.split_once('\n').context("pid and control dir")?;
    let pid: u32 = pid.parse()?;
    let mnt = dirs.mnt().canonicalize()?;
    assert!(is_mounted(&mnt));
    helper.kill()?;
    helper.wait()?;
    // The binary sees its lifeline close, unmounts and exits.
    wait_for(Duration::from_secs(15), "the mount to go away", || !is_mounted(&mnt))?;
    wait_for(Duration::from_secs(15), "qslice-faultfs to exit", || process_gone(pid))?;
    assert!(!Path::new(control_dir).exists(), "the binary removed its dead owner's control dir");
    Ok(())
}
