//! The test bed itself, proven against the real control plane: each behaviour Berth will rely on is produced by
//! the real kube-controller-manager, kube-scheduler, kube-apiserver or kwok, not by the test.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{
    Container, ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, PersistentVolumeSpec, Pod, PodSpec, PodTemplateSpec, ServiceAccount, Volume,
    VolumeResourceRequirements,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use testbed::kube_util::{create_namespace, wait_deleted, wait_for};
use testbed::{FsType, TestBed, TestBedConfig};

const WAIT: Duration = Duration::from_secs(60);

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta { name: Some(name.into()), ..Default::default() }
}

fn storage_class(name: &str, binding_mode: &str) -> StorageClass {
    StorageClass {
        metadata: meta(name),
        provisioner: berth::PROVISIONER_NAME.into(),
        volume_binding_mode: Some(binding_mode.into()),
        reclaim_policy: Some("Delete".into()),
        ..Default::default()
    }
}

fn claim(name: &str, class: &str) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: meta(name),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: Some(class.into()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".into(), Quantity("1Gi".into()))])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn pod_spec(claim: Option<&str>) -> PodSpec {
    PodSpec {
        containers: vec![Container {
            name: "app".into(),
            image: Some("registry.invalid/app:1".into()),
            ..Default::default()
        }],
        volumes: claim.map(|c| {
            vec![Volume {
                name: "data".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: c.into(),
                    read_only: None,
                }),
                ..Default::default()
            }]
        }),
        ..Default::default()
    }
}

fn annotation<'a>(obj: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    obj.annotations.as_ref()?.get(key).map(String::as_str)
}

#[tokio::test(flavor = "multi_thread")]
async fn kcm_marks_our_claims_with_the_storage_provisioner() {
    let bed = TestBed::start(TestBedConfig::nodes(1)).await.unwrap();
    let client = bed.client();
    create_namespace(&client, "t").await.unwrap();
    Api::<StorageClass>::all(client.clone())
        .create(&PostParams::default(), &storage_class("berth-now", "Immediate"))
        .await
        .unwrap();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "t");
    claims.create(&PostParams::default(), &claim("data", "berth-now")).await.unwrap();

    let pvc = wait_for(&claims, "data", WAIT, |c| annotation(&c.metadata, berth::keys::STORAGE_PROVISIONER).is_some())
        .await
        .unwrap();
    assert_eq!(annotation(&pvc.metadata, berth::keys::STORAGE_PROVISIONER), Some(berth::PROVISIONER_NAME));
    assert_eq!(annotation(&pvc.metadata, berth::keys::STORAGE_PROVISIONER_BETA), Some(berth::PROVISIONER_NAME));
    assert_eq!(pvc.status.and_then(|s| s.phase).as_deref(), Some("Pending"), "nobody provisions it yet");
}

#[tokio::test(flavor = "multi_thread")]
async fn scheduler_selects_a_simulated_node_for_a_wait_for_first_consumer_claim() {
    let bed = TestBed::start(TestBedConfig::nodes(3)).await.unwrap();
    let client = bed.client();
    create_namespace(&client, "t").await.unwrap();
    Api::<StorageClass>::all(client.clone())
        .create(&PostParams::default(), &storage_class("berth-wffc", "WaitForFirstConsumer"))
        .await
        .unwrap();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "t");
    claims.create(&PostParams::default(), &claim("data", "berth-wffc")).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "t");
    pods.create(
        &PostParams::default(),
        &Pod { metadata: meta("app"), spec: Some(pod_spec(Some("data"))), ..Default::default() },
    )
    .await
    .unwrap();

    let pvc = wait_for(&claims, "data", WAIT, |c| annotation(&c.metadata, berth::keys::SELECTED_NODE).is_some())
        .await
        .unwrap();
    let selected = annotation(&pvc.metadata, berth::keys::SELECTED_NODE).unwrap();
    let names: Vec<&str> = bed.nodes().iter().map(|n| n.name.as_str()).collect();
    assert!(names.contains(&selected), "selected-node {selected:?} is not one of {names:?}");
    // The scheduler waits for the volume before binding the pod.
    let pod = pods.get("app").await.unwrap();
    assert_eq!(pod.spec.unwrap().node_name, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn prebound_pv_binds_through_kcm_and_deletion_completes() {
    let bed = TestBed::start(TestBedConfig::nodes(1)).await.unwrap();
    let client = bed.client();
    create_namespace(&client, "t").await.unwrap();
    Api::<StorageClass>::all(client.clone())
        .create(&PostParams::default(), &storage_class("berth-now", "Immediate"))
        .await
        .unwrap();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "t");
    let pvc = claims.create(&PostParams::default(), &claim("data", "berth-now")).await.unwrap();
    let uid = pvc.metadata.uid.clone().unwrap();
    let pv_name = berth::naming::volume_name(&uid).unwrap();

    // What a provisioner creates: pre-bound through claimRef with the claim's uid.
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv = PersistentVolume {
        metadata: ObjectMeta {
            name: Some(pv_name.clone()),
            annotations: Some(BTreeMap::from([(berth::keys::PROVISIONED_BY.into(), berth::PROVISIONER_NAME.into())])),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            capacity: Some(BTreeMap::from([("storage".into(), Quantity("1Gi".into()))])),
            storage_class_name: Some("berth-now".into()),
            persistent_volume_reclaim_policy: Some("Retain".into()),
            host_path: Some(k8s_openapi::api::core::v1::HostPathVolumeSource {
                path: "/nonexistent/berth".into(),
                type_: None,
            }),
            claim_ref: Some(ObjectReference {
                namespace: Some("t".into()),
                name: Some("data".into()),
                uid: Some(uid.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    pvs.create(&PostParams::default(), &pv).await.unwrap();

    let bound =
        wait_for(&claims, "data", WAIT, |c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
            .await
            .unwrap();
    assert_eq!(bound.spec.unwrap().volume_name.as_deref(), Some(pv_name.as_str()));
    assert_eq!(annotation(&bound.metadata, "pv.kubernetes.io/bind-completed"), Some("yes"));
    let pv = wait_for(&pvs, &pv_name, WAIT, |p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
        .await
        .unwrap();
    let finalizers = pv.metadata.finalizers.unwrap_or_default();
    assert!(finalizers.contains(&"kubernetes.io/pv-protection".to_string()), "{finalizers:?}");
    let claim_finalizers = bound.metadata.finalizers.unwrap_or_default();
    assert!(claim_finalizers.contains(&"kubernetes.io/pvc-protection".to_string()), "{claim_finalizers:?}");

    // Deleting both completes: the protection controllers lift their finalizers.
    claims.delete("data", &DeleteParams::default()).await.unwrap();
    wait_deleted(&claims, "data", WAIT).await.unwrap();
    wait_for(&pvs, &pv_name, WAIT, |p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released"))
        .await
        .unwrap();
    pvs.delete(&pv_name, &DeleteParams::default()).await.unwrap();
    wait_deleted(&pvs, &pv_name, WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn statefulset_with_ordered_ready_policy_gets_all_pods_ready() {
    let bed = TestBed::start(TestBedConfig::nodes(3)).await.unwrap();
    let client = bed.client();
    create_namespace(&client, "t").await.unwrap();
    let labels = BTreeMap::from([("app".to_string(), "db".to_string())]);
    let sts = StatefulSet {
        metadata: meta("db"),
        spec: StatefulSetSpec {
            replicas: Some(3),
            service_name: Some("db".into()),
            selector: LabelSelector { match_labels: Some(labels.clone()), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..Default::default() }),
                spec: Some(pod_spec(None)),
            },
            ..Default::default() // pod management policy: OrderedReady
        },
        ..Default::default()
    };
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "t");
    sets.create(&PostParams::default(), &sts).await.unwrap();
    let set =
        wait_for(&sets, "db", WAIT, |s| s.status.as_ref().and_then(|s| s.ready_replicas) == Some(3)).await.unwrap();
    assert_eq!(set.spec.pod_management_policy, Some("OrderedReady".into()));

    let pods: Api<Pod> = Api::namespaced(client.clone(), "t");
    let names: Vec<&str> = bed.nodes().iter().map(|n| n.name.as_str()).collect();
    for i in 0..3 {
        let pod = pods.get(&format!("db-{i}")).await.unwrap();
        let node = pod.spec.unwrap().node_name.unwrap();
        assert!(names.contains(&node.as_str()), "db-{i} on {node}");
        let status = pod.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert!(status.conditions.unwrap().iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn token_review_checks_the_audience_of_a_requested_token() {
    let bed = TestBed::start(TestBedConfig::nodes(0)).await.unwrap();
    let client = bed.client();
    create_namespace(&client, "t").await.unwrap();
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "t");
    sas.create(&PostParams::default(), &ServiceAccount { metadata: meta("controller"), ..Default::default() })
        .await
        .unwrap();
    let audience = "local.berth.dev/agent/node-0";
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.into()]),
            expiration_seconds: Some(600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token = sas.create_token_request("controller", &PostParams::default(), &request).await.unwrap();
    let token = token.status.unwrap().token.expect("a token");

    let reviews: Api<TokenReview> = Api::all(client.clone());
    let review = |token: &str, audience: &str| TokenReview {
        spec: TokenReviewSpec { token: token.into(), audiences: Some(vec![audience.into()]) },
        ..Default::default()
    };
    let ok = reviews.create(&PostParams::default(), &review(&token, audience)).await.unwrap().status.unwrap();
    assert_eq!(ok.authenticated, Some(true), "{ok:?}");
    let user = ok.user.unwrap();
    assert_eq!(user.username.as_deref(), Some("system:serviceaccount:t:controller"));
    assert_eq!(ok.audiences, Some(vec![audience.to_string()]));

    let other = reviews
        .create(&PostParams::default(), &review(&token, "local.berth.dev/agent/node-1"))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_ne!(other.authenticated, Some(true), "a token for node-0's agent passed as node-1's: {other:?}");

    let forged = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6dDpjb250cm9sbGVyIn0.c2lnbmF0dXJl";
    let made_up = reviews.create(&PostParams::default(), &review(forged, audience)).await.unwrap().status.unwrap();
    assert_ne!(made_up.authenticated, Some(true), "{made_up:?}");
}

/// Two beds at once, each with node disks: nothing shared (ports, directories, loop devices), both work, and
/// dropping them leaves nothing behind.
#[tokio::test(flavor = "multi_thread")]
async fn two_beds_run_at_once_and_clean_up_after_themselves() {
    let config = TestBedConfig::nodes_with_disks(&[64 << 20, 128 << 20], FsType::Ext4);
    let (a, b) = tokio::join!(TestBed::start(config.clone()), TestBed::start(config));
    let (a, b) = (a.unwrap(), b.unwrap());

    assert_ne!(a.api_server(), b.api_server());
    assert_ne!(a.dir(), b.dir());
    assert_ne!(a.address(), b.address());
    let loops = |bed: &TestBed| -> Vec<std::path::PathBuf> {
        bed.nodes().iter().map(|n| n.disk.as_ref().unwrap().loop_device().to_path_buf()).collect()
    };
    let (la, lb) = (loops(&a), loops(&b));
    assert!(la.iter().all(|l| !lb.contains(l)), "{la:?} vs {lb:?}");

    // Each node's free space is its own filesystem's.
    for bed in [&a, &b] {
        for (node, size) in bed.nodes().iter().zip([64u64 << 20, 128 << 20]) {
            let stat = nix_statvfs(node.disk.as_ref().unwrap().mount_point());
            assert!(stat < size && stat > size / 2, "{}: {stat} bytes free on a {size}-byte disk", node.name);
        }
        let out = bed.kubectl(&["get", "nodes", "-o", "name"]).unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    }

    let pids: Vec<u32> = [&a, &b].iter().flat_map(|bed| bed.processes()).map(|(_, pid)| pid).collect();
    let dirs = [a.dir().to_path_buf(), b.dir().to_path_buf()];
    let all_loops: Vec<_> = la.into_iter().chain(lb).collect();
    drop(a);
    drop(b);
    for pid in pids {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "process {pid} outlived its bed");
    }
    for dir in &dirs {
        assert!(!dir.exists(), "{} outlived its bed", dir.display());
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for dir in &dirs {
        assert!(!mounts.contains(dir.to_str().unwrap()), "a mount under {} outlived its bed", dir.display());
    }
    let attached = std::process::Command::new("losetup")
        .args(["--list", "--noheadings", "-O", "NAME,BACK-FILE"])
        .output()
        .unwrap();
    let attached = String::from_utf8_lossy(&attached.stdout);
    for dir in &dirs {
        assert!(
            !attached.contains(dir.to_str().unwrap()),
            "a loop device of {} outlived its bed: {attached}",
            dir.display()
        );
    }
    let _ = all_loops;
}

fn nix_statvfs(path: &std::path::Path) -> u64 {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and an out-parameter of the right type.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_bavail * st.f_frsize
}
