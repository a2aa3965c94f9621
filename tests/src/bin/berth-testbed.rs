//! `berth-testbed`: runs the test bed as a local cluster until Ctrl-C (what `hack/up` starts).

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use testbed::{FsType, TestBed, TestBedConfig};

/// Starts a local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) with
/// kwok-simulated nodes on loopback addresses, prints how to reach it, and keeps it running until Ctrl-C or
/// SIGTERM, then tears everything down (processes, mounts, loop devices, files).
#[derive(Parser, Debug)]
#[command(name = "berth-testbed", version)]
struct Args {
    /// How many simulated nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Give each node a loop-mounted filesystem of this many GiB (sparse), so its free space is its own.
    #[arg(long)]
    disk_gib: Option<u64>,
    /// Filesystem of the node disks.
    #[arg(long, default_value = "ext4", value_parser = ["ext4", "xfs"])]
    fs: String,
    /// Where to make the bed's directory (default: the system temp dir).
    #[arg(long)]
    base_dir: Option<std::path::PathBuf>,
    /// Exit as soon as the cluster is ready (after printing), instead of waiting for Ctrl-C. For smoke tests.
    #[arg(long)]
    exit_when_ready: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut config = match args.disk_gib {
        Some(gib) => {
            let fs = if args.fs == "xfs" { FsType::Xfs } else { FsType::Ext4 };
            TestBedConfig::nodes_with_disks(&vec![gib << 30; args.nodes], fs)
        }
        None => TestBedConfig::nodes(args.nodes),
    };
    config.base_dir = args.base_dir.clone();
    eprintln!("starting the control plane and {} simulated nodes…", args.nodes);
    let bed = TestBed::start(config).await.context("starting the test bed")?;
    eprintln!("ready in {:.1} s; API server {}", bed.boot_time().as_secs_f64(), bed.api_server());
    for node in bed.nodes() {
        let disk = node.disk.as_ref().map(|d| format!(", disk {}", d.mount_point().display())).unwrap_or_default();
        eprintln!("  node {} (hostname label {}, address {}{disk})", node.name, node.hostname, node.address);
    }
    let out = bed.kubectl(&["get", "nodes", "-o", "wide"])?;
    eprint!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("logs: {}/logs", bed.dir().display());
    eprintln!("kubectl of the same version: {}", bed.kubectl_path().display());
    println!("export KUBECONFIG={}", bed.kubeconfig().display());
    if args.exit_when_ready {
        return Ok(());
    }
    eprintln!("running; Ctrl-C to stop and clean up");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("stopping…");
    drop(bed);
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
