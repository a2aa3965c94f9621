//! Berth installed the way users install it: `kubectl apply -k` of deploy/ (through the image overlay
//! tests/deploy/real-node), pools prepared with `kubectl exec … berth-agent init-pool`, on a bed with a real node.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use berth::agent_api::PoolStatus;
use berth::berth_node::BerthNode;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use crate::TestBed;
use crate::bins::repo_root;
use crate::kube_util::wait_for;

pub const NAMESPACE: &str = "berth-system";

/// What to install: deploy/ through the image overlay, plus deploy/ components (`"quota"`, `"lvm"`) and, if
/// given, an agent configuration replacing deploy/agent/agent.toml (as deploy/agent/agent.toml tells users to).
#[derive(Debug, Clone, Default)]
pub struct Install {
    pub components: Vec<&'static str>,
    pub agent_toml: Option<String>,
}

impl Install {
    /// Writes the kustomization into `dir` (made if missing) and returns `dir`.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        // kustomize takes only relative paths to other kustomizations.
        let root = relative(&std::path::absolute(dir)?, &repo_root());
        let mut text = format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n- {}\n",
            root.join("tests/deploy/real-node").display()
        );
        if !self.components.is_empty() {
            text.push_str("components:\n");
            for c in &self.components {
                text.push_str(&format!("- {}\n", root.join("deploy").join(c).display()));
            }
        }
        if let Some(toml) = &self.agent_toml {
            std::fs::write(dir.join("agent.toml"), toml)?;
            text.push_str(
                "configMapGenerator:\n- name: berth-agent-config\n  namespace: berth-system\n  behavior: replace\n  \
                 files:\n  - agent.toml\n",
            );
        }
        std::fs::write(dir.join("kustomization.yaml"), text)?;
        Ok(dir.to_owned())
    }
}

/// The path from directory `from` to `to`, both absolute and without `..`: `../..` up to their common part, then
/// down.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let common = from.components().zip(to.components()).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    for _ in from.components().skip(common) {
        path.push("..");
    }
    to.components().skip(common).for_each(|c| path.push(c));
    path
}

/// `kubectl <args>` against the bed; its stdout, or an error with its stderr.
pub fn kubectl(bed: &TestBed, args: &[&str]) -> Result<String> {
    let out = bed.kubectl(args)?;
    if !out.status.success() {
        bail!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether Berth's ServiceAccounts on `bed` have exactly the permissions of deploy/rbac-allowlist/ (hack/rbac-allowlist,
/// after an install from deploy/ or the Helm chart); the differences otherwise.
pub fn permissions_are_the_allowlisted_ones(bed: &TestBed) -> Result<()> {
    let out = std::process::Command::new(repo_root().join("hack/rbac-allowlist"))
        .env("KUBECONFIG", bed.kubeconfig())
        .env("KUBECTL", bed.kubectl_path())
        .output()?;
    if !out.status.success() {
        bail!(
            "permissions differ from deploy/rbac-allowlist/ (hack/rbac-allowlist --update, then review the diff):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `kubectl apply -f` of `manifest` (YAML text).
pub fn kubectl_apply_text(bed: &TestBed, manifest: &str) -> Result<String> {
    let file = tempfile::Builder::new().suffix(".yaml").tempfile_in(bed.dir())?;
    std::fs::write(file.path(), manifest)?;
    kubectl(bed, &["apply", "-f", &file.path().display().to_string()])
}

/// Applies `install` (written under `dir`) and waits until the agent DaemonSet and the controller Deployment have
/// rolled out: every pod of the current revision Running and Ready.
pub fn apply(bed: &TestBed, install: &Install, dir: &Path) -> Result<()> {
    let dir = install.write(dir)?;
    kubectl(bed, &["apply", "-k", &dir.display().to_string()])?;
    for workload in ["daemonset/berth-agent", "deployment/berth-controller"] {
        kubectl(bed, &["-n", NAMESPACE, "rollout", "status", workload, "--timeout=240s"])
            .with_context(|| format!("{workload} did not roll out; {}", describe_pods(bed)))?;
    }
    Ok(())
}

/// Every namespace's events in the order they were first seen, one line each (time, namespace, object, reason,
/// message): where a run on the real node spent its time. Sorted by the objects' creation, which every event has
/// (the scheduler's and Berth's events.k8s.io events have no lastTimestamp).
pub fn timeline(bed: &TestBed) -> String {
    let columns = "custom-columns=FIRST:.metadata.creationTimestamp,NAMESPACE:.metadata.namespace,\
                   OBJECT:.involvedObject.name,REASON:.reason,MESSAGE:.message";
    let sort = "--sort-by=.metadata.creationTimestamp";
    kubectl(bed, &["get", "events", "-A", sort, "-o", columns]).unwrap_or_else(|e| e.to_string())
}

/// `kubectl get pods -o wide` and the namespace's events, for failure messages.
pub fn describe_pods(bed: &TestBed) -> String {
    let pods = kubectl(bed, &["-n", NAMESPACE, "get", "pods", "-o", "wide"]).unwrap_or_else(|e| e.to_string());
    let events =
        kubectl(bed, &["-n", NAMESPACE, "get", "events", "--sort-by=.lastTimestamp"]).unwrap_or_else(|e| e.to_string());
    // Through the API server's way to the kubelet (the egress proxy): the pods' own words on why.
    let names = kubectl(bed, &["-n", NAMESPACE, "get", "pods", "-o", "name"]).unwrap_or_default();
    let logs: String = names
        .lines()
        .map(|pod| {
            let tail = kubectl(bed, &["-n", NAMESPACE, "logs", "--tail=25", "--all-containers", pod])
                .unwrap_or_else(|e| e.to_string());
            format!("--- kubectl logs {pod}\n{tail}\n")
        })
        .collect();
    format!("pods:\n{pods}\nevents:\n{events}\n{logs}")
}

/// The running agent pod on `node` (the DaemonSet's, not one being replaced).
pub async fn agent_pod(client: &kube::Client, node: &str) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let params =
        ListParams::default().labels("app.kubernetes.io/name=berth-agent").fields(&format!("spec.nodeName={node}"));
    let running: Vec<Pod> = pods
        .list(&params)
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .collect();
    match running.as_slice() {
        [pod] => Ok(pod.clone()),
        other => bail!("expected one running agent pod on {node}, found {}", other.len()),
    }
}

/// What deploy/agent/agent.toml tells an operator to run once per pool: `berth-agent init-pool` in the agent's pod.
pub async fn init_pool(bed: &TestBed, node: &str, pool: &str) -> Result<String> {
    let pod = agent_pod(&bed.client(), node).await?;
    let name = pod.metadata.name.context("pod without a name")?;
    kubectl(
        bed,
        &[
            "-n",
            NAMESPACE,
            "exec",
            &name,
            "--",
            "berth-agent",
            "init-pool",
            "--config",
            "/etc/berth/agent.toml",
            "--pool",
            pool,
        ],
    )
}

/// Waits until `node`'s BerthNode reports `pool` and `condition` holds for it; returns the pool's status.
pub async fn wait_pool(
    client: &kube::Client,
    node: &str,
    pool: &str,
    timeout: Duration,
    condition: impl Fn(&PoolStatus) -> bool,
) -> Result<PoolStatus> {
    let api: Api<BerthNode> = Api::all(client.clone());
    let find = |bn: &BerthNode| bn.status.as_ref().and_then(|s| s.pools.iter().find(|p| p.name == pool).cloned());
    let bn = wait_for(&api, node, timeout, |bn| find(bn).is_some_and(|p| condition(&p)))
        .await
        .with_context(|| format!("pool {pool} of {node}"))?;
    Ok(find(&bn).expect("the condition found it"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_climb_to_the_common_part() {
        let rel = |a: &str, b: &str| relative(Path::new(a), Path::new(b)).display().to_string();
        assert_eq!(rel("/work/repo/target/beds/x/install", "/work/repo"), "../../../..");
        assert_eq!(rel("/tmp/bed/install", "/work/repo"), "../../../work/repo");
        assert_eq!(rel("/work/repo", "/work/repo"), "");
    }
}
