//! How the runner starts its child processes.

/// Makes a child die with this process (Linux PR_SET_PDEATHSIG). Children are spawned
/// from the runtime's long-lived worker threads, whose exit is the process's exit.
#[allow(unsafe_code)]
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
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
