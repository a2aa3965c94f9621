//! StorageClass parameters (docs/storageclass.md). Every key is known or an error: a typo must not silently give
//! a user something they did not ask for.

use std::collections::BTreeMap;

use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PvSource {
    /// A `local` PV: needs node affinity (Berth always sets it); fsGroup and raw block work.
    Local,
    /// A `hostPath` PV: no mount options, no fsGroup, no raw block.
    HostPath,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassParams {
    pub pool: String,
    pub pv_source: PvSource,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mode: Option<u32>,
    /// The filesystem an lvm pool makes on a Filesystem volume: `ext4` or `xfs` (the agent's default: ext4).
    pub fs_type: Option<String>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParamError {
    #[error("StorageClass parameter \"pool\" is required: the name of the pool to carve volumes from")]
    MissingPool,
    #[error("StorageClass parameter {key:?}: {why}")]
    Invalid { key: String, why: String },
    #[error("unknown StorageClass parameter {0:?} (known: pool, pvSource, uid, gid, mode, fsType)")]
    Unknown(String),
}

fn invalid(key: &str, why: impl Into<String>) -> ParamError {
    ParamError::Invalid { key: key.into(), why: why.into() }
}

pub fn parse(parameters: Option<&BTreeMap<String, String>>) -> Result<ClassParams, ParamError> {
    let empty = BTreeMap::new();
    let parameters = parameters.unwrap_or(&empty);
    let mut pool = None;
    let mut params = ClassParams {
        pool: String::new(),
        pv_source: PvSource::Local,
        uid: None,
        gid: None,
        mode: None,
        fs_type: None,
    };
    for (key, value) in parameters {
        match key.as_str() {
            "pool" => {
                berth::validate::pool_name(value).map_err(|e| invalid(key, e.to_string()))?;
                pool = Some(value.clone());
            }
            "pvSource" => {
                params.pv_source = match value.as_str() {
                    "local" => PvSource::Local,
                    "hostPath" => PvSource::HostPath,
                    other => return Err(invalid(key, format!("{other:?} is neither \"local\" nor \"hostPath\""))),
                }
            }
            "uid" | "gid" => {
                let id: u32 = value.parse().map_err(|_| invalid(key, format!("{value:?} is not a numeric id")))?;
                if key == "uid" { params.uid = Some(id) } else { params.gid = Some(id) }
            }
            "mode" => {
                let digits = value.strip_prefix("0o").or_else(|| value.strip_prefix('0')).unwrap_or(value);
                let mode = u32::from_str_radix(digits, 8)
                    .ok()
                    .filter(|m| *m & !0o2777 == 0 && !digits.is_empty())
                    .ok_or_else(|| {
                        invalid(key, format!("{value:?} is not an octal mode of at most 2777 (e.g. \"0770\")"))
                    })?;
                params.mode = Some(mode);
            }
            "fsType" => {
                if !["ext4", "xfs"].contains(&value.as_str()) {
                    return Err(invalid(key, format!("{value:?} is neither \"ext4\" nor \"xfs\"")));
                }
                params.fs_type = Some(value.clone());
            }
            _ => return Err(ParamError::Unknown(key.clone())),
        }
    }
    params.pool = pool.ok_or(ParamError::MissingPool)?;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Result<ClassParams, ParamError> {
        let map: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        parse(Some(&map))
    }

    #[test]
    fn pool_alone_gives_the_defaults() {
        let c = p(&[("pool", "nvme")]).unwrap();
        assert_eq!(
            c,
            ClassParams {
                pool: "nvme".into(),
                pv_source: PvSource::Local,
                uid: None,
                gid: None,
                mode: None,
                fs_type: None
            }
        );
    }

    #[test]
    fn every_parameter() {
        let c =
            p(&[("pool", "nvme"), ("pvSource", "hostPath"), ("uid", "999"), ("gid", "998"), ("mode", "2770")]).unwrap();
        assert_eq!((c.pv_source, c.uid, c.gid, c.mode), (PvSource::HostPath, Some(999), Some(998), Some(0o2770)));
        assert_eq!(p(&[("pool", "a"), ("mode", "0750")]).unwrap().mode, Some(0o750));
        assert_eq!(p(&[("pool", "a"), ("mode", "0o750")]).unwrap().mode, Some(0o750));
        assert_eq!(p(&[("pool", "a"), ("fsType", "xfs")]).unwrap().fs_type.as_deref(), Some("xfs"));
    }

    #[test]
    fn refuses_what_it_does_not_know_or_cannot_do() {
        assert_eq!(parse(None), Err(ParamError::MissingPool));
        assert_eq!(p(&[("pool", "a"), ("pooll", "b")]), Err(ParamError::Unknown("pooll".into())));
        for bad in [
            vec![("pool", "../etc")],
            vec![("pool", "")],
            vec![("pool", "a"), ("pvSource", "nfs")],
            vec![("pool", "a"), ("uid", "-1")],
            vec![("pool", "a"), ("gid", "root")],
            vec![("pool", "a"), ("mode", "4755")],
            vec![("pool", "a"), ("mode", "0999")],
            vec![("pool", "a"), ("mode", "")],
            vec![("pool", "a"), ("fsType", "btrfs")],
        ] {
            assert!(matches!(p(&bad), Err(ParamError::Invalid { .. })), "{bad:?} accepted");
        }
    }
}
