//! qslicectl's offline tools: they read names and spool directories, need no coordinator
//! and change nothing.

use std::path::{Path, PathBuf};

use qslice_common::spool::{QueueDir, SpoolError};
use qslice_proto::slice::{validate_slice_count, EntryName, NameError, SliceCountError};
use serde::Serialize;

/// An offline tool's failure.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// A slice count out of range.
    #[error("--slices: {0}")]
    SliceCount(#[from] SliceCountError),
    /// The directory is not a queue directory with a parent.
    #[error("{0} does not name a queue directory")]
    NotAQueueDir(PathBuf),
    /// Listing the spool failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// The slice of one queue file name or path.
#[derive(Debug, Serialize)]
pub struct SliceOf {
    /// The name or path as given.
    pub input: String,
    /// The slice, when the name parsed.
    pub slice: Option<u32>,
    /// Why the name did not parse.
    pub error: Option<String>,
}

/// The slice of each name (a path's last component is used) among `n` slices.
pub fn slice_of_names(names: &[String], n: u32) -> Result<Vec<SliceOf>, OfflineError> {
    validate_slice_count(n, false)?;
    Ok(names
        .iter()
        .map(|input| {
            let file_name = Path::new(input).file_name().map(|f| f.to_os_string()).unwrap_or_default();
            let parsed: Result<EntryName, NameError> = EntryName::parse_os(&file_name);
            match parsed {
                Ok(name) => SliceOf { input: input.clone(), slice: Some(name.slice(n)), error: None },
                Err(e) => SliceOf { input: input.clone(), slice: None, error: Some(e.to_string()) },
            }
        })
        .collect())
}

/// Per-slice figures of one queue directory.
#[derive(Debug, Serialize)]
pub struct SpoolStats {
    /// The queue directory.
    pub dir: PathBuf,
    /// The slice count used.
    pub slices: u32,
    /// One row per slice, every slice included.
    pub per_slice: Vec<SliceRow>,
    /// Total `.pck` entries.
    pub pending: u64,
    /// Total `.bak` entries.
    pub in_flight: u64,
    /// Files that are not entries, with the reason.
    pub problems: Vec<ProblemRow>,
}

/// Figures of one slice.
#[derive(Debug, Serialize)]
pub struct SliceRow {
    /// The slice number.
    pub slice: u32,
    /// `.pck` entries waiting.
    pub pending: u64,
    /// `.bak` entries in flight (or left by a crash).
    pub in_flight: u64,
    /// Age in seconds of the oldest waiting entry, from its name's TIME.
    pub oldest_age_seconds: Option<f64>,
}

/// A file that is not an entry.
#[derive(Debug, Serialize)]
pub struct ProblemRow {
    /// The file.
    pub path: PathBuf,
    /// Why it is not an entry.
    pub reason: String,
}

/// Lists `dir` once and counts its entries per slice among `n`. Read-only.
pub fn spool_stats(dir: &Path, n: u32) -> Result<SpoolStats, OfflineError> {
    validate_slice_count(n, false)?;
    let (Some(root), Some(queue)) = (dir.parent(), dir.file_name().and_then(|q| q.to_str())) else {
        return Err(OfflineError::NotAQueueDir(dir.to_owned()));
    };
    let scan = QueueDir::new(root, queue).scan(n)?;
    let count = |m: &std::collections::BTreeMap<u32, Vec<_>>, s: u32| m.get(&s).map_or(0, |v: &Vec<_>| v.len() as u64);
    let per_slice: Vec<SliceRow> =
        (0..n).map(|s| SliceRow { slice: s, pending: count(&scan.pending, s), in_flight: count(&scan.in_flight, s), oldest_age_seconds: scan.oldest_age(s) }).collect();
    Ok(SpoolStats {
        dir: dir.to_owned(),
        slices: n,
        pending: per_slice.iter().map(|r| r.pending).sum(),
        in_flight: per_slice.iter().map(|r| r.in_flight).sum(),
        per_slice,
        problems: scan.problems.iter().map(|p| ProblemRow { path: p.path.clone(), reason: p.reason.to_string() }).collect(),
    })
}

/// The stats as a table: non-empty slices only, then totals and problem files.
pub fn render_spool_stats(stats: &SpoolStats) -> String {
    let mut out = format!("{:>6}  {:>8}  {:>9}  {:>12}\n", "SLICE", "PENDING", "IN-FLIGHT", "OLDEST-AGE");
    for row in stats.per_slice.iter().filter(|r| r.pending > 0 || r.in_flight > 0) {
        let age = row.oldest_age_seconds.map_or_else(|| "-".to_owned(), format_age);
        out.push_str(&format!("{:>6}  {:>8}  {:>9}  {:>12}\n", row.slice, row.pending, row.in_flight, age));
    }
    out.push_str(&format!("{} slices, {} pending, {} in flight in {}\n", stats.slices, stats.pending, stats.in_flight, stats.dir.display()));
    for p in &stats.problems {
        out.push_str(&format!("not an entry: {}: {}\n", p.path.display(), p.reason));
    }
    out
}

/// A duration in seconds as `42s`, `3m05s` or `2h10m`.
pub fn format_age(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qslice_proto::slice::Digest;

    #[test]
    fn slice_of_reads_names_and_paths_and_reports_bad_ones() {
        let names = vec![
            "1490350277.837968+0696655d510e3bad34fee55513eec06ed9b3413c.pck".to_owned(),
            "/var/lib/mailman/qfiles/in/1+f000000000000000000000000000000000000000.bak".to_owned(),
            "garbage".to_owned(),
        ];
        let rows = slice_of_names(&names, 4).expect("valid count");
        assert_eq!(rows[0].slice, Some(0));
        assert_eq!(rows[1].slice, Some(3));
        assert_eq!(rows[2].slice, None);
        assert!(rows[2].error.as_deref().expect("error").contains('+'));
        assert!(slice_of_names(&names, 0).is_err());
    }

    #[test]
    fn spool_stats_count_per_slice_without_changing_anything() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(tmp.path().join("in")).expect("mkdir");
        let q = QueueDir::new(tmp.path(), "in");
        let lo = Digest::parse_hex("1000000000000000000000000000000000000000").expect("hex");
        let hi = Digest::parse_hex("f000000000000000000000000000000000000000").expect("hex");
        q.enqueue_as(100.0, &lo, b"a").expect("enqueue");
        q.enqueue_as(200.0, &lo, b"b").expect("enqueue");
        q.enqueue_as(300.0, &hi, b"c").expect("enqueue");
        std::fs::write(tmp.path().join("in/junk"), b"x").expect("write");
        let stats = spool_stats(&tmp.path().join("in"), 2).expect("stats");
        assert_eq!((stats.per_slice[0].pending, stats.per_slice[1].pending), (2, 1));
        assert_eq!(stats.pending, 3);
        assert_eq!(stats.problems.len(), 1);
        let age0 = stats.per_slice[0].oldest_age_seconds.expect("age");
        let age1 = stats.per_slice[1].oldest_age_seconds.expect("age");
        assert!((age0 - age1 - 200.0).abs() < 1.0, "oldest of slice 0 is TIME 100: {age0} vs {age1}");
        assert!(tmp.path().join("in/junk").exists(), "stats move nothing");
        let table = render_spool_stats(&stats);
        assert!(table.contains("2 slices, 3 pending, 0 in flight"), "{table}");
        assert!(table.contains("not an entry"), "{table}");
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(format_age(5.2), "5s");
        assert_eq!(format_age(185.0), "3m05s");
        assert_eq!(format_age(7800.0), "2h10m");
    }
}
