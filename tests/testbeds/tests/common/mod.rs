//! Helpers shared by the test-bed tests: a bounded wait and a real etcd.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Polls `condition` every 20 ms until it holds, failing with `what` after `timeout`.
pub fn wait_for(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A backing directory and an empty mount point, removed at the end of the test.
pub struct Dirs {
    /// Holds both.
    pub root: tempfile::TempDir,
}

impl Dirs {
    /// Makes `backing/` and `mnt/` in a fresh temporary directory.
    pub fn new() -> Result<Dirs> {
        let root = tempfile::Builder::new().prefix("qslice-testbeds-").tempdir()?;
        std::fs::create_dir(root.path().join("backing"))?;
        std::fs::create_dir(root.path().join("mnt"))?;
        Ok(Dirs { root })
    }

    /// The backing directory.
    pub fn backing(&self) -> PathBuf {
        self.root.path().join("backing")
    }

    /// The mount point.
    pub fn mnt(&self) -> PathBuf {
        self.root.path().join("mnt")
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0").context("bind a free loopback port")?.local_addr()?.port())
}

/// How long etcd may take to answer after start on a loaded two-core machine.
const ETCD_START_TIMEOUT: Duration = Duration::from_secs(30);

/// A real etcd (`/usr/bin/etcd`, or `$QSLICE_TEST_ETCD`) on free loopback ports with a
/// temporary data dir; killed on drop.
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
}

impl Etcd {
    /// Starts etcd and waits until it reports healthy.
    pub fn start() -> Result<Etcd> {
        let mut last = None;
        // A port found free can be taken by another test before etcd binds it: retry.
        for _ in 0..5 {
            match Etcd::launch() {
                Ok(etcd) => return Ok(etcd),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried at least once"))
    }

    fn launch() -> Result<Etcd> {
        let binary = std::env::var("QSLICE_TEST_ETCD").unwrap_or_else(|_| "/usr/bin/etcd".into());
        let dir = tempfile::Builder::new().prefix("qslice-testbeds-etcd-").tempdir()?;
        let (client_port, peer_port) = (free_port()?, free_port()?);
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log = File::create(dir.path().join("etcd.log"))?;
        let child = Command::new(&binary)
            .args(["--name", "testbeds"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("testbeds={peer}")])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {binary} (Debian package etcd-server)"))?;
        let mut etcd = Etcd { child: Some(child), dir, client_port };
        let deadline = Instant::now() + ETCD_START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = etcd.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                etcd.child = None;
                bail!("etcd exited at start ({status}):\n{}", etcd.log());
            }
            if etcd.is_healthy() {
                return Ok(etcd);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("etcd did not answer within {ETCD_START_TIMEOUT:?}:\n{}", etcd.log())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    fn is_healthy(&self) -> bool {
        let probe = || -> std::io::Result<String> {
            let mut stream = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(1))?;
            stream.set_read_timeout(Some(Duration::from_secs(1)))?;
            stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply)?;
            Ok(reply)
        };
        probe().is_ok_and(|reply| reply.contains("\"health\":\"true\""))
    }

    /// The client address.
    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.client_port).into()
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The data directory's parent (for checks that it is gone).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
