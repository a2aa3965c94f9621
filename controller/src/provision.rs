//! The claim reconciler: carries out [`decide`]'s decision. Every step is idempotent (the agent creates by
//! volume name, the PV name is `pvc-<claim uid>`), so a retry or a restart after any step completes the work
//! instead of repeating it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth::agent_api::{CreateVolumeRequest, ErrorReason, Volume, VolumeMode};
use berth::keys;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;

use crate::agent_client::AgentError;
use crate::clone::Found;
use crate::context::Context;
use crate::decide::{Decision, Retry};
use crate::error::Error;
use crate::metrics::Outcome;
use crate::params::ClassParams;
use crate::pv::{self, NODE_ANNOTATION, NodeRef};

/// How many unanswered calls to an agent before the node is treated as gone and the claim rescheduled.
const UNREACHABLE_ATTEMPTS: u32 = 3;

/// Carries out a decision other than `Done` (which the claim reconciler hands to expansion).
/// `source`: what the reconciler read of a clone's source for the decision (empty for other claims).
pub async fn carry_out(
    decision: Decision,
    claim: &PersistentVolumeClaim,
    class: Option<&StorageClass>,
    source: Found<'_>,
    ctx: &Arc<Context>,
    started: Instant,
) -> Result<Action, Error> {
    let uid = claim.metadata.uid.clone().unwrap_or_default();
    let Ok(volume_name) = berth::naming::volume_name(&uid) else { return Ok(Action::await_change()) };
    let class_name = claim.spec.as_ref().and_then(|s| s.storage_class_name.clone()).unwrap_or_default();
    let key = claim_failures_key(claim);
    match decision {
        Decision::NotOurs | Decision::WaitForScheduler | Decision::Done => Ok(Action::await_change()),
        Decision::Refuse { message, retry } => {
            ctx.metrics.provisioned(&class_name, Outcome::Refused, started.elapsed());
            tracing::info!(claim = ?claim.metadata.name, namespace = ?claim.metadata.namespace, %message, ?retry, "refused");
            ctx.event(claim, true, "ProvisioningFailed", message).await;
            Ok(match retry {
                Retry::OnChange => Action::await_change(),
                Retry::Backoff => Action::requeue(ctx.next_backoff(&key)),
            })
        }
        Decision::InvalidClass { message } => {
            ctx.metrics.provisioned(&class_name, Outcome::Refused, started.elapsed());
            tracing::info!(claim = ?claim.metadata.name, namespace = ?claim.metadata.namespace, %message, "refused: invalid class");
            ctx.event(claim, true, "ProvisioningFailed", message.clone()).await;
            if let Some(class) = class {
                ctx.event(class, true, "InvalidParameters", message).await;
            }
            Ok(Action::await_change())
        }
        Decision::Reschedule { message } => {
            reschedule(ctx, claim, (&class_name, started), message).await?;
            Ok(Action::await_change())
        }
        Decision::CloneElsewhere { message } => {
            // The scheduler does not know where the source is, and may choose the same node again at once: each
            // repeat waits longer (up to 5 minutes), and the event (the same words) is published once.
            let key = format!("{key}/clone-placement");
            if let Some(left) = ctx.held(&key) {
                return Ok(Action::requeue(left));
            }
            reschedule(ctx, claim, (&class_name, started), message).await?;
            ctx.hold(&key);
            Ok(Action::await_change())
        }
        Decision::Provision { node, params, request, abandon } => {
            let class = class.expect("decide checked the class");
            let attempt = Attempt { ctx, claim, class, key: &key, started, volume: &volume_name, source };
            attempt.run(node, params, request, abandon).await
        }
    }
}

/// Whether a provisioning attempt may go on to the agent, as far as a clone's source is concerned.
enum Protected {
    NotAClone,
    /// A clone of this source claim, now protected and counted in flight.
    Source(String),
    /// The source cannot be copied now.
    Stop(Action),
}

/// How an agent's refusal of a clone is handled: refused once (`OnChange`: it cannot make that clone), or retried
/// (`Backoff`: no room or a pool not ready now; the clone can be made on that node only, so it is not moved).
/// `None`: as for any create.
fn clone_refusal(reason: ErrorReason) -> Option<Retry> {
    match reason {
        ErrorReason::Unsupported | ErrorReason::UnknownPool | ErrorReason::Invalid => Some(Retry::OnChange),
        ErrorReason::InsufficientSpace | ErrorReason::PoolNotReady => Some(Retry::Backoff),
        _ => None,
    }
}

/// The key of a claim's retry counter (see [`Context::next_backoff`]).
pub fn claim_failures_key(claim: &PersistentVolumeClaim) -> String {
    format!("claim/{}", claim.metadata.uid.as_deref().unwrap_or_default())
}

/// One provisioning attempt for a claim: abandon the node of an earlier attempt if the decision moved, record
/// the node on the claim, agent create, PV, publish.
struct Attempt<'a> {
    ctx: &'a Arc<Context>,
    claim: &'a PersistentVolumeClaim,
    class: &'a StorageClass,
    key: &'a str,
    started: Instant,
    volume: &'a str,
    /// What the reconciler read of a clone's source: the claim its cloning protection goes on.
    source: Found<'a>,
}

impl Attempt<'_> {
    fn class_name(&self) -> &str {
        self.class.metadata.name.as_deref().unwrap_or_default()
    }

    fn immediate(&self) -> bool {
        self.class.volume_binding_mode.as_deref() != Some("WaitForFirstConsumer")
    }

    async fn run(
        &self,
        node: NodeRef,
        params: ClassParams,
        request: CreateVolumeRequest,
        abandon: Option<String>,
    ) -> Result<Action, Error> {
        let ctx = self.ctx;
        let Some(status) = ctx.berth_node(&node.name).and_then(|b| b.status.clone()) else {
            return Ok(Action::requeue(Duration::from_secs(1)));
        };
        if let Some(earlier) = &abandon
            && let Some(action) = self.abandon(earlier).await?
        {
            return Ok(action);
        }
        // The node is durable state before the agent is asked: a retry, a restart or another leader finds it and
        // stays there (or removes what was made there first), so one claim never gets two volumes.
        self.record_node(Some(&node.name)).await?;
        ctx.event(
            self.claim,
            false,
            "Provisioning",
            format!(
                "External provisioner is provisioning volume for claim on node {} (pool {:?})",
                node.name, params.pool
            ),
        )
        .await;
        let source = match self.protect_source(&request).await? {
            Protected::NotAClone => None,
            Protected::Source(name) => Some(name),
            Protected::Stop(action) => return Ok(action),
        };
        let made = self.make(&node, &params, &request, &status).await;
        if let Some(name) = source {
            let namespace = self.claim.metadata.namespace.as_deref().unwrap_or_default();
            if let Err(e) = ctx.copies.end(&ctx.client, namespace, &name).await {
                // The finalizer stays until the source is looked at again (any change of it), which lifts it.
                tracing::warn!(claim = %claim_key(self.claim), source = %name, error = %e, "cannot lift the source's cloning protection now");
            }
        }
        made
    }

    /// Asks the agent for the volume, then makes the PV and marks the volume published.
    async fn make(
        &self,
        node: &NodeRef,
        params: &ClassParams,
        request: &CreateVolumeRequest,
        status: &berth::berth_node::BerthNodeStatus,
    ) -> Result<Action, Error> {
        let ctx = self.ctx;
        crate::failpoints::pause("provision-before-agent-create").await;
        if request.source.is_some() {
            crate::failpoints::pause("provision-before-agent-clone").await;
        }
        let created = ctx.agents.create(&node.name, status, self.volume, request).await;
        if request.source.is_some()
            && let Err(AgentError::Refused { reason, message }) = &created
            && let Some(retry) = clone_refusal(*reason)
        {
            // A clone can be made on its source's node only: never sent elsewhere.
            ctx.metrics.provisioned(self.class_name(), Outcome::Refused, self.started.elapsed());
            let again = if retry == Retry::Backoff { "; retrying" } else { "" };
            let note = format!("node {} cannot make the clone: {message}{again}", node.name);
            ctx.event(self.claim, true, "ProvisioningFailed", note).await;
            return Ok(match retry {
                Retry::OnChange => Action::await_change(),
                Retry::Backoff => Action::requeue(ctx.next_backoff(self.key)),
            });
        }
        let volume = match created {
            Ok(v) => v,
            Err(AgentError::Refused {
                reason:
                    ErrorReason::InsufficientSpace
                    | ErrorReason::PoolNotReady
                    | ErrorReason::UnknownPool
                    | ErrorReason::Unsupported,
                message,
            }) => {
                // A refusal changes nothing: no volume of the claim is on that node.
                let message = format!("node {}: {message}", node.name);
                return self.elsewhere(message).await;
            }
            Err(AgentError::Refused { reason: ErrorReason::Invalid, message }) => {
                // The same request would be refused anywhere: said once, looked at again when the claim changes.
                ctx.metrics.provisioned(self.class_name(), Outcome::Refused, self.started.elapsed());
                let note = format!("node {} refused the request: {message}", node.name);
                ctx.event(self.claim, true, "ProvisioningFailed", note).await;
                return Ok(Action::await_change());
            }
            Err(AgentError::Deposed(m)) => {
                tracing::error!(claim = ?self.claim.metadata.name, volume = %self.volume, node = %node.name, message = %m, "deposed; leaving the claim to the new leader");
                return Ok(Action::await_change());
            }
            Err(AgentError::Unreachable(m))
                if !self.immediate() && ctx.attempts(self.key) + 1 >= UNREACHABLE_ATTEMPTS =>
            {
                // The silent agent may have made the volume: the claim keeps this node as its recorded one, so
                // the next node's attempt removes it first (or the orphan audit does, once the agent answers).
                reschedule(
                    ctx,
                    self.claim,
                    (self.class_name(), self.started),
                    format!("the agent of node {} does not answer ({m})", node.name),
                )
                .await?;
                ctx.succeeded(self.key);
                return Ok(Action::await_change());
            }
            Err(e) => {
                ctx.event(self.claim, true, "ProvisioningFailed", format!("node {}: {e}; retrying", node.name)).await;
                return Err(e.into());
            }
        };
        if let Err(why) = check_answer(self.volume, request, &volume) {
            let note =
                format!("node {}: the agent's answer is not the volume asked for ({why}); no PV made", node.name);
            ctx.event(self.claim, true, "ProvisioningFailed", note).await;
            return Err(AgentError::Other(why).into());
        }
        // Crash test: the volume exists, its PV does not yet.
        fail::fail_point!("provision-after-agent-create", |_| std::process::abort());
        crate::failpoints::pause("provision-before-pv-create").await;
        if claim_gone(ctx, self.claim).await? {
            // Deleted while its volume was being made: nobody can use the volume, so it goes now. (Should this
            // delete fail, the orphan audit removes the volume: it has neither PV nor claim.)
            ctx.agents.delete_unpublished(&node.name, status, self.volume).await?;
            ctx.succeeded(self.key);
            tracing::info!(claim = %claim_key(self.claim), volume = %self.volume, node = %node.name, "claim deleted while provisioning; its volume is removed");
            return Ok(Action::await_change());
        }
        let object = pv::build(self.claim, self.class, params, node, &volume);
        let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
        match pvs.create(&PostParams::default(), &object).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // Made by an earlier attempt — on this node, or the volume just made is a second one.
                let existing = pvs.get_opt(self.volume).await?;
                let on = existing.as_ref().and_then(|p| p.metadata.annotations.as_ref()?.get(NODE_ANNOTATION).cloned());
                if on.as_deref() != Some(node.name.as_str()) {
                    tracing::warn!(claim = %claim_key(self.claim), volume = %self.volume, node = %node.name, pv_node = ?on, "the claim's PV exists for another node; removing the volume just made here");
                    ctx.agents.delete_unpublished(&node.name, status, self.volume).await?;
                    return Ok(Action::await_change());
                }
            }
            Err(e) => return Err(e.into()),
        }
        // Crash test: the PV exists, the success is not yet recorded.
        fail::fail_point!("provision-after-pv-create", |_| std::process::abort());
        // From now on the volume is never an orphan, also after its PV is gone (Retain). Should this call fail,
        // the orphan audit marks it (it marks every volume that has a PV, and does so at start).
        if let Err(e) = ctx.agents.publish(&node.name, status, self.volume).await {
            tracing::warn!(volume = %self.volume, node = %node.name, error = %e, "cannot mark the volume published yet; the orphan audit will");
        }
        ctx.succeeded(self.key);
        ctx.metrics.provisioned(self.class_name(), Outcome::Success, self.started.elapsed());
        ctx.event(
            self.claim,
            false,
            "ProvisioningSucceeded",
            format!("Successfully provisioned volume {} on node {} at {}", self.volume, node.name, volume.path),
        )
        .await;
        tracing::info!(claim = %claim_key(self.claim), volume = %self.volume, node = %node.name, "provisioned");
        Ok(Action::await_change())
    }

    /// For a clone: counts it in flight and puts the cloning protection on its source, and checks that the source
    /// is still the claim and volume decided about.
    async fn protect_source(&self, request: &CreateVolumeRequest) -> Result<Protected, Error> {
        let Some(volume) = &request.source else { return Ok(Protected::NotAClone) };
        let Some(Ok(name)) = crate::clone::source_name(self.claim) else { return Ok(Protected::NotAClone) };
        let namespace = self.claim.metadata.namespace.as_deref().unwrap_or_default();
        let ctx = self.ctx;
        // The claim the source's PV is bound to: a source made again under the same name is another claim.
        let uid = self.source.pv.and_then(|pv| pv.spec.as_ref()?.claim_ref.as_ref()?.uid.as_deref());
        // The source as read for the decision, not read again: the protection's patch is guarded by its uid.
        let source = match self.source.claim {
            Some(read) => ctx.copies.begin(&ctx.client, read, uid).await?,
            None => None,
        };
        if source.as_ref().and_then(|s| s.spec.as_ref()?.volume_name.as_deref()) == Some(volume.as_str()) {
            return Ok(Protected::Source(name));
        }
        if source.is_some() {
            ctx.copies.end(&ctx.client, namespace, &name).await?;
        }
        let note = format!(
            "the clone's source, claim {name:?}, is gone, being deleted or no longer bound to volume {volume}: no \
             copy is made; retrying"
        );
        ctx.event(self.claim, true, "ProvisioningFailed", note).await;
        Ok(Protected::Stop(Action::requeue(ctx.next_backoff(self.key))))
    }

    /// Removes what an earlier attempt may have made on `earlier` (only a volume never published: one without a
    /// PV, as this claim's is). `Some(action)` when the attempt cannot go on now.
    async fn abandon(&self, earlier: &str) -> Result<Option<Action>, Error> {
        let ctx = self.ctx;
        let Some(status) = ctx.berth_node(earlier).and_then(|b| b.status.clone()) else {
            tracing::warn!(claim = %claim_key(self.claim), volume = %self.volume, node = %earlier, "the node of an earlier attempt has no agent now; if it made the volume, the orphan audit removes it once the agent is back");
            return Ok(None);
        };
        let key = format!("{}/abandon", self.key);
        match ctx.agents.delete_unpublished(earlier, &status, self.volume).await {
            Ok(existed) => {
                ctx.succeeded(&key);
                if existed {
                    tracing::info!(claim = %claim_key(self.claim), volume = %self.volume, node = %earlier, "removed the volume an earlier attempt made on another node");
                }
                Ok(None)
            }
            Err(AgentError::Refused { reason: ErrorReason::Published, message }) => {
                // A PV was made for it once, and is gone now: its data may be wanted. Never a second volume.
                let note = format!(
                    "node {earlier} holds volume {} of this claim, which had a PV that is gone; not making another \
                     volume elsewhere ({message})",
                    self.volume
                );
                ctx.event(self.claim, true, "ProvisioningFailed", note).await;
                Ok(Some(Action::await_change()))
            }
            Err(AgentError::Deposed(m)) => {
                tracing::error!(volume = %self.volume, node = %earlier, message = %m, "deposed; leaving the claim to the new leader");
                Ok(Some(Action::await_change()))
            }
            Err(AgentError::Unreachable(m)) if ctx.attempts(&key) + 1 >= UNREACHABLE_ATTEMPTS => {
                ctx.succeeded(&key);
                let note = format!(
                    "the agent of node {earlier}, where an earlier attempt asked for the volume, does not answer ({m}); \
                     going on, and the orphan audit removes a volume made there once it answers"
                );
                ctx.event(self.claim, true, "ProvisioningFailed", note).await;
                Ok(None)
            }
            Err(e) => {
                ctx.next_backoff(&key);
                ctx.event(
                    self.claim,
                    true,
                    "ProvisioningFailed",
                    format!("removing the volume of an earlier attempt on node {earlier}: {e}; retrying"),
                )
                .await;
                Err(e.into())
            }
        }
    }

    /// The node cannot take the volume: WaitForFirstConsumer asks the scheduler for another node; Immediate
    /// forgets the node (nothing was made there), so the next attempt picks again.
    async fn elsewhere(&self, message: String) -> Result<Action, Error> {
        if self.immediate() {
            self.ctx.metrics.provisioned(self.class_name(), Outcome::Refused, self.started.elapsed());
            self.ctx.event(self.claim, true, "ProvisioningFailed", format!("{message}; trying another node")).await;
            self.record_node(None).await?;
            return Ok(Action::requeue(self.ctx.next_backoff(self.key)));
        }
        reschedule(
            self.ctx,
            self.claim,
            (self.class_name(), self.started),
            format!("{message}; asking the scheduler for another node"),
        )
        .await?;
        Ok(Action::await_change())
    }

    /// Writes (or with `None` removes) the claim's `local.berth.dev/node`, only over the version of the claim the
    /// decision was made from (a changed claim fails with 409 and is looked at again).
    async fn record_node(&self, node: Option<&str>) -> Result<(), kube::Error> {
        if crate::decide::recorded_node(self.claim) == node {
            return Ok(());
        }
        let claims: Api<PersistentVolumeClaim> =
            Api::namespaced(self.ctx.client.clone(), self.claim.metadata.namespace.as_deref().unwrap_or_default());
        let patch = serde_json::json!({
            "metadata": {
                "annotations": {NODE_ANNOTATION: node},
                "resourceVersion": self.claim.metadata.resource_version,
            }
        });
        let name = self.claim.metadata.name.as_deref().unwrap_or_default();
        claims.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        Ok(())
    }
}

fn claim_key(claim: &PersistentVolumeClaim) -> String {
    format!(
        "{}/{}",
        claim.metadata.namespace.as_deref().unwrap_or_default(),
        claim.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Whether the claim is gone, replaced (another uid) or being deleted, asked of the API server rather than the
/// cache: the answer decides whether a just-made volume is kept.
async fn claim_gone(ctx: &Context, claim: &PersistentVolumeClaim) -> Result<bool, kube::Error> {
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), claim.metadata.namespace.as_deref().unwrap_or_default());
    let now = claims.get_opt(claim.metadata.name.as_deref().unwrap_or_default()).await?;
    Ok(now.is_none_or(|c| c.metadata.uid != claim.metadata.uid || c.metadata.deletion_timestamp.is_some()))
}

/// `ProvisioningFailed` with the reason, then `selected-node` removed so the scheduler picks again — only from this
/// claim (its uid) and only the node the decision was about: a JSON patch whose tests fail (the claim was made
/// again, or the scheduler has just picked another node) changes nothing, and the change brings the claim back.
async fn reschedule(
    ctx: &Context,
    claim: &PersistentVolumeClaim,
    (class, started): (&str, Instant),
    message: String,
) -> Result<(), kube::Error> {
    tracing::info!(claim = ?claim.metadata.name, %message, "rescheduling");
    ctx.metrics.provisioned(class, Outcome::Rescheduled, started.elapsed());
    ctx.event(claim, true, "ProvisioningFailed", message).await;
    // Crash test: the refusal is said, the scheduler not yet asked again.
    fail::fail_point!("reschedule-before-unselect", |_| std::process::abort());
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), claim.metadata.namespace.as_deref().unwrap_or_default());
    let Some(patch) = unselect_patch(claim) else { return Ok(()) };
    let name = claim.metadata.name.as_deref().unwrap_or_default();
    match claims.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch)).await {
        Ok(_) => Ok(()),
        // A failed test: the claim is not the one decided about any more.
        Err(kube::Error::Api(e)) if e.code == 422 || e.code == 409 => {
            tracing::info!(claim = %claim_key(claim), reason = %e.message, "the claim changed meanwhile; selected-node left as it is");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The JSON patch that removes `selected-node` from `claim` if it still has the same uid and node; `None` when
/// the claim has no `selected-node`.
pub fn unselect_patch(claim: &PersistentVolumeClaim) -> Option<json_patch::Patch> {
    let selected = claim.metadata.annotations.as_ref()?.get(keys::SELECTED_NODE)?;
    // RFC 6901: '/' in a key is written "~1".
    let path = format!("/metadata/annotations/{}", keys::SELECTED_NODE.replace('~', "~0").replace('/', "~1"));
    let ops = serde_json::json!([
        {"op": "test", "path": "/metadata/uid", "value": claim.metadata.uid},
        {"op": "test", "path": path, "value": selected},
        {"op": "remove", "path": path},
    ]);
    Some(serde_json::from_value(ops).expect("a well-formed JSON patch"))
}

/// Whether the agent's answer is the volume that was asked for: its name, pool, mode and at least its size, and a
/// plain absolute path (a raw block volume's under /dev, a directory's naming the volume). A PV is made from it,
/// so an agent that answers something else gets no PV.
pub fn check_answer(volume: &str, request: &CreateVolumeRequest, answer: &Volume) -> Result<(), String> {
    if answer.name != volume || answer.pool != request.pool {
        return Err(format!(
            "asked for volume {volume} in pool {:?}, got {} in {:?}",
            request.pool, answer.name, answer.pool
        ));
    }
    if answer.volume_mode != request.volume_mode || answer.size_bytes < request.size_bytes {
        return Err(format!(
            "asked for a {:?} volume of {} bytes, got a {:?} one of {}",
            request.volume_mode, request.size_bytes, answer.volume_mode, answer.size_bytes
        ));
    }
    let path = std::path::Path::new(&answer.path);
    let plain = path.is_absolute()
        && !answer.path.contains("//")
        && path.components().all(|c| matches!(c, std::path::Component::RootDir | std::path::Component::Normal(_)));
    let names_it = match request.volume_mode {
        VolumeMode::Block => answer.path.starts_with("/dev/"),
        VolumeMode::Filesystem => path.components().any(|c| c.as_os_str() == volume),
    };
    if !plain || !names_it {
        return Err(format!("the volume's path {:?} is not a plain path of volume {volume}", answer.path));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth::agent_api::ClaimRef;

    fn request(mode: VolumeMode) -> CreateVolumeRequest {
        CreateVolumeRequest {
            pool: "fast".into(),
            size_bytes: 1 << 30,
            volume_mode: mode,
            claim: ClaimRef { namespace: "db".into(), name: "data".into() },
            uid: None,
            gid: None,
            mode: None,
            fs_type: None,
            mount_options: vec![],
            source: None,
        }
    }

    fn answer(name: &str, path: &str, mode: VolumeMode) -> Volume {
        serde_json::from_value(serde_json::json!({
            "name": name, "pool": "fast", "sizeBytes": 1u64 << 30, "volumeMode": mode, "path": path,
            "claim": {"namespace": "db", "name": "data"}, "uid": 0, "gid": 0, "mode": 0o755,
            "createdAt": "2026-12-04T00:00:00Z", "published": false,
        }))
        .unwrap()
    }

    #[test]
    fn only_the_volume_asked_for_gets_a_pv() {
        let fs = request(VolumeMode::Filesystem);
        let v = "pvc-0f8e3c1a";
        assert_eq!(
            check_answer(v, &fs, &answer(v, "/var/lib/berth/fast/pvc-0f8e3c1a", VolumeMode::Filesystem)),
            Ok(())
        );
        assert_eq!(check_answer(v, &fs, &answer(v, "/srv/lvm/pvc-0f8e3c1a/data", VolumeMode::Filesystem)), Ok(()));
        let block = request(VolumeMode::Block);
        assert_eq!(
            check_answer(v, &block, &answer(v, "/dev/mapper/vg-berth--pvc--0f8e3c1a", VolumeMode::Block)),
            Ok(())
        );
        for (name, path, mode, req) in [
            ("pvc-other", "/var/lib/berth/fast/pvc-other", VolumeMode::Filesystem, &fs),
            (v, "/var/lib/berth/fast/pvc-0f8e3c1a/../../../etc", VolumeMode::Filesystem, &fs),
            (v, "relative/pvc-0f8e3c1a", VolumeMode::Filesystem, &fs),
            (v, "/var/lib/berth/fast//pvc-0f8e3c1a", VolumeMode::Filesystem, &fs),
            (v, "/", VolumeMode::Filesystem, &fs),
            (v, "/var/lib/berth/fast/pvc-0f8e3c1a", VolumeMode::Block, &fs),
            (v, "/etc/pvc-0f8e3c1a", VolumeMode::Block, &block),
        ] {
            assert!(check_answer(v, req, &answer(name, path, mode)).is_err(), "{name} {path} {mode:?}");
        }
        let mut small = answer(v, "/var/lib/berth/fast/pvc-0f8e3c1a", VolumeMode::Filesystem);
        small.size_bytes -= 1;
        assert!(check_answer(v, &fs, &small).is_err());
    }

    #[test]
    fn the_unselect_patch_tests_uid_and_node_first() {
        let claim: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "c", "uid": "u1", "annotations": {"volume.kubernetes.io/selected-node": "n1"}},
        }))
        .unwrap();
        let patch = serde_json::to_value(unselect_patch(&claim).unwrap()).unwrap();
        assert_eq!(
            patch,
            serde_json::json!([
                {"op": "test", "path": "/metadata/uid", "value": "u1"},
                {"op": "test", "path": "/metadata/annotations/volume.kubernetes.io~1selected-node", "value": "n1"},
                {"op": "remove", "path": "/metadata/annotations/volume.kubernetes.io~1selected-node"},
            ])
        );
        let mut target = serde_json::to_value(&claim).unwrap();
        json_patch::patch(&mut target, &unselect_patch(&claim).unwrap()).unwrap();
        assert_eq!(target["metadata"]["annotations"], serde_json::json!({}));
        // The scheduler picked another node meanwhile: the patch fails, nothing changes.
        let mut moved = serde_json::to_value(&claim).unwrap();
        moved["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] = "n2".into();
        assert!(json_patch::patch(&mut moved, &unselect_patch(&claim).unwrap()).is_err());
        let mut remade = serde_json::to_value(&claim).unwrap();
        remade["metadata"]["uid"] = "u2".into();
        assert!(json_patch::patch(&mut remade, &unselect_patch(&claim).unwrap()).is_err());
    }
}
