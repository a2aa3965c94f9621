//! Create+delete latency through the agent's API against the same directory operations done directly.
//!
//!     cargo bench -p berth-agent --bench api_latency [-- ROUNDS]
//!
//! Both sides run in one process, on the same loop-mounted ext4 disk of a test-bed node, interleaved round by
//! round so machine noise hits both alike. The API side is a real `berth-agent` with HTTPS and a TokenReview-
//! checked token (cached after the first call, as in steady state). The direct side does what the hostpath
//! backend does for a volume (staging dir, data dir, chmod, marker written and fsynced, rename; rename aside and
//! remove) without HTTP, auth or bookkeeping.

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use testbed::agents::PoolSpec;
use testbed::{FsType, TestBed, TestBedConfig};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn direct_create_delete(root: &Path, i: usize) {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let staging = root.join(".bench-tmp");
    std::fs::create_dir_all(&staging).unwrap();
    let work = staging.join(format!("v{i}"));
    std::fs::create_dir(&work).unwrap();
    std::fs::create_dir(work.join("data")).unwrap();
    std::fs::set_permissions(work.join("data"), std::fs::Permissions::from_mode(0o750)).unwrap();
    let mut f = std::fs::File::create_new(work.join("volume.json")).unwrap();
    f.write_all(br#"{"version":1,"name":"x"}"#).unwrap();
    f.sync_all().unwrap();
    std::fs::File::open(&work).unwrap().sync_all().unwrap();
    let target = root.join(format!("direct-{i}"));
    std::fs::rename(&work, &target).unwrap();
    std::fs::File::open(root).unwrap().sync_all().unwrap();
    let doomed = staging.join(format!("d{i}"));
    std::fs::rename(&target, &doomed).unwrap();
    std::fs::File::open(root).unwrap().sync_all().unwrap();
    std::fs::remove_dir_all(&doomed).unwrap();
}

fn report(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let (p50, p90, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.9), percentile(&samples, 0.99));
    println!("{name:<28} p50 {:>8.3} ms   p90 {:>8.3} ms   p99 {:>8.3} ms", ms(p50), ms(p90), ms(p99));
    p50
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(200);
    let bed = TestBed::start(TestBedConfig::nodes_with_disks(&[1 << 30], FsType::Ext4)).await.unwrap();
    bed.install_berth().await.unwrap();
    let agent = bed
        .start_agent(Path::new(env!("CARGO_BIN_EXE_berth-agent")), 0, &[PoolSpec::new("bench")], true)
        .await
        .unwrap();
    let http = agent.http().unwrap();
    let token = bed.controller_token("node-0").await.unwrap();
    let direct_root = agent.pool_root("bench").parent().unwrap().join("direct");
    std::fs::create_dir_all(&direct_root).unwrap();
    let body = json!({"pool": "bench", "sizeBytes": 1 << 20, "claim": {"namespace": "bench", "name": "c"}});

    let (mut api, mut direct) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for i in 0..rounds + 10 {
        let name = format!("pvc-00000000-0000-4000-8000-{i:012}");
        let started = Instant::now();
        let path = format!("/v1/volumes/{name}");
        let created = agent.controller_request(&http, Method::PUT, &path, &token, 1).json(&body).send().await.unwrap();
        assert_eq!(created.status(), 201, "{}", created.text().await.unwrap());
        let deleted = agent.controller_request(&http, Method::DELETE, &path, &token, 1).send().await.unwrap();
        assert_eq!(deleted.status(), 200);
        let api_time = started.elapsed();
        let started = Instant::now();
        direct_create_delete(&direct_root, i);
        let direct_time = started.elapsed();
        if i >= 10 {
            // The first rounds warm connections and the token cache.
            api.push(api_time);
            direct.push(direct_time);
        }
    }
    println!(
        "create+delete of one directory volume, {rounds} rounds, {} on a loop-mounted ext4 disk",
        env!("CARGO_PKG_VERSION")
    );
    let a = report("through the agent API", api);
    let d = report("directly (same fs ops)", direct);
    println!("ratio (API p50 / direct p50): {:.2}", a.as_secs_f64() / d.as_secs_f64());
}
