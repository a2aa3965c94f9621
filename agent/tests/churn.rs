//! Churn soak (issue 19): many create/delete cycles through the real agent on a loop-mounted disk leave nothing
//! behind — no volume directory, nothing in the pool's staging area, nothing in the inventory or the metrics — and
//! the agent's open descriptors and resident memory do not grow with the number of cycles.
//!
//! CI runs `BERTH_CHURN_CYCLES` cycles (default 200); the full soak of 2,000 is a command in docs/benchmarks.md.
//! What it can see: a descriptor leaked per cycle (any, at 200 cycles: the slack is 4), and memory growing by more
//! than [`RSS_SLACK`] over the measured cycles (at 200 cycles, a leak of about 20 KiB a cycle; at 2,000, 2 KiB).

use std::path::Path;
use std::time::Instant;

use berth::agent_api::{Volume, VolumeList};
use reqwest::{Method, StatusCode};
use serde_json::json;
use testbed::agents::{AgentProcess, PoolSpec};
use testbed::{FsType, TestBed, TestBedConfig};

const MI: u64 = 1 << 20;
/// Cycles run before the first measurement, so that what the agent allocates once (TLS sessions, the token
/// cache, tokio's and glibc's pools) is in the baseline.
const WARMUP: usize = 50;
/// How much the agent's resident memory may grow over the measured cycles.
const RSS_SLACK: u64 = 4 << 20;
/// How many more descriptors the agent may hold after the cycles than before: the connections of the client and
/// of the agent's own API server client may be re-made in between.
const FD_SLACK: usize = 4;

fn cycles() -> usize {
    std::env::var("BERTH_CHURN_CYCLES").ok().map(|v| v.parse().expect("BERTH_CHURN_CYCLES: a number")).unwrap_or(200)
}

/// The agent's open descriptors and resident bytes, from /proc.
fn usage(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    (fds, kib << 10)
}

/// Every entry of the pool root, staging area and marker included.
fn entries(root: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(root).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn staged(root: &Path) -> Vec<String> {
    let staging = root.join(".berth-tmp");
    if staging.exists() { entries(&staging) } else { Vec::new() }
}

struct Churn<'a> {
    agent: &'a AgentProcess,
    http: reqwest::Client,
    token: String,
}

impl Churn<'_> {
    /// One create (with a file written into the volume, as a pod would) and one delete, each answered as it
    /// should be.
    async fn cycle(&self, i: usize) {
        let name = format!("pvc-00000000-0000-4000-8000-{i:012}");
        let body =
            json!({"pool": "fast", "sizeBytes": 4 * MI, "claim": {"namespace": "db", "name": format!("data-{i}")}});
        let put = self.request(Method::PUT, &format!("/v1/volumes/{name}")).json(&body).send().await.unwrap();
        assert_eq!(put.status(), StatusCode::CREATED, "cycle {i}: {}", put.text().await.unwrap_or_default());
        let made: Volume = put.json().await.unwrap();
        std::fs::write(Path::new(&made.path).join("file"), vec![7u8; 64 << 10]).unwrap();
        let del = self.request(Method::DELETE, &format!("/v1/volumes/{name}")).send().await.unwrap();
        assert_eq!(del.status(), StatusCode::OK, "cycle {i}: {}", del.text().await.unwrap_or_default());
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.agent.controller_request(&self.http, method, path, &self.token, 1)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn create_delete_cycles_leave_nothing_and_leak_nothing() {
    let bed = TestBed::start(TestBedConfig::nodes_with_disks(&[256 * MI], FsType::Ext4)).await.unwrap();
    bed.install_berth().await.unwrap();
    let agent =
        bed.start_agent(Path::new(env!("CARGO_BIN_EXE_berth-agent")), 0, &[PoolSpec::new("fast")], true).await.unwrap();
    let pid = agent.pid().expect("the agent runs");
    let churn =
        Churn { agent: &agent, http: agent.http().unwrap(), token: bed.controller_token("node-0").await.unwrap() };
    let root = agent.pool_root("fast").to_owned();
    // The pool's own entries (its marker; the staging area once made), which the cycles must leave as they are.
    let own = |names: Vec<String>| names.into_iter().filter(|n| n != ".berth-tmp").collect::<Vec<_>>();
    let before_any = own(entries(&root));

    for i in 0..WARMUP {
        churn.cycle(i).await;
    }
    let (fds_before, rss_before) = usage(pid);
    let n = cycles();
    let started = Instant::now();
    for i in WARMUP..WARMUP + n {
        churn.cycle(i).await;
    }
    let took = started.elapsed();
    let (fds_after, rss_after) = usage(pid);
    eprintln!(
        "{n} cycles in {took:.1?} ({:.1} ms a cycle); descriptors {fds_before} -> {fds_after}; RSS {} -> {} KiB",
        took.as_secs_f64() * 1000.0 / n as f64,
        rss_before >> 10,
        rss_after >> 10,
    );

    // Nothing left on disk or in the inventory.
    assert_eq!(own(entries(&root)), before_any, "the pool root after {n} cycles");
    assert_eq!(staged(&root), Vec::<String>::new(), "the staging area after {n} cycles");
    let listed: VolumeList = churn.request(Method::GET, "/v1/volumes").send().await.unwrap().json().await.unwrap();
    assert!(listed.volumes.is_empty(), "{:?}", listed.volumes);
    let metrics = churn.http.get(agent.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(!metrics.contains("berth_volume_size_bytes{"), "volume series after every delete:\n{metrics}");
    // Nothing growing with the cycles.
    assert!(fds_after <= fds_before + FD_SLACK, "descriptors {fds_before} -> {fds_after}");
    assert!(rss_after <= rss_before + RSS_SLACK, "RSS {rss_before} -> {rss_after} bytes over {n} cycles");
    // The agent says nothing went wrong.
    let log = agent.log();
    assert!(!log.contains("WARN") && !log.contains("ERROR"), "{log}");
}
