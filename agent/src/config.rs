//! The agent's configuration file (TOML): which pools this node has. Documented in docs/agent-config.md, example
//! in deploy/agent-config.example.toml.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    #[serde(rename = "pool", default)]
    pub pools: Vec<PoolConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Hostpath,
    Lvm,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PoolConfig {
    pub name: String,
    pub backend: BackendKind,
    /// Absolute path of the pool's root directory: the volumes' directories (hostpath pools) or their mount
    /// points (lvm pools).
    pub root: PathBuf,
    /// Hand out at most this much of the disk (bytes, or a quantity like "100Gi").
    #[serde(default, deserialize_with = "de_opt_quantity")]
    pub capacity: Option<u64>,
    /// Never promise the last this-much of the filesystem (default 0).
    #[serde(default, deserialize_with = "de_quantity")]
    pub headroom: u64,
    /// lvm pools: the volume group volumes are carved from (made by the administrator).
    #[serde(default)]
    pub volume_group: Option<String>,
    /// lvm pools: a thin pool in that volume group; volumes are then thin volumes.
    #[serde(default)]
    pub thin_pool: Option<String>,
    /// Thin pools: promise at most the thin pool's size times this (default 1.0: no overprovisioning).
    #[serde(default)]
    pub overprovision_ratio: Option<f64>,
    /// Thin pools: no new volumes once the thin pool's data usage reaches this percentage (default 90).
    #[serde(default)]
    pub thin_data_threshold: Option<f64>,
    /// lvm pools: lvm2 configuration given to every lvm2 command with `--config` (e.g.
    /// `activation { udev_sync = 0 udev_rules = 0 }` where no udev runs).
    #[serde(default)]
    pub lvm_config: Option<String>,
    /// lvm pools: seconds each lvm2, mkfs, mount or resize command may run (default 60; zeroing a thick LV gets
    /// this plus its size at 10 MiB/s). One that runs longer is left running, never killed, and the pool answers
    /// 503 "busy" naming it until it exits.
    #[serde(default)]
    pub command_timeout_seconds: Option<u64>,
}

pub const DEFAULT_OVERPROVISION_RATIO: f64 = 1.0;
pub const DEFAULT_THIN_DATA_THRESHOLD: f64 = 90.0;
pub const DEFAULT_COMMAND_TIMEOUT_SECONDS: u64 = 60;

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        AgentConfig::from_toml(&text).with_context(|| format!("in {}", path.display()))
    }

    /// A config file's text, parsed and validated: all that `load` does after reading the file (fuzzed whole).
    pub fn from_toml(text: &str) -> Result<AgentConfig> {
        let config: AgentConfig = toml::from_str(text).context("parsing")?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        for (i, pool) in self.pools.iter().enumerate() {
            berth::validate::pool_name(&pool.name)?;
            if self.pools[..i].iter().any(|p| p.name == pool.name) {
                bail!("pool {:?} is configured twice", pool.name);
            }
            if !pool.root.is_absolute() {
                bail!("pool {:?}: root {:?} is not an absolute path", pool.name, pool.root);
            }
            if pool.root.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                bail!("pool {:?}: root {:?} contains '..'", pool.name, pool.root);
            }
            // TOML allows "\u0000"; no system call takes a path holding it, so the pool could never be ready.
            if pool.root.as_os_str().as_encoded_bytes().contains(&0) {
                bail!("pool {:?}: root {:?} holds a NUL character", pool.name, pool.root);
            }
            if let Some(other) =
                self.pools[..i].iter().find(|p| p.root.starts_with(&pool.root) || pool.root.starts_with(&p.root))
            {
                bail!("pools {:?} and {:?}: one root lies inside the other", other.name, pool.name);
            }
            if pool.capacity == Some(0) {
                bail!("pool {:?}: capacity 0 can hold nothing; leave it out to use the whole filesystem", pool.name);
            }
            pool.validate_backend_keys()?;
        }
        Ok(())
    }
}

impl PoolConfig {
    fn validate_backend_keys(&self) -> Result<()> {
        let name = &self.name;
        match self.backend {
            BackendKind::Hostpath => {
                let lvm_keys = [
                    ("volume-group", self.volume_group.is_some()),
                    ("thin-pool", self.thin_pool.is_some()),
                    ("overprovision-ratio", self.overprovision_ratio.is_some()),
                    ("thin-data-threshold", self.thin_data_threshold.is_some()),
                    ("lvm-config", self.lvm_config.is_some()),
                    ("command-timeout-seconds", self.command_timeout_seconds.is_some()),
                ];
                if let Some((key, _)) = lvm_keys.iter().find(|(_, set)| *set) {
                    bail!("pool {name:?}: {key} is an lvm setting; this pool's backend is hostpath");
                }
            }
            BackendKind::Lvm => {
                let Some(vg) = &self.volume_group else {
                    bail!("pool {name:?}: an lvm pool needs volume-group");
                };
                lvm_name(vg).map_err(|e| anyhow::anyhow!("pool {name:?}: volume-group {vg:?}: {e}"))?;
                if let Some(thin) = &self.thin_pool {
                    lvm_name(thin).map_err(|e| anyhow::anyhow!("pool {name:?}: thin-pool {thin:?}: {e}"))?;
                } else if self.overprovision_ratio.is_some() || self.thin_data_threshold.is_some() {
                    bail!("pool {name:?}: overprovision-ratio and thin-data-threshold need thin-pool");
                }
                if let Some(r) = self.overprovision_ratio
                    && !(r.is_finite() && r > 0.0 && r <= 1000.0)
                {
                    bail!("pool {name:?}: overprovision-ratio {r} must be a number above 0 (1.0: no overprovisioning)");
                }
                if let Some(t) = self.thin_data_threshold
                    && !(t.is_finite() && t > 0.0 && t <= 100.0)
                {
                    bail!("pool {name:?}: thin-data-threshold {t} must be a percentage in (0, 100]");
                }
                if let Some(t) = self.command_timeout_seconds
                    && !(1..=3600).contains(&t)
                {
                    bail!("pool {name:?}: command-timeout-seconds {t} must be between 1 and 3600");
                }
            }
        }
        Ok(())
    }
}

/// lvm2's rules for VG and LV names: `A-Za-z0-9+_.-`, not starting with `-`, not `.` or `..`, at most 127.
pub fn lvm_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 127 {
        return Err("must be 1 to 127 characters".into());
    }
    if name.starts_with('-') || name == "." || name == ".." {
        return Err("must not start with '-' or be '.' or '..'".into());
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || "+_.-".contains(*c))) {
        return Err(format!("character {c:?} is not allowed (A-Z a-z 0-9 + _ . -)"));
    }
    Ok(())
}

fn de_quantity<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(n) => Ok(n),
        Raw::Text(s) => parse_quantity(&s).map_err(serde::de::Error::custom),
    }
}

fn de_opt_quantity<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_quantity(d).map(Some)
}

fn parse_quantity(s: &str) -> Result<u64, String> {
    berth::quantity::bytes(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig> {
        AgentConfig::from_toml(text)
    }

    #[test]
    fn reads_pools_with_quantities() {
        let c = parse(
            r#"
            [[pool]]
            name = "fast"
            backend = "hostpath"
            root = "/mnt/nvme0/berth"
            capacity = "100Gi"
            headroom = "1Gi"

            [[pool]]
            name = "slow"
            backend = "hostpath"
            root = "/mnt/hdd/berth"
            "#,
        )
        .unwrap();
        assert_eq!(c.pools.len(), 2);
        assert_eq!(c.pools[0].capacity, Some(100 << 30));
        assert_eq!(c.pools[0].headroom, 1 << 30);
        assert_eq!(c.pools[1].capacity, None);
        assert_eq!(c.pools[1].headroom, 0);
    }

    #[test]
    fn refuses_bad_configuration() {
        let pool = |name: &str, root: &str, extra: &str| {
            format!("[[pool]]\nname = {name:?}\nbackend = \"hostpath\"\nroot = {root:?}\n{extra}\n")
        };
        let lvm = |name: &str, root: &str, extra: &str| {
            format!("[[pool]]\nname = {name:?}\nbackend = \"lvm\"\nroot = {root:?}\n{extra}\n")
        };
        for (text, why) in [
            (pool("../x", "/a", ""), "bad name"),
            (pool("a", "relative", ""), "relative root"),
            (pool("a", "/a/../b", ""), "root with .."),
            ("[[pool]]\nname = \"a\"\nbackend = \"hostpath\"\nroot = \"/a\\u0000b\"\n".to_string(), "root with NUL"),
            (pool("a", "/a", "capacity = \"10Zi\""), "unknown unit"),
            (pool("a", "/a", "capacity = 0"), "zero capacity"),
            (pool("a", "/a", "colour = \"red\""), "unknown key"),
            (pool("a", "/a", "") + &pool("a", "/b", ""), "duplicate name"),
            (pool("a", "/a", "") + &pool("b", "/a/b", ""), "nested roots"),
            ("[[pool]]\nname = \"a\"\nbackend = \"zfs\"\nroot = \"/a\"\n".to_string(), "unknown backend"),
            (pool("a", "/a", "volume-group = \"vg\""), "lvm key on a hostpath pool"),
            (lvm("a", "/a", ""), "lvm without a volume group"),
            (lvm("a", "/a", "volume-group = \"-vg\""), "bad volume group name"),
            (lvm("a", "/a", "volume-group = \"vg/x\""), "volume group name with a slash"),
            (lvm("a", "/a", "volume-group = \"vg\"\noverprovision-ratio = 2.0"), "ratio without a thin pool"),
            (lvm("a", "/a", "volume-group = \"vg\"\nthin-pool = \"t\"\noverprovision-ratio = 0.0"), "ratio 0"),
            (lvm("a", "/a", "volume-group = \"vg\"\nthin-pool = \"t\"\nthin-data-threshold = 150.0"), "threshold"),
        ] {
            assert!(parse(&text).is_err(), "{why}: accepted\n{text}");
        }
    }

    #[test]
    fn reads_lvm_pools() {
        let c = parse(
            r#"
            [[pool]]
            name = "lvm"
            backend = "lvm"
            root = "/var/lib/berth/lvm"
            volume-group = "berth"

            [[pool]]
            name = "lvm-thin"
            backend = "lvm"
            root = "/var/lib/berth/lvm-thin"
            volume-group = "berth"
            thin-pool = "thin"
            overprovision-ratio = 2.5
            thin-data-threshold = 80
            lvm-config = "activation { udev_sync = 0 udev_rules = 0 }"
            "#,
        )
        .unwrap();
        assert_eq!(c.pools[0].backend, BackendKind::Lvm);
        assert_eq!(c.pools[0].volume_group.as_deref(), Some("berth"));
        assert_eq!(c.pools[0].thin_pool, None);
        assert_eq!(c.pools[1].thin_pool.as_deref(), Some("thin"));
        assert_eq!(c.pools[1].overprovision_ratio, Some(2.5));
        assert_eq!(c.pools[1].thin_data_threshold, Some(80.0));
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("1Gi"), Ok(1 << 30));
        assert_eq!(parse_quantity("1.5Gi"), Ok(3 << 29));
        assert!(parse_quantity("-1").is_err());
        assert!(parse_quantity("").is_err());
    }
}
