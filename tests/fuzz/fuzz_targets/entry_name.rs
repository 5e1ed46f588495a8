//! Queue entry names come from whatever is in a shared directory: any bytes. The parser
//! must never panic, and what it accepts must put back together into the same name.
#![no_main]

use std::os::unix::ffi::OsStrExt;

use libfuzzer_sys::fuzz_target;
use qslice_proto::slice::EntryName;

fuzz_target!(|data: &[u8]| {
    let Ok(name) = EntryName::parse_os(std::ffi::OsStr::from_bytes(data)) else {
        return;
    };
    let text = std::str::from_utf8(data).expect("only UTF-8 names parse");
    assert_eq!(format!("{}.{}", name.filebase, name.ext), text, "the parts make the name");
    for n in [1, 2, 3, 7, 64, 1024] {
        assert!(name.slice(n) < n, "slice of {text:?} among {n}");
    }
});
