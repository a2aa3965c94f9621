//! The `berth-agent` command line and the wiring of a running agent: both binaries (`berth-agent`, and the
//! test-only `berth-agent-failpoints`) are this function, so the crash tests run exactly the agent's code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::agent::{Agent, Pool};
use crate::backend::Backend;
use crate::backend::hostpath::HostPath;
use crate::backend::lvm::{LvmPool, Thin};
use crate::capacity::PoolLimits;
use crate::config::{AgentConfig, BackendKind, PoolConfig};
use crate::in_use::MountTables;
use crate::{api, auth, config, edge, epoch, metrics, publisher, tls};

/// Berth's node agent: creates and deletes volumes in this node's pools and reports their free capacity over
/// an authenticated HTTPS API. Pools are listed in a TOML config file (see docs/agent-config.md).
#[derive(Parser, Debug)]
#[command(name = "berth-agent", version = berth::version::long())]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the API and publish this node's BerthNode until SIGTERM (then finish in-flight requests and exit).
    Run(RunArgs),
    /// Prepare a pool: create its root directory if needed and write the pool marker. The agent never does this
    /// by itself, so a disk that failed to mount is never mistaken for an empty pool on the system disk.
    InitPool {
        /// The agent's config file.
        #[arg(long, env = "BERTH_AGENT_CONFIG")]
        config: PathBuf,
        /// The pool to prepare.
        #[arg(long)]
        pool: String,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The agent's config file (TOML; lists the pools).
    #[arg(long, env = "BERTH_AGENT_CONFIG")]
    config: PathBuf,
    /// The Kubernetes Node this agent serves (in a DaemonSet: the downward API's spec.nodeName).
    #[arg(long, env = "BERTH_NODE_NAME")]
    node_name: String,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// host:port the controller reaches this agent at (default: the listen address; required when listening on
    /// 0.0.0.0). Goes into the BerthNode and the serving certificate.
    #[arg(long, env = "BERTH_ADVERTISE")]
    advertise: Option<String>,
    /// Where the agent keeps its own small state (the newest leadership epoch seen).
    #[arg(long, default_value = "/var/lib/berth-agent")]
    state_dir: PathBuf,
    /// The only identity allowed to call the API (the controller's ServiceAccount).
    #[arg(long, default_value = "system:serviceaccount:berth-system:berth-controller")]
    controller_identity: String,
    /// Seconds to let in-flight requests finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    shutdown_grace_seconds: u64,
    /// Connections served at once (every pod on the node can reach the port); more are closed as they are
    /// accepted, so no caller can exhaust the agent's memory or descriptors.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Seconds a connection has to send a request's headers, which is also the longest it may sit idle between
    /// requests (the TLS handshake has 10 s). Keep it above the controller's idle-connection timeout (20 s).
    #[arg(long, default_value_t = 30)]
    header_read_timeout_seconds: u64,
    /// Seconds an authenticated caller has to send its whole request body once its headers are in; slower ones get
    /// 408 and lose the connection (bodies are at most 16 KiB).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    body_read_timeout_seconds: u64,
    /// Seconds between two writes of the BerthNode status when nothing changed (a heartbeat). The controller
    /// treats an agent whose status has not changed for its --agent-stale-after (default 180) as dead: no new
    /// volumes, zero published capacity. Keep this well below that.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    status_heartbeat_seconds: u64,
    /// The host's /proc: before deleting a volume the agent reads the host's mount table (`<host-proc>/1/
    /// mountinfo`) for kubelet's mounts of it. In a pod, the host's /proc mounted read-only (deploy/agent mounts it
    /// at /host/proc); an agent running on the host reads its own.
    #[arg(long, env = "BERTH_HOST_PROC", default_value = "/proc")]
    host_proc: PathBuf,
}

fn lvm_pool(p: &PoolConfig, mounts: &MountTables) -> LvmPool {
    let thin = p.thin_pool.as_ref().map(|t| Thin {
        pool_lv: t.clone(),
        ratio: p.overprovision_ratio.unwrap_or(config::DEFAULT_OVERPROVISION_RATIO),
        threshold_percent: p.thin_data_threshold.unwrap_or(config::DEFAULT_THIN_DATA_THRESHOLD),
    });
    let vg = p.volume_group.as_deref().expect("validated: lvm pools have a volume group");
    let limits = PoolLimits { cap: p.capacity, headroom: p.headroom };
    let deadline = Duration::from_secs(p.command_timeout_seconds.unwrap_or(config::DEFAULT_COMMAND_TIMEOUT_SECONDS));
    LvmPool::new(&p.name, &p.root, vg, thin, limits, p.lvm_config.clone(), deadline, mounts.clone())
}

fn build_pools(config: &AgentConfig, mounts: &MountTables) -> Vec<Pool> {
    config
        .pools
        .iter()
        .map(|p| Pool {
            config: p.clone(),
            backend: match p.backend {
                BackendKind::Hostpath => Box::new(HostPath::new(&p.name, &p.root, mounts.clone())) as Box<dyn Backend>,
                BackendKind::Lvm => Box::new(lvm_pool(p, mounts)),
            },
        })
        .collect()
}

/// `berth-agent`'s main: parses the command line and runs it.
pub fn main() -> Result<()> {
    // FAILPOINTS arms the crash points of a `failpoints` build (failpoints.rs); nothing otherwise.
    let _failpoints = fail::FailScenario::setup();
    berth::logging::init();
    match Cli::parse().command {
        Command::InitPool { config, pool } => {
            let config = AgentConfig::load(&config)?;
            let Some(p) = config.pools.iter().find(|p| p.name == pool) else {
                bail!("no pool {pool:?} in the config");
            };
            // Preparing a pool deletes nothing: no mount table is read.
            let mounts = MountTables::new(std::path::Path::new("/proc"));
            match p.backend {
                BackendKind::Hostpath => HostPath::new(&p.name, &p.root, mounts).init()?,
                BackendKind::Lvm => lvm_pool(p, &mounts).init()?,
            }
            tracing::info!(pool = %p.name, root = %p.root.display(), "pool initialised");
            Ok(())
        }
        Command::Run(args) => tokio::runtime::Runtime::new()?.block_on(run(args)),
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = AgentConfig::load(&args.config)?;
    let advertise = match &args.advertise {
        Some(a) => a.clone(),
        None if args.listen.ip().is_unspecified() => {
            bail!("--advertise is required when listening on {}", args.listen)
        }
        None => args.listen.to_string(),
    };
    let host = advertise.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])).unwrap_or(&advertise).to_owned();
    std::fs::create_dir_all(&args.state_dir).with_context(|| format!("state dir {}", args.state_dir.display()))?;
    // Held until the process exits: no second agent of this node touches a pool meanwhile (node_lock.rs).
    let state_dir = args.state_dir.clone();
    let _node_lock = tokio::task::spawn_blocking(move || crate::node_lock::acquire(&state_dir)).await??;

    let fence = epoch::EpochFence::load(args.state_dir.join("leader-epoch"))?;
    let mounts = MountTables::new(&args.host_proc);
    if let Err(e) = mounts.host() {
        // Deletes of directory volumes are refused until it can be read; nothing else needs it.
        tracing::error!(error = %e, "the host's mount table is unreadable: directory volumes cannot be deleted");
    }
    let agent = Arc::new(Agent::start(args.node_name.clone(), build_pools(&config, &mounts), fence));
    let client = kube::Client::try_default().await.context("connecting to the API server")?;
    let cert = tls::self_signed(&args.node_name, &host)?;
    let metrics = Arc::new(metrics::Metrics::new());
    let state = Arc::new(api::ApiState {
        agent: agent.clone(),
        auth: auth::Authenticator::new(
            client.clone(),
            berth::agent_audience(&args.node_name),
            args.controller_identity.clone(),
        ),
        metrics: metrics.clone(),
        shutting_down: AtomicBool::new(false),
        body_read_timeout: Duration::from_secs(args.body_read_timeout_seconds),
    });
    let publisher = publisher::Publisher {
        client,
        agent,
        metrics,
        endpoint: format!("https://{advertise}"),
        certificate: cert.cert_pem.clone(),
        heartbeat: Duration::from_secs(args.status_heartbeat_seconds),
    };
    let publishing = tokio::spawn(publisher.run());

    let tls =
        axum_server::tls_rustls::RustlsConfig::from_pem(cert.cert_pem.into_bytes(), cert.key_pem.into_bytes()).await?;
    let handle = axum_server::Handle::new();
    let grace = Duration::from_secs(args.shutdown_grace_seconds);
    let on_signal = {
        let (handle, state) = (handle.clone(), state.clone());
        async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!(
                grace_seconds = grace.as_secs(),
                "shutting down: refusing new work, finishing in-flight requests"
            );
            state.shutting_down.store(true, Ordering::SeqCst);
            handle.graceful_shutdown(Some(grace));
        }
    };
    tokio::spawn(on_signal);
    // Debris is removed once the API serves, so the live volumes are never kept waiting for it.
    let debris_worker = {
        let (handle, agent) = (handle.clone(), state.agent.clone());
        async move {
            if handle.listening().await.is_some() {
                let spawned =
                    std::thread::Builder::new().name("debris".into()).spawn(move || agent.remove_debris_forever());
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start the debris thread: debris stays until the next start");
                }
            }
        }
    };
    tokio::spawn(debris_worker);
    tracing::info!(version = %berth::version::full(), node = %args.node_name, listen = %args.listen, endpoint = %format!("https://{advertise}"), "serving");
    let limit = edge::ConnectionLimit::new(axum_server::accept::DefaultAcceptor::new(), args.max_connections);
    let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(tls).acceptor(limit);
    let mut server = axum_server::bind(args.listen).acceptor(acceptor).handle(handle);
    server.http_builder().http1().header_read_timeout(Duration::from_secs(args.header_read_timeout_seconds));
    server.serve(api::router(state).into_make_service()).await?;
    publishing.abort();
    tracing::info!("stopped");
    Ok(())
}
