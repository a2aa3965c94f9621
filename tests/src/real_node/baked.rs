//! The real node's state disk, prepared once and reused: the node binaries copied onto it and the images imported
//! into containerd's store (node.sh in bake mode, in a guest of its own), kept under
//! `${BERTH_CACHE:-$HOME/.cache/berth}/node-disk/<key>/` and keyed by everything that went into it. Every node
//! boots on a qcow2 overlay of it, so the cached disk is never written after its bake and a run starts without
//! copying binaries or unpacking images (under TCG, importing Berth's 73 MB image took 40–57 s of every boot).
//!
//! Berth's own image changes with every build of Berth, so it is imported again at every boot
//! ([`IMPORTED_AT_BOOT`]); its lower layer, the Debian base hack/build-image caches, is part of the key, so the
//! boot's import finds that layer unpacked already and unpacks only the top one with the binaries.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::process::tail;
use crate::vm::Vm;

/// The archives (of hack/build-image's `images` list) whose top layer is imported at every boot rather than baked,
/// each with the archive hack/build-image writes of it without its base layer, which the boot imports.
pub const IMPORTED_AT_BOOT: &[(&str, &str)] = &[("berth.oci.tar", "berth-top.oci.tar")];
/// The state disk's file name: the guest finds the disk by it (its virtio serial).
pub const STATE_DISK_NAME: &str = "node-state.img";
/// The state disk's size (a sparse file; the bake writes a few hundred MB of it).
const STATE_DISK: u64 = 8 << 30;
/// Boot, copying the binaries and importing every image (a minute and a half under TCG on 2 cores).
const BAKE_DEADLINE: Duration = Duration::from_secs(6 * 60);

/// What a bake is made of; [`key`] digests it.
pub struct BakeInputs<'a> {
    /// node.sh, whose bake mode does the work.
    pub script: &'a str,
    /// hack/node-bins' output directory (its name holds the versions).
    pub node_bins: &'a Path,
    /// hack/build-image's output directory (its `images` and `digests`).
    pub images: &'a Path,
    /// containerd's configuration as written for every node, less what differs per bed.
    pub containerd_template: &'a str,
}

/// The cache key of a baked disk: a sha256 of the script, the node binaries' directory, containerd's configuration
/// template, the images list, and the digests of every baked archive (of [`IMPORTED_AT_BOOT`]'s, every layer but
/// the top one).
pub fn key(inputs: &BakeInputs) -> Result<String> {
    let images = std::fs::read_to_string(inputs.images.join("images"))?;
    let digests = std::fs::read_to_string(inputs.images.join("digests"))
        .with_context(|| format!("{} has no digests: rerun hack/build-image", inputs.images.display()))?;
    let mut text = format!(
        "{}\n--- node-bins {}\n--- containerd\n{}\n--- images\n{images}\n--- digests\n",
        inputs.script,
        inputs.node_bins.display(),
        inputs.containerd_template
    );
    for line in digests.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [file, _manifest, _config, layers @ .., _top] if IMPORTED_AT_BOOT.iter().any(|(f, _)| f == file) => {
                text.push_str(&format!("{file} {}\n", layers.join(" ")))
            }
            _ => text.push_str(&format!("{line}\n")),
        }
    }
    sha256(text.as_bytes())
}

/// The baked state disk of `inputs`, baking it first when the cache has none: `script` (node.sh) run in `guest`,
/// which has node.sh's configuration, binaries, images and log directory (the node's guest, less its disks).
pub fn baked_disk(inputs: &BakeInputs, guest: Vm, script: &Path) -> Result<(PathBuf, String)> {
    let key = key(inputs)?;
    let root = cache_root().join("node-disk");
    let done = root.join(&key);
    let disk = done.join(STATE_DISK_NAME);
    if disk.is_file() {
        println!("test bed: the real node's baked state disk from the cache: {}", disk.display());
        return Ok((disk, key));
    }
    std::fs::create_dir_all(&root)?;
    let work = tempfile::Builder::new().prefix("bake.").tempdir_in(&root)?;
    let image = work.path().join(STATE_DISK_NAME);
    std::fs::File::create_new(&image)
        .and_then(|f| f.set_len(STATE_DISK))
        .with_context(|| image.display().to_string())?;
    let started = Instant::now();
    println!("test bed: baking the real node's state disk (binaries and images, once per key {key})");
    let run = guest
        .disk(&image)
        .deadline(BAKE_DEADLINE)
        .env("BERTH_NODE_MODE", "bake")
        .env("BERTH_NODE_KEY", &key)
        .run(&format!("bash {}", script.display()))
        .context("baking the real node's state disk")?;
    if run.status != 0 || !run.output.lines().any(|l| l.starts_with("node: ") && l.ends_with(" baked")) {
        bail!(
            "baking the real node's state disk failed (exit {}); its output ended with:\n{}",
            run.status,
            tail(&run.output, 40)
        );
    }
    // Another bed may have baked the same key meanwhile: either disk is as good.
    match std::fs::rename(work.path(), &done) {
        Ok(()) => {
            let _ = work.keep();
        }
        Err(_) if disk.is_file() => {}
        Err(e) => return Err(e).with_context(|| format!("keeping the baked disk as {}", done.display())),
    }
    println!("test bed: baked the state disk in {:.0} s", started.elapsed().as_secs_f64());
    prune(&root, &key);
    Ok((disk, key))
}

/// A qcow2 overlay at `at` whose reads fall through to `base` and whose writes stay in `at`.
pub fn overlay(base: &Path, at: &Path) -> Result<()> {
    let base = std::path::absolute(base)?;
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(at)
        .stdin(Stdio::null())
        .output()
        .context("qemu-img (Debian package qemu-utils; hack/deps installs it)")?;
    if !out.status.success() {
        bail!("qemu-img create of an overlay of {}: {}", base.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Removes the baked disks of other keys (older node binaries or images): one is kept. A running guest's disk
/// stays readable after the unlink.
fn prune(root: &Path, key: &str) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name != key
            && !name.starts_with("bake.")
            && name.len() == 64
            && let Err(e) = std::fs::remove_dir_all(entry.path())
        {
            println!("test bed: could not remove the stale baked disk {}: {e}", entry.path().display());
        }
    }
}

fn cache_root() -> PathBuf {
    match std::env::var_os("BERTH_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/berth"),
    }
}

/// sha256sum(1) of `data`, in hex.
fn sha256(data: &[u8]) -> Result<String> {
    use std::io::Write;
    let mut child =
        Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().context("sha256sum")?;
    child.stdin.take().context("stdin")?.write_all(data)?;
    let out = child.wait_with_output()?;
    let hex = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned();
    if !out.status.success() || hex.len() != 64 {
        bail!("sha256sum failed: {}", out.status);
    }
    Ok(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs_with(dir: &Path, berth_layers: &str) -> String {
        std::fs::write(dir.join("images"), "berth.oci.tar berth.test/berth:dev\npause.oci.tar pause:1\n").unwrap();
        std::fs::write(
            dir.join("digests"),
            format!("berth.oci.tar sha256:m sha256:c {berth_layers}\npause.oci.tar sha256:pm sha256:pc sha256:p1\n"),
        )
        .unwrap();
        let inputs =
            BakeInputs { script: "s", node_bins: Path::new("/bins/v1"), images: dir, containerd_template: "t" };
        key(&inputs).unwrap()
    }

    #[test]
    fn the_key_ignores_the_top_layer_of_the_image_imported_at_boot_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let base = inputs_with(dir.path(), "sha256:base sha256:top1");
        assert_eq!(base, inputs_with(dir.path(), "sha256:base sha256:top2"), "a new build of Berth");
        assert_ne!(base, inputs_with(dir.path(), "sha256:base2 sha256:top1"), "a new Debian base");
    }
}
