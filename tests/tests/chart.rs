//! Berth's Helm chart (charts/berth), with the Helm that hack/helm builds ($BERTH_HELM): `helm lint`; `helm template`
//! with the default values renders the objects `kubectl kustomize deploy/` renders, apart from the differences
//! listed in [`normalize`]; bad values fail at render time with a message that names them; every agent
//! configuration the chart renders is one the agent accepts; and on the test bed, `helm install` → a claim
//! provisioned by an agent and a controller running with the chart's ServiceAccounts and the chart's agent
//! configuration → `helm upgrade` with another pool rolls the agents and serves it → the CRD upgraded the way
//! charts/berth/README.md says → `helm uninstall` leaves the CRD.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use berth::berth_node::BerthNode;
use berth_agent::config::AgentConfig;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};
use testbed::bins::{KubeBins, helm, repo_root, workspace_binary};
use testbed::kube_util::{wait_deleted, wait_for};
use testbed::{TestBed, TestBedConfig};

const NAMESPACE: &str = "berth-system";
/// The labels Helm's charts conventionally add (charts/berth/templates/_helpers.tpl), which deploy/ has not.
const HELM_LABELS: [&str; 4] =
    ["app.kubernetes.io/managed-by", "app.kubernetes.io/instance", "app.kubernetes.io/version", "helm.sh/chart"];

fn chart() -> PathBuf {
    repo_root().join("charts/berth")
}

/// `helm <args>` with its own configuration and cache under `home` (never the user's), against `kubeconfig`;
/// killed after 5 minutes (`timeout` then exits 124, which the callers report with helm's output).
fn run_helm(home: &Path, kubeconfig: Option<&Path>, args: &[&str]) -> Output {
    let mut command = Command::new("timeout");
    command.args(["--kill-after=10", "300"]).arg(helm().expect("helm (hack/helm builds it)")).args(args);
    for (var, dir) in [("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"), ("HELM_DATA_HOME", "data")] {
        command.env(var, home.join(dir));
    }
    match kubeconfig {
        Some(k) => command.env("KUBECONFIG", k),
        None => command.env_remove("KUBECONFIG"),
    };
    command.output().expect("running helm")
}

fn helm_ok(home: &Path, kubeconfig: Option<&Path>, args: &[&str]) -> String {
    let out = run_helm(home, kubeconfig, args);
    assert!(out.status.success(), "helm {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `helm template` of the chart with `args` (values), without a cluster.
fn template(args: &[&str]) -> String {
    let home = tempfile::tempdir().unwrap();
    let chart = chart();
    let mut all = vec!["template", "berth", chart.to_str().unwrap(), "--namespace", NAMESPACE];
    all.extend_from_slice(args);
    helm_ok(home.path(), None, &all)
}

/// The objects of a multi-document YAML text by `Kind namespace/name`; none may be there twice.
fn objects(yaml: &str) -> BTreeMap<String, Value> {
    let documents: Vec<Value> = serde_saphyr::from_multiple(yaml).expect("YAML");
    let mut objects = BTreeMap::new();
    for d in documents.into_iter().filter(|d| !d.is_null()) {
        let key = format!(
            "{} {}/{}",
            d["kind"].as_str().unwrap_or("?"),
            d["metadata"]["namespace"].as_str().unwrap_or(""),
            d["metadata"]["name"].as_str().unwrap_or("?")
        );
        assert!(objects.insert(key.clone(), d).is_none(), "{key} is rendered twice");
    }
    objects
}

/// What is meant to differ between the chart's rendering and kustomize's, taken out of `object`:
/// - Helm's labels (HELM_LABELS) on objects and pod templates; and the CRD's `app.kubernetes.io/part-of` label,
///   which kustomize adds to every object and Helm cannot (it renders no template in crds/);
/// - the agent ConfigMap's name: kustomize's generator appends a hash of its content (a change makes a new
///   ConfigMap, which rolls the DaemonSet); the chart keeps the name and rolls the DaemonSet through a checksum
///   annotation on the pod template, also taken out;
/// - the agent configuration's text: deploy/agent/agent.toml has comments; compared as the agent parses it;
/// - how a number is written (the CRD's JSON says `0.0` where YAML says `0`).
///
/// And, not here but in the comparison: the Namespace, which deploy/ makes and the chart does not (Helm's
/// convention: `helm install --create-namespace`; NOTES.txt says which Pod Security label it needs).
fn normalize(object: &mut Value) {
    fn strip_labels(object: &mut Value, pointer: &str) {
        if let Some(labels) = object.pointer_mut(pointer).and_then(Value::as_object_mut) {
            HELM_LABELS.iter().for_each(|l| {
                labels.remove(*l);
            });
        }
    }
    fn unhashed(name: Option<&mut Value>) {
        if let Some(name) = name.filter(|n| n.as_str().is_some_and(|n| n.starts_with("berth-agent-config-"))) {
            *name = json!("berth-agent-config");
        }
    }
    fn integral(value: &mut Value) {
        match value {
            Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0 && !n.is_i64() && !n.is_u64()) => {
                *value = json!(n.as_f64().unwrap() as i64);
            }
            Value::Array(items) => items.iter_mut().for_each(integral),
            Value::Object(map) => map.values_mut().for_each(integral),
            _ => {}
        }
    }
    integral(object);
    strip_labels(object, "/metadata/labels");
    strip_labels(object, "/spec/template/metadata/labels");
    if object["kind"] == "CustomResourceDefinition" {
        object["metadata"].as_object_mut().unwrap().remove("labels");
    }
    if object["kind"] == "ConfigMap" {
        unhashed(object.pointer_mut("/metadata/name"));
        let toml = object["data"]["agent.toml"].as_str().expect("agent.toml").to_owned();
        let parsed = AgentConfig::from_toml(&toml).unwrap_or_else(|e| panic!("{e:#}:\n{toml}"));
        object["data"]["agent.toml"] = json!(format!("{parsed:?}"));
    }
    if let Some(template) = object.pointer_mut("/spec/template/metadata").and_then(Value::as_object_mut)
        && let Some(annotations) = template.get_mut("annotations").and_then(Value::as_object_mut)
    {
        annotations.remove("berth.dev/config-checksum");
        if annotations.is_empty() {
            template.remove("annotations");
        }
    }
    if let Some(volumes) = object.pointer_mut("/spec/template/spec/volumes").and_then(Value::as_array_mut) {
        volumes.iter_mut().for_each(|v| unhashed(v.pointer_mut("/configMap/name")));
    }
}

#[test]
fn the_chart_lints_clean_with_default_and_with_every_option() {
    let home = tempfile::tempdir().unwrap();
    let chart = chart();
    let out = helm_ok(home.path(), None, &["lint", "--strict", chart.to_str().unwrap()]);
    assert!(out.contains("0 chart(s) failed"), "{out}");
    let values = home.path().join("every-option.yaml");
    std::fs::write(&values, EVERY_OPTION).unwrap();
    let out =
        helm_ok(home.path(), None, &["lint", "--strict", chart.to_str().unwrap(), "-f", values.to_str().unwrap()]);
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

/// Values that turn on everything the chart can render.
const EVERY_OPTION: &str = r#"
logLevel: debug
imagePullSecrets: [{name: registry}]
agent:
  hostPaths: [/var/lib/berth/pools, /mnt/nvme]
  quota: true
  pools:
  - {name: local, backend: hostpath, root: /var/lib/berth/pools/local, capacity: 100Gi, headroom: 1073741824}
  nodeOverrides:
  - name: lvm
    nodeLabel: {key: berth.dev/disks, value: lvm}
    lvm: true
    pools:
    - {name: lvm, backend: lvm, root: /var/lib/berth/pools/lvm, volume-group: berth}
    - {name: lvm-thin, backend: lvm, root: /var/lib/berth/pools/lvm-thin, volume-group: berth, thin-pool: thin,
       overprovision-ratio: 2, thin-data-threshold: 85.5, command-timeout-seconds: 120}
  - name: nvme
    nodeLabel: {key: example.com/tier, value: fast}
    pools:
    - {name: nvme, backend: hostpath, root: /mnt/nvme/berth}
  priorityClassName: system-node-critical
  nodeSelector: {kubernetes.io/os: linux}
controller:
  replicas: 3
  flags: {orphan-action: report, gone-node-volumes: forget, concurrency: 32, orphan-grace-seconds: 1209600}
  priorityClassName: system-cluster-critical
  tolerations: [{key: node-role.kubernetes.io/control-plane, operator: Exists, effect: NoSchedule}]
storageClasses:
- {name: berth-local, pool: local, default: true, allowVolumeExpansion: true, parameters: {uid: "999", mode: "0770"}}
- {name: berth-lvm, pool: lvm, reclaimPolicy: Retain, parameters: {fsType: xfs}, mountOptions: [noatime]}
monitoring: {podMonitors: true, prometheusRule: true, labels: {release: prometheus}}
"#;

/// What the chart renders with every option on (but the Prometheus Operator's kinds, which a cluster without that
/// operator does not serve) is accepted by the real API server as it is: a server-side dry run, without warnings.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_server_accepts_what_every_option_renders() {
    let bed = TestBed::start(TestBedConfig::nodes(0)).await.unwrap();
    let values = bed.dir().join("every-option.yaml");
    std::fs::write(&values, EVERY_OPTION).unwrap();
    let rendered = template(&[
        "--include-crds",
        "-f",
        values.to_str().unwrap(),
        "--set",
        "monitoring.podMonitors=false,monitoring.prometheusRule=false",
    ]);
    let manifest = bed.dir().join("rendered.yaml");
    std::fs::write(&manifest, &rendered).unwrap();
    let out = bed.kubectl(&["create", "namespace", NAMESPACE]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = bed.kubectl(&["apply", "--dry-run=server", "-f", manifest.to_str().unwrap()]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the API server refused the rendering: {stderr}");
    assert!(!stderr.contains("Warning"), "the API server warned: {stderr}");
    let accepted = String::from_utf8_lossy(&out.stdout);
    for object in
        ["daemonset.apps/berth-agent-lvm", "daemonset.apps/berth-agent-nvme", "storageclass.storage.k8s.io/berth-lvm"]
    {
        assert!(accepted.contains(object), "{object} not among: {accepted}");
    }
}

/// Installed in another namespace, the chart names that namespace everywhere: the objects, the RBAC subjects, the
/// admission policy's ServiceAccount, the controller's `--namespace` and the identity the agents accept calls from.
#[test]
fn another_namespace_is_named_everywhere_and_berth_system_nowhere() {
    let home = tempfile::tempdir().unwrap();
    let chart = chart();
    let rendered =
        helm_ok(home.path(), None, &["template", "berth", chart.to_str().unwrap(), "--namespace", "storage"]);
    assert!(!rendered.contains("berth-system"), "berth-system in a release of namespace storage:\n{rendered}");
    let objects = objects(&rendered);
    let agent = &objects["DaemonSet storage/berth-agent"]["spec"]["template"]["spec"]["containers"][0]["command"];
    let agent: Vec<&str> = agent.as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(
        agent.windows(2).any(|w| w == ["--controller-identity", "system:serviceaccount:storage:berth-controller"]),
        "{agent:?}"
    );
    assert!(rendered.contains("'system:serviceaccount:storage:berth-agent'"), "the admission policy's user");
    for binding in [
        "ClusterRoleBinding /berth-agent",
        "ClusterRoleBinding /berth-controller",
        "RoleBinding storage/berth-controller",
    ] {
        assert_eq!(objects[binding]["subjects"][0]["namespace"], "storage", "{binding}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_template_renders_what_kubectl_kustomize_renders() {
    let mut chart = objects(&template(&["--include-crds"]));
    let kubectl = KubeBins::locate().unwrap().path("kubectl");
    let out = Command::new(kubectl).args(["kustomize"]).arg(repo_root().join("deploy")).output().unwrap();
    assert!(out.status.success(), "kubectl kustomize deploy/: {}", String::from_utf8_lossy(&out.stderr));
    let mut kustomize = objects(&String::from_utf8_lossy(&out.stdout));

    // The one object only deploy/ makes, and the one only the chart makes: the pre-delete hook's Job, which
    // refuses `helm uninstall` while Berth's Delete-policy PVs exist (kubectl delete -k has no hooks).
    assert!(kustomize.remove(&format!("Namespace /{NAMESPACE}")).is_some(), "deploy/ makes the namespace");
    let hook = chart.remove(&format!("Job {NAMESPACE}/berth-uninstall-check")).expect("the uninstall check");
    assert_eq!(hook["metadata"]["annotations"]["helm.sh/hook"], "pre-delete");
    let pod = &hook["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "berth-controller");
    assert_eq!(pod["containers"][0]["command"], json!(["berth-controller", "--check-uninstall"]));
    let normalized = |objects: &mut BTreeMap<String, Value>| -> BTreeMap<String, Value> {
        std::mem::take(objects)
            .into_values()
            .map(|mut o| {
                normalize(&mut o);
                let key = format!(
                    "{} {}/{}",
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["namespace"].as_str().unwrap_or(""),
                    o["metadata"]["name"].as_str().unwrap()
                );
                (key, o)
            })
            .collect()
    };
    let (chart, kustomize) = (normalized(&mut chart), normalized(&mut kustomize));
    let only = |a: &BTreeMap<String, Value>, b: &BTreeMap<String, Value>| -> Vec<String> {
        a.keys().filter(|k| !b.contains_key(*k)).cloned().collect()
    };
    assert!(
        only(&chart, &kustomize).is_empty() && only(&kustomize, &chart).is_empty(),
        "only in the chart: {:?}; only in deploy/: {:?}",
        only(&chart, &kustomize),
        only(&kustomize, &chart)
    );
    let differing: Vec<String> = chart
        .iter()
        .filter(|(key, object)| kustomize[*key] != **object)
        .map(|(key, object)| {
            format!(
                "{key}\n  chart:     {}\n  kustomize: {}",
                serde_json::to_string(object).unwrap(),
                serde_json::to_string(&kustomize[key]).unwrap()
            )
        })
        .collect();
    assert!(differing.is_empty(), "objects differ:\n{}", differing.join("\n"));
    // Not vacuous: every object of the base was compared.
    for kind in ["CustomResourceDefinition", "DaemonSet", "Deployment", "ConfigMap", "ClusterRole", "Role"] {
        assert!(chart.keys().any(|k| k.starts_with(&format!("{kind} "))), "no {kind} compared");
    }
}

#[test]
fn bad_values_fail_at_render_time_with_a_message_that_names_them() {
    // --set of one field of a list element would replace the element: the pools are given whole.
    let pools = |pool: &str| format!("agent.pools=[{pool}]");
    let zfs = pools(r#"{"name":"local","backend":"zfs","root":"/var/lib/berth/pools/local"}"#);
    let upper = pools(r#"{"name":"Fast","backend":"hostpath","root":"/var/lib/berth/pools/fast"}"#);
    let no_group = pools(r#"{"name":"v","backend":"lvm","root":"/var/lib/berth/pools/v"}"#);
    let outside = pools(r#"{"name":"local","backend":"hostpath","root":"/mnt/disk/local"}"#);
    let twice = r#"agent.nodeOverrides=[{"name":"a","nodeLabel":{"key":"k","value":"1"}},
                                        {"name":"a","nodeLabel":{"key":"k","value":"2"}}]"#;
    let lvm_without_mode = pools(r#"{"name":"v","backend":"lvm","root":"/var/lib/berth/pools/v","volume-group":"vg"}"#);
    let nested = r#"agent.pools=[{"name":"a","backend":"hostpath","root":"/var/lib/berth/pools/a"},
                                 {"name":"b","backend":"hostpath","root":"/var/lib/berth/pools/a/b"}]"#;
    let same_label = r#"agent.nodeOverrides=[{"name":"a","nodeLabel":{"key":"k","value":"1"}},
                                             {"name":"b","nodeLabel":{"key":"k","value":"1"}}]"#;
    let timeout_on_hostpath =
        pools(r#"{"name":"a","backend":"hostpath","root":"/var/lib/berth/pools/a","command-timeout-seconds":5}"#);
    let empty = pools(r#"{"name":"a","backend":"hostpath","root":"/var/lib/berth/pools/a","capacity":"0"}"#);
    let octal = r#"storageClasses=[{"name":"c","pool":"a","parameters":{"mode":504}}]"#;
    let cases: [(&[&str], &str); 15] = [
        (&["--set-json", &zfs], "/agent/pools/0/backend"),
        (&["--set-json", &upper], "/agent/pools/0/name"),
        (&["--set-json", &no_group], "missing property 'volume-group'"),
        (&["--set-json", &outside], "is under none of agent.hostPaths"),
        (&["--set", "controller.flags.orphan-actions=report"], "orphan-actions"),
        (&["--set", "logLevel=verbose"], "/logLevel"),
        (&["--set", "agent.pool=local"], "additional properties 'pool'"),
        (&["--set-json", twice], "the name \"a\" is used twice"),
        (
            &["--set-json", r#"storageClasses=[{"name":"c","pool":"a","parameters":{"pool":"b"}}]"#],
            "not parameters.pool",
        ),
        (&["--set-json", &lvm_without_mode], "set lvm: true"),
        (&["--set-json", nested], "one root lies inside the other"),
        (&["--set-json", same_label], "the label k=1 is another override's already"),
        (&["--set-json", &timeout_on_hostpath], "/agent/pools/0"),
        (&["--set-json", &empty], "/agent/pools/0/capacity"),
        (&["--set-json", octal], "/storageClasses/0/parameters/mode"),
    ];
    let home = tempfile::tempdir().unwrap();
    let chart = chart();
    for (args, expected) in cases {
        let mut all = vec!["template", "berth", chart.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = run_helm(home.path(), None, &all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} rendered");
        assert!(stderr.contains(expected), "{args:?}: the error does not name {expected:?}:\n{stderr}");
        eprintln!(
            "{args:?} → {}",
            stderr.lines().filter(|l| !l.contains("symbolic link")).collect::<Vec<_>>().join(" | ")
        );
    }
}

#[test]
fn every_agent_configuration_the_chart_renders_is_one_the_agent_accepts_on_the_nodes_it_is_meant_for() {
    let home = tempfile::tempdir().unwrap();
    let values = home.path().join("every-option.yaml");
    std::fs::write(&values, EVERY_OPTION).unwrap();
    let objects = objects(&template(&["-f", values.to_str().unwrap()]));
    let config = |name: &str| -> AgentConfig {
        let toml = objects[&format!("ConfigMap {NAMESPACE}/{name}")]["data"]["agent.toml"].as_str().unwrap();
        AgentConfig::from_toml(toml).unwrap_or_else(|e| panic!("{name}: {e:#}\n{toml}"))
    };
    let pools = |c: &AgentConfig| c.pools.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
    assert_eq!(pools(&config("berth-agent-config")), ["local"]);
    assert_eq!(pools(&config("berth-agent-lvm-config")), ["lvm", "lvm-thin"]);
    assert_eq!(pools(&config("berth-agent-nvme-config")), ["nvme"]);
    let thin = &config("berth-agent-lvm-config").pools[1];
    assert_eq!((thin.overprovision_ratio, thin.thin_data_threshold), (Some(2.0), Some(85.5)));
    assert_eq!(config("berth-agent-config").pools[0].headroom, 1 << 30);

    // Which nodes each DaemonSet runs on: the first override that matches a node, else the main one.
    let terms = |name: &str| -> Value {
        objects[&format!("DaemonSet {NAMESPACE}/{name}")]["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            .clone()
    };
    let expression = |key: &str, op: &str, value: &str| json!({"key": key, "operator": op, "values": [value]});
    assert_eq!(
        terms("berth-agent"),
        json!([{"matchExpressions": [expression("berth.dev/disks", "NotIn", "lvm"),
                                     expression("example.com/tier", "NotIn", "fast")]}])
    );
    assert_eq!(terms("berth-agent-lvm"), json!([{"matchExpressions": [expression("berth.dev/disks", "In", "lvm")]}]));
    assert_eq!(
        terms("berth-agent-nvme"),
        json!([{"matchExpressions": [expression("example.com/tier", "In", "fast"),
                                     expression("berth.dev/disks", "NotIn", "lvm")]}])
    );
    // The modes: quota everywhere (agent.quota), privileged LVM only where the override says so.
    let security = |name: &str| -> Value {
        objects[&format!("DaemonSet {NAMESPACE}/{name}")]["spec"]["template"]["spec"]["containers"][0]
            ["securityContext"]
            .clone()
    };
    assert_eq!(security("berth-agent-lvm")["privileged"], true);
    assert_eq!(security("berth-agent")["privileged"], false);
    assert_eq!(
        security("berth-agent-nvme")["capabilities"]["add"],
        json!(["CHOWN", "FOWNER", "FSETID", "DAC_OVERRIDE", "SYS_ADMIN"])
    );
    let controller = &objects[&format!("Deployment {NAMESPACE}/berth-controller")]["spec"]["template"]["spec"];
    let command: Vec<&str> =
        controller["containers"][0]["command"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(command.windows(2).any(|w| w == ["--orphan-action", "report"]), "{command:?}");
    assert!(command.windows(2).any(|w| w == ["--concurrency", "32"]), "{command:?}");
    // Helm reads numbers as floats: a large one must not become 1.2096e+06, which the controller would refuse.
    assert!(command.windows(2).any(|w| w == ["--orphan-grace-seconds", "1209600"]), "{command:?}");
    let local = &objects["StorageClass /berth-local"]["parameters"];
    assert_eq!(local, &json!({"pool": "local", "uid": "999", "mode": "0770"}));
}

/// The pool root of simulated node 0 that `name` lives at.
fn pool(bed: &TestBed, name: &str) -> (String, PathBuf) {
    (name.to_owned(), bed.node_base(0).join("pools").join(name))
}

/// `--set-json` values giving node 0 of `bed` the pools `names` and a class `berth-<name>` for each.
fn pool_values(bed: &TestBed, names: &[&str]) -> Vec<String> {
    let pools: Vec<Value> =
        names.iter().map(|n| json!({"name": n, "backend": "hostpath", "root": pool(bed, n).1})).collect();
    let classes: Vec<Value> = names.iter().map(|n| json!({"name": format!("berth-{n}"), "pool": n})).collect();
    vec![
        "--set-json".into(),
        format!("agent.hostPaths={}", json!([bed.node_base(0)])),
        "--set-json".into(),
        format!("agent.pools={}", Value::Array(pools)),
        "--set-json".into(),
        format!("storageClasses={}", Value::Array(classes)),
    ]
}

/// A claim of `class` and a (simulated) pod using it, which the scheduler places on node 0; waits until Bound and
/// returns the PV's path.
async fn provision(client: &kube::Client, name: &str, class: &str) -> String {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let claim = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": class,
                 "resources": {"requests": {"storage": "16Mi"}}}}))
    .unwrap();
    claims.create(&PostParams::default(), &claim).await.unwrap();
    let pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/app"}],
                 "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": name}}]}}))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), "default").create(&PostParams::default(), &pod).await.unwrap();
    let bound = wait_for(&claims, name, Duration::from_secs(90), |c| {
        c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
    })
    .await
    .unwrap_or_else(|e| panic!("claim {name} of {class} was not Bound: {e:#}"));
    let pv = Api::<PersistentVolume>::all(client.clone()).get(&bound.spec.unwrap().volume_name.unwrap()).await.unwrap();
    pv.spec.unwrap().local.unwrap().path
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_install_provisions_then_upgrade_serves_a_new_pool_and_the_crd_upgrades_as_documented() {
    let bed = TestBed::start(TestBedConfig::nodes(1)).await.unwrap();
    let client = bed.client();
    let home = bed.dir().join("helm");
    let kubeconfig = Some(bed.kubeconfig());
    let chart = chart();
    let chart = chart.to_str().unwrap();

    // An older release's CRD, as a cluster that ran it has: without the printer columns of today's.
    let crd_file = chart.to_owned() + "/crds/berthnodes.berth.dev.json";
    let mut old_crd: Value = serde_json::from_str(&std::fs::read_to_string(&crd_file).unwrap()).unwrap();
    for version in old_crd["spec"]["versions"].as_array_mut().unwrap() {
        version.as_object_mut().unwrap().remove("additionalPrinterColumns");
    }
    let old_file = bed.dir().join("old-crd.json");
    std::fs::write(&old_file, old_crd.to_string()).unwrap();
    let out = bed.kubectl(&["apply", "--server-side", "-f", old_file.to_str().unwrap()]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let columns =
        |crd: CustomResourceDefinition| crd.spec.versions[0].additional_printer_columns.as_ref().map_or(0, Vec::len);

    // Installed as charts/berth/README.md says for a cluster that has the CRD already: --skip-crds.
    let mut install = vec!["install", "berth", chart, "--namespace", NAMESPACE, "--create-namespace", "--skip-crds"];
    let values = pool_values(&bed, &["local"]);
    install.extend(values.iter().map(String::as_str));
    let notes = helm_ok(&home, kubeconfig, &install);
    assert!(notes.contains("init-pool"), "NOTES.txt tells how to prepare pools:\n{notes}");
    // The chart's RBAC grants exactly the checked-in allowlists, as deploy/'s does (tests/tests/manifests.rs).
    testbed::deploy::permissions_are_the_allowlisted_ones(&bed).unwrap();

    // The agent with the ConfigMap the chart made, the controller, both with the chart's ServiceAccounts.
    let configs: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    let agent_toml = |config: ConfigMap| config.data.unwrap()["agent.toml"].clone();
    let toml = agent_toml(configs.get("berth-agent-config").await.unwrap());
    let agent_binary = workspace_binary("berth-agent", "berth-agent").unwrap();
    let mut agent =
        bed.start_agent_with_config(&agent_binary, 0, &toml, vec![pool(&bed, "local")], true).await.unwrap();
    let controller_binary = workspace_binary("berth-controller", "berth-controller").unwrap();
    let _controller = bed.start_controller(&controller_binary, &[]).await.unwrap();
    let path = provision(&client, "first", "berth-local").await;
    assert!(Path::new(&path).starts_with(&pool(&bed, "local").1), "{path}");

    // helm upgrade with a second pool: the configuration changes, so the DaemonSet's pod template does (its pods
    // are replaced); the agent started again with the new ConfigMap, as its new pod would be, serves both.
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), NAMESPACE);
    let checksum =
        |ds: DaemonSet| ds.spec.template.metadata.unwrap().annotations.unwrap()["berth.dev/config-checksum"].clone();
    let before = checksum(daemonsets.get("berth-agent").await.unwrap());
    let mut upgrade = vec!["upgrade", "berth", chart, "--namespace", NAMESPACE, "--reuse-values"];
    let values = pool_values(&bed, &["local", "fast"]);
    upgrade.extend(values.iter().map(String::as_str));
    helm_ok(&home, kubeconfig, &upgrade);
    assert_ne!(checksum(daemonsets.get("berth-agent").await.unwrap()), before, "the agents are not rolled");
    assert_eq!(columns(crds.get("berthnodes.berth.dev").await.unwrap()), 0, "helm upgrade upgraded the CRD");
    let toml = agent_toml(configs.get("berth-agent-config").await.unwrap());
    agent.terminate(Duration::from_secs(20));
    let mut agent = bed
        .start_agent_with_config(&agent_binary, 0, &toml, vec![pool(&bed, "local"), pool(&bed, "fast")], true)
        .await
        .unwrap();
    let berth_nodes: Api<BerthNode> = Api::all(client.clone());
    wait_for(&berth_nodes, "node-0", Duration::from_secs(30), |n| {
        n.status.as_ref().is_some_and(|s| s.pools.iter().any(|p| p.name == "fast"))
    })
    .await
    .unwrap();
    let fast = provision(&client, "second", "berth-fast").await;
    assert!(Path::new(&fast).starts_with(&pool(&bed, "fast").1), "{fast}");
    assert!(Path::new(&path).is_dir(), "the first volume is still there");

    // The CRD upgrade charts/berth/README.md documents.
    let crd_dir = chart.to_owned() + "/crds/";
    let out = bed.kubectl(&["apply", "--server-side", "--force-conflicts", "-f", &crd_dir]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(columns(crds.get("berthnodes.berth.dev").await.unwrap()) > 0, "the CRD was not upgraded");
    assert!(berth_nodes.get("node-0").await.is_ok(), "BerthNodes survive the CRD upgrade");

    // The pre-delete hook's check, run as the hook Job runs it (the controller's ServiceAccount): it refuses while
    // Berth's Delete-policy PVs exist, naming them, and agrees once they are gone. (The Job itself cannot run on
    // simulated nodes: `helm uninstall --no-hooks` below.)
    let controller_kubeconfig = bed.controller_kubeconfig().await.unwrap();
    let check = || {
        Command::new(&controller_binary)
            .arg("--check-uninstall")
            .env("KUBECONFIG", &controller_kubeconfig)
            .output()
            .unwrap()
    };
    let refused = check();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "uninstall allowed with volumes: {said}");
    assert!(said.contains("claim default/first") && said.contains("claim default/second"), "{said}");

    // Uninstall after the claims are gone: the volumes are deleted first; the CRD stays (Helm's convention).
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for name in ["first", "second"] {
        pods.delete(name, &DeleteParams::default().grace_period(0)).await.unwrap();
        claims.delete(name, &DeleteParams::default()).await.unwrap();
        wait_deleted(&claims, name, Duration::from_secs(60)).await.unwrap();
    }
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    for volume in [&path, &fast] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while Path::new(volume).exists() || !pvs.list(&Default::default()).await.unwrap().items.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "{volume} or its PV was not deleted");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let allowed = check();
    assert!(allowed.status.success(), "{}", String::from_utf8_lossy(&allowed.stderr));
    agent.terminate(Duration::from_secs(20));
    helm_ok(
        &home,
        kubeconfig,
        &["uninstall", "berth", "--namespace", NAMESPACE, "--no-hooks", "--wait", "--timeout", "60s"],
    );
    assert!(daemonsets.get_opt("berth-agent").await.unwrap().is_none(), "the DaemonSet is gone");
    assert!(crds.get_opt("berthnodes.berth.dev").await.unwrap().is_some(), "Helm deletes no CRD");
}
