//! Churn soak in the guest's kernel (issue 19): create/delete cycles through the real agent leave no LV, no
//! device-mapper device, no mount and no project quota record behind, and the agent's descriptors and memory do
//! not grow with the cycles. CI runs `BERTH_CHURN_CYCLES` cycles (default: 8 LVM cycles, two of each kind, since one
//! takes ~8 s under TCG; 20 quota cycles, ~130 ms each); the full soak of 200 is a command in docs/benchmarks.md.
//! Each function runs inside a phase that has an agent already (no boot of its own).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

use serde_json::json;

use crate::lvm_agent::{GuestAgent, MI, body, volumes};

/// Memory the agent may gain over the measured cycles (see agent/tests/churn.rs for what that can see).
const RSS_SLACK: u64 = 4 << 20;
/// Descriptors it may gain: connections re-made in between.
const FD_SLACK: usize = 4;

/// `BERTH_CHURN_CYCLES` when set, else `default`.
fn cycles(default: usize) -> usize {
    std::env::var("BERTH_CHURN_CYCLES")
        .ok()
        .map(|v| v.parse().expect("BERTH_CHURN_CYCLES: a number"))
        .unwrap_or(default)
}

/// The agent's open descriptors and resident bytes.
fn usage(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    (fds, kib << 10)
}

/// Runs `cycles` create+delete cycles of the volume `body_of(i)` made in `cycle`, after a few unmeasured ones, and
/// checks the agent's descriptors and memory; returns how long the measured cycles took.
async fn measured<F, Fut>(agent: &GuestAgent, what: &str, cycles: usize, mut cycle: F) -> std::time::Duration
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    const WARMUP: usize = 2;
    for i in 0..WARMUP {
        cycle(i).await;
    }
    let (fds_before, rss_before) = usage(agent.pid());
    let started = Instant::now();
    for i in WARMUP..WARMUP + cycles {
        cycle(i).await;
    }
    let took = started.elapsed();
    let (fds_after, rss_after) = usage(agent.pid());
    println!(
        "churn {what}: {cycles} cycles in {took:.1?} ({:.0} ms a cycle); descriptors {fds_before} -> {fds_after}; RSS {} -> {} KiB",
        took.as_secs_f64() * 1000.0 / cycles as f64,
        rss_before >> 10,
        rss_after >> 10
    );
    assert!(fds_after <= fds_before + FD_SLACK, "{what}: descriptors {fds_before} -> {fds_after}");
    assert!(rss_after <= rss_before + RSS_SLACK, "{what}: RSS {rss_before} -> {rss_after} bytes over {cycles} cycles");
    took
}

fn churn_name(i: usize) -> String {
    format!("pvc-33333333-0000-4000-8000-{i:012}")
}

/// LVM: cycles alternating between the thick and the thin pool, raw block and ext4 volumes (lvcreate, mkfs, mount;
/// unmount, zeroing, lvremove), with data written into each. After them: no LV of Berth's, no device-mapper device
/// of a volume, nothing mounted under the pool roots, an empty inventory.
pub async fn lvm(agent: &GuestAgent, roots: &[&Path]) {
    // A multiple of 4: each pool with each volume mode twice.
    let n = cycles(8);
    measured(agent, "lvm", n, |i| async move {
        let name = churn_name(i);
        let pool = if i % 2 == 0 { "thick" } else { "thin" };
        let extra = if i % 4 < 2 { json!({"volumeMode": "Block"}) } else { json!({"fsType": "ext4"}) };
        let v = agent.create(&name, &body(pool, 16 * MI, extra)).await;
        if i % 4 < 2 {
            crate::lvm_agent::write_block_token(&v.path, &name);
        } else {
            std::fs::write(Path::new(&v.path).join("file"), vec![7u8; 1 << 20]).unwrap();
        }
        agent.delete(&name).await;
    })
    .await;
    let lvs: Vec<String> = crate::lvm_agent::lv_names().into_iter().filter(|n| n.starts_with("berth-")).collect();
    assert_eq!(lvs, Vec::<String>::new(), "LVs after {n} cycles");
    let dm = crate::sh("dmsetup", &["ls"]);
    assert!(!dm.contains("pvc--33333333"), "device-mapper devices after {n} cycles:\n{dm}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for root in roots {
        let under = mounts.lines().filter(|l| l.contains(&format!("{}/", root.display()))).collect::<Vec<_>>();
        assert!(under.is_empty(), "mounts under {} after {n} cycles: {under:?}", root.display());
    }
    assert!(volumes(agent).await.volumes.is_empty());
}

/// The project IDs of Berth's range for which the filesystem mounted at `mount` holds some usage or a limit,
/// from `xfs_quota -x -c 'report -p -n -N -b -i'`: a line per record, `#<id>` then numbers (used, soft, hard,
/// warnings; grace periods in brackets), all zero for a record that holds neither.
pub fn projects_on(mount: &Path) -> BTreeSet<u32> {
    let report = crate::sh("xfs_quota", &["-x", "-c", "report -p -n -N -b -i", mount.to_str().unwrap()]);
    report
        .lines()
        .filter_map(|l| l.trim().strip_prefix('#'))
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let id: u32 = fields.next()?.parse().ok()?;
            let holds = fields.filter_map(|f| f.parse::<u64>().ok()).any(|n| n > 0);
            (holds && id >= 1_000_000_000).then_some(id)
        })
        .collect()
}

/// Directory volumes with project quotas: each cycle's volume gets a project and a limit and is filled; after
/// them, the filesystem keeps no record of any of their projects (no inodes, no limits left), and the pool
/// holds nothing new.
pub async fn quota(agent: &GuestAgent, pool: &str, mount: &Path, owned: serde_json::Value) {
    let n = cycles(20);
    let before = projects_on(mount);
    measured(agent, &format!("quota pool {pool}"), n, |i| {
        let owned = owned.clone();
        async move {
            let name = churn_name(1000 + i);
            let v = agent.create(&name, &body(pool, 8 * MI, owned)).await;
            std::fs::write(Path::new(&v.path).join("file"), vec![7u8; 1 << 20]).unwrap();
            agent.delete(&name).await;
        }
    })
    .await;
    let after = projects_on(mount);
    let new: Vec<&u32> = after.difference(&before).collect();
    assert!(new.is_empty(), "project quota records left by {n} deleted volumes: {new:?} (before: {before:?})");
}
