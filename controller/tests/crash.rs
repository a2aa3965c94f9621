//! Crash safety, made deterministic with failpoints: the controller aborts at a chosen step of provisioning, a
//! new one starts, and the claim ends with exactly one volume and a Bound PV. A claim deleted while its volume is
//! being made leaves nothing behind.

mod common;

use common::*;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use testbed::kube_util::{events_of, wait_deleted, wait_for};

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
    // Nothing comes later: that reconcile returned right after the line, and a deleted claim is not looked at
    // again (the controller watches claims that exist).
    w.controllers.push(controller);
}

/// The free space of `node`'s pool `fast`, as its BerthNode reports it.
fn free_of(n: &berth::berth_node::BerthNode) -> u64 {
    n.status.as_ref().and_then(|s| s.pools.iter().find(|p| p.name == "fast")).map_or(0, |p| p.free_bytes)
}

/// Immediate: Berth picks the node itself, by free space. After a crash between the agent's create and the PV's,
/// the node that has the volume reports less free space than the other; the restarted controller must stay with
/// the node it chose (recorded on the claim before the agent was called) instead of making a second volume.
#[tokio::test(flavor = "multi_thread")]
async fn an_immediate_claim_aborted_after_its_volume_was_made_stays_on_that_node() {
    let mut w = world_without_controller(&[256 * MI, 256 * MI]).await;
    let client = w.bed.client();
    let mut crashing =
        start_with_failpoints(&w, "controller", &AUDIT_REPORTS, "provision-after-agent-create=return").await;
    add_class(&w, class("berth-now", "Immediate", "Delete", &[("pool", "fast")])).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    let created = claims.create(&PostParams::default(), &claim("data", "berth-now", "64Mi")).await.unwrap();
    let volume = format!("pvc-{}", created.metadata.uid.unwrap());
    crashing.wait_exit(WAIT).expect("the controller aborts after the agent's create");
    let dirs = all_volume_dirs(&w);
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let first = dirs[0].split('/').next().unwrap().to_owned();
    let other = if first == "node-0" { "node-1" } else { "node-0" };
    let recorded = claims.get("data").await.unwrap().metadata.annotations.unwrap_or_default();
    assert_eq!(recorded.get("local.berth.dev/node"), Some(&first), "the node is on the claim before the agent call");

    // What a fresh pick goes by: the node with the volume now has less free space than the other.
    let berth_nodes: Api<berth::berth_node::BerthNode> = Api::all(client.clone());
    let other_free = free_of(&berth_nodes.get(other).await.unwrap());
    wait_for(&berth_nodes, &first, WAIT, |n| free_of(n) + 32 * MI < other_free).await.unwrap();

    w.controllers
        .push(w.bed.start_controller_named("controller", &controller_bin(), &AUDIT_REPORTS, &[]).await.unwrap());
    wait_for(&claims, "data", WAIT, bound).await.unwrap();
    let pv = Api::<PersistentVolume>::all(client).get(&volume).await.unwrap();
    assert_eq!(
        pv.metadata.annotations.unwrap()["local.berth.dev/node"],
        first,
        "the PV is on the node with the volume"
    );
    assert_eq!(all_volume_dirs(&w), vec![format!("{first}/{volume}")], "exactly one volume in the cluster");
    assert_eq!(agent_creates(&w, &volume), 1);
}

/// WaitForFirstConsumer: the controller aborts after the agent made the volume on the selected node; while it is
/// down, that node is cordoned and the scheduler picks the other. The restarted controller removes the first
/// volume (never published) before making the claim's volume on the new node: one volume, and the pod runs there.
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_whose_selected_node_changed_after_an_abort_ends_with_one_volume_on_the_new_node() {
    let mut w = world_without_controller(&[256 * MI, 256 * MI]).await;
    let client = w.bed.client();
    let mut crashing =
        start_with_failpoints(&w, "controller", &AUDIT_REPORTS, "provision-after-agent-create=return").await;
    add_class(&w, class("berth-local", "WaitForFirstConsumer", "Delete", &[("pool", "fast")])).await;
    // Both nodes' capacity published before the pod exists: the scheduler places a pod only on a node with a
    // CSIStorageCapacity of its class, and the controller aborts right after its first create, so a node still
    // unpublished then would stay unschedulable to the end (seen once under load in CI: the claim was never
    // re-selected to the other node).
    wait_capacities(&w, "berth-local", |c| c.len() == 2 && c.values().all(|&b| b > 0)).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    let created = claims.create(&PostParams::default(), &claim("data", "berth-local", "64Mi")).await.unwrap();
    let volume = format!("pvc-{}", created.metadata.uid.unwrap());
    pods.create(&PostParams::default(), &pod("db", "data")).await.unwrap();
    crashing.wait_exit(WAIT).expect("the controller aborts after the agent's create");
    let selected = |c: &PersistentVolumeClaim| {
        c.metadata.annotations.as_ref().and_then(|a| a.get("volume.kubernetes.io/selected-node")).cloned()
    };
    let first = selected(&claims.get("data").await.unwrap()).expect("the scheduler selected a node");
    assert_eq!(all_volume_dirs(&w), vec![format!("{first}/{volume}")]);
    let second = if first == "node-0" { "node-1" } else { "node-0" };

    // An operator cordons the node; the scheduler is asked again (as Berth's own reschedule does) and picks the
    // other one.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let cordon = serde_json::json!({"spec": {"unschedulable": true}});
    nodes.patch(&first, &PatchParams::default(), &Patch::Merge(&cordon)).await.unwrap();
    let unselect = serde_json::json!({"metadata": {"annotations": {"volume.kubernetes.io/selected-node": null}}});
    claims.patch("data", &PatchParams::default(), &Patch::Merge(&unselect)).await.unwrap();
    if let Err(e) = wait_for(&claims, "data", WAIT, |c| selected(c).as_deref() == Some(second)).await {
        panic!("{e:#}\nthe pod's events (the scheduler's reasons):\n{}", events_of(&client, "app", "db").await);
    }

    w.controllers
        .push(w.bed.start_controller_named("controller", &controller_bin(), &AUDIT_REPORTS, &[]).await.unwrap());
    wait_for(&claims, "data", WAIT, bound).await.unwrap();
    let pv = Api::<PersistentVolume>::all(client.clone()).get(&volume).await.unwrap();
    assert_eq!(pv.metadata.annotations.unwrap()["local.berth.dev/node"], second);
    assert_eq!(all_volume_dirs(&w), vec![format!("{second}/{volume}")], "exactly one volume, on the new node");
    let log = w.controllers[0].log_text();
    assert!(log.contains("removed the volume an earlier attempt made on another node"), "{log}");
    wait_for(&pods, "db", WAIT, |p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(second))
        .await
        .unwrap();
}

/// Released with policy Delete, the controller aborts after the agent deleted the volume and before it lifted the
/// PV's finalizer: the restarted controller asks again (the agent has nothing left to delete) and the PV goes.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_between_the_agents_delete_and_the_finalizer_ends_with_both_gone() {
    let mut w = world_without_controller(&[256 * MI]).await;
    let client = w.bed.client();
    let mut crashing = start_with_failpoints(&w, "controller", &[], "delete-after-agent-delete=return").await;
    add_class(&w, class("berth-local", "WaitForFirstConsumer", "Delete", &[("pool", "fast")])).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    claims.create(&PostParams::default(), &claim("data", "berth-local", "64Mi")).await.unwrap();
    pods.create(&PostParams::default(), &pod("db", "data")).await.unwrap();
    let volume = wait_for(&claims, "data", WAIT, bound).await.unwrap().spec.unwrap().volume_name.unwrap();
    pods.delete("db", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await.unwrap();
    claims.delete("data", &DeleteParams::default()).await.unwrap();

    let status = crashing.wait_exit(WAIT).expect("the controller aborts after the agent's delete");
    assert!(!status.success(), "{status}");
    assert!(all_volume_dirs(&w).is_empty(), "the volume was deleted before the crash: {:?}", all_volume_dirs(&w));
    let pv = pvs.get(&volume).await.unwrap();
    assert!(
        pv.metadata.finalizers.unwrap_or_default().iter().any(|f| f.contains("external-provisioner")),
        "the PV still has its finalizer"
    );

    w.controllers.push(w.bed.start_controller_named("controller", &controller_bin(), &[], &[]).await.unwrap());
    wait_deleted(&pvs, &volume, WAIT).await.unwrap();
    assert!(all_volume_dirs(&w).is_empty());
    // Asked again after the restart (the volume was already gone before it, so nothing more was deleted). Maybe
    // more than once: a reconcile queued while the first ran can read the PV from a cache that still shows its
    // finalizer, and asks again — harmless, a delete of what is gone answers `deleted: false` (CI saw 3 calls).
    let asked = agent_operations(&w.agents[0], "delete", &volume, "");
    assert!(asked >= 2, "asked {asked} times: {}", w.agents[0].log());
}

/// The controller aborts after the agent grew the volume and before the PV and the claim say so: the claim's
/// status still says the resize is under way, and the restarted controller completes it at that size.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_the_agent_grew_the_volume_completes_the_resize() {
    let mut w = world_without_controller(&[256 * MI]).await;
    let client = w.bed.client();
    let mut crashing = start_with_failpoints(&w, "controller", &[], "expand-after-agent-grow=return").await;
    let mut expandable = class("berth-grow", "WaitForFirstConsumer", "Delete", &[("pool", "fast")]);
    expandable.allow_volume_expansion = Some(true);
    add_class(&w, expandable).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    claims.create(&PostParams::default(), &claim("data", "berth-grow", "32Mi")).await.unwrap();
    pods.create(&PostParams::default(), &pod("db", "data")).await.unwrap();
    let volume = wait_for(&claims, "data", WAIT, bound).await.unwrap().spec.unwrap().volume_name.unwrap();
    let patch = serde_json::json!({"spec": {"resources": {"requests": {"storage": "64Mi"}}}});
    claims.patch("data", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();

    crashing.wait_exit(WAIT).expect("the controller aborts after the agent's grow");
    assert_eq!(agent_operations(&w.agents[0], "expand", &volume, "result=ok"), 1, "{}", w.agents[0].log());
    let storage = |pv: &PersistentVolume| pv.spec.as_ref().unwrap().capacity.as_ref().unwrap()["storage"].0.clone();
    assert_eq!(storage(&pvs.get(&volume).await.unwrap()), "32Mi");
    let c = claims.get("data").await.unwrap();
    let status = c.status.unwrap();
    assert_eq!(status.allocated_resource_statuses.unwrap()["storage"], "ControllerResizeInProgress");
    assert_eq!(status.capacity.unwrap()["storage"].0, "32Mi");

    w.controllers.push(w.bed.start_controller_named("controller", &controller_bin(), &[], &[]).await.unwrap());
    let c = wait_for(&claims, "data", WAIT, |c| {
        c.status.as_ref().and_then(|s| s.capacity.as_ref()).is_some_and(|cap| cap["storage"].0 == "64Mi")
    })
    .await
    .unwrap();
    assert_eq!(c.status.unwrap().allocated_resource_statuses.unwrap_or_default().get("storage"), None);
    assert_eq!(storage(&pvs.get(&volume).await.unwrap()), "64Mi");
}

/// The controller aborts after saying why the selected node cannot take a claim and before removing
/// `selected-node`: the restarted controller decides again and asks the scheduler for another node, which then
/// gets the volume — one, nowhere else.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_before_the_reschedule_patch_reschedules_after_the_restart() {
    let mut w = world_without_controller(&[256 * MI]).await;
    let client = w.bed.client();
    let mut crashing = start_with_failpoints(&w, "controller", &[], "reschedule-before-unselect=return").await;
    add_class(&w, class("berth-local", "WaitForFirstConsumer", "Delete", &[("pool", "fast")])).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    // As the scheduler would have written it, for a node that has left the cluster since.
    let mut c = claim("data", "berth-local", "64Mi");
    c.metadata.annotations = Some([("volume.kubernetes.io/selected-node".to_string(), "node-gone".to_string())].into());
    claims.create(&PostParams::default(), &c).await.unwrap();

    crashing.wait_exit(WAIT).expect("the controller aborts before removing selected-node");
    let selected = |c: &PersistentVolumeClaim| {
        c.metadata.annotations.as_ref().and_then(|a| a.get("volume.kubernetes.io/selected-node")).cloned()
    };
    assert_eq!(selected(&claims.get("data").await.unwrap()).as_deref(), Some("node-gone"));

    w.controllers.push(w.bed.start_controller_named("controller", &controller_bin(), &[], &[]).await.unwrap());
    wait_for(&claims, "data", WAIT, |c| selected(c).is_none()).await.unwrap();
    Api::<Pod>::namespaced(client.clone(), "app").create(&PostParams::default(), &pod("db", "data")).await.unwrap();
    let volume = wait_for(&claims, "data", WAIT, bound).await.unwrap().spec.unwrap().volume_name.unwrap();
    assert_eq!(all_volume_dirs(&w), vec![format!("node-0/{volume}")]);
    let failures = event_messages(&w, "data", "ProvisioningFailed").await;
    assert!(failures.iter().any(|m| m.contains("node-gone")), "the reason is on the claim: {failures:?}");
}
