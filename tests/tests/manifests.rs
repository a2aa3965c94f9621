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
    testbed::deploy::permissions_are_the_allowlisted_ones(&bed).unwrap();
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

/// The agent container's `securityContext` in the JSON of a DaemonSet.
fn agent_security(daemonset: &serde_json::Value) -> &serde_json::Value {
    let containers = daemonset["spec"]["template"]["spec"]["containers"].as_array().unwrap();
    &containers.iter().find(|c| c["name"] == "agent").expect("the agent container")["securityContext"]
}

/// Whether the agent of a DaemonSet's JSON reads the host's mount table: the host's /proc mounted read-only at
/// /host/proc and given to `--host-proc`.
fn reads_the_hosts_mounts(daemonset: &serde_json::Value) -> bool {
    let spec = &daemonset["spec"]["template"]["spec"];
    let agent = spec["containers"].as_array().unwrap().iter().find(|c| c["name"] == "agent").unwrap();
    let volume = spec["volumes"].as_array().unwrap().iter().find(|v| v["hostPath"]["path"] == "/proc");
    let Some(name) = volume.map(|v| &v["name"]) else { return false };
    let mounted = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == *name && m["mountPath"] == "/host/proc" && m["readOnly"] == true);
    let command: Vec<&str> = agent["command"].as_array().unwrap().iter().filter_map(|a| a.as_str()).collect();
    mounted && command.windows(2).any(|w| w == ["--host-proc", "/host/proc"])
}

/// The quota component (deploy/quota) on the base, alone and with the lvm component in either order: the server
/// takes each as it is, the agent gains CAP_SYS_ADMIN and keeps the rest of its confinement, and with lvm the
/// privileged container wins.
#[tokio::test(flavor = "multi_thread")]
async fn the_quota_component_adds_sys_admin_and_composes_with_lvm() {
    let bed = TestBed::start(TestBedConfig::nodes(0)).await.unwrap();
    // Overlays as a user would write them; kustomize wants relative paths to the base.
    let dir = tempfile::tempdir_in(repo_root().join("target")).unwrap();
    let overlay = |name: &str, components: &[&str]| {
        let path = dir.path().join(name);
        std::fs::create_dir(&path).unwrap();
        let components: String = components.iter().map(|c| format!("- ../../../deploy/{c}\n")).collect();
        let body = format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n- ../../../deploy\n\
             components:\n{components}"
        );
        std::fs::write(path.join("kustomization.yaml"), body).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let apply = |args: &[&str]| {
        let out = bed.kubectl(args).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "kubectl {args:?}: {stderr}");
        assert!(!stderr.contains("Warning"), "kubectl {args:?}: the API server warned: {stderr}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let base: serde_json::Value = {
        let render = kubectl_ok(
            &bed,
            &["apply", "-k", repo_root().join("deploy").to_str().unwrap(), "--dry-run=client", "-o", "json"],
        );
        serde_json::from_str(&render).unwrap()
    };
    let base_ds = base["items"].as_array().unwrap().iter().find(|o| o["kind"] == "DaemonSet").unwrap();
    let base_add = agent_security(base_ds)["capabilities"]["add"].as_array().unwrap().clone();
    assert!(reads_the_hosts_mounts(base_ds), "the base agent reads the host's mount table");
    assert!(!base_add.contains(&"SYS_ADMIN".into()), "the base grants CAP_SYS_ADMIN: {base_add:?}");

    apply(&["apply", "-k", &overlay("quota", &["quota"])]);
    let ds: serde_json::Value = serde_json::from_str(&kubectl_ok(
        &bed,
        &["get", "daemonset", "berth-agent", "-n", "berth-system", "-o", "json"],
    ))
    .unwrap();
    let security = agent_security(&ds);
    let mut expected = base_add.clone();
    expected.push("SYS_ADMIN".into());
    assert_eq!(security["capabilities"]["add"].as_array().unwrap(), &expected, "the base's capabilities and SYS_ADMIN");
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(security["privileged"], false);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    let volumes = ds["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
    assert!(!volumes.iter().any(|v| v["hostPath"]["path"] == "/dev"), "no host /dev without lvm");
    assert!(reads_the_hosts_mounts(&ds), "quota: the host's mount table is still read");

    for order in [["quota", "lvm"], ["lvm", "quota"]] {
        let name = order.join("-");
        let list: serde_json::Value =
            serde_json::from_str(&apply(&["apply", "-k", &overlay(&name, &order), "--dry-run=server", "-o", "json"]))
                .unwrap();
        let ds = list["items"].as_array().unwrap().iter().find(|o| o["kind"] == "DaemonSet").unwrap();
        let security = agent_security(ds);
        assert_eq!(security["privileged"], true, "{name}: privileged wins");
        assert_eq!(security["allowPrivilegeEscalation"], true, "{name}");
        let volumes = ds["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
        assert!(volumes.iter().any(|v| v["hostPath"]["path"] == "/dev"), "{name}: lvm's host /dev");
        assert!(reads_the_hosts_mounts(ds), "{name}: the host's mount table is still read");
    }
}
