//! A bed of real Linux NFS clients: QEMU guests (software emulation) running Debian's own
//! kernel, each mounting one export of an nfs-ganesha server, and each able to run the
//! host's programs (the host's `/` is shared into the guest read-only and chrooted into).
//!
//! The server (rpcbind and ganesha, in a mount namespace of their own with a private
//! `/run`), the guests' QEMUs and whatever the test starts beside them (etcd, a
//! coordinator) share the test's network namespace: call [`enter_private_network`] first,
//! so that ganesha's fixed ports (2049, 111) are the test's own. A guest sees that
//! namespace's loopback at 10.0.2.2 (QEMU user networking).
//!
//! The export is mounted in every guest at the same path as its directory on the host
//! ([`NfsBed::export`]), so one path names the spool everywhere; the host should only read
//! it (a write made directly in the export bypasses the NFS server's caches). Each guest
//! has a work directory of its own ([`Guest::work`]), shared read-write over 9p at the same
//! path, for commands, logs and state. How commands reach a guest: `nfs/README.md`.
//!
//! Set `QSLICE_KEEP_NFS_BED=1` to keep the bed's directory (export, guests' work
//! directories with every command's output, ganesha's log) after a test.
//!
//! The guest kernel and initramfs are built once per target directory by
//! `nfs/build-guest.sh` from Debian's packages (tests/run.sh installs QEMU, ganesha and
//! the tools it needs).

use std::fs;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

// The children get SIGKILL when the thread that started them ends (a test that dies
// leaves no QEMU or server behind): start the bed from the test's own thread.

/// What can go wrong building or running the bed.
#[derive(Debug, thiserror::Error)]
pub enum NfsError {
    /// A step failed; the message says which and what it printed.
    #[error("{0}")]
    Failed(String),
    /// An I/O error on a path of the bed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// To which path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> NfsError + 'a {
    move |source| NfsError::Io { what, path: path.to_owned(), source }
}

fn failed(msg: impl Into<String>) -> NfsError {
    NfsError::Failed(msg.into())
}

/// How long a guest may take to boot and mount on a loaded two-core machine (three guests
/// boot in 40-50 s there).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// The address the guests see the test's network namespace at (QEMU user networking
/// forwards it to the namespace's 127.0.0.1).
pub const GATEWAY: &str = "10.0.2.2";

/// Moves the calling thread (and so the threads and processes it starts from now on) into
/// a new network namespace with its loopback up, answering at 127.0.0.1 and at [`GATEWAY`]
/// too (so that one address names a server to the host side and to the guests). Call it
/// at the start of a test, before starting a runtime or any process.
pub fn enter_private_network() -> Result<(), NfsError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| failed(format!("unshare(CLONE_NEWNET): {e} (the NFS bed needs root)")))?;
    let ip = |args: &[&str]| -> Result<(), NfsError> {
        let out = Command::new("ip").args(args).output().map_err(|e| failed(format!("ip: {e} (install iproute2)")))?;
        if !out.status.success() {
            return Err(failed(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())));
        }
        Ok(())
    };
    ip(&["link", "set", "lo", "up"])?;
    ip(&["addr", "add", &format!("{GATEWAY}/32"), "dev", "lo"])
}

fn in_initial_network_namespace() -> bool {
    let ours = fs::read_link("/proc/thread-self/ns/net").ok();
    ours.is_some() && ours == fs::read_link("/proc/1/ns/net").ok()
}

/// The kernel and initramfs the guests boot.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// The uncompressed kernel (booted directly, PVH).
    pub vmlinux: PathBuf,
    /// The initramfs (busybox, the NFS and 9p modules, the guest's init).
    pub initrd: PathBuf,
}

impl GuestImage {
    /// Builds the image into `dir` unless it is there already (`nfs/build-guest.sh`,
    /// serialised by a lock on `dir.lock`).
    pub fn build(dir: &Path) -> Result<GuestImage, NfsError> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("nfs/build-guest.sh");
        let lock = dir.with_extension("lock");
        let out = Command::new("flock")
            .arg(&lock)
            .arg("bash")
            .arg(&script)
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| failed(format!("run {} under flock: {e}", script.display())))?;
        if !out.status.success() {
            return Err(failed(format!("building the guest image failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))));
        }
        Ok(GuestImage { vmlinux: dir.join("vmlinux"), initrd: dir.join("initrd.img") })
    }

    /// The image for the target directory the calling executable was built in
    /// (`<target>/qslice-nfs-guest`). Building it downloads Debian's kernel package the
    /// first time: call it before [`enter_private_network`].
    pub fn for_this_target() -> Result<GuestImage, NfsError> {
        GuestImage::build(&target_dir()?.join("qslice-nfs-guest"))
    }
}

/// The target directory of the running executable (`<target>/<profile>[/deps]/exe`).
fn target_dir() -> Result<PathBuf, NfsError> {
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().map_err(|e| failed(format!("current_exe: {e}")))?;
    let mut dir = exe.parent().ok_or_else(|| failed("the executable has no directory"))?;
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir = dir.parent().ok_or_else(|| failed("deps has no parent"))?;
    }
    Ok(dir.parent().ok_or_else(|| failed("the profile directory has no parent"))?.to_owned())
}

/// What the bed is made of.
#[derive(Clone, Debug)]
pub struct BedOptions {
    /// The guests' names (also their NFSv4 client ids).
    pub guests: Vec<String>,
    /// The NFS mount options (`vers=4.1`, `vers=4.1,lookupcache=none`, `vers=3`...).
    pub mount: String,
    /// Each guest's memory in MiB.
    pub memory_mb: u32,
    /// An existing directory to export (the test filled it before the server starts, as a
    /// site's files are there before its hosts mount them); default: an empty one of the bed's.
    pub export: Option<PathBuf>,
}

impl BedOptions {
    /// `n` guests named `g1`... mounting with `mount`, 256 MiB each.
    pub fn new(n: usize, mount: &str) -> BedOptions {
        BedOptions { guests: (1..=n).map(|i| format!("g{i}")).collect(), mount: mount.to_owned(), memory_mb: 256, export: None }
    }
}

/// A running bed: the NFS server and its guests; everything stops and goes on drop.
pub struct NfsBed {
    dir: tempfile::TempDir,
    server: Option<Child>,
    guests: Vec<Guest>,
    mount: String,
    export: Option<PathBuf>,
}

impl NfsBed {
    /// Starts the server and boots every guest from `image`; returns once each has
    /// mounted the export (or says which did not, with its console).
    pub fn start(image: &GuestImage, options: &BedOptions) -> Result<NfsBed, NfsError> {
        if in_initial_network_namespace() {
            return Err(failed("the NFS bed runs in a network namespace of the test's own: call enter_private_network() first"));
        }
        let dir = tempfile::Builder::new().prefix("qslice-nfs-").tempdir().map_err(io("create", Path::new("/tmp/qslice-nfs-*")))?;
        let mut bed = NfsBed { dir, server: None, guests: Vec::new(), mount: options.mount.clone(), export: options.export.clone() };
        let export = bed.export();
        fs::create_dir_all(&export).map_err(io("create", &export))?;
        bed.server = Some(bed.start_server()?);
        for name in &options.guests {
            let guest = Guest::boot(image, bed.dir.path(), name, &export, options)?;
            bed.guests.push(guest);
        }
        let deadline = Instant::now() + BOOT_TIMEOUT;
        for guest in &mut bed.guests {
            guest.wait_ready(deadline)?;
        }
        Ok(bed)
    }

    /// The export's directory: on the host (read it only) and, mounted over NFS, in every guest.
    pub fn export(&self) -> PathBuf {
        self.export.clone().unwrap_or_else(|| self.dir.path().join("export"))
    }

    /// The mount options the guests use.
    pub fn mount_options(&self) -> &str {
        &self.mount
    }

    /// A scratch directory of the bed's on the host (not shared with the guests but through
    /// the host's read-only root).
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// The guests, in the order of [`BedOptions::guests`].
    pub fn guests(&self) -> &[Guest] {
        &self.guests
    }

    /// One guest by name.
    pub fn guest(&self, name: &str) -> &Guest {
        self.guests.iter().find(|g| g.name == name).unwrap_or_else(|| panic!("no guest {name} in the bed"))
    }

    /// One guest by name, to kill it.
    pub fn guest_mut(&mut self, name: &str) -> &mut Guest {
        self.guests.iter_mut().find(|g| g.name == name).unwrap_or_else(|| panic!("no guest {name} in the bed"))
    }

    /// Stops ganesha and rpcbind: killing unshare kills its pid namespace's first process,
    /// and with it every process of that namespace.
    fn stop_server(&self, server: &mut Child) {
        // Its child first, so that unshare reaps it (and exits) rather than leaving a
        // zombie to init.
        let children = fs::read_to_string(format!("/proc/{0}/task/{0}/children", server.id())).unwrap_or_default();
        for pid in children.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(server.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        kill_and_reap(server);
    }

    /// Starts rpcbind and ganesha in a mount namespace with a private `/run` (rpcbind's
    /// socket and lock live there, and the host may run an rpcbind of its own) and a pid
    /// namespace of their own; returns
    /// once ganesha answers on port 2049.
    fn start_server(&self) -> Result<Child, NfsError> {
        let base = self.dir.path();
        let (recovery, log, pid) = (base.join("ganesha-recovery"), base.join("ganesha.log"), base.join("ganesha.pid"));
        fs::create_dir_all(&recovery).map_err(io("create", &recovery))?;
        let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("nfs/ganesha.conf.in");
        let text = fs::read_to_string(&template).map_err(io("read", &template))?;
        let conf = base.join("ganesha.conf");
        let text = text.replace("@EXPORT@", &self.export().to_string_lossy()).replace("@RECOVERY@", &recovery.to_string_lossy());
        fs::write(&conf, text).map_err(io("write", &conf))?;
        let script = format!(
            "set -e; mount -t tmpfs qslice-run /run; mkdir -p /run/rpcbind /run/ganesha; \
             rpcbind -f -w & \
             i=0; while [ ! -S /run/rpcbind.sock ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
             exec ganesha.nfsd -F -f {conf} -L {log} -p {pid}",
            conf = conf.display(),
            log = log.display(),
            pid = pid.display()
        );
        let out = fs::File::create(base.join("server.out")).map_err(io("create", &base.join("server.out")))?;
        let mut cmd = Command::new("unshare");
        // A pid namespace too, whose first process is killed with unshare: when it goes,
        // the kernel kills rpcbind with it (rpcbind drops root, which clears a parent-death
        // signal of its own), also when the test process is killed outright.
        cmd.args(["--mount", "--propagation", "private", "--pid", "--fork", "--kill-child=SIGKILL", "--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(io("dup", &base.join("server.out")))?)
            .stderr(out);
        crate::die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| failed(format!("start ganesha (unshare): {e}; tests/run.sh installs nfs-ganesha and rpcbind")))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if std::net::TcpStream::connect_timeout(&"127.0.0.1:2049".parse().expect("address"), Duration::from_secs(1)).is_ok() {
                return Ok(child);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(failed(format!("ganesha exited ({status}) before serving:\n{}\n{}", read_tail(&base.join("server.out"), 20), read_tail(&log, 30))));
            }
            if Instant::now() > deadline {
                self.stop_server(&mut child);
                return Err(failed(format!("ganesha did not listen on port 2049 within 60 s:\n{}", read_tail(&log, 30))));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for NfsBed {
    fn drop(&mut self) {
        for guest in &mut self.guests {
            guest.kill();
        }
        if let Some(server) = self.server.take() {
            if std::thread::panicking() {
                eprintln!("--- ganesha log (last lines) ---\n{}", read_tail(&self.dir.path().join("ganesha.log"), 30));
            }
            let mut server = server;
            self.stop_server(&mut server);
        }
        if std::env::var_os("QSLICE_KEEP_NFS_BED").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::TempDir::new().expect("a temporary directory"));
            eprintln!("NFS bed kept (QSLICE_KEEP_NFS_BED) at {}", dir.keep().display());
        }
    }
}

/// One guest: its QEMU, its work directory and its command channel.
pub struct Guest {
    name: String,
    work: PathBuf,
    qemu: Option<Child>,
    monitor: PathBuf,
    next: AtomicU32,
}

impl Guest {
    fn boot(image: &GuestImage, base: &Path, name: &str, export: &Path, options: &BedOptions) -> Result<Guest, NfsError> {
        let work = base.join("guests").join(name);
        for d in [work.join("ctl"), work.join("tmp")] {
            fs::create_dir_all(&d).map_err(io("create", &d))?;
        }
        let monitor = work.join("monitor.sock");
        let append = format!(
            "console=ttyS0 panic=-1 quiet nfs.nfs4_unique_id=qslice-{name} qs_name={name} qs_mount={export} qs_nfs={mount} qs_work={work}",
            export = export.display(),
            mount = options.mount,
            work = work.display()
        );
        let qemu_log = work.join("qemu.log");
        let out = fs::File::create(&qemu_log).map_err(io("create", &qemu_log))?;
        let mut cmd = Command::new("qemu-system-x86_64");
        // tb-size bounds the translation cache (QEMU grows to 525 MB without it); too small a
        // cache is flushed and translated again and again: the NFS pause test took 71 s alone
        // at 64 MB, 41 s at 256 MB (one run each).
        cmd.args(["-accel", "tcg,tb-size=256", "-cpu", "max", "-smp", "1", "-nodefaults", "-no-reboot", "-display", "none"])
            .args(["-m", &options.memory_mb.to_string()])
            .arg("-serial")
            .arg(format!("file:{}", work.join("console.log").display()))
            .arg("-monitor")
            .arg(format!("unix:{},server,nowait", monitor.display()))
            .arg("-kernel")
            .arg(&image.vmlinux)
            .arg("-initrd")
            .arg(&image.initrd)
            .args(["-append", &append])
            .args(["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"])
            .args(["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"])
            .arg("-virtfs")
            .arg(format!("local,path={},mount_tag=work,security_model=none", work.display()))
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(io("dup", &qemu_log))?)
            .stderr(out);
        crate::die_with_parent(&mut cmd);
        let qemu = cmd.spawn().map_err(|e| failed(format!("start qemu-system-x86_64: {e}; tests/run.sh installs qemu-system-x86")))?;
        Ok(Guest { name: name.to_owned(), work, qemu: Some(qemu), monitor, next: AtomicU32::new(1) })
    }

    fn wait_ready(&mut self, deadline: Instant) -> Result<(), NfsError> {
        loop {
            if self.work.join("ready").exists() {
                return Ok(());
            }
            let failed_file = self.work.join("failed");
            if failed_file.exists() {
                return Err(failed(format!("guest {} failed to set up: {}\n{}", self.name, fs::read_to_string(&failed_file).unwrap_or_default(), self.console_tail(30))));
            }
            if let Some(Ok(Some(status))) = self.qemu.as_mut().map(Child::try_wait) {
                return Err(failed(format!("guest {}'s QEMU exited ({status}):\n{}\n{}", self.name, read_tail(&self.work.join("qemu.log"), 10), self.console_tail(30))));
            }
            if Instant::now() > deadline {
                return Err(failed(format!("guest {} not ready within {} s:\n{}", self.name, BOOT_TIMEOUT.as_secs(), self.console_tail(30))));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The guest's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The guest's work directory: the same path on the host and in the guest, writable by both.
    pub fn work(&self) -> &Path {
        &self.work
    }

    /// The last lines of the guest's console.
    pub fn console_tail(&self, n: usize) -> String {
        read_tail(&self.work.join("console.log"), n)
    }

    /// The QEMU process id while it runs.
    pub fn qemu_pid(&self) -> Option<u32> {
        self.qemu.as_ref().map(Child::id)
    }

    /// Starts `script` (run by the host's `/bin/sh` in the guest's chroot, in the work
    /// directory, as its own process group) and returns at once.
    pub fn spawn(&self, script: &str) -> Result<GuestProc, NfsError> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let ctl = self.work.join("ctl");
        write_atomically(&ctl.join(format!("{n}.cmd")), script.as_bytes())?;
        Ok(GuestProc { guest: self.name.clone(), ctl, n })
    }

    /// Runs `script` to its end (at most `timeout`); returns its exit status and output.
    pub fn run(&self, script: &str, timeout: Duration) -> Result<(i32, String), NfsError> {
        let proc = self.spawn(script)?;
        let rc = proc.wait(timeout)?;
        Ok((rc, proc.output()))
    }

    /// Pauses the whole VM (SIGSTOP of its QEMU): its clocks, processes and NFS client stop.
    pub fn pause(&self) -> Result<(), NfsError> {
        self.signal_qemu(Signal::SIGSTOP)
    }

    /// Resumes a paused VM.
    pub fn resume(&self) -> Result<(), NfsError> {
        self.signal_qemu(Signal::SIGCONT)
    }

    fn signal_qemu(&self, signal: Signal) -> Result<(), NfsError> {
        let pid = self.qemu_pid().ok_or_else(|| failed(format!("guest {} is dead", self.name)))?;
        kill(Pid::from_raw(pid as i32), signal).map_err(|e| failed(format!("{signal} to guest {}'s QEMU: {e}", self.name)))
    }

    /// Kills the guest at once (SIGKILL of its QEMU): a host death.
    pub fn kill(&mut self) {
        if let Some(mut qemu) = self.qemu.take() {
            if std::thread::panicking() {
                eprintln!("--- guest {} console (last lines) ---\n{}", self.name, self.console_tail(20));
            }
            kill_and_reap(&mut qemu);
        }
    }

    /// Cuts the guest's network (its link goes down; NFS and etcd become unreachable).
    pub fn cut_off(&self) -> Result<(), NfsError> {
        self.monitor_command("set_link n0 off")
    }

    /// Restores the guest's network.
    pub fn reconnect(&self) -> Result<(), NfsError> {
        self.monitor_command("set_link n0 on")
    }

    fn monitor_command(&self, command: &str) -> Result<(), NfsError> {
        let mut s = UnixStream::connect(&self.monitor).map_err(io("connect to the QEMU monitor", &self.monitor))?;
        s.set_read_timeout(Some(Duration::from_secs(30))).map_err(io("set a timeout on", &self.monitor))?;
        // The monitor greets with a "(qemu) " prompt, and prompts again once a command is done.
        let prompt = |s: &mut UnixStream| -> Result<(), NfsError> {
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            while !String::from_utf8_lossy(&seen).contains("(qemu) ") {
                let n = std::io::Read::read(s, &mut buf).map_err(io("read the QEMU monitor's prompt", &self.monitor))?;
                if n == 0 {
                    return Err(failed(format!("guest {}'s QEMU monitor closed", self.name)));
                }
                seen.extend_from_slice(&buf[..n]);
            }
            Ok(())
        };
        prompt(&mut s)?;
        s.write_all(format!("{command}\n").as_bytes()).map_err(io("write to the QEMU monitor", &self.monitor))?;
        prompt(&mut s)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A command started in a guest.
#[derive(Clone, Debug)]
pub struct GuestProc {
    guest: String,
    ctl: PathBuf,
    n: u32,
}

impl GuestProc {
    /// The command's process id in the guest, once the guest started it.
    pub fn pid(&self, timeout: Duration) -> Result<u32, NfsError> {
        let path = self.ctl.join(format!("{}.pid", self.n));
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pid) = fs::read_to_string(&path).ok().and_then(|s| s.trim().parse().ok()) {
                return Ok(pid);
            }
            if Instant::now() > deadline {
                return Err(failed(format!("guest {} did not start command {} within {} s", self.guest, self.n, timeout.as_secs())));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The exit status, once the command ended.
    pub fn exit_code(&self) -> Option<i32> {
        fs::read_to_string(self.ctl.join(format!("{}.rc", self.n))).ok().and_then(|s| s.trim().parse().ok())
    }

    /// Waits up to `timeout` for the command to end; its exit status.
    pub fn wait(&self, timeout: Duration) -> Result<i32, NfsError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(rc) = self.exit_code() {
                return Ok(rc);
            }
            if Instant::now() > deadline {
                return Err(failed(format!("command {} in guest {} still running after {} s; output:\n{}", self.n, self.guest, timeout.as_secs(), self.output())));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` (KILL, TERM, STOP, CONT) to the command's process group in the guest.
    pub fn signal(&self, signal: &str) -> Result<(), NfsError> {
        write_atomically(&self.ctl.join(format!("{}.signal", self.n)), signal.as_bytes())
    }

    /// Whether the guest has taken the last signal (it deletes the request once sent).
    pub fn signal_sent(&self) -> bool {
        !self.ctl.join(format!("{}.signal", self.n)).exists()
    }

    /// What the command printed (stdout and stderr).
    pub fn output(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Where the command's output goes (a host path).
    pub fn log_path(&self) -> PathBuf {
        self.ctl.join(format!("{}.log", self.n))
    }
}

fn write_atomically(path: &Path, content: &[u8]) -> Result<(), NfsError> {
    let tmp = path.with_extension("part");
    fs::write(&tmp, content).map_err(io("write", &tmp))?;
    fs::rename(&tmp, path).map_err(io("rename into place", path))
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn read_tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
