//! `berth::quantity`: the sizes of StorageClass-less claims, PVs and the agent's config (`capacity = "100Gi"`).
//!
//! Properties: `bytes` never panics; what it accepts formats back to the same bytes (`format` then `bytes`); a plain
//! integer or an integer with a binary suffix reads as integer arithmetic says; a decimal point never makes a size
//! smaller than its integer part (rounded up, never down); and every `u64` survives `format` then `bytes`.
#![no_main]

use berth::quantity::{bytes, format};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Any eight bytes are a byte count: its quantity reads back as itself.
    if let Some(n) = data.get(..8) {
        let n = u64::from_le_bytes(n.try_into().unwrap());
        assert_eq!(bytes(&format(n)), Ok(n), "format({n}) = {:?}", format(n));
    }
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(n) = bytes(text) else { return };
    assert_eq!(bytes(&format(n)), Ok(n), "{text:?} read as {n}, formatted as {:?}", format(n));

    let t = text.trim().strip_prefix('+').unwrap_or(text.trim());
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (int, rest) = t.split_at(digits_end);
    let int_value: Option<u128> = if int.is_empty() { Some(0) } else { int.parse().ok() };
    let shift = |suffix: &str| match suffix {
        "" => Some(0),
        "Ki" => Some(10),
        "Mi" => Some(20),
        "Gi" => Some(30),
        "Ti" => Some(40),
        "Pi" => Some(50),
        "Ei" => Some(60),
        _ => None,
    };
    if let (Some(v), Some(s)) = (int_value, shift(rest)) {
        assert_eq!(u128::from(n), v << s, "{text:?}");
    }
    // "<int>.<fraction><suffix>": at least the integer part times the suffix, at most one unit of the suffix more.
    if let (Some(v), Some((_, after_point))) = (int_value, rest.split_once('.')) {
        let suffix_start = after_point.find(|c: char| !c.is_ascii_digit()).unwrap_or(after_point.len());
        if let Some(s) = shift(&after_point[suffix_start..]) {
            let n = u128::from(n);
            assert!(n >= v << s && n <= (v + 1) << s, "{text:?} read as {n}");
        }
    }
});
