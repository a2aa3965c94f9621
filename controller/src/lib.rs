//! The `berth-controller` binary's code (a library so that the test-only failpoints binary runs the same code):
//! turns claims of Berth's StorageClasses into volumes on the right node and PVs pinned to it,
//! and frees the storage of released PVs by their reclaim policy.

mod agent_client;
mod agent_versions;
mod audit;
mod capacity;
mod claims;
mod clone;
mod context;
mod decide;
mod delete;
mod error;
mod expand;
mod failpoints;
mod leader;
mod liveness;
mod metrics;
mod params;
mod provision;
mod pv;
mod uninstall;
mod wake;

use std::sync::Arc;

use anyhow::{Context as _, Result};
use berth::berth_node::BerthNode;
use clap::Parser;
use futures::StreamExt;
use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{WatchStreamExt, reflector, watcher};

/// Berth's controller: watches claims whose StorageClass names this provisioner, has the selected node's agent
/// create the volume (or picks the node with the most free space for Immediate classes), creates the PV pinned to
/// that node, and deletes volumes of released PVs with reclaim policy Delete. It publishes each pool's free space
/// per StorageClass and node as CSIStorageCapacity objects in --namespace, so kube-scheduler places pods only where
/// their volumes fit (needs deploy/csidriver.yaml).
///
/// Run two replicas: they elect a leader on a Lease in --namespace; the others stand by with warm caches and take
/// over when the lease expires (at once when the leader is stopped with SIGTERM, which releases it). See
/// ARCHITECTURE.md.
///
/// It serves the provisioner `local.berth.dev` (StorageClasses name it), one install per cluster.
#[derive(Parser, Debug)]
#[command(name = "berth-controller", version = berth::version::long())]
pub struct Args {
    /// Namespace of the controller's ServiceAccount (tokens for the agents are requested for it).
    #[arg(long, env = "BERTH_NAMESPACE", default_value = "berth-system")]
    namespace: String,
    /// The controller's ServiceAccount: agents accept only its tokens.
    #[arg(long, default_value = "berth-controller")]
    service_account: String,
    /// Seconds between two orphan audits. Each compares every agent's volumes with the PVs: a volume with a PV is
    /// marked published on its agent (also once at start); a published volume without a PV (a Retain volume
    /// whose PV an administrator deleted) is reported, never deleted; a volume never published whose claim is
    /// gone, or whose claim's volume is on another node, is an orphan; a PV whose volume is missing is reported.
    #[arg(long, default_value_t = 60)]
    orphan_audit_interval_seconds: u64,
    /// A never-published volume is an orphan only when older than this many seconds.
    #[arg(long, default_value_t = 600)]
    orphan_grace_seconds: u64,
    /// What to do with an orphan (a volume no PV was ever made for, left by a crash or a claim deleted while it
    /// was provisioned): delete it, or only report it in the log. Volumes that had a PV are never deleted by the
    /// audit, whatever this says.
    #[arg(long, value_enum, default_value = "delete")]
    orphan_action: audit::OrphanAction,
    /// A released Delete-policy PV whose Node object is gone: wait for the node (event, retries), or forget
    /// (remove the PV object; the data left with the node).
    #[arg(long, value_enum, default_value = "wait")]
    gone_node_volumes: context::GoneNodes,
    /// Seconds between full comparisons of the published CSIStorageCapacity objects with what they should say (they
    /// are also rewritten at once when a class, Node or agent's pool changes).
    #[arg(long, default_value_t = 60)]
    capacity_resync_seconds: u64,
    /// Seconds after which an agent whose BerthNode status has not changed is taken for dead (crashed, evicted,
    /// its node cut off) although its Node may look Ready: its pools are published with zero capacity, so the
    /// scheduler sends no pod there, and no claim is provisioned there, until its status changes again. Agents write
    /// their status at least every --status-heartbeat-seconds (60 by default), so keep this a few times that.
    /// Measured on this controller's own clock from when it saw the last change.
    #[arg(long, default_value_t = 180, value_parser = clap::value_parser!(u64).range(1..))]
    agent_stale_after: u64,
    /// Where /healthz, /readyz and /metrics are served (plain HTTP). In a pod: 0.0.0.0:8080.
    #[arg(long, default_value = "127.0.0.1:8080")]
    metrics_address: std::net::SocketAddr,
    /// Claims and PVs worked on at once.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// This replica's name in the leader-election Lease; in a pod, its name.
    #[arg(long, env = "POD_NAME", default_value_t = default_identity())]
    identity: String,
    /// Seconds a leader's lease lasts without renewal: how long a crashed leader's work waits for a standby.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// The leader renews its lease this many seconds before it expires.
    #[arg(long, default_value_t = 5)]
    lease_renew_before_seconds: u64,
    /// Instead of running: exit 0 if Berth may be uninstalled, or 1 naming the PVs of Berth with reclaim policy
    /// Delete, or still carrying Berth's finalizer, that exist (without a controller, their finalizer would never
    /// be lifted). The Helm chart's pre-delete hook runs this.
    #[arg(long)]
    check_uninstall: bool,
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

/// Resolves on SIGTERM or Ctrl-C; clones all resolve together.
fn shutdown_signal() -> futures::future::Shared<futures::future::BoxFuture<'static, ()>> {
    use futures::FutureExt;
    async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
    }
    .boxed()
    .shared()
}

/// Reflects `api` into a store, driven by its own task; every change also sends a signal to each of `changed`
/// (after the store has it): the claims are looked at again, and capacity is published again.
/// `trim` drops what no decision reads before the object is stored (a cluster's Nodes and PVs are many).
fn cache<K>(api: Api<K>, changed: Vec<UnboundedSender<()>>, trim: fn(&mut K)) -> reflector::Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let watch = watcher(api, watcher::Config::default()).modify(trim).default_backoff();
    let stream = reflector::reflector(writer, watch);
    tokio::spawn(stream.touched_objects().for_each(move |_| {
        for tx in &changed {
            let _ = tx.unbounded_send(());
        }
        async {}
    }));
    store
}

fn trim_managed_fields<K: kube::Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// The whole controller: parses the command line, runs until SIGTERM or lost leadership.
pub async fn main() -> Result<()> {
    // Crash points for the tests, set by the FAILPOINTS variable; compiled in only with the `failpoints` feature.
    let _failpoints = fail::FailScenario::setup();
    berth::logging::init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let client = kube::Client::try_default().await.context("connecting to the API server")?;
    if args.check_uninstall {
        return uninstall::check(client).await;
    }
    let shutdown = shutdown_signal();
    let metrics = Arc::new(metrics::Metrics::new());
    metrics::serve(args.metrics_address, metrics.clone()).await?;

    // A claim refused for a missing class, pool or agent is looked at again when classes, Nodes or BerthNodes
    // change: that is what can fix it (wake.rs: only the claims that wait for a volume).
    let (changed, changes) = futures::channel::mpsc::unbounded();
    let (capacity_changed, capacity_changes) = futures::channel::mpsc::unbounded();
    let both = vec![changed, capacity_changed];
    let classes = cache(Api::<StorageClass>::all(client.clone()), both.clone(), trim_managed_fields);
    // Decisions read a Node's labels only (and whether it exists).
    let nodes = cache(Api::<Node>::all(client.clone()), both.clone(), |n: &mut Node| {
        n.metadata.managed_fields = None;
        n.metadata.annotations = None;
        n.spec = None;
        n.status = None;
    });
    let (berth_node_changed, berth_node_changes) = futures::channel::mpsc::unbounded();
    let mut for_berth_nodes = both.clone();
    for_berth_nodes.push(berth_node_changed);
    let berth_nodes = cache(Api::<BerthNode>::all(client.clone()), for_berth_nodes, trim_managed_fields);
    let volumes = cache(Api::<PersistentVolume>::all(client.clone()), Vec::new(), trim_managed_fields);
    for (what, ready) in [
        ("StorageClasses", classes.wait_until_ready().await),
        ("Nodes", nodes.wait_until_ready().await),
        ("BerthNodes", berth_nodes.wait_until_ready().await),
        ("PersistentVolumes", volumes.wait_until_ready().await),
    ] {
        ready.with_context(|| format!("caching {what}"))?;
    }
    metrics.set_ready();
    // Watched from the start, standing by too: a replica that takes over knows which agents went quiet.
    let liveness = Arc::new(liveness::Liveness::new(std::time::Duration::from_secs(args.agent_stale_after)));
    tokio::spawn(liveness::run(liveness.clone(), berth_nodes.clone(), berth_node_changes, both));

    let leadership = Arc::new(
        leader::Leadership::new(
            client.clone(),
            &args.namespace,
            args.identity.clone(),
            std::time::Duration::from_secs(args.lease_duration_seconds),
            std::time::Duration::from_secs(args.lease_renew_before_seconds),
        )
        .map_err(anyhow::Error::msg)?,
    );
    tracing::info!(version = berth::version::long(), identity = %leadership.identity(), "standing by until this replica holds the lease");
    let epoch = tokio::select! {
        epoch = leadership.acquire() => epoch,
        _ = shutdown.clone() => {
            tracing::info!("stopped while standing by");
            return Ok(());
        }
    };
    // Renewed from now on, whatever else is slow (fencing many agents, say).
    let mut held = tokio::spawn({
        let leadership = leadership.clone();
        async move { leadership.hold().await }
    });

    let reporter = Reporter { controller: "berth-controller".into(), instance: Some(args.identity.clone()) };
    let agents = agent_client::AgentClient::new(
        client.clone(),
        args.namespace.clone(),
        args.service_account.clone(),
        leadership.clone(),
    );
    let ctx = Arc::new(context::Context::new(
        client.clone(),
        context::Caches { classes, nodes, berth_nodes, volumes },
        agents,
        Recorder::new(client.clone(), reporter),
        args.gone_node_volumes,
        metrics.clone(),
        liveness,
    ));
    metrics.leader.set(1);
    tracing::info!(epoch, identity = %leadership.identity(), "leading");
    // Every agent learns the epoch before any work, and again whenever it is raised (an agent had seen a newer
    // one): a deposed leader's late calls are then refused everywhere.
    fence_agents(&ctx).await;
    tokio::spawn(refence_on_raise(ctx.clone(), leadership.epoch_changes()));
    capacity::check_csidriver(&client, berth::PROVISIONER_NAME).await;
    tokio::spawn(capacity::run(
        ctx.clone(),
        args.namespace.clone(),
        capacity_changes,
        std::time::Duration::from_secs(args.capacity_resync_seconds),
    ));

    let audit = tokio::spawn(audit::run(
        ctx.clone(),
        std::time::Duration::from_secs(args.orphan_audit_interval_seconds),
        args.orphan_action,
        std::time::Duration::from_secs(args.orphan_grace_seconds),
    ));
    let config = kube::runtime::controller::Config::default().concurrency(args.concurrency);
    let claims = Controller::new(Api::<PersistentVolumeClaim>::all(client.clone()), watcher::Config::default());
    tokio::spawn(gauges(ctx.clone(), claims.store()));
    let woken = wake::on_change(changes, claims.store(), {
        let ctx = ctx.clone();
        move |volume| ctx.pv_exists(volume)
    });
    let claims = claims
        .with_config(config.clone())
        .reconcile_on(woken)
        .graceful_shutdown_on(shutdown.clone())
        .run(claims::reconcile, claims::error_policy, ctx.clone())
        .for_each(|_| async {});
    let pvs = Controller::new(Api::<PersistentVolume>::all(client.clone()), watcher::Config::default())
        .with_config(config)
        .graceful_shutdown_on(shutdown)
        .run(delete::reconcile, delete::error_policy, ctx)
        .for_each(|_| async {});
    // Spawned, so that they keep running (and are refused by the agents) if leadership is lost.
    let work = tokio::spawn(async move { futures::join!(claims, pvs) });
    tokio::select! {
        _ = work => {
            audit.abort();
            held.abort();
            leadership.release().await;
            tracing::info!("stopped");
            Ok(())
        }
        why = &mut held => {
            // Work in flight is not waited for: the agents refuse it (fenced), and a restart stands by.
            let why = why.unwrap_or_else(|e| format!("the lease task failed: {e}"));
            failpoints::pause("leader-before-exit").await;
            tracing::error!(%why, "lost leadership; exiting");
            std::process::exit(1);
        }
    }
}

/// Keeps the gauges computed from the caches current (claims still without a PV, agents known and ready), forgets
/// the retry counters of claims and PVs that are gone, and logs each agent's version when it is new or changed
/// (agent_versions.rs).
async fn gauges(ctx: Arc<context::Context>, claims: reflector::Store<PersistentVolumeClaim>) {
    let mut versions = agent_versions::AgentVersions::default();
    let ours = berth::version::full();
    loop {
        let waiting = claims
            .state()
            .iter()
            .filter(|c| {
                // Handed over to Berth (not merely of a Berth class) and waiting for a volume.
                decide::claim_provisioner(c) == Some(berth::PROVISIONER_NAME)
                    && wake::waits(c, berth::PROVISIONER_NAME, |v| ctx.pv_exists(v))
            })
            .count();
        ctx.metrics.workqueue_depth.set(waiting as i64);
        let uids: std::collections::BTreeSet<String> =
            claims.state().iter().filter_map(|c| c.metadata.uid.clone()).collect();
        ctx.forget_failures(&uids, |pv| ctx.pv_exists(pv));
        let agents = ctx.caches.berth_nodes.state();
        for change in versions.observe(&ours, &agents) {
            match &change.skew {
                berth::version::Skew::Same | berth::version::Skew::Supported => {
                    tracing::info!(node = %change.node, agent_version = %change.version, "agent version")
                }
                berth::version::Skew::Unsupported(why) => tracing::warn!(
                    node = %change.node,
                    agent_version = %change.version,
                    controller_version = %ours,
                    "agent version outside the supported skew: {why} (deploy/README.md)"
                ),
            }
        }
        let ready = agents
            .iter()
            .filter(|b| b.status.as_ref().is_some_and(|s| !s.endpoint.is_empty()))
            .filter(|b| !ctx.liveness.is_stale(&b.spec.node_name))
            .count();
        ctx.metrics.set_agents(agents.len() as i64, ready as i64);
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

/// Fences every agent again each time the epoch is raised.
async fn refence_on_raise(ctx: Arc<context::Context>, mut epoch: tokio::sync::watch::Receiver<u64>) {
    epoch.mark_unchanged();
    while epoch.changed().await.is_ok() {
        fence_agents(&ctx).await;
    }
}

/// Announces the epoch to every agent known now (agents that appear later get it with the first call). An agent
/// that had seen a newer epoch makes this leader raise its own first (agent_client.rs).
async fn fence_agents(ctx: &context::Context) {
    let calls = ctx.caches.berth_nodes.state().into_iter().filter_map(|b| {
        let status = b.status.clone()?;
        let node = b.spec.node_name.clone();
        Some(async move {
            match ctx.agents.fence(&node, &status).await {
                Ok(()) => tracing::debug!(%node, "agent fenced"),
                Err(e) => tracing::warn!(%node, error = %e, "cannot tell the agent the new epoch"),
            }
        })
    });
    futures::future::join_all(calls).await;
}
