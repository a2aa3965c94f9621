//! The CRD manifests in deploy/crds are generated from the Rust types; this test fails when they are stale.
//! Regenerate with `BERTH_UPDATE_CRDS=1 cargo test -p berth crd_manifests`.

use kube::CustomResourceExt;

use crate::berth_node::BerthNode;

#[test]
fn crd_manifests_match_the_rust_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/crds");
    let crd = BerthNode::crd();
    let path = dir.join(format!("{}.json", crd.metadata.name.as_deref().unwrap()));
    let generated = serde_json::to_string_pretty(&crd).unwrap() + "\n";
    if std::env::var_os("BERTH_UPDATE_CRDS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "{} is stale: regenerate with BERTH_UPDATE_CRDS=1 cargo test -p berth crd_manifests",
        path.display()
    );
}
