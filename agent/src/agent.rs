//! The agent core: the node's pools, their inventory of volumes, and the decisions (idempotency, conflicts,
//! capacity) every backend shares. Operations are serialised by one lock: they are short, and it is what makes
//! "check free space, then create" safe for pools that share a filesystem.

use std::collections::BTreeMap;
use std::sync::Mutex;

use berth::agent_api::{CreateVolumeRequest, ErrorReason, PoolStatus, Volume, VolumeMode};

use crate::backend::{Backend, BackendError, PoolProbe, VOLUME_MARKER_VERSION, VolumeRecord};
use crate::capacity::{Capacity, PoolLimits, VolumeUsage, pool_capacity};
use crate::config::PoolConfig;

/// Default permission bits of a volume's directory: owner and group, not the world.
pub const DEFAULT_MODE: u32 = 0o750;
/// setgid plus rwx for all: the most a request may ask for (no setuid, no sticky bit).
pub const MAX_MODE: u32 = 0o2777;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: ErrorReason,
    pub message: String,
}

impl Refusal {
    pub fn new(reason: ErrorReason, message: impl Into<String>) -> Refusal {
        Refusal {
            reason,
            message: message.into(),
        }
    }
}

impl From<BackendError> for Refusal {
    fn from(e: BackendError) -> Refusal {
        match e {
            BackendError::NotReady(m) => Refusal::new(ErrorReason::PoolNotReady, m),
            BackendError::Io(m) => Refusal::new(ErrorReason::Internal, m),
        }
    }
}

pub struct Pool {
    pub config: PoolConfig,
    pub backend: Box<dyn Backend>,
}

/// Whether a create request was satisfied by a new volume or by the one already there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    New(Volume),
    Existing(Volume),
}

pub struct Agent {
    pub node: String,
    pools: Vec<Pool>,
    /// Volume name → record, for every pool. Rebuilt from disk at start; the disk is the only database.
    inventory: Mutex<BTreeMap<String, VolumeRecord>>,
}

pub fn to_api(r: &VolumeRecord) -> Volume {
    Volume {
        name: r.name.clone(),
        pool: r.pool.clone(),
        size_bytes: r.size_bytes,
        volume_mode: r.volume_mode,
        path: r.path.clone(),
        claim: r.claim.clone(),
        uid: r.uid,
        gid: r.gid,
        mode: r.mode,
        created_at: r.created_at.clone(),
    }
}

/// Checks a create request on its own (no state): everything a hostile client controls.
pub fn validate_create(name: &str, req: &CreateVolumeRequest) -> Result<(), Refusal> {
    let invalid = |m: String| Refusal::new(ErrorReason::Invalid, m);
    berth::validate::volume_name(name).map_err(|e| invalid(e.to_string()))?;
    berth::validate::pool_name(&req.pool).map_err(|e| invalid(e.to_string()))?;
    if req.size_bytes == 0 {
        return Err(invalid("sizeBytes must be greater than 0".into()));
    }
    if let Some(mode) = req.mode
        && mode & !MAX_MODE != 0
    {
        return Err(invalid(format!(
            "mode {mode:#o} is not allowed: at most {MAX_MODE:#o} (no setuid, no sticky bit)"
        )));
    }
    let field = |what: &str, v: &str| {
        if v.is_empty() || v.len() > 253 || v.chars().any(char::is_control) {
            Err(invalid(format!(
                "claim {what} {v:?} is not a Kubernetes name"
            )))
        } else {
            Ok(())
        }
    };
    field("namespace", &req.claim.namespace)?;
    field("name", &req.claim.name)?;
    Ok(())
}

impl Agent {
    /// Builds the inventory from every pool's disk. A pool that is not ready contributes nothing (and says why
    /// in its status) but does not stop the others.
    pub fn start(node: String, pools: Vec<Pool>) -> Agent {
        let mut inventory = BTreeMap::new();
        for pool in &pools {
            match pool.backend.recover() {
                Ok(volumes) => {
                    tracing::info!(pool = %pool.config.name, volumes = volumes.len(), "inventory recovered from disk");
                    for v in volumes {
                        inventory.insert(v.name.clone(), v);
                    }
                }
                Err(e) => {
                    tracing::warn!(pool = %pool.config.name, error = %e, "pool not ready at start; no volumes from it")
                }
            }
        }
        Agent {
            node,
            pools,
            inventory: Mutex::new(inventory),
        }
    }

    fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.config.name == name)
    }

    pub fn create(
        &self,
        name: &str,
        req: &CreateVolumeRequest,
        now: &str,
    ) -> Result<Created, Refusal> {
        validate_create(name, req)?;
        let pool = self.pool(&req.pool).ok_or_else(|| {
            Refusal::new(
                ErrorReason::UnknownPool,
                format!("no pool {:?} on node {}", req.pool, self.node),
            )
        })?;
        if req.volume_mode == VolumeMode::Block && pool.backend.kind() == "hostpath" {
            return Err(Refusal::new(
                ErrorReason::Unsupported,
                format!(
                    "pool {:?} is a hostpath pool: raw block volumes need an lvm pool",
                    req.pool
                ),
            ));
        }
        let uid = req.uid.unwrap_or(0);
        let gid = req.gid.unwrap_or(0);
        let mode = req.mode.unwrap_or(DEFAULT_MODE);
        let mut inventory = self.inventory.lock().expect("inventory lock");
        if let Some(existing) = inventory.get(name) {
            let same = existing.pool == req.pool
                && existing.size_bytes == req.size_bytes
                && existing.volume_mode == req.volume_mode
                && existing.uid == uid
                && existing.gid == gid
                && existing.mode == mode;
            return if same {
                Ok(Created::Existing(to_api(existing)))
            } else {
                Err(Refusal::new(
                    ErrorReason::Conflict,
                    format!(
                        "volume {name} exists in pool {:?} with {} bytes (mode {:#o}, owner {}:{}); asked for pool {:?} with {} bytes (mode {mode:#o}, owner {uid}:{gid})",
                        existing.pool,
                        existing.size_bytes,
                        existing.mode,
                        existing.uid,
                        existing.gid,
                        req.pool,
                        req.size_bytes
                    ),
                ))
            };
        }
        let probe = pool.backend.probe()?;
        let capacity = self.capacity_of(pool, &probe, &inventory);
        if req.size_bytes > capacity.maximum_volume_size {
            return Err(Refusal::new(
                ErrorReason::InsufficientSpace,
                format!(
                    "pool {:?} on node {} can take at most {} bytes now; asked for {}",
                    req.pool, self.node, capacity.maximum_volume_size, req.size_bytes
                ),
            ));
        }
        let record = VolumeRecord {
            version: VOLUME_MARKER_VERSION,
            name: name.to_owned(),
            pool: req.pool.clone(),
            size_bytes: req.size_bytes,
            volume_mode: req.volume_mode,
            claim: req.claim.clone(),
            uid,
            gid,
            mode,
            created_at: now.to_owned(),
            path: String::new(),
        };
        let made = pool.backend.create(record)?;
        let api = to_api(&made);
        inventory.insert(name.to_owned(), made);
        Ok(Created::New(api))
    }

    /// Deletes a volume; `Ok(false)` if there was none (deleting twice succeeds).
    pub fn delete(&self, name: &str) -> Result<bool, Refusal> {
        berth::validate::volume_name(name)
            .map_err(|e| Refusal::new(ErrorReason::Invalid, e.to_string()))?;
        let mut inventory = self.inventory.lock().expect("inventory lock");
        let Some(record) = inventory.get(name) else {
            return Ok(false);
        };
        let pool = self.pool(&record.pool).ok_or_else(|| {
            Refusal::new(
                ErrorReason::Internal,
                format!(
                    "volume {name} belongs to unconfigured pool {:?}",
                    record.pool
                ),
            )
        })?;
        pool.backend.delete(name)?;
        inventory.remove(name);
        Ok(true)
    }

    pub fn volume(&self, name: &str) -> Option<Volume> {
        self.inventory
            .lock()
            .expect("inventory lock")
            .get(name)
            .map(to_api)
    }

    pub fn volumes(&self) -> Vec<Volume> {
        self.inventory
            .lock()
            .expect("inventory lock")
            .values()
            .map(to_api)
            .collect()
    }

    /// Every pool's status and capacity, as of now.
    pub fn pool_statuses(&self) -> Vec<PoolStatus> {
        let inventory = self.inventory.lock().expect("inventory lock");
        self.pools
            .iter()
            .map(|pool| {
                let volumes = inventory
                    .values()
                    .filter(|v| v.pool == pool.config.name)
                    .count() as u32;
                let (ready, reason, cap) = match pool.backend.probe() {
                    Ok(probe) => (true, None, self.capacity_of(pool, &probe, &inventory)),
                    Err(e) => {
                        let allocated = inventory
                            .values()
                            .filter(|v| v.pool == pool.config.name)
                            .map(|v| v.size_bytes)
                            .sum();
                        (
                            false,
                            Some(e.to_string()),
                            Capacity {
                                allocated,
                                ..Capacity::default()
                            },
                        )
                    }
                };
                PoolStatus {
                    name: pool.config.name.clone(),
                    backend: pool.backend.kind().to_owned(),
                    ready,
                    reason,
                    capacity_bytes: cap.capacity,
                    allocated_bytes: cap.allocated,
                    free_bytes: cap.free,
                    maximum_volume_size_bytes: cap.maximum_volume_size,
                    volumes,
                    enforcement: "none".into(),
                }
            })
            .collect()
    }

    /// Capacity of `pool`, counting the volumes of every pool on the same filesystem.
    fn capacity_of(
        &self,
        pool: &Pool,
        probe: &PoolProbe,
        inventory: &BTreeMap<String, VolumeRecord>,
    ) -> Capacity {
        let same_fs: Vec<&str> = self
            .pools
            .iter()
            .filter(|p| p.config.name != pool.config.name)
            .filter(|p| {
                p.backend
                    .probe()
                    .is_ok_and(|other| other.fs_id == probe.fs_id)
            })
            .map(|p| p.config.name.as_str())
            .collect();
        let usage = |v: &VolumeRecord| VolumeUsage {
            size_bytes: v.size_bytes,
            used_bytes: None,
        };
        let own: Vec<VolumeUsage> = inventory
            .values()
            .filter(|v| v.pool == pool.config.name)
            .map(usage)
            .collect();
        let others: Vec<VolumeUsage> = inventory
            .values()
            .filter(|v| same_fs.contains(&v.pool.as_str()))
            .map(usage)
            .collect();
        let limits = PoolLimits {
            cap: pool.config.capacity,
            headroom: pool.config.headroom,
        };
        pool_capacity(limits, probe.fs, &own, &others)
    }
}
