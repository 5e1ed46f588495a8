//! A loopback TCP proxy to etcd that can delay or lose etcd's replies.
//!
//! Contract: bytes from a client to etcd are always forwarded at once, so every request
//! reaches etcd and commits. Bytes from etcd to a client follow the [`ProxyMode`] in force
//! when they arrive at the proxy: passed on, passed on `N` ms later (in order), or
//! discarded; a connection that lost a reply is closed `close_after` later, so the client
//! reconnects (a lost reply leaves its HTTP/2 stream broken for good). The proxy runs on
//! a tokio runtime of its own thread, so sync and async tests use it alike; it stops,
//! closing every connection, when the [`EtcdProxy`] is dropped.

use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What happens to bytes from etcd to its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forwarded at once.
    Pass,
    /// Forwarded this much later, in order.
    Delay(Duration),
    /// Discarded; the connection is closed `close_after` after the first discarded byte.
    DropReplies {
        /// How long a connection that lost a reply stays open.
        close_after: Duration,
    },
}

/// What the proxy did since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyCounters {
    /// Client connections accepted.
    pub connections: u64,
    /// Bytes forwarded from clients to etcd.
    pub bytes_to_etcd: u64,
    /// Bytes forwarded from etcd to clients.
    pub bytes_to_clients: u64,
    /// Bytes from etcd forwarded late ([`ProxyMode::Delay`]).
    pub bytes_delayed: u64,
    /// Bytes from etcd discarded ([`ProxyMode::DropReplies`]).
    pub bytes_dropped: u64,
    /// Connections closed because they lost a reply.
    pub connections_cut: u64,
}

/// The counters, updated by the connection tasks.
#[derive(Debug, Default)]
struct AtomicCounters {
    connections: AtomicU64,
    bytes_to_etcd: AtomicU64,
    bytes_to_clients: AtomicU64,
    bytes_delayed: AtomicU64,
    bytes_dropped: AtomicU64,
    connections_cut: AtomicU64,
}

/// What the handle and the connection tasks share.
#[derive(Debug)]
struct Shared {
    /// The mode in force; read for every chunk from etcd.
    mode: Mutex<ProxyMode>,
    /// What happened so far.
    counters: AtomicCounters,
    /// The etcd client URL's address.
    upstream: SocketAddr,
}

impl Shared {
    fn mode(&self) -> ProxyMode {
        *self.mode.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No loopback port could be bound.
    #[error("bind a loopback port: {0}")]
    Bind(#[source] io::Error),
    /// The runtime or its thread could not be started.
    #[error("start the proxy runtime: {0}")]
    Runtime(#[source] io::Error),
}

/// A running proxy; stopped on drop.
#[derive(Debug)]
pub struct EtcdProxy {
    /// The loopback address clients connect to.
    addr: SocketAddr,
    /// Shared with the connection tasks.
    shared: Arc<Shared>,
    /// Cancelled on drop: ends the accept loop and every connection.
    stop: CancellationToken,
    /// The runtime's thread; joined on drop.
    thread: Option<JoinHandle<()>>,
}

impl EtcdProxy {
    /// Starts a proxy on a free loopback port to `upstream`, in [`ProxyMode::Pass`].
    pub fn start(upstream: SocketAddr) -> Result<EtcdProxy, ProxyError> {
        let listener = StdTcpListener::bind("127.0.0.1:0").map_err(ProxyError::Bind)?;
        listener.set_nonblocking(true).map_err(ProxyError::Bind)?;
        let addr = listener.local_addr().map_err(ProxyError::Bind)?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ProxyError::Runtime)?;
        let shared = Arc::new(Shared { mode: Mutex::new(ProxyMode::Pass), counters: AtomicCounters::default(), upstream });
        let stop = CancellationToken::new();
        let (task_shared, task_stop) = (Arc::clone(&shared), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("etcd-proxy-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => accept_loop(listener, task_shared, task_stop).await,
                        Err(e) => eprintln!("etcd proxy on {addr}: {e}"),
                    }
                });
                // Connection tasks still running end here, closing their sockets.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(ProxyError::Runtime)?;
        Ok(EtcdProxy { addr, shared, stop, thread: Some(thread) })
    }

    /// The client URL to give etcd clients, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The loopback address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches the mode for bytes from etcd that arrive from now on.
    pub fn set(&self, mode: ProxyMode) {
        *self.shared.mode.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = mode;
    }

    /// The mode in force.
    pub fn mode(&self) -> ProxyMode {
        self.shared.mode()
    }

    /// What the proxy did so far.
    pub fn counters(&self) -> ProxyCounters {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyCounters {
            connections: get(&c.connections),
            bytes_to_etcd: get(&c.bytes_to_etcd),
            bytes_to_clients: get(&c.bytes_to_clients),
            bytes_delayed: get(&c.bytes_delayed),
            bytes_dropped: get(&c.bytes_dropped),
            connections_cut: get(&c.connections_cut),
        }
    }
}

impl Drop for EtcdProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else { continue };
        add(&shared.counters.connections, 1);
        let (shared, connection_stop) = (Arc::clone(&shared), stop.child_token());
        tokio::spawn(async move {
            tokio::select! {
                () = connection_stop.cancelled() => {}
                () = relay(client, &shared, &connection_stop) => {}
            }
        });
    }
}

/// Relays one client connection until either side closes or `cut` is cancelled.
async fn relay(client: TcpStream, shared: &Arc<Shared>, cut: &CancellationToken) {
    let Ok(upstream) = TcpStream::connect(shared.upstream).await else { return };
    let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();

    let to_etcd = async {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = client_read.read(&mut buf).await {
            if upstream_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
            add(&shared.counters.bytes_to_etcd, n);
        }
        let _ = upstream_write.shutdown().await;
    };

    // Chunks from etcd go through a queue with the time each may be written, so a delay
    // never reorders bytes: the writer takes them in order and sleeps until each is due.
    let (queue, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = async {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if client_write.write_all(&chunk).await.is_err() {
                break;
            }
            add(&shared.counters.bytes_to_clients, chunk.len());
        }
        let _ = client_write.shutdown().await;
    };
    let from_etcd = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut cut_armed = false;
        while let Ok(n @ 1..) = upstream_read.read(&mut buf).await {
            match shared.mode() {
                ProxyMode::Pass => {
                    let _ = queue.send((Instant::now(), buf[..n].to_vec()));
                }
                ProxyMode::Delay(delay) => {
                    add(&shared.counters.bytes_delayed, n);
                    let _ = queue.send((Instant::now() + delay, buf[..n].to_vec()));
                }
                ProxyMode::DropReplies { close_after } => {
                    add(&shared.counters.bytes_dropped, n);
                    if !cut_armed {
                        cut_armed = true;
                        let (cut, shared) = (cut.clone(), Arc::clone(shared));
                        tokio::spawn(async move {
                            tokio::time::sleep(close_after).await;
                            if !cut.is_cancelled() {
                                add(&shared.counters.connections_cut, 1);
                                cut.cancel();
                            }
                        });
                    }
                }
            }
        }
        drop(queue);
    };
    tokio::join!(to_etcd, async { tokio::join!(from_etcd, writer) });
}
