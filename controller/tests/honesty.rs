//! The controller tells the truth, against the real scheduler and kube-controller-manager: an agent that died
//! while its (kwok) Node stays Ready attracts no pods, and claims the scheduler can never hand over are told why,
//! once.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth::keys;
use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use testbed::kube_util::wait_for;

/// Every (claim, selected-node) the API server showed for claims in `app` while the returned list is alive, and
/// how many times each claim lost its `selected-node`.
#[derive(Default)]
struct Selections {
    seen: BTreeSet<(String, String)>,
    removals: std::collections::BTreeMap<String, usize>,
    last: std::collections::BTreeMap<String, Option<String>>,
}

fn watch_selections(w: &World) -> (Arc<Mutex<Selections>>, tokio::task::JoinHandle<()>) {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(w.bed.client(), "app");
    let record = Arc::new(Mutex::new(Selections::default()));
    let task = tokio::spawn({
        let record = record.clone();
        watcher(claims, watcher::Config::default()).applied_objects().for_each(move |c| {
            if let Ok(c) = c {
                let name = c.metadata.name.clone().unwrap_or_default();
                let node = c.metadata.annotations.as_ref().and_then(|a| a.get(keys::SELECTED_NODE)).cloned();
                let mut r = record.lock().unwrap();
                if let Some(n) = &node {
                    r.seen.insert((name.clone(), n.clone()));
                }
                if r.last.get(&name).is_some_and(|before| before.is_some()) && node.is_none() {
                    *r.removals.entry(name.clone()).or_default() += 1;
                }
                r.last.insert(name, node);
            }
            async {}
        })
    });
    (record, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_agent_attracts_no_pods_and_serves_again_when_it_returns() {
    let mut w = world_without_controller(&[256 * MI, 256 * MI]).await;
    // Agents that write their status every second, and a controller that takes 4 s of silence for death.
    for agent in &mut w.agents {
        agent.kill();
        agent.add_args(&["--status-heartbeat-seconds=1"]);
        agent.start().await.unwrap();
    }
    let mut args = AUDIT_REPORTS.to_vec();
    args.push("--agent-stale-after=4");
    w.controllers.push(w.bed.start_controller(&controller_bin(), &args).await.unwrap());
    add_class(&w, class("berth-local", "WaitForFirstConsumer", "Delete", &[("pool", "fast")])).await;
    let node = |i: usize| (w.bed.nodes()[i].name.clone(), w.bed.nodes()[i].hostname.clone());
    let (live, dead) = (node(0), node(1));
    wait_capacities(&w, "berth-local", |c| c.len() == 2 && c.values().all(|v| *v > 0)).await;
    let (selections, watching) = watch_selections(&w);

    w.agents[1].kill();
    let killed = Instant::now();
    wait_capacities(&w, "berth-local", |c| c.get(&dead.1) == Some(&0) && c[&live.1] > 0).await;
    // Zero because the agent went quiet, not for any other reason: not before its status was 3 s old at least
    // (it was written up to 1 s before the kill).
    assert!(killed.elapsed() >= Duration::from_secs(3), "zero after {:?}", killed.elapsed());
    let line = wait_for_log(&w.controllers[0], &["taken for dead", &dead.0], WAIT).await;
    assert!(line.contains("WARN"), "{line}");

    let client = w.bed.client();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    for i in 0..10 {
        let name = format!("after-{i}");
        claims.create(&PostParams::default(), &claim(&name, "berth-local", "16Mi")).await.unwrap();
        pods.create(&PostParams::default(), &pod(&name, &name)).await.unwrap();
        let c = wait_for(&claims, &name, WAIT, bound).await.unwrap();
        let pv = pvs.get(c.spec.as_ref().unwrap().volume_name.as_deref().unwrap()).await.unwrap();
        assert_eq!(pv.metadata.annotations.unwrap()["local.berth.dev/node"], live.0, "claim {name}");
    }
    let sent_to_dead: Vec<_> = selections.lock().unwrap().seen.iter().filter(|(_, n)| *n == dead.0).cloned().collect();
    assert!(sent_to_dead.is_empty(), "claims that had selected-node = the dead node: {sent_to_dead:?}");
    assert_eq!(capacities(&w, "berth-local").await[&dead.1], 0);

    // Back with its agent.
    w.agents[1].start().await.unwrap();
    wait_capacities(&w, "berth-local", |c| c[&dead.1] > 0).await;
    wait_for_log(&w.controllers[0], &["serving", &dead.0], WAIT).await;
    watching.abort();
}

/// The `ProvisioningFailed` events on claim `name`: (message, count) — `count` as the API server aggregated it.
async fn failures_of(w: &World, name: &str) -> Vec<(String, i32)> {
    let events: Api<Event> = Api::namespaced(w.bed.client(), "app");
    let list = events.list(&ListParams::default()).await.unwrap().items;
    list.into_iter()
        .filter(|e| {
            e.involved_object.name.as_deref() == Some(name) && e.reason.as_deref() == Some("ProvisioningFailed")
        })
        .map(|e| {
            let count = e.series.as_ref().and_then(|s| s.count).or(e.count).unwrap_or(1);
            (e.message.unwrap_or_default(), count)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn claims_the_scheduler_never_hands_over_are_told_why_once() {
    let w = world(&[256 * MI]).await;
    add_class(&w, class("typo", "WaitForFirstConsumer", "Delete", &[("pool", "fast"), ("poool", "x")])).await;
    add_class(&w, class("lost", "WaitForFirstConsumer", "Delete", &[("pool", "nowhere")])).await;
    // The only pool is a hostpath pool: raw block can be served nowhere.
    add_class(&w, class("berth-local", "WaitForFirstConsumer", "Delete", &[("pool", "fast")])).await;
    wait_capacities(&w, "berth-local", |c| c.len() == 1).await;
    let (selections, watching) = watch_selections(&w);
    let client = w.bed.client();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    let mut raw = claim("raw", "berth-local", "16Mi");
    raw.spec.as_mut().unwrap().volume_mode = Some("Block".into());
    for c in [claim("typo", "typo", "16Mi"), claim("lost", "lost", "16Mi"), raw] {
        let name = c.metadata.name.clone().unwrap();
        claims.create(&PostParams::default(), &c).await.unwrap();
        pods.create(&PostParams::default(), &pod(&name, &name)).await.unwrap();
    }
    for (name, class, words) in
        [("typo", "typo", "\"poool\""), ("lost", "lost", "\"nowhere\""), ("raw", "berth-local", "volumeMode Block")]
    {
        wait_for_event(&w, name, "ProvisioningFailed", words).await;
        // Proof that the claim was looked at again after its event: touched, and a refusal counted after that.
        let refusals = format!(r#"berth_controller_provisions_total{{class="{class}",result="refused"}}"#);
        let before = sample(&metrics_of(&w.controllers[0]).await, &refusals);
        for i in 0..2 {
            let patch = serde_json::json!({"metadata": {"labels": {"touched": i.to_string()}}});
            claims.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
            wait_for_sample(&w.controllers[0], &refusals, before + 1.0 + i as f64).await;
        }
        let failures = failures_of(&w, name).await;
        assert_eq!(failures.len(), 1, "{name}: {failures:?}");
        assert!(failures[0].0.contains(words) && failures[0].1 == 1, "{name}: {failures:?}");
    }
    // The class's fault is said on the class too.
    let on_class = wait_for_event(&w, "typo", "InvalidParameters", "poool").await;
    assert!(on_class.contains("StorageClass \"typo\""), "{on_class}");
    assert_eq!(event_messages(&w, "typo", "InvalidParameters").await.len(), 1);

    // Nothing was asked of any agent for them, nothing made; the block claim lost its node at most once.
    for name in ["typo", "lost", "raw"] {
        let uid = claims.get(name).await.unwrap().metadata.uid.unwrap();
        let volume = berth::naming::volume_name(&uid).unwrap();
        assert_eq!(agent_operations(&w.agents[0], "create", &volume, ""), 0, "{name}: {}", w.agents[0].log());
    }
    let removals = selections.lock().unwrap().removals.get("raw").copied().unwrap_or(0);
    assert!(removals <= 1, "selected-node removed {removals} times");
    assert!(all_volume_dirs(&w).is_empty());
    watching.abort();
}
