//! Tests of the spool library: one per behaviour and one per error path.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use proptest::prelude::*;
use qslice_proto::slice::{slice_of, Digest};

use super::*;

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    q: QueueDir,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("qfiles");
    fs::create_dir_all(root.join("in")).expect("queue dir");
    let q = QueueDir::new(&root, "in");
    Fixture { _tmp: tmp, root, q }
}

fn digest(hex_prefix: &str) -> Digest {
    let mut text = hex_prefix.to_owned();
    while text.len() < 40 {
        text.push('0');
    }
    Digest::parse_hex(&text).expect("test digest")
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match fs::read_dir(dir) {
        Ok(list) => list.map(|e| e.expect("dirent").file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

fn take(q: &QueueDir, n: u32, slice: u32) -> InFlight {
    let scan = q.scan(n).expect("scan");
    let entry = &scan.pending[&slice][0];
    match q.dequeue(entry).expect("dequeue") {
        Dequeued::Taken(t) => t,
        other => panic!("expected Taken, got {other:?}"),
    }
}

#[test]
fn one_listing_groups_entries_by_slice_in_fifo_order() {
    let f = fixture();
    // Slice of 4 = top two bits: 0x0.. -> 0, 0x4.. -> 1, 0xc.. -> 3.
    f.q.enqueue_as(30.0, &digest("01"), b"a").expect("enqueue");
    f.q.enqueue_as(10.0, &digest("02"), b"b").expect("enqueue");
    f.q.enqueue_as(20.0, &digest("4"), b"c").expect("enqueue");
    f.q.enqueue_as(10.0, &digest("01"), b"d").expect("enqueue");
    f.q.enqueue_as(5.0, &digest("c"), b"e").expect("enqueue");
    let scan = f.q.scan(4).expect("scan");
    let order = |s: u32| scan.pending[&s].iter().map(|e| (e.name.time, e.name.digest)).collect::<Vec<_>>();
    // Equal times are ordered by name, so the order never depends on the listing's.
    assert_eq!(order(0), vec![(10.0, digest("01")), (10.0, digest("02")), (30.0, digest("01"))]);
    assert_eq!(order(1), vec![(20.0, digest("4"))]);
    assert_eq!(order(3), vec![(5.0, digest("c"))]);
    assert!(!scan.pending.contains_key(&2));
    assert!(scan.problems.is_empty(), "{:?}", scan.problems);
    assert!(scan.pending.values().flatten().all(|e| e.slice == slice_of(&e.name.digest, 4)));
    // The same files under one slice: everything in slice 0, still FIFO.
    let whole = f.q.scan(1).expect("scan");
    assert_eq!(whole.pending[&0].len(), 5);
    assert_eq!(whole.pending[&0][0].name.time, 5.0);
    assert!(whole.oldest_age(0).expect("has entries") > 1_000_000.0);
    assert_eq!(whole.oldest_age(1), None);
}

#[test]
fn listing_a_missing_queue_directory_names_it() {
    let f = fixture();
    let q = QueueDir::new(&f.root, "nosuch");
    let err = q.scan(4).expect_err("missing dir");
    assert!(matches!(err, SpoolError::ListQueue { .. }));
    assert!(err.to_string().contains("nosuch"), "{err}");
}

#[test]
fn tmp_and_hidden_files_are_never_touched() {
    let f = fixture();
    let dir = f.q.dir();
    let tmp_name = "1490350277.837968+0696655d510e3bad34fee55513eec06ed9b3413c.pck.tmp";
    fs::write(dir.join(tmp_name), b"being written").expect("write");
    fs::write(dir.join("junk.tmp"), b"x").expect("write");
    fs::write(dir.join(".nfs000000001234"), b"open and unlinked").expect("write");
    let scan = f.q.scan(4).expect("scan");
    assert!(scan.pending.is_empty() && scan.in_flight.is_empty());
    assert!(scan.problems.is_empty(), "{:?}", scan.problems);
    let rec = f.q.recover(4, |_| true).expect("recover");
    assert!(rec.quarantined.is_empty() && rec.requeued.is_empty());
    assert_eq!(names_in(dir), vec![".nfs000000001234", tmp_name, "junk.tmp"]);
}

#[test]
fn files_that_are_not_entries_are_reported_then_quarantined_intact() {
    let f = fixture();
    let dir = f.q.dir();
    fs::write(dir.join("no-plus-here.pck"), b"m1").expect("write");
    fs::write(dir.join("1490350277.8+XYZ.pck"), b"m2").expect("write");
    fs::write(dir.join("1490350277.8+0696655d510e3bad34fee55513eec06ed9b3413c.psv"), b"m3").expect("write");
    fs::create_dir(dir.join("subdir")).expect("mkdir");
    fs::write(dir.join("subdir").join("inner"), b"kept").expect("write");
    std::os::unix::fs::symlink("/etc/passwd", dir.join("link.pck")).expect("symlink");
    let _sock = std::os::unix::net::UnixListener::bind(dir.join("sock")).expect("socket");
    let scan = f.q.scan(4).expect("scan");
    let mut found: Vec<(String, String)> = scan.problems.iter().map(|p| (p.path.file_name().expect("name").to_string_lossy().into_owned(), format!("{:?}", p.reason))).collect();
    found.sort();
    let kinds: Vec<&str> = found.iter().map(|(_, r)| r.split('(').next().expect("kind")).collect();
    assert_eq!(kinds, vec!["UnexpectedExtension", "BadName", "Symlink", "BadName", "NotRegular", "Directory"], "{found:?}");
    for problem in scan.problems {
        let from = problem.path.clone();
        let q = f.q.quarantine(problem).expect("quarantine");
        assert_eq!(q.from, from);
        assert!(q.to.starts_with(f.q.quarantine_dir()));
        assert!(fs::symlink_metadata(&q.to).is_ok(), "{} must exist", q.to.display());
        assert!(fs::symlink_metadata(&from).is_err(), "{} must be gone", from.display());
    }
    assert!(names_in(dir).is_empty(), "{:?}", names_in(dir));
    let qdir = f.q.quarantine_dir();
    assert_eq!(fs::read(qdir.join("no-plus-here.pck")).expect("kept"), b"m1");
    assert_eq!(fs::read(qdir.join("subdir").join("inner")).expect("kept"), b"kept");
    assert_eq!(fs::read_link(qdir.join("link.pck")).expect("link kept"), Path::new("/etc/passwd"));
}

#[test]
fn quarantine_never_overwrites_an_earlier_file_of_the_same_name() {
    let f = fixture();
    for content in [b"first".as_slice(), b"second", b"third"] {
        fs::write(f.q.dir().join("bad-name"), content).expect("write");
        let scan = f.q.scan(1).expect("scan");
        for p in scan.problems {
            f.q.quarantine(p).expect("quarantine");
        }
    }
    let qdir = f.q.quarantine_dir();
    assert_eq!(names_in(qdir), vec!["bad-name", "bad-name.1", "bad-name.2"]);
    assert_eq!(fs::read(qdir.join("bad-name")).expect("kept"), b"first");
    assert_eq!(fs::read(qdir.join("bad-name.2")).expect("kept"), b"third");
}

#[test]
fn quarantine_failure_is_an_error_that_names_the_file() {
    let f = fixture();
    fs::create_dir_all(f.root.join(".qslice")).expect("mkdir");
    // A file where the quarantine directory should be: it cannot be created.
    fs::write(f.root.join(".qslice").join("quarantine"), b"").expect("write");
    fs::write(f.q.dir().join("garbage"), b"x").expect("write");
    let problem = f.q.scan(1).expect("scan").problems.pop().expect("one problem");
    let err = f.q.quarantine(problem).expect_err("cannot quarantine");
    assert!(matches!(err, SpoolError::Quarantine { .. }));
    assert!(err.to_string().contains("garbage"), "{err}");
    assert!(f.q.dir().join("garbage").exists(), "the file stays where it was");
}

#[test]
fn dequeue_takes_an_entry_once_and_reports_a_lost_race_as_gone() {
    let f = fixture();
    f.q.enqueue_as(1.0, &digest("8"), b"message").expect("enqueue");
    let scan = f.q.scan(2).expect("scan");
    let entry = &scan.pending[&1][0];
    let taken = match f.q.dequeue(entry).expect("dequeue") {
        Dequeued::Taken(t) => t,
        other => panic!("expected Taken, got {other:?}"),
    };
    assert_eq!(taken.size, 7);
    assert!(taken.path.ends_with(format!("{}.bak", entry.name.filebase)));
    assert!(!f.q.pck_path(entry).exists());
    // A second taker of the same listing finds it gone: not an error.
    assert!(matches!(f.q.dequeue(entry).expect("dequeue"), Dequeued::Gone));
    let after = f.q.scan(2).expect("scan");
    assert!(after.pending.is_empty());
    assert_eq!(after.in_flight[&1][0].name.filebase, entry.name.filebase);
}

#[test]
fn dequeue_quarantines_a_zero_byte_entry() {
    let f = fixture();
    let name = f.q.enqueue_as(1.0, &digest("1"), b"").expect("enqueue");
    let scan = f.q.scan(1).expect("scan");
    match f.q.dequeue(&scan.pending[&0][0]).expect("dequeue") {
        Dequeued::Quarantined(q) => {
            assert!(matches!(q.reason, ProblemReason::Empty));
            assert!(q.to.exists());
        }
        other => panic!("expected Quarantined, got {other:?}"),
    }
    assert!(names_in(f.q.dir()).is_empty());
    assert_eq!(names_in(f.q.quarantine_dir()), vec![format!("{}.bak", name.filebase)]);
}

/// Runs `f` on a thread whose credentials are those of `nobody`, so that file permissions
/// apply even when the tests run as root. Linux keeps credentials per thread, and the raw
/// setresuid system call (unlike libc's wrapper) changes only the calling thread.
#[allow(unsafe_code)]
fn as_unprivileged<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: a plain system call with integer arguments; it affects this thread only.
        let rc = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
        assert_eq!(rc, 0, "setresuid: {}", io::Error::last_os_error());
        f()
    })
    .join()
    .expect("unprivileged thread")
}

#[test]
fn an_entry_that_cannot_be_opened_is_put_back_and_retried_not_quarantined() {
    let f = fixture();
    let name = f.q.enqueue_as(1.0, &digest("1"), b"secret").expect("enqueue");
    for dir in [f._tmp.path(), f.root.as_path(), f.q.dir()] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    let pck = f.q.dir().join(format!("{}.pck", name.filebase));
    fs::set_permissions(&pck, fs::Permissions::from_mode(0o000)).expect("chmod");
    let q = f.q.clone();
    let outcome = as_unprivileged(move || {
        let scan = q.scan(1).expect("scan");
        q.dequeue(&scan.pending[&0][0])
    });
    // EACCES is a fault of the moment (a wrong mode or owner that a person fixes).
    let err = outcome.expect_err("cannot be opened");
    assert!(matches!(&err, SpoolError::OpenEntry { source, .. } if source.kind() == io::ErrorKind::PermissionDenied), "{err}");
    assert!(err.to_string().contains(&name.filebase) && err.to_string().contains("retried"), "{err}");
    assert_eq!(names_in(f.q.dir()), vec![format!("{}.pck", name.filebase)], "put back as it was");
    assert!(names_in(f.q.quarantine_dir()).is_empty(), "nothing quarantined");
    fs::set_permissions(&pck, fs::Permissions::from_mode(0o644)).expect("chmod");
    let taken = take(&f.q, 1, 0);
    assert_eq!(fs::read(&taken.path).expect("read"), b"secret", "taken once the fault is gone");
}

#[test]
fn a_leftover_bak_is_not_overwritten_when_its_pck_twin_is_taken() {
    // With renameat2(RENAME_NOREPLACE), and with the look-then-rename of filesystems
    // without it.
    for noreplace in [true, false] {
        let f = fixture();
        let q = if noreplace { f.q.clone() } else { f.q.clone().without_noreplace() };
        let name = q.enqueue_as(5.0, &digest("1"), b"first").expect("enqueue");
        take(&q, 1, 0);
        // The same name again, beside the .bak (a late NFS rename retransmit, a crash).
        q.enqueue_as(5.0, &digest("1"), b"second").expect("enqueue");
        let entry = q.scan(1).expect("scan").pending[&0][0].clone();
        let err = q.dequeue(&entry).expect_err("a take would overwrite the .bak");
        assert!(matches!(&err, SpoolError::Dequeue { source, .. } if source.kind() == io::ErrorKind::AlreadyExists), "{err}");
        assert_eq!(fs::read(q.bak_path(&entry)).expect("read"), b"first", "the .bak is intact");
        // The owner's recovery resolves the pair; then both are taken in turn.
        q.recover(1, |_| true).expect("recover");
        let taken = take(&q, 1, 0);
        assert_eq!(fs::read(&taken.path).expect("read"), b"second");
        let scan = q.scan(1).expect("scan");
        let back = &scan.pending[&0];
        assert_eq!(back.len(), 1, "the older .bak went back to the queue");
        assert_ne!(back[0].name.filebase, name.filebase, "under a fresh name");
        assert_eq!(back[0].name.digest, name.digest, "of the same slice");
        assert!(back[0].name.time > 5.0 && back[0].name.time < 5.001);
        assert_eq!(fs::read(q.pck_path(&back[0])).expect("read"), b"first", "nothing lost");
        // A take of an entry already gone is no error, either way.
        let gone = q.scan(1).expect("scan").pending[&0][0].clone();
        take(&q, 1, 0);
        assert!(matches!(q.dequeue(&gone), Ok(Dequeued::Gone)));
    }
}

#[test]
fn recovery_never_renames_a_bak_over_its_pck_twin() {
    let f = fixture();
    let name = f.q.enqueue_as(5.0, &digest("1"), b"in flight").expect("enqueue");
    take(&f.q, 1, 0);
    f.q.enqueue_as(5.0, &digest("1"), b"waiting").expect("enqueue");
    let rec = f.q.recover(1, |_| true).expect("recover");
    assert_eq!(rec.renamed.len(), 1, "{rec:?}");
    let contents: Vec<Vec<u8>> = f.q.scan(1).expect("scan").pending[&0].iter().map(|e| fs::read(f.q.pck_path(e)).expect("read")).collect();
    assert_eq!(contents, vec![b"waiting".to_vec(), b"in flight".to_vec()], "both kept, the twin just after");
    assert_eq!(f.q.recovery_count(&rec.renamed[0].1.filebase).expect("count"), 1, "the count moved with it");
    assert_eq!(f.q.recovery_count(&name.filebase).expect("count"), 0);
}

#[test]
fn a_stop_by_qslice_does_not_count_toward_bad() {
    let f = fixture();
    let name = f.q.enqueue_as(1.0, &digest("1"), b"good mail").expect("enqueue");
    // Three fences in a row: each time the handler is stopped and the entry left .bak.
    for _ in 0..3 {
        let taken = take(&f.q, 1, 0);
        f.q.mark_stopped(&taken.entry).expect("mark");
        let rec = f.q.recover(1, |_| true).expect("recover");
        assert_eq!((rec.requeued.len(), rec.uncounted, rec.preserved.len()), (1, 1, 0), "{rec:?}");
    }
    assert_eq!(f.q.recovery_count(&name.filebase).expect("count"), 0);
    assert!(!f.q.is_marked_stopped(&name.filebase), "each mark is used once");
    // Crashes still count.
    for round in 1..=2 {
        take(&f.q, 1, 0);
        assert_eq!(f.q.recover(1, |_| true).expect("recover").requeued[0].1, round);
    }
    take(&f.q, 1, 0);
    assert_eq!(f.q.recover(1, |_| true).expect("recover").preserved.len(), 1);
}

#[test]
fn dequeue_failure_other_than_a_lost_race_is_an_error() {
    let f = fixture();
    let name = f.q.enqueue_as(1.0, &digest("1"), b"m").expect("enqueue");
    // A non-empty directory where the .bak would go: rename fails with EISDIR.
    let blocker = f.q.dir().join(format!("{}.bak", name.filebase));
    fs::create_dir(&blocker).expect("mkdir");
    fs::write(blocker.join("x"), b"").expect("write");
    let entry = f.q.scan(1).expect("scan").pending[&0][0].clone();
    let err = f.q.dequeue(&entry).expect_err("cannot rename onto a directory");
    assert!(matches!(err, SpoolError::Dequeue { .. }));
    assert!(err.to_string().contains(&name.filebase), "{err}");
    assert!(f.q.pck_path(&entry).exists(), "the entry stays queued");
}

#[test]
fn finish_unlinks_the_bak_and_a_second_finish_fails() {
    let f = fixture();
    f.q.enqueue_as(1.0, &digest("1"), b"m").expect("enqueue");
    let taken = take(&f.q, 1, 0);
    f.q.finish(&taken).expect("finish");
    assert!(names_in(f.q.dir()).is_empty());
    let err = f.q.finish(&taken).expect_err("already finished");
    assert!(matches!(err, SpoolError::Finish { .. }), "{err}");
}

#[test]
fn preserve_moves_the_entry_to_bad_as_psv() {
    let f = fixture();
    let name = f.q.enqueue_as(1.0, &digest("1"), b"keep me").expect("enqueue");
    let taken = take(&f.q, 1, 0);
    assert!(!f.root.join("bad").exists());
    let psv = f.q.preserve(&taken).expect("preserve");
    assert_eq!(psv, f.root.join("bad").join(format!("{}.psv", name.filebase)));
    assert_eq!(fs::read(&psv).expect("preserved"), b"keep me");
    assert!(names_in(f.q.dir()).is_empty());
}

#[test]
fn preserve_failure_keeps_the_entry_and_names_bad_dir() {
    let f = fixture();
    f.q.enqueue_as(1.0, &digest("1"), b"m").expect("enqueue");
    let taken = take(&f.q, 1, 0);
    fs::write(f.root.join("bad"), b"not a directory").expect("write");
    let err = f.q.preserve(&taken).expect_err("bad/ is a file");
    assert!(matches!(err, SpoolError::Preserve { .. }));
    assert!(err.to_string().contains("bad"), "{err}");
    assert!(taken.path.exists(), "the entry is not lost");
}

#[test]
fn requeue_puts_the_entry_back_and_fails_when_it_is_gone() {
    let f = fixture();
    f.q.enqueue_as(1.0, &digest("1"), b"m").expect("enqueue");
    let taken = take(&f.q, 1, 0);
    f.q.requeue(&taken).expect("requeue");
    assert_eq!(f.q.scan(1).expect("scan").pending[&0].len(), 1);
    let err = f.q.requeue(&taken).expect_err("no .bak any more");
    assert!(matches!(err, SpoolError::Requeue { .. }), "{err}");
}

#[test]
fn a_recovery_hands_over_its_slices_pending_entries_as_a_listing_after_it_shows_them() {
    let f = fixture();
    // Of 2 slices: 0x0.. and 0x1.. are slice 0, 0xf.. slice 1.
    f.q.enqueue_as(1.0, &digest("01"), b"left in flight").expect("enqueue");
    take(&f.q, 2, 0);
    f.q.enqueue_as(4.0, &digest("1"), b"twin in flight").expect("enqueue");
    take(&f.q, 2, 0);
    f.q.enqueue_as(4.0, &digest("1"), b"twin waiting").expect("enqueue");
    f.q.enqueue_as(3.0, &digest("02"), b"waiting").expect("enqueue");
    f.q.enqueue_as(2.0, &digest("f"), b"another slice").expect("enqueue");
    let rec = f.q.recover(2, |s| s == 0).expect("recover");
    assert_eq!((rec.requeued.len(), rec.renamed.len()), (1, 1), "{rec:?}");
    let names = |entries: &[Entry]| entries.iter().map(|e| e.name.filebase.clone()).collect::<Vec<_>>();
    let after = f.q.scan(2).expect("scan");
    assert_eq!(rec.pending.keys().copied().collect::<Vec<_>>(), vec![0], "only the recovered slice");
    assert_eq!(names(&rec.pending[&0]), names(&after.pending[&0]), "requeued, renamed and waiting, oldest first");
    assert_eq!(rec.pending[&0].len(), 4);
}

#[test]
fn recovery_requeues_owned_slices_and_preserves_at_the_third_time() {
    let f = fixture();
    let mine = f.q.enqueue_as(1.0, &digest("1"), b"mine").expect("enqueue");
    let theirs = f.q.enqueue_as(2.0, &digest("f"), b"theirs").expect("enqueue");
    // Both in flight, as a crashed runner leaves them.
    take(&f.q, 2, 0);
    take(&f.q, 2, 1);
    for round in 1..=2 {
        let rec = f.q.recover(2, |s| s == 0).expect("recover");
        assert_eq!(rec.requeued.len(), 1, "round {round}");
        assert_eq!(rec.requeued[0].0.name.filebase, mine.filebase);
        assert_eq!(rec.requeued[0].1, round);
        assert_eq!(f.q.recovery_count(&mine.filebase).expect("count"), round);
        // The other slice's .bak belongs to its own owner: untouched.
        assert!(f.q.dir().join(format!("{}.bak", theirs.filebase)).exists());
        take(&f.q, 2, 0);
    }
    let rec = f.q.recover(2, |s| s == 0).expect("recover");
    assert!(rec.requeued.is_empty());
    assert_eq!(rec.preserved.len(), 1);
    assert_eq!(fs::read(f.root.join("bad").join(format!("{}.psv", mine.filebase))).expect("in bad"), b"mine");
    assert_eq!(f.q.recovery_count(&mine.filebase).expect("count"), 0, "count forgotten once preserved");
}

#[test]
fn recovery_counts_of_finished_entries_are_swept() {
    let f = fixture();
    let name = f.q.enqueue_as(1.0, &digest("1"), b"m").expect("enqueue");
    take(&f.q, 1, 0);
    f.q.recover(1, |_| true).expect("recover");
    assert_eq!(f.q.recovery_count(&name.filebase).expect("count"), 1);
    let taken = take(&f.q, 1, 0);
    f.q.finish(&taken).expect("finish");
    f.q.recover(1, |_| true).expect("recover");
    assert_eq!(f.q.recovery_count(&name.filebase).expect("count"), 0);
}

#[test]
fn recovery_quarantines_malformed_bak_files_and_survives_a_garbled_count() {
    let f = fixture();
    fs::write(f.q.dir().join("oops.bak"), b"m").expect("write");
    let name = f.q.enqueue_as(1.0, &digest("1"), b"m").expect("enqueue");
    take(&f.q, 1, 0);
    fs::create_dir_all(f.root.join(".qslice/recovery/in")).expect("mkdir");
    fs::write(f.root.join(".qslice/recovery/in").join(&name.filebase), b"garbage").expect("write");
    let rec = f.q.recover(1, |_| true).expect("recover");
    assert_eq!(rec.quarantined.len(), 1);
    assert!(f.q.quarantine_dir().join("oops.bak").exists());
    // A garbled count counts as one earlier recovery: this one is the second.
    assert_eq!(rec.requeued[0].1, 2);
}

#[test]
fn recovery_count_failure_is_an_error_and_leaves_the_bak() {
    let f = fixture();
    let name = f.q.enqueue_as(1.0, &digest("1"), b"m").expect("enqueue");
    take(&f.q, 1, 0);
    fs::create_dir_all(f.root.join(".qslice")).expect("mkdir");
    fs::write(f.root.join(".qslice/recovery"), b"a file, not a directory").expect("write");
    let err = f.q.recover(1, |_| true).expect_err("cannot count");
    assert!(matches!(err, SpoolError::RecoveryCount { .. }), "{err}");
    assert!(f.q.dir().join(format!("{}.bak", name.filebase)).exists());
}

#[test]
fn enqueue_writes_a_whole_mailman_named_entry_and_no_tmp() {
    let f = fixture();
    let name = f.q.enqueue(b"From: a@example.org\n\nhi\n").expect("enqueue");
    assert_eq!(name.ext, "pck");
    assert_eq!(names_in(f.q.dir()), vec![format!("{}.pck", name.filebase)]);
    assert_eq!(fs::read(f.q.dir().join(format!("{}.pck", name.filebase))).expect("read"), b"From: a@example.org\n\nhi\n");
    let other = f.q.enqueue(b"From: a@example.org\n\nhi\n").expect("enqueue");
    assert_ne!(other.digest, name.digest, "same payload, distinct names");
}

#[test]
fn enqueue_into_a_missing_directory_fails_with_its_name() {
    let f = fixture();
    let err = QueueDir::new(&f.root, "absent").enqueue(b"m").expect_err("no dir");
    assert!(matches!(err, SpoolError::Enqueue { .. }));
    assert!(err.to_string().contains("absent"), "{err}");
}

proptest! {
    #[test]
    fn digests_drawn_for_a_slice_fall_in_it(n in 1u32..=65536, pick in any::<u32>()) {
        let s = pick % n;
        let d = random_digest_in(s, n);
        prop_assert_eq!(slice_of(&d, n), s);
    }
}

#[test]
fn recovery_stops_before_the_next_entry_once_told_to() {
    let f = fixture();
    let a = f.q.enqueue_in_slice(b"a", 0, 1).expect("enqueue");
    let b = f.q.enqueue_in_slice(b"b", 0, 1).expect("enqueue");
    for name in [&a, &b] {
        std::fs::rename(f.q.dir().join(format!("{}.pck", name.filebase)), f.q.dir().join(format!("{}.bak", name.filebase))).expect("to .bak");
    }
    let asked = std::cell::Cell::new(0);
    let rec =
        f.q.recover_while(
            1,
            |_| true,
            || {
                asked.set(asked.get() + 1);
                asked.get() == 1
            },
        )
        .expect("recover");
    assert_eq!(rec.requeued.len(), 1, "one entry recovered before the fence tripped");
    let baks = std::fs::read_dir(f.q.dir()).expect("ls").filter(|e| e.as_ref().expect("entry").file_name().to_string_lossy().ends_with(".bak")).count();
    assert_eq!(baks, 1, "the other stays .bak for the next owner");
}

#[test]
fn recovering_given_entries_leaves_the_others_in_flight() {
    let f = fixture();
    let stranded = f.q.enqueue_as(1.0, &digest("1"), b"stranded").expect("enqueue");
    let busy = f.q.enqueue_as(2.0, &digest("2"), b"busy").expect("enqueue");
    let first = take(&f.q, 1, 0);
    let second = take(&f.q, 1, 0);
    assert_eq!((first.entry.name.filebase.as_str(), second.entry.name.filebase.as_str()), (stranded.filebase.as_str(), busy.filebase.as_str()));
    // A stranded .bak is recovered like a dead owner's, counted; the busy one stays.
    let rec = f.q.recover_entries(std::slice::from_ref(&first.entry), || true).expect("recover");
    assert_eq!(rec.requeued, vec![(first.entry.clone(), 1)]);
    assert_eq!(names_in(f.q.dir()), vec![format!("{}.pck", stranded.filebase), format!("{}.bak", busy.filebase)]);
    // One gone meanwhile is skipped; a stop mark makes it uncounted; go_on is asked.
    let rec = f.q.recover_entries(std::slice::from_ref(&first.entry), || true).expect("recover again");
    assert!(rec.requeued.is_empty() && rec.renamed.is_empty(), "{rec:?}");
    f.q.mark_stopped(&second.entry).expect("mark");
    assert!(f.q.recover_entries(std::slice::from_ref(&second.entry), || false).expect("told to stop").requeued.is_empty());
    let rec = f.q.recover_entries(std::slice::from_ref(&second.entry), || true).expect("recover marked");
    assert_eq!((rec.requeued.len(), rec.uncounted), (1, 1));
    assert_eq!(f.q.recovery_count(&busy.filebase).expect("count"), 0);
}

#[test]
fn a_take_for_a_handler_that_never_reads_the_entry_still_quarantines_what_is_no_entry() {
    let f = fixture();
    let good = f.q.enqueue_as(5.0, &digest("1"), b"payload").expect("enqueue");
    let empty = f.q.enqueue_as(6.0, &digest("1"), b"").expect("enqueue");
    let scan = f.q.scan(1).expect("scan");
    let (first, second) = (scan.pending[&0][0].clone(), scan.pending[&0][1].clone());
    assert_eq!(first.name.filebase, good.filebase);
    match f.q.dequeue_unread(&first).expect("take") {
        Dequeued::Taken(t) => {
            assert_eq!(t.size, 7);
            assert_eq!(fs::read(&t.path).expect("read"), b"payload");
        }
        other => panic!("expected Taken, got {other:?}"),
    }
    assert_eq!(second.name.filebase, empty.filebase);
    assert!(matches!(f.q.dequeue_unread(&second), Ok(Dequeued::Quarantined(_))), "an empty file is no entry");
    assert!(matches!(f.q.dequeue_unread(&second), Ok(Dequeued::Gone)));
}

#[test]
fn a_listing_for_some_slices_keeps_their_entries_and_counts_the_others_as_a_full_one_does() {
    let f = fixture();
    for i in 0..40u32 {
        f.q.enqueue_in_slice(format!("m{i}").as_bytes(), i % 4, 4).expect("enqueue");
    }
    take(&f.q, 4, 1);
    take(&f.q, 4, 3);
    let full = f.q.scan(4).expect("scan");
    let some = f.q.scan_for(4, |s| s == 1 || s == 2).expect("scan");
    assert_eq!(some.pending.keys().copied().collect::<Vec<_>>(), vec![1, 2], "entries of the wanted slices only");
    assert_eq!(some.pending[&1], full.pending[&1]);
    assert_eq!(some.in_flight[&1], full.in_flight[&1]);
    assert_eq!(some.others.keys().copied().collect::<Vec<_>>(), vec![0, 3]);
    for s in 0..4 {
        assert_eq!(some.depth(s), full.depth(s), "slice {s}");
        assert_eq!(some.in_flight_count(s), full.in_flight_count(s), "slice {s}");
        match (some.oldest_age(s), full.oldest_age(s)) {
            (Some(a), Some(b)) => assert!((a - b).abs() < 1.0, "slice {s}: {a} vs {b}"),
            (a, b) => assert_eq!(a, b, "slice {s}"),
        }
    }
    assert_eq!(some.total_depth(), 38);
    assert_eq!(some.slices_with_entries(), full.slices_with_entries());
}
