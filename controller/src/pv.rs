//! The PersistentVolume for a provisioned volume: a pure function of the claim, the class, the node and what the
//! agent made (provisioning-protocol.md, "Who writes what").

use std::collections::BTreeMap;

use berth::agent_api::Volume;
use berth::keys;
use k8s_openapi::api::core::v1::{
    HostPathVolumeSource, LocalVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, ObjectReference,
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeSpec, VolumeNodeAffinity,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;

use crate::params::{ClassParams, PvSource};

/// Labels on every Berth PV, so `kubectl get pv -l local.berth.dev/node=…` finds a node's volumes.
pub const NODE_LABEL: &str = "local.berth.dev/node";
pub const POOL_LABEL: &str = "local.berth.dev/pool";
/// The node's full name (the label may be shortened): where the deletion path sends the agent call.
pub const NODE_ANNOTATION: &str = "local.berth.dev/node";

/// FNV-1a, 64 bit: stable across releases and platforms (std's hasher is not), for names derived from names.
pub fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// A label value for any node name. Node names may have 253 characters, label values 63: a longer name keeps its
/// first 46 characters and gets a hash of the whole name, so values stay unique and stable.
pub fn label_value(name: &str) -> String {
    if name.len() <= 63 {
        return name.to_owned();
    }
    let hash = stable_hash(name);
    let head = name[..46].trim_end_matches(['-', '.']);
    format!("{head}-{hash:016x}")
}

/// Where the volume is: the node's name and its `kubernetes.io/hostname` label value (they may differ).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRef {
    pub name: String,
    pub hostname: String,
}

pub fn build(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    params: &ClassParams,
    node: &NodeRef,
    volume: &Volume,
) -> PersistentVolume {
    let spec = claim.spec.clone().unwrap_or_default();
    let reclaim = class.reclaim_policy.clone().unwrap_or_else(|| "Delete".into());
    let finalizers = (reclaim == "Delete").then(|| vec![keys::PV_DELETION_FINALIZER.to_owned()]);
    let affinity = VolumeNodeAffinity {
        required: Some(NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: Some(vec![NodeSelectorRequirement {
                    key: keys::HOSTNAME_LABEL.into(),
                    operator: "In".into(),
                    values: Some(vec![node.hostname.clone()]),
                }]),
                match_fields: None,
            }],
        }),
    };
    let (local, host_path) = match params.pv_source {
        PvSource::Local => (Some(LocalVolumeSource { path: volume.path.clone(), fs_type: None }), None),
        PvSource::HostPath => {
            (None, Some(HostPathVolumeSource { path: volume.path.clone(), type_: Some("Directory".into()) }))
        }
    };
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(volume.name.clone()),
            labels: Some(BTreeMap::from([
                (NODE_LABEL.to_owned(), label_value(&node.name)),
                (POOL_LABEL.to_owned(), params.pool.clone()),
            ])),
            annotations: Some(BTreeMap::from([
                (keys::PROVISIONED_BY.to_owned(), berth::PROVISIONER_NAME.to_owned()),
                (NODE_ANNOTATION.to_owned(), node.name.clone()),
            ])),
            finalizers,
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some(BTreeMap::from([(
                "storage".to_owned(),
                Quantity(berth::quantity::format(volume.size_bytes)),
            )])),
            access_modes: spec.access_modes.clone(),
            volume_mode: Some(spec.volume_mode.clone().unwrap_or_else(|| "Filesystem".into())),
            storage_class_name: class.metadata.name.clone(),
            persistent_volume_reclaim_policy: Some(reclaim),
            // A volume whose filesystem the agent mounted (lvm) got the class's mount options on that mount;
            // kubelet only bind-mounts its `data` directory, where filesystem options do not apply. A raw block
            // volume is not mounted at all.
            mount_options: if volume.fs_type.is_some() || spec.volume_mode.as_deref() == Some("Block") {
                None
            } else {
                class.mount_options.clone()
            },
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: claim.metadata.namespace.clone(),
                name: claim.metadata.name.clone(),
                uid: claim.metadata.uid.clone(),
                ..Default::default()
            }),
            node_affinity: Some(affinity),
            local,
            host_path,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth::agent_api::{ClaimRef, VolumeMode};
    use k8s_openapi::api::core::v1::PersistentVolumeClaimSpec;

    fn claim() -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("data-db-0".into()),
                namespace: Some("db".into()),
                uid: Some("0f8e3c1a-5b2d-4c7e-9a10-2b3c4d5e6f70".into()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn class(reclaim: Option<&str>) -> StorageClass {
        StorageClass {
            metadata: ObjectMeta { name: Some("berth-local".into()), ..Default::default() },
            provisioner: berth::PROVISIONER_NAME.into(),
            reclaim_policy: reclaim.map(Into::into),
            ..Default::default()
        }
    }

    fn volume() -> Volume {
        Volume {
            name: "pvc-0f8e3c1a-5b2d-4c7e-9a10-2b3c4d5e6f70".into(),
            pool: "nvme".into(),
            size_bytes: 10 << 30,
            volume_mode: VolumeMode::Filesystem,
            path: "/mnt/nvme/berth/pvc-0f8e3c1a-5b2d-4c7e-9a10-2b3c4d5e6f70/data".into(),
            claim: ClaimRef { namespace: "db".into(), name: "data-db-0".into() },
            uid: 0,
            gid: 0,
            mode: 0o750,
            created_at: "2026-11-29T00:00:00Z".into(),
            fs_type: None,
            mount_options: vec![],
            used_bytes: None,
            published: Some(false),
        }
    }

    fn params(source: PvSource) -> ClassParams {
        ClassParams { pool: "nvme".into(), pv_source: source, uid: None, gid: None, mode: None, fs_type: None }
    }

    #[test]
    fn a_local_pv_pinned_to_the_hostname_label_and_prebound() {
        let node = NodeRef { name: "node-0".into(), hostname: "host-0".into() };
        let pv = build(&claim(), &class(None), &params(PvSource::Local), &node, &volume());
        assert_eq!(pv.metadata.name.as_deref(), Some("pvc-0f8e3c1a-5b2d-4c7e-9a10-2b3c4d5e6f70"));
        assert_eq!(pv.metadata.finalizers, Some(vec![keys::PV_DELETION_FINALIZER.to_owned()]), "Delete is the default");
        let labels = pv.metadata.labels.unwrap();
        assert_eq!(labels[NODE_LABEL], "node-0");
        assert_eq!(labels[POOL_LABEL], "nvme");
        assert_eq!(pv.metadata.annotations.unwrap()[keys::PROVISIONED_BY], "local.berth.dev");
        let spec = pv.spec.unwrap();
        assert_eq!(spec.capacity.unwrap()["storage"], Quantity("10Gi".into()));
        assert_eq!(spec.persistent_volume_reclaim_policy.as_deref(), Some("Delete"));
        assert_eq!(spec.volume_mode.as_deref(), Some("Filesystem"));
        assert_eq!(spec.local.unwrap().path, volume().path);
        assert!(spec.host_path.is_none());
        let claim_ref = spec.claim_ref.unwrap();
        assert_eq!(claim_ref.uid.as_deref(), Some("0f8e3c1a-5b2d-4c7e-9a10-2b3c4d5e6f70"));
        assert_eq!((claim_ref.namespace.as_deref(), claim_ref.name.as_deref()), (Some("db"), Some("data-db-0")));
        let term = &spec.node_affinity.unwrap().required.unwrap().node_selector_terms[0];
        let req = &term.match_expressions.as_ref().unwrap()[0];
        assert_eq!((req.key.as_str(), req.operator.as_str()), ("kubernetes.io/hostname", "In"));
        assert_eq!(req.values, Some(vec!["host-0".into()]), "the hostname label value, not the node name");
    }

    #[test]
    fn mount_options_stay_off_the_pv_of_a_volume_the_agent_mounted() {
        let node = NodeRef { name: "node-0".into(), hostname: "host-0".into() };
        let mut class = class(None);
        class.mount_options = Some(vec!["noatime".into()]);
        let directory = build(&claim(), &class, &params(PvSource::Local), &node, &volume());
        assert_eq!(directory.spec.unwrap().mount_options, Some(vec!["noatime".to_string()]));
        let lvm = Volume { fs_type: Some("xfs".into()), mount_options: vec!["noatime".into()], ..volume() };
        let mounted = build(&claim(), &class, &params(PvSource::Local), &node, &lvm);
        assert_eq!(mounted.spec.unwrap().mount_options, None);
    }

    #[test]
    fn retain_has_no_finalizer_and_hostpath_is_a_directory() {
        let node = NodeRef { name: "node-0".into(), hostname: "host-0".into() };
        let pv = build(&claim(), &class(Some("Retain")), &params(PvSource::HostPath), &node, &volume());
        assert_eq!(pv.metadata.finalizers, None);
        let spec = pv.spec.unwrap();
        assert!(spec.local.is_none());
        assert_eq!(spec.host_path.unwrap().type_.as_deref(), Some("Directory"));
    }

    #[test]
    fn label_values_stay_valid_and_distinct_for_long_node_names() {
        let a = format!("{}.example.com", "a".repeat(120));
        let b = format!("{}.example.org", "a".repeat(120));
        let (la, lb) = (label_value(&a), label_value(&b));
        assert!(la.len() <= 63 && lb.len() <= 63);
        assert_ne!(la, lb);
        assert_eq!(la, label_value(&a), "stable");
        assert!(la.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'));
        assert!(
            la.chars().next().unwrap().is_ascii_alphanumeric() && la.chars().last().unwrap().is_ascii_alphanumeric()
        );
        assert_eq!(label_value("node-0"), "node-0");
    }
}
