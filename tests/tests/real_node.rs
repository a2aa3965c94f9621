//! Berth on a real node, exactly as deploy/ installs it: kubelet and containerd in a qemu guest (tests/src/real_node),
//! the image hack/build-image makes, `kubectl apply -k` of deploy/ through the image overlay tests/deploy/real-node,
//! the in-cluster tokens kubelet projects, pools prepared with `kubectl exec … berth-agent init-pool`.
//! One boot serves every phase: three installs, each a DaemonSet roll (hack/test-vm runs it; about half a minute of
//! it is the node becoming Ready). Each install also serves a part of a volume's life after "Bound" (docs/real-node.md).

use std::path::Path;
use std::time::{Duration, Instant};

use berth::berth_node::BerthNode;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams};
use testbed::demo::{
    DEMO_CLAIM, DEMO_POD, DEVICE_PATH, PodLife, PodUse, VolumeMode, bound_claim, claim_used_by_a_pod, create_claim,
    demo_statefulset, local_path, logs, logs_when, run_pod, wait_pod,
};
use testbed::deploy::{self, Install, NAMESPACE};
use testbed::kube_util::create_namespace;
use testbed::on_node::{agent_sh, metric_capacity, poll, summary_capacity};
use testbed::{TestBed, TestBedConfig};

const POOL_TIMEOUT: Duration = Duration::from_secs(120);

// Not tests/tests/postgres.rs: cargo would make that a test target of its own.
#[path = "real_node/postgres.rs"]
mod postgres;

/// PostgreSQL's volumes (issue 16): a directory on the state disk's ext4, one on the XFS pool with a project quota,
/// a thick LVM volume with xfs.
const PG_EXT4: postgres::Kind =
    postgres::Kind { namespace: "pg-ext4", class: "berth-local", what: "a directory volume on ext4" };
const PG_QUOTA: postgres::Kind = postgres::Kind {
    namespace: "pg-quota",
    class: "berth-quota",
    what: "a directory volume on XFS with a project quota",
};
const PG_LVM: postgres::Kind =
    postgres::Kind { namespace: "pg-lvm", class: "berth-lvm", what: "a thick LVM volume, xfs" };

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
    let mut bed = TestBed::start(TestBedConfig::real_node()).await.unwrap();
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
    // The claims at once (each pod's start under emulation is most of its time). The demo StatefulSet (hack/up
    // --real-node's) stays: the drain and the reboot below are done to it.
    let (demo, _, _) = tokio::try_join!(
        demo_statefulset(&bed, "apps"),
        claim_used_by_a_pod(&client, "apps", "quota-unenforced", "berth-quota", "64Mi"),
        written_by_a_non_root_pod(&client),
    )
    .unwrap();
    println!("the demo's pod printed:\n{demo}");
    let claim = bound_claim(&client, "apps", DEMO_CLAIM).await.unwrap();
    let pv_name = claim.spec.unwrap().volume_name.unwrap();
    let pv = Api::<PersistentVolume>::all(client.clone()).get(&pv_name).await.unwrap();
    let affinity = serde_json::to_string(&pv.spec.unwrap().node_affinity).unwrap();
    assert!(affinity.contains(&node.hostname), "the PV is pinned to the node's hostname label: {affinity}");
    phase("deploy/: agent, controller, claims used by pods; the quota pool says why it enforces nothing", started);

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
    // What happens to volumes after "Bound", at once where one does not wait for another: a pod's start under
    // emulation is most of each step's time. The directory volume of claim `owned` (made above) as kubelet left it
    // (fsGroup applied) and its life after the first pod; the quota pool filled by a pod, then its volume seen by
    // kubelet and taken by hostile pods.
    let quota = async {
        fill_past_its_claim(&bed).await;
        tokio::join!(kubelet_reports_the_claims_size(&bed, &node.name), projects_and_user_namespaces(&bed, &node.name));
    };
    let (_, _, pg_ext4, pg_quota) = tokio::join!(
        directory_volume_on_the_node(&bed, &node.name, &node.hostname),
        quota,
        postgres_on(&bed, &node.name, PG_EXT4, &work, false),
        postgres_on(&bed, &node.name, PG_QUOTA, &work, false),
    );
    phase(
        "deploy/quota: enforcement quota; a pod writing past its claim gets ENOSPC; kubelet reports the claim's size; \
         a pod in the node's user namespace can take another volume's project, one with hostUsers: false cannot; \
         a directory volume: owner, fsGroup, the writer's file on the node; a new pod sees it; deleted with its claim; \
         PostgreSQL on the ext4 and the XFS-quota directory volumes, loaded, its table's file under the PV path",
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
    tokio::join!(lvm_volumes_in_pods(&bed, &node.name), volumes_held_by_a_pod(&bed));
    phase("deploy/lvm: the lvm pool ready; an xfs volume mounted into a pod, a Block volume written and read", started);
    // After the pods above, not beside them: the guest's CPU under emulation is the limit, and with PostgreSQL's start
    // and load beside them a busybox pod took 130 s to start (twice in four runs), past its deadline.
    let pg_lvm = postgres_on(&bed, &node.name, PG_LVM, &work, true).await;
    phase("PostgreSQL on a thick LVM volume, loaded, its rows kept through a new pod", started);
    volumes_in_use_are_not_deleted(&mut bed, &node.name).await;
    phase(
        "volumes a pod still mounts (kubelet stopped): deletes refused and retried until kubelet unmounts them",
        started,
    );

    // 4. The operator's day: a drain, then a reboot with the agent late (held back) — both with the volumes above.
    let first_start = demo.lines().next().unwrap_or_default().to_owned();
    let before_reboot = k8s_openapi::jiff::Timestamp::now();
    drain_and_reboot(&mut bed, &node.name).await;
    for (kind, committed) in [(PG_EXT4, pg_ext4), (PG_QUOTA, pg_quota), (PG_LVM, pg_lvm)] {
        let after = postgres::after_reboot(&bed, kind, before_reboot).await.unwrap();
        assert_eq!(after, committed, "PostgreSQL on {} after the reboot: what was committed", kind.what);
    }
    phase(
        "a drain and a reboot: kubelet waits for the agent's mount, every volume keeps its data, PostgreSQL its rows",
        started,
    );
    tokio::try_join!(
        postgres::delete(&bed, &node.name, PG_EXT4, &work),
        postgres::delete(&bed, &node.name, PG_QUOTA, &work),
        postgres::delete(&bed, &node.name, PG_LVM, &work),
    )
    .unwrap();
    phase("PostgreSQL's StatefulSets and claims deleted: their PVs, directories and logical volume gone", started);
    // Two starts, or a wrong count once the output has more than one line.
    let starts = logs_when(&client, "apps", DEMO_POD, |out| out.lines().count() > 1).await.unwrap();
    let lines: Vec<&str> = starts.lines().collect();
    assert_eq!(lines.len(), 2, "the demo's volume saw two starts, before the drain and after the reboot:\n{starts}");
    assert_eq!(lines[0], first_start, "the first start's line is as the first pod wrote it:\n{starts}");
    println!("=== real node: the events of the run\n{}", deploy::timeline(&bed));
}

/// PostgreSQL from deploy/examples/postgres.yaml on a volume of `kind`: Ready, loaded (a table, pgbench), its table's
/// file under the claim's PV path on the node, and (`new_pod`) after its pod was deleted and made again every
/// committed row still there. Returns what was committed, for the reboot. A new pod is made on the LVM volume only
/// (the one kubelet bind-mounts from the agent's mount; every kind gets a new start in the reboot): under emulation
/// each pod start costs the guest tens of seconds of CPU.
async fn postgres_on(
    bed: &TestBed,
    node: &str,
    kind: postgres::Kind,
    work: &Path,
    new_pod: bool,
) -> postgres::Committed {
    let started = Instant::now();
    postgres::start(bed, kind, work).await.unwrap();
    let ready = started.elapsed();
    let committed = postgres::load(bed, node, kind).await.unwrap();
    let loaded = started.elapsed();
    if new_pod {
        postgres::restart(bed, kind).await.unwrap();
        let after = postgres::committed(bed, kind).unwrap();
        assert_eq!(after, committed, "PostgreSQL on {} after its pod was made again: what was committed", kind.what);
    }
    println!(
        "PostgreSQL on {}: {committed:?}{}; Ready at {:.0} s, loaded at {:.0} s, done at {:.0} s",
        kind.what,
        if new_pod { ", kept through a new pod" } else { "" },
        ready.as_secs_f64(),
        loaded.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    committed
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

/// A pod writing past its 64Mi claim `quota-full` on the quota pool gets ENOSPC (the pod stays running, its volume
/// full).
async fn fill_past_its_claim(bed: &TestBed) {
    let client = bed.client();
    create_claim(&client, "apps", "quota-full", "berth-quota", "64Mi", VolumeMode::Filesystem).await.unwrap();
    // Stays running (its volume's stats are a running pod's), the dd's outcome in its output.
    let fill = "dd if=/dev/zero of=/data/fill bs=1M count=100; echo \"dd exit $?\"; df -P /data; exec sleep 2147483647";
    run_pod(&client, "apps", &PodUse { stays: true, ..PodUse::new("quota-full", "quota-full", fill) }).await.unwrap();
    // The same deadline as the other pods of this test: beside PostgreSQL's initdb under TCG a pod took 64 s to
    // start (.ci/run on 2026-12-08).
    let out = poll("the filling pod's outcome", Duration::from_secs(180), || {
        let out = deploy::kubectl(bed, &["-n", "apps", "logs", "quota-full"])?;
        Ok(out.contains("dd exit").then_some(out))
    })
    .await
    .unwrap();
    println!("the filling pod:\n{out}");
    assert!(out.contains("No space left on device"), "writing past the claim's size is refused with ENOSPC:\n{out}");
    assert!(!out.contains("dd exit 0"), "dd reports the failure:\n{out}");
}

/// kubelet reports the size of claim `quota-full` (filled by [`fill_past_its_claim`]) as its volume's capacity
/// (statfs of a project-quota directory), in /stats/summary and kubelet_volume_stats_*; then its pod is deleted.
async fn kubelet_reports_the_claims_size(bed: &TestBed, node: &str) {
    let client = bed.client();
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
    // Not kept running: after the reboot below its dd would run again, for nothing.
    Api::<Pod>::namespaced(client.clone(), "apps").delete("quota-full", &Default::default()).await.unwrap();
}

/// What pod `lvm-data` prints at every start: its /data mount, then `first: written` when it wrote its proof
/// (the volume was empty) or `kept: written` when the proof was already there; then it stays.
const LVM_DATA_POD: &str = "grep ' /data ' /proc/mounts; if [ -e /data/proof ]; then echo \"kept: $(cat /data/proof)\"; \
     else echo written > /data/proof && echo \"first: $(cat /data/proof)\"; fi; exec sleep 2147483647";

/// Whether pod `lvm-data`'s output is complete (see [`LVM_DATA_POD`]).
fn lvm_data_said(out: &str) -> bool {
    out.lines().any(|l| l.starts_with("first: ") || l.starts_with("kept: "))
}

/// The xfs volume the agent mounted inside its container is what the pod sees (Bidirectional propagation to the
/// host, where kubelet bind-mounts it), and a Block claim's device takes a pattern that reaches the logical volume.
/// The xfs volume's pod stays for the reboot below.
async fn lvm_volumes_in_pods(bed: &TestBed, node: &str) {
    let client = bed.client();
    // 320Mi: berth-lvm makes xfs, and mkfs.xfs refuses less than 300 MB (the agent says so, 4xx).
    let mounted = async {
        create_claim(&client, "apps", "lvm-data", "berth-lvm", "320Mi", VolumeMode::Filesystem).await?;
        let pod = PodUse { stays: true, ..PodUse::new("lvm-data", "lvm-data", LVM_DATA_POD) };
        run_pod(&client, "apps", &pod).await?;
        logs_when(&client, "apps", "lvm-data", lvm_data_said).await
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
    assert!(mounted.lines().any(|l| l == "first: written"), "the pod wrote its proof on the new volume: {mounted}");
    assert!(block.contains(PATTERN), "the pod read its pattern back from the device: {block}");
    // On the node, from the device itself (the agent's pod is privileged here and has the host's /dev).
    let device = local_path(&client, "apps", "lvm-block").await.unwrap();
    let read =
        agent_sh(bed, node, &format!("dd if='{device}' bs={} count=1 iflag=direct 2>/dev/null", 512)).await.unwrap();
    assert!(read.starts_with(PATTERN), "{device} on the node holds the pod's pattern: {read:?}");
}

/// The PV of claim `name` in namespace apps (Bound).
async fn pv_of(client: &kube::Client, name: &str) -> String {
    bound_claim(client, "apps", name).await.unwrap().spec.unwrap().volume_name.unwrap()
}

/// The number of volumes of each pool as the agent publishes them in its BerthNode.
async fn volume_counts(client: &kube::Client, node: &str) -> Vec<(String, u32)> {
    let bn = Api::<BerthNode>::all(client.clone()).get(node).await.unwrap();
    bn.status.unwrap().pools.into_iter().map(|p| (p.name, p.volumes)).collect()
}

/// Claims `held-dir` (berth-local) and `held-lvm` (a thick ext4 LV) used by one pod, `holder`, which writes to both
/// and stays: the volumes [`volumes_in_use_are_not_deleted`] tries to delete.
async fn volumes_held_by_a_pod(bed: &TestBed) {
    let client = bed.client();
    deploy::kubectl_apply_text(bed, &storage_class("berth-lvm-ext4", "lvm", "  fsType: ext4\n")).unwrap();
    let claims = async {
        create_claim(&client, "apps", "held-dir", "berth-local", "16Mi", VolumeMode::Filesystem).await?;
        create_claim(&client, "apps", "held-lvm", "berth-lvm-ext4", "64Mi", VolumeMode::Filesystem).await
    };
    claims.await.unwrap();
    let holder: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "holder"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main", "image": testbed::demo::BUSYBOX, "imagePullPolicy": "Never",
                "command": ["sh", "-c", "echo kept > /dir/proof && echo kept > /lvm/proof && exec sleep 2147483647"],
                "volumeMounts": [{"name": "dir", "mountPath": "/dir"}, {"name": "lvm", "mountPath": "/lvm"}],
            }],
            "volumes": [
                {"name": "dir", "persistentVolumeClaim": {"claimName": "held-dir"}},
                {"name": "lvm", "persistentVolumeClaim": {"claimName": "held-lvm"}},
            ],
        },
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "apps");
    pods.create(&Default::default(), &holder).await.unwrap();
    wait_pod(&client, "apps", "holder", "held-lvm", PodLife::Stays).await.unwrap();
}

/// Issue 15 item 7 (the agent's in-use refusal, issue 19): volumes a pod still mounts — kubelet stopped, the pod
/// force-deleted, its claims deleted — are not deleted: the agent refuses each delete as in use (nothing is moved,
/// zeroed or removed: the volumes stay in its inventory) and the controller retries, with one `VolumeInUse` event
/// per PV, until kubelet is back and has unmounted them. A directory volume, which only the host's mount table
/// shows in use (the agent reads it through the host's /proc that deploy/agent mounts), and a thick ext4 LV, whose
/// filesystem the pod's bind mount keeps alive after the agent's own umount (its device stays open), in one pod
/// `holder` that [`volumes_held_by_a_pod`] made.
async fn volumes_in_use_are_not_deleted(bed: &mut TestBed, node: &str) {
    let client = bed.client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "apps");
    let (dir_pv, lvm_pv) = (pv_of(&client, "held-dir").await, pv_of(&client, "held-lvm").await);
    let before = volume_counts(&client, node).await;

    let down = Instant::now();
    bed.stop_real_kubelet().unwrap();
    let force = kube::api::DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
    pods.delete("holder", &force).await.unwrap();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "apps");
    for claim in ["held-dir", "held-lvm"] {
        claims.delete(claim, &Default::default()).await.unwrap();
    }
    let events: Api<Event> = Api::all(client.clone());
    for pv in [&dir_pv, &lvm_pv] {
        let until = Instant::now() + Duration::from_secs(120);
        let note = loop {
            let params = ListParams::default().fields(&format!("involvedObject.name={pv},reason=VolumeInUse"));
            if let Some(e) = events.list(&params).await.unwrap().items.into_iter().next() {
                break e.message.unwrap_or_default();
            }
            assert!(Instant::now() < until, "no VolumeInUse event on {pv} while kubelet is stopped");
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        println!("{pv}: {note}");
        // The pod's mount, as the host's mount table shows it (for the directory volume, only it can).
        assert!(note.contains("/var/lib/kubelet/pods/"), "the refusal names the pod's mount: {note}");
    }
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    for pv in [&dir_pv, &lvm_pv] {
        let p = pvs.get(pv).await.unwrap();
        let finalizers = p.metadata.finalizers.unwrap_or_default();
        assert!(finalizers.iter().any(|f| f.starts_with("external-provisioner")), "{pv} keeps its finalizer");
    }
    assert_eq!(volume_counts(&client, node).await, before, "both volumes are still the agent's: nothing was removed");
    bed.start_real_kubelet().unwrap();
    println!("kubelet was down {:.0} s", down.elapsed().as_secs_f64());

    // kubelet finds the pod gone and unmounts its volumes; the controller's next retry deletes them.
    for pv in [&dir_pv, &lvm_pv] {
        if let Err(e) = testbed::kube_util::wait_deleted(&pvs, pv, Duration::from_secs(240)).await {
            panic!("{e:#}\n{}", testbed::kube_util::events_of(&client, "default", pv).await);
        }
    }
    let agent_log = deploy::kubectl(bed, &["-n", NAMESPACE, "logs", "daemonset/berth-agent"]).unwrap();
    for pv in [&dir_pv, &lvm_pv] {
        let refused = agent_log.lines().filter(|l| l.contains(pv.as_str()) && l.contains("result=InUse")).count();
        assert!(refused > 0, "the agent refused {pv} as in use:\n{agent_log}");
    }
    let left =
        agent_sh(bed, node, "ls /var/lib/berth/pools/local; lvm lvs --noheadings -o lv_name berth").await.unwrap();
    assert!(!left.contains(dir_pv.as_str()) && !left.contains(lvm_pv.as_str()), "both volumes are gone: {left}");
}

/// The label the agent's DaemonSet is made to require while it is held back: no node has it.
const HELD_BACK: &str = "berth.dev/test-agent-held-back";

/// Holds the agent back (its DaemonSet selects no node) or lets it run again, and waits for the result.
fn hold_agent_back(bed: &TestBed, held: bool) {
    let value = if held { "\"true\"" } else { "null" };
    let patch = format!(r#"{{"spec":{{"template":{{"spec":{{"nodeSelector":{{"{HELD_BACK}":{value}}}}}}}}}}}"#);
    deploy::kubectl(bed, &["-n", NAMESPACE, "patch", "daemonset/berth-agent", "--type=merge", "-p", &patch]).unwrap();
    let args: &[&str] = if held {
        &["-n", NAMESPACE, "wait", "--for=delete", "pod", "-l", "app.kubernetes.io/name=berth-agent", "--timeout=90s"]
    } else {
        &["-n", NAMESPACE, "rollout", "status", "daemonset/berth-agent", "--timeout=180s"]
    };
    deploy::kubectl(bed, args).unwrap_or_else(|e| panic!("{e:#}\n{}", deploy::describe_pods(bed)));
}

/// The first event `reason` of object `name` in namespace apps whose message contains `text`, within `timeout`;
/// returns its message and when it was first seen (the API server's clock).
async fn event_of(
    client: &kube::Client,
    name: &str,
    reason: &str,
    text: &str,
    timeout: Duration,
) -> (String, k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) {
    let events: Api<Event> = Api::namespaced(client.clone(), "apps");
    let params = ListParams::default().fields(&format!("involvedObject.name={name},reason={reason}"));
    let until = Instant::now() + timeout;
    loop {
        let found = events.list(&params).await.unwrap().items.into_iter().find_map(|e| {
            let message = e.message.clone().unwrap_or_default();
            let at = e
                .first_timestamp
                .clone()
                .or(e.event_time.clone().map(|t| k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t.0)));
            (message.contains(text)).then_some((message, at?))
        });
        if let Some(found) = found {
            return found;
        }
        assert!(
            Instant::now() < until,
            "no {reason} event of {name} saying {text:?} within {timeout:?}; its events:\n{}",
            testbed::kube_util::events_of(client, "apps", name).await
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Drain: `kubectl drain` evicts the demo's pod; its replacement stays Pending (its claim's volume is on this node
/// only) with the scheduler's reason. Reboot, with the node still cordoned and the agent held back so that it is
/// late: kubelet refuses to start pod `lvm-data` again (the PV path inside the unmounted LV does not exist); once
/// the agent is back and has mounted the LV the pod runs with its data, and the node's disk under the mount point
/// holds nothing. Uncordon (as soon as the refusal is seen: the demo's volume is a directory, which needs no agent
/// to be mounted): the demo's pod runs again with its data.
async fn drain_and_reboot(bed: &mut TestBed, node: &str) {
    let client = bed.client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "apps");
    let evicted = pods.get(DEMO_POD).await.unwrap().metadata.uid;
    let drained =
        deploy::kubectl(bed, &["drain", node, "--ignore-daemonsets", "--pod-selector=app=demo", "--timeout=120s"])
            .unwrap();
    println!("kubectl drain:\n{drained}");
    let pending = testbed::kube_util::wait_for(&pods, DEMO_POD, Duration::from_secs(60), |p| {
        p.metadata.uid != evicted
            && p.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| {
                c.iter().any(|c| {
                    c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable")
                })
            })
    })
    .await
    .unwrap();
    let why = pending.status.and_then(|s| s.conditions).unwrap_or_default();
    let why = why.iter().find(|c| c.type_ == "PodScheduled").and_then(|c| c.message.clone()).unwrap_or_default();
    println!("the demo's replacement pod is Pending: {why}");
    assert!(why.contains("unschedulable"), "the scheduler says the only node with the volume is cordoned: {why}");

    hold_agent_back(bed, true);
    bed.reboot_real_node().await.unwrap();
    let path = local_path(&client, "apps", "lvm-data").await.unwrap();
    let (refused, at) = event_of(&client, "lvm-data", "FailedMount", "does not exist", Duration::from_secs(180)).await;
    println!("before the agent runs, kubelet: {refused}");
    assert!(refused.contains(&path), "kubelet refuses the PV's own path {path}: {refused}");

    deploy::kubectl(bed, &["uncordon", node]).unwrap();
    hold_agent_back(bed, false);
    let ready_after_refusal = |p: &Pod| testbed::kube_util::pod_ready_time(p).is_some_and(|t| t >= at.0);
    testbed::kube_util::wait_for(&pods, "lvm-data", Duration::from_secs(180), ready_after_refusal)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    // The container started after the reboot; until its output is in, the log can still be the one before it.
    let kept = logs_when(&client, "apps", "lvm-data", |out| out.contains("kept: ")).await.unwrap();
    assert!(kept.lines().any(|l| l == "kept: written"), "the lvm volume's data after the reboot:\n{kept}");
    // The filesystem that holds the pool root, without what is mounted on it (a bind mount is not recursive): the
    // volume's mount point there is empty, so nothing was written to the node's disk in the volume's place.
    let mount_point = Path::new(&path).parent().unwrap().display().to_string();
    let under = "/tmp/pools-underneath";
    let beneath = mount_point.replacen("/var/lib/berth/pools", under, 1);
    let seen = agent_sh(
        bed,
        node,
        &format!(
            "mkdir -p {under} && mount --bind /var/lib/berth/pools {under} && \
             echo \"mounted: $(ls -A '{mount_point}' | tr '\\n' ' ')\" && \
             echo \"underneath: $(ls -A '{beneath}' | tr '\\n' ' ')\"; umount {under}"
        ),
    )
    .await
    .unwrap();
    println!("the lvm volume's mount point {mount_point}:\n{seen}");
    assert!(
        seen.lines().any(|l| l.starts_with("mounted: ") && l.split(' ').any(|f| f == "data")),
        "the mounted volume holds the PV's directory: {seen}"
    );
    assert!(seen.lines().any(|l| l == "underneath: "), "the node's disk holds nothing under the mount point: {seen}");

    wait_pod(&client, "apps", DEMO_POD, DEMO_CLAIM, PodLife::Stays).await.unwrap();
}

/// The image of Berth (hack/build-image), for pods that need xfs_io.
const BERTH_IMAGE: &str = "berth.test/berth:dev";

/// What docs/storageclass.md says of a file's project: a pod running as root in the node's user namespace moves a
/// directory of its volume into another volume's project (given its ID, which a pod cannot list: the test reads it
/// on the node), and `statfs` there then reports that volume's size and usage (and writes there would count against
/// it); the same pod with `hostUsers: false` is refused the change (the kernel allows project changes only from the
/// initial user namespace) and sees its own volume.
async fn projects_and_user_namespaces(bed: &TestBed, node: &str) {
    let client = bed.client();
    // The victim: quota-full's volume, full (64 MiB + 64 KiB used of as much).
    let path = local_path(&client, "apps", "quota-full").await.unwrap();
    let listed = agent_sh(bed, node, &format!("xfs_io -c lsproj '{path}'")).await.unwrap();
    let project: u32 = listed
        .trim()
        .strip_prefix("projid = ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("xfs_io lsproj of {path}: {listed:?}"));
    // Each hostile pod has a claim of 32Mi: its own statfs says 32 MiB + 64 KiB, the victim's 64 MiB + 64 KiB.
    let take = format!(
        "mkdir -p /data/taken && xfs_io -c 'chproj {project}' /data/taken; xfs_io -c lsproj /data/taken; \
         df -Pk /data/taken | tail -n 1"
    );
    let hostile = |name: &'static str, host_users: bool| {
        let client = client.clone();
        let take = take.clone();
        async move {
            create_claim(&client, "apps", name, "berth-quota", "32Mi", VolumeMode::Filesystem).await?;
            // Root (the image's user is 65532): in the node's user namespace it has CAP_FOWNER there.
            let root = serde_json::json!({"runAsUser": 0, "runAsGroup": 0});
            let pod =
                PodUse { image: BERTH_IMAGE.into(), host_users, security: root, ..PodUse::new(name, name, &take) };
            run_pod(&client, "apps", &pod).await?;
            logs(&client, "apps", name).await
        }
    };
    let (host, userns) =
        tokio::try_join!(hostile("project-taker", true), hostile("project-taker-userns", false)).unwrap();
    println!("root in the node's user namespace:\n{host}\nroot with hostUsers: false:\n{userns}");
    // `df -Pk`: filesystem, 1024-blocks, used, available, capacity, mount point.
    let df = |out: &str| -> (u64, u64) {
        let fields: Vec<u64> = out
            .lines()
            .last()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .take(2)
            .filter_map(|f| f.parse().ok())
            .collect();
        (fields.first().copied().unwrap_or(0), fields.get(1).copied().unwrap_or(0))
    };
    const VICTIM_KIB: u64 = (64 << 10) + 64;
    const OWN_KIB: u64 = (32 << 10) + 64;
    assert!(
        host.contains(&format!("projid = {project}")),
        "in the node's user namespace the change is allowed:\n{host}"
    );
    let (size, used) = df(&host);
    assert_eq!(size, VICTIM_KIB, "statfs of the re-tagged directory reports the victim's size:\n{host}");
    assert!(used > 60 << 10, "and the victim's usage:\n{host}");
    assert!(!userns.contains(&format!("projid = {project}")), "hostUsers: false cannot change a project:\n{userns}");
    assert!(userns.contains("Invalid argument"), "the kernel refuses the change (EINVAL):\n{userns}");
    assert_eq!(df(&userns).0, OWN_KIB, "statfs in a hostUsers: false pod reports its own volume:\n{userns}");
}
