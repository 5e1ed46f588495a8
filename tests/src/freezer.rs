//! A host pause for tests: the cgroup v1 freezer (`/sys/fs/cgroup/freezer`) freezes a
//! set of processes together, as a VM pause would, or a single process while its children
//! run on (a runner hung in a stuck NFS call). Unlike SIGSTOP it cannot be seen or undone
//! by the frozen processes. The cgroup is thawed, emptied and removed on drop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::wait::{wait_for, Wait};

const ROOT: &str = "/sys/fs/cgroup/freezer";

/// One freezer cgroup of the test's own.
pub struct Freezer {
    dir: PathBuf,
}

/// The pid and every descendant of it, from /proc.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|p| {
                    let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                    // Field 4, counted after the ")" that ends the command name.
                    let ppid = stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()?;
                    Some((p, ppid))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        all.extend(parents.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    all
}

impl Freezer {
    /// A new, empty freezer cgroup. Fails (never skips) where the freezer is missing.
    pub fn new() -> Result<Freezer> {
        if !Path::new(ROOT).join("freezer.state").exists() && !Path::new(ROOT).join("cgroup.procs").exists() {
            bail!("the cgroup v1 freezer is not mounted at {ROOT}");
        }
        let dir = Path::new(ROOT).join(format!("qslice-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Freezer { dir })
    }

    /// Moves processes into the cgroup (children they start later are in it too).
    pub fn add(&self, pids: &[u32]) -> Result<()> {
        for pid in pids {
            // A process that exited meanwhile cannot be moved: fine.
            if let Err(e) = std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()) {
                if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    return Err(e).with_context(|| format!("move {pid} into {}", self.dir.display()));
                }
            }
        }
        Ok(())
    }

    /// Moves `pid` and every descendant of it into the cgroup. `pid` goes first, so that
    /// whatever it forks from then on starts inside; the tree is then swept until every
    /// process in it is inside (a child forked before its parent moved is not, and it may
    /// fork on meanwhile).
    pub fn add_tree(&self, pid: u32) -> Result<()> {
        self.add(&[pid])?;
        Wait::new(Duration::from_secs(10), &format!("every process of {pid}'s tree in {}", self.dir.display())).poll(|| {
            // Zombies run nothing and cannot be moved: they are left out.
            let tree: Vec<u32> = process_tree(pid).into_iter().filter(|p| crate::process_alive(*p)).collect();
            let inside = self.pids();
            if tree.iter().all(|p| inside.contains(p)) {
                return Ok(Some(()));
            }
            self.add(&tree)?;
            Ok(None)
        })
    }

    /// Freezes every process in the cgroup and waits until the kernel says they are.
    pub fn freeze(&self) -> Result<()> {
        self.set_state("FROZEN")
    }

    /// Thaws them.
    pub fn thaw(&self) -> Result<()> {
        self.set_state("THAWED")
    }

    fn set_state(&self, state: &str) -> Result<()> {
        let file = self.dir.join("freezer.state");
        std::fs::write(&file, state).with_context(|| format!("write {state} to {}", file.display()))?;
        wait_for(Duration::from_secs(30), &format!("freezer state {state}"), || std::fs::read_to_string(&file).map(|s| s.trim() == state).unwrap_or(false))
    }

    /// The processes in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
    }
}

impl Drop for Freezer {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("freezer.state"), "THAWED");
        // Processes still running may start children into the group while it is emptied:
        // empty it until it stays empty (bounded), then remove it.
        let _ = Wait::new(Duration::from_secs(1), "the freezer cgroup to stay empty and go").every(Duration::from_millis(10)).until(|| {
            let pids = self.pids();
            if pids.is_empty() && std::fs::remove_dir(&self.dir).is_ok() {
                return true;
            }
            for pid in pids {
                let _ = std::fs::write(Path::new(ROOT).join("cgroup.procs"), pid.to_string());
            }
            false
        });
    }
}
