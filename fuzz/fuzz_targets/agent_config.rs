//! The agent's TOML config (`AgentConfig::from_toml`: what `berth-agent` does with /etc/berth/agent.toml).
//!
//! Properties: parsing and validation never panic, whatever the text; a config they accept keeps every promise
//! the rest of the agent builds on (docs/agent-config.md), checked here on its own terms rather than by calling the
//! validation again: pool names are DNS-1123 labels and unique, roots are absolute, free of `..` and not nested in
//! each other and hold no NUL (no system call takes it), a capacity is never 0, lvm pools name a volume group (main.rs `expect`s it) and lvm2-valid names,
//! the thin settings come only with a thin pool and within their ranges, and hostpath pools carry no lvm settings.
#![no_main]

use std::path::Component;

use berth_agent::config::{AgentConfig, BackendKind};
use libfuzzer_sys::fuzz_target;

fn lvm2_name(name: &str) -> bool {
    (1..=127).contains(&name.len())
        && !name.starts_with('-')
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "+_.-".contains(c))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = AgentConfig::from_toml(text) else { return };
    for (i, p) in config.pools.iter().enumerate() {
        assert!(berth::validate::pool_name(&p.name).is_ok(), "pool name {:?}", p.name);
        assert!(config.pools[..i].iter().all(|q| q.name != p.name), "pool {:?} twice", p.name);
        assert!(p.root.is_absolute(), "root {:?}", p.root);
        assert!(!p.root.as_os_str().as_encoded_bytes().contains(&0), "root {:?}: no path holds a NUL", p.root);
        assert!(!p.root.components().any(|c| c == Component::ParentDir), "root {:?}", p.root);
        for q in &config.pools[..i] {
            assert!(!q.root.starts_with(&p.root) && !p.root.starts_with(&q.root), "{:?} and {:?}", q.root, p.root);
        }
        assert_ne!(p.capacity, Some(0), "pool {:?}", p.name);
        match p.backend {
            BackendKind::Hostpath => {
                assert!(p.volume_group.is_none() && p.thin_pool.is_none() && p.lvm_config.is_none(), "{p:?}");
                assert!(p.overprovision_ratio.is_none() && p.thin_data_threshold.is_none(), "{p:?}");
                assert!(p.command_timeout_seconds.is_none(), "{p:?}");
            }
            BackendKind::Lvm => {
                let vg = p.volume_group.as_deref().expect("an lvm pool without a volume group was accepted");
                assert!(lvm2_name(vg), "volume group {vg:?}");
                if let Some(thin) = &p.thin_pool {
                    assert!(lvm2_name(thin), "thin pool {thin:?}");
                } else {
                    assert!(p.overprovision_ratio.is_none() && p.thin_data_threshold.is_none(), "{p:?}");
                }
                if let Some(r) = p.overprovision_ratio {
                    assert!(r.is_finite() && r > 0.0 && r <= 1000.0, "ratio {r}");
                }
                if let Some(t) = p.thin_data_threshold {
                    assert!(t.is_finite() && t > 0.0 && t <= 100.0, "threshold {t}");
                }
                if let Some(t) = p.command_timeout_seconds {
                    assert!((1..=3600).contains(&t), "timeout {t}");
                }
            }
        }
    }
});
