//! A burst of claims through the real control plane, agents and controller, against the floor of the same API
//! writes made directly.
//!
//!     cargo bench -p berth-controller --bench burst [-- CLAIMS]      (default 500 claims, 10 nodes)
//!
//! Burst: CLAIMS claims of a WaitForFirstConsumer class are created at once with `selected-node` already set
//! (spread over the nodes), as the scheduler would have left them; the clock runs from the first create until
//! every PV exists, and until every claim is Bound (kube-controller-manager binds them).
//!
//! Floor, in the same run and the same process, first: a provisioner with no overhead at all. For each claim, the
//! moment it is created, the same client writes what the controller writes — the `Provisioning` event, the PV
//! (pre-bound to the claim, as Berth's are), the `ProvisioningSucceeded` event — with the same concurrency (16) as
//! the controller's default. Its claims use a class of another provisioner name, so Berth leaves them alone; the
//! same kube-controller-manager binds them.
//!
//! The controller is the release build (`cargo bench` builds it); the agents are debug builds.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Event, HostPathVolumeSource};
use k8s_openapi::api::core::v1::{
    EventSource, ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeSpec, VolumeResourceRequirements,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use testbed::agents::PoolSpec;
use testbed::kube_util::create_namespace;
use testbed::{TestBed, TestBedConfig};

const NODES: usize = 10;
const CONCURRENCY: usize = 16;

fn claim(name: &str, class: &str, node: &str) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: Some(BTreeMap::from([(berth::keys::SELECTED_NODE.into(), node.into())])),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: Some(class.into()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".into(), Quantity("1Mi".into()))])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn class(name: &str, provisioner: &str) -> StorageClass {
    StorageClass {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        provisioner: provisioner.into(),
        volume_binding_mode: Some("WaitForFirstConsumer".into()),
        reclaim_policy: Some("Delete".into()),
        parameters: Some(BTreeMap::from([("pool".into(), "fast".into())])),
        ..Default::default()
    }
}

async fn create_claims(claims: &Api<PersistentVolumeClaim>, class: &str, n: usize, nodes: &[String]) {
    stream::iter(0..n)
        .for_each_concurrent(CONCURRENCY, |i| async move {
            let c = claim(&format!("data-{i}"), class, &nodes[i % nodes.len()]);
            claims.create(&PostParams::default(), &c).await.unwrap();
        })
        .await;
}

/// Waits until `count` objects of `api` satisfy `done`; the time it took from `since`.
async fn wait_count<K>(api: &Api<K>, count: usize, since: Instant, done: impl Fn(&K) -> bool) -> Duration
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    loop {
        let n = api.list(&ListParams::default()).await.unwrap().items.iter().filter(|o| done(o)).count();
        if n >= count {
            return since.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The floor: each claim created, then at once what a provisioner with no overhead writes for it.
async fn floor(client: &kube::Client, n: usize, nodes: &[String]) {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "floor");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let events: Api<Event> = Api::namespaced(client.clone(), "floor");
    stream::iter(0..n)
        .for_each_concurrent(CONCURRENCY, |i| {
            let (claims, pvs, events) = (claims.clone(), pvs.clone(), events.clone());
            async move {
                let name = format!("data-{i}");
                let c = claim(&name, "floor", &nodes[i % nodes.len()]);
                let c = claims.create(&PostParams::default(), &c).await.unwrap();
                let event = |reason: &str| Event {
                    metadata: ObjectMeta { generate_name: Some(format!("{name}.")), ..Default::default() },
                    involved_object: ObjectReference {
                        kind: Some("PersistentVolumeClaim".into()),
                        namespace: Some("floor".into()),
                        name: Some(name.clone()),
                        uid: c.metadata.uid.clone(),
                        ..Default::default()
                    },
                    reason: Some(reason.into()),
                    message: Some("floor".into()),
                    type_: Some("Normal".into()),
                    source: Some(EventSource { component: Some("floor".into()), host: None }),
                    ..Default::default()
                };
                events.create(&PostParams::default(), &event("Provisioning")).await.unwrap();
                let pv = PersistentVolume {
                    metadata: ObjectMeta { name: Some(format!("floor-{i}")), ..Default::default() },
                    spec: Some(PersistentVolumeSpec {
                        capacity: Some(BTreeMap::from([("storage".into(), Quantity("1Mi".into()))])),
                        access_modes: Some(vec!["ReadWriteOnce".into()]),
                        host_path: Some(HostPathVolumeSource { path: format!("/floor/{i}"), type_: None }),
                        persistent_volume_reclaim_policy: Some("Delete".into()),
                        storage_class_name: Some("floor".into()),
                        claim_ref: Some(ObjectReference {
                            kind: Some("PersistentVolumeClaim".into()),
                            api_version: Some("v1".into()),
                            namespace: Some("floor".into()),
                            name: Some(name.clone()),
                            uid: c.metadata.uid.clone(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                pvs.create(&PostParams::default(), &pv).await.unwrap();
                events.create(&PostParams::default(), &event("ProvisioningSucceeded")).await.unwrap();
            }
        })
        .await;
}

fn bound(c: &PersistentVolumeClaim) -> bool {
    c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(500);
    let bed = TestBed::start(TestBedConfig::nodes(NODES)).await.unwrap();
    bed.install_berth().await.unwrap();
    let agent_bin = testbed::bins::workspace_binary("berth-agent", "berth-agent").unwrap();
    let mut agents = Vec::new();
    for i in 0..NODES {
        agents.push(bed.start_agent(&agent_bin, i, &[PoolSpec::new("fast")], true).await.unwrap());
    }
    let controller = bed.start_controller(std::path::Path::new(env!("CARGO_BIN_EXE_berth-controller")), &[]).await;
    let _controller = controller.unwrap();
    let client = bed.client();
    for ns in ["burst", "floor"] {
        create_namespace(&client, ns).await.unwrap();
    }
    let classes: Api<StorageClass> = Api::all(client.clone());
    classes.create(&PostParams::default(), &class("berth-bench", berth::PROVISIONER_NAME)).await.unwrap();
    classes.create(&PostParams::default(), &class("floor", "floor.invalid/none")).await.unwrap();
    let nodes: Vec<String> = bed.nodes().iter().map(|n| n.name.clone()).collect();
    // The controller stands by for a moment before it leads; the burst comes after the floor anyway.

    let start = Instant::now();
    floor(&client, n, &nodes).await;
    let floor_pvs = start.elapsed();
    let floor_claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "floor");
    let floor_bound = wait_count(&floor_claims, n, start, bound).await;

    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "burst");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let start = Instant::now();
    create_claims(&claims, "berth-bench", n, &nodes).await;
    let created = start.elapsed();
    // Berth acts on a claim once kube-controller-manager has named the provisioner on it.
    let annotated = wait_count(&claims, n, start, |c| {
        c.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(berth::keys::STORAGE_PROVISIONER))
    })
    .await;
    let burst_pvs = wait_count(&pvs, n, start, |pv| {
        pv.spec.as_ref().and_then(|s| s.storage_class_name.as_deref()) == Some("berth-bench")
    })
    .await;
    let burst_bound = wait_count(&claims, n, start, bound).await;
    let volumes: usize = agents
        .iter()
        .flat_map(|a| std::fs::read_dir(a.pool_root("fast")).unwrap().flatten())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .count();

    println!("{n} claims with selected-node pre-set, over {NODES} nodes; concurrency {CONCURRENCY} on both sides");
    println!("                         every PV exists   every claim Bound");
    println!("floor (bare API writes)  {:>13.2} s   {:>15.2} s", secs(floor_pvs), secs(floor_bound));
    println!("Berth                    {:>13.2} s   {:>15.2} s", secs(burst_pvs), secs(burst_bound));
    println!(
        "ratio Berth / floor      {:>13.2}     {:>15.2}",
        ratio(burst_pvs, floor_pvs),
        ratio(burst_bound, floor_bound)
    );
    println!(
        "(Berth's claims: all created after {:.2} s, all annotated by kube-controller-manager after {:.2} s; \
         {volumes} volumes in the agents' pools)",
        secs(created),
        secs(annotated)
    );
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}
