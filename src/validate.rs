//! Validation of names that reach the filesystem or the API. Everything an HTTP request or a StorageClass names
//! passes through here before it is used in a path.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum InvalidName {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} characters long; at most {max}")]
    TooLong { what: &'static str, len: usize, max: usize },
    #[error(
        "{what} {value:?} is not a DNS-1123 label (lowercase letters, digits and '-', starting and ending with a \
         letter or digit)"
    )]
    NotDns1123Label { what: &'static str, value: String },
    #[error("{what} {value:?} is not a DNS-1123 subdomain (DNS-1123 labels joined by '.')")]
    NotDns1123Subdomain { what: &'static str, value: String },
}

/// A volume name: a DNS-1123 label of at most 63 characters (`pvc-<uid>` is 40). This excludes `/`, `..`, NUL,
/// upper case, dots and anything non-ASCII, so a valid name is always one plain path component.
pub fn volume_name(name: &str) -> Result<(), InvalidName> {
    dns1123_label("volume name", name, 63)
}

/// A pool name: a DNS-1123 label of at most 63 characters (it also becomes a label value and part of object
/// names).
pub fn pool_name(name: &str) -> Result<(), InvalidName> {
    dns1123_label("pool name", name, 63)
}

/// A claim's namespace, as the API server allows it: a DNS-1123 label.
pub fn namespace(name: &str) -> Result<(), InvalidName> {
    dns1123_label("claim namespace", name, 63)
}

/// A claim's name, as the API server allows it: a DNS-1123 subdomain of at most 253 characters. (It goes into
/// LVM tags, whose characters are fewer than a Kubernetes name could otherwise hold.)
pub fn claim_name(name: &str) -> Result<(), InvalidName> {
    let what = "claim name";
    if name.len() > 253 {
        return Err(InvalidName::TooLong { what, len: name.len(), max: 253 });
    }
    dns1123_label(what, name, 253).or_else(|e| match e {
        InvalidName::NotDns1123Label { .. } if name.split('.').all(|l| dns1123_label(what, l, 253).is_ok()) => Ok(()),
        InvalidName::NotDns1123Label { value, .. } => Err(InvalidName::NotDns1123Subdomain { what, value }),
        other => Err(other),
    })
}

fn dns1123_label(what: &'static str, value: &str, max: usize) -> Result<(), InvalidName> {
    if value.is_empty() {
        return Err(InvalidName::Empty { what });
    }
    if value.len() > max {
        return Err(InvalidName::TooLong { what, len: value.len(), max });
    }
    let bytes = value.as_bytes();
    let inner_ok = bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    let ends_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !inner_ok || !ends_ok(bytes[0]) || !ends_ok(bytes[bytes.len() - 1]) {
        return Err(InvalidName::NotDns1123Label { what, value: value.to_owned() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_volume_names_of_the_pvc_uid_form() {
        volume_name("pvc-0f8e3c1a-5b2d-4c7e-9a10-2b3c4d5e6f70").unwrap();
        volume_name("a").unwrap();
        volume_name(&"a".repeat(63)).unwrap();
    }

    #[test]
    fn claim_names_are_subdomains_and_namespaces_labels() {
        claim_name("data-db-0").unwrap();
        claim_name("data.db.0").unwrap();
        claim_name(&"a".repeat(253)).unwrap();
        for bad in ["", "Data", "data_0", "data/0", "data..0", ".data", "data.", "dàta", &"a".repeat(254)] {
            assert!(claim_name(bad).is_err(), "{bad:?}");
        }
        namespace("db").unwrap();
        for bad in ["", "d.b", "DB", &"a".repeat(64)] {
            assert!(namespace(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn refuses_hostile_names() {
        let long = "a".repeat(300);
        for bad in [
            "",
            "..",
            ".",
            "a/b",
            "../etc",
            "/etc",
            "a\0b",
            "pvc-é",
            "PVC-1",
            "-a",
            "a-",
            "a.b",
            " a",
            "a b",
            &long,
            "ｐｖｃ",
            "a\nb",
        ] {
            assert!(volume_name(bad).is_err(), "{bad:?} was accepted");
            assert!(pool_name(bad).is_err(), "{bad:?} was accepted as a pool name");
        }
        assert_eq!(volume_name(&long), Err(InvalidName::TooLong { what: "volume name", len: 300, max: 63 }));
        assert_eq!(volume_name(""), Err(InvalidName::Empty { what: "volume name" }));
    }
}
