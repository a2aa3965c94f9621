//! A memory cgroup of its own for a process under test, so a test can hold it to a memory limit the way a
//! container's `resources.limits.memory` does (the kernel's cgroup accounting, not RLIMIT_AS, which trips on the
//! address space tokio and glibc reserve without using). cgroup v1 (these hosts: the memory controller mounted
//! at /sys/fs/cgroup/memory) and v2 (the VM guests' unified hierarchy) are both handled. Needs root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

pub struct MemoryCgroup {
    dir: PathBuf,
    v1: bool,
}

impl MemoryCgroup {
    /// A new cgroup `name` below this process's own memory cgroup, limited to `limit_bytes` (no swap here).
    pub fn new(name: &str, limit_bytes: u64) -> Result<MemoryCgroup> {
        let own = std::fs::read_to_string("/proc/self/cgroup").context("/proc/self/cgroup")?;
        let v1_path = own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers.split(',').any(|c| c == "memory").then(|| path.to_owned())
        });
        let (dir, v1) = match v1_path {
            Some(path) if Path::new("/sys/fs/cgroup/memory").is_dir() => {
                (Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')).join(name), true)
            }
            _ => {
                let path = own.lines().find_map(|l| l.strip_prefix("0::")).context("no cgroup v2 line")?;
                (Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/')).join(name), false)
            }
        };
        std::fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        let cgroup = MemoryCgroup { dir, v1 };
        let limit = if v1 { "memory.limit_in_bytes" } else { "memory.max" };
        std::fs::write(cgroup.dir.join(limit), limit_bytes.to_string())
            .with_context(|| format!("{}/{limit}", cgroup.dir.display()))?;
        Ok(cgroup)
    }

    /// The file a process writes its pid into to join.
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// A command prefix that runs the rest of the command line inside this cgroup: `sh` joins it, then `exec`s.
    pub fn prefix(&self) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), r#"echo $$ > "$0" && exec "$@""#.into(), self.procs().display().to_string()]
    }

    /// How many times the kernel's OOM killer killed a process of this cgroup.
    pub fn oom_kills(&self) -> Result<u64> {
        let file = if self.v1 { "memory.oom_control" } else { "memory.events" };
        let text = std::fs::read_to_string(self.dir.join(file))?;
        let count = text.lines().find_map(|l| l.strip_prefix("oom_kill ")).context("no oom_kill line")?;
        Ok(count.trim().parse()?)
    }

    /// The most memory the cgroup's processes used at once.
    pub fn peak_bytes(&self) -> Result<u64> {
        let file = if self.v1 { "memory.max_usage_in_bytes" } else { "memory.peak" };
        Ok(std::fs::read_to_string(self.dir.join(file))?.trim().parse()?)
    }
}

impl Drop for MemoryCgroup {
    /// A cgroup can be removed once its processes are gone (they may still be exiting).
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("cgroup {} still has processes; left in place", self.dir.display());
    }
}

/// Fails unless this process may make cgroups (root).
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root for cgroups (CI runs as root)");
    }
    Ok(())
}
