//! What a test looks at on the real node itself: files under a pool root (through `kubectl exec` in the agent's
//! pod, which mounts the pools at their host paths) and kubelet's own view of volumes (its `/stats/summary` and
//! `/metrics`, through the API server's node proxy).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::TestBed;
use crate::deploy::{NAMESPACE, agent_pod, kubectl};

/// Runs `script` under `sh -c` in `node`'s agent container; its standard output.
pub async fn agent_sh(bed: &TestBed, node: &str, script: &str) -> Result<String> {
    let pod = agent_pod(&bed.client(), node).await?;
    let name = pod.metadata.name.context("pod without a name")?;
    kubectl(bed, &["-n", NAMESPACE, "exec", &name, "-c", "agent", "--", "sh", "-c", script])
}

/// The capacity kubelet's `/stats/summary` reports for volume `volume` of pod `namespace/pod`, once it reports one.
pub fn summary_capacity(bed: &TestBed, node: &str, namespace: &str, pod: &str, volume: &str) -> Result<Option<u64>> {
    let raw = kubectl(bed, &["get", "--raw", &format!("/api/v1/nodes/{node}/proxy/stats/summary")])?;
    let summary: serde_json::Value = serde_json::from_str(&raw).context("kubelet's /stats/summary")?;
    let pods = summary["pods"].as_array().into_iter().flatten();
    let ours = pods.filter(|p| p["podRef"]["namespace"] == namespace && p["podRef"]["name"] == pod);
    let volumes = ours.flat_map(|p| p["volume"].as_array().into_iter().flatten());
    Ok(volumes.filter(|v| v["name"] == volume).find_map(|v| v["capacityBytes"].as_u64()))
}

/// The value of kubelet's `kubelet_volume_stats_capacity_bytes` for claim `namespace/claim`, once it has one.
pub fn metric_capacity(bed: &TestBed, node: &str, namespace: &str, claim: &str) -> Result<Option<f64>> {
    let text = kubectl(bed, &["get", "--raw", &format!("/api/v1/nodes/{node}/proxy/metrics")])?;
    let labels = [format!("namespace=\"{namespace}\""), format!("persistentvolumeclaim=\"{claim}\"")];
    let sample = text
        .lines()
        .filter(|l| l.starts_with("kubelet_volume_stats_capacity_bytes{"))
        .find(|l| labels.iter().all(|label| l.contains(label.as_str())));
    match sample.and_then(|l| l.rsplit_once(' ')) {
        Some((_, value)) => Ok(Some(value.parse().with_context(|| format!("metric value {value:?}"))?)),
        None => Ok(None),
    }
}

/// Polls `probe` every second until it gives a value or `timeout` passes (kubelet computes volume stats every
/// volumeStatsAggPeriod, 10 s on the real node).
pub async fn poll<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let started = Instant::now();
    loop {
        if let Some(value) = probe()? {
            return Ok(value);
        }
        if started.elapsed() > timeout {
            bail!("{what}: nothing within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
