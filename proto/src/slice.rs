//! Slice math and queue file names, exactly as GNU Mailman computes them.
//!
//! A queue entry is named `<TIME>+<DIGEST>.<ext>`: TIME is a decimal float (seconds since
//! the epoch), DIGEST 40 lowercase hex digits of a SHA-1. For `n` slices and `D` the digest
//! read as a 160-bit integer, the entry belongs to slice `floor((n*D + n - 1) / 2^160)`.
//! This is the same partition as Mailman 2.1's `lower <= D <= upper` test with
//! `lower = floor(2^160 * s / n)` and `upper = floor(2^160 * (s + 1) / n) - 1`, and for
//! `n = 2^b` it is the top `b` bits of the digest (what Mailman 3 computes).

use std::fmt;
use std::str::FromStr;

use num_bigint::BigUint;

/// Length of a SHA-1 digest in bytes.
pub const DIGEST_LEN: usize = 20;

/// The largest slice count qslice accepts for a queue.
pub const MAX_SLICES: u32 = 65536;

/// A queue entry's SHA-1 digest, the key of the hash space that slices partition.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; DIGEST_LEN]);

impl Digest {
    /// The smallest digest (all zero bits).
    pub const MIN: Digest = Digest([0; DIGEST_LEN]);
    /// The largest digest (all one bits).
    pub const MAX: Digest = Digest([0xff; DIGEST_LEN]);

    /// Parses exactly 40 hex digits, of either case (as Mailman's `int(digest, 16)`).
    pub fn parse_hex(text: &str) -> Result<Digest, NameError> {
        if text.len() != 2 * DIGEST_LEN {
            return Err(NameError::DigestLength { len: text.len() });
        }
        // Mailman reads the digest with int(digest, 16): upper-case digits are served.
        if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(NameError::DigestNotHex);
        }
        let mut bytes = [0u8; DIGEST_LEN];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| NameError::DigestNotHex)?;
        Ok(Digest(bytes))
    }

    /// The digest as 40 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The digest as an arbitrary-precision integer.
    pub fn to_biguint(&self) -> BigUint {
        BigUint::from_bytes_be(&self.0)
    }

    /// The digest of an integer below 2^160; `None` when it does not fit.
    pub fn from_biguint(value: &BigUint) -> Option<Digest> {
        let bytes = value.to_bytes_be();
        if bytes.len() > DIGEST_LEN {
            return None;
        }
        let mut out = [0u8; DIGEST_LEN];
        out[DIGEST_LEN - bytes.len()..].copy_from_slice(&bytes);
        Some(Digest(out))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for Digest {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse_hex(s)
    }
}

/// The slice of `digest` among `n` slices: `floor((n*D + n - 1) / 2^160)`.
///
/// `n = 0` is treated as one slice (Mailman's "no slicing"). Computed with 64-bit limbs
/// because it runs once per queue entry per listing.
pub fn slice_of(digest: &Digest, n: u32) -> u32 {
    if n <= 1 {
        return 0;
    }
    let d = &digest.0;
    // D = d2 * 2^128 + d1 * 2^64 + d0, with d2 < 2^32.
    let d2 = u64::from(u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
    let d1 = u64::from_be_bytes([d[4], d[5], d[6], d[7], d[8], d[9], d[10], d[11]]);
    let d0 = u64::from_be_bytes([d[12], d[13], d[14], d[15], d[16], d[17], d[18], d[19]]);
    let n = u128::from(n);
    let t0 = n * u128::from(d0) + (n - 1);
    let t1 = n * u128::from(d1) + (t0 >> 64);
    let t2 = n * u128::from(d2) + (t1 >> 64);
    // t2 holds bits 128.. of n*D + n - 1; the slice is bits 160.., i.e. t2 >> 32.
    (t2 >> 32) as u32
}

/// The inclusive digest range of one slice, as Mailman 2.1 computes `lower` and `upper`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SliceBounds {
    /// The smallest digest in the slice.
    pub lower: Digest,
    /// The largest digest in the slice.
    pub upper: Digest,
}

/// The bounds of slice `s` among `n`; `None` when `n` is 0 or `s >= n`.
pub fn slice_bounds(s: u32, n: u32) -> Option<SliceBounds> {
    if n == 0 || s >= n {
        return None;
    }
    let space = BigUint::from(1u8) << 160u32;
    let lower = (&space * s) / n;
    let upper = (&space * (u64::from(s) + 1)) / n - 1u8;
    Some(SliceBounds { lower: Digest::from_biguint(&lower)?, upper: Digest::from_biguint(&upper)? })
}

/// Checks a slice count: 1 to [`MAX_SLICES`], and a power of two when `mailman3` is set.
pub fn validate_slice_count(n: u32, mailman3: bool) -> Result<(), SliceCountError> {
    if n == 0 || n > MAX_SLICES {
        return Err(SliceCountError::OutOfRange { n });
    }
    if mailman3 && !n.is_power_of_two() {
        return Err(SliceCountError::NotPowerOfTwo { n });
    }
    Ok(())
}

/// A slice count that qslice cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SliceCountError {
    /// Zero, or more than [`MAX_SLICES`].
    #[error("slices must be between 1 and {MAX_SLICES}, got {n}")]
    OutOfRange {
        /// The rejected count.
        n: u32,
    },
    /// Mailman 3 rejects slice counts that are not powers of two.
    #[error("a Mailman 3 queue needs a power-of-two slice count, got {n}")]
    NotPowerOfTwo {
        /// The rejected count.
        n: u32,
    },
}

/// Why a file name is not a queue entry name `<TIME>+<DIGEST>.<ext>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// No `+` between TIME and DIGEST (Mailman's own runner crashes on these).
    #[error("no '+' between time and digest")]
    MissingPlus,
    /// More than one `+`.
    #[error("more than one '+'")]
    ExtraPlus,
    /// Nothing before the `+`.
    #[error("empty time before '+'")]
    EmptyTime,
    /// TIME is not a plain decimal number such as `1490350277.837968`.
    #[error("time {time:?} is not a decimal number of seconds")]
    BadTime {
        /// The text found where TIME belongs.
        time: String,
    },
    /// No `.` extension after the digest.
    #[error("no extension after the digest")]
    MissingExtension,
    /// DIGEST is not 40 characters long.
    #[error("digest has {len} characters, expected 40 hex digits")]
    DigestLength {
        /// The length found.
        len: usize,
    },
    /// DIGEST holds characters other than hex digits (either case).
    #[error("digest is not hex")]
    DigestNotHex,
    /// The name is not valid UTF-8 (Mailman only writes ASCII names).
    #[error("name is not valid UTF-8")]
    NotUtf8,
}

/// A parsed queue file name.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryName {
    /// Seconds since the epoch, from TIME; orders entries FIFO within a slice.
    pub time: f64,
    /// The SHA-1 digest that decides the slice.
    pub digest: Digest,
    /// The file base `<TIME>+<DIGEST>` (the name without extension).
    pub filebase: String,
    /// Everything after the digest's `.`: `pck`, `bak`, `psv`, `pck.tmp`, ...
    pub ext: String,
}

/// A queue file name parsed in place ([`EntryName::peek`]): what a listing needs to know
/// of a name before it decides to keep it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NameParts<'a> {
    /// Seconds since the epoch, from TIME.
    pub time: f64,
    /// The SHA-1 digest that decides the slice.
    pub digest: Digest,
    /// The file base `<TIME>+<DIGEST>`.
    pub filebase: &'a str,
    /// Everything after the digest's `.`.
    pub ext: &'a str,
}

impl NameParts<'_> {
    /// The owned name.
    pub fn to_name(&self) -> EntryName {
        EntryName { time: self.time, digest: self.digest, filebase: self.filebase.to_owned(), ext: self.ext.to_owned() }
    }
}

impl EntryName {
    /// Parses `<TIME>+<DIGEST>.<ext>`.
    pub fn parse(name: &str) -> Result<EntryName, NameError> {
        EntryName::peek(name).map(|parts| parts.to_name())
    }

    /// Parses `<TIME>+<DIGEST>.<ext>` without allocating (for Mailman's own times): a
    /// listing decides from it whether the entry's slice is wanted at all.
    pub fn peek(name: &str) -> Result<NameParts<'_>, NameError> {
        let (time, rest) = name.split_once('+').ok_or(NameError::MissingPlus)?;
        if rest.contains('+') {
            return Err(NameError::ExtraPlus);
        }
        if time.is_empty() {
            return Err(NameError::EmptyTime);
        }
        let time_value = parse_time(time).ok_or_else(|| NameError::BadTime { time: time.to_owned() })?;
        let (digest, ext) = rest.split_once('.').ok_or(NameError::MissingExtension)?;
        if ext.is_empty() {
            return Err(NameError::MissingExtension);
        }
        let digest = Digest::parse_hex(digest)?;
        Ok(NameParts { time: time_value, digest, filebase: &name[..time.len() + 1 + 2 * DIGEST_LEN], ext })
    }

    /// Parses an OS file name, rejecting names that are not UTF-8.
    pub fn parse_os(name: &std::ffi::OsStr) -> Result<EntryName, NameError> {
        EntryName::parse(name.to_str().ok_or(NameError::NotUtf8)?)
    }

    /// The slice of this entry among `n`.
    pub fn slice(&self, n: u32) -> u32 {
        slice_of(&self.digest, n)
    }
}

/// Parses TIME as Mailman reads it: `float(when)`. Mailman writes `repr(time.time())`, but
/// its switchboard takes any name whose time part Python's `float()` accepts, so qslice
/// does too: surrounding whitespace, a sign, an exponent, `_` between digits, `inf` and
/// `nan`. Only ASCII digits are taken (Python also takes other Unicode digits, which no
/// Mailman writes). Such entries order by [`f64::total_cmp`].
fn parse_time(text: &str) -> Option<f64> {
    // What Mailman writes (digits with one `.`), at no allocation: it runs once per entry
    // per listing. Rust's grammar and Python's agree on these.
    let b = text.as_bytes();
    if b.iter().any(u8::is_ascii_digit) && b.iter().all(|c| c.is_ascii_digit() || *c == b'.') && b.iter().filter(|c| **c == b'.').count() <= 1 {
        return text.parse::<f64>().ok();
    }
    let text = text.trim();
    let bytes = text.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'_' {
            // Python allows `_` only between two digits.
            let digit_at = |j: Option<usize>| j.and_then(|j| bytes.get(j)).is_some_and(u8::is_ascii_digit);
            if !digit_at(i.checked_sub(1)) || !digit_at(Some(i + 1)) {
                return None;
            }
        }
    }
    let plain: String = text.chars().filter(|c| *c != '_').collect();
    let unsigned = plain.strip_prefix(['+', '-']).unwrap_or(&plain);
    // Past underscores, Rust's grammar is Python's but for the words it takes.
    let word = unsigned.to_ascii_lowercase();
    if unsigned.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) && !matches!(word.as_str(), "inf" | "infinity" | "nan") {
        return None;
    }
    plain.parse::<f64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The Mailman formula, computed with arbitrary precision: the oracle.
    fn mailman_slice(d: &Digest, n: u32) -> u32 {
        let n_big = BigUint::from(n);
        let v: BigUint = (&n_big * d.to_biguint() + &n_big - 1u8) >> 160u32;
        u32::try_from(v).expect("slice fits in u32")
    }

    /// Mailman 2.1's membership test `lower <= D <= upper`, with its own bound formulas.
    fn mailman21_in_slice(d: &Digest, s: u32, n: u32) -> bool {
        let space = BigUint::from(1u8) << 160u32;
        let lower = (&space * s) / n;
        let upper = (&space * (s + 1)) / n - 1u8;
        let v = d.to_biguint();
        lower <= v && v <= upper
    }

    fn digest() -> impl Strategy<Value = Digest> {
        prop_oneof![
            any::<[u8; 20]>().prop_map(Digest),
            // Near the edges of the space and of slices, where off-by-one errors live.
            (0u8..4, any::<u8>()).prop_map(|(top, low)| {
                let mut b = [if top % 2 == 0 { 0 } else { 0xff }; 20];
                b[19] = low;
                Digest(b)
            }),
        ]
    }

    fn slice_count() -> impl Strategy<Value = u32> {
        prop_oneof![1u32..=64, 1u32..=MAX_SLICES, Just(MAX_SLICES), (0u32..=16).prop_map(|b| 1 << b)]
    }

    const REAL_NAME: &str = "1490350277.837968+0696655d510e3bad34fee55513eec06ed9b3413c.pck";

    #[test]
    fn parses_a_real_mailman_name() {
        let name = EntryName::parse(REAL_NAME).expect("real name parses");
        assert_eq!(name.time, 1490350277.837968);
        assert_eq!(name.digest.to_hex(), "0696655d510e3bad34fee55513eec06ed9b3413c");
        assert_eq!(name.filebase, "1490350277.837968+0696655d510e3bad34fee55513eec06ed9b3413c");
        assert_eq!(name.ext, "pck");
    }

    #[test]
    fn an_upper_case_digest_is_an_entry_in_the_same_slice_as_mailman_computes() {
        // Mailman reads the digest with int(digest, 16), so it serves this name too.
        let upper = REAL_NAME.replace("0696655d510e3bad34fee55513eec06ed9b3413c", "0696655D510E3BAD34FEE55513EEC06ED9B3413C");
        let name = EntryName::parse(&upper).expect("upper-case digest parses");
        let lower = EntryName::parse(REAL_NAME).expect("real name parses");
        assert_eq!(name.digest, lower.digest);
        assert_eq!(name.filebase, upper.trim_end_matches(".pck"), "the name is kept as written");
        for n in [1, 2, 4, 8, 1024] {
            assert_eq!(name.slice(n), lower.slice(n));
        }
    }

    #[test]
    fn real_names_land_in_the_slices_mailman_computes() {
        // 0x06... is in the first sixteenth, so slice 0 of 4 and 0 of 16 but 6 of 256.
        let d = EntryName::parse(REAL_NAME).expect("parses").digest;
        assert_eq!(slice_of(&d, 1), 0);
        assert_eq!(slice_of(&d, 4), 0);
        assert_eq!(slice_of(&d, 256), 0x06);
        assert_eq!(slice_of(&d, 3), 0);
        let e = Digest::parse_hex("f3c2a40e1d0c6b1b6d4f13e9b8f1d2a3c4b5a697").expect("hex");
        assert_eq!(slice_of(&e, 4), 3);
        assert_eq!(slice_of(&e, 3), 2);
        assert_eq!(slice_of(&e, 256), 0xf3);
        for n in [1, 2, 3, 4, 5, 7, 8, 10, 16, 100, 256, 1000, MAX_SLICES] {
            assert_eq!(slice_of(&d, n), mailman_slice(&d, n), "n={n}");
            assert_eq!(slice_of(&e, n), mailman_slice(&e, n), "n={n}");
        }
    }

    #[test]
    fn extremes_of_the_hash_space() {
        for n in [1, 2, 3, 7, 64, MAX_SLICES, u32::MAX] {
            assert_eq!(slice_of(&Digest::MIN, n), 0);
            assert_eq!(slice_of(&Digest::MAX, n), n.max(1) - 1, "n={n}");
        }
        assert_eq!(slice_of(&Digest::MAX, 0), 0);
    }

    #[test]
    fn each_malformed_name_has_its_own_error() {
        let d = "0696655d510e3bad34fee55513eec06ed9b3413c";
        let cases: Vec<(String, NameError)> = vec![
            (format!("1490350277.8{d}.pck"), NameError::MissingPlus),
            (format!("1+2+{d}.pck"), NameError::ExtraPlus),
            (format!("+{d}.pck"), NameError::EmptyTime),
            (format!("abc+{d}.pck"), NameError::BadTime { time: "abc".into() }),
            (format!("1__0+{d}.pck"), NameError::BadTime { time: "1__0".into() }),
            (format!("1_.5+{d}.pck"), NameError::BadTime { time: "1_.5".into() }),
            (format!("0x10+{d}.pck"), NameError::BadTime { time: "0x10".into() }),
            // Mailman splits at the first `+`, so an exponent's own `+` ends the time part.
            (format!("1e+5+{d}.pck"), NameError::ExtraPlus),
            (format!("1e+{d}.pck"), NameError::BadTime { time: "1e".into() }),
            (format!("1+{d}"), NameError::MissingExtension),
            (format!("1+{d}."), NameError::MissingExtension),
            ("1+abc.pck".to_owned(), NameError::DigestLength { len: 3 }),
            (format!("1+{}g.pck", &d[..39]), NameError::DigestNotHex),
        ];
        for (name, want) in cases {
            assert_eq!(EntryName::parse(&name), Err(want), "{name}");
        }
        use std::os::unix::ffi::OsStrExt;
        let bad = std::ffi::OsStr::from_bytes(b"1+\xff.pck");
        assert_eq!(EntryName::parse_os(bad), Err(NameError::NotUtf8));
    }

    /// Python's `float()` verdict on each time part, as `python3 -c 'float(t)'` gives it.
    const PYTHON_FLOAT: &[(&str, Option<f64>)] = &[
        ("1490350277.837968", Some(1490350277.837968)),
        ("-1", Some(-1.0)),
        ("1e5", Some(100000.0)),
        ("1E-3", Some(0.001)),
        (".5", Some(0.5)),
        ("5.", Some(5.0)),
        ("1_000.5", Some(1000.5)),
        ("-7.5", Some(-7.5)),
        (" 12 ", Some(12.0)),
        ("inf", Some(f64::INFINITY)),
        ("-Infinity", Some(f64::NEG_INFINITY)),
        ("1__0", None),
        ("_1", None),
        ("1_", None),
        ("1._5", None),
        ("e5", None),
        (".", None),
        ("0x10", None),
        ("--1", None),
        ("1.2.3", None),
        ("infinit", None),
    ];

    #[test]
    fn a_time_part_is_an_entry_exactly_when_python_float_accepts_it() {
        let d = "0696655d510e3bad34fee55513eec06ed9b3413c";
        for (time, want) in PYTHON_FLOAT {
            let parsed = EntryName::parse(&format!("{time}+{d}.pck"));
            match want {
                Some(v) => assert_eq!(parsed.map(|n| n.time), Ok(*v), "{time:?}"),
                None => assert_eq!(parsed, Err(NameError::BadTime { time: (*time).to_owned() }), "{time:?}"),
            }
        }
        let nan = EntryName::parse(&format!("nan+{d}.pck")).expect("Python takes nan");
        assert!(nan.time.is_nan());
    }

    #[test]
    fn tmp_and_bak_names_keep_their_extension() {
        let d = "0696655d510e3bad34fee55513eec06ed9b3413c";
        assert_eq!(EntryName::parse(&format!("7+{d}.pck.tmp")).expect("parses").ext, "pck.tmp");
        assert_eq!(EntryName::parse(&format!("7+{d}.bak")).expect("parses").ext, "bak");
        assert_eq!(EntryName::parse(&format!("7+{d}.bak")).expect("parses").time, 7.0);
    }

    #[test]
    fn slice_counts_are_validated() {
        assert_eq!(validate_slice_count(0, false), Err(SliceCountError::OutOfRange { n: 0 }));
        assert_eq!(validate_slice_count(MAX_SLICES + 1, false), Err(SliceCountError::OutOfRange { n: MAX_SLICES + 1 }));
        assert_eq!(validate_slice_count(6, true), Err(SliceCountError::NotPowerOfTwo { n: 6 }));
        assert_eq!(validate_slice_count(6, false), Ok(()));
        assert_eq!(validate_slice_count(MAX_SLICES, true), Ok(()));
    }

    #[test]
    fn bounds_of_first_and_last_slice_touch_the_edges() {
        for n in [1, 2, 3, 10, MAX_SLICES] {
            assert_eq!(slice_bounds(0, n).expect("valid").lower, Digest::MIN);
            assert_eq!(slice_bounds(n - 1, n).expect("valid").upper, Digest::MAX);
            assert_eq!(slice_bounds(n, n), None);
        }
        assert_eq!(slice_bounds(0, 0), None);
    }

    proptest! {
        #[test]
        fn slice_of_equals_the_mailman_formula(d in digest(), n in slice_count()) {
            prop_assert_eq!(slice_of(&d, n), mailman_slice(&d, n));
        }

        #[test]
        fn slice_of_agrees_with_mailman21_bounds(d in digest(), n in slice_count()) {
            let s = slice_of(&d, n);
            prop_assert!(s < n);
            prop_assert!(mailman21_in_slice(&d, s, n));
            if s > 0 { prop_assert!(!mailman21_in_slice(&d, s - 1, n)); }
            if s + 1 < n { prop_assert!(!mailman21_in_slice(&d, s + 1, n)); }
        }

        #[test]
        fn power_of_two_slices_are_the_top_bits(d in digest(), b in 0u32..=16) {
            let top = u32::from_be_bytes([d.0[0], d.0[1], d.0[2], d.0[3]]);
            let want = if b == 0 { 0 } else { top >> (32 - b) };
            prop_assert_eq!(slice_of(&d, 1 << b), want);
        }

        #[test]
        fn slice_of_is_monotonic_in_the_digest(a in digest(), b in digest(), n in slice_count()) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(slice_of(&lo, n) <= slice_of(&hi, n));
        }

        #[test]
        fn slices_partition_the_space_without_gap_or_overlap(n in slice_count(), pick in any::<u32>()) {
            // Adjacent slices meet exactly: upper(s) + 1 == lower(s + 1), and every bound
            // maps back to its own slice. Together with the edges this is a partition.
            let s = pick % n;
            let bounds = slice_bounds(s, n).expect("s < n");
            prop_assert!(bounds.lower <= bounds.upper, "slice {} of {} is empty", s, n);
            prop_assert_eq!(slice_of(&bounds.lower, n), s);
            prop_assert_eq!(slice_of(&bounds.upper, n), s);
            if s + 1 < n {
                let next = slice_bounds(s + 1, n).expect("s + 1 < n");
                prop_assert_eq!(bounds.upper.to_biguint() + 1u8, next.lower.to_biguint());
            }
            if s > 0 {
                let below = Digest::from_biguint(&(bounds.lower.to_biguint() - 1u8)).expect("fits");
                prop_assert_eq!(slice_of(&below, n), s - 1);
            }
        }

        #[test]
        fn names_round_trip(time in 0u64..4_000_000_000, frac in 0u32..1_000_000, d in digest()) {
            let name = format!("{time}.{frac:06}+{}.pck", d.to_hex());
            let parsed = EntryName::parse(&name).expect("generated names parse");
            prop_assert_eq!(parsed.digest, d);
            prop_assert_eq!(parsed.ext, "pck");
        }
    }
}
