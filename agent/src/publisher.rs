//! Publishes the agent in its node's `BerthNode`: endpoint, certificate, pools. Free space is sampled often
//! (statvfs is cheap) so a disk filling up outside Berth shows within about a second, but the status is only
//! written when something changed meaningfully or the heartbeat is due, so an idle node does not churn the API.

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth::agent_api::PoolStatus;
use berth::berth_node::{BerthNode, BerthNodeSpec, BerthNodeStatus, BerthNodeSummary, human_bytes};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};

use crate::agent::Agent;
use crate::metrics::Metrics;

pub const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// Free-space changes smaller than this are not worth a status write on their own.
pub const FREE_CHANGE_THRESHOLD: u64 = 1 << 20;
const MANAGER: &str = "berth-agent";

/// Whether the newly observed pools differ meaningfully from the last written ones.
pub fn meaningful_change(last: &[PoolStatus], now: &[PoolStatus]) -> bool {
    if last.len() != now.len() {
        return true;
    }
    last.iter().zip(now).any(|(a, b)| {
        let moved = |x: u64, y: u64| x.abs_diff(y) >= FREE_CHANGE_THRESHOLD;
        a.name != b.name
            || a.backend != b.backend
            || a.ready != b.ready
            || a.reason != b.reason
            || a.capacity_bytes != b.capacity_bytes
            || a.allocated_bytes != b.allocated_bytes
            || a.volumes != b.volumes
            || a.enforcement != b.enforcement
            || a.enforcement_reason != b.enforcement_reason
            || moved(a.free_bytes, b.free_bytes)
            || moved(a.maximum_volume_size_bytes, b.maximum_volume_size_bytes)
            // Reaching zero always counts: the scheduler must stop sending volumes here.
            || ((a.free_bytes == 0) != (b.free_bytes == 0))
    })
}

pub fn summary(pools: &[PoolStatus]) -> BerthNodeSummary {
    let names: Vec<String> =
        pools.iter().map(|p| if p.ready { p.name.clone() } else { format!("{} (not ready)", p.name) }).collect();
    let ready = || pools.iter().filter(|p| p.ready);
    BerthNodeSummary {
        pools: names.join(","),
        free: human_bytes(ready().map(|p| p.free_bytes).sum()),
        capacity: human_bytes(ready().map(|p| p.capacity_bytes).sum()),
        volumes: pools.iter().map(|p| p.volumes).sum(),
    }
}

pub struct Publisher {
    pub client: kube::Client,
    pub agent: Arc<Agent>,
    pub metrics: Arc<Metrics>,
    pub endpoint: String,
    pub certificate: String,
    /// The longest the status goes unwritten: the controller takes an agent whose status has not changed for its
    /// `--agent-stale-after` for dead, so this must stay well below that.
    pub heartbeat: Duration,
}

impl Publisher {
    async fn ensure_object(&self) -> anyhow::Result<()> {
        let node = &self.agent.node;
        let owner = match Api::<Node>::all(self.client.clone()).get_opt(node).await? {
            Some(n) => n.controller_owner_ref(&()).map(|mut o: OwnerReference| {
                // Owned, not controlled: the Node's deletion collects the BerthNode, nothing more.
                o.controller = None;
                o.block_owner_deletion = None;
                o
            }),
            None => {
                tracing::warn!(node = %node, "no Node object of this name; the BerthNode will not be garbage-collected with it");
                None
            }
        };
        let mut object = BerthNode::new(node, BerthNodeSpec { node_name: node.clone() });
        object.metadata.owner_references = owner.map(|o| vec![o]);
        let api: Api<BerthNode> = Api::all(self.client.clone());
        api.patch(node, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&object)).await?;
        Ok(())
    }

    async fn write_status(&self, pools: &[PoolStatus]) -> anyhow::Result<()> {
        let now = time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339)?;
        let status = BerthNodeStatus {
            endpoint: self.endpoint.clone(),
            certificate: self.certificate.clone(),
            agent_version: berth::version::full(),
            pools: pools.to_vec(),
            summary: summary(pools),
            heartbeat_time: now,
        };
        let patch = serde_json::json!({
            "apiVersion": "berth.dev/v1alpha1",
            "kind": "BerthNode",
            "status": status,
        });
        let api: Api<BerthNode> = Api::all(self.client.clone());
        api.patch_status(&self.agent.node, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await?;
        Ok(())
    }

    /// Runs until the task is dropped. API errors are logged and retried at the next sample.
    pub async fn run(self) {
        let mut object_ready = false;
        let mut last_written: Option<(Vec<PoolStatus>, Instant)> = None;
        loop {
            let agent = self.agent.clone();
            let pools = match tokio::task::spawn_blocking(move || agent.pool_statuses()).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "sampling pools failed");
                    tokio::time::sleep(SAMPLE_EVERY).await;
                    continue;
                }
            };
            self.metrics.set_pools(&self.agent.node, &pools);
            let due = match &last_written {
                None => true,
                Some((last, at)) => meaningful_change(last, &pools) || at.elapsed() >= self.heartbeat,
            };
            if due {
                if !object_ready {
                    match self.ensure_object().await {
                        Ok(()) => object_ready = true,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot create the BerthNode; retrying")
                        }
                    }
                }
                if object_ready {
                    match self.write_status(&pools).await {
                        Ok(()) => last_written = Some((pools, Instant::now())),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot write the BerthNode status; retrying");
                            object_ready = false; // it may have been deleted
                        }
                    }
                }
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(free: u64) -> PoolStatus {
        PoolStatus {
            name: "fast".into(),
            backend: "hostpath".into(),
            ready: true,
            reason: None,
            capacity_bytes: 10 << 30,
            allocated_bytes: 0,
            free_bytes: free,
            maximum_volume_size_bytes: free,
            volumes: 0,
            enforcement: "none".into(),
            enforcement_reason: None,
        }
    }

    #[test]
    fn small_free_space_jitter_is_not_worth_a_write() {
        assert!(!meaningful_change(&[pool(5 << 30)], &[pool((5 << 30) - 4096)]));
        assert!(meaningful_change(&[pool(5 << 30)], &[pool((5 << 30) - (2 << 20))]));
        assert!(meaningful_change(&[pool(4096)], &[pool(0)]), "reaching zero always counts");
    }

    #[test]
    fn any_other_change_is_worth_a_write() {
        let mut other = pool(1 << 30);
        other.volumes = 1;
        assert!(meaningful_change(&[pool(1 << 30)], &[other.clone()]));
        other = pool(1 << 30);
        other.ready = false;
        assert!(meaningful_change(&[pool(1 << 30)], &[other]));
        assert!(meaningful_change(&[pool(1 << 30)], &[]));
    }

    #[test]
    fn summary_counts_only_ready_pools_free_space() {
        let mut down = pool(3 << 30);
        down.name = "slow".into();
        down.ready = false;
        let s = summary(&[pool(1 << 30), down]);
        assert_eq!(s.pools, "fast,slow (not ready)");
        assert_eq!(s.free, "1.0Gi");
    }
}
