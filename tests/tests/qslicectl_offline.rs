//! qslicectl's offline tools, run as the real binary.

use std::process::Command;

use qslice_common::spool::QueueDir;
use qslice_tests::qslice_bin;

fn qslicectl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(qslice_bin("qslicectl").expect("built")).args(args).output().expect("run qslicectl");
    (out.status.code().expect("exited"), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn slice_of_prints_mailman_slices_and_fails_on_a_bad_name() {
    let name = "1490350277.837968+0696655d510e3bad34fee55513eec06ed9b3413c.pck";
    let (code, out, _) = qslicectl(&["slice-of", "--slices", "256", name]);
    assert_eq!(code, 0);
    assert_eq!(out, format!("6\t{name}\n"));

    let (code, out, err) = qslicectl(&["slice-of", "--slices", "4", name, "no-plus.pck"]);
    assert_eq!(code, 1, "a bad name is an error");
    assert_eq!(out, format!("0\t{name}\n"), "good names are still printed");
    assert!(err.contains("no-plus.pck") && err.contains("'+'"), "{err}");

    let (code, _, err) = qslicectl(&["slice-of", "--slices", "0", name]);
    assert_eq!(code, 1);
    assert!(err.contains("--slices"), "{err}");

    let (code, _, _) = qslicectl(&["slice-of", "--bogus"]);
    assert_eq!(code, 2, "usage errors exit 2");
}

#[test]
fn spool_stats_reports_per_slice_counts_as_table_and_json() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(tmp.path().join("in")).expect("mkdir");
    let q = QueueDir::new(tmp.path(), "in");
    for slice in [0, 3, 3] {
        q.enqueue_in_slice(b"m", slice, 4).expect("enqueue");
    }
    let dir = tmp.path().join("in");
    let dir = dir.to_str().expect("utf8 path");
    let (code, out, _) = qslicectl(&["spool", "stats", dir, "--slices", "4"]);
    assert_eq!(code, 0);
    assert!(out.contains("4 slices, 3 pending, 0 in flight"), "{out}");

    let (code, out, _) = qslicectl(&["--json", "spool", "stats", dir, "--slices", "4"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let pending: Vec<u64> = v["per_slice"].as_array().expect("rows").iter().map(|r| r["pending"].as_u64().expect("n")).collect();
    assert_eq!(pending, vec![1, 0, 0, 2]);

    let (code, _, err) = qslicectl(&["spool", "stats", "/nonexistent/in", "--slices", "4"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/in"), "{err}");
}
