//! What qslice reads of a Mailman 3 site besides its spool: the runner command line it
//! supervises, and `[runner.<name>] instances` in mailman.cfg. mailman.cfg is written by
//! hand, so the reader takes any text (it is fuzzed: tests/fuzz).

use std::path::PathBuf;

/// For a Mailman 3 command (`runner -C mailman.cfg -r in:{slice}:{slices}`): the config
/// path and runner name it names, if it names both.
pub fn mailman3_target(command: &[String]) -> Option<(PathBuf, String)> {
    let mut cfg = None;
    let mut runner = None;
    let mut args = command.iter().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-C" | "--config" => cfg = args.next().map(PathBuf::from),
            "-r" | "--runner" => runner = args.next().map(|r| r.split(':').next().unwrap_or_default().to_owned()),
            other => {
                if let Some(v) = other.strip_prefix("--config=") {
                    cfg = Some(PathBuf::from(v));
                } else if let Some(v) = other.strip_prefix("--runner=") {
                    runner = Some(v.split(':').next().unwrap_or_default().to_owned());
                }
            }
        }
    }
    Some((cfg?, runner?))
}

/// Reads `[runner.<name>] instances` from a mailman.cfg (INI, `key: value` or `key = value`);
/// Mailman's default is 1.
pub fn mailman3_instances(text: &str, runner: &str) -> u32 {
    let section = format!("[runner.{runner}]");
    let mut inside = false;
    let mut instances = 1;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = line.eq_ignore_ascii_case(&section);
            continue;
        }
        if !inside || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some((key, value)) = line.split_once([':', '=']) {
            if key.trim() == "instances" {
                instances = value.trim().parse().unwrap_or(0);
            }
        }
    }
    instances
}
