//! The lvm2 report parser (`backend::lvm2::parse_lvs`, `parse_vgs`) and the classification of lvm2's stderr
//! (`classify`): what the agent believes about an lvm pool comes only through them.
//!
//! Properties: none of them panics on any text; a report they accept is read faithfully — the same rows in the same
//! order as the JSON holds them (checked against serde_json's own reading of the text), every byte count the
//! number written, a usage percentage present only when written, and then finite and within 0–100 (a NaN or
//! negative usage would slip past the thin pool's threshold) — and a volume group lvm2 says is missing is named
//! as stderr names it.
#![no_main]

use berth_agent::backend::lvm2::{LvmError, classify, parse_lvs, parse_vgs};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The rows of every section's `key` array, as serde_json reads them; `None` where serde took an array for a
/// struct (its positional form, which lvm2 never writes: not compared field by field).
fn rows<'a>(report: &'a Value, key: &str) -> Option<Vec<&'a Value>> {
    let sections = report.as_object()?.get("report")?.as_array()?;
    let mut rows = Vec::new();
    for section in sections {
        for row in section.as_object()?.get(key).and_then(Value::as_array).into_iter().flatten() {
            rows.push(row.as_object().map(|_| row)?);
        }
    }
    Some(rows)
}

fn text<'a>(row: &'a Value, field: &str) -> &'a str {
    row[field].as_str().unwrap_or_else(|| panic!("accepted without {field} as a string: {row}"))
}

fn count(row: &Value, field: &str) -> u64 {
    text(row, field).parse().unwrap_or_else(|_| panic!("{field} accepted but not a byte count: {row}"))
}

fuzz_target!(|data: &[u8]| {
    let input = String::from_utf8_lossy(data);
    check_lvs(&input);
    check_vgs(&input);
    // The same text as an lvm2 command's stderr, with each exit code that matters.
    for code in [0, 3, 5] {
        if let LvmError::VgNotFound(vg) = classify("lvs", code, &input) {
            assert!(input.contains(&format!("Volume group \"{vg}")), "{vg:?} not named in {input:?}");
        }
    }
});

/// The document as serde_json's Value, to compare the parser's reading with. None for the one kind of JSON Value
/// cannot hold: a number beyond f64's range (`1e4444`), which the parser skips untouched where it ignores a field
/// (serde's IgnoredAny); the fuzzer found one in a field parse_lvs does not read. Anything else the parser accepted
/// must be JSON.
fn as_value(input: &str, parser: &str) -> Option<Value> {
    match serde_json::from_str(input) {
        Ok(json) => Some(json),
        Err(e) if e.to_string().starts_with("number out of range") => None,
        Err(e) => panic!("{parser} accepted what is not JSON: {e}"),
    }
}

fn check_lvs(input: &str) {
    let Ok(lvs) = parse_lvs(input) else { return };
    let Some(json) = as_value(input, "parse_lvs") else { return };
    let Some(raw) = rows(&json, "lv") else { return };
    assert_eq!(lvs.len(), raw.len(), "{input}");
    for (lv, raw) in lvs.iter().zip(raw) {
        assert_eq!(lv.name, text(raw, "lv_name"));
        assert_eq!(lv.vg, text(raw, "vg_name"));
        assert_eq!(lv.size, count(raw, "lv_size"));
        assert_eq!((lv.path.as_str(), lv.dm_path.as_str()), (text(raw, "lv_path"), text(raw, "lv_dm_path")));
        assert_eq!(lv.active, text(raw, "lv_active") == "active");
        assert_eq!((lv.pool_lv.as_str(), lv.origin.as_str()), (text(raw, "pool_lv"), text(raw, "origin")));
        let tags: Vec<&str> = text(raw, "lv_tags").split(',').filter(|t| !t.is_empty()).collect();
        assert_eq!(lv.tags, tags);
        for (field, read) in [("data_percent", lv.data_percent), ("metadata_percent", lv.metadata_percent)] {
            assert_eq!(read.is_none(), text(raw, field).is_empty(), "{field}: {raw}");
            if let Some(p) = read {
                assert!(p.is_finite() && (0.0..=100.0).contains(&p), "{field} {:?} read as {p}", text(raw, field));
            }
        }
    }
}

fn check_vgs(input: &str) {
    let Ok(vgs) = parse_vgs(input) else { return };
    let Some(json) = as_value(input, "parse_vgs") else { return };
    let Some(raw) = rows(&json, "vg") else { return };
    assert_eq!(vgs.len(), raw.len(), "{input}");
    for (vg, raw) in vgs.iter().zip(raw) {
        assert_eq!(vg.name, text(raw, "vg_name"));
        assert_eq!((vg.size, vg.free), (count(raw, "vg_size"), count(raw, "vg_free")));
        assert_eq!(vg.extent_size, count(raw, "vg_extent_size"));
    }
}
