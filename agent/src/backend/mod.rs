//! Backends: how a pool stores volumes. The agent core (locking, capacity, idempotency, the API) is the same for
//! every backend; a backend only knows its own storage: `hostpath` (directories) and `lvm` (logical volumes).

pub mod hostpath;
pub mod lvm;
pub mod lvm2;
pub mod quota;
pub mod zeroing;

use berth::agent_api::{ClaimRef, VolumeMode};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::capacity::{Capacity, FsUsage};

/// The marker every volume carries, and the agent's inventory entry for it. Versioned: a marker of an unknown
/// version is left alone and reported, never rewritten or deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeRecord {
    pub version: u32,
    pub name: String,
    pub pool: String,
    pub size_bytes: u64,
    pub volume_mode: VolumeMode,
    pub claim: ClaimRef,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    /// RFC 3339.
    pub created_at: String,
    /// The filesystem made on the volume (lvm pools, `Filesystem` volumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_type: Option<String>,
    /// Options of the agent's mount of the volume (lvm pools).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_options: Vec<String>,
    /// The host path a PV points at (derived, not stored in the marker).
    #[serde(skip)]
    pub path: String,
    /// The project quota ID of a directory volume (read from the directory itself, not stored in the marker).
    #[serde(skip)]
    pub project_id: Option<u32>,
    /// Whether a PV was ever made for the volume (agent_api::Volume::published). Kept beside the marker, not in
    /// it: a new volume carries an "unpublished" mark (a file, an LV tag) that publishing removes, so volumes of
    /// agents that predate the mark read as published, and older agents still read this one's marker.
    #[serde(skip)]
    pub published: bool,
}

pub const VOLUME_MARKER_VERSION: u32 = 1;

/// What an operation a crash interrupted left in a pool: a half-made or half-removed volume. It is out of the
/// inventory; the agent removes it in the background, after the API is serving ([`Backend::purge`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Debris {
    /// What [`Backend::purge`] is given (a directory under the pool's staging area; `vg/lv`).
    pub path: std::path::PathBuf,
    /// The volume whose name the debris still holds, where a new volume of that name could not be made until it
    /// is gone (an LV keeps its name); `None` where it holds none (a directory in staging).
    pub volume: Option<String>,
    /// The bytes it may still hold on the pool's storage: its volume's size where known, else 0.
    pub size_bytes: u64,
}

/// Bytes of a new or grown volume that must read back as zeroes before anyone has them (a thick LV's extents
/// hold whatever was written there before: a volume removed outside Berth, a region `lvextend` adds), zeroed by
/// [`Backend::zero`] outside the agent's lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zeroing {
    /// The block device to zero, and the range.
    pub device: PathBuf,
    pub offset: u64,
    pub len: u64,
    /// What is left to remove (in the background) if the volume cannot be finished.
    pub leftover: Debris,
}

/// A clone of a directory volume whose files are still to be copied ([`Backend::copy`]), outside the agent's
/// lock: from the source's `data/` into the new volume's, which is not in place yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copying {
    pub from: PathBuf,
    pub to: PathBuf,
    /// What is left to remove (in the background) if the clone cannot be finished: the new volume, in staging.
    pub leftover: Debris,
}

/// What [`Backend::create`] and [`Backend::expand`] made.
#[derive(Debug)]
pub enum Made {
    /// Finished: the volume as it is now.
    Ready(VolumeRecord),
    /// The volume (as it will be) once `Zeroing` is done, then [`Backend::finish_create`] or
    /// [`Backend::finish_expand`].
    ZeroFirst(VolumeRecord, Zeroing),
    /// A clone (as it will be) once its source's files are copied as `Copying` says, then
    /// [`Backend::finish_copy`].
    CopyFirst(VolumeRecord, Copying),
}

/// What [`Backend::recover`] found on disk.
#[derive(Debug, Default)]
pub struct Recovered {
    pub volumes: Vec<VolumeRecord>,
    pub debris: Vec<Debris>,
}

/// How a pool keeps volumes within their sizes (`enforcement` in the pool's status; terms.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// Nothing does: a directory volume can outgrow its size.
    None,
    /// A project quota per directory volume.
    Quota,
    /// Each volume is a block device of its size.
    Device,
}

impl Enforcement {
    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::None => "none",
            Enforcement::Quota => "quota",
            Enforcement::Device => "device",
        }
    }
}

/// What a ready pool's storage looks like now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PoolProbe {
    /// A pool on a filesystem, possibly shared with other pools.
    Filesystem {
        fs: FsUsage,
        /// Identifies the filesystem, so pools sharing one are accounted together.
        fs_id: u64,
        /// Whether the filesystem enforces its volumes' project quotas now.
        enforcement: Enforcement,
        /// Why not, when the filesystem could (the agent is refused its quotas).
        enforcement_reason: Option<&'static str>,
    },
    /// A pool whose storage accounts for itself (lvm: the volume group or thin pool knows what it gave out); the
    /// capacity is already computed from the pool's volumes.
    Exact(Capacity),
}

impl PoolProbe {
    pub fn fs_id(&self) -> Option<u64> {
        match self {
            PoolProbe::Filesystem { fs_id, .. } => Some(*fs_id),
            PoolProbe::Exact(_) => None,
        }
    }

    pub fn enforcement(&self) -> Enforcement {
        match self {
            PoolProbe::Filesystem { enforcement, .. } => *enforcement,
            PoolProbe::Exact(_) => Enforcement::Device,
        }
    }

    pub fn enforcement_reason(&self) -> Option<&'static str> {
        match self {
            PoolProbe::Filesystem { enforcement_reason, .. } => *enforcement_reason,
            PoolProbe::Exact(_) => None,
        }
    }
}

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("pool not ready: {0}")]
    NotReady(String),
    /// The storage itself refused for lack of space (the agent's own check passed: someone else took it).
    #[error("{0}")]
    InsufficientSpace(String),
    #[error("{0}")]
    Io(String),
    /// A command outlived its deadline and still runs (crate::command): the pool takes no work until it exits.
    #[error("{0}")]
    Busy(String),
    /// Something still uses the volume (crate::in_use): nothing destructive was done.
    #[error("{0}")]
    InUse(String),
    /// The pool cannot do what was asked (a clone in a pool that makes none): nothing was done.
    #[error("{0}")]
    Unsupported(String),
}

fn io(what: impl std::fmt::Display, e: impl std::fmt::Display) -> BackendError {
    BackendError::Io(format!("{what}: {e}"))
}

/// The directory a volume's pods see (named `data` in every backend): made inside `parent`, owned by the record's
/// uid:gid, with exactly the record's mode.
fn make_data_dir(parent: &std::path::Path, record: &VolumeRecord) -> Result<std::path::PathBuf, BackendError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let data = parent.join(DATA_DIR);
    std::fs::DirBuilder::new().mode(0o700).create(&data).map_err(|e| io(data.display(), e))?;
    rustix::fs::chown(&data, Some(rustix::fs::Uid::from_raw(record.uid)), Some(rustix::fs::Gid::from_raw(record.gid)))
        .map_err(|e| io(data.display(), e))?;
    // After chown: chown clears setgid, and the mode is the request's exactly (no umask).
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(record.mode)).map_err(|e| io(data.display(), e))?;
    Ok(data)
}

/// The name of that directory.
const DATA_DIR: &str = "data";

/// What the agent core needs of a backend. Calls are serialised by the core; they may block (file I/O).
pub trait Backend: Send + Sync {
    fn kind(&self) -> &'static str;
    /// The pool's commands that outlived their deadlines, for backends that run external commands.
    fn stuck(&self) -> Option<&crate::command::Stuck> {
        None
    }
    /// How volume sizes are enforced while the pool is not ready (a ready pool's probe says).
    fn enforcement(&self) -> Enforcement {
        Enforcement::None
    }
    /// Ready (root present with this pool's marker) and the storage's usage; `NotReady` with the reason.
    /// `own_sizes` are the sizes promised to this pool's volumes (for backends that compute exact capacity).
    fn probe(&self, own_sizes: &[u64]) -> Result<PoolProbe, BackendError>;
    /// The volumes on disk, and the debris of operations a crash interrupted (not removed here: removing it may
    /// take long, and the live volumes are served first). Called once per pool, when it is first seen ready.
    fn recover(&self) -> Result<Recovered, BackendError>;
    /// Makes the volume described by `record` (whose `path` it fills in). Atomic: after a crash the volume either
    /// exists completely or [`Backend::recover`] finds what was left as debris. A create that fails may leave
    /// debris too, which [`Backend::leftover_of_create`] names. A volume whose bytes must be zeroed first is
    /// [`Made::ZeroFirst`]: not usable (debris to a crash) until [`Backend::finish_create`].
    fn create(&self, record: VolumeRecord) -> Result<Made, BackendError>;
    /// Whether the pool makes clones ([`Backend::clone_from`]); `Unsupported` says why not and what does. Asked
    /// before anything else of a clone request is looked at, so a pool that makes none refuses it whatever it is.
    fn can_clone(&self) -> Result<(), BackendError> {
        Err(BackendError::Unsupported(format!("{} pools make no clones", self.kind())))
    }
    /// Makes the volume described by `record` as a clone of `source` (a volume of the same pool, volume mode and
    /// filesystem, no larger: the core has checked): its content is `source`'s at this moment, and it is then
    /// independent of it (either may be written, grown or deleted). Atomic like [`Backend::create`], and a failure
    /// leaves what [`Backend::leftover_of_create`] names. Called under the agent's lock, like every operation but
    /// zeroing, so nothing else touches `source` meanwhile.
    fn clone_from(&self, _record: VolumeRecord, _source: &VolumeRecord) -> Result<Made, BackendError> {
        self.can_clone()?;
        Err(BackendError::Unsupported(format!("{} pools make no clones", self.kind())))
    }
    /// Writes zeroes as `zeroing` says; slow (the whole range is written), run without the agent's lock.
    fn zero(&self, zeroing: &Zeroing) -> Result<(), BackendError> {
        Err(BackendError::Io(format!("{} pools zero nothing ({})", self.kind(), zeroing.device.display())))
    }
    /// Copies a clone's files as `copying` says; slow (every file), run without the agent's lock.
    fn copy(&self, copying: &Copying) -> Result<(), BackendError> {
        Err(BackendError::Io(format!("{} pools copy nothing ({})", self.kind(), copying.from.display())))
    }
    /// Completes a clone that was [`Made::CopyFirst`], once its files are copied: puts it in place.
    fn finish_copy(&self, record: VolumeRecord, _copying: &Copying) -> Result<VolumeRecord, BackendError> {
        Ok(record)
    }
    /// Completes a create that was [`Made::ZeroFirst`], once the zeroing is done.
    fn finish_create(&self, record: VolumeRecord) -> Result<VolumeRecord, BackendError> {
        Ok(record)
    }
    /// What a failed [`Backend::create`] of `volume` left, for the agent to remove in the background (undoing it
    /// inline would hold the agent's lock while a thick LV is zeroed); `None` when the create cleaned up itself.
    fn leftover_of_create(&self, _volume: &str) -> Option<Debris> {
        None
    }
    /// Takes the volume out of the pool at once (after this it is gone for [`Backend::recover`]) and returns what
    /// is left to [`Backend::purge`], if anything; a missing volume is success (`None`). Fails with `NotReady`
    /// when the pool cannot be inspected: "not there" must never be guessed from an unmounted disk.
    fn detach(&self, name: &str) -> Result<Option<std::path::PathBuf>, BackendError>;
    /// Removes the volume's "unpublished" mark, durably (a PV has been made for it). Idempotent.
    fn publish(&self, record: &VolumeRecord) -> Result<(), BackendError>;
    /// Grows the volume to `size_bytes` while it may be in use, and records the new size in its marker (atomic:
    /// after a crash the marker has the old size or the new one). The core has checked the space. Space that must
    /// be zeroed before the volume may have it is [`Made::ZeroFirst`] (nothing of the volume changed yet), then
    /// [`Backend::finish_expand`].
    fn expand(&self, record: &VolumeRecord, size_bytes: u64) -> Result<Made, BackendError>;
    /// Completes an expansion that was [`Made::ZeroFirst`] (`grown` is what it returned), once the zeroing is done.
    fn finish_expand(
        &self,
        _record: &VolumeRecord,
        grown: VolumeRecord,
        _zeroed: &Zeroing,
    ) -> Result<VolumeRecord, BackendError> {
        Ok(grown)
    }
    /// Bytes each of `volumes` (this pool's) uses now, where the storage counts it (a project quota, a mounted
    /// filesystem); `None` where nothing does. Cheap: called on every sample.
    fn used_bytes(&self, volumes: &[&VolumeRecord]) -> Vec<Option<u64>>;
    /// Removes the data of a detached volume, or a piece of [`Debris`]. May be slow; runs without the agent's
    /// lock. What it cannot remove is debris that [`Backend::recover`] finds again at the next start.
    fn purge(&self, detached: &std::path::Path) -> Result<(), BackendError>;
}
