//! What the controller's end-to-end tests share: a test bed with agents on their own disks, a controller, and
//! the objects the tests create.
// Each test file uses a part of this.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Container, Event, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodSpec, Volume, VolumeResourceRequirements,
};
use k8s_openapi::api::storage::v1::{CSIStorageCapacity, StorageClass};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use testbed::agents::{AgentProcess, PoolSpec};
use testbed::kube_util::create_namespace;
use testbed::process::Proc;
use testbed::{FsType, TestBed, TestBedConfig};

pub const MI: u64 = 1 << 20;
pub const WAIT: Duration = Duration::from_secs(60);

/// Fields drop in order: the bed's clients (agents, controllers) go before the bed, whose API server would
/// otherwise wait for their watches to end.
pub struct World {
    pub agents: Vec<AgentProcess>,
    pub controllers: Vec<Proc>,
    pub bed: TestBed,
}

/// A test bed with one agent (pool `fast`) per disk, and the namespace `app`; no controller yet.
pub async fn world_without_controller(disks: &[u64]) -> World {
    world_with_pools(disks, &[PoolSpec::new("fast")]).await
}

/// A test bed with one agent per disk, each with `pools`, and the namespace `app`; no controller yet.
pub async fn world_with_pools(disks: &[u64], pools: &[PoolSpec]) -> World {
    let bed = TestBed::start(TestBedConfig::nodes_with_disks(disks, FsType::Ext4)).await.unwrap();
    bed.install_berth().await.unwrap();
    let agent_bin = testbed::bins::workspace_binary("berth-agent", "berth-agent").unwrap();
    let mut agents = Vec::new();
    for i in 0..disks.len() {
        agents.push(bed.start_agent(&agent_bin, i, pools, true).await.unwrap());
    }
    create_namespace(&bed.client(), "app").await.unwrap();
    World { bed, agents, controllers: Vec::new() }
}

/// The orphan audit every second with a 3 s grace period, reporting only: it runs all along (and must never get
/// in the way), but cannot delete anything, so a test of the delete path cannot pass thanks to it.
pub const AUDIT_REPORTS: [&str; 3] =
    ["--orphan-audit-interval-seconds=1", "--orphan-grace-seconds=3", "--orphan-action=report"];
/// The same audit, deleting orphans: only for the tests of the audit itself.
pub const AUDIT_DELETES: [&str; 3] =
    ["--orphan-audit-interval-seconds=1", "--orphan-grace-seconds=3", "--orphan-action=delete"];

/// [`world_without_controller`] plus one controller whose audit only reports ([`AUDIT_REPORTS`]).
pub async fn world(disks: &[u64]) -> World {
    world_with_controller(disks, &AUDIT_REPORTS).await
}

/// [`world_without_controller`] plus one controller started with `args`.
pub async fn world_with_controller(disks: &[u64], args: &[&str]) -> World {
    let mut w = world_without_controller(disks).await;
    w.controllers.push(w.bed.start_controller(&controller_bin(), args).await.unwrap());
    w
}

/// Events whose reason is `reason` on the object named `name`, in any namespace: their messages.
pub async fn event_messages(w: &World, name: &str, reason: &str) -> Vec<String> {
    let events: Api<Event> = Api::all(w.bed.client());
    let list = events.list(&ListParams::default()).await.unwrap().items;
    list.into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(name) && e.reason.as_deref() == Some(reason))
        .filter_map(|e| e.message)
        .collect()
}

/// Waits for an event `reason` on the object `name` whose message contains `words`; its message.
pub async fn wait_for_event(w: &World, name: &str, reason: &str, words: &str) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let messages = event_messages(w, name, reason).await;
        if let Some(m) = messages.iter().find(|m| m.contains(words)) {
            return m.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {reason} event on {name} mentioning {words:?} within {WAIT:?}; its {reason} events: {messages:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the replica's `/metrics` sample `series` is at least `at_least`; its value.
pub async fn wait_for_sample(proc: &Proc, series: &str, at_least: f64) -> f64 {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let value = sample(&metrics_of(proc).await, series);
        if value >= at_least {
            return value;
        }
        assert!(std::time::Instant::now() < deadline, "{series} stayed at {value}, below {at_least}, for {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates the StorageClass `class`.
pub async fn add_class(w: &World, class: StorageClass) {
    Api::<StorageClass>::all(w.bed.client()).create(&PostParams::default(), &class).await.unwrap();
}

pub fn controller_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth-controller"))
}

/// The controller with failpoints compiled in (built on first use).
pub fn controller_with_failpoints() -> PathBuf {
    testbed::bins::workspace_binary_with_features("berth-controller", "berth-controller-failpoints", &["failpoints"])
        .unwrap()
}

/// Starts the failpoints build of the controller as replica `name` with `args`, `points` set (FAILPOINTS syntax).
pub async fn start_with_failpoints(w: &World, name: &str, args: &[&str], points: &str) -> Proc {
    w.bed.start_controller_named(name, &controller_with_failpoints(), args, &[("FAILPOINTS", points)]).await.unwrap()
}

/// Waits until `proc`'s log has a line containing every one of `needles`; that line.
pub async fn wait_for_log(proc: &Proc, needles: &[&str], timeout: Duration) -> String {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let text = proc.log_text();
        if let Some(line) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return line.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} logged no line with {needles:?} within {timeout:?}; its log:\n{text}",
            proc.name()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many times the agents created `volume` (HTTP 201, not the 200 of an idempotent repeat).
pub fn agent_creates(w: &World, volume: &str) -> usize {
    w.agents.iter().map(|a| agent_operations(a, "create", volume, "status=201")).sum()
}

/// How many of `agent`'s log lines for `operation` on `volume` contain `outcome` (`status=201`, or a refusal's
/// reason such as `InsufficientSpace`).
pub fn agent_operations(agent: &AgentProcess, operation: &str, volume: &str, outcome: &str) -> usize {
    let (operation, volume) = (format!("operation=\"{operation}\""), format!("volume=\"{volume}\""));
    agent.log().lines().filter(|l| l.contains(&operation) && l.contains(&volume) && l.contains(outcome)).count()
}

pub fn class(name: &str, mode: &str, reclaim: &str, params: &[(&str, &str)]) -> StorageClass {
    StorageClass {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        provisioner: berth::PROVISIONER_NAME.into(),
        volume_binding_mode: Some(mode.into()),
        reclaim_policy: Some(reclaim.into()),
        parameters: Some(params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ..Default::default()
    }
}

pub fn claim(name: &str, class: &str, size: &str) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: Some(class.into()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".into(), Quantity(size.into()))])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn pod(name: &str, claim: &str) -> Pod {
    Pod {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "db".into(),
                image: Some("registry.invalid/db:1".into()),
                ..Default::default()
            }],
            volumes: Some(vec![Volume {
                name: "data".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.into(),
                    read_only: None,
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn bound(c: &PersistentVolumeClaim) -> bool {
    c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
}

pub fn released(p: &PersistentVolume) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released")
}

/// Reasons of the events on a claim, oldest first.
pub async fn event_reasons(w: &World, claim: &str) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(w.bed.client(), "app");
    let mut list = events.list(&ListParams::default()).await.unwrap().items;
    list.retain(|e| e.involved_object.name.as_deref() == Some(claim));
    list.sort_by_key(|e| e.metadata.creation_timestamp.clone().map(|t| t.0));
    list.into_iter().filter_map(|e| e.reason).collect()
}

pub fn volume_dir(w: &World, node: &str, volume: &str) -> PathBuf {
    let agent = w.agents.iter().find(|a| a.node == node).unwrap();
    agent.pool_root("fast").join(volume)
}

pub fn all_volume_dirs(w: &World) -> Vec<String> {
    let mut all = Vec::new();
    for a in &w.agents {
        for e in std::fs::read_dir(a.pool_root("fast")).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if !n.starts_with('.') {
                all.push(format!("{}/{n}", a.node));
            }
        }
    }
    all
}

/// Where the replica serves its metrics (`host:port`, from its log).
pub async fn metrics_address(proc: &Proc) -> String {
    wait_for_log(proc, &["serving /healthz"], WAIT).await;
    // The last one: a replica restarted under the same name appends to the same log.
    let text = proc.log_text();
    let line = text.lines().rfind(|l| l.contains("serving /healthz")).expect("just seen");
    let address = line.split("address=").nth(1).expect("the address is logged").split_whitespace().next().unwrap();
    address.to_owned()
}

/// The replica's `/metrics` text.
pub async fn metrics_of(proc: &Proc) -> String {
    let address = metrics_address(proc).await;
    reqwest::get(format!("http://{address}/metrics")).await.unwrap().text().await.unwrap()
}

/// The value of the sample `name{labels}` (labels as written, e.g. `class="c",result="success"`), 0 if absent.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

/// The published capacity of `class` per node hostname (bytes), as kube-scheduler sees it.
pub async fn capacities(w: &World, class: &str) -> BTreeMap<String, u64> {
    let api: Api<CSIStorageCapacity> = Api::namespaced(w.bed.client(), "berth-system");
    let list = api.list(&ListParams::default()).await.unwrap().items;
    list.into_iter()
        .filter(|c| c.storage_class_name == class)
        .map(|c| {
            let host = c.node_topology.unwrap().match_labels.unwrap()["kubernetes.io/hostname"].clone();
            (host, berth::quantity::bytes(&c.capacity.unwrap().0).unwrap())
        })
        .collect()
}

/// Polls [`capacities`] until `done` holds (within [`WAIT`]); the capacities then.
pub async fn wait_capacities(
    w: &World,
    class: &str,
    done: impl Fn(&BTreeMap<String, u64>) -> bool,
) -> BTreeMap<String, u64> {
    let deadline = Instant::now() + WAIT;
    loop {
        let c = capacities(w, class).await;
        if done(&c) {
            return c;
        }
        assert!(Instant::now() < deadline, "capacity of {class} never became as expected: {c:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
