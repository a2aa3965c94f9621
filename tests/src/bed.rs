//! [`TestBed`]: boot, readiness and teardown of one local cluster.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::bins::{KubeBins, repo_root};
use crate::egress::EgressProxy;
use crate::node_disk::{NodeDisk, path_str};
use crate::pki::Pki;
use crate::ports::{bed_address, free_port};
use crate::process::Proc;
use crate::real_node::{RealNode, RealNodeSpec};
use crate::reaper;
use crate::vm::HOST_FROM_GUEST;

/// kube-controller-manager's client limits in the test bed (its defaults are 20 QPS / burst 30): high enough that
/// a benchmark creating hundreds of claims measures Berth, not a throttled PV binder.
pub const KCM_API_QPS: u32 = 500;
pub const KCM_API_BURST: u32 = 1000;

/// The controllers a real cluster runs for the flows Berth takes part in (names as `--controllers` spells them).
const KCM_CONTROLLERS: &[&str] = &[
    "persistentvolume-binder-controller",
    "persistentvolume-expander-controller",
    "persistentvolumeclaim-protection-controller",
    "persistentvolume-protection-controller",
    "statefulset-controller",
    "garbage-collector-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "node-lifecycle-controller",
    "namespace-controller",
    "deployment-controller",
    "replicaset-controller",
    "daemonset-controller",
    "disruption-controller",
    "pod-garbage-collector-controller",
];

/// Marks a Node as kwok's to simulate; kwok manages exactly the nodes carrying it.
pub const KWOK_NODE_ANNOTATION: (&str, &str) = ("kwok.x-k8s.io/node", "fake");
/// The simulated node's own loopback address (its agent listens there); kwok reports it as the InternalIP.
pub const NODE_ADDRESS_ANNOTATION: &str = "testbed.berth.dev/address";

const KWOK_STAGES: &str = include_str!("kwok-stages.yaml");
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// From the guest's start to its Node Ready: 65–76 s were seen under TCG, with the images imported first.
const REAL_NODE_READY_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

#[derive(Debug, Clone)]
pub struct NodeDiskSpec {
    pub size_bytes: u64,
    pub fs: FsType,
}

#[derive(Debug, Clone, Default)]
pub struct NodeSpec {
    /// A filesystem of the node's own (a loop-mounted sparse image); `None` shares the host's disk.
    pub disk: Option<NodeDiskSpec>,
    /// Extra Node labels (the bed always sets `kubernetes.io/hostname`).
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default)]
pub struct TestBedConfig {
    pub nodes: Vec<NodeSpec>,
    /// Where the bed's directory is made (default: the system temp dir). A qemu guest cannot see the host's /tmp.
    pub base_dir: Option<PathBuf>,
    /// A real node (kubelet, containerd and kube-proxy in a qemu guest) besides the simulated ones.
    pub real_node: Option<RealNodeSpec>,
}

impl TestBedConfig {
    /// `n` simulated nodes sharing the host's disk.
    pub fn nodes(n: usize) -> Self {
        TestBedConfig { nodes: vec![NodeSpec::default(); n], ..TestBedConfig::default() }
    }

    /// One simulated node per size, each with its own filesystem of that size.
    pub fn nodes_with_disks(sizes: &[u64], fs: FsType) -> Self {
        let nodes = sizes
            .iter()
            .map(|&size_bytes| NodeSpec { disk: Some(NodeDiskSpec { size_bytes, fs }), labels: BTreeMap::new() })
            .collect();
        TestBedConfig { nodes, ..TestBedConfig::default() }
    }

    /// One real node and no simulated ones; the bed's directory under the repository's `target/` (the guest
    /// reads its configuration there).
    pub fn real_node() -> Self {
        TestBedConfig {
            nodes: vec![],
            base_dir: Some(repo_root().join("target/beds")),
            real_node: Some(RealNodeSpec::default()),
        }
    }
}

/// A simulated node: a Node object kept Ready by kwok, its own loopback address, maybe its own disk.
#[derive(Debug)]
pub struct SimNode {
    /// The Node object's name.
    pub name: String,
    /// Its `kubernetes.io/hostname` label, deliberately different from the name (as on many clouds).
    pub hostname: String,
    /// A loopback address of its own, for the node's agent.
    pub address: Ipv4Addr,
    pub disk: Option<NodeDisk>,
}

/// What must be released on drop, also when [`TestBed::start`] fails half-way: processes (stopped in reverse start
/// order), node disks, the directory.
struct Resources {
    dir: PathBuf,
    procs: Vec<Proc>,
    nodes: Vec<SimNode>,
    real_node: Option<RealNode>,
    egress: Option<EgressProxy>,
    /// Keep the logs when dropped (as when a test panics): true until [`TestBed::start`] has succeeded, so that a
    /// start that fails leaves what explains it.
    keep_logs: bool,
}

/// How long each of the bed's processes gets to exit after SIGTERM when the bed goes, before SIGKILL. Nothing of a
/// bed outlives it: when its logs are deleted the processes get a tenth of a second, and when they are kept (a test
/// failed) they get time to flush them (klog writes its buffer every few seconds). The API server is the slow one:
/// it waits for its clients' watches to end, and a test's agents or controllers held in a struct declared before
/// its bed were still watching, so each such bed waited the whole grace, 10 s; with its clients gone it exits in
/// about 1.1 s.
const GRACE_KEEPING_LOGS: Duration = Duration::from_secs(10);
const GRACE: Duration = Duration::from_millis(100);

impl Drop for Resources {
    fn drop(&mut self) {
        if let Some(node) = self.real_node.take() {
            let _ = std::fs::write(self.dir.join("logs/real-node-console.log"), node.console_tail(usize::MAX));
        }
        self.egress = None;
        let keep_logs = self.keep_logs || std::thread::panicking();
        let grace = if keep_logs { GRACE_KEEPING_LOGS } else { GRACE };
        while let Some(mut p) = self.procs.pop() {
            p.stop(grace);
        }
        self.nodes.clear(); // unmounts and detaches
        if keep_logs {
            let keep = repo_root().join("target/testbed-logs").join(self.dir.file_name().unwrap_or_default());
            if std::fs::create_dir_all(&keep).is_ok() {
                for entry in std::fs::read_dir(self.dir.join("logs")).into_iter().flatten().flatten() {
                    let _ = std::fs::copy(entry.path(), keep.join(entry.file_name()));
                }
                eprintln!("test bed: a test panicked or the bed did not start; logs kept in {}", keep.display());
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("test bed: could not remove {}: {e}", self.dir.display());
        }
    }
}

/// The issuer of the bed's ServiceAccount tokens (`iss`).
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A running local cluster. See the crate documentation.
pub struct TestBed {
    res: Resources,
    address: Ipv4Addr,
    api_server: String,
    kubeconfig: PathBuf,
    pki: Pki,
    bins: KubeBins,
    client: kube::Client,
    boot_time: Duration,
}

impl TestBed {
    /// Boots the bed and waits until every part is ready and every node is Ready and schedulable.
    /// Call it from the test's own thread (see [`crate::process::Proc::spawn`] on why).
    pub async fn start(config: TestBedConfig) -> Result<TestBed> {
        let started = Instant::now();
        let bins = KubeBins::locate()?;
        let base = config.base_dir.clone().unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&base)?;
        reaper::reap_dead_beds(&base);
        let dir = tempfile::Builder::new().prefix(reaper::DIR_PREFIX).tempdir_in(&base)?.keep();
        let mut res = Resources {
            dir: dir.clone(),
            procs: Vec::new(),
            nodes: Vec::new(),
            real_node: None,
            egress: None,
            keep_logs: true,
        };
        reaper::claim(&dir)?;
        for sub in ["logs", "etcd", "pki", "nodes"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }

        let address = bed_address();
        for (i, spec) in config.nodes.iter().enumerate() {
            let name = format!("node-{i}");
            let disk = match &spec.disk {
                Some(d) => Some(
                    NodeDisk::create(&dir.join("nodes").join(&name), d.size_bytes, d.fs)
                        .with_context(|| format!("disk of {name}"))?,
                ),
                None => None,
            };
            let node_address = Ipv4Addr::new(127, address.octets()[1], address.octets()[2], 10 + i as u8);
            res.nodes.push(SimNode { hostname: format!("host-{i}"), name, address: node_address, disk });
        }

        let clients = config.real_node.as_ref().map(crate::real_node::client_identities).unwrap_or_default();
        let pki = Pki::write_with_clients(&dir.join("pki"), &[address], &clients)?;
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&pki.ca_cert)?)?)
            .identity(reqwest::Identity::from_pem(&pki.admin_identity_pem()?)?)
            .timeout(Duration::from_secs(5))
            .build()?;
        let log = |name: &str| dir.join("logs").join(format!("{name}.log"));
        let s = |p: &Path| path_str(p).map(str::to_owned);

        // etcd
        let (etcd_client, etcd_peer) = (free_port(address)?, free_port(address)?);
        let client_url = format!("http://{address}:{etcd_client}");
        let peer_url = format!("http://{address}:{etcd_peer}");
        let etcd_args = vec![
            "--name=bed".into(),
            format!("--data-dir={}", s(&dir.join("etcd"))?),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=bed={peer_url}"),
            "--unsafe-no-fsync".into(),
        ];
        res.procs.push(Proc::spawn("etcd", &bins.path("etcd"), &etcd_args, &log("etcd"))?);
        let health = format!("{client_url}/health");
        wait_ready(&mut res.procs, "etcd", || probe(&http, &health)).await?;

        // kube-apiserver: on 127.0.0.1, the one loopback address a qemu guest can reach (as 10.0.2.2).
        let api_port = free_port(Ipv4Addr::LOCALHOST)?;
        let api_server = format!("https://127.0.0.1:{api_port}");
        let mut apiserver_args = vec![
            format!("--etcd-servers={client_url}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--tls-cert-file={}", s(&pki.serving_cert)?),
            format!("--tls-private-key-file={}", s(&pki.serving_key)?),
            format!("--client-ca-file={}", s(&pki.ca_cert)?),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
            format!("--service-account-key-file={}", s(&pki.sa_public_key)?),
            format!("--service-account-signing-key-file={}", s(&pki.sa_private_key)?),
            "--authorization-mode=Node,RBAC".into(),
            // As a real cluster does: a kubelet may change only its own Node and the pods bound to it.
            "--enable-admission-plugins=NodeRestriction".into(),
            "--allow-privileged=true".into(),
            // The `kubernetes` Service's endpoints would be this loopback address, which Endpoints reject.
            "--endpoint-reconciler-type=none".into(),
            "--profiling=false".into(),
        ];
        if config.real_node.is_some() {
            // The API server's way to a kubelet in a guest: CONNECT through the egress proxy (crate::egress),
            // to the address the kubelet reports, authenticated as the admin (the kubelet asks the API server
            // whether that identity may exec, read logs …).
            let egress = EgressProxy::start(&dir.join("egress.sock"))?;
            let egress_config = dir.join("egress-selector.yaml");
            std::fs::write(&egress_config, egress.apiserver_config())?;
            apiserver_args.extend([
                format!("--egress-selector-config-file={}", s(&egress_config)?),
                "--kubelet-preferred-address-types=InternalIP".into(),
                format!("--kubelet-client-certificate={}", s(&pki.admin_cert)?),
                format!("--kubelet-client-key={}", s(&pki.admin_key)?),
            ]);
            res.egress = Some(egress);
        }
        res.procs.push(Proc::spawn(
            "kube-apiserver",
            &bins.path("kube-apiserver"),
            &apiserver_args,
            &log("kube-apiserver"),
        )?);
        if let Some(spec) = &config.real_node {
            // Booted now, not once the control plane is up: the boot and the node's preparation (disks, daemons)
            // take longer than the API server's start, and kubelet and kube-proxy retry until it answers.
            let egress = res.egress.as_ref().expect("made with the API server");
            let node = RealNode::boot(&dir.join("real-node"), spec.clone(), api_port, &pki, egress, &dir.join("logs"))?;
            res.real_node = Some(node);
        }
        let readyz = format!("{api_server}/readyz");
        wait_ready(&mut res.procs, "kube-apiserver", || probe(&http, &readyz)).await?;

        let kubeconfig = dir.join("admin.kubeconfig");
        write_kubeconfig(&kubeconfig, &api_server, &pki)?;
        let kc = s(&kubeconfig)?;

        // kube-controller-manager, kube-scheduler and kwok start together.
        let kcm_port = free_port(address)?;
        let kcm_args = vec![
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--leader-elect=false".into(),
            format!("--bind-address={address}"),
            format!("--secure-port={kcm_port}"),
            format!("--tls-cert-file={}", s(&pki.serving_cert)?),
            format!("--tls-private-key-file={}", s(&pki.serving_key)?),
            format!("--controllers={}", KCM_CONTROLLERS.join(",")),
            format!("--service-account-private-key-file={}", s(&pki.sa_private_key)?),
            format!("--root-ca-file={}", s(&pki.ca_cert)?),
            format!("--kube-api-qps={KCM_API_QPS}"),
            format!("--kube-api-burst={KCM_API_BURST}"),
            "--profiling=false".into(),
        ];
        res.procs.push(Proc::spawn(
            "kube-controller-manager",
            &bins.path("kube-controller-manager"),
            &kcm_args,
            &log("kube-controller-manager"),
        )?);

        let sched_port = free_port(address)?;
        let sched_args = vec![
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--leader-elect=false".into(),
            format!("--bind-address={address}"),
            format!("--secure-port={sched_port}"),
            format!("--tls-cert-file={}", s(&pki.serving_cert)?),
            format!("--tls-private-key-file={}", s(&pki.serving_key)?),
            "--profiling=false".into(),
        ];
        res.procs.push(Proc::spawn(
            "kube-scheduler",
            &bins.path("kube-scheduler"),
            &sched_args,
            &log("kube-scheduler"),
        )?);

        let stages = dir.join("kwok-stages.yaml");
        std::fs::write(&stages, KWOK_STAGES)?;
        let kwok_port = free_port(address)?;
        let kwok_args = vec![
            format!("--kubeconfig={kc}"),
            format!("--config={}", s(&stages)?),
            "--manage-all-nodes=false".into(),
            format!("--manage-nodes-with-annotation-selector={}={}", KWOK_NODE_ANNOTATION.0, KWOK_NODE_ANNOTATION.1),
            "--cidr=10.244.0.0/16".into(),
            format!("--node-ip={address}"),
            "--node-lease-duration-seconds=40".into(),
            format!("--server-address={address}:{kwok_port}"),
        ];
        res.procs.push(Proc::spawn("kwok", &bins.path("kwok"), &kwok_args, &log("kwok"))?);

        let kcm_health = format!("https://{address}:{kcm_port}/healthz");
        let sched_health = format!("https://{address}:{sched_port}/healthz");
        let kwok_health = format!("http://{address}:{kwok_port}/healthz");
        wait_ready(&mut res.procs, "kube-controller-manager", || probe(&http, &kcm_health)).await?;
        wait_ready(&mut res.procs, "kube-scheduler", || probe(&http, &sched_health)).await?;
        wait_ready(&mut res.procs, "kwok", || probe(&http, &kwok_health)).await?;

        let options = KubeConfigOptions::default();
        let client_config = kube::Config::from_custom_kubeconfig(Kubeconfig::read_from(&kubeconfig)?, &options).await?;
        let client = kube::Client::try_from(client_config)?;

        let nodes: Api<Node> = Api::all(client.clone());
        for (node, spec) in res.nodes.iter().zip(&config.nodes) {
            let mut labels = spec.labels.clone();
            labels.insert(berth::keys::HOSTNAME_LABEL.into(), node.hostname.clone());
            labels.insert("kubernetes.io/os".into(), "linux".into());
            let annotations = BTreeMap::from([
                (KWOK_NODE_ANNOTATION.0.to_owned(), KWOK_NODE_ANNOTATION.1.to_owned()),
                (NODE_ADDRESS_ANNOTATION.to_owned(), node.address.to_string()),
            ]);
            let object = Node {
                metadata: ObjectMeta {
                    name: Some(node.name.clone()),
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..Default::default()
                },
                ..Default::default()
            };
            nodes.create(&PostParams::default(), &object).await.with_context(|| format!("creating {}", node.name))?;
        }
        // Ready (kwok) and untainted (the node lifecycle controller lifts the not-ready taint the
        // TaintNodesByCondition admission plugin puts on every new Node).
        let names: Vec<String> = res.nodes.iter().map(|n| n.name.clone()).collect();
        wait_ready(&mut res.procs, "the simulated nodes", || async {
            let mut all = true;
            for name in &names {
                let node = nodes.get(name).await?;
                all &= crate::kube_util::node_is_ready(&node) && crate::kube_util::node_taints(&node).is_empty();
            }
            Ok(all)
        })
        .await?;
        if let Some(spec) = &config.real_node {
            kubernetes_endpoints(&client, api_port).await?;
            wait_real_node(&mut res, &nodes, &spec.name, None).await?;
        }
        // The serviceaccount controller gives every namespace its `default` account; pods need it.
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        wait_ready(&mut res.procs, "the default ServiceAccount", || async {
            Ok(sas.get_opt("default").await?.is_some())
        })
        .await?;

        res.keep_logs = false;
        Ok(TestBed { res, address, api_server, kubeconfig, pki, bins, client, boot_time: started.elapsed() })
    }

    /// Reboots the real node ([`RealNode::reboot`]: a shutdown as a reboot does it, then a boot from the same
    /// disks) and waits until its kubelet, with a new boot ID, reports it Ready and its images are imported.
    pub async fn reboot_real_node(&mut self) -> Result<()> {
        let node = self.res.real_node.as_mut().context("the bed has no real node")?;
        let name = node.spec.name.clone();
        let nodes: Api<Node> = Api::all(self.client.clone());
        let before = nodes.get(&name).await?;
        let previous = boot_id(&before).context("the real node reports no boot ID")?.to_owned();
        node.reboot()?;
        wait_real_node(&mut self.res, &nodes, &name, Some(&previous)).await
    }

    /// Stops the real node's kubelet alone ([`RealNode::stop_kubelet`]): its pods' containers and mounts stay.
    pub fn stop_real_kubelet(&mut self) -> Result<()> {
        self.res.real_node.as_mut().context("the bed has no real node")?.stop_kubelet()
    }

    /// Starts the real node's kubelet again; returns once it runs (not once the Node is Ready again).
    pub fn start_real_kubelet(&mut self) -> Result<()> {
        self.res.real_node.as_mut().context("the bed has no real node")?.start_kubelet()
    }

    /// An admin client (group system:masters).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The admin kubeconfig (file paths inside, valid while the bed runs).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>`.
    pub fn api_server(&self) -> &str {
        &self.api_server
    }

    /// The CA that signed every certificate of the bed (the API server's included).
    pub fn ca_cert(&self) -> &Path {
        &self.pki.ca_cert
    }

    pub fn nodes(&self) -> &[SimNode] {
        &self.res.nodes
    }

    /// The real node, if the bed has one ([`TestBedConfig::real_node`]).
    pub fn real_node(&self) -> Option<&RealNode> {
        self.res.real_node.as_ref()
    }

    /// The bed's own loopback address (kube-controller-manager, kube-scheduler, kwok and etcd listen there).
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// The bed's directory (logs, pki, node disks).
    pub fn dir(&self) -> &Path {
        &self.res.dir
    }

    /// From the first step of [`TestBed::start`] to everything ready.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// The pids of the bed's processes, by name (etcd, kube-apiserver, …).
    pub fn processes(&self) -> Vec<(String, u32)> {
        self.res.procs.iter().map(|p| (p.name().to_owned(), p.pid())).collect()
    }

    /// The bed's keys and certificates.
    pub(crate) fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The kubectl built with the control plane.
    pub fn kubectl_path(&self) -> PathBuf {
        self.bins.path("kubectl")
    }

    /// Runs the bed's kubectl (same version as the control plane) against it.
    pub fn kubectl(&self, args: &[&str]) -> Result<std::process::Output> {
        let out = std::process::Command::new(self.bins.path("kubectl"))
            .arg(format!("--kubeconfig={}", path_str(&self.kubeconfig)?))
            .args(args)
            .output()?;
        Ok(out)
    }
}

/// The `kubernetes` Service's endpoints, which the API server does not manage here (its address is loopback):
/// the API server as a guest reaches it, so that pods on a real node reach it as in-cluster clients do.
async fn kubernetes_endpoints(client: &kube::Client, api_port: u16) -> Result<()> {
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "kubernetes-testbed",
            "namespace": "default",
            "labels": {
                "kubernetes.io/service-name": "kubernetes",
                "endpointslice.kubernetes.io/managed-by": "testbed.berth.dev",
            },
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [HOST_FROM_GUEST], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": api_port, "protocol": "TCP"}],
    }))?;
    Api::<EndpointSlice>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &slice)
        .await
        .context("the kubernetes Service's EndpointSlice")?;
    Ok(())
}

/// Whether `taint` is the one a cordon (`kubectl cordon`, `drain`) puts on `node`: an operator's, which a reboot keeps.
fn is_cordon(node: &Node, taint: &k8s_openapi::api::core::v1::Taint) -> bool {
    taint.key == "node.kubernetes.io/unschedulable" && node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true)
}

/// The boot ID a Node's kubelet reported (a new one with every boot of its machine).
fn boot_id(node: &Node) -> Option<&str> {
    node.status.as_ref()?.node_info.as_ref().map(|i| i.boot_id.as_str())
}

/// Waits until the real node is Ready and untainted (but for a cordon) and has imported the images, failing early (with its console
/// and logs) if it stops. After a reboot (`previous_boot`: the boot ID before it) the Node must also carry a new
/// boot ID: its Ready condition is then the new kubelet's, not the last word of the old one.
async fn wait_real_node(res: &mut Resources, nodes: &Api<Node>, name: &str, previous_boot: Option<&str>) -> Result<()> {
    let started = Instant::now();
    loop {
        for p in res.procs.iter_mut() {
            p.ensure_running().context("while waiting for the real node")?;
        }
        let node = res.real_node.as_mut().expect("booted");
        node.ensure_running()?;
        if node.images_imported()
            && let Some(n) = nodes.get_opt(name).await?
            && (previous_boot.is_none() || boot_id(&n) != previous_boot)
            && crate::kube_util::node_is_ready(&n)
            && crate::kube_util::node_taints(&n).iter().all(|t| is_cordon(&n, t))
        {
            println!(
                "test bed: the real node {name} is Ready, its images imported, {:.0} s after its boot began",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if started.elapsed() > REAL_NODE_READY_TIMEOUT {
            bail!(
                "the real node {name} is not Ready with its images imported after {REAL_NODE_READY_TIMEOUT:?}; its console ended with:\n{}\n{}",
                node.console_tail(40),
                node.log_tails()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn probe(http: &reqwest::Client, url: &str) -> Result<bool> {
    Ok(match http.get(url).send().await {
        Ok(resp) => resp.status().is_success(),
        Err(_) => false, // not listening yet
    })
}

/// Polls `ready` until it says yes, failing early (with the end of its log) if any process of the bed exits.
async fn wait_ready<F, Fut>(procs: &mut [Proc], what: &str, mut ready: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last_error = None;
    loop {
        for p in procs.iter_mut() {
            p.ensure_running().with_context(|| format!("while waiting for {what}"))?;
        }
        match ready().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() > deadline {
            bail!("{what} not ready after {READY_TIMEOUT:?} (last error: {last_error:?}); logs are in the bed's logs/");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl TestBed {
    /// Writes a kubeconfig for this bed's API server that authenticates with a bearer `token`.
    pub(crate) fn write_token_kubeconfig(&self, path: &Path, token: &str) -> Result<()> {
        write_kubeconfig_as(path, &self.api_server, &self.pki, ("token", serde_json::json!({"token": token})))
    }
}

fn write_kubeconfig(path: &Path, server: &str, pki: &Pki) -> Result<()> {
    let admin = serde_json::json!({"client-certificate": pki.admin_cert, "client-key": pki.admin_key});
    write_kubeconfig_as(path, server, pki, ("admin", admin))
}

/// A kubeconfig for the bed's API server (trusting its CA) with the credentials of `user` (name, entry).
fn write_kubeconfig_as(path: &Path, server: &str, pki: &Pki, user: (&str, serde_json::Value)) -> Result<()> {
    let (name, credentials) = user;
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "berth-testbed", "cluster": {
            "server": server,
            "certificate-authority": pki.ca_cert,
        }}],
        "users": [{"name": name, "user": credentials}],
        "contexts": [{"name": "berth-testbed", "context": {"cluster": "berth-testbed", "user": name}}],
        "current-context": "berth-testbed",
    });
    // JSON is YAML: kubectl and kube-rs read it as a kubeconfig.
    std::fs::write(path, serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}
