//! Scheduler awareness, with the real kube-scheduler: the controller publishes CSIStorageCapacity objects per
//! class and node, and pods land only where their volumes fit. Each simulated node has its own filesystem.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Container, Event, PersistentVolume, PersistentVolumeClaim, Pod, PodSpec, PodTemplateSpec, VolumeMount,
};
use k8s_openapi::api::storage::v1::{CSIStorageCapacity, StorageClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use testbed::agents::PoolSpec;
use testbed::kube_util::{wait_deleted, wait_for};

const GI: u64 = 1 << 30;

fn hostname(w: &World, node: usize) -> String {
    w.bed.nodes()[node].hostname.clone()
}

/// The node (name) a PV is on.
fn pv_node(pv: &PersistentVolume) -> String {
    pv.metadata.annotations.as_ref().unwrap()["local.berth.dev/node"].clone()
}

async fn create_class(w: &World, name: &str, pool: &str) {
    add_class(w, class(name, "WaitForFirstConsumer", "Delete", &[("pool", pool)])).await;
}

fn unschedulable_message(pod: &Pod) -> Option<String> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    let c = conditions.iter().find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
    c.message.clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_20_gib_claim_lands_on_the_50_gib_node_ten_times_out_of_ten() {
    let w = world(&[5 * GI, 10 * GI, 50 * GI]).await;
    create_class(&w, "berth-local", "fast").await;
    let big = hostname(&w, 2);
    let full = wait_capacities(&w, "berth-local", |c| c.len() == 3).await;
    let client = w.bed.client();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    for round in 0..10 {
        let name = format!("round-{round}");
        claims.create(&PostParams::default(), &claim(&name, "berth-local", "20Gi")).await.unwrap();
        pods.create(&PostParams::default(), &pod(&name, &name)).await.unwrap();
        let c = wait_for(&claims, &name, WAIT, bound).await.unwrap();
        let pv = pvs.get(c.spec.as_ref().unwrap().volume_name.as_deref().unwrap()).await.unwrap();
        assert_eq!(pv_node(&pv), "node-2", "round {round}");
        // The scheduler binds the pod once the claim is Bound.
        let p = wait_for(&pods, &name, WAIT, |p| p.spec.as_ref().is_some_and(|s| s.node_name.is_some())).await.unwrap();
        assert_eq!(p.spec.unwrap().node_name.as_deref(), Some("node-2"), "round {round}");
        // Both go; the space returns before the next round.
        pods.delete(&name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await.unwrap();
        claims.delete(&name, &DeleteParams::default()).await.unwrap();
        wait_deleted(&pvs, pv.metadata.name.as_deref().unwrap(), WAIT).await.unwrap();
        // (Within 16 MiB: the filesystem's own metadata moves its free space a little.)
        wait_capacities(&w, "berth-local", |c| c[&big] + 16 * MI >= full[&big]).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claim_that_fits_nowhere_stays_pending_and_nothing_is_made() {
    let w = world(&[GI, 2 * GI]).await;
    create_class(&w, "berth-local", "fast").await;
    wait_capacities(&w, "berth-local", |c| c.len() == 2).await;
    let client = w.bed.client();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    claims.create(&PostParams::default(), &claim("huge", "berth-local", "5Gi")).await.unwrap();
    pods.create(&PostParams::default(), &pod("db", "huge")).await.unwrap();
    let pod = wait_for(&pods, "db", WAIT, |p| unschedulable_message(p).is_some()).await.unwrap();
    let message = unschedulable_message(&pod).unwrap();
    assert!(message.contains("did not have enough free storage"), "the scheduler's explanation: {message}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pod = pods.get("db").await.unwrap();
    assert!(pod.spec.unwrap().node_name.is_none(), "still Pending");
    let claim = claims.get("huge").await.unwrap();
    assert!(!claim.metadata.annotations.unwrap_or_default().contains_key("volume.kubernetes.io/selected-node"));
    assert!(Api::<PersistentVolume>::all(client).list(&ListParams::default()).await.unwrap().items.is_empty());
    assert!(all_volume_dirs(&w).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn four_replicas_of_30_gib_on_three_40_gib_nodes_one_per_node_and_the_fourth_pending() {
    let w = world(&[40 * GI, 40 * GI, 40 * GI]).await;
    create_class(&w, "berth-local", "fast").await;
    wait_capacities(&w, "berth-local", |c| c.len() == 3).await;
    let client = w.bed.client();
    let labels = BTreeMap::from([("app".to_owned(), "db".to_owned())]);
    let template_claim = claim("data", "berth-local", "30Gi");
    let set = StatefulSet {
        metadata: ObjectMeta { name: Some("db".into()), ..Default::default() },
        spec: StatefulSetSpec {
            replicas: Some(4),
            service_name: Some("db".into()),
            selector: LabelSelector { match_labels: Some(labels.clone()), match_expressions: None },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..Default::default() }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "db".into(),
                        image: Some("registry.invalid/db:1".into()),
                        volume_mounts: Some(vec![VolumeMount {
                            name: "data".into(),
                            mount_path: "/data".into(),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            },
            volume_claim_templates: Some(vec![template_claim]),
            // All at once: the fourth pod is scheduled as soon as it exists.
            pod_management_policy: Some("Parallel".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<StatefulSet>::namespaced(client.clone(), "app").create(&PostParams::default(), &set).await.unwrap();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());

    let deadline = Instant::now() + WAIT;
    let (bound_claims, pending): (Vec<PersistentVolumeClaim>, Vec<Pod>) = loop {
        let list = claims.list(&ListParams::default()).await.unwrap().items;
        let bound_claims: Vec<_> = list.into_iter().filter(bound).collect();
        let pending: Vec<Pod> = pods
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|p| unschedulable_message(p).is_some())
            .collect();
        // (With all four pods scheduled at once the fourth may first be sent to a node whose capacity object
        // does not show the third volume yet; the agent refuses it, Berth reschedules, and the scheduler then
        // explains that no node has room.)
        let settled = pending.len() == 1
            && unschedulable_message(&pending[0]).is_some_and(|m| m.contains("did not have enough free storage"));
        if bound_claims.len() == 3 && settled {
            break (bound_claims, pending);
        }
        assert!(Instant::now() < deadline, "{} claims Bound, {} pods unschedulable", bound_claims.len(), pending.len());
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut nodes: Vec<String> = Vec::new();
    for c in &bound_claims {
        nodes.push(pv_node(&pvs.get(c.spec.as_ref().unwrap().volume_name.as_deref().unwrap()).await.unwrap()));
    }
    nodes.sort();
    assert_eq!(nodes, ["node-0", "node-1", "node-2"], "one replica per node");
    let message = unschedulable_message(&pending[0]).unwrap();
    assert!(message.contains("did not have enough free storage"), "{message}");
    // It stays that way.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(all_volume_dirs(&w).len(), 3);
}

/// The scheduler picked a node, then space there was taken outside Berth before the volume was made: the agent
/// refuses, the claim is rescheduled, and the pod ends up Bound on the node that still has room.
#[tokio::test(flavor = "multi_thread")]
async fn space_taken_after_scheduling_sends_the_pod_to_a_node_with_room() {
    let mut w = world_without_controller(&[512 * MI, 512 * MI]).await;
    // The controller pauses 3 s before each agent create: the window in which the space is taken.
    let controller = start_with_failpoints(&w, "controller", &[], "provision-before-agent-create=return(3000)").await;
    create_class(&w, "berth-local", "fast").await;
    wait_capacities(&w, "berth-local", |c| c.len() == 2).await;
    let client = w.bed.client();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    claims.create(&PostParams::default(), &claim("big", "berth-local", "300Mi")).await.unwrap();
    pods.create(&PostParams::default(), &pod("db", "big")).await.unwrap();

    let selected = wait_for(&claims, "big", WAIT, |c| {
        c.metadata.annotations.as_ref().is_some_and(|a| a.contains_key("volume.kubernetes.io/selected-node"))
    })
    .await
    .unwrap()
    .metadata
    .annotations
    .unwrap()["volume.kubernetes.io/selected-node"]
        .clone();
    wait_for_log(&controller, &["failpoint: pausing"], WAIT).await;
    // Someone fills the chosen node's filesystem (not through Berth).
    let index = w.bed.nodes().iter().position(|n| n.name == selected).unwrap();
    let disk = w.bed.nodes()[index].disk.as_ref().unwrap().mount_point().join("filler");
    let status = std::process::Command::new("fallocate").args(["-l", "400M"]).arg(&disk).status().unwrap();
    assert!(status.success());

    let c = wait_for(&claims, "big", Duration::from_secs(120), bound).await.unwrap();
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get(c.spec.unwrap().volume_name.as_deref().unwrap())
        .await
        .unwrap();
    assert_ne!(pv_node(&pv), selected, "the volume is on the node that still had room");
    let p = wait_for(&pods, "db", WAIT, |p| p.spec.as_ref().is_some_and(|s| s.node_name.is_some())).await.unwrap();
    assert_eq!(p.spec.unwrap().node_name.as_deref(), Some(pv_node(&pv).as_str()));
    let events: Api<Event> = Api::namespaced(client.clone(), "app");
    let list = events.list(&ListParams::default()).await.unwrap().items;
    assert!(
        list.iter().any(|e| e.reason.as_deref() == Some("ProvisioningFailed")
            && e.message.as_deref().is_some_and(|m| m.contains(&selected) && m.contains("another node"))),
        "a ProvisioningFailed event says why {selected} was given up"
    );
    let on_selected: Vec<String> =
        all_volume_dirs(&w).into_iter().filter(|d| d.starts_with(&format!("{selected}/"))).collect();
    assert!(on_selected.is_empty(), "nothing was made on {selected}: {on_selected:?}");
    w.controllers.push(controller);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_class_sees_only_its_pools_capacity_and_objects_follow_classes_and_nodes() {
    let pools = [
        PoolSpec { extra: "capacity = \"100Mi\"".into(), ..PoolSpec::new("small") },
        PoolSpec { extra: "capacity = \"300Mi\"".into(), ..PoolSpec::new("large") },
    ];
    let mut w = world_with_pools(&[GI, GI], &pools).await;
    w.controllers.push(w.bed.start_controller(&controller_bin(), &[]).await.unwrap());
    create_class(&w, "berth-small", "small").await;
    create_class(&w, "berth-large", "large").await;
    let (h0, h1) = (hostname(&w, 0), hostname(&w, 1));
    let small = wait_capacities(&w, "berth-small", |c| c.len() == 2).await;
    let large = wait_capacities(&w, "berth-large", |c| c.len() == 2).await;
    assert_eq!(small, BTreeMap::from([(h0.clone(), 100 * MI), (h1.clone(), 100 * MI)]));
    assert_eq!(large, BTreeMap::from([(h0.clone(), 300 * MI), (h1.clone(), 300 * MI)]));

    // An idle heartbeat rewrites nothing: every agent rewrites its BerthNode (the 60 s heartbeat), and no
    // capacity object changes for it.
    let api: Api<CSIStorageCapacity> = Api::namespaced(w.bed.client(), "berth-system");
    let versions = |list: Vec<CSIStorageCapacity>| -> BTreeMap<String, String> {
        list.into_iter().map(|c| (c.metadata.name.unwrap(), c.metadata.resource_version.unwrap())).collect()
    };
    let before = versions(api.list(&ListParams::default()).await.unwrap().items);
    let berth_nodes: Api<berth::berth_node::BerthNode> = Api::all(w.bed.client());
    let heartbeat = |n: &berth::berth_node::BerthNode| n.status.as_ref().map(|s| s.heartbeat_time.clone());
    for node in ["node-0", "node-1"] {
        let first = heartbeat(&berth_nodes.get(node).await.unwrap());
        wait_for(&berth_nodes, node, Duration::from_secs(90), |n| heartbeat(n) != first).await.unwrap();
    }
    assert_eq!(versions(api.list(&ListParams::default()).await.unwrap().items), before, "rewritten while idle");

    // A class goes: its objects go (owner reference). A node's agent goes: its objects go.
    Api::<StorageClass>::all(w.bed.client()).delete("berth-small", &DeleteParams::default()).await.unwrap();
    wait_capacities(&w, "berth-small", |c| c.is_empty()).await;
    w.agents[1].kill();
    Api::<berth::berth_node::BerthNode>::all(w.bed.client()).delete("node-1", &DeleteParams::default()).await.unwrap();
    wait_capacities(&w, "berth-large", |c| c.keys().collect::<Vec<_>>() == [&h0]).await;
}
