//! A claim and a pod that uses it, on a bed with a real node: the smallest proof that a Berth volume reaches a
//! container (kubelet mounts the PV, the pod writes and reads a file in it).

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, PostParams};

use crate::kube_util::wait_for;

/// The test image hack/build-image makes from Debian's busybox-static (imported into the node, never pulled).
pub const BUSYBOX: &str = "berth.test/busybox:dev";

/// Creates claim `name` of `class` (`size`, e.g. "64Mi") and a pod that writes a file into it and reads it back,
/// and waits until the pod has Succeeded; returns the Bound claim.
pub async fn claim_used_by_a_pod(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    class: &str,
    size: &str,
) -> Result<PersistentVolumeClaim> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let claim: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": class,
            "resources": {"requests": {"storage": size}},
        },
    }))?;
    claims.create(&PostParams::default(), &claim).await.with_context(|| format!("claim {name}"))?;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "writer",
                "image": BUSYBOX,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", "echo written-by-the-pod > /data/proof && cat /data/proof && grep -q written /data/proof"],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": name}}],
        },
    }))?;
    pods.create(&PostParams::default(), &pod).await.with_context(|| format!("pod {name}"))?;
    let phase = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
    let done = wait_for(&pods, name, Duration::from_secs(180), |p| matches!(phase(p).as_str(), "Succeeded" | "Failed"))
        .await
        .with_context(|| format!("pod {name} using claim {name} ({class})"))?;
    anyhow::ensure!(phase(&done) == "Succeeded", "pod {name} failed: {:#?}", done.status);
    let bound = claims.get(name).await?;
    anyhow::ensure!(
        bound.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"),
        "claim {name} is not Bound: {:?}",
        bound.status
    );
    Ok(bound)
}
