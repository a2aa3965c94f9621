//! Data a user asked to keep is never deleted by Berth: a Retain volume whose claim and PV are gone (the
//! documented manual reclaim), and one re-exposed through a static PV of another name, survive the orphan audit,
//! while the audit still removes a volume no PV was ever made for.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use k8s_openapi::api::core::v1::{
    LocalVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PersistentVolume,
    PersistentVolumeClaim, PersistentVolumeSpec, VolumeNodeAffinity,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use testbed::kube_util::{wait_deleted, wait_for};

const AUDITS: &str = "berth_controller_orphan_audits_total";

/// A claim of `class` made Bound, a file written into its volume, the claim deleted, then (as an administrator
/// reclaiming it by hand) its Released PV deleted. The volume's data directory.
async fn kept_by_hand(w: &World, name: &str) -> std::path::PathBuf {
    let client = w.bed.client();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    let pvs: Api<PersistentVolume> = Api::all(client);
    claims.create(&PostParams::default(), &claim(name, "berth-keep", "16Mi")).await.unwrap();
    let pv = wait_for(&claims, name, WAIT, bound).await.unwrap().spec.unwrap().volume_name.unwrap();
    let data = Path::new(&pvs.get(&pv).await.unwrap().spec.unwrap().local.unwrap().path).to_owned();
    std::fs::write(data.join("precious.db"), format!("the data of {name}")).unwrap();
    claims.delete(name, &DeleteParams::default()).await.unwrap();
    wait_for(&pvs, &pv, WAIT, released).await.unwrap();
    pvs.delete(&pv, &DeleteParams::default()).await.unwrap();
    wait_deleted(&pvs, &pv, WAIT).await.unwrap();
    data
}

/// A PV an administrator writes to give `data` to a new claim: another name, the same path, pinned to `host`.
fn static_pv(name: &str, data: &Path, host: &str) -> PersistentVolume {
    PersistentVolume {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        spec: Some(PersistentVolumeSpec {
            capacity: Some(BTreeMap::from([("storage".into(), Quantity("16Mi".into()))])),
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            persistent_volume_reclaim_policy: Some("Retain".into()),
            storage_class_name: Some(String::new()),
            local: Some(LocalVolumeSource { path: data.display().to_string(), fs_type: None }),
            node_affinity: Some(VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: "kubernetes.io/hostname".into(),
                            operator: "In".into(),
                            values: Some(vec![host.into()]),
                        }]),
                        match_fields: None,
                    }],
                }),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retained_data_outlives_its_pv_while_the_audit_removes_what_was_never_published() {
    let mut w = world_without_controller(&[256 * MI]).await;
    let client = w.bed.client();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    add_class(&w, class("berth-keep", "Immediate", "Retain", &[("pool", "fast")])).await;
    add_class(&w, class("berth-now", "Immediate", "Delete", &[("pool", "fast")])).await;

    // The control: a controller aborts after the agent made a volume, before its PV; the claim is then deleted.
    // Nothing was ever published for that volume: the audit exists for it.
    let mut crashing =
        start_with_failpoints(&w, "controller", &AUDIT_REPORTS, "provision-after-agent-create=return").await;
    let aborted = claims.create(&PostParams::default(), &claim("aborted", "berth-now", "16Mi")).await.unwrap();
    let aborted = format!("pvc-{}", aborted.metadata.uid.unwrap());
    crashing.wait_exit(WAIT).expect("aborted after the agent's create");
    claims.delete("aborted", &DeleteParams::default()).await.unwrap();
    wait_deleted(&claims, "aborted", WAIT).await.unwrap();
    assert_eq!(all_volume_dirs(&w), vec![format!("node-0/{aborted}")]);

    // Two Retain volumes reclaimed by hand; the second one's data is given to a new claim through a static PV.
    let controller = w.bed.start_controller_named("controller", &controller_bin(), &AUDIT_DELETES, &[]).await.unwrap();
    let reclaimed = kept_by_hand(&w, "reclaimed").await;
    let reused = kept_by_hand(&w, "reused").await;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    pvs.create(&PostParams::default(), &static_pv("restored", &reused, &w.bed.nodes()[0].hostname)).await.unwrap();
    let mut new_claim = claim("restored", "", "16Mi");
    new_claim.spec.as_mut().unwrap().volume_name = Some("restored".into());
    claims.create(&PostParams::default(), &new_claim).await.unwrap();
    wait_for(&claims, "restored", WAIT, bound).await.unwrap();

    // The audit runs every second with a 3 s grace: the control volume goes...
    let control = w.agents[0].pool_root("fast").join(&aborted);
    let deadline = std::time::Instant::now() + WAIT;
    while control.exists() {
        assert!(std::time::Instant::now() < deadline, "the never-published volume {aborted} was not removed");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    wait_for_log(&controller, &["orphan volume deleted", &aborted], WAIT).await;
    // ...and three audits later, every one past the kept volumes' grace, their data is all there.
    let done = sample(&metrics_of(&controller).await, AUDITS);
    wait_for_sample(&controller, AUDITS, done + 3.0).await;
    for (data, name) in [(&reclaimed, "reclaimed"), (&reused, "reused")] {
        let text = std::fs::read_to_string(data.join("precious.db"));
        assert_eq!(text.ok().as_deref(), Some(format!("the data of {name}").as_str()), "{}", data.display());
    }
    let kept: Vec<String> = all_volume_dirs(&w);
    assert_eq!(kept.len(), 2, "{kept:?}");

    // The one without any PV is reported, on its node and in the metrics; the one a PV uses is not.
    let volume_of = |data: &Path| data.parent().unwrap().file_name().unwrap().to_string_lossy().into_owned();
    let note = wait_for_event(&w, "node-0", "RetainedVolume", &volume_of(&reclaimed)).await;
    assert!(note.contains("app/reclaimed") && note.contains("its data is kept"), "{note}");
    let reports = event_messages(&w, "node-0", "RetainedVolume").await;
    assert!(!reports.iter().any(|m| m.contains(&volume_of(&reused))), "{reports:?}");
    let metrics = metrics_of(&controller).await;
    assert_eq!(sample(&metrics, r#"berth_controller_retained_volumes{node="node-0",pool="fast"}"#), 1.0, "{metrics}");
    assert_eq!(sample(&metrics, r#"berth_controller_orphan_volumes{node="node-0",pool="fast"}"#), 0.0);
    w.controllers.push(controller);
}

/// A volume lost outside Berth (its directory removed while the agent was down: a disk replaced, an
/// administrator's `rm -rf`) is reported on its PV as `VolumeMissing` and in `berth_controller_missing_volumes`;
/// the PV and its claim are left as they are (docs/events.md: what to do is the operator's call).
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_lost_outside_berth_is_reported_on_its_pv_which_is_kept() {
    let mut w = world(&[256 * MI]).await;
    let client = w.bed.client();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    add_class(&w, class("berth-keep", "Immediate", "Retain", &[("pool", "fast")])).await;
    claims.create(&PostParams::default(), &claim("lost", "berth-keep", "16Mi")).await.unwrap();
    let pv = wait_for(&claims, "lost", WAIT, bound).await.unwrap().spec.unwrap().volume_name.unwrap();

    // The control: audits that see the volume report nothing.
    let controller = &w.controllers[0];
    let audits = sample(&metrics_of(controller).await, AUDITS);
    wait_for_sample(controller, AUDITS, audits + 2.0).await;
    assert!(event_messages(&w, &pv, "VolumeMissing").await.is_empty(), "reported while it was there");
    assert_eq!(sample(&metrics_of(controller).await, "berth_controller_missing_volumes"), 0.0);

    w.agents[0].terminate(WAIT);
    let dir = w.agents[0].pool_root("fast").join(&pv);
    std::fs::remove_dir_all(&dir).unwrap();
    w.agents[0].start().await.unwrap();

    let note = wait_for_event(&w, &pv, "VolumeMissing", "has no volume").await;
    assert!(note.contains("node-0") && note.contains(&pv), "{note}");
    wait_for_sample(&w.controllers[0], "berth_controller_missing_volumes", 1.0).await;
    assert!(pvs.get_opt(&pv).await.unwrap().is_some(), "the PV of a missing volume was removed");
    wait_for(&claims, "lost", WAIT, bound).await.expect("the claim stays Bound");
    assert!(!dir.exists(), "something made the lost volume again");
}
