//! Expansion as an external resizer, against the real kube-controller-manager (which finds no plugin for `local`
//! PVs and leaves the claim to us) and the real API server's validation of Kubernetes 1.37's resize protocol: a
//! claim resized with a patch reaches its new capacity through `ControllerResizeInProgress`; an impossible resize
//! is `ControllerResizeInfeasible` with an event, changes nothing and is not tried again; lowering the request
//! recovers.

mod common;

use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use testbed::kube_util::wait_for;

fn status_capacity(c: &PersistentVolumeClaim) -> Option<String> {
    Some(c.status.as_ref()?.capacity.as_ref()?.get("storage")?.0.clone())
}

async fn resize(claims: &Api<PersistentVolumeClaim>, name: &str, size: &str) {
    let patch = serde_json::json!({"spec": {"resources": {"requests": {"storage": size}}}});
    claims.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
}

fn resize_status(c: &PersistentVolumeClaim) -> Option<String> {
    c.status.as_ref()?.allocated_resource_statuses.as_ref()?.get("storage").cloned()
}

fn allocated(c: &PersistentVolumeClaim) -> Option<String> {
    Some(c.status.as_ref()?.allocated_resources.as_ref()?.get("storage")?.0.clone())
}

/// The claim's resize conditions, and whether the condition another controller set is still there.
/// (kube-controller-manager keeps an `Unused` condition of its own on claims too.)
fn conditions(c: &PersistentVolumeClaim) -> (Vec<String>, bool) {
    let conditions = c.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
    let types: Vec<String> = conditions.into_iter().map(|c| c.type_).collect();
    let theirs = types.iter().any(|t| t == "example.com/Backup");
    let resize = ["Resizing", "FileSystemResizePending", "ControllerResizeError", "NodeResizeError"];
    (types.into_iter().filter(|t| resize.contains(&t.as_str())).collect(), theirs)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resized_claim_grows_online_an_impossible_resize_is_infeasible_and_a_lower_request_recovers() {
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
    // A condition that is not the resizer's (another controller's): every step leaves it.
    let theirs = serde_json::json!({"status": {"conditions": [{"type": "example.com/Backup", "status": "True"}]}});
    claims.patch_status("data", &PatchParams::default(), &Patch::Merge(&theirs)).await.unwrap();
    // Every resize status the claim ever shows.
    let statuses = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let watching = tokio::spawn({
        let statuses = statuses.clone();
        watcher(claims.clone(), watcher::Config::default()).applied_objects().for_each(move |c| {
            if let Some(s) = c.ok().as_ref().and_then(resize_status) {
                let mut seen = statuses.lock().unwrap();
                if seen.last() != Some(&s) {
                    seen.push(s);
                }
            }
            async {}
        })
    });

    resize(&claims, "data", "64Mi").await;
    let c = wait_for(&claims, "data", WAIT, |c| status_capacity(c).as_deref() == Some("64Mi")).await.unwrap();
    assert_eq!((resize_status(&c), allocated(&c).as_deref()), (None, Some("64Mi")), "{:?}", c.status);
    assert_eq!(conditions(&c), (vec![], true), "no resize condition left, theirs kept");
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

    // More than the node has: infeasible, said once, and everything stays as it was.
    resize(&claims, "data", "4Gi").await;
    let c = wait_for(&claims, "data", WAIT, |c| resize_status(c).as_deref() == Some("ControllerResizeInfeasible"))
        .await
        .unwrap();
    assert_eq!(allocated(&c).as_deref(), Some("4Gi"));
    assert_eq!(conditions(&c), (vec!["ControllerResizeError".to_string()], true));
    wait_for_event(&w, "data", "VolumeResizeFailed", "4Gi").await;
    assert_eq!(status_capacity(&c).as_deref(), Some("64Mi"));
    assert_eq!(pvs.get(&pv_name).await.unwrap().spec.unwrap().capacity.unwrap()["storage"].0, "64Mi");
    assert_eq!(agent_size().await, 64 * MI);
    // Looked at again (touched twice), and not tried again at that size.
    for i in 0..2 {
        let patch = serde_json::json!({"metadata": {"labels": {"touched": i.to_string()}}});
        claims.patch("data", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }

    // The user's recovery: a smaller request (the API server allows any size above status.capacity).
    resize(&claims, "data", "128Mi").await;
    let c = wait_for(&claims, "data", WAIT, |c| status_capacity(c).as_deref() == Some("128Mi")).await.unwrap();
    assert_eq!((resize_status(&c), allocated(&c).as_deref()), (None, Some("128Mi")), "{:?}", c.status);
    assert_eq!(conditions(&c), (vec![], true));
    assert_eq!(agent_size().await, 128 * MI);
    // The recovery was reconciled after the touches (one claim's reconciles run in order): the infeasible size
    // was asked of the agent exactly once.
    assert_eq!(agent_operations(agent, "expand", &pv_name, "InsufficientSpace"), 1, "{}", agent.log());
    watching.abort();
    let seen = statuses.lock().unwrap().clone();
    assert_eq!(
        seen,
        ["ControllerResizeInProgress", "ControllerResizeInfeasible", "ControllerResizeInProgress"],
        "the resize statuses the claim went through (never NodeResizePending)"
    );
}
