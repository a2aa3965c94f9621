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
    create_claim(client, namespace, name, class, size, VolumeMode::Filesystem).await?;
    let write = "echo written-by-the-pod > /data/proof && cat /data/proof && grep -q written /data/proof";
    let pod = match life {
        PodLife::RunsOnce => PodUse::new(name, name, write),
        // `exec sleep`: the shell is gone, the sleeping PID 1 ignores SIGTERM, hence the short grace period.
        // An exec probe starts a process in the container each time, which costs a real node under emulation
        // dearly (every 2 s slowed all that followed: probes of other pods timed out), hence every 10 s, the
        // first after 2 s (by then the proof is written).
        PodLife::Stays => PodUse {
            stays: true,
            probe: serde_json::json!({
                "exec": {"command": ["grep", "-q", "written", "/data/proof"]},
                "initialDelaySeconds": 2,
                "periodSeconds": 10,
                "timeoutSeconds": 5,
            }),
            ..PodUse::new(name, name, &format!("{write} && exec sleep 2147483647"))
        },
    };
    run_pod(client, namespace, &pod).await?;
    bound_claim(client, namespace, name).await
}

/// A claim's volume mode: a filesystem mounted at the pod's /data, or the raw device at [`DEVICE_PATH`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeMode {
    Filesystem,
    Block,
}

/// Where a pod of [`PodUse`] sees a Block claim's device.
pub const DEVICE_PATH: &str = "/dev/berth-volume";

/// Creates claim `name` of `class` (`size`, e.g. "64Mi"; ReadWriteOnce).
pub async fn create_claim(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    class: &str,
    size: &str,
    mode: VolumeMode,
) -> Result<()> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let claim: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": class,
            "volumeMode": if mode == VolumeMode::Block { "Block" } else { "Filesystem" },
            "resources": {"requests": {"storage": size}},
        },
    }))?;
    claims.create(&PostParams::default(), &claim).await.with_context(|| format!("claim {name}"))?;
    Ok(())
}

/// Claim `name`, which must be Bound.
pub async fn bound_claim(client: &kube::Client, namespace: &str, name: &str) -> Result<PersistentVolumeClaim> {
    let bound = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace).get(name).await?;
    anyhow::ensure!(
        bound.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"),
        "claim {name} is not Bound: {:?}",
        bound.status
    );
    Ok(bound)
}

/// A busybox pod using one claim: its volume at /data (or, [`VolumeMode::Block`], its device at [`DEVICE_PATH`]),
/// running `command` under `sh -c`.
#[derive(Debug, Clone)]
pub struct PodUse {
    pub name: String,
    pub claim: String,
    pub command: String,
    pub mode: VolumeMode,
    /// The pod's securityContext (e.g. runAsUser and fsGroup); null for none.
    pub security: serde_json::Value,
    /// Whether the pod keeps running (restartPolicy Always; waited for until Ready) rather than exits
    /// (restartPolicy Never; waited for until Succeeded).
    pub stays: bool,
    /// The container's readiness probe; null for none (a staying pod is then Ready once started).
    pub probe: serde_json::Value,
}

impl PodUse {
    /// A pod that runs `command` once, as root, with `claim` at /data.
    pub fn new(name: &str, claim: &str, command: &str) -> PodUse {
        PodUse {
            name: name.into(),
            claim: claim.into(),
            command: command.into(),
            mode: VolumeMode::Filesystem,
            security: serde_json::Value::Null,
            stays: false,
            probe: serde_json::Value::Null,
        }
    }

    fn manifest(&self) -> serde_json::Value {
        let (mounts, devices) = match self.mode {
            VolumeMode::Filesystem => {
                (serde_json::json!([{"name": "data", "mountPath": "/data"}]), serde_json::Value::Null)
            }
            VolumeMode::Block => {
                (serde_json::Value::Null, serde_json::json!([{"name": "data", "devicePath": DEVICE_PATH}]))
            }
        };
        serde_json::json!({
            "metadata": {"name": self.name},
            "spec": {
                "restartPolicy": if self.stays { "Always" } else { "Never" },
                "terminationGracePeriodSeconds": 1,
                "securityContext": self.security,
                "containers": [{
                    "name": "main",
                    "image": BUSYBOX,
                    "imagePullPolicy": "Never",
                    "command": ["sh", "-c", self.command],
                    "readinessProbe": self.probe,
                    "volumeMounts": mounts,
                    "volumeDevices": devices,
                }],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": self.claim}}],
            },
        })
    }
}

/// Creates `pod` and waits until it has Succeeded (or, staying, is Ready); on anything else an error with the pod's
/// state, its events and its claim's status.
pub async fn run_pod(client: &kube::Client, namespace: &str, pod: &PodUse) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let name = pod.name.as_str();
    pods.create(&PostParams::default(), &serde_json::from_value(pod.manifest())?)
        .await
        .with_context(|| format!("pod {name}"))?;
    let phase = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
    let ready = |p: &Pod| {
        let conditions = p.status.as_ref().and_then(|s| s.conditions.as_ref());
        conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    };
    let done = tokio::time::timeout(
        Duration::from_secs(180),
        await_condition(pods.clone(), name, |p: Option<&Pod>| {
            p.is_some_and(|p| match pod.stays {
                false => matches!(phase(p).as_str(), "Succeeded" | "Failed"),
                true => ready(p) || phase(p) == "Failed",
            })
        }),
    )
    .await;
    let expected = if pod.stays { "Running" } else { "Succeeded" };
    match done {
        Ok(Ok(Some(p))) if phase(&p) == expected => Ok(p),
        outcome => {
            let seen = match outcome {
                Ok(Ok(Some(p))) => format!("{}: {:?}", phase(&p), p.status.and_then(|s| s.container_statuses)),
                Ok(Ok(None)) => "deleted".into(),
                Ok(Err(e)) => format!("watch failed: {e}"),
                Err(_) => "not done within 180 s".into(),
            };
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
            let claim = claims.get_opt(&pod.claim).await.ok().flatten().and_then(|c| c.status);
            anyhow::bail!(
                "pod {name} using claim {} is not {expected} ({seen}); its output:\n{}\nevents:\n{}\n{}\nclaim: {claim:?}",
                pod.claim,
                logs(client, namespace, name).await.unwrap_or_else(|e| e.to_string()),
                events_of(client, namespace, name).await,
                events_of(client, namespace, &pod.claim).await,
            );
        }
    }
}

/// What pod `name`'s container wrote (through the API server's way to the kubelet).
pub async fn logs(client: &kube::Client, namespace: &str, name: &str) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.logs(name, &Default::default()).await.with_context(|| format!("logs of pod {name}"))
}
