//! Fault-injection test beds for qslice's end-to-end tests.
//!
//! qslice's tests run real etcd and real binaries; these beds put faults between them
//! and the world: a file system that lies about renames, serves stale listings, fails
//! opens or hangs, and a TCP proxy that lets a request reach etcd but loses or delays
//! its reply (the "unknown outcome" of a commit).
//!
//! # Layout
//! - [`faultfs`]: the FUSE pass-through file system over a backing directory, its
//!   [`faultfs::Fault`]s, the control socket, and [`faultfs::FaultFs`], the handle a test
//!   mounts it with. `src/bin/qslice-faultfs.rs` is the thin binary that holds the mount.
//! - [`proxy`]: [`proxy::EtcdProxy`], a loopback TCP proxy to an etcd client URL whose
//!   replies can be delayed or dropped, switched at run time.
//! - [`nfs`]: [`nfs::NfsBed`], real Linux NFS clients (QEMU guests running Debian's
//!   kernel) mounting an nfs-ganesha export, each able to run the host's binaries; the
//!   image and guest scripts are in `nfs/`.
//!
//! The crate depends on no other qslice crate, so it builds on its own.

pub mod faultfs;
pub mod nfs;
pub mod proxy;

/// Makes the child die with the thread that spawned it (Linux's PR_SET_PDEATHSIG), so a
/// test process killed outright leaves nothing behind.
#[allow(unsafe_code)]
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
