//! Online expansion, as an external resizer (provisioning-protocol.md, "Expansion for volumes that are not CSI"):
//! kube-controller-manager finds no plugin that can expand a `local` or `hostPath` PV and leaves a grown claim to
//! us. Kubernetes 1.37's protocol for a resizer (RecoverVolumeExpansionFailure, locked on), as
//! kubernetes-csi/external-resizer follows it for volumes that need no node expansion:
//! 1. before growing: `status.allocatedResources` = the new size, `allocatedResourceStatuses.storage` =
//!    `ControllerResizeInProgress`, condition `Resizing` (over the claim's resourceVersion);
//! 2. the agent grows the volume; the PV's capacity, then the claim's `status.capacity`; the resize status and the
//!    resize conditions go;
//! 3. a final refusal (no room, an unknown volume): `ControllerResizeInfeasible`, condition `ControllerResizeError`,
//!    an event, and nothing more until the request changes — the user's recovery is to lower it (the API server
//!    allows any size above `status.capacity` then), which is grown to like any other.
//!
//! `NodeResizePending` is never set (nothing on the node would clear it: kubelet's local plugin has nothing to
//! grow), and conditions other than the resize ones are left as they are. What to do is a pure function of claim,
//! class and PV ([`plan`]); [`run`] carries it out.

use std::sync::Arc;

use berth::agent_api::ErrorReason;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimCondition};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;

use crate::agent_client::AgentError;
use crate::context::Context;
use crate::error::Error;
use crate::pv::NODE_ANNOTATION;

pub const IN_PROGRESS: &str = "ControllerResizeInProgress";
pub const INFEASIBLE: &str = "ControllerResizeInfeasible";
/// The condition types that belong to a resize (kube's pkg/volume/util/resize_util.go): replaced by each step,
/// while every other condition of the claim stays.
const RESIZE_CONDITIONS: [&str; 4] =
    ["Resizing", "FileSystemResizePending", "ControllerResizeError", "NodeResizeError"];

#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Nothing to do.
    Nothing,
    /// Grow the volume to `bytes` (`quantity`): mark the claim (unless `marked` already), grow, record.
    Grow { bytes: u64, quantity: Quantity, marked: bool },
    /// The PV already has `quantity` (an earlier attempt stopped before the claim's status): record it there.
    Finish { quantity: Quantity },
}

fn bytes(q: Option<&Quantity>) -> Option<u64> {
    berth::quantity::bytes(&q?.0).ok()
}

/// The claim's resize status and allocated size.
fn resize_state(claim: &PersistentVolumeClaim) -> (Option<&str>, Option<&Quantity>) {
    let status = claim.status.as_ref();
    let resize = status.and_then(|s| s.allocated_resource_statuses.as_ref()?.get("storage")).map(String::as_str);
    let allocated = status.and_then(|s| s.allocated_resources.as_ref()?.get("storage"));
    (resize, allocated)
}

/// What expansion a Bound claim needs. Only classes with `allowVolumeExpansion: true` (the API server refuses to
/// grow other claims anyway).
pub fn plan(claim: &PersistentVolumeClaim, class: Option<&StorageClass>, pv: &PersistentVolume) -> Plan {
    let bound = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    if !bound || class.and_then(|c| c.allow_volume_expansion) != Some(true) {
        return Plan::Nothing;
    }
    let requested = claim.spec.as_ref().and_then(|s| s.resources.as_ref()?.requests.as_ref()?.get("storage").cloned());
    let Some(requested) = requested else { return Plan::Nothing };
    let Some(wanted) = bytes(Some(&requested)) else { return Plan::Nothing };
    let pv_quantity = pv.spec.as_ref().and_then(|s| s.capacity.as_ref()?.get("storage"));
    let Some(pv_has) = bytes(pv_quantity) else { return Plan::Nothing };
    let claim_has = bytes(claim.status.as_ref().and_then(|s| s.capacity.as_ref()?.get("storage")));
    let (resize, allocated) = resize_state(claim);
    let allocated_bytes = bytes(allocated);
    if resize == Some(INFEASIBLE) && allocated_bytes == Some(wanted) {
        // Refused for good at this size: only a new request is worth another try.
        return Plan::Nothing;
    }
    // An attempt that was under way may have grown the volume part of the way, or all of it: it is finished at
    // its size even when the request was lowered meanwhile (the agent cannot shrink).
    let (target, quantity) = match (resize, allocated, allocated_bytes) {
        (Some(IN_PROGRESS), Some(q), Some(a)) if a > wanted => (a, q.clone()),
        _ => (wanted, requested),
    };
    if target > pv_has {
        let marked = resize == Some(IN_PROGRESS) && allocated_bytes == Some(target);
        return Plan::Grow { bytes: target, quantity, marked };
    }
    let claim_behind = claim_has.is_none_or(|has| has < pv_has);
    if claim_behind || resize.is_some() {
        return Plan::Finish { quantity: pv_quantity.cloned().expect("read above") };
    }
    Plan::Nothing
}

/// The claim's conditions with the resize ones replaced by `with` (none: removed).
pub fn conditions(
    claim: &PersistentVolumeClaim,
    with: Option<(&str, String)>,
    now: Time,
) -> Vec<PersistentVolumeClaimCondition> {
    let existing = claim.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
    let mut out: Vec<_> = existing.into_iter().filter(|c| !RESIZE_CONDITIONS.contains(&c.type_.as_str())).collect();
    if let Some((type_, message)) = with {
        out.push(PersistentVolumeClaimCondition {
            type_: type_.to_owned(),
            status: "True".into(),
            last_transition_time: Some(now),
            message: Some(message),
            ..Default::default()
        });
    }
    out
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
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
    if !crate::delete::ours(&pv) {
        return Ok(Action::await_change());
    }
    let key = format!("expand/{pv_name}");
    match plan(claim, class, &pv) {
        Plan::Nothing => Ok(Action::await_change()),
        Plan::Finish { quantity } => {
            finish(ctx, claim, &quantity).await?;
            ctx.succeeded(&key);
            Ok(Action::await_change())
        }
        Plan::Grow { bytes, quantity, marked } => {
            let node = pv.metadata.annotations.as_ref().and_then(|a| a.get(NODE_ANNOTATION)).cloned();
            let status = node.as_deref().and_then(|n| ctx.berth_node(n)).and_then(|b| b.status.clone());
            let (Some(node), Some(status)) = (node, status) else {
                let note = format!("the agent of the volume's node is not known; cannot grow {pv_name} for now");
                ctx.event(claim, true, "VolumeResizeFailed", note).await;
                return Ok(Action::requeue(ctx.next_backoff(&key)));
            };
            // Marked before the agent is asked, over the version of the claim the plan was made from: a claim
            // changed meanwhile fails with 409 and is planned again.
            let claim = if marked { claim.clone() } else { mark_in_progress(ctx, claim, &quantity).await? };
            ctx.event(
                &claim,
                false,
                "Resizing",
                format!("External resizer is resizing volume {pv_name} to {}", quantity.0),
            )
            .await;
            crate::failpoints::pause("expand-before-agent-grow").await;
            match ctx.agents.expand(&node, &status, &pv_name, bytes).await {
                Ok(_) => {}
                Err(AgentError::Refused {
                    reason: reason @ (ErrorReason::InsufficientSpace | ErrorReason::NotFound | ErrorReason::Invalid),
                    message,
                }) => {
                    let note = format!("cannot grow {pv_name} to {} on node {node}: {message}", quantity.0);
                    infeasible(ctx, &claim, &note).await?;
                    ctx.event(&claim, true, "VolumeResizeFailed", note).await;
                    ctx.succeeded(&key);
                    tracing::info!(volume = %pv_name, %node, size = %quantity.0, ?reason, "expansion refused for good; the claim says so");
                    return Ok(Action::await_change());
                }
                Err(AgentError::Deposed(_)) => return Ok(Action::await_change()),
                Err(e) => {
                    // Maybe done, maybe not: the claim stays in progress and the grow is asked again.
                    ctx.event(&claim, true, "VolumeResizeFailed", format!("node {node}: {e}; retrying")).await;
                    return Err(e.into());
                }
            }
            // Crash test: the volume has grown, neither PV nor claim says so yet.
            fail::fail_point!("expand-after-agent-grow", |_| std::process::abort());
            let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
            let patch = serde_json::json!({"spec": {"capacity": {"storage": quantity}}});
            pvs.patch(&pv_name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            finish(ctx, &claim, &quantity).await?;
            ctx.succeeded(&key);
            let note = format!("Resize volume {pv_name} to {} succeeded", quantity.0);
            ctx.event(&claim, false, "VolumeResizeSuccessful", note).await;
            tracing::info!(volume = %pv_name, %node, size = %quantity.0, "volume grown");
            Ok(Action::await_change())
        }
    }
}

fn claims_api(ctx: &Context, claim: &PersistentVolumeClaim) -> Api<PersistentVolumeClaim> {
    Api::namespaced(ctx.client.clone(), claim.metadata.namespace.as_deref().unwrap_or_default())
}

fn name_of(claim: &PersistentVolumeClaim) -> &str {
    claim.metadata.name.as_deref().unwrap_or_default()
}

/// Step 1: the claim says which size is being reached, and that the resize is under way. Returns the claim as
/// written.
async fn mark_in_progress(
    ctx: &Context,
    claim: &PersistentVolumeClaim,
    quantity: &Quantity,
) -> Result<PersistentVolumeClaim, kube::Error> {
    let message = format!("growing the volume to {}", quantity.0);
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": claim.metadata.resource_version},
        "status": {
            "allocatedResources": {"storage": quantity},
            "allocatedResourceStatuses": {"storage": IN_PROGRESS},
            "conditions": conditions(claim, Some(("Resizing", message)), now()),
        },
    });
    claims_api(ctx, claim).patch_status(name_of(claim), &PatchParams::default(), &Patch::Merge(&patch)).await
}

/// Step 2's end: the claim has the volume's size, no resize status and no resize condition.
async fn finish(ctx: &Context, claim: &PersistentVolumeClaim, quantity: &Quantity) -> Result<(), kube::Error> {
    let (_, allocated) = resize_state(claim);
    let mut status = serde_json::json!({
        "capacity": {"storage": quantity},
        "allocatedResourceStatuses": {"storage": null},
        "conditions": conditions(claim, None, now()),
    });
    // A claim grown by an earlier Berth (or by hand) may lack it; kubelet reads it to tell that nothing is left to
    // do on the node.
    if bytes(allocated) < bytes(Some(quantity)) {
        status["allocatedResources"] = serde_json::json!({"storage": quantity});
    }
    let patch = serde_json::json!({"status": status});
    claims_api(ctx, claim).patch_status(name_of(claim), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// Step 3: refused for good at this size.
async fn infeasible(ctx: &Context, claim: &PersistentVolumeClaim, message: &str) -> Result<(), kube::Error> {
    let patch = serde_json::json!({"status": {
        "allocatedResourceStatuses": {"storage": INFEASIBLE},
        "conditions": conditions(claim, Some(("ControllerResizeError", message.to_owned())), now()),
    }});
    claims_api(ctx, claim).patch_status(name_of(claim), &PatchParams::default(), &Patch::Merge(&patch)).await?;
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

    fn with_resize(mut c: PersistentVolumeClaim, status: &str, allocated: &str) -> PersistentVolumeClaim {
        let s = c.status.as_mut().unwrap();
        s.allocated_resource_statuses = Some(BTreeMap::from([("storage".into(), status.into())]));
        s.allocated_resources = Some(BTreeMap::from([("storage".into(), Quantity(allocated.into()))]));
        c
    }

    fn grow(bytes: u64, q: &str, marked: bool) -> Plan {
        Plan::Grow { bytes, quantity: Quantity(q.into()), marked }
    }

    #[test]
    fn grows_only_bound_claims_of_expandable_classes_that_ask_for_more() {
        let yes = class(Some(true));
        assert_eq!(plan(&claim("Bound", "2Gi", "1Gi"), Some(&yes), &pv("1Gi")), grow(2 << 30, "2Gi", false));
        assert_eq!(plan(&claim("Bound", "2Gi", "1Gi"), Some(&class(None)), &pv("1Gi")), Plan::Nothing);
        assert_eq!(plan(&claim("Bound", "2Gi", "1Gi"), None, &pv("1Gi")), Plan::Nothing);
        assert_eq!(plan(&claim("Pending", "2Gi", "1Gi"), Some(&yes), &pv("1Gi")), Plan::Nothing);
        // The same number written otherwise is not growth.
        assert_eq!(plan(&claim("Bound", "1024Mi", "1Gi"), Some(&yes), &pv("1Gi")), Plan::Nothing);
        // The PV grew, the claim's status did not (a stop between the two): only the status is written.
        assert_eq!(
            plan(&claim("Bound", "2Gi", "1Gi"), Some(&yes), &pv("2Gi")),
            Plan::Finish { quantity: Quantity("2Gi".into()) }
        );
    }

    #[test]
    fn the_resize_status_says_where_an_earlier_attempt_stopped() {
        let yes = class(Some(true));
        // Marked, then stopped before or during the grow: grown again, not marked again.
        let marked = with_resize(claim("Bound", "2Gi", "1Gi"), IN_PROGRESS, "2Gi");
        assert_eq!(plan(&marked, Some(&yes), &pv("1Gi")), grow(2 << 30, "2Gi", true));
        // ... and the user lowered the request meanwhile: the size under way is finished first.
        let lowered = with_resize(claim("Bound", "3Gi", "1Gi"), IN_PROGRESS, "4Gi");
        assert_eq!(plan(&lowered, Some(&yes), &pv("1Gi")), grow(4 << 30, "4Gi", true));
        // Stopped after the PV was grown: the claim is finished (also clears the status).
        let pv_done = with_resize(claim("Bound", "2Gi", "1Gi"), IN_PROGRESS, "2Gi");
        assert_eq!(plan(&pv_done, Some(&yes), &pv("2Gi")), Plan::Finish { quantity: Quantity("2Gi".into()) });
        let stale_status = with_resize(claim("Bound", "2Gi", "2Gi"), IN_PROGRESS, "2Gi");
        assert_eq!(plan(&stale_status, Some(&yes), &pv("2Gi")), Plan::Finish { quantity: Quantity("2Gi".into()) });
    }

    #[test]
    fn an_infeasible_size_is_not_tried_again_but_a_lowered_request_is() {
        let yes = class(Some(true));
        let refused = with_resize(claim("Bound", "4Gi", "1Gi"), INFEASIBLE, "4Gi");
        assert_eq!(plan(&refused, Some(&yes), &pv("1Gi")), Plan::Nothing);
        // The user's recovery: a smaller request (the API server allows any size above status.capacity).
        let lowered = with_resize(claim("Bound", "2Gi", "1Gi"), INFEASIBLE, "4Gi");
        assert_eq!(plan(&lowered, Some(&yes), &pv("1Gi")), grow(2 << 30, "2Gi", false));
        // Or a larger one.
        let raised = with_resize(claim("Bound", "8Gi", "1Gi"), INFEASIBLE, "4Gi");
        assert_eq!(plan(&raised, Some(&yes), &pv("1Gi")), grow(8 << 30, "8Gi", false));
    }

    #[test]
    fn only_resize_conditions_are_replaced() {
        let mut c = claim("Bound", "2Gi", "1Gi");
        let condition =
            |t: &str| PersistentVolumeClaimCondition { type_: t.into(), status: "True".into(), ..Default::default() };
        c.status.as_mut().unwrap().conditions =
            Some(vec![condition("ModifyingVolume"), condition("ControllerResizeError"), condition("Resizing")]);
        let types = |v: Vec<PersistentVolumeClaimCondition>| v.into_iter().map(|c| c.type_).collect::<Vec<_>>();
        assert_eq!(types(conditions(&c, None, now())), ["ModifyingVolume"]);
        assert_eq!(types(conditions(&c, Some(("Resizing", "m".into())), now())), ["ModifyingVolume", "Resizing"]);
    }
}
