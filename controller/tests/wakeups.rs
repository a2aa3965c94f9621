//! What a change of a class, a Node or an agent's BerthNode costs (issue 22): it wakes only the claims that wait
//! for a volume, never the Bound ones, and a standby's backlog of such changes is one pass when it takes over.
//! Counted by `berth_controller_reconciles_total{controller="claims"}` on the real control plane.

mod common;

use std::time::{Duration, Instant};

use berth::berth_node::BerthNode;
use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use testbed::process::Proc;

const LEASE: [&str; 2] = ["--lease-duration-seconds=4", "--lease-renew-before-seconds=2"];
const CLAIMS_SERIES: &str = r#"berth_controller_reconciles_total{controller="claims"}"#;
/// Bound claims: what every heartbeat used to reconcile.
const BOUND: usize = 1000;

/// The replica's claim reconciles once they stop changing (none for 3 s; at most 2 minutes). Reconciles run after
/// the watch events that cause them, so an upper bound is checked once they have settled: a bug that causes extra
/// passes keeps the count moving and is counted.
async fn settled_reconciles(proc: &Proc) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = sample(&metrics_of(proc).await, CLAIMS_SERIES);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = sample(&metrics_of(proc).await, CLAIMS_SERIES);
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= Duration::from_secs(3) {
            return now;
        }
        assert!(Instant::now() < deadline, "claim reconciles still moving after 2 minutes: {now}");
    }
}

/// `count` heartbeats of the agent's BerthNode, as the agent writes them: a new `heartbeatTime`, one at a time.
async fn heartbeats(w: &World, node: &str, count: usize) {
    let api: Api<BerthNode> = Api::all(w.bed.client());
    for i in 0..count {
        let time = format!("2026-01-01T00:{:02}:{:02}Z", i / 60 % 60, i % 60);
        let patch = serde_json::json!({"status": {"heartbeatTime": time}});
        api.patch_status(node, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_wake_only_waiting_claims_and_a_standby_backlog_is_one_pass() {
    let mut w = world_without_controller(&[2048 * MI]).await;
    let mut a = w.bed.start_controller_named("replica-a", &controller_bin(), &LEASE, &[]).await.unwrap();
    wait_for_log(&a, &["leading"], WAIT).await;

    // BOUND claims provisioned and Bound (Immediate: no pods needed).
    add_class(&w, class("berth-now", "Immediate", "Delete", &[("pool", "fast")])).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(w.bed.client(), "app");
    let created = Instant::now();
    futures::stream::iter(0..BOUND)
        .for_each_concurrent(16, |i| {
            let claims = claims.clone();
            async move {
                claims.create(&PostParams::default(), &claim(&format!("c-{i}"), "berth-now", "1Mi")).await.unwrap();
            }
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let list = claims.list(&ListParams::default()).await.unwrap().items;
        if list.iter().filter(|c| bound(c)).count() == BOUND {
            break;
        }
        assert!(Instant::now() < deadline, "{BOUND} claims not Bound within 300 s");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!("{BOUND} claims Bound in {:.0} s", created.elapsed().as_secs_f64());
    // One claim that waits: its pool is on no node yet (an agent's new pool would unblock it).
    add_class(&w, class("berth-slow", "Immediate", "Delete", &[("pool", "slow")])).await;
    claims.create(&PostParams::default(), &claim("later", "berth-slow", "1Mi")).await.unwrap();
    wait_for_event(&w, "later", "ProvisioningFailed", "exists on no node").await;
    let waiting = 1.0;

    let b = w.bed.start_controller_named("replica-b", &controller_bin(), &LEASE, &[]).await.unwrap();
    wait_for_log(&b, &["standing by"], WAIT).await;
    let node = w.agents[0].node.clone();

    // 1. The leader: 100 heartbeats wake the waiting claim, not the Bound ones.
    let before = settled_reconciles(&a).await;
    heartbeats(&w, &node, 100).await;
    let after = settled_reconciles(&a).await;
    println!("leader: {} claim reconciles for 100 heartbeats", after - before);
    // Each heartbeat may wake the waiting claim once; the slack is for the agent's own heartbeats meanwhile.
    assert!(after - before <= 100.0 * waiting + 10.0, "100 heartbeats cost {} reconciles", after - before);

    // 2. The standby saw those and 900 more; it reconciles nothing while it stands by.
    heartbeats(&w, &node, 900).await;
    assert_eq!(sample(&metrics_of(&b).await, CLAIMS_SERIES), 0.0, "a standby reconciles nothing");
    a.signal_and_wait(libc::SIGKILL, Duration::from_secs(5)).unwrap();
    wait_for_log(&b, &["leading"], WAIT).await;
    // Its first pass over every claim, and the backlog of 1,000 heartbeats as one pass over the waiting claim.
    let first_pass = BOUND as f64 + waiting;
    let took_over = settled_reconciles(&b).await;
    println!("standby: {took_over} claim reconciles at takeover ({first_pass} claims)");
    assert!(took_over >= first_pass, "the new leader looks at every claim once: {took_over}");
    assert!(took_over <= first_pass + waiting + 10.0, "the backlog is one pass: {took_over} reconciles");
    w.controllers.extend([a, b]);
}
