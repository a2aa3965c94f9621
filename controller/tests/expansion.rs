//! Expansion as an external resizer, against the real kube-controller-manager (which finds no plugin for `local`
//! PVs and leaves the claim to us): a claim resized with a patch reaches its new capacity; an impossible resize
//! gives an event and changes nothing.

mod common;

use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::{Event, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use testbed::kube_util::wait_for;

fn status_capacity(c: &PersistentVolumeClaim) -> Option<String> {
    Some(c.status.as_ref()?.capacity.as_ref()?.get("storage")?.0.clone())
}

async fn resize(claims: &Api<PersistentVolumeClaim>, name: &str, size: &str) {
    let patch = serde_json::json!({"spec": {"resources": {"requests": {"storage": size}}}});
    claims.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resized_claim_grows_online_and_an_impossible_resize_changes_nothing() {
    let w = world(&[256 * MI]).await;
    let client = w.bed.client();
    let mut expandable = class("berth-grow", "WaitForFirstConsumer", "Delete", &[("pool", "fast")]);
    expandable.allow_volume_expansion = Some(true);
    add_class(&w, expandable).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    claims.create(&PostParams::default(), &claim("data", "berth-grow", "32Mi")).await.unwrap();
    pods.create(&PostParams::default(), &pod("db", "data")).await.unwrap();
    let pv_name = wait_for(&claims, "data", WAIT, bound).await.unwrap().spec.unwrap().volume_name.unwrap();
    let agent = &w.agents[0];
    let token = w.bed.controller_token(&agent.node).await.unwrap();
    let agent_size = || async {
        let v: serde_json::Value = agent
            .http()
            .unwrap()
            .get(agent.url(&format!("/v1/volumes/{pv_name}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["sizeBytes"].as_u64().unwrap()
    };
    std::fs::write(volume_dir(&w, &agent.node, &pv_name).join("data/db.sqlite"), "precious").unwrap();

    resize(&claims, "data", "64Mi").await;
    let c = wait_for(&claims, "data", WAIT, |c| status_capacity(c).as_deref() == Some("64Mi")).await.unwrap();
    assert!(c.status.unwrap().conditions.unwrap_or_default().is_empty(), "no resize condition left");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv = pvs.get(&pv_name).await.unwrap();
    assert_eq!(pv.spec.unwrap().capacity.unwrap()["storage"].0, "64Mi");
    assert_eq!(agent_size().await, 64 * MI);
    let data = std::fs::read_to_string(volume_dir(&w, &agent.node, &pv_name).join("data/db.sqlite")).unwrap();
    assert_eq!(data, "precious");
    let reasons = event_reasons(&w, "data").await;
    // kube-controller-manager's own word that it leaves the claim to an external resizer, then ours.
    for r in ["ExternalExpanding", "Resizing", "VolumeResizeSuccessful"] {
        assert!(reasons.iter().any(|e| e == r), "{r} in {reasons:?}");
    }

    // More than the node has: an event, and everything stays as it was.
    resize(&claims, "data", "4Gi").await;
    let events: Api<Event> = Api::namespaced(client.clone(), "app");
    let deadline = Instant::now() + WAIT;
    loop {
        let list = events.list(&ListParams::default()).await.unwrap().items;
        if list.iter().any(|e| e.reason.as_deref() == Some("VolumeResizeFailed")) {
            break;
        }
        assert!(Instant::now() < deadline, "no VolumeResizeFailed event");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The controller tries again (space may appear) and is refused again: still nothing changed.
    let deadline = Instant::now() + WAIT;
    while agent_operations(agent, "expand", &pv_name, "InsufficientSpace") < 2 {
        assert!(Instant::now() < deadline, "the impossible resize was not retried; the agent's log:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status_capacity(&claims.get("data").await.unwrap()).as_deref(), Some("64Mi"));
    assert_eq!(pvs.get(&pv_name).await.unwrap().spec.unwrap().capacity.unwrap()["storage"].0, "64Mi");
    assert_eq!(agent_size().await, 64 * MI);
}
