//! `berth-testbed`: runs the test bed as a local cluster until Ctrl-C or SIGTERM (what `hack/up` starts), with
//! Berth on it when given the agent and controller binaries.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams};
use testbed::agents::PoolSpec;
use testbed::bins::repo_root;
use testbed::demo::{DEMO_MANIFEST, DEMO_POD, demo_statefulset};
use testbed::deploy::{self, Install};
use testbed::{FsType, NodeDiskSpec, NodeSpec, TestBed, TestBedConfig};

/// Starts a local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) with
/// kwok-simulated nodes on loopback addresses — and, given the binaries, one berth-agent per node with a pool
/// named `local` and the berth-controller — prints how to reach it, and keeps it running until Ctrl-C or SIGTERM
/// (`hack/down`), then removes everything it made (processes, mounts, loop devices, files).
#[derive(Parser, Debug)]
#[command(name = "berth-testbed", version)]
struct Args {
    /// How many simulated nodes (default 3, or one per --pool-size entry).
    #[arg(long)]
    nodes: Option<usize>,
    /// Size of each node's pool: one size for all nodes, or a comma-separated size per node (e.g. 5Gi,10Gi,50Gi).
    /// As root each node gets a loop-mounted filesystem of its own of about that size; otherwise the pools share
    /// the host's disk and are capped at that size.
    #[arg(long, default_value = "10Gi", value_delimiter = ',')]
    pool_size: Vec<String>,
    /// Filesystem of the node disks.
    #[arg(long, default_value = "ext4", value_parser = ["ext4", "xfs"])]
    fs: String,
    /// The berth-agent binary: run one per node.
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// The berth-controller binary: run it.
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    /// Apply deploy/examples/postgres.yaml and wait until its claims are Bound (needs Berth).
    #[arg(long)]
    demo: bool,
    /// Write this process's pid here (for hack/down).
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Where to make the bed's directory (default: the system temp dir).
    #[arg(long)]
    base_dir: Option<PathBuf>,
    /// Also start a Prometheus (Debian's package) scraping the agents and the controller every second, with
    /// deploy/prometheus/alerts.yaml loaded; its URL is printed. Needs --agent-bin and --controller-bin.
    #[arg(long)]
    prometheus: bool,
    /// Exit as soon as everything is ready (after printing), instead of waiting for Ctrl-C. For smoke tests.
    #[arg(long)]
    exit_when_ready: bool,
    /// Instead of simulated nodes: one real node (kubelet, containerd and kube-proxy in a qemu guest, from
    /// $BERTH_NODE_BINS or hack/node-bins) with Berth installed from deploy/ as users install it: `kubectl apply -k`
    /// through the image overlay tests/deploy/real-node, images from $BERTH_IMAGES or hack/build-image, the pool
    /// `local` prepared with `berth-agent init-pool`, the example StorageClasses, and the demo StatefulSet
    /// (tests/deploy/demo) with its pod Running on its volume. Needs root (the guest's disks). About three minutes
    /// under software emulation.
    #[arg(long, conflicts_with_all = ["nodes", "agent_bin", "controller_bin", "demo", "prometheus"])]
    real_node: bool,
}

fn progress(message: &str) {
    eprintln!("==> {message}");
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.real_node {
        return real_node(&args).await;
    }
    let sizes: Vec<u64> = args
        .pool_size
        .iter()
        .map(|s| berth::quantity::bytes(s).with_context(|| format!("--pool-size {s}")))
        .collect::<Result<_>>()?;
    let nodes = match (args.nodes, sizes.len()) {
        (Some(n), 1) => n,
        (None, 1) => 3,
        (Some(n), k) if n != k => bail!("--nodes {n} but {k} pool sizes"),
        (_, k) => k,
    };
    let size_of = |i: usize| if sizes.len() == 1 { sizes[0] } else { sizes[i] };
    let root = is_root();
    let fs = if args.fs == "xfs" { FsType::Xfs } else { FsType::Ext4 };
    let node_specs = (0..nodes)
        .map(|i| NodeSpec {
            // Room for the filesystem's own metadata on top of the pool's size.
            disk: root.then(|| NodeDiskSpec { size_bytes: size_of(i) + size_of(i) / 16 + (64 << 20), fs }),
            ..Default::default()
        })
        .collect();
    let config = TestBedConfig { nodes: node_specs, base_dir: args.base_dir.clone(), real_node: None };
    write_pid_file(&args)?;

    progress(&format!("starting the control plane and {nodes} simulated nodes"));
    let bed = TestBed::start(config).await.context("starting the test bed")?;
    progress(&format!(
        "control plane ready in {:.1} s; API server {}",
        bed.boot_time().as_secs_f64(),
        bed.api_server()
    ));
    let mut _berth = Vec::new();
    let mut controller = None;
    if let Some(agent_bin) = &args.agent_bin {
        bed.install_berth().await?;
        let class = repo_root().join("deploy/examples/storageclass.yaml");
        let out = bed.kubectl(&["apply", "-f", class.to_str().context("path")?])?;
        if !out.status.success() {
            bail!("applying {}: {}", class.display(), String::from_utf8_lossy(&out.stderr));
        }
        for i in 0..nodes {
            let mut pool = PoolSpec::new("local");
            pool.extra = format!("capacity = {}", size_of(i));
            progress(&format!("starting berth-agent on {}", bed.nodes()[i].name));
            _berth.push(bed.start_agent(agent_bin, i, &[pool], true).await?);
        }
    }
    let metrics_address = format!("{}:{}", bed.address(), bed.free_port()?);
    if let Some(controller_bin) = &args.controller_bin {
        progress("starting berth-controller");
        let flag = format!("--metrics-address={metrics_address}");
        controller = Some(bed.start_controller(controller_bin, &[&flag]).await?);
    }
    let mut prometheus = None;
    if args.prometheus {
        if args.agent_bin.is_none() || args.controller_bin.is_none() {
            bail!("--prometheus needs --agent-bin and --controller-bin");
        }
        progress("starting Prometheus");
        let agents: Vec<_> = _berth.iter().collect();
        prometheus = Some(bed.start_prometheus(&agents, std::slice::from_ref(&metrics_address)).await?);
    }
    for node in bed.nodes() {
        let disk = node.disk.as_ref().map(|d| format!(", disk {}", d.mount_point().display())).unwrap_or_default();
        eprintln!("    node {} (hostname label {}, address {}{disk})", node.name, node.hostname, node.address);
    }
    if args.demo {
        run_demo(&bed).await?;
    }
    show(&bed, &["get", "nodes", "-o", "wide"])?;
    if args.agent_bin.is_some() {
        show(&bed, &["get", "berthnodes"])?;
    }
    if args.demo {
        show(&bed, &["get", "pvc,pv", "-o", "wide"])?;
    }
    if let Some(p) = &prometheus {
        eprintln!("Prometheus: {} (try: berth_pool_free_bytes)", p.url);
    }
    eprintln!("logs: {}/logs", bed.dir().display());
    eprintln!("kubectl of the same version: {}", bed.kubectl_path().display());
    println!("export KUBECONFIG={}", bed.kubeconfig().display());
    if args.exit_when_ready {
        return Ok(());
    }
    wait_for_signal().await?;
    progress("stopping");
    drop(prometheus);
    drop(controller);
    drop(_berth);
    drop(bed);
    remove_pid_file(&args);
    Ok(())
}

/// `--real-node`: the bed with one real node and Berth installed on it from deploy/.
async fn real_node(args: &Args) -> Result<()> {
    let mut config = TestBedConfig::real_node();
    if let Some(dir) = &args.base_dir {
        config.base_dir = Some(dir.clone());
    }
    write_pid_file(args)?;
    progress("starting the control plane and booting the real node (about a minute until it is Ready)");
    let bed = TestBed::start(config).await.context("starting the test bed with a real node")?;
    let node = bed.real_node().context("the bed has no real node")?.spec.clone();
    progress(&format!("node {} Ready after {:.0} s", node.name, bed.boot_time().as_secs_f64()));
    progress("installing Berth: kubectl apply -k deploy/ (through tests/deploy/real-node: the local image)");
    deploy::apply(&bed, &Install::default(), &bed.dir().join("install"))?;
    progress("preparing the pool local: kubectl exec <agent pod> -- berth-agent init-pool --pool local");
    deploy::init_pool(&bed, &node.name, "local").await?;
    deploy::wait_pool(&bed.client(), &node.name, "local", Duration::from_secs(120), |p| p.ready).await?;
    let examples = repo_root().join("deploy/examples");
    deploy::kubectl(&bed, &["apply", "-k", examples.to_str().context("path")?])?;
    progress(&format!("demo: kubectl apply -f {DEMO_MANIFEST} (a StatefulSet whose pod writes into its claim)"));
    let started = demo_statefulset(&bed, "default").await?;
    eprint!("{DEMO_POD} wrote into its volume:\n{started}");
    for what in [
        &["get", "nodes", "-o", "wide"][..],
        &["get", "pods", "-A", "-o", "wide"],
        &["get", "berthnodes"],
        &["get", "pvc,pv", "-o", "wide"],
    ] {
        show(&bed, what)?;
    }
    eprintln!(
        "try: kubectl exec {DEMO_POD} -- cat /data/starts; kubectl exec {DEMO_POD} -- df -h /data; \
         kubectl get pv -o wide; kubectl describe pv (Node Affinity: where the data lives)"
    );
    eprintln!("logs: {}/logs (kubelet.log, containerd.log, kube-proxy.log: the node's)", bed.dir().display());
    eprintln!("kubectl of the same version: {}", bed.kubectl_path().display());
    println!("export KUBECONFIG={}", bed.kubeconfig().display());
    if !args.exit_when_ready {
        wait_for_signal().await?;
    }
    progress("stopping");
    drop(bed);
    remove_pid_file(args);
    Ok(())
}

/// Prints what `kubectl <what>` prints (its stdout and stderr) for the person who started the bed.
fn show(bed: &TestBed, what: &[&str]) -> Result<()> {
    let out = bed.kubectl(what)?;
    eprint!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn write_pid_file(args: &Args) -> Result<()> {
    if let Some(pid_file) = &args.pid_file {
        std::fs::write(pid_file, std::process::id().to_string())?;
    }
    Ok(())
}

fn remove_pid_file(args: &Args) {
    if let Some(pid_file) = &args.pid_file {
        let _ = std::fs::remove_file(pid_file);
    }
}

async fn wait_for_signal() -> Result<()> {
    eprintln!("running; Ctrl-C or hack/down to stop and clean up");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

async fn run_demo(bed: &TestBed) -> Result<()> {
    let example = repo_root().join("deploy/examples/postgres.yaml");
    progress(&format!("demo: kubectl apply -f {}", example.display()));
    let out = bed.kubectl(&["apply", "-f", example.to_str().context("path")?])?;
    if !out.status.success() {
        bail!("applying the demo: {}", String::from_utf8_lossy(&out.stderr));
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(bed.client(), "default");
    for _ in 0..600 {
        let list = claims.list(&ListParams::default()).await?.items;
        let bound = list.iter().filter(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")).count();
        if bound == 3 {
            verify_demo(bed, &list).await?;
            progress(
                "demo: 3 claims Bound, each to a PV pinned to its pod's node, each a directory in that node's pool",
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!(
        "demo: the StatefulSet's claims were not all Bound within 2 minutes. It has 3 replicas of 1Gi each and \
         the scheduler places them only where a pool has room: it needs 3 nodes whose pools have more than 1Gi free \
         (--nodes 3 --pool-size 2Gi); `kubectl describe pod postgres-N` says what the scheduler saw, the logs the rest"
    )
}

/// Each claim's PV is pinned to the node its pod runs on, and its directory exists in that node's pool.
async fn verify_demo(bed: &TestBed, claims: &[PersistentVolumeClaim]) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(bed.client(), "default");
    let pvs: Api<PersistentVolume> = Api::all(bed.client());
    for claim in claims {
        let name = claim.metadata.name.clone().unwrap_or_default();
        let pod_name = name.strip_prefix("data-").context("a claim of the demo StatefulSet")?;
        let mut node_name = None;
        for _ in 0..300 {
            node_name = pods.get(pod_name).await?.spec.and_then(|s| s.node_name);
            if node_name.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let node_name = node_name.with_context(|| format!("pod {pod_name} was not scheduled"))?;
        let node = bed.nodes().iter().find(|n| n.name == node_name).context("the pod's node")?;
        let pv_name = claim.spec.as_ref().and_then(|s| s.volume_name.clone()).context("bound claim")?;
        let pv = pvs.get(&pv_name).await?;
        let spec = pv.spec.context("PV spec")?;
        let pinned = spec
            .node_affinity
            .and_then(|a| a.required)
            .and_then(|r| r.node_selector_terms.first().cloned())
            .and_then(|t| t.match_expressions)
            .and_then(|e| e.first().and_then(|r| r.values.clone()))
            .unwrap_or_default();
        if pinned != vec![node.hostname.clone()] {
            bail!("{pv_name} is pinned to {pinned:?}, its pod runs on {node_name} ({})", node.hostname);
        }
        let path = spec.local.map(|l| l.path).context("a local PV")?;
        let in_pool = node.disk.as_ref().is_none_or(|d| std::path::Path::new(&path).starts_with(d.mount_point()));
        if !std::path::Path::new(&path).is_dir() || !in_pool {
            bail!("{pv_name}: {path} is not a directory in {node_name}'s pool");
        }
    }
    Ok(())
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}
