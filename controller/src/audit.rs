//! The orphan audit: compares every agent's volumes with the PVs, on a timer.
//!
//! - A volume that a PV on its node uses (its own PV `pvc-<uid>`, or a static PV an administrator made over its
//!   path) and that is not yet marked published is marked (the mark is the agent's, durable). At start the audit
//!   does only this, before anything else may look like an orphan.
//! - A published volume without a PV is **retained**: a Retain volume whose PV was deleted by hand, data a user
//!   kept. It is reported (an event on the node's BerthNode, `berth_controller_retained_volumes`), never deleted.
//! - A volume never published is an **orphan** when it is older than the grace period and its claim is gone, or
//!   the claim's PV or recorded node (`local.berth.dev/node`) is another node: left by a claim deleted mid-
//!   provisioning, a crash between the agent's create and the PV's, or an earlier attempt on another node. It is
//!   deleted with the agent's `unpublishedOnly` condition (so a volume published meanwhile is refused), or only
//!   reported.
//! - A Berth PV whose volume its agent does not have gets a `VolumeMissing` event, after a second look at both
//!   (PVs created or deleted while the audit listed are not missing).
//!
//! The verdicts are pure functions ([`by_pvs`], [`by_claim`]); the I/O is in [`audit_once`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use berth::agent_api::{ErrorReason, Volume};
use berth::berth_node::{BerthNode, BerthNodeStatus};
use berth::keys;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use kube::api::Api;

use crate::agent_client::AgentError;
use crate::context::Context;
use crate::pv::{NODE_ANNOTATION, POOL_LABEL};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OrphanAction {
    Delete,
    Report,
}

/// Which node each PV's data is on, and where: by PV name and by path.
pub struct PvIndex {
    /// PV name → its node (None: no node could be told).
    by_name: HashMap<String, Option<String>>,
    /// (node, path) of every PV whose node is known.
    paths: Vec<(String, String)>,
}

/// The node a PV is pinned to: Berth's own annotation, else the single `kubernetes.io/hostname` value of its node
/// affinity (a static PV an administrator wrote), mapped to the Node that has that label.
fn node_of(pv: &PersistentVolume, node_by_hostname: &HashMap<&str, &str>) -> Option<String> {
    if let Some(node) = pv.metadata.annotations.as_ref().and_then(|a| a.get(NODE_ANNOTATION)) {
        return Some(node.clone());
    }
    let terms = &pv.spec.as_ref()?.node_affinity.as_ref()?.required.as_ref()?.node_selector_terms;
    let mut hosts = terms
        .iter()
        .flat_map(|t| t.match_expressions.iter().flatten())
        .filter_map(|e| (e.key == keys::HOSTNAME_LABEL && e.operator == "In").then_some(e.values.as_deref()?));
    match (hosts.next(), hosts.next()) {
        (Some([host]), None) => node_by_hostname.get(host.as_str()).map(|n| (*n).to_owned()),
        _ => None,
    }
}

fn path_of(pv: &PersistentVolume) -> Option<&str> {
    let spec = pv.spec.as_ref()?;
    spec.local.as_ref().map(|l| l.path.as_str()).or_else(|| spec.host_path.as_ref().map(|h| h.path.as_str()))
}

impl PvIndex {
    pub fn new(pvs: &[Arc<PersistentVolume>], nodes: &[Arc<Node>]) -> PvIndex {
        let node_by_hostname: HashMap<&str, &str> = nodes
            .iter()
            .filter_map(|n| {
                let host = n.metadata.labels.as_ref()?.get(keys::HOSTNAME_LABEL)?;
                Some((host.as_str(), n.metadata.name.as_deref()?))
            })
            .collect();
        let mut index = PvIndex { by_name: HashMap::new(), paths: Vec::new() };
        for pv in pvs {
            let node = node_of(pv, &node_by_hostname);
            if let (Some(node), Some(path)) = (&node, path_of(pv)) {
                index.paths.push((node.clone(), path.to_owned()));
            }
            index.by_name.insert(pv.metadata.name.clone().unwrap_or_default(), node);
        }
        index
    }

    /// Whether a PV pinned to `node` uses `volume`: the volume's own PV, or one whose path is the volume's path or
    /// inside it.
    fn uses(&self, node: &str, volume: &Volume) -> bool {
        let own = self.by_name.get(&volume.name).is_some_and(|n| n.as_deref() == Some(node));
        let inside = |path: &str| {
            path == volume.path || path.strip_prefix(volume.path.as_str()).is_some_and(|rest| rest.starts_with('/'))
        };
        own || self.paths.iter().any(|(n, path)| n == node && inside(path))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A PV uses it and it is marked published.
    InUse,
    /// A PV uses it: mark it published.
    Publish,
    /// Published, and no PV uses it now: report, keep.
    Retained,
    /// Never published and not used: keep for now (the reason).
    Keep(&'static str),
    /// Never published, not used, not wanted: delete (or report).
    Orphan(&'static str),
    /// Never published and no PV: whether its claim still wants it decides ([`by_claim`]).
    AskClaim,
}

/// Whether the volume was made more than `grace` before `now`. An unreadable creation time counts as new: never
/// delete on a guess.
fn older_than(volume: &Volume, now: time::OffsetDateTime, grace: Duration) -> bool {
    time::OffsetDateTime::parse(&volume.created_at, &time::format_description::well_known::Rfc3339)
        .is_ok_and(|created| now - created > grace)
}

/// An orphan only past the grace period.
fn orphan_when_old(why: &'static str, volume: &Volume, now: time::OffsetDateTime, grace: Duration) -> Verdict {
    if older_than(volume, now, grace) { Verdict::Orphan(why) } else { Verdict::Keep("younger than the grace period") }
}

/// What the PVs alone say of `volume` on `node`.
pub fn by_pvs(volume: &Volume, node: &str, pvs: &PvIndex, now: time::OffsetDateTime, grace: Duration) -> Verdict {
    match (pvs.uses(node, volume), volume.never_published()) {
        (true, true) => Verdict::Publish,
        (true, false) => Verdict::InUse,
        (false, false) => Verdict::Retained,
        (false, true) => match pvs.by_name.get(&volume.name) {
            // The claim's PV is on another node: this is a second volume of an earlier attempt.
            Some(Some(other)) if other != node => {
                orphan_when_old("its claim's PV is on another node", volume, now, grace)
            }
            Some(_) => Verdict::Keep("its PV exists, its node unknown"),
            None => Verdict::AskClaim,
        },
    }
}

/// What the claim says of a never-published `volume` on `node` that no PV uses. `claim`: the claim of the
/// volume's recorded name, read from the API server (None: not found).
pub fn by_claim(
    volume: &Volume,
    node: &str,
    claim: Option<&PersistentVolumeClaim>,
    now: time::OffsetDateTime,
    grace: Duration,
) -> Verdict {
    let uid = volume.name.strip_prefix("pvc-");
    let claim = claim.filter(|c| c.metadata.uid.as_deref() == uid && c.metadata.deletion_timestamp.is_none());
    match claim.map(crate::decide::recorded_node) {
        None => orphan_when_old("its claim is gone", volume, now, grace),
        // In flight here (or by a controller that did not record nodes).
        Some(None) => Verdict::Keep("its claim is being provisioned"),
        Some(Some(recorded)) if recorded == node => Verdict::Keep("its claim is being provisioned"),
        Some(Some(_)) => orphan_when_old("its claim is provisioned on another node", volume, now, grace),
    }
}

async fn claim_of(ctx: &Context, volume: &Volume) -> Result<Option<PersistentVolumeClaim>, kube::Error> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &volume.claim.namespace);
    claims.get_opt(&volume.claim.name).await
}

/// Per (node, pool) counts of one audit.
type Counts = BTreeMap<(String, String), i64>;

struct Tally {
    orphans: Counts,
    retained: Counts,
    missing: i64,
}

/// Marks every volume a PV uses as published. What the audit does at start, before any verdict on orphans.
pub async fn publish_all(ctx: &Context) {
    let pvs = PvIndex::new(&ctx.caches.volumes.state(), &ctx.caches.nodes.state());
    let now = time::OffsetDateTime::now_utc();
    for berth_node in ctx.caches.berth_nodes.state() {
        let node = &berth_node.spec.node_name;
        let Some(status) = berth_node.status.as_ref() else { continue };
        match ctx.agents.list(node, status).await {
            Ok(volumes) => {
                let marked = |v: &&Volume| by_pvs(v, node, &pvs, now, Duration::MAX) == Verdict::Publish;
                for v in volumes.iter().filter(marked) {
                    publish(ctx, node, status, v).await;
                }
            }
            Err(e) => {
                tracing::warn!(node = %node, error = %e, "cannot list the agent's volumes to mark them published")
            }
        }
    }
}

async fn publish(ctx: &Context, node: &str, status: &BerthNodeStatus, v: &Volume) {
    match ctx.agents.publish(node, status, &v.name).await {
        Ok(_) => tracing::info!(node = %node, volume = %v.name, "a PV uses the volume: marked published"),
        Err(e) => tracing::warn!(node = %node, volume = %v.name, error = %e, "cannot mark the volume published"),
    }
}

async fn audit_once(ctx: &Context, action: OrphanAction, grace: Duration) {
    let mut tally = Tally { orphans: Counts::new(), retained: Counts::new(), missing: 0 };
    for berth_node in ctx.caches.berth_nodes.state() {
        let Some(status) = berth_node.status.as_ref() else { continue };
        for pool in &status.pools {
            let key = (berth_node.spec.node_name.clone(), pool.name.clone());
            tally.orphans.insert(key.clone(), 0);
            tally.retained.insert(key, 0);
        }
        audit_node(ctx, &berth_node, status, action, grace, &mut tally).await;
    }
    let counts = |c: Counts| c.into_iter().collect::<Vec<_>>();
    ctx.metrics.set_audit_counts(&counts(tally.orphans), &counts(tally.retained));
    ctx.metrics.missing_volumes.set(tally.missing);
    ctx.metrics.audits.inc();
}

async fn audit_node(
    ctx: &Context,
    berth_node: &BerthNode,
    status: &BerthNodeStatus,
    action: OrphanAction,
    grace: Duration,
    tally: &mut Tally,
) {
    let node = berth_node.spec.node_name.as_str();
    // The PVs as they were before the listing: a PV made after it may have a volume the listing missed.
    let pvs_before = ctx.caches.volumes.state();
    let volumes = match ctx.agents.list(node, status).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(node = %node, error = %e, "orphan audit: cannot list the agent's volumes");
            return;
        }
    };
    let pvs = PvIndex::new(&ctx.caches.volumes.state(), &ctx.caches.nodes.state());
    let now = time::OffsetDateTime::now_utc();
    for v in &volumes {
        let mut verdict = by_pvs(v, node, &pvs, now, grace);
        if verdict == Verdict::AskClaim {
            verdict = match claim_of(ctx, v).await {
                Ok(claim) => by_claim(v, node, claim.as_ref(), now, grace),
                Err(e) => {
                    tracing::warn!(volume = %v.name, error = %e, "orphan audit: cannot read the volume's claim");
                    Verdict::Keep("its claim cannot be read")
                }
            };
        }
        let key = (node.to_owned(), v.pool.clone());
        match verdict {
            Verdict::Publish => publish(ctx, node, status, v).await,
            Verdict::Retained => {
                *tally.retained.entry(key).or_default() += 1;
                let note = format!(
                    "volume {} (pool {:?}, made for claim {}/{}, {} bytes) had a PV and has none now; its data is kept \
                     at {} (reclaiming it: docs/storageclass.md, \"Retained volumes\")",
                    v.name, v.pool, v.claim.namespace, v.claim.name, v.size_bytes, v.path
                );
                ctx.event(berth_node, false, "RetainedVolume", note).await;
            }
            Verdict::Orphan(why) => {
                *tally.orphans.entry(key).or_default() += 1;
                remove_orphan(ctx, node, status, v, why, action).await;
            }
            Verdict::InUse | Verdict::Keep(_) | Verdict::AskClaim => {}
        }
    }
    tally.missing += missing_volumes(ctx, node, status, &pvs_before, &volumes).await;
}

async fn remove_orphan(
    ctx: &Context,
    node: &str,
    status: &BerthNodeStatus,
    v: &Volume,
    why: &str,
    action: OrphanAction,
) {
    let claim = format!("{}/{}", v.claim.namespace, v.claim.name);
    if action == OrphanAction::Report {
        tracing::warn!(node = %node, volume = %v.name, %claim, why, "orphan volume (reporting only)");
        return;
    }
    // A last look at the API server, not the cache: a PV made since means the volume is wanted after all.
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    match pvs.get_opt(&v.name).await {
        Ok(Some(pv))
            if pv.metadata.annotations.as_ref().and_then(|a| a.get(NODE_ANNOTATION)).map(String::as_str)
                != Some(node) => {}
        Ok(None) => {}
        Ok(Some(_)) => return,
        Err(e) => {
            tracing::warn!(volume = %v.name, error = %e, "orphan audit: cannot read the PV; the orphan stays for now");
            return;
        }
    }
    match ctx.agents.delete_unpublished(node, status, &v.name).await {
        Ok(_) => tracing::warn!(node = %node, volume = %v.name, %claim, why, "orphan volume deleted"),
        Err(AgentError::Refused { reason: ErrorReason::InUse, message }) => {
            tracing::warn!(node = %node, volume = %v.name, %message, "an orphan volume is in use: left for a later audit")
        }
        Err(e) => tracing::warn!(node = %node, volume = %v.name, error = %e, "cannot delete an orphan volume"),
    }
}

/// Berth's PVs on `node` whose volume the agent does not have, each looked at twice: in the PVs as they were
/// before the listing, and again, with the volume, from the API server and the agent (a PV created or deleted
/// while the audit listed is not missing). PVs being deleted, released Delete-policy ones (their volume goes
/// first) and those of pools not ready now (their volumes are not listed) are skipped.
async fn missing_volumes(
    ctx: &Context,
    node: &str,
    status: &BerthNodeStatus,
    pvs_before: &[Arc<PersistentVolume>],
    volumes: &[Volume],
) -> i64 {
    let listed: std::collections::HashSet<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
    let ready_pools: std::collections::HashSet<&str> =
        status.pools.iter().filter(|p| p.ready).map(|p| p.name.as_str()).collect();
    let candidates: Vec<String> = pvs_before
        .iter()
        .filter(|pv| {
            pv.metadata.annotations.as_ref().and_then(|a| a.get(NODE_ANNOTATION)).map(String::as_str) == Some(node)
        })
        .filter(|pv| could_be_missing(pv))
        .filter(|pv| {
            pv.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(POOL_LABEL))
                .is_some_and(|p| ready_pools.contains(p.as_str()))
        })
        .filter_map(|pv| pv.metadata.name.clone())
        .filter(|name| !listed.contains(name.as_str()))
        .collect();
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let mut missing = 0;
    for name in candidates {
        let Ok(Some(pv)) = pvs.get_opt(&name).await else { continue };
        if !could_be_missing(&pv) || !matches!(ctx.agents.get(node, status, &name).await, Ok(None)) {
            continue;
        }
        missing += 1;
        tracing::warn!(pv = %name, node = %node, "PV without its volume");
        let note = format!("the agent of node {node} has no volume {name}: its data is gone or was never made");
        ctx.event(&pv, true, "VolumeMissing", note).await;
    }
    missing
}

/// A PV whose volume should exist: Berth's, not being deleted, and not a released Delete-policy one.
fn could_be_missing(pv: &PersistentVolume) -> bool {
    let spec = pv.spec.as_ref();
    let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or_default();
    let deleting = spec.and_then(|s| s.persistent_volume_reclaim_policy.as_deref()) == Some("Delete")
        && matches!(phase, "Released" | "Failed");
    crate::delete::ours(pv) && pv.metadata.deletion_timestamp.is_none() && !deleting
}

/// Marks what PVs use, at once; then audits every `every`.
pub async fn run(ctx: Arc<Context>, every: Duration, action: OrphanAction, grace: Duration) {
    publish_all(&ctx).await;
    loop {
        tokio::time::sleep(every).await;
        audit_once(&ctx, action, grace).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth::agent_api::{ClaimRef, VolumeMode};
    use k8s_openapi::api::core::v1::{
        LocalVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PersistentVolumeSpec,
        VolumeNodeAffinity,
    };
    use kube::api::ObjectMeta;

    const UID: &str = "0f8e3c1a-5b2d-4c7e-9a10-2b3c4d5e6f70";

    fn volume(published: Option<bool>, created: &str) -> Volume {
        Volume {
            name: format!("pvc-{UID}"),
            pool: "p".into(),
            size_bytes: 1,
            volume_mode: VolumeMode::Filesystem,
            path: "/pool/vol/data".into(),
            claim: ClaimRef { namespace: "a".into(), name: "b".into() },
            uid: 0,
            gid: 0,
            mode: 0o750,
            created_at: created.into(),
            fs_type: None,
            mount_options: vec![],
            used_bytes: None,
            published,
        }
    }

    fn node(name: &str, host: &str) -> Arc<Node> {
        let labels = BTreeMap::from([(keys::HOSTNAME_LABEL.to_owned(), host.to_owned())]);
        Arc::new(Node {
            metadata: ObjectMeta { name: Some(name.into()), labels: Some(labels), ..Default::default() },
            ..Default::default()
        })
    }

    /// Berth's PV of the volume, on `node`.
    fn own_pv(node: &str) -> Arc<PersistentVolume> {
        let annotations = BTreeMap::from([(NODE_ANNOTATION.to_owned(), node.to_owned())]);
        Arc::new(PersistentVolume {
            metadata: ObjectMeta {
                name: Some(format!("pvc-{UID}")),
                annotations: Some(annotations),
                ..Default::default()
            },
            ..Default::default()
        })
    }

    /// An administrator's PV of another name over `path`, pinned by hostname `host`.
    fn static_pv(path: &str, host: &str) -> Arc<PersistentVolume> {
        let affinity = VolumeNodeAffinity {
            required: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: keys::HOSTNAME_LABEL.into(),
                        operator: "In".into(),
                        values: Some(vec![host.into()]),
                    }]),
                    match_fields: None,
                }],
            }),
        };
        Arc::new(PersistentVolume {
            metadata: ObjectMeta { name: Some("restored".into()), ..Default::default() },
            spec: Some(PersistentVolumeSpec {
                local: Some(LocalVolumeSource { path: path.into(), fs_type: None }),
                node_affinity: Some(affinity),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    const OLD: &str = "2026-11-29T10:00:00Z";

    fn now() -> time::OffsetDateTime {
        time::OffsetDateTime::parse("2026-11-29T12:00:00Z", &time::format_description::well_known::Rfc3339).unwrap()
    }

    const GRACE: Duration = Duration::from_secs(600);

    fn by_pvs(v: &Volume, node: &str, pvs: &PvIndex) -> Verdict {
        super::by_pvs(v, node, pvs, now(), GRACE)
    }

    #[test]
    fn a_volume_with_a_pv_on_its_node_is_published_and_never_an_orphan() {
        let nodes = [node("n1", "host-1"), node("n2", "host-2")];
        let index = PvIndex::new(&[own_pv("n1")], &nodes);
        assert_eq!(by_pvs(&volume(Some(false), OLD), "n1", &index), Verdict::Publish);
        assert_eq!(by_pvs(&volume(Some(true), OLD), "n1", &index), Verdict::InUse);
        // The same name on another node is a second volume of an earlier attempt, once past the grace period.
        assert_eq!(
            by_pvs(&volume(Some(false), OLD), "n2", &index),
            Verdict::Orphan("its claim's PV is on another node")
        );
        assert!(matches!(by_pvs(&volume(Some(false), "2026-11-29T11:59:00Z"), "n2", &index), Verdict::Keep(_)));
        // ...unless it had a PV itself once: then it is kept.
        assert_eq!(by_pvs(&volume(Some(true), OLD), "n2", &index), Verdict::Retained);
    }

    #[test]
    fn a_static_pv_over_the_volumes_path_counts_as_its_pv() {
        let nodes = [node("n1", "host-1"), node("n2", "host-2")];
        for path in ["/pool/vol/data", "/pool/vol/data/pgdata"] {
            let index = PvIndex::new(&[static_pv(path, "host-1")], &nodes);
            assert_eq!(by_pvs(&volume(Some(true), OLD), "n1", &index), Verdict::InUse, "{path}");
            assert_eq!(by_pvs(&volume(Some(false), OLD), "n1", &index), Verdict::Publish, "{path}");
            // Pinned to the other node, or a neighbour's path: not this volume's.
            assert_eq!(by_pvs(&volume(Some(true), OLD), "n2", &index), Verdict::Retained);
        }
        let index = PvIndex::new(&[static_pv("/pool/vol/database", "host-1")], &nodes);
        assert_eq!(by_pvs(&volume(Some(true), OLD), "n1", &index), Verdict::Retained, "a prefix is not a parent");
    }

    #[test]
    fn published_or_unknown_volumes_without_a_pv_are_retained_never_orphans() {
        let index = PvIndex::new(&[], &[node("n1", "host-1")]);
        assert_eq!(by_pvs(&volume(Some(true), OLD), "n1", &index), Verdict::Retained);
        // An agent too old to say: kept the same way.
        assert_eq!(by_pvs(&volume(None, OLD), "n1", &index), Verdict::Retained);
        assert_eq!(by_pvs(&volume(Some(false), OLD), "n1", &index), Verdict::AskClaim);
    }

    fn claim(uid: &str, recorded: Option<&str>) -> PersistentVolumeClaim {
        let annotations = recorded.map(|n| BTreeMap::from([(NODE_ANNOTATION.to_owned(), n.to_owned())]));
        PersistentVolumeClaim {
            metadata: ObjectMeta { uid: Some(uid.into()), annotations, ..Default::default() },
            ..Default::default()
        }
    }

    #[test]
    fn an_unpublished_volume_is_an_orphan_once_old_and_unwanted_by_its_claim() {
        let (now, grace) = (now(), GRACE);
        let v = volume(Some(false), OLD);
        let verdict = |c: Option<&PersistentVolumeClaim>| by_claim(&v, "n1", c, now, grace);
        assert_eq!(verdict(None), Verdict::Orphan("its claim is gone"));
        assert_eq!(verdict(Some(&claim("other-uid", None))), Verdict::Orphan("its claim is gone"), "replaced");
        assert!(matches!(verdict(Some(&claim(UID, None))), Verdict::Keep(_)));
        assert!(matches!(verdict(Some(&claim(UID, Some("n1")))), Verdict::Keep(_)));
        assert_eq!(verdict(Some(&claim(UID, Some("n2")))), Verdict::Orphan("its claim is provisioned on another node"));
        let mut deleting = claim(UID, Some("n1"));
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
        assert_eq!(verdict(Some(&deleting)), Verdict::Orphan("its claim is gone"));
        // Young, or of an unreadable age: kept.
        for created in ["2026-11-29T11:59:00Z", "yesterday"] {
            let young = volume(Some(false), created);
            assert!(matches!(by_claim(&young, "n1", None, now, grace), Verdict::Keep(_)), "{created}");
        }
    }
}
