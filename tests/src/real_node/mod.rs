//! A real Kubernetes node: kubelet, containerd (with runc and the CNI plugins) and kube-proxy in a qemu guest
//! running the Debian kernel, registered with the bed's API server on the host.
//!
//! How the pieces reach each other (docs/real-node.md has the picture):
//! - kubelet and kube-proxy reach the API server at 10.0.2.2 (qemu's name for the host's 127.0.0.1), each with
//!   a client certificate of its own: `system:node:<name>` in `system:nodes` for the kubelet (the Node
//!   authorizer and NodeRestriction apply to it as in a real cluster), `system:kube-proxy` for kube-proxy.
//! - Pods reach it as in-cluster clients do, through the `kubernetes` Service: the bed gives it an EndpointSlice
//!   pointing at 10.0.2.2 and kube-proxy's iptables rules in the guest translate the Service IP.
//! - The API server reaches the kubelet (exec, logs) through [`crate::egress::EgressProxy`]: the guest's
//!   10.0.2.15:10250 is forwarded to a host port on 127.0.0.1.
//!
//! The guest's state (containerd's images and containers, kubelet's pods, Berth's pools) lives on virtual disks
//! under the bed's directory; the guest's root is the host's, read-only. The pool disks are fresh for every node;
//! the state disk is a copy-on-write overlay of one baked once with the node binaries and the images (baked.rs).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bins::{dir_from_env_or_script, repo_root};
use crate::egress::EgressProxy;
use crate::pki::{ClientIdentity, Pki};
use crate::ports::free_port;
use crate::process::log_tail;
use crate::vm::{HOST_FROM_GUEST, RunningVm, Vm};
use baked::{BakeInputs, IMPORTED_AT_BOOT, STATE_DISK_NAME};

mod baked;

const NODE_SCRIPT: &str = include_str!("node.sh");
/// The guest's address on qemu's user network, which the kubelet reports as its InternalIP.
pub const GUEST_ADDRESS: &str = "10.0.2.15";
const KUBELET_PORT: u16 = 10250;
/// The pod network of the node (the CNI bridge's range) and the Service range of the bed's API server.
pub const POD_CIDR: &str = "10.244.0.0/24";
/// Sizes of the node's pool disks (sparse files): the XFS quota pool, the volume group. The state disk is an
/// overlay of the baked one (baked.rs).
const XFS_DISK: u64 = 2 << 30;
const LVM_DISK: u64 = 2 << 30;

/// What a real node is called: its Node name and (deliberately different) `kubernetes.io/hostname` label.
#[derive(Debug, Clone)]
pub struct RealNodeSpec {
    pub name: String,
    pub hostname: String,
}

impl Default for RealNodeSpec {
    fn default() -> Self {
        RealNodeSpec { name: "berth-node-0".into(), hostname: "host-berth-0".into() }
    }
}

/// The client identities a real node's daemons use; the bed's PKI writes them.
pub fn client_identities(spec: &RealNodeSpec) -> Vec<ClientIdentity> {
    vec![
        ClientIdentity {
            file_stem: "kubelet".into(),
            user: format!("system:node:{}", spec.name),
            groups: vec!["system:nodes".into()],
        },
        ClientIdentity { file_stem: "kube-proxy".into(), user: "system:kube-proxy".into(), groups: vec![] },
    ]
}

/// A running real node. Dropping it kills the guest.
pub struct RealNode {
    pub spec: RealNodeSpec,
    vm: Option<RunningVm>,
    logs: PathBuf,
    /// The guest as configured (its disks, forwards, environment) and its command: a reboot boots it again.
    guest: Vm,
    command: String,
    /// Boots so far (1 after [`RealNode::boot`]).
    boots: u32,
}

/// The file in the logs directory that asks node.sh to shut the node down.
const SHUTDOWN_MARKER: &str = "shutdown";
/// How long node.sh may take from the request to the guest's exit (kubelet's and containerd's stop, a sync).
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(90);
/// How long node.sh may take to stop or start kubelet when asked.
const KUBELET_DEADLINE: Duration = Duration::from_secs(60);

impl RealNode {
    /// Writes the node's configuration under `dir`, routes the API server's way to its kubelet through `egress`,
    /// and boots it. Returns once the guest has started its daemons; the caller waits for the Node to be Ready.
    /// The daemons' logs go to `logs` (the bed's log directory, which the guest may write).
    pub fn boot(
        dir: &Path,
        spec: RealNodeSpec,
        api_port: u16,
        pki: &Pki,
        egress: &EgressProxy,
        logs: &Path,
    ) -> Result<RealNode> {
        let node_bins = NodeBins::locate()?;
        let cfg = dir.join("config");
        let logs = logs.to_owned();
        std::fs::create_dir_all(&cfg)?;
        let sandbox = std::fs::read_to_string(node_bins.0.join("sandbox-image"))
            .context("hack/node-bins output has no sandbox-image file")?;
        let sandbox = sandbox.trim();
        let images = images_dir(sandbox)?;
        let listed = std::fs::read_to_string(images.join("images"))?;
        if !listed.lines().any(|l| l.split_whitespace().nth(1) == Some(sandbox)) {
            bail!(
                "{} has no {sandbox}, the sandbox image this containerd runs (hack/node-bins' sandbox-image): \
                 make it with hack/build-image --pause-ref {sandbox}",
                images.display()
            );
        }
        if let Some((_, top)) = IMPORTED_AT_BOOT.iter().find(|(_, top)| !images.join(top).is_file()) {
            bail!("{} has no {top}: rerun hack/build-image", images.display());
        }
        write_config(&cfg, &spec, api_port, pki, sandbox)?;
        let inputs = BakeInputs {
            script: NODE_SCRIPT,
            node_bins: &node_bins.0,
            images: &images,
            containerd_template: CONTAINERD_TOML,
        };
        let script = cfg.join("node.sh");
        std::fs::write(&script, NODE_SCRIPT)?;
        // The guest of the bake and of the node: node.sh's configuration, binaries, images and log directory.
        let guest = Vm::new()?
            .memory("2G")
            .cpus(2)
            .rwdir(&logs)
            .env("BERTH_NODE_DIR", cfg.display().to_string())
            .env("BERTH_NODE_LOGS", logs.display().to_string())
            .env("BERTH_NODE_BINS", node_bins.0.display().to_string())
            .env("BERTH_IMAGES", images.display().to_string());
        let (base, key) = baked::baked_disk(&inputs, guest.clone(), &script)?;
        let state = dir.join(STATE_DISK_NAME);
        baked::overlay(&base, &state)?;
        let mut vm = guest.disk(state);
        for (name, size) in [("node-xfs.img", XFS_DISK), ("node-lvm.img", LVM_DISK)] {
            let image = dir.join(name);
            std::fs::File::create_new(&image)
                .and_then(|f| f.set_len(size))
                .with_context(|| image.display().to_string())?;
            vm = vm.disk(image);
        }
        let kubelet_port = free_port(Ipv4Addr::LOCALHOST)?;
        vm = vm
            .forward(kubelet_port, KUBELET_PORT)
            .env("BERTH_NODE_KEY", key)
            .env("BERTH_NODE_IMPORT", IMPORTED_AT_BOOT.iter().map(|(_, top)| *top).collect::<Vec<_>>().join(" "))
            .env("BERTH_POD_CIDR", POD_CIDR)
            .env("BERTH_NODE_NAME", &spec.name)
            .env("BERTH_NODE_HOSTNAME", &spec.hostname);
        egress.route(&format!("{GUEST_ADDRESS}:{KUBELET_PORT}"), SocketAddr::from((Ipv4Addr::LOCALHOST, kubelet_port)));
        let command = format!("bash {}", script.display());
        let running = vm.spawn(&command)?;
        Ok(RealNode { spec, vm: Some(running), logs, guest: vm, command, boots: 1 })
    }

    /// Reboots the node: node.sh shuts it down as a reboot does (kubelet and kube-proxy stopped, the pods'
    /// processes killed, containerd stopped, the disks synced), then the guest boots again from the same disks
    /// (the state overlay, the XFS disk, the volume group), which node.sh then uses as they are. Returns once the
    /// new boot's node.sh runs; [`crate::TestBed::reboot_real_node`] waits for the Node. The console of the boot
    /// that ended is kept in the logs directory as `real-node-console-boot<N>.log`.
    pub fn reboot(&mut self) -> Result<()> {
        let marker = self.logs.join(SHUTDOWN_MARKER);
        std::fs::write(&marker, "")?;
        let vm = self.vm.as_mut().context("the node was stopped")?;
        let asked = Instant::now();
        while vm.is_running() {
            if asked.elapsed() > SHUTDOWN_DEADLINE {
                let console = vm.output_tail(40);
                if let Some(vm) = self.vm.take() {
                    vm.stop();
                }
                bail!(
                    "the real node did not shut down within {SHUTDOWN_DEADLINE:?} of being asked; its console ended with:\n{console}\n{}",
                    self.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let console = vm.output();
        println!("real node: shut down {:.0} s after being asked", asked.elapsed().as_secs_f64());
        std::fs::write(self.logs.join(format!("real-node-console-boot{}.log", self.boots)), &console)?;
        if !console.lines().any(|l| l.starts_with("node: ") && l.ends_with(" shut down")) {
            bail!(
                "the real node's guest exited without shutting down as asked; its console ended with:\n{}",
                crate::process::tail(&console, 40)
            );
        }
        std::fs::remove_file(&marker)?;
        // The new boot imports Berth's image again (quick: its layers are in containerd's store) and marks it anew.
        let _ = std::fs::remove_file(self.logs.join("images.imported"));
        self.vm = Some(self.guest.spawn(&self.command)?);
        self.boots += 1;
        Ok(())
    }

    /// Stops kubelet alone (node.sh's answer to the file `kubelet-stop`), as an administrator or a crash would:
    /// the pods' containers and kubelet's mounts for them stay. Returns once kubelet has exited; nothing reaches
    /// the node through kubelet (exec, logs) until [`RealNode::start_kubelet`].
    pub fn stop_kubelet(&mut self) -> Result<()> {
        self.ask_kubelet("kubelet-stop", "kubelet-stopped")
    }

    /// Starts kubelet again after [`RealNode::stop_kubelet`]; returns once it runs (the caller waits for the Node).
    pub fn start_kubelet(&mut self) -> Result<()> {
        self.ask_kubelet("kubelet-start", "kubelet-started")
    }

    fn ask_kubelet(&mut self, marker: &str, answer: &str) -> Result<()> {
        std::fs::write(self.logs.join(marker), "")?;
        let asked = Instant::now();
        while !self.logs.join(answer).exists() {
            self.ensure_running()?;
            if asked.elapsed() > KUBELET_DEADLINE {
                bail!(
                    "the real node did not answer {marker} within {KUBELET_DEADLINE:?}; its console ended with:\n{}\n{}",
                    self.console_tail(20),
                    self.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        println!("real node: {answer} {:.0} s after being asked", asked.elapsed().as_secs_f64());
        Ok(())
    }

    /// An error with what explains it (the guest's console, the end of kubelet's log) if the guest has stopped.
    pub fn ensure_running(&mut self) -> Result<()> {
        let vm = self.vm.as_mut().context("the node was stopped")?;
        if !vm.is_running() {
            bail!(
                "the real node's guest exited; its console ended with:\n{}\n{}",
                vm.output_tail(40),
                self.log_tails()
            );
        }
        Ok(())
    }

    /// The ends of the node daemons' logs (kept in the bed's directory), for failure messages.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for (name, lines) in [("kubelet.log", 15), ("containerd.log", 15), ("kube-proxy.log", 15), ("top.log", 19)] {
            out.push_str(&format!("--- end of {name}\n{}\n", log_tail(&self.logs.join(name), lines)));
        }
        out
    }

    /// The guest's console (kernel and the node script), for failure messages.
    pub fn console_tail(&self, lines: usize) -> String {
        self.vm.as_ref().map(|vm| vm.output_tail(lines)).unwrap_or_default()
    }

    /// Whether the guest has imported every image (node.sh imports them while kubelet starts).
    pub fn images_imported(&self) -> bool {
        self.logs.join("images.imported").exists()
    }

    /// Where the guest writes the daemons' logs.
    pub fn logs_dir(&self) -> &Path {
        &self.logs
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            vm.stop();
        }
    }
}

/// The node's binaries: `$BERTH_NODE_BINS`, or what `hack/node-bins` prints last (it builds on a cold cache).
struct NodeBins(PathBuf);

impl NodeBins {
    fn locate() -> Result<NodeBins> {
        static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        let dir = DIR.get_or_init(|| {
            dir_from_env_or_script("BERTH_NODE_BINS", "hack/node-bins", &[]).map_err(|e| format!("{e:#}"))
        });
        let dir = dir.clone().map_err(anyhow::Error::msg)?;
        for bin in ["kubelet", "kube-proxy", "containerd", "ctr", "containerd-shim-runc-v2", "runc", "sandbox-image"] {
            if !dir.join(bin).is_file() {
                bail!("{} has no {bin}: run hack/node-bins, or point BERTH_NODE_BINS at its output", dir.display());
            }
        }
        Ok(NodeBins(dir))
    }
}

/// The OCI archives the node imports: `$BERTH_IMAGES`, or `hack/build-image --pause-ref SANDBOX target/images`
/// (slow the first time: a release build), its pause image the `sandbox` image containerd runs.
fn images_dir(sandbox: &str) -> Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let out = repo_root().join("target/images");
    let dir = DIR.get_or_init(|| {
        let args = ["--pause-ref", sandbox, out.to_str().unwrap_or_default()];
        dir_from_env_or_script("BERTH_IMAGES", "hack/build-image", &args).map_err(|e| format!("{e:#}"))
    });
    let dir = dir.clone().map_err(anyhow::Error::msg)?;
    if !dir.join("images").is_file() {
        bail!("{} has no images list: run hack/build-image, or point BERTH_IMAGES at its output", dir.display());
    }
    Ok(dir)
}

/// containerd's configuration (`@SANDBOX@`: the sandbox image; `@CNI@`: the directory of the CNI configuration).
/// The baked disk is keyed by it (its state is made with it).
const CONTAINERD_TOML: &str = r#"# containerd 2.x for the test bed's real node (tests/src/real_node/mod.rs writes it).
version = 3
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.cri.v1.images".pinned_images]
  # Imported from hack/build-image's archive: no registry is reachable.
  sandbox = "@SANDBOX@"

[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = ["/var/lib/node/cni/bin"]
  conf_dir = "@CNI@"

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
  BinaryName = "/var/lib/node/bin/runc"
  SystemdCgroup = false
"#;

/// containerd's, kubelet's, kube-proxy's and the CNI configuration, and the daemons' kubeconfigs.
fn write_config(cfg: &Path, spec: &RealNodeSpec, api_port: u16, pki: &Pki, sandbox_image: &str) -> Result<()> {
    let server = format!("https://{HOST_FROM_GUEST}:{api_port}");
    for identity in client_identities(spec) {
        let (cert, key) = pki.client(&identity.file_stem);
        let kubeconfig = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "bed", "cluster": {"server": server, "certificate-authority": pki.ca_cert}}],
            "users": [{"name": identity.user, "user": {"client-certificate": cert, "client-key": key}}],
            "contexts": [{"name": "bed", "context": {"cluster": "bed", "user": identity.user}}],
            "current-context": "bed",
        });
        std::fs::write(
            cfg.join(format!("{}.kubeconfig", identity.file_stem)),
            serde_json::to_vec_pretty(&kubeconfig)?,
        )?;
    }
    let cni = cfg.join("cni");
    std::fs::create_dir_all(&cni)?;
    // One bridge for the node's pods, nothing more: no pod here uses host ports (no portmap), and what leaves the
    // pod range (the API server at 10.0.2.2) is masqueraded by one rule node.sh writes, as a cluster's network
    // does. The bridge plugin's own ipMasq would run several iptables commands for every pod started and removed,
    // each a noticeable cost under emulation.
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "berth-testbed",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]], "routes": [{"dst": "0.0.0.0/0"}]}},
        ],
    });
    std::fs::write(cni.join("10-berth-testbed.conflist"), serde_json::to_vec_pretty(&conflist)?)?;
    let containerd = CONTAINERD_TOML.replace("@SANDBOX@", sandbox_image).replace("@CNI@", &cni.display().to_string());
    std::fs::write(cfg.join("containerd.toml"), containerd)?;
    let kubelet = serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true},
            "x509": {"clientCAFile": pki.ca_cert},
        },
        "authorization": {"mode": "Webhook"},
        // virtme-ng's init is not systemd.
        "cgroupDriver": "cgroupfs",
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "failSwapOn": false,
        "clusterDomain": "cluster.local",
        // Small virtual disks: evict only when nearly full, and keep the imported images (they cannot be pulled).
        "evictionHard": {"memory.available": "50Mi", "nodefs.available": "2%", "imagefs.available": "2%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": false,
        "nodeStatusUpdateFrequency": "5s",
        // Volume usage and capacity (/stats/summary, kubelet_volume_stats_*) every 10 s rather than every minute:
        // the tests read them. For `local` PVs it is a statfs per volume.
        "volumeStatsAggPeriod": "10s",
    });
    std::fs::write(cfg.join("kubelet.yaml"), serde_json::to_vec_pretty(&kubelet)?)?;
    let kube_proxy = serde_json::json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": cfg.join("kube-proxy.kubeconfig")},
        "mode": "iptables",
        "clusterCIDR": POD_CIDR,
        "hostnameOverride": spec.name,
        // The guest's conntrack table size is the kernel's default; kube-proxy must not try to resize it.
        "conntrack": {"maxPerCore": 0},
        "metricsBindAddress": "127.0.0.1:10249",
        "healthzBindAddress": "127.0.0.1:10256",
    });
    std::fs::write(cfg.join("kube-proxy.yaml"), serde_json::to_vec_pretty(&kube_proxy)?)?;
    Ok(())
}
