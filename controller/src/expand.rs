//! Online expansion, as an external resizer (provisioning-protocol.md, "Expansion for volumes that are not CSI"):
//! kube-controller-manager finds no plugin that can expand a `local` or `hostPath` PV and leaves a grown claim to
//! us. The agent grows the volume, then the PV's capacity and the claim's status follow. What to do is a pure
//! function of claim, class and PV ([`plan`]); [`run`] carries it out.

use std::sync::Arc;

use berth::agent_api::ErrorReason;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;

use crate::agent_client::AgentError;
use crate::context::Context;
use crate::error::Error;
use crate::pv::NODE_ANNOTATION;

#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Nothing to do.
    Nothing,
    /// Grow the volume to `bytes`, then record `quantity` on the PV and the claim.
    Grow { bytes: u64, quantity: Quantity },
    /// The PV already has `quantity` (an earlier attempt stopped before the claim's status): record it there.
    RecordOnClaim { quantity: Quantity },
}

fn bytes(q: Option<&Quantity>) -> Option<u64> {
    berth::quantity::bytes(&q?.0).ok()
}

/// What expansion a Bound claim needs. Only classes with `allowVolumeExpansion: true` (the API server refuses to
/// grow other claims anyway) and only PVs Berth made.
pub fn plan(claim: &PersistentVolumeClaim, class: Option<&StorageClass>, pv: &PersistentVolume) -> Plan {
    let bound = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    if !bound || class.and_then(|c| c.allow_volume_expansion) != Some(true) {
        return Plan::Nothing;
    }
    let requested = claim.spec.as_ref().and_then(|s| s.resources.as_ref()?.requests.as_ref()?.get("storage").cloned());
    let Some(requested) = requested else { return Plan::Nothing };
    let Some(wanted) = bytes(Some(&requested)) else { return Plan::Nothing };
    let pv_has = bytes(pv.spec.as_ref().and_then(|s| s.capacity.as_ref()?.get("storage")));
    let claim_has = bytes(claim.status.as_ref().and_then(|s| s.capacity.as_ref()?.get("storage")));
    match (pv_has, claim_has) {
        (Some(pv_has), _) if wanted > pv_has => Plan::Grow { bytes: wanted, quantity: requested },
        (Some(_), Some(claim_has)) if wanted > claim_has => Plan::RecordOnClaim { quantity: requested },
        _ => Plan::Nothing,
    }
}

/// Looks at a Bound claim of ours and grows its volume if it asks for more.
pub async fn run(
    ctx: &Arc<Context>,
    claim: &PersistentVolumeClaim,
    class: Option<&StorageClass>,
) -> Result<Action, Error> {
    let Some(pv_name) = claim.spec.as_ref().and_then(|s| s.volume_name.clone()) else {
        return Ok(Action::await_change());
    };
    let Some(pv) = ctx.caches.volumes.get(&ObjectRef::new(&pv_name)) else { return Ok(Action::await_change()) };
    let key = format!("expand/{pv_name}");
    match plan(claim, class, &pv) {
        Plan::Nothing => Ok(Action::await_change()),
        Plan::RecordOnClaim { quantity } => {
            record_on_claim(ctx, claim, &quantity).await?;
            ctx.succeeded(&key);
            Ok(Action::await_change())
        }
        Plan::Grow { bytes, quantity } => {
            let node = pv.metadata.annotations.as_ref().and_then(|a| a.get(NODE_ANNOTATION)).cloned();
            let status = node.as_deref().and_then(|n| ctx.berth_node(n)).and_then(|b| b.status.clone());
            let (Some(node), Some(status)) = (node, status) else {
                let note = format!("the agent of the volume's node is not known; cannot grow {pv_name} for now");
                ctx.event(claim, true, "VolumeResizeFailed", note).await;
                return Ok(Action::requeue(ctx.next_backoff(&key)));
            };
            ctx.event(
                claim,
                false,
                "Resizing",
                format!("External resizer is resizing volume {pv_name} to {}", quantity.0),
            )
            .await;
            match ctx.agents.expand(&node, &status, &pv_name, bytes).await {
                Ok(_) => {}
                Err(AgentError::Refused { reason, message }) => {
                    let retry = matches!(reason, ErrorReason::InsufficientSpace | ErrorReason::PoolNotReady);
                    let note = format!("cannot grow {pv_name} to {} on node {node}: {message}", quantity.0);
                    ctx.event(claim, true, "VolumeResizeFailed", note).await;
                    // Space may appear (a BerthNode change also brings the claim back here).
                    return Ok(if retry { Action::requeue(ctx.next_backoff(&key)) } else { Action::await_change() });
                }
                Err(AgentError::Deposed(_)) => return Ok(Action::await_change()),
                Err(e) => {
                    ctx.event(claim, true, "VolumeResizeFailed", format!("node {node}: {e}; retrying")).await;
                    return Err(e.into());
                }
            }
            let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
            let patch = serde_json::json!({"spec": {"capacity": {"storage": quantity}}});
            pvs.patch(&pv_name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            record_on_claim(ctx, claim, &quantity).await?;
            ctx.succeeded(&key);
            let note = format!("Resize volume {pv_name} to {} succeeded", quantity.0);
            ctx.event(claim, false, "VolumeResizeSuccessful", note).await;
            tracing::info!(volume = %pv_name, %node, size = %quantity.0, "volume grown");
            Ok(Action::await_change())
        }
    }
}

/// The claim's status says the new capacity, and no resize is pending any more.
async fn record_on_claim(ctx: &Context, claim: &PersistentVolumeClaim, quantity: &Quantity) -> Result<(), kube::Error> {
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), claim.metadata.namespace.as_deref().unwrap_or_default());
    let patch = serde_json::json!({"status": {
        "capacity": {"storage": quantity},
        "allocatedResources": {"storage": quantity},
        "allocatedResourceStatuses": null,
        "conditions": null,
    }});
    claims
        .patch_status(
            claim.metadata.name.as_deref().unwrap_or_default(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn claim(phase: &str, requested: &str, has: &str) -> PersistentVolumeClaim {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "c", "namespace": "n"},
            "spec": {"resources": {"requests": {"storage": requested}}, "volumeName": "pvc-1"},
            "status": {"phase": phase, "capacity": {"storage": has}},
        }))
        .unwrap()
    }

    fn pv(has: &str) -> PersistentVolume {
        PersistentVolume {
            spec: Some(k8s_openapi::api::core::v1::PersistentVolumeSpec {
                capacity: Some(BTreeMap::from([("storage".into(), Quantity(has.into()))])),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn class(allow: Option<bool>) -> StorageClass {
        StorageClass { allow_volume_expansion: allow, ..Default::default() }
    }

    #[test]
    fn grows_only_bound_claims_of_expandable_classes_that_ask_for_more() {
        let yes = class(Some(true));
        let grow = Plan::Grow { bytes: 2 << 30, quantity: Quantity("2Gi".into()) };
        assert_eq!(plan(&claim("Bound", "2Gi", "1Gi"), Some(&yes), &pv("1Gi")), grow);
        assert_eq!(plan(&claim("Bound", "2Gi", "1Gi"), Some(&class(None)), &pv("1Gi")), Plan::Nothing);
        assert_eq!(plan(&claim("Bound", "2Gi", "1Gi"), None, &pv("1Gi")), Plan::Nothing);
        assert_eq!(plan(&claim("Pending", "2Gi", "1Gi"), Some(&yes), &pv("1Gi")), Plan::Nothing);
        // The same number written otherwise is not growth.
        assert_eq!(plan(&claim("Bound", "1024Mi", "1Gi"), Some(&yes), &pv("1Gi")), Plan::Nothing);
        // The PV grew, the claim's status did not (a stop between the two): only the status is written.
        assert_eq!(
            plan(&claim("Bound", "2Gi", "1Gi"), Some(&yes), &pv("2Gi")),
            Plan::RecordOnClaim { quantity: Quantity("2Gi".into()) }
        );
    }
}
