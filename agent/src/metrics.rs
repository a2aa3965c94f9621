//! The agent's Prometheus metrics (prefix `berth_`; names in docs/metrics.md).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use berth::agent_api::{PoolStatus, Volume};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub node: String,
    pub pool: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EnforcementLabels {
    pub node: String,
    pub pool: String,
    pub backend: String,
    pub enforcement: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct VolumeLabels {
    pub node: String,
    pub pool: String,
    pub volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: String,
    pub result: String,
}

type Bytes = Gauge<u64, AtomicU64>;

/// How often a scrape may read the volumes (each read takes the agent's lock and one quota or statvfs call per
/// volume; `/metrics` is open to every pod on the node). Any change of the inventory makes the next scrape read
/// them at once, so a deleted volume's series still go with it.
pub const VOLUMES_EVERY: Duration = Duration::from_secs(1);

/// Whether the volumes should be read again, given the last read (`at`, `generation`), now and the inventory's
/// generation now.
pub fn volumes_due(last: Option<(Instant, u64)>, now: Instant, generation: u64) -> bool {
    last.is_none_or(|(at, seen)| seen != generation || now.saturating_duration_since(at) >= VOLUMES_EVERY)
}

pub struct Metrics {
    registry: Registry,
    capacity: Family<PoolLabels, Bytes>,
    allocated: Family<PoolLabels, Bytes>,
    free: Family<PoolLabels, Bytes>,
    volumes: Family<PoolLabels, Gauge>,
    ready: Family<PoolLabels, Gauge>,
    enforcement: Family<EnforcementLabels, Gauge>,
    /// The enforcement last reported per pool, so a change removes the old series.
    enforcement_now: Mutex<BTreeMap<String, EnforcementLabels>>,
    volume_size: Family<VolumeLabels, Bytes>,
    volume_used: Family<VolumeLabels, Bytes>,
    /// The volumes last reported, so deleted ones lose their series.
    volumes_now: Mutex<BTreeSet<VolumeLabels>>,
    /// When the volume series were last read, and at which inventory generation (see [`volumes_due`]).
    volumes_sampled: Mutex<Option<(Instant, u64)>>,
    operations: Family<OperationLabels, Histogram, fn() -> Histogram>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("berth");
        let capacity = Family::<PoolLabels, Bytes>::default();
        let allocated = Family::<PoolLabels, Bytes>::default();
        let free = Family::<PoolLabels, Bytes>::default();
        let volumes = Family::<PoolLabels, Gauge>::default();
        let ready = Family::<PoolLabels, Gauge>::default();
        let enforcement = Family::<EnforcementLabels, Gauge>::default();
        let volume_size = Family::<VolumeLabels, Bytes>::default();
        let volume_used = Family::<VolumeLabels, Bytes>::default();
        let operations: Family<OperationLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 16)));
        registry.register("pool_capacity_bytes", "The most the pool may ever hand out", capacity.clone());
        registry.register("pool_allocated_bytes", "Sum of the sizes of the pool's live volumes", allocated.clone());
        registry.register("pool_free_bytes", "What the pool can still promise now", free.clone());
        registry.register("pool_volumes", "Live volumes in the pool", volumes.clone());
        registry.register("pool_ready", "1 if the pool's root and marker are present, else 0", ready.clone());
        registry.register(
            "pool_enforcement",
            "1 for how the pool keeps volumes within their sizes: none, quota (project quotas) or device (lvm)",
            enforcement.clone(),
        );
        registry.register("volume_size_bytes", "The size promised to the volume", volume_size.clone());
        registry.register(
            "volume_used_bytes",
            "Bytes the volume uses, where its pool can tell (project quotas; lvm filesystems)",
            volume_used.clone(),
        );
        registry.register(
            "agent_operation_duration_seconds",
            "Duration of volume operations by operation and result",
            operations.clone(),
        );
        Metrics {
            registry,
            capacity,
            allocated,
            free,
            volumes,
            ready,
            enforcement,
            enforcement_now: Mutex::default(),
            volume_size,
            volume_used,
            volumes_now: Mutex::default(),
            volumes_sampled: Mutex::default(),
            operations,
        }
    }

    pub fn set_pools(&self, node: &str, pools: &[PoolStatus]) {
        let mut enforcement_now = self.enforcement_now.lock().unwrap_or_else(|p| p.into_inner());
        for p in pools {
            let l = PoolLabels { node: node.into(), pool: p.name.clone(), backend: p.backend.clone() };
            self.capacity.get_or_create(&l).set(p.capacity_bytes);
            self.allocated.get_or_create(&l).set(p.allocated_bytes);
            self.free.get_or_create(&l).set(p.free_bytes);
            self.volumes.get_or_create(&l).set(p.volumes.into());
            self.ready.get_or_create(&l).set(p.ready.into());
            let e = EnforcementLabels {
                node: node.into(),
                pool: p.name.clone(),
                backend: p.backend.clone(),
                enforcement: p.enforcement.clone(),
            };
            if let Some(old) = enforcement_now.insert(p.name.clone(), e.clone())
                && old != e
            {
                self.enforcement.remove(&old);
            }
            self.enforcement.get_or_create(&e).set(1);
        }
    }

    /// Each volume's size and, where known, used bytes; series of volumes no longer there are removed.
    /// Whether a scrape at `now`, with the inventory at `generation`, should read the volumes again.
    pub fn volumes_due(&self, now: Instant, generation: u64) -> bool {
        volumes_due(*self.volumes_sampled.lock().unwrap_or_else(|p| p.into_inner()), now, generation)
    }

    /// The volume series as of `volumes`, read at `at` with the inventory at `generation`.
    pub fn set_volumes(&self, node: &str, volumes: &[Volume], at: Instant, generation: u64) {
        *self.volumes_sampled.lock().unwrap_or_else(|p| p.into_inner()) = Some((at, generation));
        let mut now = self.volumes_now.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = BTreeSet::new();
        for v in volumes {
            let l = VolumeLabels { node: node.into(), pool: v.pool.clone(), volume: v.name.clone() };
            self.volume_size.get_or_create(&l).set(v.size_bytes);
            match v.used_bytes {
                Some(used) => {
                    self.volume_used.get_or_create(&l).set(used);
                }
                None => {
                    self.volume_used.remove(&l);
                }
            }
            seen.insert(l);
        }
        for gone in now.difference(&seen) {
            self.volume_size.remove(gone);
            self.volume_used.remove(gone);
        }
        *now = seen;
    }

    pub fn observe(&self, operation: &str, result: &str, seconds: f64) {
        let labels = OperationLabels { operation: operation.into(), result: result.into() };
        self.operations.get_or_create(&labels).observe(seconds);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_are_read_at_most_once_a_second_unless_the_inventory_changed() {
        let t0 = Instant::now();
        assert!(volumes_due(None, t0, 0), "the first scrape reads them");
        let last = Some((t0, 7));
        assert!(!volumes_due(last, t0 + Duration::from_millis(300), 7), "a scrape loop reuses the last read");
        assert!(volumes_due(last, t0 + Duration::from_millis(300), 8), "a change is shown at once");
        assert!(volumes_due(last, t0 + VOLUMES_EVERY, 7), "usage moves without changes: read again after a second");
    }
}
