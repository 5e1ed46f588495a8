//! The etcd proxy: with a real etcd, a put whose reply is dropped or delayed has still
//! committed, which is the "unknown outcome" qslice must handle.

mod common;

use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::Etcd;
use etcd_client::{Client, ConnectOptions};
use qslice_testbeds::proxy::{EtcdProxy, ProxyMode};

async fn connect(endpoint: &str) -> Result<Client> {
    let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(5));
    Client::connect([endpoint], Some(options)).await.with_context(|| format!("connect to {endpoint}"))
}

async fn value(client: &mut Client, key: &str) -> Result<Option<Vec<u8>>> {
    let reply = client.get(key, None).await?;
    Ok(reply.kvs().first().map(|kv| kv.value().to_vec()))
}

/// Polls `key` in etcd every 20 ms until it has a value, for at most `timeout`.
async fn wait_for_value(client: &mut Client, key: &str, timeout: Duration) -> Result<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = value(client, key).await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{key} did not appear in etcd within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_whose_reply_is_dropped_times_out_yet_commits() -> Result<()> {
    let etcd = Etcd::start()?;
    let proxy = EtcdProxy::start(etcd.addr())?;
    let mut direct = connect(&etcd.endpoint()).await?;
    let mut proxied = connect(&proxy.endpoint()).await?;
    proxied.put("warmup", "1", None).await.context("a put through the proxy in Pass mode")?;

    // The connection is cut only after the client gave up, so the put times out.
    proxy.set(ProxyMode::DropReplies { close_after: Duration::from_secs(2) });
    let put = tokio::time::timeout(Duration::from_secs(1), proxied.put("unknown-outcome", "committed", None)).await;
    assert!(put.is_err(), "the client must time out, not learn the outcome: {put:?}");
    assert_eq!(value(&mut direct, "unknown-outcome").await?.as_deref(), Some(&b"committed"[..]), "yet it committed");
    let counters = proxy.counters();
    assert!(counters.bytes_dropped > 0, "{counters:?}");

    // The connection that lost a reply is closed; with replies passed again the client
    // reconnects.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while proxy.counters().connections_cut == 0 {
        if tokio::time::Instant::now() >= deadline {
            bail!("the proxy did not cut the connection: {:?}", proxy.counters());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.set(ProxyMode::Pass);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout(Duration::from_secs(2), proxied.put("after", "1", None)).await {
            Ok(Ok(_)) => break,
            _ if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => bail!("the client did not get through again: {other:?}"),
        }
    }
    let counters = proxy.counters();
    assert!(counters.connections >= 2, "the client reconnected: {counters:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_reply_arrives_after_the_put_has_committed() -> Result<()> {
    let etcd = Etcd::start()?;
    let proxy = EtcdProxy::start(etcd.addr())?;
    let mut direct = connect(&etcd.endpoint()).await?;
    let mut proxied = connect(&proxy.endpoint()).await?;
    proxied.put("warmup", "1", None).await?;

    let delay = Duration::from_secs(3);
    proxy.set(ProxyMode::Delay(delay));
    let mut client = proxied.clone();
    let started = tokio::time::Instant::now();
    let put = tokio::spawn(async move { client.put("late", "v", None).await.map(|_| started.elapsed()) });
    wait_for_value(&mut direct, "late", Duration::from_secs(10)).await?;
    // The key is in etcd while the client still waits for its reply.
    assert!(!put.is_finished(), "the reply was not delayed");

    let took = tokio::time::timeout(delay + Duration::from_secs(20), put).await.context("the delayed reply")???;
    assert!(took >= delay, "the put returned after {took:?}, before the {delay:?} delay");
    assert!(proxy.counters().bytes_delayed > 0);
    proxy.set(ProxyMode::Pass);
    proxied.put("prompt", "1", None).await.context("Pass again")?;
    Ok(())
}

#[test]
fn the_proxy_works_from_sync_code_and_stops_on_drop() -> Result<()> {
    let etcd = Etcd::start()?;
    let proxy = EtcdProxy::start(etcd.addr())?;
    let addr = proxy.addr();
    let mut probe = std::net::TcpStream::connect(addr)?;
    use std::io::{Read, Write};
    probe.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut reply = String::new();
    probe.read_to_string(&mut reply)?;
    assert!(reply.contains("\"health\":\"true\""), "{reply}");
    drop(proxy);
    assert!(std::net::TcpStream::connect(addr).is_err(), "nothing listens after drop");
    Ok(())
}
