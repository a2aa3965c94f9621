//! The PV reconciler: frees the storage of Berth's PVs by their reclaim policy. Released + Delete → the agent
//! deletes the volume, then the PV object goes. A Delete-policy PV object deleted first keeps Berth's finalizer
//! until the volume is gone (KEP-2644). Retain → untouched, and the finalizer is lifted if someone switched to it.

use std::sync::Arc;

use berth::keys;
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;

use crate::agent_client::AgentError;
use crate::context::Context;
use crate::provision::Error;
use crate::pv::NODE_ANNOTATION;

fn ours(pv: &PersistentVolume, provisioner: &str) -> bool {
    pv.metadata.annotations.as_ref().and_then(|a| a.get(keys::PROVISIONED_BY)).map(String::as_str) == Some(provisioner)
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

pub async fn reconcile(pv: Arc<PersistentVolume>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ours(&pv, &ctx.provisioner) {
        return Ok(Action::await_change());
    }
    let name = pv.metadata.name.clone().unwrap_or_default();
    let spec = pv.spec.clone().unwrap_or_default();
    let has_finalizer =
        pv.metadata.finalizers.as_ref().is_some_and(|f| f.iter().any(|f| f == keys::PV_DELETION_FINALIZER));
    if spec.persistent_volume_reclaim_policy.as_deref() != Some("Delete") {
        if has_finalizer {
            drop_finalizer(&ctx, &pv).await?;
        }
        return Ok(Action::await_change());
    }
    let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("");
    let deleting = pv.metadata.deletion_timestamp.is_some();
    if phase != "Released" && !(deleting && phase != "Bound") {
        return Ok(Action::await_change());
    }
    let key = format!("pv/{name}");
    let node = pv.metadata.annotations.as_ref().and_then(|a| a.get(NODE_ANNOTATION)).cloned().unwrap_or_default();
    let status = ctx.berth_node(&node).and_then(|b| b.status.clone());
    let Some(status) = status else {
        let note = format!("node {node:?} has no Berth agent; the volume cannot be deleted until it returns");
        ctx.event(pv.as_ref(), true, "VolumeFailedDelete", note).await;
        return Ok(Action::requeue(ctx.next_backoff(&key)));
    };
    match ctx.agents.delete(&node, &status, &name).await {
        Ok(existed) => tracing::info!(volume = %name, node = %node, existed, "volume deleted"),
        Err(AgentError::Deposed(m)) => {
            tracing::warn!(volume = %name, node = %node, message = %m, "deposed; leaving the PV to the new leader");
            return Ok(Action::await_change());
        }
        Err(e) => {
            ctx.event(pv.as_ref(), true, "VolumeFailedDelete", format!("node {node}: {e}")).await;
            return Err(e.into());
        }
    }
    if has_finalizer {
        drop_finalizer(&ctx, &pv).await?;
    }
    if !deleting {
        let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
        match pvs.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    ctx.succeeded(&key);
    Ok(Action::await_change())
}

pub fn error_policy(pv: Arc<PersistentVolume>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.next_backoff(&format!("pv/{}", pv.metadata.name.clone().unwrap_or_default()));
    tracing::warn!(pv = ?pv.metadata.name, %error, retry_in = ?delay, "deleting failed; retrying");
    Action::requeue(delay)
}
