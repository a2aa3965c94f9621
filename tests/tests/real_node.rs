//! Berth on a real node, exactly as deploy/ installs it: kubelet and containerd in a qemu guest (tests/src/real_node),
//! the image hack/build-image makes, `kubectl apply -k` of deploy/ through the image overlay tests/deploy/real-node,
//! the in-cluster tokens kubelet projects, pools prepared with `kubectl exec … berth-agent init-pool`.
//! One boot serves every phase: three installs, each a DaemonSet roll (hack/test-vm runs it; about a minute of it is
//! the node becoming Ready).

use std::time::{Duration, Instant};

use berth::berth_node::BerthNode;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, Pod};
use kube::api::{Api, ListParams};
use testbed::demo::{PodLife, claim_and_pod, claim_used_by_a_pod};
use testbed::deploy::{self, Install, NAMESPACE};
use testbed::kube_util::create_namespace;
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
    create_namespace(&client, "apps").await.unwrap();
    // Both claims at once (each pod's start under emulation is most of its time). local-data's pod stays
    // (hack/up --real-node's demo): Ready once it reads back what it wrote into the volume.
    let (claim, _) = tokio::try_join!(
        claim_and_pod(&client, "apps", "local-data", "berth-local", "64Mi", PodLife::Stays),
        claim_used_by_a_pod(&client, "apps", "quota-unenforced", "berth-quota", "64Mi"),
    )
    .unwrap();
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
    claim_used_by_a_pod(&client, "apps", "quota-enforced", "berth-quota", "64Mi").await.unwrap();
    phase("deploy/quota: enforcement quota, a claim used by a pod", started);

    // 3. deploy/lvm (privileged, Bidirectional propagation, the host's /dev): the lvm pool on the node's volume
    //    group is ready and a claim of berth-lvm (xfs, deploy/examples) is used by a pod.
    let install = Install { components: vec!["quota", "lvm"], agent_toml: Some(agent_toml(true)) };
    deploy::apply(&bed, &install, &work.join("lvm")).unwrap();
    let out = deploy::init_pool(&bed, &node.name, "lvm").await.unwrap();
    println!("init-pool lvm: {}", out.trim());
    let pool = deploy::wait_pool(&client, &node.name, "lvm", POOL_TIMEOUT, |p| p.ready).await.unwrap();
    assert_eq!(pool.enforcement, "device", "{pool:?}");
    // 320Mi: berth-lvm makes xfs, and mkfs.xfs refuses less than 300 MB (the agent says so, 4xx).
    claim_used_by_a_pod(&client, "apps", "lvm-data", "berth-lvm", "320Mi").await.unwrap();
    phase("deploy/lvm: the lvm pool ready, a claim used by a pod", started);
    println!("=== real node: the events of the run\n{}", deploy::timeline(&bed));
}
