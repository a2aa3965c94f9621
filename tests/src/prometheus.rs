//! A real Prometheus (Debian's `prometheus` package) scraping the bed's agents and controllers every second, with
//! deploy/prometheus/alerts.yaml loaded — for the end-to-end suite and `hack/up --prometheus`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::TestBed;
use crate::agents::AgentProcess;
use crate::bins::repo_root;
use crate::ports::free_port;
use crate::process::Proc;

pub struct Prometheus {
    /// `http://<address>:<port>`: the UI and the HTTP API.
    pub url: String,
    _proc: Proc,
}

/// `host:port` of an `https://host:port` endpoint.
fn target(endpoint: &str) -> &str {
    endpoint.trim_start_matches("https://").trim_start_matches("http://").trim_end_matches('/')
}

impl TestBed {
    /// Starts Prometheus scraping `agents` (HTTPS, verified against the certificates they published) as job
    /// `berth-agent` and the controllers at `controllers` (`host:port` of their `--metrics-address`) as job
    /// `berth-controller`, the job names the alert rules expect. Returns once it answers `/-/ready`.
    pub async fn start_prometheus(&self, agents: &[&AgentProcess], controllers: &[String]) -> Result<Prometheus> {
        let dir = self.dir().join("prometheus");
        std::fs::create_dir_all(&dir)?;
        // Each agent's certificate is self-signed: together they are the CA bundle.
        let ca: String = agents.iter().map(|a| a.certificate.clone()).collect::<Vec<_>>().join("\n");
        std::fs::write(dir.join("agents-ca.pem"), ca)?;
        let agent_targets: Vec<&str> = agents.iter().map(|a| target(&a.endpoint)).collect();
        let config = serde_json::json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [repo_root().join("deploy/prometheus/alerts.yaml")],
            "scrape_configs": [
                {
                    "job_name": "berth-agent",
                    "scheme": "https",
                    "tls_config": {"ca_file": dir.join("agents-ca.pem")},
                    "static_configs": [{"targets": agent_targets}],
                },
                {"job_name": "berth-controller", "static_configs": [{"targets": controllers}]},
            ],
        });
        // JSON is YAML.
        std::fs::write(dir.join("prometheus.yml"), serde_json::to_vec_pretty(&config)?)?;
        let port = free_port(self.address())?;
        let url = format!("http://{}:{port}", self.address());
        let args = vec![
            format!("--config.file={}", dir.join("prometheus.yml").display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={}:{port}", self.address()),
        ];
        // A bare name: the spawn looks it up on PATH.
        let mut proc =
            Proc::spawn("prometheus", Path::new("prometheus"), &args, &self.dir().join("logs/prometheus.log"))
                .context("prometheus (hack/deps installs Debian's package)")?;
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            proc.ensure_running()?;
            if http.get(format!("{url}/-/ready")).send().await.is_ok_and(|r| r.status().is_success()) {
                return Ok(Prometheus { url, _proc: proc });
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready within 60 s; see {}", self.dir().join("logs/prometheus.log").display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Prometheus {
    /// An instant query's result: (labels, value) per series.
    pub async fn query(&self, expr: &str) -> Result<Vec<(serde_json::Map<String, serde_json::Value>, f64)>> {
        let answer: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await?
            .json()
            .await?;
        if answer["status"] != "success" {
            bail!("query {expr:?} failed: {answer}");
        }
        let mut out = Vec::new();
        for s in answer["data"]["result"].as_array().context("a vector result")? {
            let labels = s["metric"].as_object().cloned().unwrap_or_default();
            let value = s["value"][1].as_str().and_then(|v| v.parse().ok()).context("a sample value")?;
            out.push((labels, value));
        }
        Ok(out)
    }
}
