//! TLS to etcd: runner and coordinator with a CA, a client certificate and key work
//! against an etcd that requires client certificates; a wrong CA fails with an error that
//! says so.

use std::time::Duration;

use qslice_tests::cluster::{claims, Spool};
use qslice_tests::etcd_cluster::{ClientTls, EtcdCluster};
use qslice_tests::pki::Pki;
use qslice_tests::testcluster::{Ready, TestCluster};
use qslice_tests::wait_for;
use qslice_tests::wait_for_async;

const LONG: Duration = Duration::from_secs(60);

async fn tls_client(endpoints: Vec<String>, pki: &Pki) -> etcd_client::Client {
    let read = |f: &str| std::fs::read(pki.path(f)).expect("read pem");
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read("ca.pem")))
        .identity(etcd_client::Identity::from_pem(read("client.pem"), read("client.key")));
    let options = etcd_client::ConnectOptions::new().with_tls(tls).with_timeout(Duration::from_secs(5));
    etcd_client::Client::connect(endpoints, Some(options)).await.expect("tls client")
}

#[tokio::test]
async fn runner_and_coordinator_speak_tls_with_client_certificates_and_a_wrong_ca_is_named() {
    let spool = Spool::new(&["in"]).expect("spool");
    let pki = Pki::generate(&spool.scratch("pki"), "qslice-etcd-ca").expect("certificates");
    let other = Pki::generate(&spool.scratch("other"), "some-other-ca").expect("certificates");
    let tls = ClientTls { ca: pki.path("ca.pem"), cert: pki.path("server.pem"), key: pki.path("server.key") };
    let etcd = EtcdCluster::start(1, Some(tls)).expect("etcd with TLS");
    let endpoints = etcd.endpoints_flag();
    assert!(endpoints.starts_with("https://"));
    let (ca, cert, key) = (pki.path("ca.pem"), pki.path("client.pem"), pki.path("client.key"));
    let tls_flags = ["--etcd-ca", &ca, "--etcd-cert", &cert, "--etcd-key", &key];
    // The queue is written over TLS; the runners below bring their own flags.
    let mut tc = TestCluster::builder()
        .etcd_endpoints(&endpoints)
        .client(tls_client(etcd.endpoints(), &pki).await)
        .spool(spool.clone())
        .queue("in", 2)
        .coordinators(1)
        .coordinator_args(&tls_flags)
        .runner_with("r1", &tls_flags, &[])
        .ready(Ready::Claimed)
        .start()
        .await
        .expect("cluster over TLS");
    let mut c = tc.client();
    wait_for_async(LONG, "the runner claims both slices over TLS", || async { claims(&mut c.clone(), "t", "in").await.is_ok_and(|m| m.len() == 2) }).await.expect("claimed");
    let name = spool.queue("in").enqueue(b"m").expect("enqueue").filebase;
    wait_for_async(LONG, "the entry processed", || async { spool.finished().contains_key(&name) }).await.expect("processed");

    let wrong_ca = other.path("ca.pem");
    let wrong = ["--etcd-ca", &wrong_ca, "--etcd-cert", &cert, "--etcd-key", &key];
    let bad = tc.start_runner_with("r2", &wrong, &[]).expect("runner with the wrong CA");
    wait_for(LONG, "the runner to name the certificate problem", || bad.log().contains("not signed by the CA")).unwrap_or_else(|e| panic!("{e}:\n{}", bad.log()));
    let no_cert = tc.start_runner_with("r3", &["--etcd-ca", &ca], &[]).expect("runner without a client certificate");
    wait_for(LONG, "the runner without a client certificate to report etcd unreachable", || no_cert.log().contains("etcd is unreachable")).expect("refused");
    assert!(!claims(&mut c, "t", "in").await.expect("claims").values().any(|(n, _)| n == "r2" || n == "r3"));
}
