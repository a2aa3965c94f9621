//! The orphan audit: compares every agent's volumes with the PVs. A volume with no PV whose claim is gone, older
//! than a grace period, is an orphan — left by a claim deleted mid-provisioning, a crash between the agent's create
//! and the PV's, or a reschedule away from an agent that did not answer but had in fact made the volume. It is
//! deleted (or only reported). A PV whose volume is missing on its agent gets a Warning event.

use std::sync::Arc;
use std::time::Duration;

use berth::agent_api::Volume;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::Api;

use crate::context::Context;
use crate::pv::NODE_ANNOTATION;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OrphanAction {
    Delete,
    Report,
}

/// Volumes that are orphans: no PV, no live claim with their uid, and created more than `grace` before `now`.
/// `claim_alive(volume)` says whether the claim the volume was made for still exists (provisioning in flight).
pub fn orphans(
    volumes: &[Volume],
    pv_exists: impl Fn(&str) -> bool,
    claim_alive: impl Fn(&Volume) -> bool,
    now: time::OffsetDateTime,
    grace: Duration,
) -> Vec<&Volume> {
    volumes
        .iter()
        .filter(|v| !pv_exists(&v.name))
        .filter(|v| {
            // An unreadable creation time is treated as new: never delete on a guess.
            time::OffsetDateTime::parse(&v.created_at, &time::format_description::well_known::Rfc3339)
                .is_ok_and(|created| now - created > grace)
        })
        .filter(|v| !claim_alive(v))
        .collect()
}

async fn claim_alive(ctx: &Context, volume: &Volume) -> Result<bool, kube::Error> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &volume.claim.namespace);
    let uid = volume.name.strip_prefix("pvc-");
    Ok(claims
        .get_opt(&volume.claim.name)
        .await?
        .is_some_and(|c| c.metadata.uid.as_deref() == uid && c.metadata.deletion_timestamp.is_none()))
}

async fn audit_once(ctx: &Context, action: OrphanAction, grace: Duration) {
    let mut orphan_counts: std::collections::BTreeMap<(String, String), i64> = Default::default();
    let mut missing = 0;
    for berth_node in ctx.caches.berth_nodes.state() {
        let node = &berth_node.spec.node_name;
        let Some(status) = berth_node.status.as_ref() else { continue };
        for pool in &status.pools {
            orphan_counts.insert((node.clone(), pool.name.clone()), 0);
        }
        let volumes = match ctx.agents.list(node, status).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(node = %node, error = %e, "orphan audit: cannot list the agent's volumes");
                continue;
            }
        };
        let mut alive = std::collections::HashSet::new();
        for v in &volumes {
            if !ctx.pv_exists(&v.name) && claim_alive(ctx, v).await.unwrap_or(true) {
                alive.insert(v.name.clone());
            }
        }
        let found = orphans(
            &volumes,
            |n| ctx.pv_exists(n),
            |v| alive.contains(&v.name),
            time::OffsetDateTime::now_utc(),
            grace,
        );
        for orphan in found {
            *orphan_counts.entry((node.clone(), orphan.pool.clone())).or_default() += 1;
            let claim = format!("{}/{}", orphan.claim.namespace, orphan.claim.name);
            match action {
                OrphanAction::Report => {
                    tracing::warn!(node = %node, volume = %orphan.name, %claim, "orphan volume (reporting only)")
                }
                OrphanAction::Delete => match ctx.agents.delete(node, status, &orphan.name).await {
                    Ok(_) => tracing::warn!(node = %node, volume = %orphan.name, %claim, "orphan volume deleted"),
                    Err(e) => {
                        tracing::warn!(node = %node, volume = %orphan.name, error = %e, "cannot delete an orphan volume")
                    }
                },
            }
        }
        // PVs of this node whose volume the agent does not have.
        let names: std::collections::HashSet<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
        for pv in ctx.caches.volumes.state() {
            let ours = pv.metadata.annotations.as_ref().and_then(|a| a.get(NODE_ANNOTATION)) == Some(node);
            let name = pv.metadata.name.clone().unwrap_or_default();
            if ours && pv.metadata.deletion_timestamp.is_none() && !names.contains(name.as_str()) {
                let note = format!("the agent of node {node} has no volume {name}: its data is gone or was never made");
                tracing::warn!(pv = %name, node = %node, "PV without its volume");
                missing += 1;
                ctx.event(pv.as_ref(), true, "VolumeMissing", note).await;
            }
        }
    }
    ctx.metrics.set_orphans(&orphan_counts.into_iter().collect::<Vec<_>>());
    ctx.metrics.missing_volumes.set(missing);
}

pub async fn run(ctx: Arc<Context>, every: Duration, action: OrphanAction, grace: Duration) {
    loop {
        tokio::time::sleep(every).await;
        audit_once(&ctx, action, grace).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth::agent_api::{ClaimRef, VolumeMode};

    fn volume(name: &str, created: &str) -> Volume {
        Volume {
            name: name.into(),
            pool: "p".into(),
            size_bytes: 1,
            volume_mode: VolumeMode::Filesystem,
            path: "/x".into(),
            claim: ClaimRef { namespace: "a".into(), name: "b".into() },
            uid: 0,
            gid: 0,
            mode: 0o750,
            created_at: created.into(),
            fs_type: None,
            mount_options: vec![],
            used_bytes: None,
        }
    }

    #[test]
    fn only_old_volumes_without_pv_or_live_claim_are_orphans() {
        let now = time::OffsetDateTime::parse("2026-11-29T12:00:00Z", &time::format_description::well_known::Rfc3339)
            .unwrap();
        let vols = [
            volume("with-pv", "2026-11-29T10:00:00Z"),
            volume("claim-alive", "2026-11-29T10:00:00Z"),
            volume("too-young", "2026-11-29T11:59:00Z"),
            volume("unreadable-time", "yesterday"),
            volume("orphan", "2026-11-29T10:00:00Z"),
        ];
        let found = orphans(&vols, |n| n == "with-pv", |v| v.name == "claim-alive", now, Duration::from_secs(600));
        let names: Vec<&str> = found.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["orphan"]);
    }
}
