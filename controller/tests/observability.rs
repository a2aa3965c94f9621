//! A real Prometheus scrapes the agents and the controller of a running cluster: what it reports per node and pool
//! is what the agents report, and every query of the Grafana dashboard returns series with its legend's labels.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, PostParams};
use testbed::bins::repo_root;
use testbed::kube_util::{wait_deleted, wait_for};

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_sees_what_the_agents_report_and_every_dashboard_query_has_data() {
    let w = world(&[256 * MI, 512 * MI]).await;
    let client = w.bed.client();
    // Activity for the counters: one claim provisioned and deleted, one refused.
    let classes: Api<StorageClass> = Api::all(client.clone());
    classes
        .create(&PostParams::default(), &class("berth-local", "WaitForFirstConsumer", "Delete", &[("pool", "fast")]))
        .await
        .unwrap();
    classes
        .create(
            &PostParams::default(),
            &class("berth-bad", "Immediate", "Delete", &[("pool", "fast"), ("colour", "red")]),
        )
        .await
        .unwrap();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "app");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    claims.create(&PostParams::default(), &claim("refused", "berth-bad", "16Mi")).await.unwrap();
    claims.create(&PostParams::default(), &claim("data", "berth-local", "64Mi")).await.unwrap();
    pods.create(&PostParams::default(), &pod("db", "data")).await.unwrap();
    let pv = wait_for(&claims, "data", WAIT, bound).await.unwrap().spec.unwrap().volume_name.unwrap();
    pods.delete("db", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await.unwrap();
    claims.delete("data", &DeleteParams::default()).await.unwrap();
    wait_deleted(&Api::<PersistentVolume>::all(client.clone()), &pv, WAIT).await.unwrap();

    let controller = metrics_address(&w.controllers[0]).await;
    let agents: Vec<_> = w.agents.iter().collect();
    let prometheus = w.bed.start_prometheus(&agents, &[controller]).await.unwrap();

    // Every target is up, and the counters have been scraped a few times (rate() needs two samples).
    let deadline = Instant::now() + WAIT;
    loop {
        let up = prometheus.query("up").await.unwrap();
        if up.len() == 3 && up.iter().all(|(_, v)| *v == 1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "targets not up: {up:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    loop {
        let scrapes = prometheus.query("count_over_time(up[5m])").await.unwrap();
        if scrapes.len() == 3 && scrapes.iter().all(|(_, v)| *v >= 2.0) {
            break;
        }
        assert!(Instant::now() < deadline, "targets not scraped twice: {scrapes:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Free bytes per node and pool: what each agent reports (its BerthNode status carries the same numbers).
    let mut reported = BTreeMap::new();
    for a in &w.agents {
        let token = w.bed.controller_token(&a.node).await.unwrap();
        let list: serde_json::Value =
            a.http().unwrap().get(a.url("/v1/pools")).bearer_auth(token).send().await.unwrap().json().await.unwrap();
        for p in list["pools"].as_array().unwrap() {
            reported.insert((a.node.clone(), p["name"].as_str().unwrap().to_owned()), p["freeBytes"].as_f64().unwrap());
        }
    }
    let scraped: BTreeMap<(String, String), f64> = prometheus
        .query("berth_pool_free_bytes")
        .await
        .unwrap()
        .into_iter()
        .map(|(l, v)| ((l["node"].as_str().unwrap().to_owned(), l["pool"].as_str().unwrap().to_owned()), v))
        .collect();
    assert_eq!(scraped, reported, "Prometheus's berth_pool_free_bytes against the agents' /v1/pools");
    assert_eq!(scraped.len(), 2);

    // Each agent's version as its BerthNode publishes it (release+commit), logged by the controller once per agent
    // however many heartbeats came since (deploy/README.md, "Versions and upgrades"). The same binaries: no warning.
    let log = w.controllers[0].log_text();
    for a in &w.agents {
        let node = format!("node={} ", a.node);
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("agent version") && l.contains(&node)).collect();
        assert_eq!(lines.len(), 1, "one line for {}'s agent:\n{log}", a.node);
        assert!(lines[0].contains(&format!("agent_version={}", berth::version::full())), "{}", lines[0]);
    }
    assert!(!log.contains("outside the supported skew"), "{log}");

    // Every dashboard query, against this Prometheus.
    let out = std::process::Command::new(repo_root().join("hack/test-dashboard"))
        .args(["--url", &prometheus.url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dashboard queries against real metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
