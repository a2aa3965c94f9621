//! Cleans up after test beds whose process died without unwinding (SIGKILL, a CI timeout): their child processes
//! died with them (PDEATHSIG), but mounts, loop devices and directories outlive a process. Every bed directory
//! records its owner; a new bed removes what dead owners left.

use std::path::Path;

use crate::node_disk::run;

pub const DIR_PREFIX: &str = "berth-bed.";
const OWNER_FILE: &str = "owner";

/// This process's identity: pid and start time (so a reused pid is not mistaken for the owner).
fn identity(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime) counted after the parenthesised command name, which may contain spaces.
    let after = &stat[stat.rfind(')')? + 2..];
    let start = after.split(' ').nth(19)?;
    Some(format!("{pid} {start}"))
}

pub fn claim(dir: &Path) -> std::io::Result<()> {
    let me = identity(std::process::id()).unwrap_or_default();
    std::fs::write(dir.join(OWNER_FILE), me)
}

fn owner_alive(dir: &Path) -> bool {
    let Ok(owner) = std::fs::read_to_string(dir.join(OWNER_FILE)) else {
        // Being created right now by a live bed, or not ours: leave it.
        return true;
    };
    let Some(pid) = owner.split(' ').next().and_then(|p| p.parse::<u32>().ok()) else {
        return true;
    };
    identity(pid).as_deref() == Some(owner.trim())
}

/// Unmounts, detaches and removes every bed directory under `base` whose owner is gone.
pub fn reap_dead_beds(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let is_bed = entry.file_name().to_string_lossy().starts_with(DIR_PREFIX);
        if !is_bed || owner_alive(&dir) {
            continue;
        }
        eprintln!("test bed: cleaning up {} left by a dead test process", dir.display());
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = format!("{}/", dir.display());
        // Deepest first, so nested mounts come off before their parents.
        let mut points: Vec<&str> =
            mounts.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&prefix)).collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for point in points {
            let _ = run("umount", &["--lazy", point]);
        }
        if let Ok(list) = run("losetup", &["--list", "--noheadings", "--output", "NAME,BACK-FILE"]) {
            for line in list.lines() {
                if let Some((dev, file)) = line.trim().split_once(' ')
                    && file.trim().starts_with(&prefix)
                {
                    let _ = run("losetup", &["--detach", dev]);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
