//! Names every component derives the same way.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("claim uid {0:?} is not a UID (lowercase hex digits and hyphens, 36 characters)")]
    NotAUid(String),
}

/// The volume name (= PV name) for a claim: `pvc-<claim uid>`. Deterministic, so that a PV that already exists
/// for a claim is found again after a crash instead of being created twice.
pub fn volume_name(claim_uid: &str) -> Result<String, NameError> {
    let is_uid = claim_uid.len() == 36
        && claim_uid.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        });
    if is_uid { Ok(format!("pvc-{claim_uid}")) } else { Err(NameError::NotAUid(claim_uid.to_owned())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_name_is_pvc_dash_uid() {
        assert_eq!(
            volume_name("0f8e3c1a-5b2d-4c7e-9a10-2b3c4d5e6f70").unwrap(),
            "pvc-0f8e3c1a-5b2d-4c7e-9a10-2b3c4d5e6f70"
        );
    }

    #[test]
    fn volume_name_refuses_what_is_not_a_uid() {
        for bad in [
            "",
            "../../etc",
            "0F8E3C1A-5B2D-4C7E-9A10-2B3C4D5E6F70",
            "0f8e3c1a-5b2d-4c7e-9a10-2b3c4d5e6f7",
            "0f8e3c1a-5b2d-4c7e-9a10/2b3c4d5e6f70",
            "0f8e3c1a_5b2d-4c7e-9a10-2b3c4d5e6f70",
        ] {
            assert_eq!(volume_name(bad), Err(NameError::NotAUid(bad.to_owned())), "{bad:?}");
        }
    }
}
