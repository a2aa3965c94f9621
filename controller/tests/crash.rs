//! Crash safety, made deterministic with failpoints: the controller aborts at a chosen step of provisioning, a
//! new one starts, and the claim ends with exactly one volume and a Bound PV. A claim deleted while its volume is
//! being made leaves nothing behind.

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use testbed::kube_util::{wait_deleted, wait_for};

/// Aborts the controller at `failpoint`, checks what it left (a volume, and a PV if `pv_left`), restarts it and
/// checks the end state.
async fn crash_at(failpoint: &str, pv_left: bool) {
    let mut w = world_without_controller(&[256 * MI, 256 * MI]).await;
    let client = w.bed.client();
    let mut crashing = start_with_failpoints(&w, "controller", &[], &format!("{failpoint}=return")).await;
    add_class(&w, class("berth-local", "WaitForFirstConsumer", "Delete", &[("pool", "fast")])).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let created = claims.create(&PostParams::default(), &claim("data", "berth-local", "64Mi")).await.unwrap();
    let volume = format!("pvc-{}", created.metadata.uid.unwrap());
    pods.create(&PostParams::default(), &pod("db", "data")).await.unwrap();

    let status = crashing.wait_exit(WAIT).unwrap_or_else(|| panic!("the controller did not abort at {failpoint}"));
    assert!(!status.success(), "{status}");
    assert_eq!(all_volume_dirs(&w).len(), 1, "the volume was made before the crash: {:?}", all_volume_dirs(&w));
    assert_eq!(pvs.get_opt(&volume).await.unwrap().is_some(), pv_left, "PV {volume} after a crash at {failpoint}");

    // The same replica restarts (a container restart keeps the pod's name, so the lease is its own at once).
    w.controllers.push(w.bed.start_controller_named("controller", &controller_bin(), &[], &[]).await.unwrap());
    let bound = wait_for(&claims, "data", WAIT, bound).await.unwrap();
    assert_eq!(bound.spec.unwrap().volume_name.as_deref(), Some(volume.as_str()));
    assert_eq!(all_volume_dirs(&w).len(), 1, "one volume: {:?}", all_volume_dirs(&w));
    assert_eq!(agent_creates(&w, &volume), 1, "the agent created {volume} once");
    assert_eq!(pvs.list(&ListParams::default()).await.unwrap().items.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_the_agent_made_the_volume_ends_with_one_volume_and_a_bound_pv() {
    crash_at("provision-after-agent-create", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_the_pv_was_created_ends_with_one_volume_and_a_bound_pv() {
    crash_at("provision-after-pv-create", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claim_deleted_while_its_volume_is_made_leaves_nothing() {
    let mut w = world_without_controller(&[256 * MI]).await;
    let client = w.bed.client();
    // The controller waits 3 s between the agent's create and the PV: the claim is deleted in that window.
    let controller = start_with_failpoints(&w, "controller", &[], "provision-before-pv-create=return(3000)").await;
    add_class(&w, class("berth-local", "WaitForFirstConsumer", "Retain", &[("pool", "fast")])).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    claims.create(&PostParams::default(), &claim("data", "berth-local", "64Mi")).await.unwrap();
    pods.create(&PostParams::default(), &pod("db", "data")).await.unwrap();

    wait_for_log(&controller, &["failpoint: pausing", "provision-before-pv-create"], WAIT).await;
    assert_eq!(all_volume_dirs(&w).len(), 1, "the agent made the volume");
    pods.delete("db", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await.unwrap();
    claims.delete("data", &DeleteParams::default()).await.unwrap();
    wait_deleted(&claims, "data", WAIT).await.unwrap();

    wait_for_log(&controller, &["claim deleted while provisioning"], WAIT).await;
    // Retain would keep a PV and its volume for good: neither may exist.
    assert!(Api::<PersistentVolume>::all(client).list(&ListParams::default()).await.unwrap().items.is_empty());
    assert!(all_volume_dirs(&w).is_empty(), "{:?}", all_volume_dirs(&w));
    // Nothing comes later either (a late PV would be created within the reconcile that logged the line).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(all_volume_dirs(&w).is_empty());
    w.controllers.push(controller);
}
