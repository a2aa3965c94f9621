//! Berth's node agents on the test bed: one `berth-agent` process per simulated node, on the node's own loopback
//! address, with pools on the node's own disk, authenticating callers through the bed's real TokenReview.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use berth::berth_node::BerthNode;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};

use crate::TestBed;
use crate::kube_util::wait_for;
use crate::ports::free_port;
use crate::process::Proc;

/// The controller's identity as the agents are told to expect it (the default of `--controller-identity`).
pub const CONTROLLER_NAMESPACE: &str = "berth-system";
pub const CONTROLLER_SERVICE_ACCOUNT: &str = "berth-controller";

#[derive(Debug, Clone)]
pub struct PoolSpec {
    pub name: String,
    /// `hostpath` (default) or `lvm` (then `extra` names the volume group).
    pub backend: String,
    /// Directory of the pool's root, relative to the node's disk (or the node's directory without a disk).
    pub root: String,
    /// Extra TOML lines of the pool (e.g. `capacity = "100Mi"`).
    pub extra: String,
}

impl PoolSpec {
    pub fn new(name: &str) -> PoolSpec {
        PoolSpec { name: name.into(), backend: "hostpath".into(), root: format!("pools/{name}"), extra: String::new() }
    }
}

/// A running `berth-agent`.
pub struct AgentProcess {
    pub node: String,
    /// `https://<node address>:<port>`.
    pub endpoint: String,
    /// The serving certificate it published in its BerthNode (PEM).
    pub certificate: String,
    pub config: PathBuf,
    /// Pool name → root directory.
    pub pool_roots: Vec<(String, PathBuf)>,
    binary: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    client: kube::Client,
    proc: Option<Proc>,
    /// A command line the agent's is appended to at each start (limits, a cgroup: [`AgentProcess::wrap`]).
    prefix: Vec<String>,
}

impl TestBed {
    /// Installs what Berth needs cluster-wide, from deploy/ as users install it: the namespace, the ServiceAccounts
    /// and their RBAC, the BerthNode admission policy, the CSIDriver object (with it, kube-scheduler only places
    /// pods where the controller has published capacity), and the CRDs (from the Rust types, which the checked-in
    /// CRD is tested against; waits until the API server serves them). Not the DaemonSet and Deployment: the bed
    /// runs agents and controllers as processes.
    pub async fn install_berth(&self) -> Result<()> {
        let deploy = crate::bins::repo_root().join("deploy");
        for part in ["namespace.yaml", "rbac", "admission", "csidriver.yaml"] {
            let path = deploy.join(part).display().to_string();
            let out = self.kubectl(&["apply", "-f", &path])?;
            if !out.status.success() {
                bail!("kubectl apply -f {path}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let crds: Api<CustomResourceDefinition> = Api::all(self.client());
        let crd = BerthNode::crd();
        let name = crd.metadata.name.clone().expect("named");
        crds.patch(&name, &PatchParams::apply("berth-testbed").force(), &Patch::Apply(&crd)).await?;
        wait_for(&crds, &name, Duration::from_secs(30), |c| {
            c.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"))
        })
        .await?;
        Ok(())
    }

    /// A token of ServiceAccount `namespace/name` (both created if missing) for `audience`.
    pub async fn service_account_token(&self, namespace: &str, name: &str, audience: &str) -> Result<String> {
        let pp = PostParams::default();
        let namespaces: Api<Namespace> = Api::all(self.client());
        if namespaces.get_opt(namespace).await?.is_none() {
            let ns = Namespace {
                metadata: ObjectMeta { name: Some(namespace.into()), ..Default::default() },
                ..Default::default()
            };
            namespaces.create(&pp, &ns).await?;
        }
        let sas: Api<ServiceAccount> = Api::namespaced(self.client(), namespace);
        if sas.get_opt(name).await?.is_none() {
            let sa = ServiceAccount {
                metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
                ..Default::default()
            };
            sas.create(&pp, &sa).await?;
        }
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![audience.into()]),
                expiration_seconds: Some(3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        let token = sas.create_token_request(name, &pp, &request).await?;
        token.status.and_then(|s| s.token).context("TokenRequest returned no token")
    }

    /// The controller's token for node `node`'s agent.
    pub async fn controller_token(&self, node: &str) -> Result<String> {
        self.service_account_token(CONTROLLER_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT, &berth::agent_audience(node)).await
    }

    /// Starts `berth-controller` (the binary at `binary`) with a token of its ServiceAccount (deploy/rbac/; call
    /// [`TestBed::install_berth`] first). Stopped when the returned process is dropped.
    pub async fn start_controller(&self, binary: &Path, args: &[&str]) -> Result<Proc> {
        self.start_controller_named("berth-controller", binary, args, &[]).await
    }

    /// A free TCP port on the bed's own address.
    pub fn free_port(&self) -> Result<u16> {
        free_port(self.address())
    }

    /// Starts a controller replica called `name` (its log is `logs/<name>.log`, its lease identity `name`) with
    /// extra environment variables `env`.
    pub async fn start_controller_named(
        &self,
        name: &str,
        binary: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Proc> {
        let kubeconfig = self.controller_kubeconfig().await?.display().to_string();
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.push(format!("--identity={name}"));
        if !args.iter().any(|a| a.starts_with("--metrics-address")) {
            // On the bed's own address: replicas and beds running at once do not clash.
            args.push(format!("--metrics-address={}:{}", self.address(), crate::ports::free_port(self.address())?));
        }
        let mut all_env = vec![("KUBECONFIG", kubeconfig.as_str()), ("RUST_LOG", "info,kube=warn")];
        all_env.extend_from_slice(env);
        Proc::spawn_with_env(name, binary, &args, &all_env, &self.dir().join(format!("logs/{name}.log")))
    }

    /// Starts `berth-agent` (the binary at `binary`) for simulated node `index` with `pools` (initialised with
    /// `berth-agent init-pool` unless `init` is false) and waits until its BerthNode shows its endpoint.
    /// Call [`TestBed::install_berth`] first.
    pub async fn start_agent(
        &self,
        binary: &Path,
        index: usize,
        pools: &[PoolSpec],
        init: bool,
    ) -> Result<AgentProcess> {
        let base = self.node_base(index);
        let mut toml = String::new();
        let mut pool_roots = Vec::new();
        for p in pools {
            let root = base.join(&p.root);
            toml.push_str(&format!(
                "[[pool]]\nname = {:?}\nbackend = {:?}\nroot = {:?}\n{}\n\n",
                p.name, p.backend, root, p.extra
            ));
            pool_roots.push((p.name.clone(), root));
        }
        self.start_agent_with_config(binary, index, &toml, pool_roots, init).await
    }

    /// The directory simulated node `index`'s pools live under: its disk's mount point, or a directory of the bed.
    pub fn node_base(&self, index: usize) -> PathBuf {
        let node = &self.nodes()[index];
        node.disk
            .as_ref()
            .map(|d| d.mount_point().to_path_buf())
            .unwrap_or_else(|| self.dir().join("nodes").join(&node.name))
    }

    /// [`TestBed::start_agent`] with the configuration file's text `toml` as it is (such as a Helm chart's
    /// ConfigMap), whose pools are `pool_roots` (name, root).
    pub async fn start_agent_with_config(
        &self,
        binary: &Path,
        index: usize,
        toml: &str,
        pool_roots: Vec<(String, PathBuf)>,
        init: bool,
    ) -> Result<AgentProcess> {
        let node = &self.nodes()[index];
        let agent_dir = self.dir().join("agents").join(&node.name);
        std::fs::create_dir_all(&agent_dir)?;
        let config = agent_dir.join("agent.toml");
        std::fs::write(&config, toml)?;
        if init {
            for (pool, _) in &pool_roots {
                let out = std::process::Command::new(binary)
                    .args(["init-pool", "--config"])
                    .arg(&config)
                    .args(["--pool", pool])
                    .output()?;
                if !out.status.success() {
                    bail!("berth-agent init-pool {pool}: {}", String::from_utf8_lossy(&out.stderr));
                }
            }
        }
        let port = free_port(node.address)?;
        let endpoint = format!("https://{}:{port}", node.address);
        let args = vec![
            "run".into(),
            format!("--config={}", config.display()),
            format!("--node-name={}", node.name),
            format!("--listen={}:{port}", node.address),
            format!("--state-dir={}", agent_dir.join("state").display()),
            "--shutdown-grace-seconds=10".into(),
        ];
        let env = vec![
            ("KUBECONFIG".to_string(), self.agent_kubeconfig(&node.name).await?.display().to_string()),
            ("RUST_LOG".to_string(), "info,kube=warn".to_string()),
        ];
        let mut agent = AgentProcess {
            node: node.name.clone(),
            endpoint,
            certificate: String::new(),
            config,
            pool_roots,
            binary: binary.to_owned(),
            args,
            env,
            log: self.dir().join("logs").join(format!("agent-{}.log", node.name)),
            client: self.client(),
            proc: None,
            prefix: Vec::new(),
        };
        agent.start().await?;
        Ok(agent)
    }
}

impl AgentProcess {
    /// (Re)starts the process and waits for a BerthNode status carrying this endpoint and a new certificate.
    pub async fn start(&mut self) -> Result<()> {
        self.start_as(&self.binary.clone(), &[]).await
    }

    /// [`AgentProcess::start`] this once as `binary` (another build of the agent, such as
    /// `berth-agent-failpoints`) with `env` added; the next `start` is the usual one again.
    pub async fn start_as(&mut self, binary: &Path, env: &[(&str, &str)]) -> Result<()> {
        self.launch_as(binary, env)?;
        self.wait_published().await
    }

    /// Starts the process as [`AgentProcess::start_as`] does, without waiting for it to publish itself (it may be
    /// meant to die first: a crash point on its way to serving).
    pub fn launch_as(&mut self, binary: &Path, extra_env: &[(&str, &str)]) -> Result<()> {
        let mut env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        env.extend_from_slice(extra_env);
        let (program, args) = match self.prefix.split_first() {
            None => (binary.to_owned(), self.args.clone()),
            Some((program, rest)) => {
                let mut args = rest.to_vec();
                args.push(binary.display().to_string());
                args.extend(self.args.iter().cloned());
                (PathBuf::from(program), args)
            }
        };
        self.proc =
            Some(Proc::spawn_with_env(&format!("berth-agent {}", self.node), &program, &args, &env, &self.log)?);
        Ok(())
    }

    /// Waits for a BerthNode status carrying this endpoint and a certificate other than the last one seen.
    async fn wait_published(&mut self) -> Result<()> {
        let old = std::mem::take(&mut self.certificate);
        let nodes: Api<BerthNode> = Api::all(self.client.clone());
        let endpoint = self.endpoint.clone();
        let waited = wait_for(&nodes, &self.node, Duration::from_secs(30), |n| {
            n.status
                .as_ref()
                .is_some_and(|s| s.endpoint == endpoint && !s.certificate.is_empty() && s.certificate != old)
        })
        .await;
        match waited {
            Ok(n) => {
                self.certificate = n.status.expect("checked").certificate;
                Ok(())
            }
            Err(e) => {
                let tail = crate::process::log_tail(&self.log, 30);
                Err(e.context(format!("agent of {} did not publish itself; its log:\n{tail}", self.node)))
            }
        }
    }

    /// From the next start on, runs the agent as the last part of `prefix …` (e.g. `prlimit --nofile=256 --`, or
    /// [`crate::cgroup::MemoryCgroup::prefix`]); prefixes given in turn nest, the first outermost.
    pub fn wrap(&mut self, prefix: &[String]) {
        self.prefix.extend_from_slice(prefix);
    }

    /// From the next start on, runs the agent with `args` after the bed's own (e.g. `--max-connections=8`).
    pub fn add_args(&mut self, args: &[&str]) {
        self.args.extend(args.iter().map(|a| a.to_string()));
    }

    /// A mutating request to `path` as the controller sends it: its token and leadership epoch.
    pub fn controller_request(
        &self,
        http: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
        token: &str,
        epoch: u64,
    ) -> reqwest::RequestBuilder {
        http.request(method, self.url(path))
            .bearer_auth(token)
            .header(berth::agent_api::EPOCH_HEADER, epoch.to_string())
    }

    /// The running agent's process ID: the agent's own only when it was started without a [`AgentProcess::wrap`]
    /// prefix (else the wrapper's).
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// An HTTPS client that trusts exactly this agent's published certificate.
    pub fn http(&self) -> Result<reqwest::Client> {
        Ok(reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.certificate.as_bytes())?)
            .tls_built_in_root_certs(false)
            .timeout(Duration::from_secs(30))
            // Below the agent's header read timeout, which closes idle connections (as the controller's client).
            .pool_idle_timeout(Duration::from_secs(20))
            .build()?)
    }

    /// Sends one request exactly as written — `target` (path and query) reaches the agent byte for byte, where an
    /// HTTP client would resolve `..` and `%2e%2e` first — over TLS that trusts only this agent's certificate, and
    /// returns the status and body. `Content-Length` and `Connection: close` are added; 30 s in all.
    pub async fn raw_request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(u16, Vec<u8>)> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(self.certificate.as_bytes())?)?;
        let config = rustls::ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let address = self.endpoint.trim_start_matches("https://").to_owned();
        let host = address.rsplit_once(':').map_or(address.as_str(), |(h, _)| h);
        let server = ServerName::try_from(host.to_owned())?;
        let mut head = format!("{method} {target} HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\n");
        head += &format!("content-length: {}\r\n", body.len());
        for (name, value) in headers {
            head += &format!("{name}: {value}\r\n");
        }
        head += "\r\n";
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(&address).await?;
            let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(server, tcp).await?;
            tls.write_all(head.as_bytes()).await?;
            tls.write_all(body).await?;
            tls.flush().await?;
            let mut response = Vec::new();
            match tls.read_to_end(&mut response).await {
                // hyper closes without TLS's close_notify after `Connection: close`; the response is whole.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
                other => {
                    other?;
                }
            }
            anyhow::Ok(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .with_context(|| format!("{method} {target}: no whole answer within 30 s"))??;
        let split = response.windows(4).position(|w| w == b"\r\n\r\n").context("no end of headers")?;
        let head = String::from_utf8_lossy(&response[..split]);
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            bail!("{method} {target}: a chunked answer (not read here): {head}");
        }
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).context("no status line")?;
        Ok((status, response[split + 4..].to_vec()))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoint)
    }

    pub fn pool_root(&self, pool: &str) -> &Path {
        &self.pool_roots.iter().find(|(n, _)| n == pool).expect("configured pool").1
    }

    /// SIGKILL: the crash case.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal_and_wait(libc::SIGKILL, Duration::from_secs(10));
        }
    }

    /// Waits up to `timeout` for the agent to exit by itself (a crash point): its exit status, or None if it still
    /// runs. Once it has exited, [`AgentProcess::start`] starts it again.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let status = self.proc.as_mut()?.wait_exit(timeout)?;
        self.proc = None;
        Some(status)
    }

    /// SIGTERM and the exit status (None if it did not exit within `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.proc.as_mut().and_then(|p| p.signal_and_wait(libc::SIGTERM, timeout))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
