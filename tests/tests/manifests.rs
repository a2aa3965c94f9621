//! The checked-in manifests are accepted by the real API server as they are, without warnings.

use testbed::bins::repo_root;
use testbed::{TestBed, TestBedConfig};

#[tokio::test(flavor = "multi_thread")]
async fn crds_apply_cleanly_and_berthnodes_are_served() {
    let bed = TestBed::start(TestBedConfig::nodes(0)).await.unwrap();
    let crds = repo_root().join("deploy/crds");
    let out = bed.kubectl(&["apply", "-f", crds.to_str().unwrap()]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("Warning"), "the API server warned: {stderr}");
    let out =
        bed.kubectl(&["wait", "--for=condition=Established", "crd/berthnodes.berth.dev", "--timeout=30s"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = bed.kubectl(&["get", "berthnodes"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn kubectl_ok(bed: &TestBed, args: &[&str]) -> String {
    let out = bed.kubectl(args).unwrap();
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kubectl auth can-i` as a ServiceAccount of berth-system (with the groups its tokens carry): yes or no.
fn can(bed: &TestBed, account: &str, verb: &str, resource: &str) -> bool {
    let user = format!("--as=system:serviceaccount:berth-system:{account}");
    let out = bed
        .kubectl(&[
            "auth",
            "can-i",
            verb,
            resource,
            "-n",
            "berth-system",
            &user,
            "--as-group=system:serviceaccounts",
            "--as-group=system:serviceaccounts:berth-system",
        ])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

#[tokio::test(flavor = "multi_thread")]
async fn the_kustomize_base_applies_and_its_permissions_are_the_allowlisted_ones() {
    let bed = TestBed::start(TestBedConfig::nodes(1)).await.unwrap();
    let deploy = repo_root().join("deploy");
    let out = bed.kubectl(&["apply", "-k", deploy.to_str().unwrap()]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubectl apply -k deploy/: {stderr}");
    assert!(!stderr.contains("Warning"), "the API server warned: {stderr}");
    kubectl_ok(&bed, &["apply", "-k", repo_root().join("deploy/examples").to_str().unwrap()]);

    // The effective permissions are exactly the checked-in allowlists.
    let out = std::process::Command::new(repo_root().join("hack/rbac-allowlist"))
        .env("KUBECONFIG", bed.kubeconfig())
        .env("KUBECTL", bed.kubectl_path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "permissions differ from deploy/rbac-allowlist/ (hack/rbac-allowlist --update, then review the diff):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The ones that matter most, spelled out.
    for account in ["berth-controller", "berth-agent"] {
        for verb in ["get", "list"] {
            assert!(!can(&bed, account, verb, "secrets"), "{account} may {verb} Secrets");
        }
    }
    for verb in ["create", "patch", "update", "delete"] {
        assert!(!can(&bed, "berth-agent", verb, "persistentvolumes"), "the agent may {verb} PVs");
    }
    assert!(can(&bed, "berth-controller", "create", "persistentvolumes"), "the controller creates PVs");
    assert!(can(&bed, "berth-controller", "update", "csistoragecapacities"), "the controller publishes capacity");
    assert!(can(&bed, "berth-agent", "create", "tokenreviews.authentication.k8s.io"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agents_token_may_write_only_its_own_nodes_berthnode() {
    use berth::berth_node::{BerthNode, BerthNodeSpec};
    use kube::api::{Api, Patch, PatchParams, PostParams};

    let bed = TestBed::start(TestBedConfig::nodes(2)).await.unwrap();
    bed.install_berth().await.unwrap();
    // The agent of node-0, with the token a DaemonSet pod on node-0 would have.
    let kubeconfig = bed.agent_kubeconfig("node-0").await.unwrap();
    let options = kube::config::KubeConfigOptions::default();
    let config =
        kube::Config::from_custom_kubeconfig(kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(), &options)
            .await
            .unwrap();
    let agent = kube::Client::try_from(config).unwrap();
    let as_agent: Api<BerthNode> = Api::all(agent);
    let as_admin: Api<BerthNode> = Api::all(bed.client());
    let berth_node = |name: &str, node: &str| BerthNode::new(name, BerthNodeSpec { node_name: node.into() });

    as_agent.create(&PostParams::default(), &berth_node("node-0", "node-0")).await.expect("its own BerthNode");
    let denied = |result: Result<BerthNode, kube::Error>, what: &str| match result {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 403, "{what}: {e:?}");
            assert!(e.message.contains("berth-agent of node node-0"), "{what}: {}", e.message);
        }
        other => panic!("{what} was allowed: {other:?}"),
    };
    denied(as_agent.create(&PostParams::default(), &berth_node("node-1", "node-1")).await, "another node's");
    denied(as_agent.create(&PostParams::default(), &berth_node("node-2", "node-0")).await, "a second one");
    as_admin.create(&PostParams::default(), &berth_node("node-1", "node-1")).await.unwrap();
    let status = serde_json::json!({"status": {"endpoint": "https://127.0.0.1:1", "certificate": "", "agentVersion": "x",
        "pools": [], "summary": {"pools": "", "free": "", "capacity": "", "volumes": 0}, "heartbeatTime": "now"}});
    denied(
        as_agent.patch_status("node-1", &PatchParams::default(), &Patch::Merge(&status)).await,
        "another node's status",
    );
    as_agent.patch_status("node-0", &PatchParams::default(), &Patch::Merge(&status)).await.expect("its own status");
}
