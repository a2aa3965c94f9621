//! `hostpath` pools: each volume is a directory under the pool's root.
//!
//! ```text
//! <root>/.berth-pool              pool marker {"pool": "<name>", "version": 1}; without it the pool is not ready
//! <root>/.berth-tmp/              volumes being made or removed; anything here at start is debris
//! <root>/<volume>/volume.json     the volume's marker (VolumeRecord)
//! <root>/<volume>/data/           what the PV points at; the pod sees only this
//! ```
//! Create builds `<volume>` complete in `.berth-tmp/` and renames it into place: one atomic step, so a crash
//! leaves either a complete volume or debris. Delete renames it into `.berth-tmp/` first (it leaves the
//! inventory at once), then removes it without following symlinks or crossing mounts.

use std::ffi::CString;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Backend, BackendError, DATA_DIR, PoolProbe, VOLUME_MARKER_VERSION, VolumeRecord, io, make_data_dir};
use crate::capacity::FsUsage;
use crate::safe_remove::remove_tree;

pub const POOL_MARKER: &str = ".berth-pool";
const STAGING: &str = ".berth-tmp";
const VOLUME_MARKER: &str = "volume.json";

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct PoolMarker {
    pool: String,
    version: u32,
}

pub struct HostPath {
    pool: String,
    root: PathBuf,
}

impl HostPath {
    pub fn new(pool: &str, root: &Path) -> HostPath {
        HostPath { pool: pool.to_owned(), root: root.to_owned() }
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
}

fn write_synced(path: &Path, body: &[u8]) -> Result<(), BackendError> {
    use std::io::Write;
    let mut f = std::fs::File::create_new(path).map_err(|e| io(path.display(), e))?;
    f.write_all(body).and_then(|_| f.sync_all()).map_err(|e| io(path.display(), e))
}

fn sync_dir(path: &Path) -> Result<(), BackendError> {
    std::fs::File::open(path).and_then(|d| d.sync_all()).map_err(|e| io(path.display(), e))
}

impl Backend for HostPath {
    fn kind(&self) -> &'static str {
        "hostpath"
    }

    fn probe(&self, _own_sizes: &[u64]) -> Result<PoolProbe, BackendError> {
        self.check_marker()?;
        let root = self.root.to_str().ok_or_else(|| BackendError::NotReady("root is not UTF-8".into()))?;
        let c = CString::new(root).map_err(|e| BackendError::NotReady(e.to_string()))?;
        let st =
            rustix::fs::statvfs(c.as_c_str()).map_err(|e| BackendError::NotReady(format!("statvfs {root}: {e}")))?;
        let fs_id = std::fs::metadata(&self.root).map_err(|e| BackendError::NotReady(e.to_string()))?.dev();
        Ok(PoolProbe::Filesystem {
            fs: FsUsage { size_bytes: st.f_blocks * st.f_frsize, available_bytes: st.f_bavail * st.f_frsize },
            fs_id,
        })
    }

    fn recover(&self) -> Result<Vec<VolumeRecord>, BackendError> {
        self.check_marker()?;
        if std::fs::symlink_metadata(self.staging()).is_ok() {
            self.check_staging(&self.staging())?;
            for entry in std::fs::read_dir(self.staging()).map_err(|e| io(self.staging().display(), e))?.flatten() {
                tracing::warn!(pool = %self.pool, path = %entry.path().display(), "removing debris of an interrupted operation");
                // Debris that cannot be removed (a mount left inside it) stays, out of the inventory, and is
                // tried again at the next start; it must not keep the pool's live volumes from being served.
                if let Err(e) = remove_tree(&entry.path()) {
                    tracing::error!(pool = %self.pool, path = %entry.path().display(), error = %e, "cannot remove debris");
                }
            }
        }
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
        Ok(volumes)
    }

    fn create(&self, mut record: VolumeRecord) -> Result<VolumeRecord, BackendError> {
        self.check_marker()?;
        let staging = self.ensure_staging()?;
        let work = staging.join(format!("create-{}-{:08x}", record.name, fastrand::u32(..)));
        std::fs::DirBuilder::new().mode(0o711).create(&work).map_err(|e| io(work.display(), e))?;
        make_data_dir(&work, &record)?;
        let body = serde_json::to_vec_pretty(&record).expect("serialisable");
        write_synced(&work.join(VOLUME_MARKER), &body)?;
        sync_dir(&work)?;
        let target = self.root.join(&record.name);
        // rename(2) onto an existing non-empty directory fails, so a concurrent twin cannot be overwritten.
        std::fs::rename(&work, &target).map_err(|e| {
            let _ = remove_tree(&work);
            io(format!("moving the new volume to {}", target.display()), e)
        })?;
        if let Err(e) = sync_dir(&self.root) {
            // The volume is in place (the rename happened); a crash could lose it before the controller made
            // its PV, which the controller's retry handles like any lost create.
            tracing::warn!(pool = %self.pool, error = %e, "cannot sync the pool root after creating a volume");
        }
        record.path = self.data_path(&record.name).display().to_string();
        Ok(record)
    }

    fn expand(&self, record: &VolumeRecord, size_bytes: u64) -> Result<VolumeRecord, BackendError> {
        self.check_marker()?;
        // Without size enforcement the directory needs nothing: the new size is the marker's (and the pool's
        // accounting's). The marker is replaced by rename, so it is never half-written.
        let mut grown = record.clone();
        grown.size_bytes = size_bytes;
        let dir = self.root.join(&record.name);
        let tmp = dir.join(format!("{VOLUME_MARKER}.tmp"));
        let body = serde_json::to_vec_pretty(&grown).expect("serialisable");
        write_synced(&tmp, &body)?;
        std::fs::rename(&tmp, dir.join(VOLUME_MARKER)).map_err(|e| io(dir.join(VOLUME_MARKER).display(), e))?;
        sync_dir(&dir)?;
        Ok(grown)
    }

    fn detach(&self, name: &str) -> Result<Option<PathBuf>, BackendError> {
        self.check_marker()?;
        let target = self.root.join(name);
        match std::fs::symlink_metadata(&target) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(target.display(), e)),
        }
        let staging = self.ensure_staging()?;
        let doomed = staging.join(format!("delete-{name}-{:08x}", fastrand::u32(..)));
        std::fs::rename(&target, &doomed).map_err(|e| io(format!("moving {} aside", target.display()), e))?;
        if let Err(e) = sync_dir(&self.root) {
            // The rename happened; at worst a crash brings the volume back, to be deleted again.
            tracing::warn!(pool = %self.pool, error = %e, "cannot sync the pool root after moving a volume aside");
        }
        Ok(Some(doomed))
    }

    fn purge(&self, detached: &Path) -> Result<(), BackendError> {
        remove_tree(detached).map_err(|e| io(detached.display(), e))
    }
}
