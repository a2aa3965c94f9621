//! The claim reconciler: carries out [`decide`]'s decision. Every step is idempotent (the agent creates by
//! volume name, the PV name is `pvc-<claim uid>`), so a retry or a restart after any step completes the work
//! instead of repeating it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth::agent_api::ErrorReason;
use berth::keys;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;

use crate::agent_client::AgentError;
use crate::context::Context;
use crate::decide::{Decision, Retry, decide};
use crate::metrics::Outcome;
use crate::pv;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Agent(#[from] AgentError),
}

/// How many unanswered calls to an agent before the node is treated as gone and the claim rescheduled.
const UNREACHABLE_ATTEMPTS: u32 = 3;

pub async fn reconcile(claim: Arc<PersistentVolumeClaim>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = provision(claim.clone(), ctx.clone(), started).await;
    if result.is_err() {
        let class = claim.spec.as_ref().and_then(|s| s.storage_class_name.as_deref()).unwrap_or_default();
        ctx.metrics.provisioned(class, Outcome::Error, started.elapsed());
    }
    result
}

async fn provision(claim: Arc<PersistentVolumeClaim>, ctx: Arc<Context>, started: Instant) -> Result<Action, Error> {
    let uid = claim.metadata.uid.clone().unwrap_or_default();
    let Ok(volume_name) = berth::naming::volume_name(&uid) else { return Ok(Action::await_change()) };
    let class_name = claim.spec.as_ref().and_then(|s| s.storage_class_name.clone()).unwrap_or_default();
    let class = ctx.class(&class_name);
    let decision = decide(&ctx.provisioner, &claim, class.as_deref(), ctx.pv_exists(&volume_name), &ctx.node_views());
    let key = format!("claim/{uid}");
    match decision {
        Decision::NotOurs | Decision::WaitForScheduler => Ok(Action::await_change()),
        Decision::Done => {
            ctx.succeeded(&key);
            // A Bound claim may ask for more.
            crate::expand::run(&ctx, &claim, class.as_deref()).await
        }
        Decision::Refuse { message, retry } => {
            ctx.metrics.provisioned(&class_name, Outcome::Refused, started.elapsed());
            tracing::info!(claim = ?claim.metadata.name, namespace = ?claim.metadata.namespace, %message, ?retry, "refused");
            ctx.event(claim.as_ref(), true, "ProvisioningFailed", message).await;
            Ok(match retry {
                Retry::OnChange => Action::await_change(),
                Retry::Backoff => Action::requeue(ctx.next_backoff(&key)),
            })
        }
        Decision::Reschedule { message } => {
            reschedule(&ctx, &claim, (&class_name, started), message).await?;
            Ok(Action::await_change())
        }
        Decision::Provision { node, params, request } => {
            let Some(berth_node) = ctx.berth_node(&node.name) else {
                return Ok(Action::requeue(Duration::from_secs(1)));
            };
            let Some(status) = berth_node.status.as_ref() else { return Ok(Action::requeue(Duration::from_secs(1))) };
            ctx.event(
                claim.as_ref(),
                false,
                "Provisioning",
                format!(
                    "External provisioner is provisioning volume for claim on node {} (pool {:?})",
                    node.name, params.pool
                ),
            )
            .await;
            crate::failpoints::pause("provision-before-agent-create").await;
            let volume = match ctx.agents.create(&node.name, status, &volume_name, &request).await {
                Ok(v) => v,
                Err(AgentError::Refused {
                    reason:
                        ErrorReason::InsufficientSpace
                        | ErrorReason::PoolNotReady
                        | ErrorReason::UnknownPool
                        | ErrorReason::Unsupported,
                    message,
                }) => {
                    reschedule(
                        &ctx,
                        &claim,
                        (&class_name, started),
                        format!("node {}: {message}; asking the scheduler for another node", node.name),
                    )
                    .await?;
                    return Ok(Action::await_change());
                }
                Err(AgentError::Deposed(m)) => {
                    tracing::warn!(claim = ?claim.metadata.name, volume = %volume_name, node = %node.name, message = %m, "deposed; leaving the claim to the new leader");
                    return Ok(Action::await_change());
                }
                Err(AgentError::Unreachable(m)) if ctx.attempts(&key) + 1 >= UNREACHABLE_ATTEMPTS => {
                    // The silent agent may have made the volume: the orphan audit removes it if no PV follows.
                    reschedule(
                        &ctx,
                        &claim,
                        (&class_name, started),
                        format!("the agent of node {} does not answer ({m})", node.name),
                    )
                    .await?;
                    ctx.succeeded(&key);
                    return Ok(Action::await_change());
                }
                Err(e) => {
                    ctx.event(claim.as_ref(), true, "ProvisioningFailed", format!("node {}: {e}; retrying", node.name))
                        .await;
                    return Err(e.into());
                }
            };
            // Crash test: the volume exists, its PV does not yet.
            fail::fail_point!("provision-after-agent-create", |_| std::process::abort());
            crate::failpoints::pause("provision-before-pv-create").await;
            if claim_gone(&ctx, &claim).await? {
                // Deleted while its volume was being made: nobody can use the volume, so it goes now. (Should
                // this delete fail, the orphan audit removes the volume: it has neither PV nor claim.)
                ctx.agents.delete(&node.name, status, &volume_name).await?;
                ctx.succeeded(&key);
                tracing::info!(claim = %format!("{}/{}", request.claim.namespace, request.claim.name), volume = %volume_name, node = %node.name, "claim deleted while provisioning; its volume is removed");
                return Ok(Action::await_change());
            }
            let class = class.expect("decide checked the class");
            let object = pv::build(&claim, &class, &params, &node, &volume);
            let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
            match pvs.create(&PostParams::default(), &object).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {} // made by an earlier attempt
                Err(e) => return Err(e.into()),
            }
            // Crash test: the PV exists, the success is not yet recorded.
            fail::fail_point!("provision-after-pv-create", |_| std::process::abort());
            ctx.succeeded(&key);
            ctx.metrics.provisioned(&class_name, Outcome::Success, started.elapsed());
            ctx.event(
                claim.as_ref(),
                false,
                "ProvisioningSucceeded",
                format!("Successfully provisioned volume {volume_name} on node {} at {}", node.name, volume.path),
            )
            .await;
            tracing::info!(claim = %format!("{}/{}", request.claim.namespace, request.claim.name), volume = %volume_name, node = %node.name, "provisioned");
            Ok(Action::await_change())
        }
    }
}

/// Whether the claim is gone, replaced (another uid) or being deleted, asked of the API server rather than the
/// cache: the answer decides whether a just-made volume is kept.
async fn claim_gone(ctx: &Context, claim: &PersistentVolumeClaim) -> Result<bool, kube::Error> {
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), claim.metadata.namespace.as_deref().unwrap_or_default());
    let now = claims.get_opt(claim.metadata.name.as_deref().unwrap_or_default()).await?;
    Ok(now.is_none_or(|c| c.metadata.uid != claim.metadata.uid || c.metadata.deletion_timestamp.is_some()))
}

/// `ProvisioningFailed` with the reason, then `selected-node` removed so the scheduler picks again.
async fn reschedule(
    ctx: &Context,
    claim: &PersistentVolumeClaim,
    (class, started): (&str, Instant),
    message: String,
) -> Result<(), kube::Error> {
    tracing::info!(claim = ?claim.metadata.name, %message, "rescheduling");
    ctx.metrics.provisioned(class, Outcome::Rescheduled, started.elapsed());
    ctx.event(claim, true, "ProvisioningFailed", message).await;
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), claim.metadata.namespace.as_deref().unwrap_or_default());
    let patch = serde_json::json!({"metadata": {"annotations": {keys::SELECTED_NODE: null}}});
    claims
        .patch(claim.metadata.name.as_deref().unwrap_or_default(), &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

pub fn error_policy(claim: Arc<PersistentVolumeClaim>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("claim/{}", claim.metadata.uid.clone().unwrap_or_default());
    let delay = ctx.next_backoff(&key);
    tracing::warn!(claim = ?claim.metadata.name, %error, retry_in = ?delay, "provisioning failed; retrying");
    Action::requeue(delay)
}
