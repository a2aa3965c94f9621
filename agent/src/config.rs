//! The agent's configuration file (TOML): which pools this node has. Documented in docs/agent-config.md, example
//! in deploy/agent-config.example.toml.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    #[serde(rename = "pool", default)]
    pub pools: Vec<PoolConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Hostpath,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PoolConfig {
    pub name: String,
    pub backend: BackendKind,
    /// Absolute path of the pool's root directory (hostpath pools).
    pub root: PathBuf,
    /// Hand out at most this much of the disk (bytes, or a quantity like "100Gi").
    #[serde(default, deserialize_with = "de_opt_quantity")]
    pub capacity: Option<u64>,
    /// Never promise the last this-much of the filesystem (default 0).
    #[serde(default, deserialize_with = "de_quantity")]
    pub headroom: u64,
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config: AgentConfig = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        config.validate().with_context(|| format!("in {}", path.display()))?;
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
            if let Some(other) =
                self.pools[..i].iter().find(|p| p.root.starts_with(&pool.root) || pool.root.starts_with(&p.root))
            {
                bail!("pools {:?} and {:?}: one root lies inside the other", other.name, pool.name);
            }
            if pool.capacity == Some(0) {
                bail!("pool {:?}: capacity 0 can hold nothing; leave it out to use the whole filesystem", pool.name);
            }
        }
        Ok(())
    }
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
        let c: AgentConfig = toml::from_str(text)?;
        c.validate()?;
        Ok(c)
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
        for (text, why) in [
            (pool("../x", "/a", ""), "bad name"),
            (pool("a", "relative", ""), "relative root"),
            (pool("a", "/a/../b", ""), "root with .."),
            (pool("a", "/a", "capacity = \"10Zi\""), "unknown unit"),
            (pool("a", "/a", "capacity = 0"), "zero capacity"),
            (pool("a", "/a", "colour = \"red\""), "unknown key"),
            (pool("a", "/a", "") + &pool("a", "/b", ""), "duplicate name"),
            (pool("a", "/a", "") + &pool("b", "/a/b", ""), "nested roots"),
            ("[[pool]]\nname = \"a\"\nbackend = \"zfs\"\nroot = \"/a\"\n".to_string(), "unknown backend"),
        ] {
            assert!(parse(&text).is_err(), "{why}: accepted\n{text}");
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("1Gi"), Ok(1 << 30));
        assert_eq!(parse_quantity("1.5Gi"), Ok(3 << 29));
        assert!(parse_quantity("-1").is_err());
        assert!(parse_quantity("").is_err());
    }
}
