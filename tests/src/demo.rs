//! A claim and a pod that uses it, on a bed with a real node: the smallest proof that a Berth volume reaches a
//! container (kubelet mounts the PV, the pod writes and reads a file in it).

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, PostParams};

use kube::runtime::wait::await_condition;

use crate::kube_util::events_of;

/// The test image hack/build-image makes from Debian's busybox-static (imported into the node, never pulled).
pub const BUSYBOX: &str = "berth.test/busybox:dev";

/// What the pod of [`claim_and_pod`] does after writing its proof into the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodLife {
    /// Reads the proof back and exits: the claim is proven once the pod has Succeeded.
    RunsOnce,
    /// Stays Running (Ready once its proof is readable), for a cluster a person then looks at.
    Stays,
}

/// Creates claim `name` of `class` (`size`, e.g. "64Mi") and a pod that writes a file into it and reads it back,
/// and waits until the pod has Succeeded; returns the Bound claim.
pub async fn claim_used_by_a_pod(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    class: &str,
    size: &str,
) -> Result<PersistentVolumeClaim> {
    claim_and_pod(client, namespace, name, class, size, PodLife::RunsOnce).await
}

/// Creates claim `name` of `class` and a pod of the same name that writes a file into it, and waits until the pod
/// has Succeeded ([`PodLife::RunsOnce`]) or is Ready ([`PodLife::Stays`]); returns the Bound claim.
pub async fn claim_and_pod(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    class: &str,
    size: &str,
    life: PodLife,
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
    let write = "echo written-by-the-pod > /data/proof && cat /data/proof && grep -q written /data/proof";
    let (command, restart, probe) = match life {
        PodLife::RunsOnce => (write.to_owned(), "Never", serde_json::Value::Null),
        // `exec sleep`: the shell is gone, the sleeping PID 1 ignores SIGTERM, hence the short grace period.
        // An exec probe starts a process in the container each time, which costs a real node under emulation
        // dearly (every 2 s slowed all that followed: probes of other pods timed out), hence every 10 s, the
        // first after 2 s (by then the proof is written).
        PodLife::Stays => (
            format!("{write} && exec sleep 2147483647"),
            "Always",
            serde_json::json!({
                "exec": {"command": ["grep", "-q", "written", "/data/proof"]},
                "initialDelaySeconds": 2,
                "periodSeconds": 10,
                "timeoutSeconds": 5,
            }),
        ),
    };
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "writer",
                "image": BUSYBOX,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", command],
                "readinessProbe": probe,
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": name}}],
        },
    }))?;
    pods.create(&PostParams::default(), &pod).await.with_context(|| format!("pod {name}"))?;
    let phase = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
    let ready = |p: &Pod| {
        let conditions = p.status.as_ref().and_then(|s| s.conditions.as_ref());
        conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    };
    let done = tokio::time::timeout(
        Duration::from_secs(180),
        await_condition(pods.clone(), name, |p: Option<&Pod>| {
            p.is_some_and(|p| match life {
                PodLife::RunsOnce => matches!(phase(p).as_str(), "Succeeded" | "Failed"),
                PodLife::Stays => ready(p) || phase(p) == "Failed",
            })
        }),
    )
    .await;
    let expected = if life == PodLife::RunsOnce { "Succeeded" } else { "Running" };
    match done {
        Ok(Ok(Some(pod))) if phase(&pod) == expected => {}
        outcome => {
            let seen = match outcome {
                Ok(Ok(Some(pod))) => format!("{}: {:?}", phase(&pod), pod.status.and_then(|s| s.container_statuses)),
                Ok(Ok(None)) => "deleted".into(),
                Ok(Err(e)) => format!("watch failed: {e}"),
                Err(_) => "not done within 180 s".into(),
            };
            anyhow::bail!(
                "pod {name} using claim {name} ({class}) is not {expected} ({seen}); events:\n{}\n{}",
                events_of(client, namespace, name).await,
                claims
                    .get_opt(name)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|c| c.status)
                    .map(|s| format!("{s:?}"))
                    .unwrap_or_default()
            );
        }
    };
    let bound = claims.get(name).await?;
    anyhow::ensure!(
        bound.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"),
        "claim {name} is not Bound: {:?}",
        bound.status
    );
    Ok(bound)
}
