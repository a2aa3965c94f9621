//! Berth on a real node, exactly as deploy/ installs it: kubelet and containerd in a qemu guest (tests/src/real_node),
//! the image hack/build-image makes, `kubectl apply -k` of deploy/ through the image overlay tests/deploy/real-node,
//! the in-cluster tokens kubelet projects, pools prepared with `kubectl exec … berth-agent init-pool`.
//! One boot serves every phase: three installs, each a DaemonSet roll (hack/test-vm runs it; about half a minute of
//! it is the node becoming Ready). Each install also serves a part of a volume's life after "Bound" (docs/real-node.md).

use std::time::{Duration, Instant};

use berth::berth_node::BerthNode;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams};
use testbed::demo::{
    DEVICE_PATH, PodLife, PodUse, VolumeMode, bound_claim, claim_and_pod, claim_used_by_a_pod, create_claim, logs,
    run_pod,
};
use testbed::deploy::{self, Install, NAMESPACE};
use testbed::kube_util::create_namespace;
use testbed::on_node::{agent_sh, metric_capacity, poll, summary_capacity};
use testbed::{TestBed, TestBedConfig};

const POOL_TIMEOUT: Duration = Duration::from_secs(120);

/// The agent configuration of every phase: deploy/agent/agent.toml as shipped (its pool `local`), an XFS pool on
/// the disk the node mounted with prjquota and (lvm phase) an lvm pool on the node's volume group `berth`, as an
/// operator extends it. The container has no udev: lvm2 is told so by the image's /etc/lvm/lvmlocal.conf.
fn agent_toml(lvm: bool) -> String {
    let shipped = testbed::bins::repo_root().join("deploy/agent/agent.toml");
    let mut toml = std::fs::read_to_string(&shipped).expect("deploy/agent/agent.toml");
    toml.push_str("\n[[pool]]\nname = \"quota\"\nbackend = \"hostpath\"\nroot = \"/var/lib/berth/pools/quota\"\n");
    if lvm {
        toml.push_str(
            "\n[[pool]]\nname = \"lvm\"\nbackend = \"lvm\"\nroot = \"/var/lib/berth/pools/lvm\"\nvolume-group = \"berth\"\n",
        );
    }
    toml
}

fn storage_class(name: &str, pool: &str, extra: &str) -> String {
    format!(
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: {name}\nprovisioner: local.berth.dev\n\
         volumeBindingMode: WaitForFirstConsumer\nreclaimPolicy: Delete\nparameters:\n  pool: {pool}\n{extra}"
    )
}

fn phase(name: &str, started: Instant) {
    println!("=== real node: {name} done at {:.0} s", started.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread")]
async fn berth_runs_on_a_real_node_as_deploy_installs_it() {
    let started = Instant::now();
    let bed = TestBed::start(TestBedConfig::real_node()).await.unwrap();
    let node = bed.real_node().expect("a real node").spec.clone();
    let client = bed.client();
    phase("node Ready", started);
    let work = bed.dir().join("install");

    // 1. deploy/ with the operator's agent configuration (deploy/agent/agent.toml as shipped, plus an XFS pool):
    //    the agent and both controller replicas run on the node with the tokens kubelet projects; the agent
    //    publishes the node's BerthNode; a claim of berth-local is Bound and used by a pod. The quota pool, without
    //    deploy/quota, is ready but may not use project quotas under the shipped capabilities and RuntimeDefault
    //    seccomp, and says so; a create there still succeeds (no size limit).
    deploy::apply(&bed, &Install { components: vec![], agent_toml: Some(agent_toml(false)) }, &work.join("base"))
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let ours = pods.list(&ListParams::default().labels("app.kubernetes.io/part-of=berth")).await.unwrap().items;
    assert_eq!(ours.len(), 3, "one agent and two controller pods: {}", deploy::describe_pods(&bed));
    for pod in &ours {
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(
            spec.node_name.as_deref(),
            Some(node.name.as_str()),
            "{:?} is not on the real node",
            pod.metadata.name
        );
        // The in-cluster path: the ServiceAccount admission plugin adds the projected token kubelet refreshes.
        let projected = spec.volumes.iter().flatten().filter_map(|v| v.projected.as_ref());
        let token = projected.flat_map(|p| p.sources.iter().flatten()).any(|s| s.service_account_token.is_some());
        assert!(token, "{:?} has no projected service-account token", pod.metadata.name);
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let holder = testbed::kube_util::wait_for(&leases, "local.berth.dev", Duration::from_secs(60), |l| {
        l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()).is_some_and(|h| h.starts_with("berth-controller-"))
    })
    .await
    .unwrap();
    println!("the controller pod {:?} leads", holder.spec.unwrap().holder_identity);
    let bn = testbed::kube_util::wait_for(&Api::<BerthNode>::all(client.clone()), &node.name, POOL_TIMEOUT, |_| true)
        .await
        .unwrap();
    assert!(
        bn.status.as_ref().is_some_and(|s| s.endpoint.contains("10.244.")),
        "the agent advertises its pod IP: {bn:?}"
    );
    for pool in ["local", "quota"] {
        let out = deploy::init_pool(&bed, &node.name, pool).await.unwrap();
        println!("init-pool {pool}: {}", out.trim());
    }
    deploy::wait_pool(&client, &node.name, "local", POOL_TIMEOUT, |p| p.ready).await.unwrap();
    let pool = deploy::wait_pool(&client, &node.name, "quota", POOL_TIMEOUT, |p| p.ready).await.unwrap();
    assert_eq!(pool.enforcement, "none", "{pool:?}");
    let reason = pool.enforcement_reason.clone().unwrap_or_default();
    assert!(reason.contains("deploy/quota"), "the pool says why and what grants it: {pool:?}");
    deploy::kubectl(&bed, &["apply", "-k", &testbed::bins::repo_root().join("deploy/examples").display().to_string()])
        .unwrap();
    deploy::kubectl_apply_text(&bed, &storage_class("berth-quota", "quota", "")).unwrap();
    deploy::kubectl_apply_text(&bed, &storage_class("berth-owned", "local", OWNED_CLASS)).unwrap();
    create_namespace(&client, "apps").await.unwrap();
    // The claims at once (each pod's start under emulation is most of its time). local-data's pod stays
    // (hack/up --real-node's demo): Ready once it reads back what it wrote into the volume.
    let (claim, _, _) = tokio::try_join!(
        claim_and_pod(&client, "apps", "local-data", "berth-local", "64Mi", PodLife::Stays),
        claim_used_by_a_pod(&client, "apps", "quota-unenforced", "berth-quota", "64Mi"),
        written_by_a_non_root_pod(&client),
    )
    .unwrap();
    let pv_name = claim.spec.unwrap().volume_name.unwrap();
    let pv = Api::<PersistentVolume>::all(client.clone()).get(&pv_name).await.unwrap();
    let affinity = serde_json::to_string(&pv.spec.unwrap().node_affinity).unwrap();
    assert!(affinity.contains(&node.hostname), "the PV is pinned to the node's hostname label: {affinity}");
    phase("deploy/: agent, controller, claims used by pods; the quota pool says why it enforces nothing", started);

    // The directory volume as kubelet left it (fsGroup applied), and its life after the first pod.
    directory_volume_on_the_node(&bed, &node.name, &node.hostname).await;
    phase(
        "a directory volume: owner, fsGroup, the writer's file on the node; a new pod sees it; deleted with its claim",
        started,
    );

    // 2. With deploy/quota the same pool enforces project quotas from the shipped image.
    deploy::apply(
        &bed,
        &Install { components: vec!["quota"], agent_toml: Some(agent_toml(false)) },
        &work.join("quota-on"),
    )
    .unwrap();
    let pool = deploy::wait_pool(&client, &node.name, "quota", POOL_TIMEOUT, |p| p.ready && p.enforcement == "quota")
        .await
        .unwrap();
    assert_eq!(pool.enforcement_reason, None, "{pool:?}");
    quota_seen_by_a_pod_and_kubelet(&bed, &node.name).await;
    phase(
        "deploy/quota: enforcement quota; a pod writing past its claim gets ENOSPC; kubelet reports the claim's size",
        started,
    );

    // 3. deploy/lvm (privileged, Bidirectional propagation, the host's /dev): the lvm pool on the node's volume
    //    group is ready and a claim of berth-lvm (xfs, deploy/examples) is used by a pod.
    let install = Install { components: vec!["quota", "lvm"], agent_toml: Some(agent_toml(true)) };
    deploy::apply(&bed, &install, &work.join("lvm")).unwrap();
    let out = deploy::init_pool(&bed, &node.name, "lvm").await.unwrap();
    println!("init-pool lvm: {}", out.trim());
    let pool = deploy::wait_pool(&client, &node.name, "lvm", POOL_TIMEOUT, |p| p.ready).await.unwrap();
    assert_eq!(pool.enforcement, "device", "{pool:?}");
    lvm_volumes_in_pods(&bed, &node.name).await;
    phase("deploy/lvm: the lvm pool ready; an xfs volume mounted into a pod, a Block volume written and read", started);
    println!("=== real node: the events of the run\n{}", deploy::timeline(&bed));
}

/// berth-owned: a directory class with an owner (deploy/examples' berth-local has root's).
const OWNED_CLASS: &str = "  uid: \"1000\"\n  gid: \"1000\"\n  mode: \"0770\"\n";
/// The uid the pods of berth-owned run as, and their fsGroup.
const WRITER_UID: u32 = 1000;
const FS_GROUP: u32 = 3000;

fn non_root() -> serde_json::Value {
    serde_json::json!({"runAsUser": WRITER_UID, "runAsGroup": WRITER_UID, "runAsNonRoot": true, "fsGroup": FS_GROUP})
}

/// Claim `owned` of berth-owned written by a pod running as uid 1000 with fsGroup 3000, which prints who it is and
/// what `df` says of /data.
async fn written_by_a_non_root_pod(client: &kube::Client) -> anyhow::Result<()> {
    create_claim(client, "apps", "owned", "berth-owned", "64Mi", VolumeMode::Filesystem).await?;
    let write = "id && df -P /data && echo hello-from-the-writer > /data/proof && ls -ln /data";
    run_pod(client, "apps", &PodUse { security: non_root(), ..PodUse::new("owned-writer", "owned", write) }).await?;
    let out = logs(client, "apps", "owned-writer").await?;
    anyhow::ensure!(out.contains(&format!("uid={WRITER_UID}")), "the writer is not uid {WRITER_UID}:\n{out}");
    anyhow::ensure!(out.lines().any(|l| l.ends_with(" /data")), "df in the pod shows no volume at /data:\n{out}");
    Ok(())
}

/// The volume of claim `owned` on the node (its directory and the writer's file, seen from the agent's pod), its
/// PV as `kubectl describe` shows it, a second pod on the same claim reading the file, and the claim's deletion
/// taking the PV and the directory with it.
async fn directory_volume_on_the_node(bed: &TestBed, node: &str, hostname: &str) {
    let client = bed.client();
    let claim = bound_claim(&client, "apps", "owned").await.unwrap();
    let pv_name = claim.spec.unwrap().volume_name.unwrap();
    let pvs = Api::<PersistentVolume>::all(client.clone());
    let pv = pvs.get(&pv_name).await.unwrap();
    let path = pv.spec.as_ref().unwrap().local.as_ref().expect("a local PV").path.clone();
    let stat = agent_sh(bed, node, &format!("stat -c '%u %g %a' '{path}' '{path}/proof'")).await.unwrap();
    let lines: Vec<&str> = stat.lines().collect();
    println!("on the node: {path}: {stat:?}");
    // The directory: the class's owner, the pod's fsGroup as its group with setgid (kubelet's fsGroup ownership
    // for `local` PVs), group rwx; the file: the writer's, the group inherited through setgid.
    let dir: Vec<&str> = lines[0].split(' ').collect();
    assert_eq!(&dir[..2], &["1000", "3000"], "the volume's directory owner:group: {stat}");
    let mode = u32::from_str_radix(dir[2], 8).unwrap();
    assert_eq!(mode & 0o2070, 0o2070, "the directory has setgid and group rwx: {stat}");
    assert_eq!(lines[1].split(' ').take(2).collect::<Vec<_>>(), ["1000", "3000"], "the writer's file: {stat}");
    let described = deploy::kubectl(bed, &["describe", "pv", &pv_name]).unwrap();
    assert!(
        described.contains("Node Affinity:") && described.contains(hostname),
        "kubectl describe pv shows where the data lives:\n{described}"
    );

    // Restart: the pod gone, a new one on the same claim sees the file.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "apps");
    pods.delete("owned-writer", &Default::default()).await.unwrap();
    testbed::kube_util::wait_deleted(&pods, "owned-writer", Duration::from_secs(60)).await.unwrap();
    let reader = PodUse { security: non_root(), ..PodUse::new("owned-reader", "owned", "cat /data/proof") };
    run_pod(&client, "apps", &reader).await.unwrap();
    assert_eq!(logs(&client, "apps", "owned-reader").await.unwrap().trim(), "hello-from-the-writer");

    // The claim deleted (reclaimPolicy Delete): the PV and the directory go.
    pods.delete("owned-reader", &Default::default()).await.unwrap();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "apps");
    claims.delete("owned", &Default::default()).await.unwrap();
    testbed::kube_util::wait_deleted(&pvs, &pv_name, Duration::from_secs(90)).await.unwrap();
    let left =
        agent_sh(bed, node, &format!("if [ -e '{path}' ]; then echo present; else echo gone; fi")).await.unwrap();
    assert_eq!(left.trim(), "gone", "{path} outlived its PV");
}

/// A pod writing past its 64Mi claim on the quota pool gets ENOSPC; kubelet reports the claim's size as the
/// volume's capacity (statfs of a project-quota directory), in /stats/summary and kubelet_volume_stats_*.
async fn quota_seen_by_a_pod_and_kubelet(bed: &TestBed, node: &str) {
    let client = bed.client();
    create_claim(&client, "apps", "quota-full", "berth-quota", "64Mi", VolumeMode::Filesystem).await.unwrap();
    // Stays running (its volume's stats are a running pod's), the dd's outcome in its output.
    let fill = "dd if=/dev/zero of=/data/fill bs=1M count=100; echo \"dd exit $?\"; df -P /data; exec sleep 2147483647";
    run_pod(&client, "apps", &PodUse { stays: true, ..PodUse::new("quota-full", "quota-full", fill) }).await.unwrap();
    let out = poll("the filling pod's outcome", Duration::from_secs(60), || {
        let out = deploy::kubectl(bed, &["-n", "apps", "logs", "quota-full"])?;
        Ok(out.contains("dd exit").then_some(out))
    })
    .await
    .unwrap();
    println!("the filling pod:\n{out}");
    assert!(out.contains("No space left on device"), "writing past the claim's size is refused with ENOSPC:\n{out}");
    assert!(!out.contains("dd exit 0"), "dd reports the failure:\n{out}");
    // The project's limit is the claim's size plus 64 KiB for Berth's own files in the volume (docs/storageclass.md,
    // "a pod can write its whole size"), and XFS answers statfs of the directory with that limit.
    const SIZE: u64 = (64 << 20) + (64 << 10);
    let stats = poll("the volume in kubelet's /stats/summary", Duration::from_secs(60), || {
        summary_capacity(bed, node, "apps", "quota-full", "data")
    })
    .await
    .unwrap();
    assert_eq!(stats, SIZE, "kubelet's /stats/summary capacity of the volume is its claim's size (plus the allowance)");
    let metric = poll("kubelet_volume_stats_capacity_bytes of quota-full", Duration::from_secs(60), || {
        metric_capacity(bed, node, "apps", "quota-full")
    })
    .await
    .unwrap();
    assert_eq!(metric, SIZE as f64, "kubelet_volume_stats_capacity_bytes is the claim's size (plus the allowance)");
}

/// The xfs volume the agent mounted inside its container is what the pod sees (Bidirectional propagation to the
/// host, where kubelet bind-mounts it), and a Block claim's device takes a pattern that reaches the logical volume.
async fn lvm_volumes_in_pods(bed: &TestBed, node: &str) {
    let client = bed.client();
    // 320Mi: berth-lvm makes xfs, and mkfs.xfs refuses less than 300 MB (the agent says so, 4xx).
    let mounted = async {
        create_claim(&client, "apps", "lvm-data", "berth-lvm", "320Mi", VolumeMode::Filesystem).await?;
        let show = "grep ' /data ' /proc/mounts && echo written > /data/proof && cat /data/proof";
        run_pod(&client, "apps", &PodUse::new("lvm-data", "lvm-data", show)).await?;
        logs(&client, "apps", "lvm-data").await
    };
    const PATTERN: &str = "berth-block-pattern";
    let block = async {
        create_claim(&client, "apps", "lvm-block", "berth-lvm", "64Mi", VolumeMode::Block).await?;
        let rw = format!(
            "echo {PATTERN} | dd of={DEVICE_PATH} conv=fsync && dd if={DEVICE_PATH} bs={n} count=1 | grep {PATTERN}",
            n = PATTERN.len()
        );
        run_pod(&client, "apps", &PodUse { mode: VolumeMode::Block, ..PodUse::new("lvm-block", "lvm-block", &rw) })
            .await?;
        logs(&client, "apps", "lvm-block").await
    };
    let (mounted, block) = tokio::try_join!(mounted, block).unwrap();
    let mount = mounted.lines().next().unwrap_or_default();
    assert!(mount.contains(" xfs "), "the pod's /data is the xfs volume: {mounted}");
    assert!(block.contains(PATTERN), "the pod read its pattern back from the device: {block}");
    // On the node, from the device itself (the agent's pod is privileged here and has the host's /dev).
    let claim = bound_claim(&client, "apps", "lvm-block").await.unwrap();
    let pv = Api::<PersistentVolume>::all(client.clone()).get(&claim.spec.unwrap().volume_name.unwrap()).await.unwrap();
    let device = pv.spec.unwrap().local.expect("a local PV").path;
    let read =
        agent_sh(bed, node, &format!("dd if='{device}' bs={} count=1 iflag=direct 2>/dev/null", 512)).await.unwrap();
    assert!(read.starts_with(PATTERN), "{device} on the node holds the pod's pattern: {read:?}");
}
