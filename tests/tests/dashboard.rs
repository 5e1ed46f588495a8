//! The coordinator's dashboard on a real cluster (etcd, a coordinator with `--http-addr`,
//! two runners, a queue): `/api/status` and the other HTTP endpoints over plain HTTP, and
//! the page itself drawn by headless Chromium (skipped, with a message, when
//! `/usr/bin/chromium` is not installed). Killing a runner must show in both: its node
//! leaves the map, its slices turn to the survivor, and the failover is on the timeline.
//! With the admin API's protections configured the endpoint honours them: the read token
//! for `/api/status` (the page asks for it), and TLS for all of it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use qslice_tests::cluster::{holdings, Spool};
use qslice_tests::testcluster::TestCluster;
use qslice_tests::wait::Wait;
use qslice_tests::{free_port, wait_for, wait_for_async, Proc};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);
/// Where Debian's chromium package puts the browser; `QSLICE_TEST_CHROMIUM` overrides it.
const CHROMIUM: &str = "/usr/bin/chromium";
const SLICES: u32 = 8;
/// The runners' lease TTL in the test cluster ([`qslice_tests::cluster::start_runner_at`]).
const RUNNER_TTL_MS: i64 = 2_000;
/// How far below the TTL a killed runner's idle time may come out: none is expected (it
/// is the time unowned plus the TTL), a little for rounding.
const IDLE_MARGIN_MS: i64 = 100;

/// `GET path` over HTTP/1.0: the status code and the body.
fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    http_get_as(addr, path, None)
}

/// The request of [`http_get`], with `Authorization: Bearer <token>` if given.
fn request(addr: &str, path: &str, token: Option<&str>) -> String {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n")
}

/// The status code and body of an HTTP reply.
fn parse_reply(reply: &str) -> Result<(u16, String)> {
    let code = reply.split_whitespace().nth(1).and_then(|c| c.parse().ok()).with_context(|| format!("no HTTP status line in {reply:?}"))?;
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((code, body))
}

/// [`http_get`] sending a bearer token.
fn http_get_as(addr: &str, path: &str, token: Option<&str>) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request(addr, path, token).as_bytes())?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes)?;
    parse_reply(&String::from_utf8_lossy(&bytes))
}

/// `GET path` over HTTPS with `openssl s_client`, trusting only `ca` and checking that
/// the certificate is for 127.0.0.1.
fn https_get(addr: &str, path: &str, ca: &str) -> Result<(u16, String)> {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", addr, "-CAfile", ca, "-verify_return_error", "-verify_ip", "127.0.0.1", "-quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run openssl s_client")?;
    child.stdin.take().context("stdin")?.write_all(request(addr, path, None).as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() && out.stdout.is_empty() {
        bail!("openssl s_client failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    parse_reply(&String::from_utf8_lossy(&out.stdout))
}

/// `/api/status` as JSON, if it answers 200.
fn api_status(addr: &str) -> Option<Value> {
    match http_get(addr, "/api/status") {
        Ok((200, body)) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

/// Owner of each slice of `queue` in an `/api/status` answer ("" for unowned).
fn owners(status: &Value, queue: &str) -> BTreeMap<u64, String> {
    let mut out = BTreeMap::new();
    for q in status["queues"].as_array().into_iter().flatten().filter(|q| q["name"] == queue) {
        for c in q["cells"].as_array().into_iter().flatten() {
            out.insert(c["slice"].as_u64().unwrap_or(u64::MAX), c["claim_holder"].as_str().unwrap_or_default().to_owned());
        }
    }
    out
}

fn node_ids(status: &Value) -> Vec<String> {
    status["nodes"].as_array().into_iter().flatten().filter_map(|n| n["id"].as_str().map(str::to_owned)).collect()
}

/// A running cluster with the dashboard on `http`.
struct Demo {
    tc: TestCluster,
    http: String,
}

/// etcd, a coordinator serving HTTP on a free port, runners r1 and r2, and queue `in`
/// with 8 slices, balanced 4 and 4.
async fn demo() -> Demo {
    let tc = TestCluster::builder().queue("in", SLICES).coordinators(1).dashboards().runners(&["r1", "r2"]).start().await.expect("cluster");
    let c = tc.client();
    wait_for_async(LONG, "4 slices claimed by each runner", || async {
        let h = holdings(&mut c.clone(), "t", "in").await;
        h.len() == 2 && h.values().all(|v| v.len() == 4)
    })
    .await
    .expect("balanced");
    let http = tc.coordinator("c1").http.clone().expect("a dashboard");
    Demo { tc, http }
}

impl Demo {
    /// Kills r1 with SIGKILL and waits until r2 holds every slice in etcd.
    async fn kill_r1(&mut self) {
        self.tc.runner_mut("r1").kill();
        let c = self.tc.client();
        wait_for_async(LONG, "r2 to hold all 8 slices", || async { holdings(&mut c.clone(), "t", "in").await.get("r2").is_some_and(|v| v.len() == SLICES as usize) })
            .await
            .expect("takeover");
    }
}

#[tokio::test]
async fn api_status_shows_the_owners_and_a_dead_runners_failover() {
    let mut d = demo().await;
    let mut status = None;
    wait_for(LONG, "/api/status to show 4 slices owned by each runner", || {
        status = api_status(&d.http);
        status.as_ref().is_some_and(|s| {
            let o = owners(s, "in");
            o.len() == SLICES as usize && ["r1", "r2"].iter().all(|r| o.values().filter(|v| v == r).count() == 4)
        })
    })
    .expect("map");
    let status = status.expect("set");
    assert_eq!(status["cluster"], "t");
    assert_eq!(status["leader"], "c1");
    assert_eq!(node_ids(&status), vec!["r1", "r2"]);
    let cell = &status["queues"][0]["cells"][0];
    for field in ["depth", "oldest_entry_age_seconds", "unowned_seconds", "epoch"] {
        assert!(cell[field].is_number(), "cell field {field} missing: {cell}");
    }
    let r1_slices: Vec<u64> = owners(&status, "in").into_iter().filter(|(_, o)| o == "r1").map(|(s, _)| s).collect();

    let (code, page) = http_get(&d.http, "/").expect("page");
    assert_eq!(code, 200);
    assert!(page.contains("/api/status"), "the page polls /api/status");
    for outside in ["src=\"http", "href=\"http", "@import", "url(http"] {
        assert!(!page.contains(outside), "the page loads something from outside ({outside})");
    }
    assert_eq!(http_get(&d.http, "/healthz").expect("healthz").0, 200);
    assert_eq!(http_get(&d.http, "/readyz").expect("readyz").0, 200, "the only coordinator leads");
    let (_, metrics) = http_get(&d.http, "/metrics").expect("metrics");
    assert!(metrics.contains("qslice_coordinator_is_leader 1"), "metrics: {metrics}");

    d.kill_r1().await;
    let mut after = None;
    wait_for(LONG, "/api/status to show r2 owning every slice and r1 gone", || {
        after = api_status(&d.http);
        after.as_ref().is_some_and(|s| owners(s, "in").values().all(|o| o == "r2") && node_ids(s) == vec!["r2"])
    })
    .expect("map follows the takeover");
    let after = after.expect("set");
    // Each of r1's slices is on the timeline as a failover to r2 with its time unowned and
    // the time it processed nothing: from r1's last keepalive (its lease expired), so at
    // least the TTL.
    let failovers = after["failovers"].as_array().expect("failovers");
    for s in &r1_slices {
        let f = failovers.iter().find(|f| f["slice"].as_u64() == Some(*s) && f["from"] == "r1").unwrap_or_else(|| panic!("no failover of slice {s} from r1 in {failovers:?}"));
        assert_eq!((f["to"].as_str(), f["cause"].as_str()), (Some("r2"), Some("failover")), "{f}");
        let unowned = f["unowned_ms"].as_i64().expect("unowned_ms");
        assert!((0..LONG.as_millis() as i64).contains(&unowned), "{f}");
        assert_eq!(f["idle_from"], "last_keepalive", "a kill -9 ends the claim with the lease: {f}");
        assert_eq!(f["idle_basis"], "lease expired; from last keepalive to new claim", "{f}");
        assert!(f["lease_ttl_ms"].as_i64().is_some_and(|t| t >= RUNNER_TTL_MS), "r1's lease TTL: {f}");
        let idle = f["idle_ms"].as_i64().expect("idle_ms");
        assert!(idle >= RUNNER_TTL_MS - IDLE_MARGIN_MS && idle >= unowned && idle < LONG.as_millis() as i64, "idle time of a kill -9 at TTL 2 s: {f}");
        assert_eq!(f["stopped_unix_ms"].as_i64().map(|s| f["claimed_unix_ms"].as_i64().unwrap_or(0) - s), Some(idle), "{f}");
    }
    let events = after["events"].as_array().expect("events");
    assert!(events.iter().any(|e| e["kind"] == "node_left" && e["node"] == "r1"), "no node_left for r1: {events:?}");
    assert!(events.iter().any(|e| e["kind"] == "slice_orphaned" && e["node"] == "r1"), "no slice_orphaned for r1");
}

#[test]
fn before_etcd_answers_healthz_serves_and_api_status_says_503() {
    let spool = Spool::new(&["in"]).expect("spool");
    let http = format!("127.0.0.1:{}", free_port().expect("port"));
    let admin = format!("127.0.0.1:{}", free_port().expect("port"));
    // Nothing listens there: the coordinator keeps waiting for etcd.
    let no_etcd = format!("http://127.0.0.1:{}", free_port().expect("port"));
    let args = ["--id", "c0", "--cluster", "t", "--etcd-endpoints", &no_etcd, "--http-addr", &http, "--admin-addr", &admin];
    let _co = Proc::spawn(&qslice_tests::qslice_bin("qslice-coordinator").expect("binary"), &args, &[], &spool.scratch("c0.log")).expect("coordinator");
    wait_for(LONG, "/healthz to answer 200", || http_get(&http, "/healthz").is_ok_and(|(c, _)| c == 200)).expect("healthz");
    let (code, body) = http_get(&http, "/api/status").expect("api");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not connected to etcd"), "{body}");
    assert_eq!(http_get(&http, "/readyz").expect("readyz").0, 503, "not the leader");
}

/// Loads `url` in headless Chromium, lets the page run for a few (virtual) seconds, and
/// returns the DOM. Chromium runs in its own process group, killed if it hangs.
fn dump_dom(chromium: &Path, url: &str, profile: &Path) -> Result<String> {
    let mut child = Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        .args(["--disable-sync", "--no-first-run", "--disable-crash-reporter", "--virtual-time-budget=4000"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("start chromium")?;
    let mut out = child.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let exited = Wait::new(LONG, "chromium to finish").every(Duration::from_millis(50)).poll(|| Ok(child.try_wait()?));
    let status = match exited {
        Ok(status) => status,
        Err(e) => {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            return Err(e);
        }
    };
    let dom = reader.join().unwrap_or_default();
    if !status.success() {
        bail!("chromium exited with {status}");
    }
    Ok(dom)
}

/// The values of attribute `attr` on every element whose opening tag starts with `open`.
fn attrs(dom: &str, open: &str, attr: &str) -> Vec<String> {
    let needle = format!("{attr}=\"");
    dom.match_indices(open)
        .filter_map(|(i, _)| {
            let tag = &dom[i..i + dom[i..].find('>')?];
            let start = tag.find(&needle)? + needle.len();
            Some(tag[start..start + tag[start..].find('"')?].to_owned())
        })
        .collect()
}

#[tokio::test]
async fn chromium_draws_the_slice_map_and_follows_a_takeover() {
    let chromium = std::env::var_os("QSLICE_TEST_CHROMIUM").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(CHROMIUM));
    if !chromium.exists() {
        eprintln!("SKIPPED: {} is not installed (apt-get install chromium); the dashboard's JSON is tested without it", chromium.display());
        return;
    }
    let mut d = demo().await;
    let url = format!("http://{}/", d.http);
    let profile = tempfile::Builder::new().prefix("qslice-chromium-").tempdir().expect("profile dir");
    let mut dom = String::new();
    wait_for(LONG, "the page to draw 8 cells, 4 owned by each runner", || {
        dom = dump_dom(&chromium, &url, profile.path()).unwrap_or_default();
        let owners = attrs(&dom, "<div class=\"cell", "data-owner");
        owners.len() == SLICES as usize && ["r1", "r2"].iter().all(|r| owners.iter().filter(|o| o == r).count() == 4)
    })
    .unwrap_or_else(|e| panic!("{e}; last DOM:\n{dom}"));
    assert!(dom.contains("<body data-state=\"live\""), "the page did not reach the live state");
    assert_eq!(attrs(&dom, "<span class=\"node\" data-node", "data-node"), vec!["r1", "r2"]);
    assert!(dom.contains("leader <b id=\"leader\">c1</b>"), "leader not shown");

    d.kill_r1().await;
    wait_for(LONG, "the page to show r2 owning every slice, r1 gone and a failover on the timeline", || {
        dom = dump_dom(&chromium, &url, profile.path()).unwrap_or_default();
        let owners = attrs(&dom, "<div class=\"cell", "data-owner");
        owners.len() == SLICES as usize
            && owners.iter().all(|o| o == "r2")
            && attrs(&dom, "<span class=\"node\" data-node", "data-node") == vec!["r2"]
            && attrs(&dom, "<li class=\"failover\"", "data-cause").len() == 4
    })
    .unwrap_or_else(|e| panic!("{e}; last DOM:\n{dom}"));
    assert!(dom.contains("r1 → r2: idle "), "the failover line names both nodes and the idle time");
    assert!(dom.contains("(lease expired; from last keepalive to new claim; unowned "), "the idle time says what it counts");
    // The failovers' idle times (a loaded start may add hand-offs, r1 having claimed every
    // slice before r2 registered; theirs are short, as they should be).
    let idle: Vec<i64> =
        dom.split("<li class=\"failover\"").skip(1).filter_map(|item| attrs(item, "<b data-idle-ms", "data-idle-ms").first().and_then(|v| v.parse().ok())).collect();
    assert!(idle.len() == 4 && idle.iter().all(|i| *i >= RUNNER_TTL_MS - IDLE_MARGIN_MS), "failover idle times on the page: {idle:?}");
}

#[tokio::test]
async fn with_reads_protected_api_status_needs_the_admin_token_and_the_page_asks_for_it() {
    let tc = TestCluster::builder()
        .queue("in", 2)
        .coordinators(1)
        .coordinator_args(&["--admin-token", "tok", "--admin-protect-reads", "true"])
        .dashboards()
        .runners(&["r1"])
        .start()
        .await
        .expect("cluster");
    let http = tc.coordinator("c1").http.clone().expect("a dashboard");
    wait_for(LONG, "/api/status with the token to show both slices owned by r1", || {
        http_get_as(&http, "/api/status", Some("tok"))
            .ok()
            .filter(|(code, _)| *code == 200)
            .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
            .is_some_and(|s| owners(&s, "in").values().filter(|o| *o == "r1").count() == 2)
    })
    .expect("status with the token");
    let (code, body) = http_get(&http, "/api/status").expect("no token");
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("bearer token") && !body.contains("\"cells\""), "no data without the token: {body}");
    let (code, body) = http_get_as(&http, "/api/status", Some("nope")).expect("wrong token");
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("not accepted"), "{body}");
    // Probes and Prometheus need no token; the page holds no data and asks for the token.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(http_get(&http, path).expect(path).0, 200, "{path} stays open");
    }
    let (code, page) = http_get(&http, "/").expect("page");
    assert_eq!(code, 200);
    assert!(page.contains("id=\"login-token\"") && page.contains("Authorization"), "the page asks for the token and sends it");

    let chromium = std::env::var_os("QSLICE_TEST_CHROMIUM").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(CHROMIUM));
    if !chromium.exists() {
        eprintln!("SKIPPED (page part): {} is not installed", chromium.display());
        return;
    }
    let profile = tempfile::Builder::new().prefix("qslice-chromium-").tempdir().expect("profile dir");
    let dom = dump_dom(&chromium, &format!("http://{http}/"), profile.path()).expect("page without the token");
    assert!(dom.contains("<body data-state=\"login\""), "without the token the page asks for it:\n{dom}");
    assert!(attrs(&dom, "<div class=\"cell", "data-owner").is_empty(), "no cells without the token");
    let mut dom = String::new();
    wait_for(LONG, "the page given the token to draw both slices owned by r1", || {
        dom = dump_dom(&chromium, &format!("http://{http}/#token=tok"), profile.path()).unwrap_or_default();
        dom.contains("<body data-state=\"live\"") && attrs(&dom, "<div class=\"cell", "data-owner") == vec!["r1", "r1"]
    })
    .unwrap_or_else(|e| panic!("{e}; last DOM:\n{dom}"));
}

#[tokio::test]
async fn with_admin_tls_configured_the_endpoint_answers_over_https_only() {
    let spool = Spool::new(&["in"]).expect("spool");
    let pki = qslice_tests::pki::Pki::generate(&spool.scratch("pki"), "qslice-test-ca").expect("certificates");
    let (cert, key, ca) = (pki.path("server.pem"), pki.path("server.key"), pki.path("ca.pem"));
    let tc = TestCluster::builder()
        .spool(spool)
        .queue("in", 2)
        .coordinators(1)
        .coordinator_args(&["--admin-tls-cert", &cert, "--admin-tls-key", &key])
        .dashboards()
        .runners(&["r1"])
        .start()
        .await
        .expect("cluster");
    let http = tc.coordinator("c1").http.clone().expect("a dashboard");
    let mut last = None;
    wait_for(LONG, "/api/status over HTTPS to show both slices owned by r1", || {
        last = Some(https_get(&http, "/api/status", &ca));
        last.as_ref()
            .and_then(|r| r.as_ref().ok())
            .filter(|(code, _)| *code == 200)
            .and_then(|(_, body)| serde_json::from_str::<Value>(body).ok())
            .is_some_and(|s| s["cluster"] == "t" && owners(&s, "in").values().filter(|o| *o == "r1").count() == 2)
    })
    .unwrap_or_else(|e| panic!("{e}; last answer: {last:?}"));
    for path in ["/", "/healthz", "/readyz", "/metrics"] {
        assert_eq!(https_get(&http, path, &ca).expect(path).0, 200, "{path} over HTTPS");
    }
    // Plain HTTP gets no answer: the first bytes are no TLS handshake.
    for path in ["/api/status", "/healthz"] {
        let plain = http_get(&http, path);
        assert!(plain.is_err(), "{path} answered over plain HTTP: {plain:?}");
    }
    // A client that does not trust the coordinator's CA does not get through.
    let other = qslice_tests::pki::Pki::generate(&tc.spool().scratch("other-pki"), "some-other-ca").expect("certificates");
    assert!(https_get(&http, "/healthz", &other.path("ca.pem")).is_err(), "a certificate from an untrusted CA was accepted");
}
