//! A bind mount made the way kubelet makes one for a pod's `local` volume (the volume's directory mounted at a
//! path under the pod's directory), undone when dropped: also when a test panics, so the bed's disks can still be
//! unmounted at teardown.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};

pub struct BindMount {
    target: PathBuf,
    mounted: bool,
}

fn run(program: &str, args: &[&Path]) -> Result<()> {
    let out = Command::new(program).args(args).output()?;
    if !out.status.success() {
        bail!("{program} {args:?}: {} {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl BindMount {
    /// Mounts `source` at `target` (made, with its parents, if missing).
    pub fn new(source: &Path, target: &Path) -> Result<BindMount> {
        std::fs::create_dir_all(target)?;
        let bind = Path::new("--bind");
        run("mount", &[bind, source, target])?;
        Ok(BindMount { target: target.to_owned(), mounted: true })
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Unmounts it now (as kubelet does once the pod is gone).
    pub fn unmount(mut self) -> Result<()> {
        self.mounted = false;
        run("umount", &[&self.target])
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        if self.mounted
            && let Err(e) = run("umount", &[&self.target])
        {
            eprintln!("cannot undo the bind mount at {}: {e}", self.target.display());
        }
    }
}
