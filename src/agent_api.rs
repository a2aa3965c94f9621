//! The agent's HTTP API (`/v1`): request and response bodies, shared by the agent (server) and the controller
//! (client). Documented for humans in `docs/agent-api.md`; keep the two in step.

use serde::{Deserialize, Serialize};

/// Header carrying the controller's leadership epoch on every mutating request (terms.md: leadership epoch).
pub const EPOCH_HEADER: &str = "berth-leader-epoch";
/// mkfs.xfs (xfsprogs 5.19 and later) refuses filesystems under 300 MB: "Filesystem must be larger than 300MB".
/// The agent refuses smaller xfs volumes, and the controller refuses such claims before asking.
pub const XFS_MIN_BYTES: u64 = 300_000_000;
/// The largest request body the agent reads.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum VolumeMode {
    #[default]
    Filesystem,
    Block,
}

/// The claim a volume is made for, recorded in the volume's marker (for people reading the disk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimRef {
    pub namespace: String,
    pub name: String,
}

/// `POST /v1/volumes/{name}/expand`: grow the volume to `size_bytes` (online). Equal to the current size is a
/// no-op; smaller is refused (volumes never shrink).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExpandVolumeRequest {
    pub size_bytes: u64,
}

/// `PUT /v1/volumes/{name}`: create the volume, or confirm it exists with exactly these parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateVolumeRequest {
    pub pool: String,
    /// The size promised to the volume, > 0.
    pub size_bytes: u64,
    #[serde(default)]
    pub volume_mode: VolumeMode,
    pub claim: ClaimRef,
    /// Owner of the volume's directory (default root:root).
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    /// Permission bits of the volume's directory, at most 0o2777 (default 0o750: not world-writable).
    #[serde(default)]
    pub mode: Option<u32>,
    /// lvm pools, `Filesystem` volumes: the filesystem to make, `ext4` (default) or `xfs`. Refused elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_type: Option<String>,
    /// lvm pools, `Filesystem` volumes: options of the agent's mount of the volume (the class's mountOptions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_options: Vec<String>,
    /// A clone: the name of the volume on this node whose content the new volume starts with. It must be in the
    /// same pool, with the same volume mode and filesystem, and no larger than `size_bytes`. lvm thin pools make
    /// a thin snapshot, hostpath pools a copy of the source's files; thick lvm pools refuse `Unsupported`. Agents
    /// older than this field refuse it as an unknown field (400): a clone is never made as an empty volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// A volume as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub name: String,
    pub pool: String,
    pub size_bytes: u64,
    pub volume_mode: VolumeMode,
    /// The host path a PV points kubelet at.
    pub path: String,
    pub claim: ClaimRef,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    /// RFC 3339.
    pub created_at: String,
    /// The filesystem the agent made and mounted (lvm pools, `Filesystem` volumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_type: Option<String>,
    /// The options of the agent's mount of the volume.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_options: Vec<String>,
    /// Bytes the volume uses now, where its pool can tell: the project quota's count for directory volumes on a
    /// filesystem with project quotas, the volume's own filesystem for lvm `Filesystem` volumes. Only in answers
    /// to `GET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    /// Whether a PV has been made for the volume: `false` from its create until the controller marks it
    /// (`PUT /v1/volumes/{name}/published`), `true` ever after, also once that PV is gone (a Retain volume reclaimed
    /// by hand keeps its data). Only a volume that was never published may be removed as an orphan. `None` in
    /// answers of agents older than this field: their volumes count as published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<bool>,
}

impl Volume {
    /// Whether the agent says the volume was never published (`false` only when it says so).
    pub fn never_published(&self) -> bool {
        self.published == Some(false)
    }
}

/// The query of `DELETE /v1/volumes/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeleteVolumeQuery {
    /// Delete only a volume that was never published (409 `Published` otherwise): what the orphan audit and an
    /// abandoned provisioning attempt send, so that a volume with data somebody kept is never removed by them.
    #[serde(default)]
    pub unpublished_only: bool,
}

/// A pool's state and capacity (terms.md: capacity, allocated, free, maximum volume size, pool ready).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    pub name: String,
    pub backend: String,
    pub ready: bool,
    /// Why the pool is not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[schemars(extend("format" = "int64"))]
    pub capacity_bytes: u64,
    #[schemars(extend("format" = "int64"))]
    pub allocated_bytes: u64,
    #[schemars(extend("format" = "int64"))]
    pub free_bytes: u64,
    #[schemars(extend("format" = "int64"))]
    pub maximum_volume_size_bytes: u64,
    #[schemars(extend("format" = "int32"))]
    pub volumes: u32,
    /// How volume sizes are enforced: `none` (a directory volume can outgrow its size), `quota` (a project quota
    /// per directory volume) or `device` (lvm: each volume is a block device of its size).
    pub enforcement: String,
    /// Why `enforcement` is `none` although the pool's filesystem has project quotas: the kernel refuses the agent
    /// them (without CAP_SYS_ADMIN, or under a seccomp profile refusing quotactl; deploy/quota grants it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolList {
    pub node: String,
    pub pools: Vec<PoolStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeList {
    pub volumes: Vec<Volume>,
}

/// Why a request was refused. Each has its own HTTP status; the controller acts on the reason, not the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorReason {
    /// 400: malformed or invalid input.
    Invalid,
    /// 401: no token, or one that TokenReview does not accept for this node's audience.
    Unauthenticated,
    /// 403: a valid token of an identity other than the controller's.
    Forbidden,
    /// 404: no such volume.
    NotFound,
    /// 409: the volume exists with other parameters.
    Conflict,
    /// 409: a mutating request from an older leadership epoch than one already seen (`newestEpoch` says which).
    StaleEpoch,
    /// 409: a delete with `unpublishedOnly` of a volume that has been published.
    Published,
    /// 409: a delete of a volume something still uses (a pod's mount of it, an open device): nothing was changed;
    /// the controller retries until it is free.
    InUse,
    /// 413: the body is larger than [`MAX_BODY_BYTES`].
    TooLarge,
    /// 408: the body did not arrive in time after the headers (the agent's `--body-read-timeout-seconds`).
    Timeout,
    /// 422: the pool is not configured on this node.
    UnknownPool,
    /// 422: the pool's backend cannot serve this (raw block on a hostpath pool).
    Unsupported,
    /// 503: the pool's root or marker is missing; nothing is created there.
    PoolNotReady,
    /// 503: the agent is shutting down.
    ShuttingDown,
    /// 503: the caller cannot be authenticated now: TokenReview failed, or unknown tokens are being refused for a
    /// while after too many invalid ones. Nothing was done; retry.
    Unavailable,
    /// 507: not enough free space in the pool; the controller reschedules.
    InsufficientSpace,
    /// 500.
    Internal,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub reason: ErrorReason,
    pub message: String,
    /// With `StaleEpoch`: the newest epoch the agent has seen. A leader that still holds its lease raises its own
    /// epoch above it (a Lease deleted and made again starts counting from zero).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest_epoch: Option<u64>,
}
