//! mailman.cfg is a site's file, written by hand: the runner reads a runner's `instances`
//! from it and the config path and runner name from a supervised command line. Neither may
//! panic on anything; a file without the runner's section means Mailman's default, 1.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qslice_proto::mailman::{mailman3_instances, mailman3_target};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (runner, cfg) = text.split_once('\n').unwrap_or(("in", &text));
    let instances = mailman3_instances(cfg, runner);
    if !cfg.to_ascii_lowercase().contains("[runner.") {
        assert_eq!(instances, 1, "no runner section: Mailman's default");
    }
    let argv: Vec<String> = text.split('\0').map(str::to_owned).collect();
    let _ = mailman3_target(&argv);
});
