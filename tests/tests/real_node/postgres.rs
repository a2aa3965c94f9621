//! PostgreSQL on Berth volumes (issue 16), on the real node: deploy/examples/postgres.yaml as a user applies it,
//! through a kustomization that only picks the namespace, one replica, the claim's class and size and the readiness
//! probe's period — one StatefulSet per kind of volume, each in a namespace of its own. The image is berth.test/postgres:15 (hack/build-image
//! --postgres, baked into the node's state disk like Berth's own).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use testbed::TestBed;
use testbed::demo::local_path;
use testbed::deploy;
use testbed::kube_util::{pod_is_ready, pod_ready_time};
use testbed::on_node::agent_sh;

/// The StatefulSet's pod and claim (deploy/examples/postgres.yaml, one replica).
const POD: &str = "postgres-0";
const CLAIM: &str = "data-postgres-0";
/// PGDATA's directory in the volume (the example's PGDATA, under its mount).
const PGDATA_IN_VOLUME: &str = "pgdata";
/// The claims' size (the example asks for 1Gi): what pgbench at scale 1 needs and more, in the node's 2 GiB disks
/// beside the other phases' volumes; an xfs LV needs at least 300 MB.
const SIZE: &str = "512Mi";
/// The readiness probe's period here (the example's is 5 s): under emulation every exec probe costs the guest
/// about a second of CPU in runc, and three of them every 5 s starved the other phases' pods (a finished pod's
/// status took minutes to reach the API server).
const PROBE_PERIOD: u32 = 15;

/// A kind of volume PostgreSQL runs on: its namespace and the class of its claim.
#[derive(Clone, Copy, Debug)]
pub struct Kind {
    pub namespace: &'static str,
    pub class: &'static str,
    /// What the volume is, for messages.
    pub what: &'static str,
}

/// What the database holds once [`load`] has run: rows of the test table and of pgbench's history (one per
/// committed pgbench transaction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    pub rows: u64,
    pub history: u64,
}

/// Applies deploy/examples/postgres.yaml for `kind` (files under `dir`) and waits until its pod is Ready.
pub async fn start(bed: &TestBed, kind: Kind, dir: &Path) -> Result<()> {
    testbed::kube_util::create_namespace(&bed.client(), kind.namespace).await?;
    let dir = dir.join(kind.namespace);
    std::fs::create_dir_all(&dir)?;
    // Copied beside the kustomization: kustomize loads no file from outside its root.
    std::fs::copy(testbed::bins::repo_root().join("deploy/examples/postgres.yaml"), dir.join("postgres.yaml"))?;
    let kustomization = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: {}\nresources:\n- postgres.yaml\n\
         replicas:\n- name: postgres\n  count: 1\npatches:\n- target:\n    kind: StatefulSet\n    name: postgres\n  \
         patch: |-\n    - op: replace\n      path: /spec/volumeClaimTemplates/0/spec/storageClassName\n      \
         value: {}\n    - op: replace\n      path: /spec/volumeClaimTemplates/0/spec/resources/requests/storage\n      \
         value: {SIZE}\n    - op: replace\n      path: /spec/template/spec/containers/0/readinessProbe/periodSeconds\n      \
         value: {PROBE_PERIOD}\n",
        kind.namespace, kind.class
    );
    std::fs::write(dir.join("kustomization.yaml"), kustomization)?;
    deploy::kubectl(bed, &["apply", "-k", &dir.display().to_string()])?;
    ready(bed, kind, None).await
}

/// Waits until `postgres-0` of `kind` is Ready (a pod other than `not` when given: a replacement), within 5
/// minutes (a first start under emulation: the volume, initdb, the server).
async fn ready(bed: &TestBed, kind: Kind, not: Option<&str>) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(bed.client(), kind.namespace);
    let ready = |p: &Pod| p.metadata.uid.as_deref() != not && pod_is_ready(p);
    testbed::kube_util::wait_for(&pods, POD, Duration::from_secs(300), ready).await.with_context(|| {
        let logs = deploy::kubectl(bed, &["-n", kind.namespace, "logs", POD, "--tail=30"]).unwrap_or_default();
        format!("PostgreSQL on {} not Ready; its log:\n{logs}\n{}", kind.what, deploy::describe_pods(bed))
    })?;
    Ok(())
}

/// `psql -Atc SQL` in the pod (through the Unix socket, as the image's postgres user).
fn psql(bed: &TestBed, kind: Kind, sql: &str) -> Result<String> {
    let out =
        deploy::kubectl(bed, &["-n", kind.namespace, "exec", POD, "--", "psql", "-v", "ON_ERROR_STOP=1", "-Atc", sql])?;
    Ok(out.trim().to_owned())
}

/// What is committed now (one `kubectl exec`: under emulation each costs seconds).
pub fn committed(bed: &TestBed, kind: Kind) -> Result<Committed> {
    let out =
        psql(bed, kind, "select (select count(*) from berth_test) || ' ' || (select count(*) from pgbench_history)")?;
    let counts: Vec<u64> = out.split(' ').filter_map(|n| n.parse().ok()).collect();
    match counts[..] {
        [rows, history] => Ok(Committed { rows, history }),
        _ => bail!("the counts of berth_test and pgbench_history: {out:?}"),
    }
}

/// The workload, in one `kubectl exec` (under emulation each costs seconds): a table of 1000 rows, `pgbench -i -s
/// 1`, `pgbench -T 5`, and the file PostgreSQL keeps the table in (`pg_relation_filepath`, relative to PGDATA). That
/// file must be on the node under the claim's PV path. Returns what was committed, as the clients saw it (pgbench's
/// count of processed transactions).
pub async fn load(bed: &TestBed, node: &str, kind: Kind) -> Result<Committed> {
    let script = "set -e; \
        psql -v ON_ERROR_STOP=1 -qc 'create table berth_test as select g as id, md5(g::text) as v from generate_series(1, 1000) g'; \
        pgbench -i -s 1 -q 2>&1; pgbench -T 5 -c 2 2>&1; \
        echo \"file: $(psql -Atc \"select pg_relation_filepath('berth_test')\")\"";
    let out = deploy::kubectl(bed, &["-n", kind.namespace, "exec", POD, "--", "sh", "-c", script])?;
    println!("PostgreSQL on {}:\n{}", kind.what, out.trim());
    let processed = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split('/').next()?.trim().parse::<u64>().ok())
        .with_context(|| format!("pgbench's count of transactions:\n{out}"))?;
    ensure!(processed > 0, "pgbench committed nothing:\n{out}");
    let relative = out.lines().find_map(|l| l.strip_prefix("file: ")).unwrap_or_default();
    ensure!(relative.starts_with("base/"), "pg_relation_filepath: {relative:?}");
    let pv_path = local_path(&bed.client(), kind.namespace, CLAIM).await?;
    let file = format!("{pv_path}/{PGDATA_IN_VOLUME}/{relative}");
    let seen = agent_sh(bed, node, &format!("stat -c '%s bytes, uid %u' '{file}'")).await?;
    println!("PostgreSQL on {}: berth_test is {file} on the node ({})", kind.what, seen.trim());
    Ok(Committed { rows: 1000, history: processed })
}

/// Deletes the pod; the StatefulSet makes it again on the same claim (and so the same node): waits until the new
/// one is Ready.
pub async fn restart(bed: &TestBed, kind: Kind) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(bed.client(), kind.namespace);
    let old = pods.get(POD).await?.metadata.uid.context("a pod without a uid")?;
    pods.delete(POD, &DeleteParams::default()).await?;
    ready(bed, kind, Some(&old)).await
}

/// Waits until `kind`'s pod is Ready again after the node's reboot (Ready since `since`, a time before the
/// reboot: while the node is down its pod turns not Ready) and the server answers; returns what is committed.
pub async fn after_reboot(bed: &TestBed, kind: Kind, since: k8s_openapi::jiff::Timestamp) -> Result<Committed> {
    let pods: Api<Pod> = Api::namespaced(bed.client(), kind.namespace);
    let ready_since = |p: &Pod| pod_ready_time(p).is_some_and(|t| t > since);
    let until = Instant::now() + Duration::from_secs(300);
    loop {
        if pods.get(POD).await.ok().is_some_and(|p| ready_since(&p))
            && let Ok(committed) = committed(bed, kind)
        {
            return Ok(committed);
        }
        if Instant::now() > until {
            bail!("PostgreSQL on {} did not come back within 300 s:\n{}", kind.what, deploy::describe_pods(bed));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Deletes what deploy/examples/postgres.yaml made for `kind` (`kubectl delete -k` of its kustomization under
/// `dir`) and then the claim, as a user does (a StatefulSet leaves its claims behind); waits until the PV is gone,
/// and then nothing of the volume is left on the node: neither its directory in the pool nor (lvm) its logical
/// volume.
pub async fn delete(bed: &TestBed, node: &str, kind: Kind, dir: &Path) -> Result<()> {
    let client = bed.client();
    let pv = testbed::demo::bound_claim(&client, kind.namespace, CLAIM)
        .await?
        .spec
        .and_then(|s| s.volume_name)
        .context("a Bound claim without a volume")?;
    let volume_dir = local_path(&client, kind.namespace, CLAIM).await?;
    let volume_dir = Path::new(&volume_dir).parent().context("a PV path without a parent")?.display().to_string();
    deploy::kubectl(bed, &["delete", "-k", &dir.join(kind.namespace).display().to_string(), "--timeout=120s"])?;
    deploy::kubectl(bed, &["-n", kind.namespace, "delete", "pvc", CLAIM, "--timeout=180s"])?;
    let pvs: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(client.clone());
    testbed::kube_util::wait_deleted(&pvs, &pv, Duration::from_secs(240))
        .await
        .with_context(|| format!("the PV of PostgreSQL on {} was not deleted with its claim", kind.what))?;
    let script =
        format!("if [ -e '{volume_dir}' ]; then echo \"left: {volume_dir}\"; fi; lvm lvs --noheadings -o lv_name 2>&1");
    let seen = agent_sh(bed, node, &script).await?;
    ensure!(
        !seen.contains("left: ") && !seen.contains(pv.as_str()),
        "PostgreSQL's volume on {} ({pv}) is left on the node: {seen}",
        kind.what
    );
    println!("PostgreSQL on {}: deleted; {pv} and {volume_dir} are gone", kind.what);
    Ok(())
}
