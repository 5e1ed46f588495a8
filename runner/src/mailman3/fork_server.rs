//! The fork server: one process per Mailman configuration on a node that initialises
//! Mailman once and forks each slice runner of every queue run with that configuration
//! (`qslice_mailman3.py --fork-server`).
//!
//! A slice runner started on its own spends 0.7-2 s of CPU initialising Mailman
//! (interpreter, imports, configuration, database); a child forked from a process that has
//! done it is ready in a fraction of that and shares the imported pages. So every start,
//! a spare's or a takeover's, is warm, and a pool that grows (a reslice, a join) no longer
//! starts a dozen interpreters at once. Queues share a server when they run the same
//! interpreter, mailman.cfg, environment, working directory, user and group
//! ([`ServerKey`]): a whole site's dozen queues initialise Mailman once per node.
//!
//! The channel: the server's stdin is a Unix stream socket. A request is one message,
//! `fork RUNNER QUEUE`, carrying three file descriptors (SCM_RIGHTS) that become the
//! child's stdin, stdout and stderr; from there the child speaks the slice runner's own
//! protocol on them, starting with `ready PID`. The server's stdout says `ready PID`
//! once Mailman is initialised, `forked PID` for each request in turn (or `error TEXT`),
//! and `exited PID CODE` for each child it reaps (CODE: the exit code, or -SIGNAL).
//! EOF on its stdin ends it once its children have exited; it dies with qslice-runner
//! (its parent-death signal), and its children with it.

use std::collections::{HashMap, VecDeque};
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::unix::pipe;
use tokio::sync::{oneshot, watch};

use crate::supervise::log_lines;

/// How long a fork may take before the server is taken for hung.
const FORK_TIMEOUT: Duration = Duration::from_secs(30);

/// A forked slice runner: its pid (and process group), its ends of its three streams,
/// and its exit code once the server reaped it (`None` in the channel until then; the
/// channel closes without one if the server died first).
pub struct Forked {
    pub pid: i32,
    pub stdin: pipe::Sender,
    pub stdout: pipe::Receiver,
    pub stderr: pipe::Receiver,
    pub exit: watch::Receiver<Option<i32>>,
}

type Reply = oneshot::Sender<Result<(i32, watch::Receiver<Option<i32>>), String>>;

/// What the server's stdout reader shares with the requesters.
#[derive(Default)]
struct Channel {
    /// Requests sent and not answered, oldest first (the server answers in order).
    pending: VecDeque<Reply>,
    /// The exit of each child not reaped yet.
    exits: HashMap<i32, watch::Sender<Option<i32>>>,
    /// The server's stdout ended: it is gone.
    closed: bool,
}

/// What makes two queues' slice runners alike enough to fork from one server: what the
/// server is started with, apart from the queue (each request names its own).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ServerKey {
    pub python: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub env: Vec<String>,
    pub workdir: Option<PathBuf>,
    pub user: Option<String>,
    pub group: Option<String>,
}

/// The node's running fork servers, shared by the queues' pools. A server lives while a
/// pool holds it; the last pool to let go (its queue gone, or the runner stopping) closes
/// its requests and it ends.
#[derive(Clone, Default)]
pub struct ForkServers(Arc<Mutex<HashMap<ServerKey, Weak<ForkServer>>>>);

impl ForkServers {
    /// The running server for `key`, if any.
    pub fn running(&self, key: &ServerKey) -> Option<Arc<ForkServer>> {
        self.0.lock().expect("fork servers lock").get(key).and_then(Weak::upgrade).filter(|s| !s.is_gone())
    }

    /// The running server for `key`, or the one `start` starts.
    pub fn get_or_start(&self, key: &ServerKey, start: impl FnOnce() -> std::io::Result<ForkServer>) -> std::io::Result<Arc<ForkServer>> {
        let mut servers = self.0.lock().expect("fork servers lock");
        if let Some(server) = servers.get(key).and_then(Weak::upgrade).filter(|s| !s.is_gone()) {
            return Ok(server);
        }
        let server = Arc::new(start()?);
        servers.retain(|_, s| s.strong_count() > 0);
        servers.insert(key.clone(), Arc::downgrade(&server));
        Ok(server)
    }
}

/// A running fork server.
pub struct ForkServer {
    pid: i32,
    /// The queue whose pool started it, for its log lines.
    label: String,
    requests: tokio::sync::Mutex<Option<UnixStream>>,
    channel: Arc<Mutex<Channel>>,
    ready: watch::Receiver<bool>,
}

impl ForkServer {
    /// Starts `cmd` (the script with `--fork-server`) as a fork server; its log lines are
    /// tagged with `label` (the queue that started it). `permit` (a start permit) is held
    /// until it is ready or gone.
    pub fn start(mut cmd: tokio::process::Command, label: &str, permit: Option<tokio::sync::OwnedSemaphorePermit>) -> std::io::Result<ForkServer> {
        let (ours, theirs) = UnixStream::pair()?;
        cmd.stdin(std::process::Stdio::from(OwnedFd::from(theirs)));
        // Dropping the server closes its requests; it outlives the handle until its
        // children are done, and is reaped by the runtime.
        cmd.kill_on_drop(false);
        let mut child = cmd.spawn()?;
        let pid = child.id().map_or(0, |p| p as i32);
        let channel = Arc::new(Mutex::new(Channel::default()));
        let (ready_tx, ready) = watch::channel(false);
        if let Some(err) = child.stderr.take() {
            log_lines(err, label.to_owned(), format!("fork server pid {pid}"), "stderr");
        }
        let stdout = child.stdout.take();
        let leashed = crate::leash::Leashed::new(child.id());
        let (queue_name, chan) = (label.to_owned(), channel.clone());
        tokio::spawn(async move {
            let mut permit = permit;
            if let Some(out) = stdout {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.starts_with("ready ") {
                        permit = None;
                        let _ = ready_tx.send(true);
                    } else if !chan.lock().expect("fork server channel").answer(&line) {
                        tracing::warn!(queue = %queue_name, pid, %line, "unexpected line from the Mailman fork server");
                    }
                }
            }
            drop(permit);
            {
                let mut ch = chan.lock().expect("fork server channel");
                ch.closed = true;
                for reply in ch.pending.drain(..) {
                    let _ = reply.send(Err("the fork server is gone".to_owned()));
                }
                ch.exits.clear();
            }
            let status = child.wait().await;
            drop(leashed);
            tracing::info!(queue = %queue_name, pid, status = ?status, "the Mailman fork server exited");
        });
        Ok(ForkServer { pid, label: label.to_owned(), requests: tokio::sync::Mutex::new(Some(ours)), channel, ready })
    }

    /// The server's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether it said `ready` (Mailman initialised).
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Whether it is gone.
    pub fn is_gone(&self) -> bool {
        self.channel.lock().expect("fork server channel").closed
    }

    /// The queue whose pool started it.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Forks a slice runner of Mailman runner `runner` for `queue`, once the server is
    /// ready.
    pub async fn fork(&self, runner: &str, queue: &str) -> std::io::Result<Forked> {
        let mut ready = self.ready.clone();
        let gone = || std::io::Error::other("the Mailman fork server is gone; see its log lines above");
        // The reader drops the sender when the server's stdout ends: gone.
        ready.wait_for(|r| *r).await.map_err(|_| gone())?;
        let requests = self.requests.lock().await;
        let socket = requests.as_ref().ok_or_else(gone)?;
        let (in_r, in_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (tx, rx) = oneshot::channel();
        {
            let mut ch = self.channel.lock().expect("fork server channel");
            if ch.closed {
                return Err(gone());
            }
            ch.pending.push_back(tx);
        }
        let request = format!("fork {runner} {queue}\n");
        let fds = [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
        if let Err(e) = sendmsg::<()>(socket.as_raw_fd(), &[IoSlice::new(request.as_bytes())], &[ControlMessage::ScmRights(&fds)], MsgFlags::MSG_NOSIGNAL, None) {
            // The server is gone (its reader fails the pending reply) or the socket broke.
            return Err(std::io::Error::other(format!("sending a fork request: {e}")));
        }
        drop((in_r, out_w, err_w));
        let (pid, exit) = match tokio::time::timeout(FORK_TIMEOUT, rx).await {
            Ok(Ok(Ok(answer))) => answer,
            Ok(Ok(Err(text))) => return Err(std::io::Error::other(text)),
            Ok(Err(_)) => return Err(gone()),
            Err(_) => {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), nix::sys::signal::Signal::SIGKILL);
                return Err(std::io::Error::other(format!("the Mailman fork server did not answer a fork within {FORK_TIMEOUT:?}; killed it")));
            }
        };
        drop(requests);
        Ok(Forked { pid, stdin: pipe::Sender::from_owned_fd(in_w)?, stdout: pipe::Receiver::from_owned_fd(out_r)?, stderr: pipe::Receiver::from_owned_fd(err_r)?, exit })
    }
}

impl Drop for ForkServer {
    fn drop(&mut self) {
        // EOF on its requests: it ends once its children have exited.
        if let Ok(mut requests) = self.requests.try_lock() {
            requests.take();
        }
    }
}

impl Channel {
    /// Applies one line of the server's (other than `ready`); false if it means nothing.
    fn answer(&mut self, line: &str) -> bool {
        let mut words = line.split_whitespace();
        match (words.next(), words.next().map(str::parse::<i32>), words.next()) {
            (Some("forked"), Some(Ok(pid)), None) => {
                let (tx, rx) = watch::channel(None);
                self.exits.insert(pid, tx);
                if let Some(reply) = self.pending.pop_front() {
                    let _ = reply.send(Ok((pid, rx)));
                }
                true
            }
            (Some("exited"), Some(Ok(pid)), Some(code)) => {
                if let (Some(tx), Ok(code)) = (self.exits.remove(&pid), code.parse::<i32>()) {
                    let _ = tx.send(Some(code));
                }
                true
            }
            (Some("error"), _, _) => {
                let text = line.trim_start_matches("error").trim().to_owned();
                if let Some(reply) = self.pending.pop_front() {
                    let _ = reply.send(Err(format!("the fork server refused: {text}")));
                }
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_go_to_requests_in_order_and_exits_to_their_children() {
        let mut ch = Channel::default();
        let (tx1, mut rx1) = oneshot::channel();
        let (tx2, mut rx2) = oneshot::channel();
        ch.pending.extend([tx1, tx2]);
        assert!(ch.answer("forked 100"));
        assert!(ch.answer("error bad fork request"));
        let (pid, mut exit) = rx1.try_recv().expect("first answered").expect("forked");
        assert_eq!(pid, 100);
        assert!(rx2.try_recv().expect("second answered").is_err(), "the error goes to the second request");
        assert!(ch.answer("exited 100 -9"));
        assert_eq!(*exit.borrow_and_update(), Some(-9));
        assert!(!ch.answer("exited 100"), "an exit without a code means nothing");
        assert!(!ch.answer("hello"));
    }
}
