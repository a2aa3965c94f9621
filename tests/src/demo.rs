//! A claim and a pod that uses it, on a bed with a real node: the smallest proof that a Berth volume reaches a
//! container (kubelet mounts the PV, the pod writes and reads a file in it).

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, PostParams};

use kube::runtime::wait::await_condition;

use crate::TestBed;
use crate::kube_util::events_of;

/// The test image hack/build-image makes from Debian's busybox-static (imported into the node, never pulled).
pub const BUSYBOX: &str = "berth.test/busybox:dev";

/// What a pod of [`wait_pod`] is expected to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodLife {
    /// Runs to completion: waited for until Succeeded.
    RunsOnce,
    /// Keeps running: waited for until Ready.
    Stays,
}

/// Creates claim `name` of `class` (`size`, e.g. "64Mi") and a pod of the same name that writes a file into it and
/// reads it back, and waits until the pod has Succeeded; returns the Bound claim.
pub async fn claim_used_by_a_pod(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    class: &str,
    size: &str,
) -> Result<PersistentVolumeClaim> {
    create_claim(client, namespace, name, class, size, VolumeMode::Filesystem).await?;
    let write = "echo written-by-the-pod > /data/proof && cat /data/proof && grep -q written /data/proof";
    run_pod(client, namespace, &PodUse::new(name, name, write)).await?;
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

/// The node path of claim `name`'s PV (a `local` PV: the volume's directory, or an LV's mount or device); the claim
/// must be Bound.
pub async fn local_path(client: &kube::Client, namespace: &str, name: &str) -> Result<String> {
    let claim = bound_claim(client, namespace, name).await?;
    let volume = claim.spec.and_then(|s| s.volume_name).context("a Bound claim without a volume")?;
    let pv = Api::<PersistentVolume>::all(client.clone()).get(&volume).await?;
    Ok(pv.spec.and_then(|s| s.local).with_context(|| format!("{volume} is not a local PV"))?.path)
}

/// A pod (busybox unless told otherwise) using one claim: its volume at /data (or, [`VolumeMode::Block`], its device at [`DEVICE_PATH`]),
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
    /// The container's image (imported into the node): [`BUSYBOX`] unless a test needs another program.
    pub image: String,
    /// Whether the pod runs in the node's user namespace (the default); false is `hostUsers: false`, and then the
    /// pod also has no service-account token: the node's kernel (6.1) cannot idmap the tmpfs it is on (6.3 can).
    pub host_users: bool,
    /// Instead of the claim, an emptyDir at /data (the baseline of the cost-of-use benchmark); `claim` is then only
    /// named in failure messages.
    pub empty_dir: bool,
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
            image: BUSYBOX.into(),
            host_users: true,
            empty_dir: false,
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
        let user_namespace = |v: serde_json::Value| if self.host_users { serde_json::Value::Null } else { v };
        serde_json::json!({
            "metadata": {"name": self.name},
            "spec": {
                "hostUsers": user_namespace(false.into()),
                "automountServiceAccountToken": user_namespace(false.into()),
                "restartPolicy": if self.stays { "Always" } else { "Never" },
                "terminationGracePeriodSeconds": 1,
                "securityContext": self.security,
                "containers": [{
                    "name": "main",
                    "image": self.image,
                    "imagePullPolicy": "Never",
                    "command": ["sh", "-c", self.command],
                    "readinessProbe": self.probe,
                    "volumeMounts": mounts,
                    "volumeDevices": devices,
                }],
                "volumes": [if self.empty_dir {
                    serde_json::json!({"name": "data", "emptyDir": {}})
                } else {
                    serde_json::json!({"name": "data", "persistentVolumeClaim": {"claimName": self.claim}})
                }],
            },
        })
    }
}

/// Creates `pod` and waits until it has Succeeded (or, staying, is Ready); on anything else an error with the pod's
/// state, its events and its claim's status.
pub async fn run_pod(client: &kube::Client, namespace: &str, pod: &PodUse) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.create(&PostParams::default(), &serde_json::from_value(pod.manifest())?)
        .await
        .with_context(|| format!("pod {}", pod.name))?;
    let life = if pod.stays { PodLife::Stays } else { PodLife::RunsOnce };
    wait_pod(client, namespace, &pod.name, &pod.claim, life).await
}

/// Waits until pod `name` (using `claim`) has Succeeded ([`PodLife::RunsOnce`]) or is Ready ([`PodLife::Stays`]);
/// on anything else, or after 180 s, an error with the pod's state, output and events and its claim's status.
pub async fn wait_pod(client: &kube::Client, namespace: &str, name: &str, claim: &str, life: PodLife) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let stays = life == PodLife::Stays;
    let phase = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
    let ready = crate::kube_util::pod_is_ready;
    let done = tokio::time::timeout(
        Duration::from_secs(180),
        await_condition(pods.clone(), name, |p: Option<&Pod>| {
            p.is_some_and(|p| match stays {
                false => matches!(phase(p).as_str(), "Succeeded" | "Failed"),
                true => ready(p) || phase(p) == "Failed",
            })
        }),
    )
    .await;
    let expected = if stays { "Running" } else { "Succeeded" };
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
            let status = claims.get_opt(claim).await.ok().flatten().and_then(|c| c.status);
            anyhow::bail!(
                "pod {name} using claim {claim} is not {expected} ({seen}); its output:\n{}\nevents:\n{}\n{}\nclaim: {status:?}",
                logs(client, namespace, name).await.unwrap_or_else(|e| e.to_string()),
                events_of(client, namespace, name).await,
                events_of(client, namespace, claim).await,
            );
        }
    }
}

/// Pod `name`'s output once `done` says it is complete, polled for up to 60 s: a pod is Ready once its container
/// runs, and what the container prints reaches its log file a moment later (seen: an empty log of a Ready pod).
pub async fn logs_when(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    done: impl Fn(&str) -> bool,
) -> Result<String> {
    let until = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = logs(client, namespace, name).await?;
        if done(&out) {
            return Ok(out);
        }
        anyhow::ensure!(std::time::Instant::now() < until, "pod {name}'s output after 60 s is still:\n{out}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What pod `name`'s container wrote (through the API server's way to the kubelet).
pub async fn logs(client: &kube::Client, namespace: &str, name: &str) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.logs(name, &Default::default()).await.with_context(|| format!("logs of pod {name}"))
}

/// The demo StatefulSet of the real node (tests/deploy/demo/statefulset.yaml): one replica, `demo-0`, whose claim
/// `data-demo-0` of berth-local gets a line in /data/starts at every start of its pod.
pub const DEMO_MANIFEST: &str = "tests/deploy/demo/statefulset.yaml";
pub const DEMO_POD: &str = "demo-0";
pub const DEMO_CLAIM: &str = "data-demo-0";

/// Applies the demo StatefulSet in `namespace` and waits until `demo-0` is Ready; returns what it printed (the
/// starts its volume has seen).
pub async fn demo_statefulset(bed: &TestBed, namespace: &str) -> Result<String> {
    let manifest = crate::bins::repo_root().join(DEMO_MANIFEST);
    crate::deploy::kubectl(bed, &["-n", namespace, "apply", "-f", &manifest.display().to_string()])?;
    // The StatefulSet controller creates the pod a moment later: wait_pod's watch waits for it to appear.
    wait_pod(&bed.client(), namespace, DEMO_POD, DEMO_CLAIM, PodLife::Stays).await?;
    logs_when(&bed.client(), namespace, DEMO_POD, |out| !out.is_empty()).await
}
