//! A 3-member (or n-member) etcd cluster on loopback for tests: each member has its own
//! client, peer and metrics ports and data dir; any member can be stopped, restarted,
//! paused and resumed; everything is killed and removed on drop. Optionally the client
//! ports serve TLS with client certificates (health is probed on the plain metrics port).

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::wait::{wait_for, Wait};
use crate::{free_port, tail};

/// TLS files for the client ports.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// CA that signed the server and client certificates.
    pub ca: String,
    /// Server certificate for 127.0.0.1.
    pub cert: String,
    /// Server key.
    pub key: String,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    metrics_port: u16,
    child: Option<Child>,
}

/// A running etcd cluster.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    tls: Option<ClientTls>,
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let addr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

impl EtcdCluster {
    /// Starts `n` members with fast election settings and waits until all are healthy.
    pub fn start(n: usize, tls: Option<ClientTls>) -> Result<EtcdCluster> {
        let dir = tempfile::Builder::new().prefix("qslice-etcd-cluster-").tempdir()?;
        let mut members = Vec::new();
        for i in 0..n {
            members.push(Member { name: format!("m{i}"), client_port: free_port()?, peer_port: free_port()?, metrics_port: free_port()?, child: None });
        }
        let mut cluster = EtcdCluster { dir, members, tls };
        for i in 0..n {
            cluster.launch(i)?;
        }
        for i in 0..n {
            cluster.wait_healthy(i)?;
        }
        Ok(cluster)
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn launch(&mut self, i: usize) -> Result<()> {
        let initial: Vec<String> = self.members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port)).collect();
        let scheme = self.scheme();
        let m = &self.members[i];
        let client = format!("{scheme}://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let log = File::options().create(true).append(true).open(self.dir.path().join(format!("{}.log", m.name)))?;
        let mut cmd = Command::new(std::env::var("QSLICE_TEST_ETCD").unwrap_or_else(|_| "/usr/bin/etcd".into()));
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(self.dir.path().join(&m.name))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--listen-metrics-urls", &format!("http://127.0.0.1:{}", m.metrics_port)])
            .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new", "--initial-cluster-token", "qslice-test"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500", "--log-level", "warn", "--logger", "zap"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(tls) = &self.tls {
            cmd.args(["--cert-file", &tls.cert, "--key-file", &tls.key, "--trusted-ca-file", &tls.ca, "--client-cert-auth"]);
        }
        crate::die_with_parent(&mut cmd);
        let child = cmd.spawn().context("start etcd (install etcd-server)")?;
        self.members[i].child = Some(child);
        Ok(())
    }

    fn wait_healthy(&self, i: usize) -> Result<()> {
        let port = self.members[i].metrics_port;
        wait_for(Duration::from_secs(30), &format!("etcd member {i} to be healthy"), || http_get(port, "/health").is_some_and(|r| r.contains("\"health\":\"true\"")))
            .with_context(|| tail(&self.dir.path().join(format!("{}.log", self.members[i].name)), 20))
    }

    /// Every member's client URL (what qslice is configured with).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client_port)).collect()
    }

    /// The client URLs joined by commas, for `--etcd-endpoints`.
    pub fn endpoints_flag(&self) -> String {
        self.endpoints().join(",")
    }

    /// The index of the member that leads now, if one does.
    pub fn leader(&self) -> Option<usize> {
        self.members.iter().position(|m| m.child.is_some() && http_get(m.metrics_port, "/metrics").is_some_and(|t| t.lines().any(|l| l.trim() == "etcd_server_is_leader 1")))
    }

    /// Waits until some member leads and returns its index.
    pub fn wait_leader(&self, timeout: Duration) -> Result<usize> {
        Wait::new(timeout, "an etcd member to lead").poll(|| Ok(self.leader()))
    }

    /// Kills member `i` (SIGKILL); its data stays for [`EtcdCluster::restart`].
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again with its data and waits until it is healthy.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.stop(i);
        self.launch(i)?;
        self.wait_healthy(i)
    }

    /// Freezes member `i` with SIGSTOP.
    pub fn pause(&self, i: usize) -> Result<()> {
        let pid = self.members[i].child.as_ref().context("member not running")?.id();
        kill(Pid::from_raw(pid as i32), Signal::SIGSTOP)?;
        Ok(())
    }

    /// Thaws member `i`.
    pub fn resume(&self, i: usize) -> Result<()> {
        let pid = self.members[i].child.as_ref().context("member not running")?.id();
        kill(Pid::from_raw(pid as i32), Signal::SIGCONT)?;
        Ok(())
    }

    /// The directory holding the members' data and logs.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for m in &self.members {
                eprintln!("--- etcd member {} log ---\n{}", m.name, tail(&self.dir.path().join(format!("{}.log", m.name)), 10));
            }
        }
        for i in 0..self.members.len() {
            self.stop(i);
        }
    }
}
