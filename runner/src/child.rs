//! How the runner starts its child processes.

/// Ties a child to this runner: it dies with it (Linux PR_SET_PDEATHSIG), and, when the
/// child leads its own process group (`process_group(0)`), it tells the leash about that
/// group itself, between fork and exec. The runner registers the group too once `spawn`
/// returns ([`crate::leash::Leashed`]), but a runner killed in between would leave the
/// group unknown to the leash: the child's shell dies by the death signal while what it
/// started runs on. With the child's own `add`, no moment exists at which the group runs
/// and the leash does not know it. Children are spawned from the runtime's long-lived
/// worker threads, whose exit is the process's exit.
#[allow(unsafe_code)]
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (prctl, getppid, getpid, fstat, write) on
    // stack memory: nothing that allocates or takes a lock after the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The runner died before the death signal was armed: do not start at all.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the runner is gone"));
            }
            crate::leash::announce_from_child(libc::getpid());
            Ok(())
        });
    }
}
