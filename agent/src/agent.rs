//! The agent core: the node's pools, their inventory of volumes, and the decisions (idempotency, conflicts,
//! capacity) every backend shares. Operations are serialised by one lock: they are short, and it is what makes
//! "check free space, then create" safe for pools that share a filesystem.
//!
//! The one exception is zeroing the bytes a new or grown volume gets (a thick raw block LV): that writes the whole
//! range, so it runs without the lock ([`Agent::zero_unlocked`]) while the volume's name is held and its bytes
//! counted, and the operation finishes under the lock again.
//!
//! Debris that recovery finds (what a crash left of a create or a delete) is removed by [`Agent::remove_debris`],
//! one piece at a time and outside the lock, on a thread of its own that starts once the API serves: removing a
//! pod's million files or zeroing a thick LV can take minutes, and the live volumes must not wait for it. Until a
//! piece is gone it counts against its pool's capacity, and a volume of the name it still holds is not made.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use berth::agent_api::{CreateVolumeRequest, ErrorReason, PoolStatus, Volume, VolumeMode};

use crate::backend::{
    Backend, BackendError, Copying, Debris, Made, PoolProbe, Recovered, VOLUME_MARKER_VERSION, VolumeRecord, Zeroing,
};
use crate::capacity::{Capacity, PoolLimits, VolumeUsage, pool_capacity};
use crate::config::PoolConfig;
use crate::epoch::{AdmitError, EpochFence};

/// Default permission bits of a volume's directory: owner and group, not the world.
pub const DEFAULT_MODE: u32 = 0o750;
/// setgid plus rwx for all: the most a request may ask for (no setuid, no sticky bit).
pub const MAX_MODE: u32 = 0o2777;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: ErrorReason,
    pub message: String,
    /// With `StaleEpoch`: the newest epoch seen, so a leader whose epoch fell behind can raise it.
    pub newest_epoch: Option<u64>,
}

impl Refusal {
    pub fn new(reason: ErrorReason, message: impl Into<String>) -> Refusal {
        Refusal { reason, message: message.into(), newest_epoch: None }
    }
}

impl From<BackendError> for Refusal {
    fn from(e: BackendError) -> Refusal {
        match e {
            BackendError::NotReady(m) => Refusal::new(ErrorReason::PoolNotReady, m),
            BackendError::InsufficientSpace(m) => Refusal::new(ErrorReason::InsufficientSpace, m),
            BackendError::Io(m) => Refusal::new(ErrorReason::Internal, m),
            BackendError::InUse(m) => Refusal::new(ErrorReason::InUse, m),
            BackendError::Unsupported(m) => Refusal::new(ErrorReason::Unsupported, m),
            BackendError::Busy(m) => Refusal::new(
                ErrorReason::PoolNotReady,
                format!("{m}; the pool takes no work until it exits (retry later)"),
            ),
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
    fence: EpochFence,
    /// One lock for every decision, so "check free space, then create" is safe for pools sharing a filesystem
    /// and an epoch is checked in the same critical section as the operation it admits.
    state: Mutex<State>,
    /// Signalled when recovery finds debris to remove.
    debris_found: Condvar,
    /// Counts changes of the inventory, so that readers of it (metrics) can tell theirs is out of date.
    generation: AtomicU64,
}

/// The inventory (volume name → record) and which pools it covers. Rebuilt from disk, pool by pool, the first
/// time each pool is seen ready; the disk is the only database.
#[derive(Default)]
struct State {
    volumes: BTreeMap<String, VolumeRecord>,
    recovered: BTreeSet<String>,
    /// Debris recovery found, until it is removed.
    debris: Vec<PendingDebris>,
    /// Volumes doing their slow step without the lock (zeroing a create's or an expansion's new bytes, copying a
    /// clone's files), and the sources of those clones.
    in_flight: Vec<InFlight>,
}

/// A create or an expansion doing its slow step without the agent's lock ([`Agent::slow_unlocked`]: zeroing its
/// volume's new bytes, copying a clone's files): it holds the volume's name (other requests for it are a
/// `Conflict` meanwhile) and its bytes count against the pool. A clone's source is held the same way, with no bytes.
struct InFlight {
    pool: String,
    volume: String,
    bytes: u64,
    /// What its slow step leaves if it is given up: not debris while it runs.
    leftover: std::path::PathBuf,
    /// "being made", "being grown", "being copied into a clone".
    what: &'static str,
    /// "its new bytes are being zeroed", "its source's files are being copied".
    doing: &'static str,
}

impl InFlight {
    fn new(pool: &Pool, volume: &str, bytes: u64, what: &'static str, zeroing: &Zeroing) -> InFlight {
        let (pool, volume, leftover) = (pool.config.name.clone(), volume.to_owned(), zeroing.leftover.path.clone());
        InFlight { pool, volume, bytes, leftover, what, doing: "its new bytes are being zeroed" }
    }

    /// A clone being copied, and its source, held while it is.
    fn copying(pool: &Pool, volume: &str, bytes: u64, copying: &Copying, source: &str) -> [InFlight; 2] {
        let (pool, leftover) = (pool.config.name.clone(), copying.leftover.path.clone());
        let clone = InFlight {
            pool: pool.clone(),
            volume: volume.to_owned(),
            bytes,
            leftover: leftover.clone(),
            what: "being made",
            doing: "its source's files are being copied",
        };
        let held = InFlight {
            pool,
            volume: source.to_owned(),
            bytes: 0,
            leftover,
            what: "being copied into a clone",
            doing: "its files are being read",
        };
        [clone, held]
    }
}

impl State {
    /// A `Conflict` if `name` is being made or grown, or copied into a clone.
    fn not_in_flight(&self, name: &str) -> Result<(), Refusal> {
        match self.in_flight.iter().find(|z| z.volume == name) {
            Some(z) => Err(Refusal::new(
                ErrorReason::Conflict,
                format!("volume {name} is {} ({}); try again later", z.what, z.doing),
            )),
            None => Ok(()),
        }
    }

    /// Drops what is known of `pool`, so that it is read from disk again at its next use (debris being removed
    /// now stays: recovery finds it again only if its removal fails).
    fn forget(&mut self, pool: &str) {
        self.recovered.remove(pool);
        self.volumes.retain(|_, v| v.pool != pool);
        self.debris.retain(|d| d.pool != pool || d.removal == Removal::Running);
    }
}

struct PendingDebris {
    pool: String,
    debris: Debris,
    removal: Removal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removal {
    Waiting,
    Running,
    /// Not retried until the next start, which recovers it again: what failed once (a mount a pod left inside
    /// a directory, an lvm2 error) would most likely fail again at once.
    Failed,
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
        fs_type: r.fs_type.clone(),
        mount_options: r.mount_options.clone(),
        used_bytes: None,
        published: Some(r.published),
    }
}

/// Filesystems an lvm pool makes; the first is the default.
pub const FS_TYPES: [&str; 2] = ["ext4", "xfs"];
const MAX_MOUNT_OPTIONS: usize = 32;
pub use berth::agent_api::XFS_MIN_BYTES;

/// The filesystem a volume gets: the request's, or the default for a `Filesystem` volume of a pool that makes
/// filesystems; none for block volumes and directory volumes.
fn resolved_fs_type(kind: &str, req: &CreateVolumeRequest) -> Option<String> {
    match (kind, req.volume_mode) {
        ("lvm", VolumeMode::Filesystem) => Some(req.fs_type.clone().unwrap_or_else(|| FS_TYPES[0].to_owned())),
        _ => req.fs_type.clone(),
    }
}

/// Checks a create request on its own (no state): everything a hostile client controls.
pub fn validate_create(name: &str, req: &CreateVolumeRequest) -> Result<(), Refusal> {
    let invalid = |m: String| Refusal::new(ErrorReason::Invalid, m);
    berth::validate::volume_name(name).map_err(|e| invalid(e.to_string()))?;
    berth::validate::pool_name(&req.pool).map_err(|e| invalid(e.to_string()))?;
    if let Some(source) = &req.source {
        berth::validate::volume_name(source).map_err(|e| invalid(format!("source: {e}")))?;
        if source == name {
            return Err(invalid(format!("volume {name} cannot be a clone of itself")));
        }
    }
    if req.size_bytes == 0 {
        return Err(invalid("sizeBytes must be greater than 0".into()));
    }
    // (uid_t)-1 is chown(2)'s "leave unchanged": the directory would keep root's owner, not the one asked for.
    for (what, id) in [("uid", req.uid), ("gid", req.gid)] {
        if id == Some(u32::MAX) {
            return Err(invalid(format!("{what} {} is not an id (it means \"unchanged\" to chown)", u32::MAX)));
        }
    }
    if let Some(mode) = req.mode
        && mode & !MAX_MODE != 0
    {
        return Err(invalid(format!(
            "mode {mode:#o} is not allowed: at most {MAX_MODE:#o} (no setuid, no sticky bit)"
        )));
    }
    berth::validate::namespace(&req.claim.namespace).map_err(|e| invalid(e.to_string()))?;
    berth::validate::claim_name(&req.claim.name).map_err(|e| invalid(e.to_string()))?;
    if let Some(fs) = &req.fs_type
        && !FS_TYPES.contains(&fs.as_str())
    {
        return Err(invalid(format!("fsType {fs:?} is not one of {FS_TYPES:?}")));
    }
    if req.mount_options.len() > MAX_MOUNT_OPTIONS {
        return Err(invalid(format!("at most {MAX_MOUNT_OPTIONS} mountOptions")));
    }
    // Each option is one item of mount(8)'s -o list: no commas (they would smuggle in more), no spaces.
    for o in &req.mount_options {
        let fine = |c: char| c.is_ascii_alphanumeric() || "=_.:/+@-".contains(c);
        if o.is_empty() || o.len() > 256 || !o.chars().all(fine) {
            return Err(invalid(format!("mount option {o:?}: one option per item, characters A-Za-z0-9=_.:/+@-")));
        }
        if let Some(why) = refused_mount_option(o) {
            return Err(invalid(format!("mount option {o:?} is not allowed: {why}")));
        }
    }
    if req.fs_type.as_deref() == Some("xfs") && req.size_bytes < XFS_MIN_BYTES {
        return Err(invalid(format!(
            "an xfs filesystem needs at least {XFS_MIN_BYTES} bytes (mkfs.xfs refuses smaller); asked for {}",
            req.size_bytes
        )));
    }
    if req.volume_mode == VolumeMode::Block && (req.fs_type.is_some() || !req.mount_options.is_empty()) {
        return Err(invalid("a raw block volume has no filesystem: fsType and mountOptions do not apply".into()));
    }
    Ok(())
}

/// Why a mount option of a request is refused, if it is: options that make mount(8) itself act (run a helper,
/// make directories, change owners: `X-mount.*`, `x-*`, `helper=`, `uhelper=`), and those that would undo the
/// agent's own `nosuid,nodev` (a pod's setuid binary or device node must not work on a volume).
fn refused_mount_option(option: &str) -> Option<&'static str> {
    let key = option.split_once('=').map_or(option, |(k, _)| k).to_ascii_lowercase();
    if key.starts_with("x-") || key == "helper" || key == "uhelper" {
        return Some("it is an instruction to mount(8) itself, not a filesystem option");
    }
    if key == "suid" || key == "dev" {
        return Some("the agent mounts every volume nosuid,nodev");
    }
    None
}

impl Agent {
    /// Recovers the inventory of every pool that is ready now; the others are recovered when they become ready
    /// and refuse work until then.
    pub fn start(node: String, pools: Vec<Pool>, fence: EpochFence) -> Agent {
        let agent = Agent {
            node,
            pools,
            fence,
            state: Mutex::new(State::default()),
            debris_found: Condvar::new(),
            generation: AtomicU64::new(0),
        };
        {
            let mut state = agent.lock();
            for pool in &agent.pools {
                if let Err(e) = agent.ensure_recovered(&mut state, pool) {
                    tracing::warn!(pool = %pool.config.name, error = %e.message, "pool not ready at start");
                }
            }
        }
        agent
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.config.name == name)
    }

    /// Reads `pool`'s volumes from disk once it is ready. Until then the pool is refused: its volumes are not
    /// known, so neither "exists" nor "free" could be answered truthfully.
    fn ensure_recovered(&self, state: &mut State, pool: &Pool) -> Result<(), Refusal> {
        self.usable(state, pool)?;
        if state.recovered.contains(&pool.config.name) {
            return Ok(());
        }
        let Recovered { volumes, debris } = pool.backend.recover()?;
        let name = &pool.config.name;
        tracing::info!(pool = %name, volumes = volumes.len(), debris = debris.len(), "inventory recovered from disk");
        for v in volumes {
            state.volumes.insert(v.name.clone(), v);
        }
        for d in debris {
            self.queue_debris(state, pool, d, "debris of an interrupted operation: removed in the background");
        }
        state.recovered.insert(name.clone());
        self.changed();
        Ok(())
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// How many times the inventory has changed (a volume made, grown, published or deleted, a pool read).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Refuses work on a pool while a command of its that outlived its deadline still runs (it may hold lvm2's
    /// lock, or the very device); once such a command has exited, the pool is read from disk again, since it may
    /// have changed what the inventory says after its caller gave up.
    fn usable(&self, state: &mut State, pool: &Pool) -> Result<(), Refusal> {
        let Some(stuck) = pool.backend.stuck() else { return Ok(()) };
        let name = &pool.config.name;
        if let Some(what) = stuck.describe() {
            return Err(Refusal::new(
                ErrorReason::PoolNotReady,
                format!("pool {name:?} is busy: {what}; it takes no work until that command exits (retry later)"),
            ));
        }
        if stuck.take_settled() && state.recovered.contains(name) {
            tracing::warn!(pool = %name, "the commands that outlived their deadlines have exited: reading the pool from disk again");
            state.forget(name);
        }
        Ok(())
    }

    /// Which pools are busy and why (see [`Agent::usable`]), without the agent's lock: for `/healthz`.
    pub fn busy_pools(&self) -> Vec<String> {
        let stuck = |p: &Pool| p.backend.stuck().and_then(|s| s.describe()).map(|w| format!("{}: {w}", p.config.name));
        self.pools.iter().filter_map(stuck).collect()
    }

    /// Hands `debris` of `pool` to the debris thread; from now on it counts against the pool and holds its name.
    fn queue_debris(&self, state: &mut State, pool: &Pool, debris: Debris, what: &str) {
        let name = &pool.config.name;
        // A pool read again (after a stuck command) finds the piece being removed now once more, and the LVs of
        // creates and expansions zeroing now (which are not debris unless they are given up).
        if state.debris.iter().any(|d| d.pool == *name && d.debris.path == debris.path)
            || state.in_flight.iter().any(|z| z.pool == *name && z.leftover == debris.path)
        {
            return;
        }
        tracing::warn!(pool = %name, path = %debris.path.display(), bytes = debris.size_bytes, "{what}");
        state.debris.push(PendingDebris { pool: name.clone(), debris, removal: Removal::Waiting });
        self.debris_found.notify_all();
    }

    /// Removes one piece of debris that waits for it, without holding the lock while the backend works; `false`
    /// when none waits. What cannot be removed stays counted, and is tried again at the next start.
    pub fn remove_debris(&self) -> bool {
        let (pool, debris) = {
            let mut state = self.lock();
            let Some(next) = state.debris.iter_mut().find(|d| d.removal == Removal::Waiting) else { return false };
            next.removal = Removal::Running;
            (next.pool.clone(), next.debris.clone())
        };
        let started = Instant::now();
        let removed = match self.pool(&pool) {
            Some(p) => p.backend.purge(&debris.path),
            None => Err(BackendError::Io(format!("pool {pool:?} is not configured"))),
        };
        let mut state = self.lock();
        // Only this function takes pieces out of the list, one at a time: the piece is still there.
        let at = state.debris.iter().position(|d| d.pool == pool && d.debris.path == debris.path);
        let path = debris.path.display();
        match removed {
            Ok(()) => {
                tracing::info!(pool = %pool, path = %path, seconds = started.elapsed().as_secs_f64(), "debris removed");
                if let Some(at) = at {
                    state.debris.remove(at);
                }
            }
            Err(e) => {
                tracing::error!(pool = %pool, path = %path, error = %e, "cannot remove debris: it keeps counting against the pool until the next start tries again");
                if let Some(at) = at {
                    state.debris[at].removal = Removal::Failed;
                }
            }
        }
        true
    }

    /// Removes debris whenever recovery finds some, for the life of the process: the body of the agent's debris
    /// thread (purges block). A process that stops mid-removal leaves debris that the next start finds again.
    pub fn remove_debris_forever(&self) -> ! {
        loop {
            while self.remove_debris() {}
            let state = self.lock();
            let waiting = |s: &mut State| !s.debris.iter().any(|d| d.removal == Removal::Waiting);
            drop(self.debris_found.wait_while(state, waiting).unwrap_or_else(|poisoned| poisoned.into_inner()));
        }
    }

    fn admit_epoch(&self, epoch: u64) -> Result<(), Refusal> {
        self.fence.admit(epoch).map_err(|e| match e {
            AdmitError::Stale { newest } => Refusal {
                newest_epoch: Some(newest),
                ..Refusal::new(
                    ErrorReason::StaleEpoch,
                    format!("leadership epoch {epoch} is older than {newest}, already seen"),
                )
            },
            AdmitError::NotPersisted(m) => Refusal::new(ErrorReason::Internal, m),
        })
    }

    /// Records a new leader's epoch without any other operation: a leader fences every agent when it takes over,
    /// so a deposed leader's late calls are refused also by agents the new one has not needed yet.
    pub fn fence(&self, epoch: u64) -> Result<(), Refusal> {
        let _state = self.lock();
        self.admit_epoch(epoch)
    }

    pub fn create(&self, name: &str, req: &CreateVolumeRequest, now: &str, epoch: u64) -> Result<Created, Refusal> {
        validate_create(name, req)?;
        let uid = req.uid.unwrap_or(0);
        let gid = req.gid.unwrap_or(0);
        let mode = req.mode.unwrap_or(DEFAULT_MODE);
        let mut state = self.lock();
        self.admit_epoch(epoch)?;
        // An existing volume answers first: the same name with other parameters is a conflict, whatever they are.
        if let Some(existing) = state.volumes.get(name) {
            let kind = self.pool(&existing.pool).map_or("", |p| p.backend.kind());
            let same = existing.pool == req.pool
                && existing.fs_type == resolved_fs_type(kind, req)
                && existing.mount_options == req.mount_options
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
                        "volume {name} exists in pool {:?} with {} bytes ({:?}, mode {:#o}, owner {}:{}); asked for pool {:?} with {} bytes ({:?}, mode {mode:#o}, owner {uid}:{gid})",
                        existing.pool,
                        existing.size_bytes,
                        existing.volume_mode,
                        existing.mode,
                        existing.uid,
                        existing.gid,
                        req.pool,
                        req.size_bytes,
                        req.volume_mode
                    ),
                ))
            };
        }
        state.not_in_flight(name)?;
        if let Some(d) = state.debris.iter().find(|d| d.debris.volume.as_deref() == Some(name)) {
            let failed = if d.removal == Removal::Failed { " (its removal failed: see the agent's log)" } else { "" };
            return Err(Refusal::new(
                ErrorReason::Conflict,
                format!(
                    "volume {name}: what an interrupted operation left of it ({}) is still being removed{failed}; try again later",
                    d.debris.path.display()
                ),
            ));
        }
        let pool = self.pool(&req.pool).ok_or_else(|| {
            Refusal::new(ErrorReason::UnknownPool, format!("no pool {:?} on node {}", req.pool, self.node))
        })?;
        if req.volume_mode == VolumeMode::Block && pool.backend.kind() == "hostpath" {
            return Err(Refusal::new(
                ErrorReason::Unsupported,
                format!("pool {:?} is a hostpath pool: raw block volumes need an lvm pool", req.pool),
            ));
        }
        if pool.backend.kind() == "hostpath" && (req.fs_type.is_some() || !req.mount_options.is_empty()) {
            return Err(Refusal::new(
                ErrorReason::Unsupported,
                format!(
                    "pool {:?} is a hostpath pool: its volumes are directories, without a filesystem or mount of their own",
                    req.pool
                ),
            ));
        }
        // A pool that makes no clones refuses a clone before anything else of the request is looked at.
        if req.source.is_some() {
            pool.backend.can_clone()?;
        }
        // The target pool's volumes must be known before its free space is. (A claim's volume is always asked of
        // the same pool, its class's, so a pool that is down elsewhere on the node cannot hide a twin.)
        self.ensure_recovered(&mut state, pool)?;
        let source = match &req.source {
            Some(source) => Some(self.clone_source(&state, pool, name, source, req, (uid, gid, mode))?),
            None => None,
        };
        let capacity = self.capacity_now(pool, &state)?;
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
            fs_type: resolved_fs_type(pool.backend.kind(), req),
            mount_options: req.mount_options.clone(),
            path: String::new(),
            project_id: None,
            published: false,
        };
        let leftover = |state: &mut State, e: &BackendError| {
            // Not while a command is stuck: asking lvm2 would wait as long again, and the pool is read from disk
            // once it has exited, which finds the leftover anyway.
            if !matches!(e, BackendError::Busy(_))
                && let Some(left) = pool.backend.leftover_of_create(name)
            {
                self.queue_debris(state, pool, left, "what the failed create left: removed in the background");
            }
        };
        // A clone is made under the lock like any create (a thin snapshot is one lvcreate), so no delete,
        // expansion or other clone of its source can run while it is taken.
        let made = match &source {
            None => pool.backend.create(record),
            Some(source) => pool.backend.clone_from(record, source),
        };
        let made = made.inspect_err(|e| leftover(&mut state, e))?;
        let (made, mut state) = match made {
            Made::Ready(made) => (made, state),
            Made::ZeroFirst(made, zeroing) => {
                let work = InFlight::new(pool, name, req.size_bytes, "being made", &zeroing);
                let mut state = self.zero_unlocked(state, pool, work, &zeroing, epoch)?;
                (pool.backend.finish_create(made).inspect_err(|e| leftover(&mut state, e))?, state)
            }
            Made::CopyFirst(made, copying) => {
                // A directory clone's files are copied without the lock (as long as their bytes take); its source
                // is held meanwhile, so that no delete or expansion of it runs under the copy.
                let source = req.source.as_deref().unwrap_or_default();
                let works = InFlight::copying(pool, name, req.size_bytes, &copying, source).into();
                let step = || pool.backend.copy(&copying);
                let state = self.slow_unlocked(state, pool, works, &copying.leftover, epoch, step)?;
                let mut state = state;
                let finished = pool.backend.finish_copy(made, &copying).inspect_err(|e| {
                    if !matches!(e, BackendError::Busy(_)) {
                        let what = "what the failed clone left: removed in the background";
                        self.queue_debris(&mut state, pool, copying.leftover.clone(), what);
                    }
                })?;
                (finished, state)
            }
        };
        let api = to_api(&made);
        state.volumes.insert(name.to_owned(), made);
        self.changed();
        Ok(Created::New(api))
    }

    /// The volume a clone of `req` (to be called `name`, in `pool`, whose volumes are known) starts from: it must
    /// exist in the same pool, with the same volume mode and filesystem, be no larger than the clone, and (for a
    /// filesystem volume, whose `data/` directory the clone carries over) have the owner and mode asked for. A
    /// volume being made or grown is not cloned (`Conflict`).
    fn clone_source(
        &self,
        state: &State,
        pool: &Pool,
        name: &str,
        source: &str,
        req: &CreateVolumeRequest,
        (uid, gid, mode): (u32, u32, u32),
    ) -> Result<VolumeRecord, Refusal> {
        let invalid = |m: String| Refusal::new(ErrorReason::Invalid, format!("clone {name} of {source}: {m}"));
        state.not_in_flight(source)?;
        let Some(s) = state.volumes.get(source) else {
            return Err(invalid(format!("source volume {source} does not exist on node {}", self.node)));
        };
        if s.pool != req.pool {
            return Err(invalid(format!(
                "source volume {source} is in pool {:?}, not {:?}: a clone is made in its source's pool",
                s.pool, req.pool
            )));
        }
        if s.volume_mode != req.volume_mode {
            return Err(invalid(format!(
                "source volume {source} is a {:?} volume, not {:?}: a clone has its source's volume mode",
                s.volume_mode, req.volume_mode
            )));
        }
        let fs_type = resolved_fs_type(pool.backend.kind(), req);
        if s.fs_type != fs_type {
            return Err(invalid(format!(
                "source volume {source} has filesystem {:?}, not {fs_type:?}: a clone carries its source's filesystem",
                s.fs_type
            )));
        }
        if req.size_bytes < s.size_bytes {
            return Err(invalid(format!(
                "a clone is at least its source's size: {source} has {} bytes, asked for {}",
                s.size_bytes, req.size_bytes
            )));
        }
        if s.volume_mode == VolumeMode::Filesystem && (s.uid, s.gid, s.mode) != (uid, gid, mode) {
            return Err(invalid(format!(
                "the clone carries its source's data directory, owned by {}:{} with mode {:#o}; asked for {uid}:{gid} with mode {mode:#o}",
                s.uid, s.gid, s.mode
            )));
        }
        Ok(s.clone())
    }

    /// Grows a volume to `size_bytes`: the extra bytes must fit in its pool now (as for a create); the same size
    /// again is a no-op, a smaller one is refused.
    pub fn expand(&self, name: &str, size_bytes: u64, epoch: u64) -> Result<Volume, Refusal> {
        berth::validate::volume_name(name).map_err(|e| Refusal::new(ErrorReason::Invalid, e.to_string()))?;
        let mut state = self.lock();
        self.admit_epoch(epoch)?;
        let existing = self.find_volume(&mut state, name)?.ok_or_else(|| self.not_found(name))?;
        if size_bytes < existing.size_bytes {
            return Err(Refusal::new(
                ErrorReason::Invalid,
                format!(
                    "volume {name} has {} bytes; volumes do not shrink (asked for {size_bytes})",
                    existing.size_bytes
                ),
            ));
        }
        if size_bytes == existing.size_bytes {
            return Ok(to_api(&existing));
        }
        let pool = self.pool(&existing.pool).ok_or_else(|| {
            Refusal::new(ErrorReason::UnknownPool, format!("no pool {:?} on node {}", existing.pool, self.node))
        })?;
        let capacity = self.capacity_now(pool, &state)?;
        let extra = size_bytes - existing.size_bytes;
        if extra > capacity.maximum_volume_size {
            return Err(Refusal::new(
                ErrorReason::InsufficientSpace,
                format!(
                    "pool {:?} on node {} can add at most {} bytes now; growing {name} to {size_bytes} bytes needs {extra}",
                    existing.pool, self.node, capacity.maximum_volume_size
                ),
            ));
        }
        let (grown, mut state) = match pool.backend.expand(&existing, size_bytes)? {
            Made::Ready(grown) => (grown, state),
            Made::CopyFirst(..) => {
                return Err(Refusal::new(ErrorReason::Internal, format!("growing {name} asked for a copy")));
            }
            Made::ZeroFirst(grown, zeroing) => {
                let work = InFlight::new(pool, name, extra, "being grown", &zeroing);
                let mut state = self.zero_unlocked(state, pool, work, &zeroing, epoch)?;
                let finished = pool.backend.finish_expand(&existing, grown, &zeroing).inspect_err(|e| {
                    if !matches!(e, BackendError::Busy(_)) {
                        let what = "what the failed expansion left: removed in the background";
                        self.queue_debris(&mut state, pool, zeroing.leftover.clone(), what);
                    }
                })?;
                (finished, state)
            }
        };
        let api = to_api(&grown);
        state.volumes.insert(name.to_owned(), grown);
        self.changed();
        Ok(api)
    }

    /// Zeroes what `zeroing` names without holding the agent's lock (it writes every byte: minutes for a large
    /// volume, and nothing else should wait for it), while `work` holds its volume's name and counts its bytes;
    /// then takes the lock again. The epoch is checked again then: a leader that was deposed meanwhile finishes
    /// nothing. If the zeroing fails or the epoch is stale, what it leaves is debris; if it outlived its deadline
    /// the pool is busy and read from disk once it exits, which finds that.
    fn zero_unlocked<'a>(
        &'a self,
        state: MutexGuard<'a, State>,
        pool: &Pool,
        work: InFlight,
        zeroing: &Zeroing,
        epoch: u64,
    ) -> Result<MutexGuard<'a, State>, Refusal> {
        self.slow_unlocked(state, pool, vec![work], &zeroing.leftover, epoch, || pool.backend.zero(zeroing))
    }

    /// Runs `step` (a slow step of a create or an expansion) without the agent's lock, while `works` hold their
    /// volumes' names and count their bytes (see [`Agent::zero_unlocked`]); what it leaves if given up is
    /// `leftover`.
    fn slow_unlocked<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        pool: &Pool,
        works: Vec<InFlight>,
        leftover: &Debris,
        epoch: u64,
        step: impl FnOnce() -> Result<(), BackendError>,
    ) -> Result<MutexGuard<'a, State>, Refusal> {
        let name = works.first().map(|w| w.volume.clone()).unwrap_or_default();
        let held: Vec<String> = works.iter().map(|w| w.volume.clone()).collect();
        state.in_flight.extend(works);
        drop(state);
        let zeroed = step();
        let mut state = self.lock();
        state.in_flight.retain(|z| !held.contains(&z.volume));
        let outcome = match zeroed {
            Err(e @ BackendError::Busy(_)) => return Err(e.into()),
            Err(e) => Err(Refusal::from(e)),
            Ok(()) => self.admit_epoch(epoch),
        };
        if let Err(refusal) = outcome {
            let given_up = format!("volume {name} was not finished ({}): removed in the background", refusal.message);
            self.queue_debris(&mut state, pool, leftover.clone(), &given_up);
            return Err(refusal);
        }
        Ok(state)
    }

    /// The volume called `name`, if there is one. Only the pool holding it must be usable (not busy); "there is
    /// none" needs every pool read.
    fn find_volume(&self, state: &mut State, name: &str) -> Result<Option<VolumeRecord>, Refusal> {
        state.not_in_flight(name)?;
        if let Some(pool) = state.volumes.get(name).and_then(|r| self.pool(&r.pool)) {
            // Refused while busy; read again (the volume may be gone) once a stuck command has exited.
            self.ensure_recovered(state, pool)?;
        }
        if !state.volumes.contains_key(name) {
            self.ensure_all_recovered(state, name)?;
        }
        Ok(state.volumes.get(name).cloned())
    }

    pub fn not_found(&self, name: &str) -> Refusal {
        Refusal::new(ErrorReason::NotFound, format!("no volume {name} on node {}", self.node))
    }

    fn ensure_all_recovered(&self, state: &mut State, name: &str) -> Result<(), Refusal> {
        for pool in &self.pools {
            self.ensure_recovered(state, pool).map_err(|e| {
                Refusal::new(
                    ErrorReason::PoolNotReady,
                    format!(
                        "cannot tell whether volume {name} exists: pool {:?} is not ready ({})",
                        pool.config.name, e.message
                    ),
                )
            })?;
        }
        Ok(())
    }

    /// Records that a PV has been made for the volume: from now on it is never an orphan (agent_api::Volume::
    /// published). Idempotent.
    pub fn publish(&self, name: &str, epoch: u64) -> Result<Volume, Refusal> {
        berth::validate::volume_name(name).map_err(|e| Refusal::new(ErrorReason::Invalid, e.to_string()))?;
        let mut state = self.lock();
        self.admit_epoch(epoch)?;
        let record = self.find_volume(&mut state, name)?.ok_or_else(|| self.not_found(name))?;
        if record.published {
            return Ok(to_api(&record));
        }
        let pool = self.pool(&record.pool).ok_or_else(|| {
            Refusal::new(ErrorReason::Internal, format!("volume {name} belongs to unconfigured pool {:?}", record.pool))
        })?;
        pool.backend.publish(&record)?;
        let published = VolumeRecord { published: true, ..record };
        let api = to_api(&published);
        state.volumes.insert(name.to_owned(), published);
        self.changed();
        Ok(api)
    }

    /// Deletes a volume; `Ok(false)` if there was none (deleting twice succeeds). With `unpublished_only`, a
    /// volume that has been published is refused (`Published`), decided under the same lock as the delete. The
    /// volume leaves the inventory as soon as it is moved aside; its contents are removed after the lock is
    /// released, so a large volume does not hold up other requests.
    pub fn delete(&self, name: &str, epoch: u64, unpublished_only: bool) -> Result<bool, Refusal> {
        berth::validate::volume_name(name).map_err(|e| Refusal::new(ErrorReason::Invalid, e.to_string()))?;
        let (pool, detached) = {
            let mut state = self.lock();
            self.admit_epoch(epoch)?;
            let Some(record) = self.find_volume(&mut state, name)? else { return Ok(false) };
            if unpublished_only && record.published {
                return Err(Refusal::new(
                    ErrorReason::Published,
                    format!(
                        "volume {name} has been published (a PV was made for it): it is not deleted as unpublished; \
                         a Delete-policy PV's release or an administrator removes it"
                    ),
                ));
            }
            let pool = self.pool(&record.pool).ok_or_else(|| {
                Refusal::new(
                    ErrorReason::Internal,
                    format!("volume {name} belongs to unconfigured pool {:?}", record.pool),
                )
            })?;
            let detached = pool.backend.detach(name)?;
            state.volumes.remove(name);
            self.changed();
            (pool, detached)
        };
        if let Some(detached) = detached {
            pool.backend.purge(&detached).map_err(|e| {
                Refusal::new(
                    ErrorReason::Internal,
                    format!(
                        "volume {name} is deleted but its data is not all removed yet (retried at the next start): {e}"
                    ),
                )
            })?;
        }
        Ok(true)
    }

    pub fn volume(&self, name: &str) -> Option<Volume> {
        let state = self.lock();
        let record = state.volumes.get(name)?;
        Some(self.with_usage(&[record]).remove(0))
    }

    /// Every volume, with the bytes it uses where its pool can tell.
    pub fn volumes(&self) -> Vec<Volume> {
        let state = self.lock();
        let records: Vec<&VolumeRecord> = state.volumes.values().collect();
        self.with_usage(&records)
    }

    fn with_usage(&self, records: &[&VolumeRecord]) -> Vec<Volume> {
        let used: BTreeMap<&str, Option<u64>> = self
            .pools
            .iter()
            .flat_map(|pool| pool_usage(pool, records.iter().copied()))
            .map(|(r, used)| (r.name.as_str(), used))
            .collect();
        records
            .iter()
            .map(|r| Volume { used_bytes: used.get(r.name.as_str()).copied().flatten(), ..to_api(r) })
            .collect()
    }

    /// Every pool's status and capacity, as of now (recovering pools that have become ready).
    pub fn pool_statuses(&self) -> Vec<PoolStatus> {
        let mut state = self.lock();
        // Each pool is probed once per call; the filesystem ids tell which pools share a disk.
        let probes: Vec<Result<PoolProbe, Refusal>> = self
            .pools
            .iter()
            .map(|pool| {
                self.ensure_recovered(&mut state, pool)
                    .and_then(|()| Ok(pool.backend.probe(&own_sizes(&state, pool))?))
            })
            .collect();
        let fs_ids: Vec<Option<u64>> = probes.iter().map(|p| p.as_ref().ok().and_then(|p| p.fs_id())).collect();
        let mut statuses = Vec::with_capacity(self.pools.len());
        for (pool, probe) in self.pools.iter().zip(probes) {
            let mine = || state.volumes.values().filter(|v| v.pool == pool.config.name);
            let volumes = mine().count() as u32;
            let (ready, reason, cap, enforcement, enforcement_reason) = match probe {
                Ok(probe) => {
                    let cap = self.capacity_of(pool, &probe, &fs_ids, &state);
                    (true, None, cap, probe.enforcement(), probe.enforcement_reason())
                }
                Err(e) => {
                    let allocated = own_sizes(&state, pool).iter().sum();
                    let cap = Capacity { allocated, ..Capacity::default() };
                    (false, Some(e.message), cap, pool.backend.enforcement(), None)
                }
            };
            statuses.push(PoolStatus {
                name: pool.config.name.clone(),
                backend: pool.backend.kind().to_owned(),
                ready,
                reason,
                capacity_bytes: cap.capacity,
                allocated_bytes: cap.allocated,
                free_bytes: cap.free,
                maximum_volume_size_bytes: cap.maximum_volume_size,
                volumes,
                enforcement: enforcement.as_str().into(),
                enforcement_reason: enforcement_reason.map(str::to_owned),
            });
        }
        statuses
    }

    /// `pool`'s capacity now, from a fresh probe.
    fn capacity_now(&self, pool: &Pool, state: &State) -> Result<Capacity, Refusal> {
        let probe = pool.backend.probe(&own_sizes(state, pool))?;
        // Which directory pools share a filesystem; pools that account for themselves (lvm) share nothing and
        // are not probed again (each probe of theirs runs lvm2).
        let fs_ids: Vec<Option<u64>> = self
            .pools
            .iter()
            .map(|p| match p.backend.kind() {
                "hostpath" => p.backend.probe(&own_sizes(state, p)).ok().and_then(|p| p.fs_id()),
                _ => None,
            })
            .collect();
        Ok(self.capacity_of(pool, &probe, &fs_ids, state))
    }

    /// Capacity of `pool`, counting the volumes of every other pool that shares its filesystem — and of every
    /// pool whose filesystem cannot be told right now (not ready): counting them too under-promises, never over.
    /// `fs_ids` holds each configured pool's filesystem id, in order (`None`: not ready now).
    fn capacity_of(&self, pool: &Pool, probe: &PoolProbe, fs_ids: &[Option<u64>], state: &State) -> Capacity {
        let volumes = &state.volumes;
        let (fs, fs_id) = match *probe {
            PoolProbe::Filesystem { fs, fs_id, .. } => (fs, fs_id),
            PoolProbe::Exact(capacity) => return capacity,
        };
        let sharing: Vec<(&Pool, &Option<u64>)> = self
            .pools
            .iter()
            .zip(fs_ids)
            .filter(|(p, _)| p.config.name != pool.config.name)
            // Pools whose storage accounts for itself (lvm) share no filesystem with directory pools.
            .filter(|(p, _)| p.backend.kind() == "hostpath")
            .filter(|(_, id)| id.is_none_or(|id| id == fs_id))
            .collect();
        // What each volume uses, where its pool's filesystem counts it (project quotas): exact accounting. A pool
        // that is not ready now cannot be asked: its volumes count as unused (conservative).
        let usage_in = |p: &Pool, ready: bool| {
            let used: Vec<(&VolumeRecord, Option<u64>)> = if ready {
                pool_usage(p, volumes.values())
            } else {
                volumes.values().filter(|v| v.pool == p.config.name).map(|v| (v, None)).collect()
            };
            used.into_iter().map(|(v, used_bytes)| VolumeUsage { size_bytes: v.size_bytes, used_bytes })
        };
        // The pool's debris is already in the filesystem's used space; it claims nothing more, but counts as
        // allocated (against the pool's cap) until it is gone.
        let debris = pool_debris(state, pool).map(|d| VolumeUsage::settled(d.size_bytes));
        let own: Vec<VolumeUsage> = usage_in(pool, true).chain(debris).collect();
        let others: Vec<VolumeUsage> = sharing.iter().flat_map(|(p, id)| usage_in(p, id.is_some())).collect();
        let limits = PoolLimits { cap: pool.config.capacity, headroom: pool.config.headroom };
        pool_capacity(limits, fs, &own, &others)
    }
}

/// `pool`'s volumes among `volumes`, each with the bytes it uses where the pool can tell (one backend call).
fn pool_usage<'a>(
    pool: &Pool,
    volumes: impl IntoIterator<Item = &'a VolumeRecord>,
) -> Vec<(&'a VolumeRecord, Option<u64>)> {
    let of_pool: Vec<&VolumeRecord> = volumes.into_iter().filter(|v| v.pool == pool.config.name).collect();
    let used = pool.backend.used_bytes(&of_pool);
    of_pool.into_iter().zip(used).collect()
}

/// The sizes promised to `pool`'s volumes, those of its debris not yet removed, and the bytes of volumes being
/// made or grown.
fn own_sizes(state: &State, pool: &Pool) -> Vec<u64> {
    let volumes = state.volumes.values().filter(|v| v.pool == pool.config.name).map(|v| v.size_bytes);
    let in_flight = state.in_flight.iter().filter(|z| z.pool == pool.config.name).map(|z| z.bytes);
    volumes.chain(pool_debris(state, pool).map(|d| d.size_bytes)).chain(in_flight).collect()
}

fn pool_debris<'a>(state: &'a State, pool: &'a Pool) -> impl Iterator<Item = &'a Debris> {
    state.debris.iter().filter(|d| d.pool == pool.config.name).map(|d| &d.debris)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth::agent_api::ClaimRef;

    fn req(extra: impl FnOnce(&mut CreateVolumeRequest)) -> CreateVolumeRequest {
        let mut r = CreateVolumeRequest {
            pool: "lvm".into(),
            size_bytes: 400 << 20,
            volume_mode: VolumeMode::Filesystem,
            claim: ClaimRef { namespace: "db".into(), name: "data-0".into() },
            uid: None,
            gid: None,
            mode: None,
            fs_type: None,
            mount_options: vec![],
            source: None,
        };
        extra(&mut r);
        r
    }

    const NAME: &str = "pvc-0f8e3c1a-5b2d-4c7e-9a10-2b3c4d5e6f70";

    #[test]
    fn filesystem_and_mount_options_are_checked() {
        let ok = |r: CreateVolumeRequest| validate_create(NAME, &r);
        assert!(ok(req(|r| r.fs_type = Some("xfs".into()))).is_ok());
        assert!(
            ok(req(|r| r.mount_options = vec!["noatime".into(), "discard".into(), "logbsize=256k".into()])).is_ok()
        );
        for (bad, why) in [
            (req(|r| r.fs_type = Some("btrfs".into())), "unknown filesystem"),
            (req(|r| r.mount_options = vec!["noatime,exec".into()]), "two options in one item"),
            (req(|r| r.mount_options = vec!["no atime".into()]), "a space"),
            (req(|r| r.mount_options = vec![String::new()]), "an empty option"),
            (req(|r| r.mount_options = vec!["x".into(); 33]), "too many"),
            (req(|r| r.mount_options = vec!["X-mount.mkdir=0777".into()]), "an instruction to mount(8)"),
            (req(|r| r.mount_options = vec!["x-systemd.automount".into()]), "a userspace option"),
            (req(|r| r.mount_options = vec!["helper=evil".into()]), "a mount helper"),
            (req(|r| r.mount_options = vec!["uhelper=udisks2".into()]), "an unmount helper"),
            (req(|r| r.mount_options = vec!["suid".into()]), "undoing nosuid"),
            (req(|r| r.mount_options = vec!["dev".into()]), "undoing nodev"),
            (req(|r| r.uid = Some(u32::MAX)), "uid (uid_t)-1"),
            (req(|r| r.claim.name = "data db".into()), "a claim name the API server would refuse (and LVM tags)"),
            (req(|r| r.claim.namespace = "d.b".into()), "a namespace that is no label"),
            (req(|r| r.gid = Some(u32::MAX)), "gid (gid_t)-1"),
            (req(|r| (r.fs_type, r.size_bytes) = (Some("xfs".into()), XFS_MIN_BYTES - 1)), "xfs under 300 MB"),
            (req(|r| (r.volume_mode, r.fs_type) = (VolumeMode::Block, Some("ext4".into()))), "block with a filesystem"),
            (req(|r| (r.volume_mode, r.mount_options) = (VolumeMode::Block, vec!["ro".into()])), "block with options"),
        ] {
            let refusal = ok(bad).expect_err(why);
            assert_eq!(refusal.reason, ErrorReason::Invalid, "{why}: {}", refusal.message);
        }
    }

    #[test]
    fn an_lvm_filesystem_volume_defaults_to_ext4_and_a_block_one_has_none() {
        assert_eq!(resolved_fs_type("lvm", &req(|_| {})).as_deref(), Some("ext4"));
        assert_eq!(resolved_fs_type("lvm", &req(|r| r.fs_type = Some("xfs".into()))).as_deref(), Some("xfs"));
        assert_eq!(resolved_fs_type("lvm", &req(|r| r.volume_mode = VolumeMode::Block)), None);
        assert_eq!(resolved_fs_type("hostpath", &req(|_| {})), None);
    }

    /// A pool of a 10 GiB store whose recovery finds the debris it is given; its creates and purges succeed or
    /// fail as told (a failed create leaves 3 GiB of debris), and its purges are recorded.
    #[derive(Default)]
    struct DebrisPool {
        recovered: Vec<Debris>,
        create_fails: bool,
        purge_fails: bool,
        purged: Purged,
        stuck: std::sync::Arc<crate::command::Stuck>,
        recoveries: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        /// Recovery fails: the pool's disk is missing.
        not_ready: bool,
        /// Creates and expansions must zero their new bytes first; the zeroing waits for `gate` to open.
        zero_first: bool,
        gate: Gate,
        zero_fails: bool,
        /// Volumes whose create or expansion was finished after zeroing.
        finished: Purged,
        /// The pool makes clones (as an lvm thin pool does); each is recorded as (clone, source).
        clones: bool,
        cloned: std::sync::Arc<Mutex<Vec<(String, String)>>>,
    }

    /// Opened once: `zero` waits for it, so a test can look at the agent while a zeroing runs.
    type Gate = std::sync::Arc<(Mutex<bool>, Condvar)>;

    fn open(gate: &Gate) {
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }

    fn zeroing_of(volume: &str, bytes: u64) -> Zeroing {
        let leftover =
            Debris { path: format!("vg/berth-{volume}").into(), volume: Some(volume.into()), size_bytes: bytes };
        Zeroing { device: format!("/dev/vg/berth-{volume}").into(), offset: 0, len: bytes, leftover }
    }

    /// What an LV of `NAME` left: 3 GiB holding the volume's name.
    fn lv_debris() -> Debris {
        Debris { path: format!("vg/berth-{NAME}").into(), volume: Some(NAME.into()), size_bytes: 3 * GI }
    }

    type Purged = std::sync::Arc<Mutex<Vec<std::path::PathBuf>>>;

    const GI: u64 = 1 << 30;

    impl Backend for DebrisPool {
        fn kind(&self) -> &'static str {
            "lvm"
        }
        fn probe(&self, own_sizes: &[u64]) -> Result<PoolProbe, BackendError> {
            let allocated = own_sizes.iter().sum();
            let free = 10 * GI - allocated;
            Ok(PoolProbe::Exact(Capacity { capacity: 10 * GI, allocated, free, maximum_volume_size: free }))
        }
        fn recover(&self) -> Result<Recovered, BackendError> {
            self.recoveries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.not_ready {
                return Err(BackendError::NotReady("no volume group \"other\"".into()));
            }
            Ok(Recovered { volumes: vec![], debris: self.recovered.clone() })
        }
        fn stuck(&self) -> Option<&crate::command::Stuck> {
            Some(&self.stuck)
        }
        fn create(&self, record: VolumeRecord) -> Result<Made, BackendError> {
            if self.create_fails {
                return Err(BackendError::Io("mkfs.ext4: exit status 1".into()));
            }
            let made = VolumeRecord { path: format!("/dev/vg/berth-{}", record.name), ..record };
            Ok(match self.zero_first {
                true => {
                    let zeroing = zeroing_of(&made.name, made.size_bytes);
                    Made::ZeroFirst(made, zeroing)
                }
                false => Made::Ready(made),
            })
        }
        fn zero(&self, _: &Zeroing) -> Result<(), BackendError> {
            let (open, opened) = &*self.gate;
            drop(opened.wait_while(open.lock().unwrap(), |open| !*open).unwrap());
            if self.zero_fails { Err(BackendError::Io("BLKZEROOUT: EIO".into())) } else { Ok(()) }
        }
        fn can_clone(&self) -> Result<(), BackendError> {
            match self.clones {
                true => Ok(()),
                false => Err(BackendError::Unsupported("this fake pool makes no clones".into())),
            }
        }
        fn clone_from(&self, record: VolumeRecord, source: &VolumeRecord) -> Result<Made, BackendError> {
            self.can_clone()?;
            self.cloned.lock().unwrap().push((record.name.clone(), source.name.clone()));
            Ok(Made::Ready(VolumeRecord { path: format!("/dev/vg/berth-{}", record.name), ..record }))
        }
        fn finish_create(&self, record: VolumeRecord) -> Result<VolumeRecord, BackendError> {
            self.finished.lock().unwrap().push(record.path.clone().into());
            Ok(record)
        }
        fn finish_expand(
            &self,
            _: &VolumeRecord,
            grown: VolumeRecord,
            _: &Zeroing,
        ) -> Result<VolumeRecord, BackendError> {
            self.finished.lock().unwrap().push(grown.path.clone().into());
            Ok(grown)
        }
        fn leftover_of_create(&self, volume: &str) -> Option<Debris> {
            assert_eq!(volume, NAME);
            self.create_fails.then(lv_debris)
        }
        fn detach(&self, _: &str) -> Result<Option<std::path::PathBuf>, BackendError> {
            unimplemented!("not used by these tests")
        }
        fn publish(&self, _: &VolumeRecord) -> Result<(), BackendError> {
            Ok(())
        }
        fn expand(&self, record: &VolumeRecord, size_bytes: u64) -> Result<Made, BackendError> {
            let grown = VolumeRecord { size_bytes, ..record.clone() };
            Ok(match self.zero_first {
                true => {
                    Made::ZeroFirst(grown, zeroing_of(&format!("{}.grow", record.name), size_bytes - record.size_bytes))
                }
                false => Made::Ready(grown),
            })
        }
        fn used_bytes(&self, volumes: &[&VolumeRecord]) -> Vec<Option<u64>> {
            vec![None; volumes.len()]
        }
        fn purge(&self, detached: &std::path::Path) -> Result<(), BackendError> {
            self.purged.lock().unwrap().push(detached.to_owned());
            if self.purge_fails { Err(BackendError::Io("lvremove: device busy".into())) } else { Ok(()) }
        }
    }

    fn debris_agent(dir: &tempfile::TempDir, backend: DebrisPool) -> (Agent, Purged) {
        let purged = backend.purged.clone();
        (fake_agent(dir, vec![("lvm", backend)]), purged)
    }

    fn fake_agent(dir: &tempfile::TempDir, pools: Vec<(&str, DebrisPool)>) -> Agent {
        let pools =
            pools.into_iter().map(|(name, backend)| Pool { config: lvm_config(name), backend: Box::new(backend) });
        let fence = EpochFence::load(dir.path().join("epoch")).unwrap();
        Agent::start("node-0".into(), pools.collect(), fence)
    }

    fn lvm_config(name: &str) -> PoolConfig {
        PoolConfig {
            name: name.into(),
            backend: crate::config::BackendKind::Lvm,
            root: "/var/lib/berth/lvm".into(),
            capacity: None,
            headroom: 0,
            volume_group: Some("vg".into()),
            thin_pool: None,
            overprovision_ratio: None,
            thin_data_threshold: None,
            lvm_config: None,
            command_timeout_seconds: None,
        }
    }

    #[test]
    fn a_volume_is_expanded_and_published_while_another_pool_is_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let broken = DebrisPool { not_ready: true, ..DebrisPool::default() };
        let agent = fake_agent(&dir, vec![("lvm", DebrisPool::default()), ("other", broken)]);
        assert!(matches!(agent.create(NAME, &req(|_| {}), "2026-12-04T00:00:00Z", 1), Ok(Created::New(_))));
        let grown = agent.expand(NAME, 800 << 20, 1).unwrap();
        assert_eq!(grown.size_bytes, 800 << 20);
        assert_eq!(agent.publish(NAME, 1).unwrap().published, Some(true));
        // "No such volume" still needs every pool read.
        let refusal = agent.expand("pvc-elsewhere", 1 << 30, 1).unwrap_err();
        assert_eq!(refusal.reason, ErrorReason::PoolNotReady, "{}", refusal.message);
    }

    #[test]
    fn debris_counts_and_holds_its_name_until_the_background_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, purged) = debris_agent(&dir, DebrisPool { recovered: vec![lv_debris()], ..DebrisPool::default() });
        // Found at start, not removed by it.
        assert!(purged.lock().unwrap().is_empty());
        let status = &agent.pool_statuses()[0];
        assert_eq!((status.allocated_bytes, status.free_bytes, status.volumes), (3 * GI, 7 * GI, 0));
        let refusal = agent.create(NAME, &req(|_| {}), "2026-12-04T00:00:00Z", 1).unwrap_err();
        assert_eq!(refusal.reason, ErrorReason::Conflict, "{}", refusal.message);
        assert!(refusal.message.contains("still being removed"), "{}", refusal.message);

        assert!(agent.remove_debris(), "one piece waited");
        assert_eq!(*purged.lock().unwrap(), [std::path::PathBuf::from(format!("vg/berth-{NAME}"))]);
        assert!(!agent.remove_debris(), "nothing waits any more");
        let status = &agent.pool_statuses()[0];
        assert_eq!((status.allocated_bytes, status.free_bytes), (0, 10 * GI));
        let made = agent.create(NAME, &req(|_| {}), "2026-12-04T00:00:00Z", 1).unwrap();
        assert!(matches!(made, Created::New(_)), "{made:?}");
    }

    #[test]
    fn debris_that_cannot_be_removed_keeps_counting_and_is_not_retried_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let backend = DebrisPool { recovered: vec![lv_debris()], purge_fails: true, ..DebrisPool::default() };
        let (agent, purged) = debris_agent(&dir, backend);
        assert!(agent.remove_debris());
        assert!(!agent.remove_debris(), "a failed removal waits for the next start");
        assert_eq!(purged.lock().unwrap().len(), 1);
        let status = &agent.pool_statuses()[0];
        assert_eq!((status.allocated_bytes, status.free_bytes), (3 * GI, 7 * GI));
        let refusal = agent.create(NAME, &req(|_| {}), "2026-12-04T00:00:00Z", 1).unwrap_err();
        assert_eq!(refusal.reason, ErrorReason::Conflict, "{}", refusal.message);
        assert!(refusal.message.contains("removal failed"), "{}", refusal.message);
    }

    #[test]
    fn what_a_failed_create_left_is_removed_in_the_background_not_under_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, purged) = debris_agent(&dir, DebrisPool { create_fails: true, ..DebrisPool::default() });
        let refusal = agent.create(NAME, &req(|_| {}), "2026-12-04T00:00:00Z", 1).unwrap_err();
        assert_eq!(refusal.reason, ErrorReason::Internal, "{}", refusal.message);
        assert!(purged.lock().unwrap().is_empty(), "the create did not remove it itself");
        assert_eq!(agent.pool_statuses()[0].allocated_bytes, 3 * GI, "the leftover counts until it is gone");
        let again = agent.create(NAME, &req(|_| {}), "2026-12-04T00:00:00Z", 1).unwrap_err();
        assert_eq!(again.reason, ErrorReason::Conflict, "{}", again.message);
        assert!(agent.remove_debris());
        assert_eq!(purged.lock().unwrap().len(), 1);
        assert_eq!(agent.pool_statuses()[0].allocated_bytes, 0);
    }

    #[test]
    fn a_pool_with_a_command_past_its_deadline_is_busy_until_it_exits_and_then_read_again() {
        use std::sync::atomic::Ordering;
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let backend = DebrisPool::default();
        let (stuck, recoveries) = (backend.stuck.clone(), backend.recoveries.clone());
        let (agent, _) = debris_agent(&dir, backend);
        assert_eq!(recoveries.load(Ordering::SeqCst), 1);
        let mut sleep = std::process::Command::new("sleep");
        sleep.arg("1");
        crate::command::output(&mut sleep, Duration::from_millis(100), &stuck).unwrap_err();

        let refusal = agent.create(NAME, &req(|_| {}), "2026-12-04T00:00:00Z", 1).unwrap_err();
        assert_eq!(refusal.reason, ErrorReason::PoolNotReady, "{}", refusal.message);
        assert!(refusal.message.contains("busy: `sleep 1` has run"), "{}", refusal.message);
        let status = &agent.pool_statuses()[0];
        assert!(!status.ready && status.reason.as_deref().is_some_and(|r| r.contains("busy")), "{status:?}");
        assert_eq!(agent.busy_pools().len(), 1, "{:?}", agent.busy_pools());

        let until = std::time::Instant::now() + Duration::from_secs(30);
        while !agent.busy_pools().is_empty() {
            assert!(std::time::Instant::now() < until, "still busy: {:?}", agent.busy_pools());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(agent.pool_statuses()[0].ready);
        assert_eq!(recoveries.load(Ordering::SeqCst), 2, "read from disk again once the command exited");
        assert!(matches!(agent.create(NAME, &req(|_| {}), "2026-12-04T00:00:00Z", 1), Ok(Created::New(_))));
    }

    #[test]
    fn lvm2s_own_out_of_space_refusal_is_insufficient_space() {
        // The agent checks free space first; if lvm2 still refuses (space taken by someone else meanwhile), its
        // recorded stderr must reach the controller as InsufficientSpace, so it reschedules.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/backend/testdata/lvm/");
        let stderr = std::fs::read_to_string(format!("{dir}lvcreate_toolarge.stderr")).unwrap();
        let e = crate::backend::lvm2::classify("lvcreate", 5, &stderr);
        let refusal = Refusal::from(crate::backend::lvm::backend_error(e));
        assert_eq!(refusal.reason, ErrorReason::InsufficientSpace, "{}", refusal.message);
        let stderr = std::fs::read_to_string(format!("{dir}vgs_missing.stderr")).unwrap();
        let e = crate::backend::lvm2::classify("vgs", 5, &stderr);
        assert_eq!(Refusal::from(crate::backend::lvm::backend_error(e)).reason, ErrorReason::PoolNotReady);
    }

    /// Runs `f` on a thread of its own; its result once it is done.
    fn in_background<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        std::thread::spawn(f)
    }

    /// Waits until `done` holds, at most 10 s.
    fn eventually(what: &str, done: impl Fn() -> bool) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < until, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn a_volume_is_zeroed_without_the_lock_its_name_held_and_its_bytes_counted() {
        let dir = tempfile::tempdir().unwrap();
        let backend = DebrisPool { zero_first: true, ..DebrisPool::default() };
        let (gate, finished) = (backend.gate.clone(), backend.finished.clone());
        let agent = std::sync::Arc::new(fake_agent(&dir, vec![("lvm", backend)]));
        let creating = {
            let agent = agent.clone();
            in_background(move || agent.create(NAME, &req(|_| {}), "2026-12-04T00:00:00Z", 1))
        };
        // While it zeroes, the agent answers (its lock is free), counts the bytes and refuses the name.
        eventually("the zeroing started", || agent.pool_statuses()[0].allocated_bytes == 400 << 20);
        let status = &agent.pool_statuses()[0];
        assert_eq!((status.free_bytes, status.volumes), (10 * GI - (400 << 20), 0), "{status:?}");
        for refusal in [
            agent.create(NAME, &req(|_| {}), "2026-12-04T00:00:00Z", 1).unwrap_err(),
            agent.delete(NAME, 1, false).unwrap_err(),
            agent.publish(NAME, 1).unwrap_err(),
        ] {
            assert_eq!(refusal.reason, ErrorReason::Conflict, "{}", refusal.message);
            assert!(refusal.message.contains("being made"), "{}", refusal.message);
        }
        assert!(agent.volume(NAME).is_none(), "not a volume until it is finished");
        assert!(finished.lock().unwrap().is_empty());
        open(&gate);
        let made = creating.join().unwrap().unwrap();
        assert!(matches!(made, Created::New(_)), "{made:?}");
        assert_eq!(finished.lock().unwrap().len(), 1, "finished once zeroed");
        assert_eq!(agent.pool_statuses()[0].allocated_bytes, 400 << 20, "counted once");

        // Grown the same way: the volume keeps its size until the new bytes are zeroed.
        let growing = {
            let agent = agent.clone();
            *gate.0.lock().unwrap() = false;
            in_background(move || agent.expand(NAME, 600 << 20, 1))
        };
        eventually("the zeroing started", || agent.pool_statuses()[0].allocated_bytes == 600 << 20);
        assert_eq!(agent.volume(NAME).unwrap().size_bytes, 400 << 20);
        let refusal = agent.delete(NAME, 1, false).unwrap_err();
        assert!(refusal.reason == ErrorReason::Conflict && refusal.message.contains("being grown"), "{refusal:?}");
        open(&gate);
        assert_eq!(growing.join().unwrap().unwrap().size_bytes, 600 << 20);
        assert_eq!(agent.volume(NAME).unwrap().size_bytes, 600 << 20);
        assert_eq!(agent.pool_statuses()[0].allocated_bytes, 600 << 20);
    }

    #[test]
    fn a_create_whose_leader_was_deposed_while_it_zeroed_is_not_finished() {
        let dir = tempfile::tempdir().unwrap();
        let backend = DebrisPool { zero_first: true, ..DebrisPool::default() };
        let (gate, finished, purged) = (backend.gate.clone(), backend.finished.clone(), backend.purged.clone());
        let agent = std::sync::Arc::new(fake_agent(&dir, vec![("lvm", backend)]));
        let creating = {
            let agent = agent.clone();
            in_background(move || agent.create(NAME, &req(|_| {}), "2026-12-04T00:00:00Z", 1))
        };
        eventually("the zeroing started", || agent.pool_statuses()[0].allocated_bytes == 400 << 20);
        agent.fence(2).unwrap();
        open(&gate);
        let refusal = creating.join().unwrap().unwrap_err();
        assert_eq!(refusal.reason, ErrorReason::StaleEpoch, "{}", refusal.message);
        assert!(finished.lock().unwrap().is_empty(), "a deposed leader's create is not finished");
        // What it made is debris: it counts until the background removes it.
        assert_eq!(agent.pool_statuses()[0].allocated_bytes, 400 << 20);
        assert!(agent.remove_debris());
        assert_eq!(*purged.lock().unwrap(), [std::path::PathBuf::from(format!("vg/berth-{NAME}"))]);
        assert_eq!(agent.pool_statuses()[0].allocated_bytes, 0);
    }

    #[test]
    fn a_failed_zeroing_leaves_debris_and_no_volume() {
        let dir = tempfile::tempdir().unwrap();
        let backend = DebrisPool { zero_first: true, zero_fails: true, ..DebrisPool::default() };
        open(&backend.gate);
        let agent = fake_agent(&dir, vec![("lvm", backend)]);
        let refusal = agent.create(NAME, &req(|_| {}), "2026-12-04T00:00:00Z", 1).unwrap_err();
        assert_eq!(refusal.reason, ErrorReason::Internal, "{}", refusal.message);
        assert!(agent.volume(NAME).is_none());
        let again = agent.create(NAME, &req(|_| {}), "2026-12-04T00:00:00Z", 1).unwrap_err();
        assert!(again.reason == ErrorReason::Conflict && again.message.contains("still being removed"), "{again:?}");
    }

    const CLONE: &str = "pvc-0f8e3c1a-5b2d-4c7e-9a10-2b3c4d5e6f71";

    fn clone_of(source: &str, extra: impl FnOnce(&mut CreateVolumeRequest)) -> CreateVolumeRequest {
        req(|r| {
            r.source = Some(source.into());
            extra(r)
        })
    }

    fn cloning_pool() -> DebrisPool {
        DebrisPool { clones: true, ..DebrisPool::default() }
    }

    #[test]
    fn a_clone_is_made_from_its_source_counted_and_answered_again_as_existing() {
        let dir = tempfile::tempdir().unwrap();
        let backend = cloning_pool();
        let cloned = backend.cloned.clone();
        let agent = fake_agent(&dir, vec![("lvm", backend)]);
        assert!(matches!(agent.create(NAME, &req(|_| {}), "2026-12-07T00:00:00Z", 1), Ok(Created::New(_))));
        // At least its source's size: the same, or larger.
        let made = agent.create(CLONE, &clone_of(NAME, |r| r.size_bytes = 500 << 20), "2026-12-07T00:00:01Z", 1);
        let Ok(Created::New(clone)) = made else { panic!("{made:?}") };
        assert_eq!(
            (clone.size_bytes, clone.fs_type.as_deref(), clone.published),
            (500 << 20, Some("ext4"), Some(false))
        );
        assert_eq!(*cloned.lock().unwrap(), [(CLONE.to_owned(), NAME.to_owned())]);
        // Its full size is promised, like a new volume's.
        assert_eq!(agent.pool_statuses()[0].allocated_bytes, 900 << 20);
        let again = agent.create(CLONE, &clone_of(NAME, |r| r.size_bytes = 500 << 20), "2026-12-07T00:00:02Z", 1);
        assert!(matches!(again, Ok(Created::Existing(_))), "{again:?}");
        assert_eq!(cloned.lock().unwrap().len(), 1, "a retry makes nothing");
    }

    #[test]
    fn pools_that_make_no_clones_refuse_them_as_unsupported_before_anything_else() {
        let dir = tempfile::tempdir().unwrap();
        let backend = DebrisPool::default();
        let cloned = backend.cloned.clone();
        let agent = fake_agent(&dir, vec![("lvm", backend)]);
        assert!(matches!(agent.create(NAME, &req(|_| {}), "2026-12-07T00:00:00Z", 1), Ok(Created::New(_))));
        for source in [NAME, "pvc-nothing-here"] {
            let refusal = agent.create(CLONE, &clone_of(source, |_| {}), "2026-12-07T00:00:01Z", 1).unwrap_err();
            assert_eq!(refusal.reason, ErrorReason::Unsupported, "{}", refusal.message);
        }
        assert!(agent.volume(CLONE).is_none() && cloned.lock().unwrap().is_empty());
    }

    #[test]
    fn a_clone_that_cannot_be_its_sources_is_invalid_and_nothing_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let backend = cloning_pool();
        let cloned = backend.cloned.clone();
        let agent = fake_agent(&dir, vec![("lvm", backend), ("other", cloning_pool())]);
        assert!(matches!(agent.create(NAME, &req(|_| {}), "2026-12-07T00:00:00Z", 1), Ok(Created::New(_))));
        let other = "pvc-0f8e3c1a-5b2d-4c7e-9a10-2b3c4d5e6f72";
        let in_other = req(|r| r.pool = "other".into());
        assert!(matches!(agent.create(other, &in_other, "2026-12-07T00:00:00Z", 1), Ok(Created::New(_))));
        for (bad, says) in [
            (clone_of("pvc-nothing-here", |_| {}), "source volume pvc-nothing-here does not exist on node node-0"),
            (clone_of(other, |_| {}), "is in pool \"other\", not \"lvm\""),
            (clone_of(NAME, |r| r.size_bytes = (400 << 20) - 1), "a clone is at least its source's size"),
            (clone_of(NAME, |r| r.volume_mode = VolumeMode::Block), "volume mode"),
            (clone_of(NAME, |r| r.fs_type = Some("xfs".into())), "filesystem"),
            (clone_of(NAME, |r| r.uid = Some(999)), "owned by 0:0 with mode 0o750"),
            (clone_of(NAME, |r| r.mode = Some(0o700)), "owned by 0:0 with mode 0o750"),
            (clone_of(CLONE, |_| {}), "cannot be a clone of itself"),
            (clone_of("Not-A-Name", |_| {}), "source: "),
        ] {
            let refusal = agent.create(CLONE, &bad, "2026-12-07T00:00:01Z", 1).unwrap_err();
            assert_eq!(refusal.reason, ErrorReason::Invalid, "{}", refusal.message);
            assert!(refusal.message.contains(says), "{says:?} not in {:?}", refusal.message);
        }
        assert!(cloned.lock().unwrap().is_empty());
        assert!(agent.volume(CLONE).is_none());
        // A clone of a raw block volume is one too.
        let block = "pvc-0f8e3c1a-5b2d-4c7e-9a10-2b3c4d5e6f73";
        let block_req = |r: &mut CreateVolumeRequest| r.volume_mode = VolumeMode::Block;
        assert!(matches!(agent.create(block, &req(block_req), "2026-12-07T00:00:00Z", 1), Ok(Created::New(_))));
        let made = agent.create(CLONE, &clone_of(block, block_req), "2026-12-07T00:00:01Z", 1);
        assert!(matches!(made, Ok(Created::New(_))), "{made:?}");
    }

    #[test]
    fn a_clone_that_does_not_fit_is_refused_like_any_volume() {
        let dir = tempfile::tempdir().unwrap();
        let backend = cloning_pool();
        let cloned = backend.cloned.clone();
        let agent = fake_agent(&dir, vec![("lvm", backend)]);
        let big = req(|r| r.size_bytes = 6 * GI);
        assert!(matches!(agent.create(NAME, &big, "2026-12-07T00:00:00Z", 1), Ok(Created::New(_))));
        let refusal = agent.create(CLONE, &clone_of(NAME, |r| r.size_bytes = 6 * GI), "2026-12-07T00:00:01Z", 1);
        assert_eq!(refusal.unwrap_err().reason, ErrorReason::InsufficientSpace);
        assert!(cloned.lock().unwrap().is_empty());
    }

    #[test]
    fn a_source_being_made_is_not_cloned() {
        let dir = tempfile::tempdir().unwrap();
        let backend = DebrisPool { zero_first: true, ..cloning_pool() };
        let gate = backend.gate.clone();
        let agent = std::sync::Arc::new(fake_agent(&dir, vec![("lvm", backend)]));
        let creating = {
            let agent = agent.clone();
            in_background(move || agent.create(NAME, &req(|_| {}), "2026-12-07T00:00:00Z", 1))
        };
        eventually("the zeroing started", || agent.pool_statuses()[0].allocated_bytes == 400 << 20);
        let refusal = agent.create(CLONE, &clone_of(NAME, |_| {}), "2026-12-07T00:00:01Z", 1).unwrap_err();
        assert!(refusal.reason == ErrorReason::Conflict && refusal.message.contains("being made"), "{refusal:?}");
        open(&gate);
        assert!(matches!(creating.join().unwrap(), Ok(Created::New(_))));
        assert!(matches!(agent.create(CLONE, &clone_of(NAME, |_| {}), "2026-12-07T00:00:01Z", 1), Ok(Created::New(_))));
    }

    #[test]
    fn a_hostpath_pool_clones_a_volume_by_copying_its_files_and_holds_the_source_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("dirs");
        let hostpath =
            crate::backend::hostpath::HostPath::new("dirs", &root, crate::in_use::MountTables::new("/proc".as_ref()));
        hostpath.init().unwrap();
        let config = PoolConfig {
            backend: crate::config::BackendKind::Hostpath,
            root: root.clone(),
            volume_group: None,
            ..lvm_config("dirs")
        };
        let pools = vec![Pool { config, backend: Box::new(hostpath) as Box<dyn Backend> }];
        let agent = Agent::start("node-0".into(), pools, EpochFence::load(dir.path().join("epoch")).unwrap());
        let in_dirs = |r: &mut CreateVolumeRequest| r.pool = "dirs".into();
        let Ok(Created::New(source)) = agent.create(NAME, &req(in_dirs), "2026-12-07T00:00:00Z", 1) else {
            panic!("the source")
        };
        let source_data = std::path::Path::new(&source.path);
        std::fs::create_dir(source_data.join("base")).unwrap();
        std::fs::write(source_data.join("base/table"), "committed").unwrap();
        let refusal =
            agent.create(CLONE, &clone_of("pvc-nothing-here", in_dirs), "2026-12-07T00:00:01Z", 1).unwrap_err();
        assert_eq!(refusal.reason, ErrorReason::Invalid, "{}", refusal.message);
        let Ok(Created::New(clone)) = agent.create(CLONE, &clone_of(NAME, in_dirs), "2026-12-07T00:00:01Z", 1) else {
            panic!("the clone")
        };
        let clone_data = std::path::Path::new(&clone.path);
        assert_ne!(clone_data, source_data);
        std::fs::write(source_data.join("base/table"), "written after").unwrap();
        assert_eq!(std::fs::read_to_string(clone_data.join("base/table")).unwrap(), "committed");
        assert_eq!(clone.published, Some(false), "a new volume, unpublished until its PV exists");
        // Nothing of the copy is left in staging, and the same request again is the same clone.
        let staging: Vec<_> = std::fs::read_dir(root.join(".berth-tmp")).unwrap().collect();
        assert!(staging.is_empty(), "{staging:?}");
        assert!(matches!(
            agent.create(CLONE, &clone_of(NAME, in_dirs), "2026-12-07T00:00:02Z", 1),
            Ok(Created::Existing(_))
        ));
        // Both are volumes of their own: the source goes, the clone stays.
        assert!(agent.delete(NAME, 1, false).unwrap());
        assert_eq!(std::fs::read_to_string(clone_data.join("base/table")).unwrap(), "committed");
    }

    #[test]
    fn a_source_being_copied_into_a_clone_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = State::default();
        let pool = Pool { config: lvm_config("dirs"), backend: Box::new(cloning_pool()) as Box<dyn Backend> };
        let copying = Copying {
            from: dir.path().join("from"),
            to: dir.path().join("to"),
            leftover: Debris { path: dir.path().join("to"), volume: None, size_bytes: 1 },
        };
        state.in_flight.extend(InFlight::copying(&pool, CLONE, 1, &copying, NAME));
        for name in [NAME, CLONE] {
            let refusal = state.not_in_flight(name).unwrap_err();
            assert_eq!(refusal.reason, ErrorReason::Conflict, "{}", refusal.message);
        }
        assert!(state.not_in_flight(NAME).unwrap_err().message.contains("being copied into a clone"));
    }
}
