//! `lvm` pools: each volume is a logical volume in the pool's volume group (thick), or a thin volume in its thin
//! pool. Every lvm2 call goes through [`Lvm`] (lvm2.rs).
//!
//! ```text
//! VG tag   berth:pool=<pool>              the pool marker (`berth-agent init-pool`); without it: not ready
//! LV       berth-<volume>                 tagged berth:pool=<pool>, berth:v=1, berth:size=…, berth:claim=…: the
//!                                         inventory is rebuilt from `lvs` alone
//! <root>/<volume>/                        mount point of a Filesystem volume (an empty directory when unmounted)
//! <root>/<volume>/data/                   what the PV points at; exists only inside the mounted filesystem
//! ```
//! So when a volume is not mounted (after a reboot, before the agent ran) its PV path does not exist and kubelet
//! fails and retries instead of bind-mounting an empty directory of the system disk. A Block volume's path is the
//! device-mapper node from lvm2's report (`lv_dm_path`), which exists only while the LV is active.
//!
//! A create tags the new LV `berth:creating` and lifts the tag when the filesystem is made and mounted; a delete
//! unmounts, tags the LV `berth:deleting` (it leaves the inventory), and the purge zeroes a thick LV before
//! `lvremove`. An LV found with either tag at start is debris of an interrupted operation, removed the same way
//! in the background once the API serves (agent.rs).
//! A new LV also carries `berth:unpublished` until the controller says its PV exists (`publish`).
//!
//! A clone (thin pools only) is a thin snapshot of its source's LV (`lvcreate -s`), tagged like a new LV, then made
//! usable the same way except that it keeps its source's filesystem (an XFS one gets a UUID of its own).

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use berth::agent_api::{ClaimRef, VolumeMode};

use super::lvm2::{LvRow, Lvm, LvmError, VgRow};
use super::zeroing::{self, zero_out};
use super::{
    Backend, BackendError, DATA_DIR, Debris, Enforcement, Made, PoolProbe, Recovered, VOLUME_MARKER_VERSION,
    VolumeRecord, Zeroing, io, make_data_dir,
};
use crate::capacity::{LvmSpace, PoolLimits, lvm_capacity};
use crate::command::{self, CommandError, Stuck};
use crate::in_use::{MountTables, device_held};
use crate::mountinfo::mounted_at;

const TAG: &str = "berth:";
const CREATING: &str = "berth:creating";
const DELETING: &str = "berth:deleting";
/// On an LV from its create until a PV is made for it (the controller's `PUT …/published`). Its absence is what
/// "published" means, so LVs made before the tag existed read as published, never as orphans.
const UNPUBLISHED: &str = "berth:unpublished";
/// The LV of volume `pvc-…` is `berth-pvc-…`: a fixed prefix keeps every DNS-1123 label clear of lvm2's reserved
/// names (`snapshot…`, `pvmove…`) and marks the LV as Berth's to anyone reading `lvs`.
const LV_PREFIX: &str = "berth-";

#[derive(Debug, Clone, PartialEq)]
pub struct Thin {
    pub pool_lv: String,
    pub ratio: f64,
    pub threshold_percent: f64,
}

pub struct LvmPool {
    pool: String,
    root: PathBuf,
    vg: String,
    thin: Option<Thin>,
    limits: PoolLimits,
    lvm: Lvm,
    /// How long each external command may run (zeroing: more, by size).
    deadline: Duration,
    /// This pool's commands that outlived their deadlines (shared with `lvm`).
    stuck: Arc<Stuck>,
    /// Where the mounts of a volume in use are found, for the refusal to name them.
    mounts: MountTables,
}

pub fn backend_error(e: LvmError) -> BackendError {
    match e {
        LvmError::VgNotFound(vg) => BackendError::NotReady(format!("volume group {vg:?} not found")),
        LvmError::InsufficientSpace(m) => BackendError::InsufficientSpace(m),
        LvmError::TimedOut(m) => BackendError::Busy(m),
        other => BackendError::Io(other.to_string()),
    }
}

pub fn lv_name(volume: &str) -> String {
    format!("{LV_PREFIX}{volume}")
}

/// The LV that holds the extents a thick block volume is about to grow by while they are zeroed. `.` is in no
/// volume name (DNS-1123 labels), so it is never another volume's LV.
fn spare_lv_name(volume: &str) -> String {
    format!("{LV_PREFIX}{volume}.grow")
}

/// The characters lvm2 allows in a tag.
fn tag_safe(v: &str) -> bool {
    !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || "_+.-/=!:&#".contains(c))
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect();
    String::from_utf8(bytes?).ok()
}

/// The tags that carry a volume's record (everything the inventory needs).
pub fn record_tags(r: &VolumeRecord) -> Result<Vec<String>, BackendError> {
    let claim = format!("{}/{}", r.claim.namespace, r.claim.name);
    if !tag_safe(&claim) || !tag_safe(&r.created_at) {
        return Err(BackendError::Io(format!(
            "claim {claim:?} or time {:?} cannot be written into an LVM tag",
            r.created_at
        )));
    }
    let mut tags = vec![
        format!("{TAG}pool={}", r.pool),
        format!("{TAG}v={}", r.version),
        format!("{TAG}volume={}", r.name),
        format!("{TAG}size={}", r.size_bytes),
        format!("{TAG}volmode={:?}", r.volume_mode),
        format!("{TAG}claim={claim}"),
        format!("{TAG}owner={}:{}", r.uid, r.gid),
        format!("{TAG}perm={:o}", r.mode),
        format!("{TAG}created={}", r.created_at),
    ];
    if let Some(fs) = &r.fs_type {
        tags.push(format!("{TAG}fs={fs}"));
    }
    if !r.mount_options.is_empty() {
        // Mount options may hold characters a tag may not (','): hex of the comma-joined list.
        tags.push(format!("{TAG}mountopts={}", hex(&r.mount_options.join(","))));
    }
    Ok(tags)
}

/// The `--addtag` arguments of a new LV: its record, `creating` (lifted as the create's last step) and, until its
/// PV exists, `unpublished`.
fn new_lv_tags(record: &VolumeRecord) -> Result<Vec<String>, BackendError> {
    let unpublished = (!record.published).then(|| UNPUBLISHED.to_owned());
    let tags = record_tags(record)?.into_iter().chain([CREATING.to_owned()]).chain(unpublished);
    Ok(tags.flat_map(|tag| ["--addtag".to_owned(), tag]).collect())
}

/// The UUID in an XFS superblock (`sb_uuid`, bytes 32–47 after the magic `XFSB`): the one a mount refuses to
/// see twice. `None` for anything else.
fn xfs_sb_uuid(sb: &[u8]) -> Option<[u8; 16]> {
    if sb.get(..4)? != b"XFSB" {
        return None;
    }
    sb.get(32..48)?.try_into().ok()
}

/// The UUID of the XFS filesystem on `dev`, read past the page cache (O_DIRECT): what is on the device now.
fn xfs_uuid(dev: &str) -> Result<[u8; 16], BackendError> {
    use rustix::fs::{Mode, OFlags};
    const BLOCK: usize = 4096;
    let fd = rustix::fs::open(dev, OFlags::RDONLY | OFlags::DIRECT | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| io(dev, e))?;
    // O_DIRECT reads into memory aligned to the device's logical block size: one page is aligned enough.
    let mut buf = vec![0u8; 2 * BLOCK];
    let at = buf.as_ptr().align_offset(BLOCK);
    let block = &mut buf[at..at + BLOCK];
    let n = rustix::io::pread(&fd, &mut *block, 0).map_err(|e| io(dev, e))?;
    xfs_sb_uuid(&block[..n]).ok_or_else(|| BackendError::Io(format!("{dev} holds no XFS superblock")))
}

/// The record of a volume from its LV's tags; `Err` says what is missing or malformed.
pub fn record_from_tags(tags: &[String]) -> Result<VolumeRecord, String> {
    let get = |key: &str| {
        let prefix = format!("{TAG}{key}=");
        tags.iter().find_map(|t| t.strip_prefix(&prefix)).ok_or_else(|| format!("no {prefix} tag"))
    };
    let num = |key: &str| get(key)?.parse::<u64>().map_err(|_| format!("tag {TAG}{key} is not a number"));
    let (namespace, name) = get("claim")?.split_once('/').ok_or("tag berth:claim is not namespace/name")?;
    let (uid, gid) = get("owner")?.split_once(':').ok_or("tag berth:owner is not uid:gid")?;
    let mode = u32::from_str_radix(get("perm")?, 8).map_err(|_| "tag berth:perm is not octal")?;
    let volume_mode = match get("volmode")? {
        "Filesystem" => VolumeMode::Filesystem,
        "Block" => VolumeMode::Block,
        other => return Err(format!("tag berth:volmode {other:?}")),
    };
    let mount_options = match get("mountopts") {
        Ok(h) => unhex(h).ok_or("tag berth:mountopts is not hex")?.split(',').map(str::to_owned).collect(),
        Err(_) => vec![],
    };
    Ok(VolumeRecord {
        version: num("v")? as u32,
        name: get("volume")?.to_owned(),
        pool: get("pool")?.to_owned(),
        size_bytes: num("size")?,
        volume_mode,
        claim: ClaimRef { namespace: namespace.to_owned(), name: name.to_owned() },
        uid: uid.parse().map_err(|_| "tag berth:owner uid")?,
        gid: gid.parse().map_err(|_| "tag berth:owner gid")?,
        mode,
        created_at: get("created")?.to_owned(),
        fs_type: get("fs").ok().map(str::to_owned),
        mount_options,
        path: String::new(),
        project_id: None,
        published: !tags.iter().any(|t| t == UNPUBLISHED),
    })
}

impl LvmPool {
    /// `<vg>/<lv>`: how lvm2's commands name an LV of this pool's volume group.
    fn full_name(&self, lv: &str) -> String {
        format!("{}/{}", self.vg, lv)
    }

    // The pool's identity (name, root, volume group, thin pool, limits) and how it runs commands; a struct for
    // them would only be built here.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pool: &str,
        root: &Path,
        vg: &str,
        thin: Option<Thin>,
        limits: PoolLimits,
        lvm_config: Option<String>,
        deadline: Duration,
        mounts: MountTables,
    ) -> LvmPool {
        let stuck = Arc::new(Stuck::default());
        let lvm = Lvm::new(lvm_config, deadline, stuck.clone());
        LvmPool { pool: pool.into(), root: root.into(), vg: vg.into(), thin, limits, lvm, deadline, stuck, mounts }
    }

    /// Runs a program other than lvm2 (mkfs, mount, resize), within the pool's command deadline.
    fn run(&self, program: &str, args: &[&str]) -> Result<(), BackendError> {
        let mut cmd = Command::new(program);
        cmd.args(args).env("LC_ALL", "C");
        let out = command::output(&mut cmd, self.deadline, &self.stuck).map_err(|e| match e {
            CommandError::TimedOut { .. } => BackendError::Busy(e.to_string()),
            CommandError::Spawn { .. } | CommandError::Failed { .. } => BackendError::Io(e.to_string()),
        })?;
        if !out.status.success() {
            // The first lines say why; mkfs then prints its whole usage text.
            let stderr = String::from_utf8_lossy(&out.stderr);
            let why: Vec<&str> = stderr.lines().take(3).collect();
            return Err(BackendError::Io(format!("{program} {}: {} {}", args.join(" "), out.status, why.join("; "))));
        }
        Ok(())
    }

    fn marker_tag(&self) -> String {
        format!("{TAG}pool={}", self.pool)
    }

    /// `berth-agent init-pool`: creates the root (mount points) and tags the volume group (which the
    /// administrator made) as this pool's.
    pub fn init(&self) -> Result<(), BackendError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&self.root)
            .map_err(|e| io(self.root.display(), e))?;
        let vg = self.lvm.vg(&self.vg).map_err(backend_error)?;
        if !vg.tags.contains(&self.marker_tag()) {
            self.lvm.run(&["vgchange", "--addtag", &self.marker_tag(), &self.vg]).map_err(backend_error)?;
        }
        Ok(())
    }

    /// Ready: the volume group carries the pool's tag, the root exists, and a thin pool (if any) is there and
    /// zeroes new blocks (Berth relies on that to keep deleted data out of new thin volumes). Returns the volume
    /// group and, for thin pools, its LVs (thick pools need no `lvs` to know their space).
    fn check_ready(&self) -> Result<(VgRow, Vec<LvRow>), BackendError> {
        let vg = self.check_marked()?;
        let Some(thin) = &self.thin else { return Ok((vg, vec![])) };
        let lvs = self.lvm.lvs(&self.vg).map_err(backend_error)?;
        {
            let Some(pool) = lvs.iter().find(|l| l.name == thin.pool_lv && l.segtype == "thin-pool") else {
                return Err(BackendError::NotReady(format!("no thin pool {}", self.full_name(&thin.pool_lv))));
            };
            if pool.zero != "zero" {
                return Err(BackendError::NotReady(format!(
                    "thin pool {} does not zero new blocks (lvchange -Z y): deleted data could show up in new volumes",
                    self.full_name(&thin.pool_lv)
                )));
            }
        }
        Ok((vg, lvs))
    }

    /// The volume group is there with this pool's tag, and the root exists.
    fn check_marked(&self) -> Result<VgRow, BackendError> {
        let vg = self.lvm.vg(&self.vg).map_err(backend_error)?;
        if !vg.tags.contains(&self.marker_tag()) {
            return Err(BackendError::NotReady(format!(
                "volume group {:?} has no tag {}: run `berth-agent init-pool`",
                self.vg,
                self.marker_tag()
            )));
        }
        if !self.root.is_dir() {
            return Err(BackendError::NotReady(format!("{} is not a directory", self.root.display())));
        }
        Ok(vg)
    }

    fn mount_point(&self, volume: &str) -> PathBuf {
        self.root.join(volume)
    }

    fn mounted(&self, dev: &str, target: &Path) -> Result<bool, BackendError> {
        let rdev = std::fs::metadata(dev).map_err(|e| io(dev, e))?.rdev();
        let own = self.mounts.own().map_err(BackendError::Io)?;
        Ok(mounted_at(&own, target) == Some((rustix::fs::major(rdev), rustix::fs::minor(rdev))))
    }

    fn activate(&self, lv: &LvRow) -> Result<(), BackendError> {
        if !lv.active {
            self.lvm.run(&["lvchange", "-ay", &self.full_name(&lv.name)]).map_err(backend_error)?;
        }
        if !Path::new(&lv.dm_path).exists() {
            return Err(BackendError::Io(format!("{} is active but {} does not exist", lv.name, lv.dm_path)));
        }
        Ok(())
    }

    /// The volume's mount point, made if it is missing.
    fn make_mount_point(&self, volume: &str) -> Result<PathBuf, BackendError> {
        let target = self.mount_point(volume);
        match std::fs::DirBuilder::new().mode(0o700).create(&target) {
            Ok(()) => Ok(target),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(target),
            Err(e) => Err(io(target.display(), e)),
        }
    }

    fn mount(&self, lv: &LvRow, record: &VolumeRecord) -> Result<PathBuf, BackendError> {
        let target = self.make_mount_point(&record.name)?;
        if !self.mounted(&lv.dm_path, &target)? {
            let fs = record.fs_type.as_deref().unwrap_or("ext4");
            let target_str = target.to_str().ok_or_else(|| BackendError::Io("root is not UTF-8".into()))?;
            // Last, so that they win over anything before them: nothing setuid or device-like on a pod's volume works.
            let opts = record.mount_options.iter().map(String::as_str).chain(["nosuid", "nodev"]).collect::<Vec<_>>();
            let opts = opts.join(",");
            let mut args = vec!["-t", fs, "-o", &opts];
            args.extend([lv.dm_path.as_str(), target_str]);
            self.run("mount", &args)?;
            if !self.mounted(&lv.dm_path, &target)? {
                return Err(BackendError::Io(format!("{} is not mounted at {target_str} after mount", lv.dm_path)));
            }
        }
        Ok(target)
    }

    /// Unmounts the agent's own mount of the volume's filesystem; whether there was one.
    fn unmount(&self, lv: &LvRow, volume: &str) -> Result<bool, BackendError> {
        let target = self.mount_point(volume);
        if Path::new(&lv.dm_path).exists() && self.mounted(&lv.dm_path, &target)? {
            self.run("umount", &[target.to_str().unwrap_or_default()])?;
            return Ok(true);
        }
        Ok(false)
    }

    fn remove_mount_point(&self, volume: &str) -> Result<(), BackendError> {
        let target = self.mount_point(volume);
        match std::fs::remove_dir(&target) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(target.display(), e)),
        }
    }

    /// Unmounts the agent's own mount of `lv` (of `volume`), then refuses (`InUse`) if its device is still open:
    /// something else has it (crate::in_use), and what was unmounted is mounted back. Returns the LV as lvm2
    /// reports it now.
    fn release(&self, lv: LvRow, volume: &str) -> Result<LvRow, BackendError> {
        let unmounted = self.unmount(&lv, volume)?;
        // The open count the agent's own mount added is gone only now.
        let lv = if unmounted { self.lvm.lv(&self.vg, &lv.name).map_err(backend_error)? } else { lv };
        if !device_held(&lv.device_open, lv.active) {
            return Ok(lv);
        }
        let mut why = format!("volume {volume} is in use: its device {} is open", lv.dm_path);
        match self.holders(&lv) {
            Ok(holders) if !holders.is_empty() => {
                let points: Vec<&str> = holders.iter().take(3).map(String::as_str).collect();
                why.push_str(&format!(" and its filesystem mounted at {}", points.join(", ")));
            }
            // Not mounted anywhere: a raw block volume kubelet maps (through a loop device), or a process.
            Ok(_) => why.push_str(" (a pod's raw block device, or a process that has it open)"),
            Err(e) => why.push_str(&format!(" ({e})")),
        }
        why.push_str("; nothing was changed, delete it again once nothing holds it");
        if unmounted {
            let back = record_from_tags(&lv.tags).map_err(BackendError::Io).and_then(|r| self.mount(&lv, &r));
            if let Err(e) = back {
                tracing::error!(pool = %self.pool, volume, error = %e, "a volume in use was unmounted for its delete and cannot be mounted back: its PV path is missing until the agent restarts");
                why.push_str(&format!("; mounting it back at {} failed: {e}", self.mount_point(volume).display()));
            }
        }
        Err(BackendError::InUse(why))
    }

    /// Where the host's mount table shows the filesystem of `lv` mounted.
    fn holders(&self, lv: &LvRow) -> Result<Vec<String>, String> {
        let rdev = std::fs::metadata(&lv.dm_path).map_err(|e| format!("{}: {e}", lv.dm_path))?.rdev();
        let device = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
        let host = self.mounts.host()?;
        Ok(host.into_iter().filter(|m| m.device == device).map(|m| m.mount_point).collect())
    }

    /// Makes the filesystem, mounts it, and makes `data/` with the request's owner and mode.
    fn make_filesystem(&self, lv: &LvRow, record: &VolumeRecord) -> Result<PathBuf, BackendError> {
        match record.fs_type.as_deref() {
            Some("xfs") => self.run("mkfs.xfs", &["-q", "-f", &lv.dm_path])?,
            Some("ext4") => self.run("mkfs.ext4", &["-q", "-F", &lv.dm_path])?,
            other => return Err(BackendError::Io(format!("no filesystem {other:?}"))),
        }
        crate::failpoints::point("lvm-create-after-mkfs");
        let target = self.mount(lv, record)?;
        crate::failpoints::point("lvm-create-after-mount");
        let data = make_data_dir(&target, record)?;
        std::fs::File::open(&target).and_then(|d| d.sync_all()).map_err(|e| io(target.display(), e))?;
        crate::failpoints::point("lvm-create-after-data-dir");
        Ok(data)
    }

    /// Makes a new LV usable: active, and for a Filesystem volume the filesystem made and mounted.
    fn make_usable(&self, lv: &LvRow, record: &VolumeRecord) -> Result<String, BackendError> {
        self.activate(lv)?;
        Ok(match record.volume_mode {
            VolumeMode::Filesystem => self.make_filesystem(lv, record)?.display().to_string(),
            VolumeMode::Block => lv.dm_path.clone(),
        })
    }

    /// The thin pool clones are made in; a thick pool makes none.
    fn thin_for_clones(&self) -> Result<&Thin, BackendError> {
        self.thin.as_ref().ok_or_else(|| {
            BackendError::Unsupported(format!(
                "pool {:?} is a thick lvm pool: a clone would be a full block copy of the source; Berth clones only \
                 volumes of lvm thin pools (a thin snapshot)",
                self.pool
            ))
        })
    }

    /// Gives the XFS filesystem of a new clone `lv` a UUID of its own. A thin snapshot is its source's twin, UUID
    /// included, and XFS refuses to mount a filesystem whose UUID is mounted already: the clone would not mount
    /// beside its source, and after a reboot whichever of the two mounted second would fail. Mounting every XFS
    /// volume with `nouuid` would do too, but only as long as every mount of it does (the agent's, after each
    /// reboot; an administrator's; a rescue's); a UUID of its own holds for any mount. xfs_admin changes it only
    /// with a clean log, and the snapshot of a filesystem in use has a dirty one (lvm2 froze it mid-flight: the
    /// clone is as after a crash at that instant): a mount with `nouuid` replays it, the unmount leaves it clean.
    /// xfs_admin prints its refusals but exits 0, so the UUID is read back from the device.
    fn own_xfs_uuid(&self, lv: &LvRow, volume: &str) -> Result<(), BackendError> {
        let twin = xfs_uuid(&lv.dm_path)?;
        let target = self.make_mount_point(volume)?;
        let target = target.to_str().ok_or_else(|| BackendError::Io("root is not UTF-8".into()))?;
        self.run("mount", &["-t", "xfs", "-o", "nouuid,nosuid,nodev", &lv.dm_path, target])?;
        self.run("umount", &[target])?;
        self.run("xfs_admin", &["-U", "generate", &lv.dm_path])?;
        if xfs_uuid(&lv.dm_path)? == twin {
            return Err(BackendError::Io(format!(
                "xfs_admin -U generate {} left the clone with its source's UUID",
                lv.dm_path
            )));
        }
        Ok(())
    }

    /// The last step of a create: the `creating` tag lifted, the volume is whole.
    fn lift_creating(&self, record: VolumeRecord) -> Result<VolumeRecord, BackendError> {
        let full = self.full_name(&lv_name(&record.name));
        self.lvm.run(&["lvchange", "--deltag", CREATING, &full]).map_err(backend_error)?;
        crate::failpoints::point("lvm-create-after-untag");
        Ok(record)
    }

    /// Whether a volume's bytes must be zeroed before anyone has them: a raw block volume of a thick pool, whose
    /// extents hold whatever was written there before (a volume removed outside Berth, never zeroed). A thin pool
    /// zeroes every block it provisions (it must, or it is not ready: `check_ready`), and a filesystem volume is
    /// only ever seen through its filesystem, which reads unwritten blocks as zeroes (docs/agent-config.md).
    fn zeroes_new_space(&self, record: &VolumeRecord) -> bool {
        self.thin.is_none() && record.volume_mode == VolumeMode::Block
    }

    /// What zeroing the whole of `lv` is, and what is left if it cannot be finished.
    fn whole(&self, lv: &LvRow, volume: Option<String>) -> Zeroing {
        let leftover = Debris { path: PathBuf::from(self.full_name(&lv.name)), volume, size_bytes: lv.size };
        Zeroing { device: PathBuf::from(&lv.dm_path), offset: 0, len: lv.size, leftover }
    }

    /// Removes an LV this pool no longer (or never completely) handed out; a thick one is zeroed first.
    fn remove_lv(&self, lv: &LvRow) -> Result<(), BackendError> {
        let full = self.full_name(&lv.name);
        if self.thin.is_none() {
            self.activate(lv)?;
            self.zero(&self.whole(lv, None))?;
            crate::failpoints::point("lvm-purge-after-zero");
        }
        self.lvm.run(&["lvremove", "-y", &full]).map_err(backend_error)?;
        crate::failpoints::point("lvm-purge-after-lvremove");
        Ok(())
    }

    fn grow_filesystem(&self, lv: &LvRow, record: &VolumeRecord) -> Result<(), BackendError> {
        if record.volume_mode == VolumeMode::Filesystem {
            match record.fs_type.as_deref() {
                Some("xfs") => self.run("xfs_growfs", &[&self.mount_point(&record.name).display().to_string()])?,
                _ => self.run("resize2fs", &[&lv.dm_path])?,
            }
        }
        Ok(())
    }

    /// The size tag of `record`'s LV changed to `size_bytes`.
    fn record_size(&self, lv: &LvRow, record: &VolumeRecord, size_bytes: u64) -> Result<(), BackendError> {
        let (old, new) = (format!("{TAG}size={}", record.size_bytes), format!("{TAG}size={size_bytes}"));
        let full = self.full_name(&lv.name);
        self.lvm.run(&["lvchange", "--deltag", &old, "--addtag", &new, &full]).map_err(backend_error)?;
        Ok(())
    }

    fn path_of(&self, lv: &LvRow, record: &VolumeRecord) -> String {
        match record.volume_mode {
            VolumeMode::Filesystem => self.mount_point(&record.name).join(DATA_DIR).display().to_string(),
            VolumeMode::Block => lv.dm_path.clone(),
        }
    }
}

impl Backend for LvmPool {
    fn kind(&self) -> &'static str {
        "lvm"
    }

    fn stuck(&self) -> Option<&Stuck> {
        Some(&self.stuck)
    }

    fn enforcement(&self) -> Enforcement {
        Enforcement::Device
    }

    fn probe(&self, own_sizes: &[u64]) -> Result<PoolProbe, BackendError> {
        let (vg, lvs) = self.check_ready()?;
        let space = match &self.thin {
            None => LvmSpace::Thick { vg_size: vg.size, vg_free: vg.free },
            Some(thin) => {
                let pool = lvs.iter().find(|l| l.name == thin.pool_lv).expect("checked by check_ready");
                LvmSpace::Thin {
                    pool_size: pool.size,
                    data_percent: pool.data_percent,
                    metadata_percent: pool.metadata_percent,
                    virtual_sum: lvs.iter().filter(|l| l.pool_lv == thin.pool_lv).map(|l| l.size).sum(),
                    ratio: thin.ratio,
                    threshold_percent: thin.threshold_percent,
                }
            }
        };
        Ok(PoolProbe::Exact(lvm_capacity(self.limits, space, own_sizes)))
    }

    fn recover(&self) -> Result<Recovered, BackendError> {
        self.check_ready()?;
        let lvs = self.lvm.lvs(&self.vg).map_err(backend_error)?;
        if let Some(thin) = &self.thin
            && lvs.iter().any(|l| l.name == thin.pool_lv && !l.active)
        {
            // An inactive thin pool reports no data usage, so it would promise nothing (capacity.rs) until one of
            // its volumes was activated; after a reboot with none, that is never. Activate it as a volume would.
            let full = self.full_name(&thin.pool_lv);
            if let Err(e) = self.lvm.run(&["lvchange", "-ay", &full]) {
                tracing::warn!(pool = %self.pool, thin_pool = %full, error = %e, "cannot activate the thin pool: it promises nothing until it is active");
            }
        }
        let marker = self.marker_tag();
        let (mut volumes, mut debris) = (Vec::new(), Vec::new());
        for lv in lvs.iter().filter(|l| l.tags.contains(&marker)) {
            if lv.tags.iter().any(|t| t == CREATING || t == DELETING) {
                // Removed by `purge`, in the background (zeroing a thick LV takes as long as writing it).
                let volume = lv.name.strip_prefix(LV_PREFIX).map(str::to_owned);
                let path = PathBuf::from(self.full_name(&lv.name));
                debris.push(Debris { path, volume, size_bytes: lv.size });
                continue;
            }
            let mut record = match record_from_tags(&lv.tags) {
                Ok(r) if r.version == VOLUME_MARKER_VERSION && lv.name == lv_name(&r.name) => r,
                Ok(r) => {
                    tracing::warn!(pool = %self.pool, lv = %lv.name, version = r.version, "LV has tags this agent does not own; leaving it alone");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(pool = %self.pool, lv = %lv.name, error = %e, "LV with this pool's tag but no readable record; leaving it alone");
                    continue;
                }
            };
            record.path = self.path_of(lv, &record);
            // Make the volume usable again (node reboot): active, and mounted for filesystem volumes. A volume that
            // cannot be is still listed (it exists; it can be deleted), and its PV path stays absent.
            let usable = self.activate(lv).and_then(|()| match record.volume_mode {
                VolumeMode::Filesystem => self.mount(lv, &record).map(|_| ()),
                VolumeMode::Block => Ok(()),
            });
            match usable {
                Ok(()) if Path::new(&record.path).exists() => {}
                Ok(()) => {
                    tracing::error!(pool = %self.pool, volume = %record.name, path = %record.path, "mounted, but the volume's path is missing")
                }
                Err(e) => {
                    tracing::error!(pool = %self.pool, volume = %record.name, error = %e, "cannot activate or mount the volume")
                }
            }
            volumes.push(record);
        }
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Recovered { volumes, debris })
    }

    fn create(&self, mut record: VolumeRecord) -> Result<Made, BackendError> {
        let name = lv_name(&record.name);
        let size = format!("{}b", record.size_bytes);
        let mut args: Vec<String> = vec!["lvcreate".into(), "-y".into(), "-W".into(), "y".into()];
        match &self.thin {
            None => args.extend(["-L".into(), size, "-n".into(), name.clone(), self.vg.clone()]),
            Some(t) => {
                args.extend(["-V".into(), size, "-T".into(), self.full_name(&t.pool_lv), "-n".into(), name.clone()])
            }
        }
        args.extend(new_lv_tags(&record)?);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.lvm.run(&args).map_err(backend_error)?;
        crate::failpoints::point("lvm-create-after-lvcreate");
        // On failure what was made keeps its `creating` tag: debris, which the agent removes in the background
        // (`leftover_of_create`), or the next start does.
        let lv = self.lvm.lv(&self.vg, &name).map_err(backend_error)?;
        record.path = self.make_usable(&lv, &record)?;
        if self.zeroes_new_space(&record) {
            let zeroing = self.whole(&lv, Some(record.name.clone()));
            return Ok(Made::ZeroFirst(record, zeroing));
        }
        self.lift_creating(record).map(Made::Ready)
    }

    /// A create that was [`Made::ZeroFirst`], its LV zeroed: made whole.
    fn finish_create(&self, record: VolumeRecord) -> Result<VolumeRecord, BackendError> {
        crate::failpoints::point("lvm-create-after-zero");
        self.lift_creating(record)
    }

    fn can_clone(&self) -> Result<(), BackendError> {
        self.thin_for_clones().map(|_| ())
    }

    /// A thin snapshot of the source's LV, made a volume like any other: its own record tags (a thin snapshot
    /// inherits none of its origin's: seen with lvm2 2.03.16 in the VM), active, grown to its size, its filesystem
    /// mounted as it is (no mkfs: it is the content; its `data/` is the source's, owner and mode included). lvm2
    /// suspends the origin while it takes the snapshot, which freezes a filesystem mounted on it, so the clone holds
    /// that filesystem as after a crash at that instant: consistent, its journal replayed at its first mount. The
    /// snapshot is an independent thin volume from then on: either may be written, grown or deleted.
    fn clone_from(&self, mut record: VolumeRecord, source: &VolumeRecord) -> Result<Made, BackendError> {
        let thin = self.thin_for_clones()?;
        let origin = self.lvm.lv(&self.vg, &lv_name(&source.name)).map_err(backend_error)?;
        if origin.pool_lv != thin.pool_lv {
            return Err(BackendError::Io(format!(
                "{} is not a thin volume of {}",
                self.full_name(&origin.name),
                self.full_name(&thin.pool_lv)
            )));
        }
        let name = lv_name(&record.name);
        // `-s` without a size: a thin snapshot, sharing the origin's blocks (with one it would be an old-style
        // copy-on-write snapshot of that size). Not `-W y`: the filesystem signature is the content. `-kn`: thin
        // snapshots skip activation by default, so `lvchange -ay` and a boot's autoactivation would pass it over.
        let origin_name = self.full_name(&origin.name);
        let mut args: Vec<String> =
            ["lvcreate", "-y", "-s", "--setactivationskip", "n", "-n", &name, &origin_name].map(str::to_owned).into();
        args.extend(new_lv_tags(&record)?);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.lvm.run(&args).map_err(backend_error)?;
        crate::failpoints::point("lvm-clone-after-lvcreate");
        // From here on a failure leaves the LV tagged `creating`: debris (`leftover_of_create`).
        let mut lv = self.lvm.lv(&self.vg, &name).map_err(backend_error)?;
        self.activate(&lv)?;
        let grown = lv.size < record.size_bytes;
        if grown {
            let full = self.full_name(&lv.name);
            self.lvm.run(&["lvextend", "-L", &format!("{}b", record.size_bytes), &full]).map_err(backend_error)?;
            lv = self.lvm.lv(&self.vg, &name).map_err(backend_error)?;
        }
        record.path = match record.volume_mode {
            VolumeMode::Block => lv.dm_path.clone(),
            VolumeMode::Filesystem => {
                if record.fs_type.as_deref() == Some("xfs") {
                    self.own_xfs_uuid(&lv, &record.name)?;
                    crate::failpoints::point("lvm-clone-after-uuid");
                }
                let target = self.mount(&lv, &record)?;
                crate::failpoints::point("lvm-clone-after-mount");
                if grown {
                    self.grow_filesystem(&lv, &record)?;
                }
                let data = target.join(DATA_DIR);
                if !std::fs::symlink_metadata(&data).is_ok_and(|m| m.is_dir()) {
                    return Err(BackendError::Io(format!(
                        "the clone of {} has no directory {}: its source's filesystem had none",
                        source.name,
                        data.display()
                    )));
                }
                data.display().to_string()
            }
        };
        self.lift_creating(record).map(Made::Ready)
    }

    /// BLKZEROOUT in the agent's process (zeroing.rs), within the pool's deadline for that many bytes.
    fn zero(&self, zeroing: &Zeroing) -> Result<(), BackendError> {
        let (device, offset, len) = (zeroing.device.clone(), zeroing.offset, zeroing.len);
        let what = format!("zeroing {len} bytes of {} (BLKZEROOUT)", device.display());
        let started = std::time::Instant::now();
        let outcome = |r: &std::io::Result<()>| r.as_ref().map_or_else(|e| e.to_string(), |()| "zeroed".to_owned());
        command::call(
            &what,
            zeroing::deadline(self.deadline, len),
            &self.stuck,
            move || zero_out(&device, offset, len),
            outcome,
        )
        .map_err(|e| match e {
            CommandError::TimedOut { .. } => BackendError::Busy(e.to_string()),
            _ => BackendError::Io(e.to_string()),
        })?;
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(pool = %self.pool, device = %zeroing.device.display(), bytes = len, seconds, "zeroed");
        Ok(())
    }

    fn leftover_of_create(&self, volume: &str) -> Option<Debris> {
        let lv = match self.lvm.lv(&self.vg, &lv_name(volume)) {
            Ok(lv) => lv,
            Err(LvmError::LvNotFound(_)) => return None,
            Err(e) => {
                tracing::error!(pool = %self.pool, volume, error = %e, "cannot tell what a failed create left: the next start finds it");
                return None;
            }
        };
        let path = PathBuf::from(self.full_name(&lv.name));
        lv.tags.iter().any(|t| t == CREATING).then(|| Debris {
            path,
            volume: Some(volume.to_owned()),
            size_bytes: lv.size,
        })
    }

    fn publish(&self, record: &VolumeRecord) -> Result<(), BackendError> {
        self.check_marked()?;
        let lv = self.lvm.lv(&self.vg, &lv_name(&record.name)).map_err(backend_error)?;
        if lv.tags.iter().any(|t| t == UNPUBLISHED) {
            // lvm2 commits the metadata change before it returns.
            let full = self.full_name(&lv.name);
            self.lvm.run(&["lvchange", "--deltag", UNPUBLISHED, &full]).map_err(backend_error)?;
            crate::failpoints::point("lvm-publish-after-untag");
        }
        Ok(())
    }

    /// What the volume's own filesystem says is used, read through `<mount>/data` (which exists only while it is
    /// mounted); block volumes have no such number.
    fn used_bytes(&self, volumes: &[&VolumeRecord]) -> Vec<Option<u64>> {
        volumes
            .iter()
            .map(|v| {
                let data = self.mount_point(&v.name).join(DATA_DIR);
                (v.volume_mode == VolumeMode::Filesystem)
                    .then(|| rustix::fs::statvfs(&data).ok())
                    .flatten()
                    .map(|st| st.f_blocks.saturating_sub(st.f_bfree) * st.f_frsize)
            })
            .collect()
    }

    /// lvextend (to whole extents), then the filesystem grown while mounted (resize2fs on the device, xfs_growfs
    /// on the mount point), then the size tag. Each step is idempotent, so a repeat after a crash completes it.
    /// A raw block volume of a thick pool gets only extents zeroed beforehand: an LV made on the free extents
    /// it will have, zeroed (without the agent's lock), removed, and its extents named to lvextend
    /// ([`LvmPool::finish_expand`]). Zeroing after lvextend would let a pod read the old bytes meanwhile.
    fn expand(&self, record: &VolumeRecord, size_bytes: u64) -> Result<Made, BackendError> {
        self.check_marked()?;
        let lv = self.lvm.lv(&self.vg, &lv_name(&record.name)).map_err(backend_error)?;
        let grown = VolumeRecord { size_bytes, ..record.clone() };
        if lv.size >= size_bytes || !self.zeroes_new_space(record) {
            if lv.size < size_bytes {
                let full = self.full_name(&lv.name);
                self.lvm.run(&["lvextend", "-L", &format!("{size_bytes}b"), &full]).map_err(backend_error)?;
            }
            crate::failpoints::point("lvm-expand-after-lvextend");
            self.grow_filesystem(&lv, record)?;
            crate::failpoints::point("lvm-expand-after-resize");
            self.record_size(&lv, record, size_bytes)?;
            crate::failpoints::point("lvm-expand-after-retag");
            return Ok(Made::Ready(grown));
        }
        let extent = self.lvm.vg(&self.vg).map_err(backend_error)?.extent_size;
        let extents = size_bytes.div_ceil(extent) - lv.size / extent;
        let spare = spare_lv_name(&record.name);
        // Tagged as debris from the start: a crash before it is removed leaves it to the next start's removal.
        let (pool_tag, count) = (self.marker_tag(), extents.to_string());
        let args =
            ["lvcreate", "-y", "-l", &count, "-n", &spare, &self.vg, "--addtag", &pool_tag, "--addtag", CREATING];
        self.lvm.run(&args).map_err(backend_error)?;
        crate::failpoints::point("lvm-expand-after-spare-lvcreate");
        let spare = self.lvm.lv(&self.vg, &spare).map_err(backend_error)?;
        self.activate(&spare)?;
        Ok(Made::ZeroFirst(grown, self.whole(&spare, None)))
    }

    fn finish_expand(
        &self,
        record: &VolumeRecord,
        grown: VolumeRecord,
        zeroed: &Zeroing,
    ) -> Result<VolumeRecord, BackendError> {
        crate::failpoints::point("lvm-expand-after-spare-zero");
        let spare = zeroed.leftover.path.to_str().unwrap_or_default();
        let ranges = self.lvm.pe_ranges(spare).map_err(backend_error)?;
        self.lvm.run(&["lvremove", "-y", spare]).map_err(backend_error)?;
        crate::failpoints::point("lvm-expand-after-spare-lvremove");
        // Only those extents: lvm2 would otherwise pick any free ones, not necessarily the zeroed.
        let lv = self.lvm.lv(&self.vg, &lv_name(&record.name)).map_err(backend_error)?;
        let (size, full) = (format!("{}b", grown.size_bytes), self.full_name(&lv.name));
        let mut args = vec!["lvextend", "-L", &size, &full];
        args.extend(ranges.iter().map(String::as_str));
        self.lvm.run(&args).map_err(backend_error)?;
        crate::failpoints::point("lvm-expand-after-spare-lvextend");
        self.record_size(&lv, record, grown.size_bytes)?;
        Ok(grown)
    }

    fn detach(&self, name: &str) -> Result<Option<PathBuf>, BackendError> {
        self.check_marked()?;
        let lv = match self.lvm.lv(&self.vg, &lv_name(name)) {
            Ok(lv) => lv,
            Err(LvmError::LvNotFound(_)) => return Ok(None),
            Err(e) => return Err(backend_error(e)),
        };
        let lv = self.release(lv, name)?;
        self.remove_mount_point(name)?;
        crate::failpoints::point("lvm-detach-after-unmount");
        let full = self.full_name(&lv.name);
        self.lvm.run(&["lvchange", "--addtag", DELETING, &full]).map_err(backend_error)?;
        crate::failpoints::point("lvm-detach-after-tag");
        Ok(Some(PathBuf::from(full)))
    }

    /// Also removes debris: an LV a crash left mounted (mid-create) is unmounted first, and one already gone
    /// (removed before a crash could record it) is success.
    fn purge(&self, detached: &Path) -> Result<(), BackendError> {
        let full = detached.to_str().unwrap_or_default();
        let (_, name) = full.split_once('/').ok_or_else(|| BackendError::Io(format!("{full} is not vg/lv")))?;
        let lv = match self.lvm.lv(&self.vg, name) {
            Ok(lv) => lv,
            Err(LvmError::LvNotFound(_)) => return Ok(()),
            Err(e) => return Err(backend_error(e)),
        };
        // Checked again: debris of a delete interrupted by a crash, or left by an agent before this check, may be
        // in use, and zeroing it would destroy a pod's data under it.
        let volume = name.strip_prefix(LV_PREFIX).unwrap_or(name);
        let lv = self.release(lv, volume)?;
        self.remove_mount_point(volume)?;
        self.remove_lv(&lv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> VolumeRecord {
        VolumeRecord {
            version: 1,
            name: "pvc-0f8e3c1a-5b2d".into(),
            pool: "lvm".into(),
            size_bytes: 104857600,
            volume_mode: VolumeMode::Filesystem,
            claim: ClaimRef { namespace: "db".into(), name: "data-db-0".into() },
            uid: 999,
            gid: 998,
            mode: 0o2770,
            created_at: "2026-11-29T05:51:27.123Z".into(),
            fs_type: Some("xfs".into()),
            mount_options: vec!["noatime".into(), "nodiscard".into()],
            path: String::new(),
            project_id: None,
            published: true,
        }
    }

    #[test]
    fn the_record_survives_the_round_trip_through_tags() {
        let r = record();
        let tags = record_tags(&r).unwrap();
        assert!(tags.iter().all(|t| tag_safe(t) && t.len() <= 1024), "{tags:?}");
        assert_eq!(record_from_tags(&tags).unwrap(), r);
        let block = VolumeRecord { volume_mode: VolumeMode::Block, fs_type: None, mount_options: vec![], ..r };
        assert_eq!(record_from_tags(&record_tags(&block).unwrap()).unwrap(), block);
    }

    #[test]
    fn tags_as_recorded_from_lvs_are_read() {
        // Tags come back from `lvs` sorted and comma-joined (testdata/lvm/lvs_thick.json shows the form).
        let mut tags = record_tags(&record()).unwrap();
        tags.sort();
        let joined = tags.join(",");
        let split: Vec<String> = joined.split(',').map(str::to_owned).collect();
        assert_eq!(record_from_tags(&split).unwrap(), record());
        assert!(record_from_tags(&["berth:pool=lvm".into()]).is_err());
    }

    #[test]
    fn an_lv_of_an_agent_before_the_unpublished_tag_reads_as_published() {
        // Written out as `lvs` shows an LV made by the agent of commit 8ec81de (its record_tags, sorted), so a
        // change of today's record_tags cannot make this test agree with itself: an upgrade must adopt those LVs
        // as published, or the audit would take them for orphans.
        let landed = "berth:claim=db/data-db-0,berth:created=2026-11-29T05:51:27.123Z,berth:fs=xfs,\
                      berth:mountopts=6e6f6174696d652c6e6f64697363617264,berth:owner=999:998,berth:perm=2770,\
                      berth:pool=lvm,berth:size=104857600,berth:v=1,berth:volmode=Filesystem,\
                      berth:volume=pvc-0f8e3c1a-5b2d";
        let tags: Vec<String> = landed.split(',').map(str::to_owned).collect();
        assert_eq!(record_from_tags(&tags).unwrap(), record());
        // Today's agent writes the mark on a new LV until its PV exists.
        let mut new = record_tags(&record()).unwrap();
        new.push(UNPUBLISHED.to_owned());
        assert_eq!(record_from_tags(&new).unwrap(), VolumeRecord { published: false, ..record() });
    }

    #[test]
    fn a_new_lv_carries_its_record_creating_and_until_published_unpublished() {
        let args = new_lv_tags(&VolumeRecord { published: false, ..record() }).unwrap();
        let tags: Vec<String> = args.chunks(2).map(|a| (a[0] == "--addtag").then(|| a[1].clone()).unwrap()).collect();
        assert_eq!(tags[..tags.len() - 2], record_tags(&record()).unwrap()[..]);
        assert_eq!(tags[tags.len() - 2..], [CREATING, UNPUBLISHED]);
    }

    #[test]
    fn the_uuid_of_an_xfs_superblock() {
        let mut sb = vec![0u8; 512];
        sb[..4].copy_from_slice(b"XFSB");
        sb[32..48].copy_from_slice(&[7; 16]);
        assert_eq!(xfs_sb_uuid(&sb), Some([7; 16]));
        assert_eq!(xfs_sb_uuid(&sb[..40]), None, "cut short");
        sb[0] = b'Y';
        assert_eq!(xfs_sb_uuid(&sb), None, "not XFS");
    }

    #[test]
    fn lv_names_keep_clear_of_reserved_prefixes() {
        assert_eq!(lv_name("snapshot-1"), "berth-snapshot-1");
        assert!(crate::config::lvm_name(&lv_name(&"a".repeat(63))).is_ok());
    }
}
