//! A simulated node's own disk: a sparse image file, attached to a loop device, formatted and mounted, so each
//! node's free space is real and independent of the host's disk and of the other nodes.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::FsType;

#[derive(Debug)]
pub struct NodeDisk {
    image: PathBuf,
    loop_device: PathBuf,
    mount_point: PathBuf,
    mounted: bool,
}

impl NodeDisk {
    /// Creates `dir/disk.img` of `size_bytes` (sparse), attaches, formats and mounts it at `dir/disk`.
    pub fn create(dir: &Path, size_bytes: u64, fs: FsType) -> Result<NodeDisk> {
        std::fs::create_dir_all(dir)?;
        let image = dir.join("disk.img");
        let mount_point = dir.join("disk");
        std::fs::create_dir_all(&mount_point)?;
        std::fs::File::create_new(&image)
            .and_then(|f| f.set_len(size_bytes))
            .with_context(|| format!("creating sparse image {}", image.display()))?;
        // --find --show picks a free device and attaches in one call, retrying internally if another process
        // (a second test bed) takes the same device first.
        let loop_device = PathBuf::from(run("losetup", &["--find", "--show", path_str(&image)?])?.trim());
        let mut disk = NodeDisk { image, loop_device, mount_point, mounted: false };
        let dev = path_str(&disk.loop_device)?.to_owned();
        match fs {
            // Lazy inode table and journal init: a large sparse disk is made in milliseconds and stays sparse.
            FsType::Ext4 => {
                run("mkfs.ext4", &["-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1", &dev])?
            }
            FsType::Xfs => run("mkfs.xfs", &["-q", "-f", &dev])?,
        };
        // noinit_itable: the kernel does not zero the inode tables in the background either (it would write
        // hundreds of MiB into the sparse file of a large test disk).
        let options = if fs == FsType::Ext4 { "noinit_itable" } else { "defaults" };
        run("mount", &["-t", fs.as_str(), "-o", options, &dev, path_str(&disk.mount_point)?])?;
        disk.mounted = true;
        Ok(disk)
    }

    /// Where the filesystem is mounted: a node's pool roots go below it.
    pub fn mount_point(&self) -> &Path {
        &self.mount_point
    }

    pub fn loop_device(&self) -> &Path {
        &self.loop_device
    }

    pub fn image(&self) -> &Path {
        &self.image
    }
}

impl Drop for NodeDisk {
    fn drop(&mut self) {
        if self.mounted {
            let mp = self.mount_point.to_string_lossy().into_owned();
            // A lazy unmount as the fallback: a process still holding a file there must not keep the loop
            // device (and so the next test bed's loop device) busy forever.
            if run("umount", &[&mp]).is_err() {
                let _ = run("umount", &["--lazy", &mp]);
            }
        }
        let dev = self.loop_device.to_string_lossy().into_owned();
        if let Err(e) = run("losetup", &["--detach", &dev]) {
            eprintln!("test bed: could not detach {dev}: {e:#}");
        }
    }
}

pub(crate) fn path_str(p: &Path) -> Result<&str> {
    p.to_str().with_context(|| format!("path is not UTF-8: {}", p.display()))
}

/// Runs a command to completion; its stdout, or an error with its stderr.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
