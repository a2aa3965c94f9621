//! What a Berth volume costs a pod on a real node: the time from creating a pod to its being Running, with a new
//! WaitForFirstConsumer claim of `berth-local` (a directory volume: the scheduler's capacity check, the controller,
//! the agent, the PV, kubelet's `local` mount) against the same pod with an emptyDir, alternated pod by pod on the
//! same boot (these machines are noisy). Berth is installed from deploy/ as in tests/tests/real_node.rs.
//!
//!   cargo bench -p berth-tests --features vm-tier --bench cost_of_use       # 10 of each; a number after `--` for more
//!
//! Needs what hack/test-vm --real-node needs (BERTH_NODE_BINS, BERTH_IMAGES, or the scripts that make them; root).
//! Results go to docs/benchmarks.md.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::Api;
use testbed::demo::{PodUse, VolumeMode, create_claim, run_pod};
use testbed::deploy::{self, Install};
use testbed::kube_util::{create_namespace, wait_deleted};
use testbed::{TestBed, TestBedConfig};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Creates (with its claim, for Berth) and waits until Running the pod `name`; then deletes it (and the claim,
/// waiting until its PV is gone) so that every round starts from the same node. Returns the create → Running time.
async fn one(client: &kube::Client, name: &str, berth: bool) -> anyhow::Result<Duration> {
    let pod = PodUse { stays: true, empty_dir: !berth, ..PodUse::new(name, name, "exec sleep 2147483647") };
    let started = Instant::now();
    if berth {
        create_claim(client, "bench", name, "berth-local", "16Mi", VolumeMode::Filesystem).await?;
    }
    run_pod(client, "bench", &pod).await?;
    let took = started.elapsed();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "bench");
    pods.delete(name, &Default::default()).await?;
    wait_deleted(&pods, name, Duration::from_secs(60)).await?;
    if berth {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "bench");
        let volume = claims.get(name).await?.spec.and_then(|s| s.volume_name).unwrap_or_default();
        claims.delete(name, &Default::default()).await?;
        wait_deleted(&Api::<PersistentVolume>::all(client.clone()), &volume, Duration::from_secs(60)).await?;
    }
    Ok(took)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(10);
    let bed = TestBed::start(TestBedConfig::real_node()).await?;
    let node = bed.real_node().expect("a real node").spec.name.clone();
    deploy::apply(&bed, &Install::default(), &bed.dir().join("install"))?;
    deploy::init_pool(&bed, &node, "local").await?;
    deploy::wait_pool(&bed.client(), &node, "local", Duration::from_secs(120), |p| p.ready).await?;
    let examples = testbed::bins::repo_root().join("deploy/examples");
    deploy::kubectl(&bed, &["apply", "-k", &examples.display().to_string()])?;
    let client = bed.client();
    create_namespace(&client, "bench").await?;
    // One of each first, not counted: the first pods pay for what stays cached (the image's first use).
    one(&client, "warm-berth", true).await?;
    one(&client, "warm-empty", false).await?;
    let (mut berth, mut empty) = (vec![], vec![]);
    for round in 0..rounds {
        // Alternating which goes first, so that neither always follows the other's deletion.
        let order = if round % 2 == 0 { [true, false] } else { [false, true] };
        for uses_berth in order {
            let name = format!("{}-{round}", if uses_berth { "berth" } else { "empty" });
            let took = one(&client, &name, uses_berth).await?;
            println!("{name}: {}", ms(took));
            if uses_berth { berth.push(took) } else { empty.push(took) }
        }
    }
    let (b, e) = (median(berth.clone()), median(empty.clone()));
    let spread = |v: &[Duration]| format!("{} – {}", ms(*v.iter().min().unwrap()), ms(*v.iter().max().unwrap()));
    println!("\ncreate → Running, {rounds} pods each, medians (min – max):");
    println!("  with a new berth-local claim  {}  ({})", ms(b), spread(&berth));
    println!("  with an emptyDir              {}  ({})", ms(e), spread(&empty));
    println!("  ratio (Berth / emptyDir)      {:.2}", b.as_secs_f64() / e.as_secs_f64());
    println!("  Berth's cost (difference)     {}", ms(b.saturating_sub(e)));
    Ok(())
}
