//! Clones through the real control plane (issue 20): a claim whose dataSource is another claim, with agents serving
//! directory (hostpath) pools, whose clones are copies of the source's tree. Each refusal is one event; an Immediate
//! clone lands on its source's node (with more room elsewhere) with the source's files; the source is protected by
//! a finalizer while its clone is being made; a WaitForFirstConsumer clone whose pod the scheduler put elsewhere is
//! asked back with one event, and one whose pod is pinned to the source's node is made there. Thin-snapshot clones
//! are proven in the kernel tier.

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, TypedObjectReference};
use kube::api::{Api, DeleteParams, PostParams};
use testbed::kube_util::{wait_deleted, wait_for};

const FINALIZER: &str = "local.berth.dev/cloning-protection";
/// Every agent call of a clone's create waits this long first (a failpoint), so the test can act while a clone is
/// being made.
const PAUSE_MS: u64 = 2500;

fn clone_of(
    name: &str,
    class: &str,
    size: &str,
    kind: &str,
    group: Option<&str>,
    source: &str,
) -> PersistentVolumeClaim {
    let mut c = claim(name, class, size);
    c.spec.as_mut().unwrap().data_source_ref = Some(TypedObjectReference {
        api_group: group.map(str::to_owned),
        kind: kind.into(),
        name: source.into(),
        namespace: None,
    });
    c
}

fn of_prod(name: &str, class: &str, size: &str) -> PersistentVolumeClaim {
    clone_of(name, class, size, "PersistentVolumeClaim", None, "prod")
}

fn has_finalizer(c: &PersistentVolumeClaim) -> bool {
    c.metadata.finalizers.as_ref().is_some_and(|f| f.iter().any(|f| f == FINALIZER))
}

#[tokio::test(flavor = "multi_thread")]
async fn clones_are_refused_placed_and_their_sources_protected_by_the_controller() {
    let started = std::time::Instant::now();
    let step = |what: &str| println!("{:>6.1} s  {what}", started.elapsed().as_secs_f64());
    let mut w = world_without_controller(&[2 << 30, 2 << 30]).await;
    step("bed up");
    let points = format!("provision-before-agent-clone=return({PAUSE_MS})");
    let controller = start_with_failpoints(&w, "controller", &AUDIT_REPORTS, &points).await;
    w.controllers.push(controller);
    add_class(&w, class("now", "Immediate", "Delete", &[("pool", "fast")])).await;
    add_class(&w, class("other", "Immediate", "Delete", &[("pool", "fast")])).await;
    add_class(&w, class("later", "WaitForFirstConsumer", "Delete", &[("pool", "fast")])).await;
    let client = w.bed.client();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    let post = PostParams::default();

    claims.create(&post, &claim("prod", "now", "64Mi")).await.unwrap();
    let prod = wait_for(&claims, "prod", WAIT, bound).await.unwrap();
    let prod_pv = pvs.get(prod.spec.as_ref().unwrap().volume_name.as_deref().unwrap()).await.unwrap();
    let node = prod_pv.metadata.annotations.as_ref().unwrap()["local.berth.dev/node"].clone();
    let dirs = all_volume_dirs(&w);
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    step("source Bound");

    // What no node can serve: one event each, decided before any agent is asked.
    let refusals = [
        (of_prod("small", "now", "32Mi"), "at least as large as its source"),
        (of_prod("elsewhere", "other", "64Mi"), "a clone must be of its source's class"),
        (clone_of("nothing", "now", "64Mi", "PersistentVolumeClaim", None, "gone"), "does not exist"),
        (
            clone_of("snap", "now", "64Mi", "VolumeSnapshot", Some("snapshot.storage.k8s.io"), "prod"),
            "not a CSI driver",
        ),
    ];
    for (c, _) in &refusals {
        claims.create(&post, c).await.unwrap();
    }
    for (c, words) in &refusals {
        wait_for_event(&w, c.metadata.name.as_deref().unwrap(), "ProvisioningFailed", words).await;
    }

    step("refusals");
    // An Immediate clone goes to its source's node, although the other node has more room, with the source's files.
    // Meanwhile its source is protected: deleting it waits until the clone is made, then it goes.
    let source_data = volume_dir(&w, &node, prod_pv.metadata.name.as_deref().unwrap()).join("data");
    std::fs::create_dir(source_data.join("base")).unwrap();
    std::fs::write(source_data.join("base/table"), "committed").unwrap();
    claims.create(&post, &of_prod("copy", "now", "128Mi")).await.unwrap();
    wait_for(&claims, "prod", WAIT, has_finalizer).await.unwrap();
    claims.delete("prod", &DeleteParams::default()).await.unwrap();
    let held = claims.get("prod").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some() && has_finalizer(&held), "{:?}", held.metadata);
    let copy = wait_for(&claims, "copy", WAIT, bound).await.unwrap();
    let copy_pv = pvs.get(copy.spec.as_ref().unwrap().volume_name.as_deref().unwrap()).await.unwrap();
    assert_eq!(copy_pv.metadata.annotations.as_ref().unwrap()["local.berth.dev/node"], node);
    let copy_data = volume_dir(&w, &node, copy_pv.metadata.name.as_deref().unwrap()).join("data");
    assert_eq!(std::fs::read_to_string(copy_data.join("base/table")).unwrap(), "committed");
    wait_deleted(&claims, "prod", WAIT).await.unwrap();
    wait_deleted(&pvs, prod_pv.metadata.name.as_deref().unwrap(), WAIT).await.unwrap();
    assert_eq!(std::fs::read_to_string(copy_data.join("base/table")).unwrap(), "committed", "the clone outlives it");
    assert_eq!(all_volume_dirs(&w), [format!("{node}/{}", copy_pv.metadata.name.as_deref().unwrap())]);
    for (c, _) in &refusals {
        let name = c.metadata.name.as_deref().unwrap();
        assert_eq!(event_messages(&w, name, "ProvisioningFailed").await.len(), 1, "{name}");
    }
    step("protection");
    // WaitForFirstConsumer: the source's node is wherever its pod went; a clone whose pod is pinned to the other
    // node is asked back with the way to pin it, once; pinned to the source's node it goes there.
    claims.create(&post, &claim("prod", "later", "64Mi")).await.unwrap();
    pods.create(&post, &pod("prod", "prod")).await.unwrap();
    let prod = wait_for(&claims, "prod", WAIT, bound).await.unwrap();
    let prod_pv = pvs.get(prod.spec.as_ref().unwrap().volume_name.as_deref().unwrap()).await.unwrap();
    let node = prod_pv.metadata.annotations.as_ref().unwrap()["local.berth.dev/node"].clone();
    let (source_host, other_host) = {
        let nodes = w.bed.nodes();
        let i = nodes.iter().position(|n| n.name == node).unwrap();
        (nodes[i].hostname.clone(), nodes[1 - i].hostname.clone())
    };
    let pinned = |name: &str, hostname: &str| {
        let mut p = pod(name, name);
        p.spec.as_mut().unwrap().node_selector =
            Some([("kubernetes.io/hostname".to_owned(), hostname.to_owned())].into());
        p
    };
    step("WFFC source Bound");
    claims.create(&post, &of_prod("wrong", "later", "64Mi")).await.unwrap();
    pods.create(&post, &pinned("wrong", &other_host)).await.unwrap();
    let asked = wait_for_event(&w, "wrong", "ProvisioningFailed", "pin the pod").await;
    assert!(asked.contains(&format!("node {node}")) && asked.contains(&source_host), "{asked}");
    // The scheduler keeps choosing the pinned node; the claim is asked back again and again, with backoff, and the
    // event is not repeated.
    let rescheduled = |m: &str| m.lines().filter(|l| l.contains("rescheduling") && l.contains("wrong")).count();
    let deadline = std::time::Instant::now() + WAIT;
    while rescheduled(&w.controllers[0].log_text()) < 3 {
        assert!(std::time::Instant::now() < deadline, "asked back fewer than 3 times in {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(event_messages(&w, "wrong", "ProvisioningFailed").await.len(), 1);
    assert!(claims.get("wrong").await.unwrap().status.and_then(|s| s.phase).as_deref() == Some("Pending"));

    step("asked back 3 times");
    claims.create(&post, &of_prod("right", "later", "64Mi")).await.unwrap();
    pods.create(&post, &pinned("right", &source_host)).await.unwrap();
    let right = wait_for(&claims, "right", WAIT, bound).await.unwrap();
    let right_pv = pvs.get(right.spec.as_ref().unwrap().volume_name.as_deref().unwrap()).await.unwrap();
    assert_eq!(right_pv.metadata.annotations.as_ref().unwrap()["local.berth.dev/node"], node);
    assert!(event_messages(&w, "right", "ProvisioningFailed").await.is_empty());
    step("pinned clone made on the source's node");
}
