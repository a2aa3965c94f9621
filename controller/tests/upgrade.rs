//! An upgrade deletes nothing: the volumes and objects Berth as landed at commit 8ec81de left behind (recorded by
//! `fixtures/upgrade-8ec81de/record.sh` from that commit's own binaries: volume markers without the "unpublished"
//! mark, PVs without a published volume behind them, a claim without the node annotation) are put on a fresh bed,
//! and today's agent and controller, with an orphan audit that deletes, keep every one of them.
//!
//! What cannot be carried over is uids: the API server gives the re-created claims new ones, so each PV's
//! `claimRef.uid` is set to its claim's new uid (as a bound pair has), and the Released PV keeps the old one (its
//! claim is gone). The volumes keep their names (`pvc-<old uid>`), which is what the controller matches.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::Value;
use testbed::agents::PoolSpec;
use testbed::kube_util::{wait_deleted, wait_for};

const AUDITS: &str = "berth_controller_orphan_audits_total";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upgrade-8ec81de")
}

/// The recorded claims and PVs, with the recorded pool root.
struct Recorded {
    pool_root: String,
    claims: Vec<Value>,
    pvs: Vec<Value>,
}

fn recorded() -> Recorded {
    let text = std::fs::read_to_string(fixture().join("objects.json")).expect("the recorded objects");
    let mut all: Value = serde_json::from_str(&text).unwrap();
    let pool_root = all["poolRoot"].as_str().unwrap().to_owned();
    let items = std::mem::take(all["items"].as_array_mut().unwrap());
    let (pvs, claims) = items.into_iter().partition(|o| o["kind"] == "PersistentVolume");
    Recorded { pool_root, claims, pvs }
}

/// Copies the recorded volume directories into `root` as the old agent left them: the directory, its marker, and
/// the data directory with the owner and mode the marker names, holding the user's file.
fn restore_volumes(root: &Path) -> Vec<String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let mut names = Vec::new();
    for entry in std::fs::read_dir(fixture().join("pool")).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let from = entry.path();
        // The old agent kept nothing else there; if it had, the recording would show it and this copy would not
        // be the old state.
        let listing = std::fs::read_to_string(from.join("listing")).unwrap();
        assert_eq!(listing.split_whitespace().collect::<Vec<_>>(), ["data", "volume.json"], "{name}");
        let marker: Value = serde_json::from_str(&std::fs::read_to_string(from.join("volume.json")).unwrap()).unwrap();
        let dir = root.join(&name);
        std::fs::DirBuilder::new().mode(0o711).create(&dir).unwrap();
        std::fs::copy(from.join("volume.json"), dir.join("volume.json")).unwrap();
        let data = dir.join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::copy(from.join("data/precious.db"), data.join("precious.db")).unwrap();
        let id = |k: &str| marker[k].as_u64().unwrap() as u32;
        std::os::unix::fs::chown(&data, Some(id("uid")), Some(id("gid"))).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(id("mode"))).unwrap();
        names.push(name);
    }
    names.sort();
    names
}

fn claim_name(pv: &Value) -> &str {
    pv["spec"]["claimRef"]["name"].as_str().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_from_the_landed_version_deletes_nothing() {
    let mut w = world_with_pools(&[256 * MI], &[PoolSpec::new("local")]).await;
    let client = w.bed.client();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    add_class(&w, class("keep", "Immediate", "Retain", &[("pool", "local")])).await;
    add_class(&w, class("gone", "Immediate", "Delete", &[("pool", "local")])).await;

    // The node as the old agent left it; today's agent starts on it.
    let root = w.agents[0].pool_root("local").to_owned();
    w.agents[0].kill();
    let volumes = restore_volumes(&root);
    assert_eq!(volumes.len(), 4, "the recording has the four volumes of its scenario: {volumes:?}");
    w.agents[0].start().await.unwrap();

    // The objects as the old controller and kube-controller-manager left them: claims first (their uids are new),
    // then the PVs pointing into this bed's pool on this bed's node.
    let old = recorded();
    let hostname = w.bed.nodes()[0].hostname.clone();
    let mut uids = std::collections::BTreeMap::new();
    for c in &old.claims {
        let mut c: PersistentVolumeClaim = serde_json::from_value(c.clone()).unwrap();
        c.status = None;
        let made = claims.create(&PostParams::default(), &c).await.unwrap();
        uids.insert(made.metadata.name.unwrap(), made.metadata.uid.unwrap());
    }
    let mut released_pv = None;
    for pv in &old.pvs {
        let mut pv = pv.clone();
        let path = pv["spec"]["local"]["path"].as_str().unwrap().replace(&old.pool_root, &root.display().to_string());
        pv["spec"]["local"]["path"] = path.into();
        for term in pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"].as_array_mut().unwrap() {
            term["matchExpressions"][0]["values"] = serde_json::json!([hostname]);
        }
        match uids.get(claim_name(&pv)) {
            Some(uid) => pv["spec"]["claimRef"]["uid"] = uid.clone().into(),
            None => released_pv = Some(pv["metadata"]["name"].as_str().unwrap().to_owned()),
        }
        let mut pv: PersistentVolume = serde_json::from_value(pv).unwrap();
        pv.status = None;
        pvs.create(&PostParams::default(), &pv).await.unwrap();
    }
    let released_pv = released_pv.expect("the recording has a Released PV");
    for name in uids.keys() {
        wait_for(&claims, name, WAIT, bound).await.unwrap();
    }
    wait_for(&pvs, &released_pv, WAIT, released).await.unwrap();
    let with_pv: Vec<String> = old.pvs.iter().map(|p| p["metadata"]["name"].as_str().unwrap().to_owned()).collect();
    let reclaimed: Vec<&String> = volumes.iter().filter(|v| !with_pv.contains(v)).collect();
    assert_eq!(reclaimed.len(), 1, "the recording has one volume whose PV was deleted by hand: {volumes:?}");
    let reclaimed = reclaimed[0].clone();

    // Today's controller, its audit deleting orphans every second with a 3 s grace (the recorded volumes are far
    // older than that). Three audits later everything is there.
    let controller = w.bed.start_controller(&controller_bin(), &AUDIT_DELETES).await.unwrap();
    let done = wait_for_sample(&controller, AUDITS, 1.0).await;
    wait_for_sample(&controller, AUDITS, done + 3.0).await;
    for name in &volumes {
        let data = root.join(name).join("data/precious.db");
        let text = std::fs::read_to_string(&data).unwrap_or_else(|e| panic!("{}: {e}", data.display()));
        assert!(text.starts_with("the data of "), "{}: {text:?}", data.display());
    }
    for name in uids.keys() {
        assert!(bound(&claims.get(name).await.unwrap()), "{name} is no longer Bound");
    }
    assert!(released(&pvs.get(&released_pv).await.unwrap()), "{released_pv} is no longer Released");
    // The volume without a PV is reported as retained, not deleted.
    let note = wait_for_event(&w, "node-0", "RetainedVolume", &reclaimed).await;
    assert!(note.contains("its data is kept"), "{note}");
    assert!(!controller.log_text().contains("orphan volume deleted"), "{}", controller.log_text());

    // And the upgraded controller works on the old objects: a new claim is Bound, and the old Delete claim's
    // volume is freed when the claim goes.
    claims.create(&PostParams::default(), &claim("after", "keep", "16Mi")).await.unwrap();
    wait_for(&claims, "after", WAIT, bound).await.unwrap();
    let delete_pv = old.pvs.iter().find(|p| p["spec"]["persistentVolumeReclaimPolicy"] == "Delete").unwrap();
    let delete_pv_name = delete_pv["metadata"]["name"].as_str().unwrap().to_owned();
    claims.delete(claim_name(delete_pv), &DeleteParams::default()).await.unwrap();
    wait_deleted(&pvs, &delete_pv_name, WAIT).await.unwrap();
    assert!(!root.join(&delete_pv_name).exists(), "{delete_pv_name} was not freed");
    let left: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && n != &delete_pv_name)
        .collect();
    assert_eq!(left.len(), volumes.len(), "the three kept volumes and the new one: {left:?}");
    w.controllers.push(controller);
}
