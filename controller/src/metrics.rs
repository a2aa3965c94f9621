//! The controller's Prometheus metrics (prefix `berth_controller_`; names in docs/metrics.md) and the small HTTP
//! server for them and the probes: `/healthz` (the process runs), `/readyz` (caches filled; a standby is ready
//! too, or a PodDisruptionBudget would count it unavailable), `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub class: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: String,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub node: String,
    pub pool: String,
}

type Durations = Family<ResultLabels, Histogram, fn() -> Histogram>;

/// How a provisioning or deletion attempt ended (the `result` label).
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Success,
    Error,
    Refused,
    Rescheduled,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Error => "error",
            Outcome::Refused => "refused",
            Outcome::Rescheduled => "rescheduled",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    provisions: Family<ResultLabels, Counter>,
    provision_duration: Durations,
    deletions: Family<ResultLabels, Counter>,
    delete_duration: Durations,
    reconciles: Family<ControllerLabels, Counter>,
    reconcile_errors: Family<ErrorLabels, Counter>,
    pub workqueue_depth: Gauge,
    agents: Family<StateLabels, Gauge>,
    orphans: Family<PoolLabels, Gauge>,
    retained: Family<PoolLabels, Gauge>,
    pub missing_volumes: Gauge,
    pub audits: Counter,
    pub leader: Gauge,
    ready: AtomicBool,
}

fn durations() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("berth_controller");
        let m = Metrics {
            provisions: Family::default(),
            provision_duration: Family::new_with_constructor(durations as fn() -> Histogram),
            deletions: Family::default(),
            delete_duration: Family::new_with_constructor(durations as fn() -> Histogram),
            reconciles: Family::default(),
            reconcile_errors: Family::default(),
            workqueue_depth: Gauge::default(),
            agents: Family::default(),
            orphans: Family::default(),
            retained: Family::default(),
            missing_volumes: Gauge::default(),
            audits: Counter::default(),
            leader: Gauge::default(),
            ready: AtomicBool::new(false),
            registry: Registry::default(),
        };
        registry.register("provisions", "Provisioning attempts by class and result", m.provisions.clone());
        registry.register(
            "provision_duration_seconds",
            "From the start of a provisioning reconcile to its outcome (PV created, refused, rescheduled, failed), by class and result",
            m.provision_duration.clone(),
        );
        registry.register("deletions", "Volume deletions by class and result", m.deletions.clone());
        registry.register(
            "delete_duration_seconds",
            "Duration of volume deletions (agent delete and PV removal), by class and result",
            m.delete_duration.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciles started, by controller (claims, volumes): what changes and the claims' own events cost",
            m.reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed and are retried with backoff, by controller (claims, volumes) and kind of error",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "workqueue_depth",
            "Claims of this provisioner without a PV yet (waiting for the scheduler, refused, or being provisioned)",
            m.workqueue_depth.clone(),
        );
        registry.register(
            "agents",
            "BerthNodes known, and ready (published an endpoint and a heartbeat in the last 3 minutes)",
            m.agents.clone(),
        );
        registry.register(
            "orphan_volumes",
            "Volumes never published (no PV was ever made for them) whose claim is gone or moved, found by the last orphan audit, by node and pool",
            m.orphans.clone(),
        );
        registry.register(
            "retained_volumes",
            "Volumes that had a PV and have none now (a Retain volume whose PV was deleted): kept, never deleted by Berth; by node and pool",
            m.retained.clone(),
        );
        registry.register("orphan_audits", "Completed orphan audits", m.audits.clone());
        registry.register(
            "missing_volumes",
            "PVs whose volume their agent does not have, found by the last orphan audit",
            m.missing_volumes.clone(),
        );
        registry.register("leader", "1 on the replica that holds the lease, else 0", m.leader.clone());
        Metrics { registry, ..m }
    }

    pub fn provisioned(&self, class: &str, outcome: Outcome, took: Duration) {
        let labels = ResultLabels { class: class.to_owned(), result: outcome.label().to_owned() };
        self.provisions.get_or_create(&labels).inc();
        self.provision_duration.get_or_create(&labels).observe(took.as_secs_f64());
    }

    pub fn deleted(&self, class: &str, outcome: Outcome, took: Duration) {
        let labels = ResultLabels { class: class.to_owned(), result: outcome.label().to_owned() };
        self.deletions.get_or_create(&labels).inc();
        self.delete_duration.get_or_create(&labels).observe(took.as_secs_f64());
    }

    pub fn reconciling(&self, controller: &str) {
        self.reconciles.get_or_create(&ControllerLabels { controller: controller.into() }).inc();
    }

    pub fn reconcile_failed(&self, controller: &str, error: &str) {
        self.reconcile_errors.get_or_create(&ErrorLabels { controller: controller.into(), error: error.into() }).inc();
    }

    pub fn set_agents(&self, known: i64, ready: i64) {
        self.agents.get_or_create(&StateLabels { state: "known".into() }).set(known);
        self.agents.get_or_create(&StateLabels { state: "ready".into() }).set(ready);
    }

    /// Replaces the orphan and retained counts with those of the last audit (a node and pool without any reads 0).
    pub fn set_audit_counts(&self, orphans: &[((String, String), i64)], retained: &[((String, String), i64)]) {
        for (family, counts) in [(&self.orphans, orphans), (&self.retained, retained)] {
            family.clear();
            for ((node, pool), n) in counts {
                family.get_or_create(&PoolLabels { node: node.clone(), pool: pool.clone() }).set(*n);
            }
        }
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

async fn render(State(m): State<Arc<Metrics>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.encode()).into_response()
}

async fn readyz(State(m): State<Arc<Metrics>>) -> Response {
    if m.ready.load(Ordering::SeqCst) {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not filled yet").into_response()
    }
}

/// Serves the probes and metrics on `address` until the process ends.
pub async fn serve(address: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render))
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {address} (--metrics-address): {e}"))?;
    tracing::info!(address = %listener.local_addr()?, "serving /healthz, /readyz and /metrics");
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(())
}
