//! End to end: the real control plane, real agents on their nodes' own disks, the real controller.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::{Event, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use testbed::kube_util::{wait_deleted, wait_for};

#[tokio::test(flavor = "multi_thread")]
async fn wait_for_first_consumer_claim_gets_a_volume_on_the_pods_node_and_loses_it_on_delete() {
    let w = world(&[256 * MI, 256 * MI]).await;
    let client = w.bed.client();
    add_class(&w, class("berth-local", "WaitForFirstConsumer", "Delete", &[("pool", "fast")])).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    claims.create(&PostParams::default(), &claim("data", "berth-local", "64Mi")).await.unwrap();
    pods.create(&PostParams::default(), &pod("db", "data")).await.unwrap();

    let c = wait_for(&claims, "data", WAIT, bound).await.unwrap();
    let pv_name = c.spec.unwrap().volume_name.unwrap();
    assert_eq!(pv_name, format!("pvc-{}", c.metadata.uid.unwrap()));
    let p =
        wait_for(&pods, "db", WAIT, |p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()).await.unwrap();
    let node = p.spec.unwrap().node_name.unwrap();
    let hostname = w.bed.nodes().iter().find(|n| n.name == node).unwrap().hostname.clone();

    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv = pvs.get(&pv_name).await.unwrap();
    let spec = pv.spec.clone().unwrap();
    let term = &spec.node_affinity.unwrap().required.unwrap().node_selector_terms[0];
    assert_eq!(term.match_expressions.as_ref().unwrap()[0].values, Some(vec![hostname]), "pinned to the pod's node");
    assert_eq!(spec.capacity.unwrap()["storage"], Quantity("64Mi".into()));
    let dir = volume_dir(&w, &node, &pv_name);
    assert_eq!(spec.local.unwrap().path, dir.join("data").display().to_string());
    assert!(dir.join("data").is_dir(), "{} missing", dir.display());
    assert_eq!(all_volume_dirs(&w), vec![format!("{node}/{pv_name}")], "exactly one volume, on that node");
    let reasons = event_reasons(&w, "data").await;
    let p = reasons.iter().position(|r| r == "Provisioning").expect("Provisioning event");
    let s = reasons.iter().position(|r| r == "ProvisioningSucceeded").expect("ProvisioningSucceeded event");
    assert!(p < s, "{reasons:?}");

    pods.delete("db", &DeleteParams::default()).await.unwrap();
    claims.delete("data", &DeleteParams::default()).await.unwrap();
    wait_deleted(&pvs, &pv_name, WAIT).await.unwrap();
    assert!(!dir.exists(), "the volume's directory outlived its PV");
}

#[tokio::test(flavor = "multi_thread")]
async fn immediate_claim_lands_on_the_node_with_most_free_space_and_retain_keeps_it() {
    // (Also: a claim whose class appears after it is provisioned when the class does.)
    let w = world(&[128 * MI, 512 * MI]).await;
    let client = w.bed.client();
    // The claim comes before its class: refused at first ("not found"), provisioned once the class exists.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    claims.create(&PostParams::default(), &claim("kept", "berth-keep", "32Mi")).await.unwrap();
    wait_for_event(&w, "kept", "ProvisioningFailed", "not found").await;
    add_class(&w, class("berth-keep", "Immediate", "Retain", &[("pool", "fast")])).await;
    let c = wait_for(&claims, "kept", WAIT, bound).await.unwrap();
    let pv_name = c.spec.unwrap().volume_name.unwrap();
    assert_eq!(all_volume_dirs(&w), vec![format!("node-1/{pv_name}")], "the 512 MiB node has the most free space");

    claims.delete("kept", &DeleteParams::default()).await.unwrap();
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv = wait_for(&pvs, &pv_name, WAIT, released).await.unwrap();
    assert_eq!(
        pv.metadata.finalizers.unwrap_or_default().iter().filter(|f| f.contains("external-provisioner")).count(),
        0
    );
    // The controller has looked at the released PV (and says what it keeps, and where), and deleted nothing.
    let said = wait_for_event(&w, &pv_name, "VolumeRetained", "keeps the volume").await;
    assert!(said.contains("node-1") && said.contains(&pv_name), "{said}");
    assert!(pvs.get_opt(&pv_name).await.unwrap().is_some(), "a Retain PV was deleted");
    assert_eq!(all_volume_dirs(&w), vec![format!("node-1/{pv_name}")], "a Retain volume was deleted");
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_are_events_and_create_nothing() {
    let w = world(&[128 * MI]).await;
    let client = w.bed.client();
    let classes: Api<StorageClass> = Api::all(client.clone());
    classes
        .create(&PostParams::default(), &class("typo", "Immediate", "Delete", &[("pool", "fast"), ("sise", "1")]))
        .await
        .unwrap();
    classes
        .create(&PostParams::default(), &class("nowhere", "Immediate", "Delete", &[("pool", "slow")]))
        .await
        .unwrap();
    classes.create(&PostParams::default(), &class("fits", "Immediate", "Delete", &[("pool", "fast")])).await.unwrap();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    claims.create(&PostParams::default(), &claim("typo", "typo", "1Mi")).await.unwrap();
    claims.create(&PostParams::default(), &claim("nowhere", "nowhere", "1Mi")).await.unwrap();
    claims.create(&PostParams::default(), &claim("huge", "fits", "1Gi")).await.unwrap();
    let mut shared = claim("shared", "fits", "1Mi");
    shared.spec.as_mut().unwrap().access_modes = Some(vec!["ReadWriteMany".into()]);
    claims.create(&PostParams::default(), &shared).await.unwrap();

    for (name, words) in
        [("typo", "sise"), ("nowhere", "exists on no node"), ("huge", "free"), ("shared", "ReadWriteMany")]
    {
        let events: Api<Event> = Api::namespaced(client.clone(), "app");
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let list = events.list(&ListParams::default()).await.unwrap().items;
            let found = list.iter().any(|e| {
                e.involved_object.name.as_deref() == Some(name)
                    && e.reason.as_deref() == Some("ProvisioningFailed")
                    && e.message.as_deref().is_some_and(|m| m.contains(words))
            });
            if found {
                break;
            }
            let seen: Vec<_> = list
                .iter()
                .filter(|e| e.involved_object.name.as_deref() == Some(name))
                .map(|e| (e.reason.clone(), e.message.clone()))
                .collect();
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: no ProvisioningFailed event mentioning {words:?}; its events: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    assert!(pvs.list(&ListParams::default()).await.unwrap().items.is_empty());
    assert!(all_volume_dirs(&w).is_empty());

    // Every class change makes the controller look at all claims again; a refusal that has not changed is not
    // published again (no event written per change).
    let events: Api<Event> = Api::namespaced(client.clone(), "app");
    let snapshot = || async {
        let list = events.list(&ListParams::default()).await.unwrap().items;
        let mut seen: Vec<String> = list
            .iter()
            // Berth's events only: kube-controller-manager's ExternalProvisioning event repeats on its own.
            .filter(|e| {
                e.involved_object.name.as_deref() == Some("nowhere")
                    && e.reason.as_deref() == Some("ProvisioningFailed")
            })
            .map(|e| {
                format!("{:?} {:?} {:?} {:?}", e.metadata.name, e.count, e.series.as_ref().map(|s| s.count), e.message)
            })
            .collect();
        seen.sort();
        seen
    };
    let before = snapshot().await;
    assert_eq!(before.len(), 1, "{before:?}");
    let refusals = r#"berth_controller_provisions_total{class="nowhere",result="refused"}"#;
    let refused_before = sample(&metrics_of(&w.controllers[0]).await, refusals);
    for i in 0..3 {
        classes
            .create(&PostParams::default(), &class(&format!("other-{i}"), "Immediate", "Delete", &[("pool", "x")]))
            .await
            .unwrap();
    }
    // Proof the claim was looked at again after the changes: each look counts a refusal.
    wait_for_sample(&w.controllers[0], refusals, refused_before + 3.0).await;
    assert_eq!(snapshot().await, before, "the same refusal was published again");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_orphan_audit_removes_volumes_nobody_claims() {
    let w = world_with_controller(&[128 * MI], &AUDIT_DELETES).await;
    let agent = &w.agents[0];
    let http = agent.http().unwrap();
    let token = w.bed.controller_token("node-0").await.unwrap();
    let make = |name: &str, claim: &str| {
        let body = serde_json::json!({"pool": "fast", "sizeBytes": MI, "claim": {"namespace": "app", "name": claim}});
        // Epoch 1: no newer than the controller's (the first epoch of a new Lease), so its later delete is admitted.
        http.put(agent.url(&format!("/v1/volumes/{name}")))
            .bearer_auth(&token)
            .header("berth-leader-epoch", "1")
            .json(&body)
            .send()
    };
    // A claim that exists, provisioning "in flight": its volume must survive.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(w.bed.client(), "app");
    let mut live = claim("live", "no-such-class", "1Mi");
    live.metadata.annotations =
        Some(BTreeMap::from([("volume.kubernetes.io/storage-provisioner".into(), "someone.else/x".into())]));
    let live = claims.create(&PostParams::default(), &live).await.unwrap();
    let live_volume = format!("pvc-{}", live.metadata.uid.unwrap());
    assert_eq!(make(&live_volume, "live").await.unwrap().status(), 201);
    let orphan = "pvc-00000000-0000-4000-8000-000000000001";
    assert_eq!(make(orphan, "gone").await.unwrap().status(), 201);

    let dir = agent.pool_root("fast").join(orphan);
    let deadline = std::time::Instant::now() + WAIT;
    while dir.exists() {
        assert!(std::time::Instant::now() < deadline, "the orphan {orphan} was not removed");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(agent.pool_root("fast").join(&live_volume).exists(), "a volume whose claim is alive was removed");
}

/// A Delete-policy PV whose object is deleted first (while still bound) keeps Berth's finalizer until its volume
/// is gone: once the claim is deleted too, the directory is removed and the PV object goes.
#[tokio::test(flavor = "multi_thread")]
async fn a_pv_object_deleted_first_still_frees_its_volume() {
    let w = world(&[128 * MI]).await;
    let client = w.bed.client();
    add_class(&w, class("berth-now", "Immediate", "Delete", &[("pool", "fast")])).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    claims.create(&PostParams::default(), &claim("data", "berth-now", "8Mi")).await.unwrap();
    let c = wait_for(&claims, "data", WAIT, bound).await.unwrap();
    let pv_name = c.spec.unwrap().volume_name.unwrap();
    let dir = volume_dir(&w, "node-0", &pv_name);
    assert!(dir.is_dir());

    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    pvs.delete(&pv_name, &DeleteParams::default()).await.unwrap();
    let pv = wait_for(&pvs, &pv_name, WAIT, |p| p.metadata.deletion_timestamp.is_some()).await.unwrap();
    let finalizers = pv.metadata.finalizers.unwrap_or_default();
    assert!(finalizers.iter().any(|f| f == "external-provisioner.volume.kubernetes.io/finalizer"), "{finalizers:?}");
    assert!(dir.is_dir(), "the volume went while its claim still uses it");

    claims.delete("data", &DeleteParams::default()).await.unwrap();
    wait_deleted(&pvs, &pv_name, WAIT).await.unwrap();
    assert!(!dir.exists(), "the PV object went but its directory stayed");
}

/// A Delete-policy claim deleted while a pod still mounts its volume (issue 19): the agent refuses the delete as
/// in use, so the PV stays, with its finalizer and one `VolumeInUse` event however often the delete is retried;
/// once the mount is gone (kubelet's bind mount of the volume's directory, made here as kubelet makes it), the
/// retried delete takes the volume and the PV.
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_still_mounted_keeps_its_pv_with_an_event_until_the_mount_goes() {
    use testbed::bind_mount::BindMount;
    let w = world(&[128 * MI]).await;
    let client = w.bed.client();
    add_class(&w, class("berth-now", "Immediate", "Delete", &[("pool", "fast")])).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    claims.create(&PostParams::default(), &claim("data", "berth-now", "8Mi")).await.unwrap();
    let pv_name = wait_for(&claims, "data", WAIT, bound).await.unwrap().spec.unwrap().volume_name.unwrap();
    let dir = volume_dir(&w, "node-0", &pv_name);
    std::fs::write(dir.join("data/db"), "precious").unwrap();
    let pod_dir = w.bed.dir().join("kubelet/pods/u1/volumes/kubernetes.io~local-volume").join(&pv_name);
    let pod = BindMount::new(&dir.join("data"), &pod_dir).unwrap();

    claims.delete("data", &DeleteParams::default()).await.unwrap();
    let note = wait_for_event(&w, &pv_name, "VolumeInUse", &pod_dir.display().to_string()).await;
    assert!(note.contains("delete the pods that use it"), "the event says what to do: {note}");
    // Retried (each a refusal by the agent), yet told once.
    let agent = &w.agents[0];
    let deadline = std::time::Instant::now() + WAIT;
    while agent_operations(agent, "delete", &pv_name, "InUse") < 3 {
        assert!(std::time::Instant::now() < deadline, "the delete was not retried: {}", agent.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let events: Api<Event> = Api::all(client.clone());
    let told: Vec<Event> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(pv_name.as_str()))
        .collect();
    let reasons: Vec<(Option<String>, Option<i32>)> = told.iter().map(|e| (e.reason.clone(), e.count)).collect();
    assert_eq!(told.len(), 1, "one event, not one per retry: {reasons:?}");
    assert!(told[0].count.unwrap_or(1) == 1 && told[0].type_.as_deref() == Some("Warning"), "{reasons:?}");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv = pvs.get(&pv_name).await.unwrap();
    assert!(released(&pv), "{:?}", pv.status);
    let finalizers = pv.metadata.finalizers.unwrap_or_default();
    assert!(finalizers.iter().any(|f| f == "external-provisioner.volume.kubernetes.io/finalizer"), "{finalizers:?}");
    assert_eq!(std::fs::read_to_string(pod_dir.join("db")).unwrap(), "precious", "the pod's data is untouched");

    // The pod is gone: the next retry deletes the volume, then the PV.
    pod.unmount().unwrap();
    wait_deleted(&pvs, &pv_name, WAIT).await.unwrap();
    assert!(!dir.exists(), "the PV went but its directory stayed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_released_volume_of_a_node_that_left_waits_or_is_forgotten_by_policy() {
    let mut w = world(&[256 * MI]).await;
    let client = w.bed.client();
    add_class(&w, class("berth-now", "Immediate", "Delete", &[("pool", "fast")])).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    claims.create(&PostParams::default(), &claim("data", "berth-now", "16Mi")).await.unwrap();
    let pv_name = wait_for(&claims, "data", WAIT, bound).await.unwrap().spec.unwrap().volume_name.unwrap();

    // The node leaves the cluster: its agent stops, its Node and BerthNode objects are deleted.
    w.agents[0].kill();
    Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .delete("node-0", &DeleteParams::default())
        .await
        .unwrap();
    Api::<berth::berth_node::BerthNode>::all(client.clone()).delete("node-0", &DeleteParams::default()).await.unwrap();
    claims.delete("data", &DeleteParams::default()).await.unwrap();

    // By default the PV waits for the node, and says so.
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let events: Api<Event> = Api::all(client.clone());
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let list = events.list(&ListParams::default()).await.unwrap().items;
        let said = list.iter().any(|e| {
            e.involved_object.name.as_deref() == Some(pv_name.as_str())
                && e.reason.as_deref() == Some("VolumeFailedDelete")
                && e.message.as_deref().is_some_and(|m| m.contains("no longer exists"))
        });
        if said {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no VolumeFailedDelete event on {pv_name}: {list:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(pvs.get_opt(&pv_name).await.unwrap().is_some(), "the PV waits for its node");

    // With --gone-node-volumes=forget the PV object goes.
    for c in &mut w.controllers {
        c.stop(Duration::from_secs(10));
    }
    let forget = ["--gone-node-volumes=forget"];
    w.controllers.push(w.bed.start_controller_named("forgetting", &controller_bin(), &forget, &[]).await.unwrap());
    wait_deleted(&pvs, &pv_name, WAIT).await.unwrap();
}
