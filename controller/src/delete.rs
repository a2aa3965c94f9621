//! The PV reconciler: frees the storage of Berth's PVs by their reclaim policy. Released + Delete → the agent
//! deletes the volume, then the PV object goes. A Delete-policy PV object deleted first keeps Berth's finalizer
//! until the volume is gone (KEP-2644). Retain → untouched, and the finalizer is lifted if someone switched to it.
//! A volume a pod still uses is refused by its agent (`InUse`): the PV keeps its finalizer, one `VolumeInUse` event
//! says so, and the delete is retried with the PV's backoff until the pod is gone.

use std::sync::Arc;

use berth::agent_api::ErrorReason;
use berth::keys;
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;

use crate::agent_client::AgentError;
use crate::context::{Context, GoneNodes};
use crate::error::Error;
use crate::metrics::Outcome;
use crate::pv::NODE_ANNOTATION;

pub fn ours(pv: &PersistentVolume) -> bool {
    pv.metadata.annotations.as_ref().and_then(|a| a.get(keys::PROVISIONED_BY)).map(String::as_str)
        == Some(berth::PROVISIONER_NAME)
}

async fn drop_finalizer(ctx: &Context, pv: &PersistentVolume) -> Result<(), kube::Error> {
    let finalizers: Vec<String> = pv
        .metadata
        .finalizers
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|f| f != keys::PV_DELETION_FINALIZER)
        .collect();
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    // The resourceVersion makes this a compare-and-swap: no other writer's finalizer is lost.
    let patch =
        serde_json::json!({"metadata": {"finalizers": finalizers, "resourceVersion": pv.metadata.resource_version}});
    pvs.patch(pv.metadata.name.as_deref().unwrap_or_default(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

fn class_of(pv: &PersistentVolume) -> &str {
    pv.spec.as_ref().and_then(|s| s.storage_class_name.as_deref()).unwrap_or_default()
}

pub async fn reconcile(pv: Arc<PersistentVolume>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    ctx.metrics.reconciling("volumes");
    let result = delete(pv.clone(), ctx.clone(), started).await;
    if result.is_err() {
        ctx.metrics.deleted(class_of(&pv), Outcome::Error, started.elapsed());
    }
    result
}

async fn delete(pv: Arc<PersistentVolume>, ctx: Arc<Context>, started: std::time::Instant) -> Result<Action, Error> {
    if !ours(&pv) {
        return Ok(Action::await_change());
    }
    let name = pv.metadata.name.clone().unwrap_or_default();
    let spec = pv.spec.clone().unwrap_or_default();
    let has_finalizer =
        pv.metadata.finalizers.as_ref().is_some_and(|f| f.iter().any(|f| f == keys::PV_DELETION_FINALIZER));
    let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("");
    if spec.persistent_volume_reclaim_policy.as_deref() != Some("Delete") {
        if has_finalizer {
            drop_finalizer(&ctx, &pv).await?;
        }
        if phase == "Released" {
            let node = pv.metadata.annotations.as_ref().and_then(|a| a.get(NODE_ANNOTATION)).cloned();
            let path = spec.local.as_ref().map(|l| l.path.clone()).or(spec.host_path.as_ref().map(|h| h.path.clone()));
            let note = format!(
                "the claim is gone; reclaim policy {} keeps the volume and its data on node {} at {} (reusing or \
                 freeing it: docs/storageclass.md, \"Retained volumes\")",
                spec.persistent_volume_reclaim_policy.as_deref().unwrap_or("Retain"),
                node.as_deref().unwrap_or("?"),
                path.as_deref().unwrap_or("?")
            );
            ctx.event(pv.as_ref(), false, "VolumeRetained", note).await;
        }
        return Ok(Action::await_change());
    }
    let deleting = pv.metadata.deletion_timestamp.is_some();
    if phase != "Released" && !(deleting && phase != "Bound") {
        return Ok(Action::await_change());
    }
    let key = format!("pv/{name}");
    let node = pv.metadata.annotations.as_ref().and_then(|a| a.get(NODE_ANNOTATION)).cloned().unwrap_or_default();
    let status = ctx.berth_node(&node).and_then(|b| b.status.clone());
    let Some(status) = status else {
        let node_object_gone = ctx.caches.nodes.get(&ObjectRef::new(&node)).is_none();
        if node_object_gone && ctx.gone_nodes == GoneNodes::Forget {
            // The node left the cluster with its disk: nothing is left to delete but the PV object.
            if has_finalizer {
                drop_finalizer(&ctx, &pv).await?;
            }
            delete_pv(&ctx, &name).await?;
            tracing::warn!(volume = %name, node = %node, "the node is gone; its PV is removed (--gone-node-volumes=forget)");
            ctx.succeeded(&key);
            return Ok(Action::await_change());
        }
        let note = if node_object_gone {
            format!(
                "node {node:?} no longer exists; the volume is deleted if it returns (the controller's \
                 --gone-node-volumes=forget removes such PVs instead)"
            )
        } else {
            format!("node {node:?} has no Berth agent; the volume cannot be deleted until it returns")
        };
        ctx.event(pv.as_ref(), true, "VolumeFailedDelete", note).await;
        return Ok(Action::requeue(ctx.next_backoff(&key)));
    };
    match ctx.agents.delete(&node, &status, &name).await {
        Ok(existed) => tracing::info!(volume = %name, node = %node, existed, "volume deleted"),
        Err(AgentError::Deposed(m)) => {
            tracing::warn!(volume = %name, node = %node, message = %m, "deposed; leaving the PV to the new leader");
            return Ok(Action::await_change());
        }
        Err(AgentError::Refused { reason: ErrorReason::InUse, message }) => {
            // A pod still has the volume (its claim was deleted before the pod was gone, or kubelet has not
            // unmounted it yet). Nothing was changed; the PV and its finalizer stay, and the delete is retried
            // with backoff. The event is published once, not at every retry (Context::event).
            let delay = ctx.next_backoff(&key);
            let note = format!(
                "not deleted yet: the volume is still in use on node {node} ({message}). It is deleted once nothing \
                 uses it: delete the pods that use it, and kubelet unmounts it. Retrying"
            );
            ctx.event(pv.as_ref(), true, "VolumeInUse", note).await;
            ctx.metrics.deleted(class_of(&pv), Outcome::Refused, started.elapsed());
            tracing::info!(volume = %name, node = %node, retry_in = ?delay, message = %message, "volume in use; delete retried");
            return Ok(Action::requeue(delay));
        }
        Err(e) => {
            ctx.event(pv.as_ref(), true, "VolumeFailedDelete", format!("node {node}: {e}")).await;
            return Err(e.into());
        }
    }
    // Crash test: the volume is gone, its PV and finalizer are not yet.
    fail::fail_point!("delete-after-agent-delete", |_| std::process::abort());
    if has_finalizer {
        drop_finalizer(&ctx, &pv).await?;
    }
    if !deleting {
        delete_pv(&ctx, &name).await?;
    }
    ctx.metrics.deleted(class_of(&pv), Outcome::Success, started.elapsed());
    ctx.succeeded(&key);
    Ok(Action::await_change())
}

async fn delete_pv(ctx: &Context, name: &str) -> Result<(), kube::Error> {
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    match pvs.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

pub fn error_policy(pv: Arc<PersistentVolume>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.next_backoff(&format!("pv/{}", pv.metadata.name.clone().unwrap_or_default()));
    ctx.metrics.reconcile_failed("volumes", error.metric_label());
    tracing::warn!(pv = ?pv.metadata.name, %error, retry_in = ?delay, "deleting failed; retrying");
    Action::requeue(delay)
}
