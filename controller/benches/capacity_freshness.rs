//! How fresh the published capacity is: the time from a change of a node's free space to the updated
//! CSIStorageCapacity, seen through a watch, as kube-scheduler sees it.
//!
//!     cargo bench -p berth-controller --bench capacity_freshness [-- CHANGES]      (default 100)
//!
//! A change is made outside Berth, as a disk filling up would be: a 16 MiB file written into (or removed from) the
//! node's own filesystem, which holds its pool. The path it travels: the agent's 0.5 s sample, its BerthNode
//! status, the controller's watch, the CSIStorageCapacity write, the benchmark's watch.
//!
//! Floor, in the same run: the API path alone — a ConfigMap patched and its new value seen through a watch.
//! (The anchors poll capacity every 60 s.)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::storage::v1::{CSIStorageCapacity, StorageClass};
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use testbed::agents::PoolSpec;
use testbed::{FsType, TestBed, TestBedConfig};
use tokio::sync::mpsc;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let (p50, p90, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.9), percentile(&samples, 0.99));
    println!("{name:<34} p50 {:>8.1} ms   p90 {:>8.1} ms   p99 {:>8.1} ms", ms(p50), ms(p90), ms(p99));
    p50
}

/// Every value `api`'s object `name` takes, with the moment the watch delivered it.
fn watch_values<K, V>(api: Api<K>, name: &str, value: fn(&K) -> V) -> mpsc::UnboundedReceiver<(Instant, V)>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    V: Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    tokio::spawn(watcher(api, config).applied_objects().for_each(move |o| {
        if let Ok(o) = o {
            let _ = tx.send((Instant::now(), value(&o)));
        }
        async {}
    }));
    rx
}

/// Waits for the first value satisfying `done`: when it arrived, and the value.
async fn next_matching<V>(rx: &mut mpsc::UnboundedReceiver<(Instant, V)>, done: impl Fn(&V) -> bool) -> (Instant, V) {
    loop {
        let (at, v) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("no update within 30 s")
            .expect("the watch ended");
        if done(&v) {
            return (at, v);
        }
    }
}

fn capacity_of(c: &CSIStorageCapacity) -> u64 {
    c.capacity.as_ref().map(|q| berth::quantity::bytes(&q.0).unwrap()).unwrap_or(0)
}

fn value_of(c: &ConfigMap) -> String {
    c.data.as_ref().and_then(|d| d.get("n")).cloned().unwrap_or_default()
}

#[tokio::main]
async fn main() {
    let changes: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(100);
    let bed = TestBed::start(TestBedConfig::nodes_with_disks(&[1 << 30], FsType::Ext4)).await.unwrap();
    bed.install_berth().await.unwrap();
    let agent_bin = testbed::bins::workspace_binary("berth-agent", "berth-agent").unwrap();
    let _agent = bed.start_agent(&agent_bin, 0, &[PoolSpec::new("fast")], true).await.unwrap();
    let controller = bed.start_controller(std::path::Path::new(env!("CARGO_BIN_EXE_berth-controller")), &[]).await;
    let _controller = controller.unwrap();
    let client = bed.client();
    let class = StorageClass {
        metadata: ObjectMeta { name: Some("berth-local".into()), ..Default::default() },
        provisioner: berth::PROVISIONER_NAME.into(),
        volume_binding_mode: Some("WaitForFirstConsumer".into()),
        parameters: Some(BTreeMap::from([("pool".into(), "fast".into())])),
        ..Default::default()
    };
    Api::<StorageClass>::all(client.clone()).create(&PostParams::default(), &class).await.unwrap();
    let capacities: Api<CSIStorageCapacity> = Api::namespaced(client.clone(), "berth-system");
    let name = loop {
        if let Some(c) = capacities.list(&ListParams::default()).await.unwrap().items.into_iter().next() {
            break c.metadata.name.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut published = watch_values(capacities, &name, capacity_of);
    let (_, mut last) = next_matching(&mut published, |_| true).await;

    let filler = bed.nodes()[0].disk.as_ref().unwrap().mount_point().join("filler");
    let mut berth = Vec::new();
    for i in 0..changes {
        // Settle: the agent samples every 0.5 s; start each change at a random point of its cycle.
        tokio::time::sleep(Duration::from_millis(300 + fastrand::u64(0..500))).await;
        let start = Instant::now();
        if i % 2 == 0 {
            let ok = std::process::Command::new("fallocate").args(["-l", "16M"]).arg(&filler).status().unwrap();
            assert!(ok.success());
        } else {
            std::fs::remove_file(&filler).unwrap();
        }
        let before = last;
        let (at, now) = next_matching(&mut published, |v| v.abs_diff(before) >= 8 << 20).await;
        berth.push(at.duration_since(start));
        last = now;
    }

    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let map =
        ConfigMap { metadata: ObjectMeta { name: Some("floor".into()), ..Default::default() }, ..Default::default() };
    maps.create(&PostParams::default(), &map).await.unwrap();
    let mut seen = watch_values(maps.clone(), "floor", value_of);
    let mut floor = Vec::new();
    for i in 0..changes {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let start = Instant::now();
        let patch = serde_json::json!({"data": {"n": i.to_string()}});
        maps.patch("floor", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        let want = i.to_string();
        floor.push(next_matching(&mut seen, |v| *v == want).await.0.duration_since(start));
    }

    println!("{changes} changes of a node's free space (16 MiB written or removed outside Berth)");
    let b = report("capacity change → CSIStorageCapacity", berth);
    let f = report("floor: API write → watch event", floor);
    println!("ratio (p50): {:.1}; the anchors poll every 60 s", b.as_secs_f64() / f.as_secs_f64());
}
