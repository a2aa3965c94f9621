//! `hostpath` pools: each volume is a directory under the pool's root.
//!
//! ```text
//! <root>/.berth-pool              pool marker {"pool": "<name>", "version": 1}; without it the pool is not ready
//! <root>/.berth-tmp/              volumes being made or removed; anything here at start is debris
//! <root>/<volume>/volume.json     the volume's marker (VolumeRecord)
//! <root>/<volume>/unpublished     present from the create until a PV is made for the volume (the controller's
//!                                 `PUT …/published`); a volume without it is never an orphan
//! <root>/<volume>/data/           what the PV points at; the pod sees only this
//! ```
//! Create builds `<volume>` complete in `.berth-tmp/` and renames it into place: one atomic step, so a crash
//! leaves either a complete volume or debris. Delete renames it into `.berth-tmp/` first (it leaves the
//! inventory at once), then removes it without following symlinks or crossing mounts. Debris found at start is
//! removed the same way, in the background once the API serves (agent.rs).
//!
//! On a filesystem with project quotas (XFS or ext4 mounted with `prjquota`), `<volume>/` is put in a project of
//! its own, with inheritance, while it is still in `.berth-tmp/` and empty; the project's hard limit is the
//! volume's size plus [`QUOTA_ALLOWANCE`]. The directory's project ID is the record of which ID a volume has
//! (read back at start); an ID is free when no file on the filesystem carries it (see [`quota::first_free`]), and
//! the search starts at a random ID, so a pod cannot guess another volume's. A root that itself passes a project
//! on (PROJINHERIT, set up by hand) gets no per-volume projects: renames between projects would fail (EXDEV).
//!
//! An agent the kernel refuses quotas (no CAP_SYS_ADMIN, or a seccomp profile refusing quotactl: the base
//! DaemonSet; deploy/quota grants it) serves the pool as if the filesystem had none: plain directories,
//! `enforcement: none`, with the reason in the pool's status and a warning in the log ([`enforcement_of`]).

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use super::quota::{self, QuotaState, Refused};
use super::{
    Backend, BackendError, Copying, DATA_DIR, Debris, Enforcement, Made, PoolProbe, Recovered, VOLUME_MARKER_VERSION,
    VolumeRecord, io, make_data_dir,
};
use crate::capacity::FsUsage;
use crate::in_use::{MountTables, describe_holders, directory_holders};
use crate::mountinfo::locate;
use crate::safe_remove::remove_tree;

pub const POOL_MARKER: &str = ".berth-pool";
const STAGING: &str = ".berth-tmp";
const VOLUME_MARKER: &str = "volume.json";
/// An empty file beside the marker while no PV has been made for the volume. Its absence is what "published"
/// means, so volumes made before the mark existed read as published (nothing is deleted on a guess), and older
/// agents, which do not know it, still read the marker.
const UNPUBLISHED: &str = "unpublished";
/// What a volume's project may hold beyond its size: Berth's own files in it (the directories and the marker,
/// twice while the marker is replaced), so the pod can write every byte it asked for.
pub const QUOTA_ALLOWANCE: u64 = 64 << 10;

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct PoolMarker {
    pool: String,
    version: u32,
}

pub struct HostPath {
    pool: String,
    root: PathBuf,
    /// What the kernel refused the agent at a create, though the quota state showed nothing refused: a process's
    /// capabilities and seccomp filter never grow, so it holds until the agent restarts.
    refused_at_create: OnceLock<Refused>,
    /// Whether the pool's refused quotas have been logged (once per pool, not once per sample).
    refusal_logged: AtomicBool,
    /// Where to look for mounts that keep a volume in use.
    mounts: MountTables,
}

/// How a pool whose filesystem's quota state is `state` holds volumes to their sizes, and why it does not when the
/// filesystem could (the pool's `enforcementReason`).
pub fn enforcement_of(state: QuotaState) -> (Enforcement, Option<&'static str>) {
    match state {
        QuotaState::Enforced => (Enforcement::Quota, None),
        QuotaState::Accounted | QuotaState::Off => (Enforcement::None, None),
        QuotaState::Refused(Refused::Quotactl) => (
            Enforcement::None,
            Some(
                "the filesystem has project quotas, but the kernel refuses the agent quotactl: the agent lacks \
                 CAP_SYS_ADMIN, or seccomp refuses quotactl; grant it with the deploy/quota component. New volumes \
                 get no size limit",
            ),
        ),
        QuotaState::Refused(Refused::SetProject) => (
            Enforcement::None,
            Some(
                "the filesystem has project quotas, but the kernel refuses the agent setting a directory's project \
                 (FS_IOC_FSSETXATTR: it needs CAP_FOWNER, and no security module refusing the ioctl). New volumes \
                 get no size limit",
            ),
        ),
    }
}

impl HostPath {
    pub fn new(pool: &str, root: &Path, mounts: MountTables) -> HostPath {
        HostPath {
            pool: pool.to_owned(),
            root: root.to_owned(),
            refused_at_create: OnceLock::new(),
            refusal_logged: AtomicBool::new(false),
            mounts,
        }
    }

    /// Refuses (`InUse`) while the host's mount table shows the directory `dir` (a volume's, or one moved into
    /// staging) or anything in it mounted somewhere: a pod still has it (crate::in_use). A symlink is not
    /// looked through: what is removed is the link, never its target.
    fn check_unused(&self, dir: &Path, what: &str) -> Result<(), BackendError> {
        if !std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
            return Ok(());
        }
        let (parent, name) = match (dir.parent(), dir.file_name()) {
            (Some(p), Some(n)) => (p, n),
            _ => return Err(BackendError::Io(format!("{} names no directory entry", dir.display()))),
        };
        // The path as the host's mount table would show it: the parent's symlinks resolved, the entry itself not.
        let dir = std::fs::canonicalize(parent).map_err(|e| io(parent.display(), e))?.join(name);
        let own = self.mounts.own().map_err(BackendError::Io)?;
        let at = locate(&own, &dir)
            .ok_or_else(|| BackendError::Io(format!("{} is on no mount of the agent's own table", dir.display())))?;
        let host = self.mounts.host().map_err(BackendError::Io)?;
        match directory_holders(&host, &dir, &at) {
            holders if holders.is_empty() => Ok(()),
            holders => Err(BackendError::InUse(describe_holders(what, &holders))),
        }
    }

    /// The explicit init step (`berth-agent init-pool`): creates the root if needed and writes the marker.
    /// Refuses a root that carries another pool's marker.
    pub fn init(&self) -> Result<(), BackendError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&self.root)
            .map_err(|e| io(self.root.display(), e))?;
        let marker = self.root.join(POOL_MARKER);
        if let Ok(text) = std::fs::read_to_string(&marker) {
            let existing: PoolMarker = serde_json::from_str(&text).map_err(|e| io(marker.display(), e))?;
            if existing.pool != self.pool {
                return Err(BackendError::Io(format!("{} belongs to pool {:?}", self.root.display(), existing.pool)));
            }
            return Ok(());
        }
        let body = serde_json::to_vec(&PoolMarker { pool: self.pool.clone(), version: 1 }).expect("serialisable");
        write_synced(&marker, &body)?;
        Ok(())
    }

    fn check_marker(&self) -> Result<(), BackendError> {
        let marker = self.root.join(POOL_MARKER);
        let text = std::fs::read_to_string(&marker).map_err(|e| {
            BackendError::NotReady(format!(
                "{} unreadable ({e}): the disk may not be mounted; run `berth-agent init-pool` once it is",
                marker.display()
            ))
        })?;
        match serde_json::from_str::<PoolMarker>(&text) {
            Ok(m) if m.pool == self.pool => Ok(()),
            Ok(m) => Err(BackendError::NotReady(format!("{} belongs to pool {:?}", self.root.display(), m.pool))),
            Err(e) => Err(BackendError::NotReady(format!("{} is not a pool marker: {e}", marker.display()))),
        }
    }

    fn staging(&self) -> PathBuf {
        self.root.join(STAGING)
    }

    fn ensure_staging(&self) -> Result<PathBuf, BackendError> {
        let staging = self.staging();
        match std::fs::DirBuilder::new().mode(0o700).create(&staging) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(staging.display(), e)),
        }
        self.check_staging(&staging)?;
        Ok(staging)
    }

    /// `.berth-tmp` must be a real directory on the root's filesystem, never a symlink leading elsewhere.
    fn check_staging(&self, staging: &Path) -> Result<(), BackendError> {
        let meta = std::fs::symlink_metadata(staging).map_err(|e| io(staging.display(), e))?;
        let root_dev = std::fs::metadata(&self.root).map_err(|e| io(self.root.display(), e))?.dev();
        if !meta.file_type().is_dir() || meta.dev() != root_dev {
            return Err(BackendError::NotReady(format!(
                "{} is not a directory on the pool's filesystem; refusing to use it",
                staging.display()
            )));
        }
        Ok(())
    }

    fn data_path(&self, name: &str) -> PathBuf {
        self.root.join(name).join(DATA_DIR)
    }

    /// The pool root, opened: what quota calls name the filesystem by.
    fn open_root(&self) -> Result<File, BackendError> {
        File::open(&self.root).map_err(|e| io(self.root.display(), e))
    }

    /// The pool's project quota state: the filesystem's, unless the root itself passes a project on, or the kernel
    /// refuses the agent what using it takes. The first refusal seen is logged.
    fn quotas(&self, root: &File) -> std::io::Result<QuotaState> {
        if quota::project_of(root).is_ok_and(|p| p.inherit) {
            return Ok(QuotaState::Off);
        }
        let state = match (quota::state(root)?, self.refused_at_create.get()) {
            (s, Some(&refused)) if s.gives_projects() => QuotaState::Refused(refused),
            (s, _) => s,
        };
        self.log_refusal(state, None);
        Ok(state)
    }

    /// A warning naming the pool, its root and the reason, the first time its quotas are seen refused.
    fn log_refusal(&self, state: QuotaState, error: Option<&std::io::Error>) {
        if let (QuotaState::Refused(_), (_, Some(reason))) = (state, enforcement_of(state))
            && !self.refusal_logged.swap(true, Ordering::Relaxed)
        {
            let error = error.map(|e| e.to_string());
            tracing::warn!(pool = %self.pool, root = %self.root.display(), reason, error, "project quotas are refused to the agent: the pool makes volumes without size limits (enforcement none)");
        }
    }

    /// Puts the new, empty volume directory `dir` in a project of its own limited to `size_bytes`. `None`: the
    /// kernel refused the agent (recorded: the pool makes plain directories from now on).
    fn give_project(&self, fs: &File, dir: &Path, size_bytes: u64) -> Result<Option<u32>, BackendError> {
        let start = fastrand::u32(quota::PROJECT_IDS);
        let refused = |kind: Refused, e: &std::io::Error| {
            if !quota::is_refusal(e) {
                return false;
            }
            let _ = self.refused_at_create.set(kind);
            self.log_refusal(QuotaState::Refused(kind), Some(e));
            true
        };
        let id = match quota::first_free(start, |id| quota::usage(fs, id).map(|u| u.inodes)) {
            Ok(id) => id,
            Err(e) if refused(Refused::Quotactl, &e) => return Ok(None),
            Err(e) => return Err(io("finding a free project ID", e)),
        };
        match quota::set_limit(fs, id, size_bytes + QUOTA_ALLOWANCE) {
            Ok(()) => {}
            Err(e) if refused(Refused::Quotactl, &e) => return Ok(None),
            Err(e) => return Err(io(format!("limiting project {id}"), e)),
        }
        let d = File::open(dir).map_err(|e| io(dir.display(), e))?;
        match quota::set_project(&d, id) {
            Ok(()) => Ok(Some(id)),
            Err(e) if refused(Refused::SetProject, &e) => Ok(None),
            Err(e) => Err(io(format!("putting {} in project {id}", dir.display()), e)),
        }
    }

    /// Removes the limits of project `id`, a removed volume's, before its files go: while any file carries the ID
    /// no create picks it (quota::first_free), so no new volume's limit can be cleared by mistake, and none is
    /// left behind (after the files, XFS may count unlinked inodes a while longer, until it inactivates them in
    /// the background: a check after the removal missed a quarter of a soak's). Best effort: a limit left behind
    /// (the agent refused quotas; a crash, after which the debris's removal clears it) only costs a quota record,
    /// and the next volume to take the ID sets its own.
    fn release_project(&self, id: u32) {
        let Ok(fs) = self.open_root() else { return };
        if !self.quotas(&fs).is_ok_and(QuotaState::gives_projects) {
            return;
        }
        if let Err(e) = quota::clear_limit(&fs, id) {
            tracing::warn!(pool = %self.pool, project = id, error = %e, "cannot release a removed volume's project limit");
        }
    }

    /// At start: the project of each volume, read from its directory, and its limit set again from the marker's
    /// size (which heals an expansion interrupted between the two).
    fn recover_project(&self, fs: Option<&File>, record: &mut VolumeRecord) {
        let dir = self.root.join(&record.name);
        // Only IDs of Berth's range are a volume's own; anything else was inherited or set by someone else.
        let id = match File::open(&dir).and_then(|d| quota::project_of(&d)) {
            Ok(p) if quota::PROJECT_IDS.contains(&p.id) => p.id,
            _ => {
                if fs.is_some() {
                    tracing::warn!(pool = %self.pool, volume = %record.name, "volume has no project quota (made before quotas were on); its size is not enforced");
                }
                return;
            }
        };
        record.project_id = Some(id);
        if let Some(fs) = fs
            && let Err(e) = quota::set_limit(fs, id, record.size_bytes + QUOTA_ALLOWANCE)
        {
            tracing::error!(pool = %self.pool, volume = %record.name, project = id, error = %e, "cannot set the volume's quota");
        }
    }

    /// The create ([`Backend::create`]): the volume made complete in staging, then renamed into place.
    fn make(&self, record: VolumeRecord) -> Result<VolumeRecord, BackendError> {
        let (work, record) = self.stage(record)?;
        self.put_in_place(&work, record).inspect_err(|_| {
            // A new volume is empty: removed at once.
            let _ = remove_tree(&work);
        })
    }

    /// The new volume made whole in staging (project, `data/`, marks, marker, synced): a crash leaves it there as
    /// debris. Returns where it is.
    fn stage(&self, mut record: VolumeRecord) -> Result<(PathBuf, VolumeRecord), BackendError> {
        self.check_marker()?;
        let staging = self.ensure_staging()?;
        let work = staging.join(format!("create-{}-{:08x}", record.name, fastrand::u32(..)));
        std::fs::DirBuilder::new().mode(0o711).create(&work).map_err(|e| io(work.display(), e))?;
        crate::failpoints::point("hostpath-create-after-mkdir");
        // The project goes on while the directory is empty: files only take a project when they are made.
        let root = self.open_root()?;
        let state = self.quotas(&root).map_err(|e| io(format!("project quota state of {}", self.root.display()), e));
        // Refused quotas make the same plain directory as none at all.
        let given = match state {
            Ok(s) if !s.gives_projects() => Ok(None),
            state => state.and_then(|_| self.give_project(&root, &work, record.size_bytes)),
        };
        match given {
            Ok(id) => record.project_id = id,
            Err(e) => {
                let _ = remove_tree(&work);
                return Err(e);
            }
        }
        crate::failpoints::point("hostpath-create-after-project");
        make_data_dir(&work, &record)?;
        crate::failpoints::point("hostpath-create-after-data-dir");
        if !record.published {
            write_synced(&work.join(UNPUBLISHED), b"")?;
        }
        crate::failpoints::point("hostpath-create-after-unpublished-mark");
        let body = serde_json::to_vec_pretty(&record).expect("serialisable");
        write_synced(&work.join(VOLUME_MARKER), &body)?;
        crate::failpoints::point("hostpath-create-after-marker");
        sync_dir(&work)?;
        crate::failpoints::point("hostpath-create-after-staging-sync");
        Ok((work, record))
    }

    /// Moves a volume made in staging (`work`) into place: one rename, the step that makes it a volume.
    fn put_in_place(&self, work: &Path, mut record: VolumeRecord) -> Result<VolumeRecord, BackendError> {
        let target = self.root.join(&record.name);
        // rename(2) onto an existing non-empty directory fails, so a concurrent twin cannot be overwritten.
        // What is left on failure is the caller's to remove (a clone's copy may be large: not under the lock).
        std::fs::rename(work, &target).map_err(|e| io(format!("moving the new volume to {}", target.display()), e))?;
        crate::failpoints::point("hostpath-create-after-rename");
        if let Err(e) = sync_dir(&self.root) {
            // The volume is in place (the rename happened); a crash could lose it before the controller made
            // its PV, which the controller's retry handles like any lost create.
            tracing::warn!(pool = %self.pool, error = %e, "cannot sync the pool root after creating a volume");
        }
        crate::failpoints::point("hostpath-create-after-root-sync");
        record.path = self.data_path(&record.name).display().to_string();
        Ok(record)
    }

    /// The expansion ([`Backend::expand`]): the quota raised, then the marker replaced.
    fn grow(&self, record: &VolumeRecord, size_bytes: u64) -> Result<VolumeRecord, BackendError> {
        self.check_marker()?;
        // The quota first, then the marker: a crash in between leaves the old size in the marker, and the start
        // sets the quota back to it (the controller retries the expansion). Without a project the directory
        // needs nothing. The marker is replaced by rename, so it is never half-written.
        let root = self.open_root()?;
        if let Some(id) = record.project_id {
            // A limit not raised now would stay at the old size on disk: refuse until quotas are back (the
            // controller retries), rather than record a size the quota does not give.
            let state = self.quotas(&root).map_err(|e| io("project quota state", e))?;
            if state == QuotaState::Off {
                return Err(BackendError::NotReady(format!(
                    "volume {} has project {id} but {} has no project quotas now (mounted without prjquota?): its limit cannot be raised",
                    record.name,
                    self.root.display()
                )));
            }
            if let (QuotaState::Refused(_), (_, Some(reason))) = (state, enforcement_of(state)) {
                return Err(BackendError::NotReady(format!(
                    "volume {} has project {id} but its limit cannot be raised on {}: {reason}",
                    record.name,
                    self.root.display()
                )));
            }
            quota::set_limit(&root, id, size_bytes + QUOTA_ALLOWANCE)
                .map_err(|e| io(format!("raising the quota of project {id}"), e))?;
        }
        crate::failpoints::point("hostpath-expand-after-quota");
        let mut grown = record.clone();
        grown.size_bytes = size_bytes;
        let dir = self.root.join(&record.name);
        let tmp = dir.join(format!("{VOLUME_MARKER}.tmp"));
        let body = serde_json::to_vec_pretty(&grown).expect("serialisable");
        // One left by a crash between writing and renaming would make every later expand fail (EEXIST). The
        // directory is Berth's own (a pod sees only data/), so what is there is ours to remove.
        match std::fs::remove_file(&tmp) {
            Ok(()) => {
                tracing::warn!(pool = %self.pool, volume = %record.name, "removed a marker an interrupted expand left")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(tmp.display(), e)),
        }
        write_synced(&tmp, &body)?;
        crate::failpoints::point("hostpath-expand-after-tmp-marker");
        std::fs::rename(&tmp, dir.join(VOLUME_MARKER)).map_err(|e| io(dir.join(VOLUME_MARKER).display(), e))?;
        crate::failpoints::point("hostpath-expand-after-rename");
        sync_dir(&dir)?;
        crate::failpoints::point("hostpath-expand-after-sync");
        Ok(grown)
    }
}

fn write_synced(path: &Path, body: &[u8]) -> Result<(), BackendError> {
    use std::io::Write;
    let mut f = std::fs::File::create_new(path).map_err(|e| io(path.display(), e))?;
    f.write_all(body).and_then(|_| f.sync_all()).map_err(|e| io(path.display(), e))
}

fn sync_dir(path: &Path) -> Result<(), BackendError> {
    std::fs::File::open(path).and_then(|d| d.sync_all()).map_err(|e| io(path.display(), e))
}

/// Makes a copied tree durable before it is put in place: `syncfs` of its filesystem (one call for every file
/// of the tree, however many; it flushes the other volumes' writes too).
fn sync_tree_top(path: &Path) -> Result<(), BackendError> {
    let dir = std::fs::File::open(path).map_err(|e| io(path.display(), e))?;
    rustix::fs::syncfs(&dir).map_err(|e| io(format!("syncfs of {}", path.display()), e))
}

impl Backend for HostPath {
    fn kind(&self) -> &'static str {
        "hostpath"
    }

    /// A clone is a copy of the source's tree (copy_tree.rs: by reflink where the filesystem can), made in
    /// staging and copied into without the agent's lock, then put in place.
    fn can_clone(&self) -> Result<(), BackendError> {
        Ok(())
    }

    fn clone_from(&self, record: VolumeRecord, source: &VolumeRecord) -> Result<Made, BackendError> {
        let (work, record) = self.stage(record)?;
        let copying = Copying {
            from: self.data_path(&source.name),
            to: work.join(DATA_DIR),
            leftover: Debris { path: work, volume: None, size_bytes: record.size_bytes },
        };
        Ok(Made::CopyFirst(record, copying))
    }

    /// The copy runs without the agent's lock and holds nothing but its clone and its source, but a caller waits
    /// for it: it is given the pool's command deadline plus the clone's size (which its quota holds the copy to)
    /// at the slowest disk's rate, as zeroing is, and copy_tree adds time for each entry it meets (capped); past
    /// that it is stopped (a 500 saying so; what it made is removed in the background).
    fn copy(&self, copying: &Copying) -> Result<(), BackendError> {
        let started = std::time::Instant::now();
        let base = std::time::Duration::from_secs(crate::config::DEFAULT_COMMAND_TIMEOUT_SECONDS);
        let allowed = super::zeroing::deadline(base, copying.leftover.size_bytes);
        let copied = crate::copy_tree::copy_tree(&copying.from, &copying.to, allowed).map_err(|e| match e {
            // The clone's project quota, or the filesystem, is full: the source holds more than the clone's size.
            crate::copy_tree::CopyError::Io { errno: rustix::io::Errno::DQUOT | rustix::io::Errno::NOSPC, .. } => {
                BackendError::InsufficientSpace(format!("copying {}: {e}", copying.from.display()))
            }
            e => BackendError::Io(format!("copying {}: {e}", copying.from.display())),
        })?;
        sync_tree_top(&copying.to)?;
        crate::failpoints::point("hostpath-clone-after-copy");
        tracing::info!(
            pool = %self.pool,
            from = %copying.from.display(),
            files = copied.files,
            directories = copied.directories,
            symlinks = copied.symlinks,
            reflinked_bytes = copied.reflinked_bytes,
            copied_bytes = copied.copied_bytes,
            hard_links = copied.hard_links,
            hard_links_split = copied.hard_links_split,
            left_out = copied.left_out_count,
            left_out_first = ?copied.left_out,
            seconds = started.elapsed().as_secs_f64(),
            "copied a volume's files into its clone"
        );
        Ok(())
    }

    fn finish_copy(&self, record: VolumeRecord, copying: &Copying) -> Result<VolumeRecord, BackendError> {
        self.put_in_place(&copying.leftover.path, record)
    }

    fn probe(&self, _own_sizes: &[u64]) -> Result<PoolProbe, BackendError> {
        self.check_marker()?;
        let not_ready = |what: &str, e: &dyn std::fmt::Display| {
            BackendError::NotReady(format!("{what} of {}: {e}", self.root.display()))
        };
        let root = File::open(&self.root).map_err(|e| not_ready("opening", &e))?;
        let st = rustix::fs::fstatvfs(&root).map_err(|e| not_ready("statvfs", &e))?;
        let fs_id = root.metadata().map_err(|e| not_ready("stat", &e))?.dev();
        let (enforcement, enforcement_reason) =
            enforcement_of(self.quotas(&root).map_err(|e| not_ready("project quota state", &e))?);
        Ok(PoolProbe::Filesystem {
            fs: FsUsage {
                size_bytes: st.f_blocks * st.f_frsize,
                available_bytes: st.f_bavail * st.f_frsize,
                inodes: st.f_files,
                available_inodes: st.f_favail,
            },
            fs_id,
            enforcement,
            enforcement_reason,
        })
    }

    fn recover(&self) -> Result<Recovered, BackendError> {
        self.check_marker()?;
        let mut debris = Vec::new();
        if std::fs::symlink_metadata(self.staging()).is_ok() {
            self.check_staging(&self.staging())?;
            for entry in std::fs::read_dir(self.staging()).map_err(|e| io(self.staging().display(), e))?.flatten() {
                // Its size, where its marker still says: what it may hold counts against the pool until it is gone.
                let size_bytes = std::fs::read_to_string(entry.path().join(VOLUME_MARKER))
                    .ok()
                    .and_then(|t| serde_json::from_str::<VolumeRecord>(&t).ok())
                    .map_or(0, |r| r.size_bytes);
                debris.push(Debris { path: entry.path(), volume: None, size_bytes });
            }
        }
        let root = self.open_root()?;
        if quota::project_of(&root).is_ok_and(|p| p.inherit) {
            tracing::warn!(pool = %self.pool, root = %self.root.display(), "the pool root passes its project on to what is made in it (PROJINHERIT): volumes get no project quotas of their own; clear it with `chattr -P -p 0` to have them");
        }
        let state = self.quotas(&root).map_err(|e| io(format!("project quota state of {}", self.root.display()), e))?;
        let quotas = state.gives_projects().then_some(&root);
        let mut volumes = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(|e| io(self.root.display(), e))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let marker = entry.path().join(VOLUME_MARKER);
            let parsed = std::fs::read_to_string(&marker)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str::<VolumeRecord>(&t).map_err(|e| e.to_string()));
            match parsed {
                Ok(mut record)
                    if record.version == VOLUME_MARKER_VERSION && record.name == name && record.pool == self.pool =>
                {
                    record.path = self.data_path(&name).display().to_string();
                    // Only a mark that is certainly there counts: an unreadable one reads as published.
                    record.published = std::fs::symlink_metadata(entry.path().join(UNPUBLISHED)).is_err();
                    self.recover_project(quotas, &mut record);
                    volumes.push(record);
                }
                // Not ours, or from a newer Berth: never touched, only reported.
                Ok(record) => {
                    tracing::warn!(pool = %self.pool, dir = %name, version = record.version, marker_pool = %record.pool, "directory has a volume marker this agent does not own; leaving it alone")
                }
                Err(e) => {
                    tracing::warn!(pool = %self.pool, dir = %name, error = %e, "directory without a readable volume marker; leaving it alone")
                }
            }
        }
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        // An agent killed between a rename and the fsync of its directory (create, delete, expand, publish) left a
        // change the kernel may not have written yet; a retry then finds it done and answers success without
        // syncing, and a power cut after that answer would undo what the controller was told. So every directory
        // such a rename touches is synced before the pool serves a request.
        let mut dirs = vec![self.root.clone()];
        if !debris.is_empty() {
            dirs.push(self.staging());
        }
        dirs.extend(volumes.iter().map(|v| self.root.join(&v.name)));
        for dir in dirs {
            sync_dir(&dir)?;
        }
        Ok(Recovered { volumes, debris })
    }

    fn create(&self, record: VolumeRecord) -> Result<Made, BackendError> {
        self.make(record).map(Made::Ready)
    }

    fn expand(&self, record: &VolumeRecord, size_bytes: u64) -> Result<Made, BackendError> {
        self.grow(record, size_bytes).map(Made::Ready)
    }

    fn publish(&self, record: &VolumeRecord) -> Result<(), BackendError> {
        self.check_marker()?;
        let dir = self.root.join(&record.name);
        let mark = dir.join(UNPUBLISHED);
        match std::fs::remove_file(&mark) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(mark.display(), e)),
        }
        crate::failpoints::point("hostpath-publish-after-unmark");
        // Durable before the answer: a crash must not bring the mark back after the controller was told.
        sync_dir(&dir)
    }

    fn used_bytes(&self, volumes: &[&VolumeRecord]) -> Vec<Option<u64>> {
        // Only from the pool's own filesystem: an unmounted pool's root is a directory of another one, whose
        // projects of the same IDs are not these volumes.
        let root = match volumes.iter().any(|v| v.project_id.is_some()).then(|| (self.check_marker(), self.open_root()))
        {
            Some((Ok(()), Ok(root))) => root,
            _ => return vec![None; volumes.len()],
        };
        volumes.iter().map(|v| v.project_id.and_then(|id| quota::usage(&root, id).ok()).map(|u| u.bytes)).collect()
    }

    fn detach(&self, name: &str) -> Result<Option<PathBuf>, BackendError> {
        self.check_marker()?;
        let target = self.root.join(name);
        match std::fs::symlink_metadata(&target) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(target.display(), e)),
        }
        // Mounts of it only go, never come, while it is deleted: kubelet mounts a volume only for a pod of a
        // Bound claim, and the controller deletes only released volumes or ones no PV was made for.
        self.check_unused(&target, &format!("volume {name}"))?;
        let staging = self.ensure_staging()?;
        let doomed = staging.join(format!("delete-{name}-{:08x}", fastrand::u32(..)));
        std::fs::rename(&target, &doomed).map_err(|e| io(format!("moving {} aside", target.display()), e))?;
        crate::failpoints::point("hostpath-detach-after-rename");
        if let Err(e) = sync_dir(&self.root) {
            // The rename happened; at worst a crash brings the volume back, to be deleted again.
            tracing::warn!(pool = %self.pool, error = %e, "cannot sync the pool root after moving a volume aside");
        }
        crate::failpoints::point("hostpath-detach-after-sync");
        Ok(Some(doomed))
    }

    /// Refused while what is to be removed is in use: debris of an interrupted delete may be (an agent before
    /// the in-use check moved volumes aside whatever held them), and removing files under a pod would destroy
    /// its data; it is then tried again at the next start.
    fn purge(&self, detached: &Path) -> Result<(), BackendError> {
        self.check_unused(detached, &format!("{}", detached.display()))?;
        // The volume's project limit goes first, while its files still hold the ID (release_project).
        let project = File::open(detached).and_then(|d| quota::project_of(&d)).ok().map(|p| p.id);
        if let Some(id) = project.filter(|id| quota::PROJECT_IDS.contains(id)) {
            self.release_project(id);
        }
        crate::failpoints::point("hostpath-purge-after-release-project");
        remove_tree(detached).map_err(|e| io(detached.display(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_quotas_enforce_nothing_and_say_why() {
        assert_eq!(enforcement_of(QuotaState::Enforced), (Enforcement::Quota, None));
        // The filesystem's own choices need no reason: not mounted with quotas, counted but not enforced.
        assert_eq!(enforcement_of(QuotaState::Off), (Enforcement::None, None));
        assert_eq!(enforcement_of(QuotaState::Accounted), (Enforcement::None, None));
        let (enforcement, reason) = enforcement_of(QuotaState::Refused(Refused::Quotactl));
        assert_eq!(enforcement, Enforcement::None);
        let reason = reason.expect("a reason for refused quotas");
        for words in ["CAP_SYS_ADMIN", "seccomp", "deploy/quota"] {
            assert!(reason.contains(words), "{reason}");
        }
        let (enforcement, reason) = enforcement_of(QuotaState::Refused(Refused::SetProject));
        assert_eq!(enforcement, Enforcement::None);
        assert!(reason.is_some_and(|r| r.contains("CAP_FOWNER")));
    }
}
