//! The checked-in manifests are accepted by the real API server as they are, without warnings.

use testbed::bins::repo_root;
use testbed::{TestBed, TestBedConfig};

#[tokio::test(flavor = "multi_thread")]
async fn crds_apply_cleanly_and_berthnodes_are_served() {
    let bed = TestBed::start(TestBedConfig::nodes(0)).await.unwrap();
    let crds = repo_root().join("deploy/crds");
    let out = bed.kubectl(&["apply", "-f", crds.to_str().unwrap()]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("Warning"), "the API server warned: {stderr}");
    let out =
        bed.kubectl(&["wait", "--for=condition=Established", "crd/berthnodes.berth.dev", "--timeout=30s"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = bed.kubectl(&["get", "berthnodes"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
