//! Which Berth a binary is, and which agent versions a controller works with (deploy/README.md, "Versions and upgrades").
//!
//! The commit is what the build was told (`BERTH_COMMIT`, which hack/build-release sets from git and the image
//! builds pass on): a plain `cargo build` has none and says so, rather than guessing from a checkout that may not
//! be what was built.

use std::sync::OnceLock;

/// The workspace's version (Cargo.toml).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit this binary was built from, `-dirty` appended when the tree had changes; `None` when the build did
/// not say.
pub const COMMIT: Option<&str> = match option_env!("BERTH_COMMIT") {
    Some(commit) if !commit.is_empty() => Some(commit),
    _ => None,
};

/// The version with the commit as SemVer build metadata (`0.1.0+3f2c…`, or `0.1.0` without one): what an agent
/// publishes in its BerthNode and the image's version label.
pub fn full() -> String {
    match COMMIT {
        Some(commit) => format!("{VERSION}+{commit}"),
        None => VERSION.to_owned(),
    }
}

/// What `--version` prints after the program's name.
pub fn long() -> &'static str {
    static LONG: OnceLock<String> = OnceLock::new();
    LONG.get_or_init(|| match COMMIT {
        Some(commit) => format!("{VERSION} (commit {commit})"),
        None => format!("{VERSION} (commit unknown: built without BERTH_COMMIT, not by hack/build-release)"),
    })
}

/// How an agent's version relates to the controller's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skew {
    /// The same release (build metadata aside).
    Same,
    /// Another release within the supported window.
    Supported,
    /// Outside the window: why.
    Unsupported(String),
}

/// Major, minor, patch of a `MAJOR.MINOR.PATCH[-pre][+build]` version.
fn release(version: &str) -> Option<(u64, u64, u64)> {
    let core = version.split(['+', '-']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    let parsed = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(parsed)
}

/// Whether a controller of version `controller` supports an agent of version `agent`. The window (deploy/README.md, "Versions and upgrades"):
/// before 1.0, the same minor release (a 0.x minor may change the agent's API); from 1.0, the same major and minors
/// at most one apart either way, so that either side can be upgraded first.
pub fn skew(controller: &str, agent: &str) -> Skew {
    let (Some(c), Some(a)) = (release(controller), release(agent)) else {
        return Skew::Unsupported(format!("version {agent:?} is not MAJOR.MINOR.PATCH"));
    };
    let strip = |v: &str| v.split('+').next().unwrap_or_default().to_owned();
    if strip(controller) == strip(agent) {
        return Skew::Same;
    }
    let supported = if c.0 == 0 || a.0 == 0 { c.0 == a.0 && c.1 == a.1 } else { c.0 == a.0 && c.1.abs_diff(a.1) <= 1 };
    if supported {
        Skew::Supported
    } else if c.0 == 0 || a.0 == 0 {
        Skew::Unsupported(format!("before 1.0 the controller ({controller}) supports agents of its minor release only"))
    } else {
        Skew::Unsupported(format!(
            "the controller ({controller}) supports agents of its major release, at most one minor release apart"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_supported_window() {
        let unsupported = |c: &str, a: &str| matches!(skew(c, a), Skew::Unsupported(_));
        assert_eq!(skew("0.1.0+abc", "0.1.0+def"), Skew::Same, "build metadata is not a release");
        assert_eq!(skew("0.1.0", "0.1.0"), Skew::Same);
        assert_eq!(skew("0.1.2", "0.1.0"), Skew::Supported);
        assert!(unsupported("0.2.0", "0.1.9"), "a 0.x minor may change the API");
        assert!(unsupported("0.9.0", "1.0.0"));
        assert_eq!(skew("1.4.0", "1.3.7"), Skew::Supported, "agents one minor behind, mid-upgrade");
        assert_eq!(skew("1.4.0", "1.5.0"), Skew::Supported, "agents upgraded first");
        assert!(unsupported("1.4.0", "1.2.0"));
        assert!(unsupported("2.0.0", "1.9.0"));
        assert_eq!(skew("1.4.0", "1.4.0-rc.1"), Skew::Supported, "a pre-release of the same minor");
        assert!(unsupported("0.1.0", ""), "an agent that published no version");
        assert!(unsupported("0.1.0", "0.1"));
        assert!(unsupported("0.1.0", "0.1.0.0"));
        assert!(unsupported("0.1.0", "v0.1.0"));
    }

    #[test]
    fn full_carries_the_commit_as_build_metadata() {
        let full = full();
        assert!(full.starts_with(VERSION), "{full}");
        assert_eq!(full.split_once('+').map(|(_, c)| c), COMMIT, "{full}");
        assert!(long().starts_with(VERSION), "{}", long());
    }
}
