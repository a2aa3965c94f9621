//! The claim reconciler: decides what a claim needs ([`decide`]) and hands the decision to provisioning, or a
//! Bound claim to expansion. Both take the shared [`Error`], so neither imports the other.

use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::runtime::controller::Action;

use crate::clone::{self, Found};
use crate::context::Context;
use crate::decide::{Decision, decide};
use crate::error::Error;
use crate::metrics::Outcome;
use crate::provision::claim_failures_key;
use crate::wake;

pub async fn reconcile(claim: Arc<PersistentVolumeClaim>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciling("claims");
    let class_name = claim.spec.as_ref().and_then(|s| s.storage_class_name.clone()).unwrap_or_default();
    let class = ctx.class(&class_name);
    let uid = claim.metadata.uid.as_deref().unwrap_or_default();
    let pv_exists = berth::naming::volume_name(uid).is_ok_and(|v| ctx.pv_exists(&v));
    let namespace = claim.metadata.namespace.as_deref().unwrap_or_default();
    if claim.metadata.finalizers.as_ref().is_some_and(|f| f.iter().any(|f| f == clone::SOURCE_FINALIZER)) {
        // A clone's source: protected only while a clone of it is being made.
        let name = claim.metadata.name.as_deref().unwrap_or_default();
        ctx.copies.sweep(&ctx.client, namespace, name).await?;
    }
    // A clone's source is read only for a claim of Berth's that still waits for its volume.
    let ours = class.as_deref().is_some_and(|c| c.provisioner == berth::PROVISIONER_NAME);
    let source = match clone::source_name(&claim) {
        Some(Ok(name)) if ours && wake::waits(&claim, berth::PROVISIONER_NAME, |v| ctx.pv_exists(v)) => {
            Some(clone::lookup(&ctx.client, namespace, &name, &ctx.caches.volumes).await?)
        }
        _ => None,
    };
    let found = source.as_ref().map_or_else(Found::default, |(c, pv)| Found { claim: c.as_ref(), pv: pv.as_deref() });
    let decision = decide(berth::PROVISIONER_NAME, &claim, class.as_deref(), pv_exists, &ctx.node_views(), found);
    let result = match decision {
        Decision::Done => {
            ctx.succeeded(&claim_failures_key(&claim));
            // A Bound claim may ask for more.
            crate::expand::run(&ctx, &claim, class.as_deref()).await
        }
        decision => crate::provision::carry_out(decision, &claim, class.as_deref(), found, &ctx, started).await,
    };
    if result.is_err() {
        ctx.metrics.provisioned(&class_name, Outcome::Error, started.elapsed());
    }
    result
}

pub fn error_policy(claim: Arc<PersistentVolumeClaim>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.next_backoff(&claim_failures_key(&claim));
    ctx.metrics.reconcile_failed("claims", error.metric_label());
    tracing::warn!(claim = ?claim.metadata.name, namespace = ?claim.metadata.namespace, %error, retry_in = ?delay, "reconciling the claim failed; retrying");
    Action::requeue(delay)
}
