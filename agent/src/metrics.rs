//! The agent's Prometheus metrics (prefix `berth_`; names in docs/metrics.md).

use std::sync::atomic::AtomicU64;

use berth::agent_api::PoolStatus;
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
pub struct OperationLabels {
    pub operation: String,
    pub result: String,
}

type Bytes = Gauge<u64, AtomicU64>;

pub struct Metrics {
    registry: Registry,
    capacity: Family<PoolLabels, Bytes>,
    allocated: Family<PoolLabels, Bytes>,
    free: Family<PoolLabels, Bytes>,
    volumes: Family<PoolLabels, Gauge>,
    ready: Family<PoolLabels, Gauge>,
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
        let operations: Family<OperationLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 16)));
        registry.register("pool_capacity_bytes", "The most the pool may ever hand out", capacity.clone());
        registry.register("pool_allocated_bytes", "Sum of the sizes of the pool's live volumes", allocated.clone());
        registry.register("pool_free_bytes", "What the pool can still promise now", free.clone());
        registry.register("pool_volumes", "Live volumes in the pool", volumes.clone());
        registry.register("pool_ready", "1 if the pool's root and marker are present, else 0", ready.clone());
        registry.register(
            "agent_operation_duration_seconds",
            "Duration of volume operations by operation and result",
            operations.clone(),
        );
        Metrics { registry, capacity, allocated, free, volumes, ready, operations }
    }

    pub fn set_pools(&self, node: &str, pools: &[PoolStatus]) {
        for p in pools {
            let l = PoolLabels { node: node.into(), pool: p.name.clone(), backend: p.backend.clone() };
            self.capacity.get_or_create(&l).set(p.capacity_bytes);
            self.allocated.get_or_create(&l).set(p.allocated_bytes);
            self.free.get_or_create(&l).set(p.free_bytes);
            self.volumes.get_or_create(&l).set(p.volumes.into());
            self.ready.get_or_create(&l).set(p.ready.into());
        }
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
