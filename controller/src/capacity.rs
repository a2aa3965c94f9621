//! Capacity publishing: one CSIStorageCapacity per (Berth StorageClass, node whose agent has the class's pool), in
//! the controller's namespace, so kube-scheduler places a pod only on a node whose pool can hold its claim
//! (docs/scheduling.md). What should exist is a pure function of classes and node views ([`desired`]); [`run`]
//! makes the API server match it, writing only objects whose content changed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use berth::keys;
use futures::StreamExt;
use futures::channel::mpsc::UnboundedReceiver;
use k8s_openapi::api::storage::v1::{CSIDriver, CSIStorageCapacity, StorageClass};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};

use crate::context::Context;
use crate::decide::NodeView;
use crate::pv::{label_value, stable_hash};

/// Labels on every object Berth publishes: the class and node it is for (label-safe values), and who manages it.
pub const CLASS_LABEL: &str = "local.berth.dev/storage-class";
pub const NODE_LABEL: &str = "local.berth.dev/node";
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "berth-controller");

/// One capacity object's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub class: String,
    pub class_uid: String,
    pub node: String,
    /// The node's `kubernetes.io/hostname` label value: what the object's nodeTopology selects.
    pub hostname: String,
    /// The pool's free bytes (0 when the pool is not ready).
    pub capacity: u64,
    /// The largest single volume the pool can create now (0 when not ready).
    pub maximum_volume_size: u64,
}

/// The object name for (class, node): stable, unique, and valid whatever the names' lengths.
pub fn object_name(class: &str, node: &str) -> String {
    // Over "class/node": a class name cannot contain '/'.
    format!("berth-{:016x}", stable_hash(&format!("{class}/{node}")))
}

/// What should be published: for every class of `provisioner` with a valid `pool` parameter, and every node that
/// has a Node object (for its hostname label) and whose agent reports that pool. A pool that is not ready, or whose
/// agent is stale, is published with zero capacity.
pub fn desired(provisioner: &str, classes: &[Arc<StorageClass>], nodes: &[NodeView]) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    for class in classes.iter().filter(|c| c.provisioner == provisioner) {
        let Ok(params) = crate::params::parse(class.parameters.as_ref()) else { continue };
        let (Some(class_name), Some(class_uid)) = (class.metadata.name.clone(), class.metadata.uid.clone()) else {
            continue;
        };
        for node in nodes {
            let Some(hostname) = node.labels.as_ref().and_then(|l| l.get(keys::HOSTNAME_LABEL)) else { continue };
            let Some(pool) = node.pools.as_ref().and_then(|p| p.iter().find(|p| p.name == params.pool)) else {
                continue;
            };
            // A stale agent's last word is not trusted: zero, so the scheduler sends nothing there.
            let (capacity, maximum_volume_size) = if pool.ready && !node.stale {
                (pool.free_bytes, pool.maximum_volume_size_bytes.min(pool.free_bytes))
            } else {
                (0, 0)
            };
            out.insert(
                object_name(&class_name, &node.name),
                Entry {
                    class: class_name.clone(),
                    class_uid: class_uid.clone(),
                    node: node.name.clone(),
                    hostname: hostname.clone(),
                    capacity,
                    maximum_volume_size,
                },
            );
        }
    }
    out
}

/// The object for `entry`, owned by its StorageClass (deleted with it by the garbage collector).
pub fn build(name: &str, namespace: &str, entry: &Entry) -> CSIStorageCapacity {
    CSIStorageCapacity {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (CLASS_LABEL.to_owned(), label_value(&entry.class)),
                (NODE_LABEL.to_owned(), label_value(&entry.node)),
                (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
            ])),
            owner_references: Some(vec![OwnerReference {
                api_version: "storage.k8s.io/v1".into(),
                kind: "StorageClass".into(),
                name: entry.class.clone(),
                uid: entry.class_uid.clone(),
                ..Default::default()
            }]),
            ..Default::default()
        },
        storage_class_name: entry.class.clone(),
        node_topology: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(keys::HOSTNAME_LABEL.to_owned(), entry.hostname.clone())])),
            match_expressions: None,
        }),
        // Exact byte counts: a rounded quantity could promise more than the pool has.
        capacity: Some(Quantity(entry.capacity.to_string())),
        maximum_volume_size: Some(Quantity(entry.maximum_volume_size.to_string())),
    }
}

/// Whether `existing` already says what `wanted` says (then it is not rewritten).
pub fn same(existing: &CSIStorageCapacity, wanted: &CSIStorageCapacity) -> bool {
    let bytes = |q: &Option<Quantity>| q.as_ref().and_then(|q| berth::quantity::bytes(&q.0).ok());
    existing.storage_class_name == wanted.storage_class_name
        && existing.node_topology == wanted.node_topology
        && bytes(&existing.capacity) == bytes(&wanted.capacity)
        && bytes(&existing.maximum_volume_size) == bytes(&wanted.maximum_volume_size)
        && existing.metadata.labels == wanted.metadata.labels
        && existing.metadata.owner_references == wanted.metadata.owner_references
}

/// Warns when the CSIDriver object that makes kube-scheduler read capacity is missing or does not ask for it.
pub async fn check_csidriver(client: &kube::Client, provisioner: &str) {
    let drivers: Api<CSIDriver> = Api::all(client.clone());
    match drivers.get_opt(provisioner).await {
        Ok(Some(d)) if d.spec.storage_capacity == Some(true) => {}
        Ok(Some(_)) => tracing::warn!(
            csidriver = provisioner,
            "the CSIDriver object does not set storageCapacity: true; kube-scheduler ignores the published \
             capacity and may place pods on nodes without room (apply deploy/csidriver.yaml)"
        ),
        Ok(None) => tracing::warn!(
            csidriver = provisioner,
            "no CSIDriver object of this name: kube-scheduler ignores the published capacity and may place pods \
             on nodes without room (apply deploy/csidriver.yaml)"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot read the CSIDriver object"),
    }
}

/// Keeps the published objects equal to [`desired`]: at start, whenever a class, Node or BerthNode changes
/// (`changes`), and every `resync` (repairs objects changed or deleted by someone else).
pub async fn run(ctx: Arc<Context>, namespace: String, mut changes: UnboundedReceiver<()>, resync: Duration) {
    let api: Api<CSIStorageCapacity> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut published: BTreeMap<String, CSIStorageCapacity> = BTreeMap::new();
    let mut listed = false;
    loop {
        if !listed {
            // What exists now, once; afterwards the map is kept by our own writes (and a resync lists again).
            let selector = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
            match api.list(&ListParams::default().labels(&selector)).await {
                Ok(list) => {
                    published = list.items.into_iter().filter_map(|o| Some((o.metadata.name.clone()?, o))).collect();
                    listed = true;
                }
                Err(e) => tracing::warn!(error = %e, "cannot list CSIStorageCapacity objects"),
            }
        }
        if listed {
            let wanted = desired(berth::PROVISIONER_NAME, &ctx.caches.classes.state(), &ctx.node_views());
            if !sync(&api, &namespace, &wanted, &mut published).await {
                listed = false;
            }
        }
        // Wait for a change (then take all that queued up: one sync covers them) or the resync period.
        match tokio::time::timeout(resync, changes.next()).await {
            Ok(Some(())) => while changes.try_recv().is_ok() {},
            Ok(None) => return,
            Err(_) => listed = false,
        }
    }
}

/// One pass; false if a write failed (the next pass lists again).
async fn sync(
    api: &Api<CSIStorageCapacity>,
    namespace: &str,
    wanted: &BTreeMap<String, Entry>,
    published: &mut BTreeMap<String, CSIStorageCapacity>,
) -> bool {
    let mut ok = true;
    for (name, entry) in wanted {
        let object = build(name, namespace, entry);
        let result = match published.get(name) {
            Some(existing) if same(existing, &object) => continue,
            Some(existing) => {
                let mut object = object;
                object.metadata.resource_version = existing.metadata.resource_version.clone();
                api.replace(name, &PostParams::default(), &object).await
            }
            None => api.create(&PostParams::default(), &object).await,
        };
        match result {
            Ok(written) => {
                tracing::debug!(name, class = %entry.class, node = %entry.node, capacity = entry.capacity, "capacity published");
                published.insert(name.clone(), written);
            }
            Err(e) => {
                tracing::warn!(name, class = %entry.class, node = %entry.node, error = %e, "cannot publish capacity");
                ok = false;
            }
        }
    }
    let gone: Vec<String> = published.keys().filter(|n| !wanted.contains_key(*n)).cloned().collect();
    for name in gone {
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                published.remove(&name);
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                published.remove(&name);
            }
            Err(e) => {
                tracing::warn!(name, error = %e, "cannot delete a capacity object");
                ok = false;
            }
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth::agent_api::PoolStatus;

    fn class(name: &str, provisioner: &str, pool: &str) -> Arc<StorageClass> {
        Arc::new(StorageClass {
            metadata: ObjectMeta { name: Some(name.into()), uid: Some(format!("uid-{name}")), ..Default::default() },
            provisioner: provisioner.into(),
            parameters: Some(BTreeMap::from([("pool".into(), pool.into())])),
            ..Default::default()
        })
    }

    fn pool(name: &str, ready: bool, free: u64) -> PoolStatus {
        PoolStatus {
            name: name.into(),
            backend: "hostpath".into(),
            ready,
            reason: None,
            capacity_bytes: 100,
            allocated_bytes: 100 - free,
            free_bytes: free,
            maximum_volume_size_bytes: free,
            volumes: 0,
            enforcement: "none".into(),
            enforcement_reason: None,
        }
    }

    fn node(name: &str, hostname: Option<&str>, pools: Option<Vec<PoolStatus>>) -> NodeView {
        NodeView {
            name: name.into(),
            labels: hostname.map(|h| BTreeMap::from([(keys::HOSTNAME_LABEL.to_owned(), h.to_owned())])),
            pools,
            stale: false,
        }
    }

    #[test]
    fn one_object_per_class_and_node_with_that_pool() {
        let classes = [
            class("fast", "local.berth.dev", "nvme"),
            class("slow", "local.berth.dev", "disk"),
            class("theirs", "other.dev/x", "nvme"),
            class("broken", "local.berth.dev", "Not A Pool!"),
        ];
        let nodes = [
            node("n1", Some("h1"), Some(vec![pool("nvme", true, 40), pool("disk", true, 90)])),
            node("n2", Some("h2"), Some(vec![pool("nvme", false, 70)])),
            node("n3", Some("h3"), None),                               // no agent
            node("n4", None, Some(vec![pool("nvme", true, 10)])),       // no Node object
            node("n5", Some("h5"), Some(vec![pool("other", true, 5)])), // no such pool
        ];
        let d = desired("local.berth.dev", &classes, &nodes);
        let got: Vec<(&str, &str, &str, u64)> =
            d.values().map(|e| (e.class.as_str(), e.node.as_str(), e.hostname.as_str(), e.capacity)).collect();
        let mut got = got;
        got.sort();
        // A pool that is not ready is published as full, so the scheduler skips the node.
        assert_eq!(got, [("fast", "n1", "h1", 40), ("fast", "n2", "h2", 0), ("slow", "n1", "h1", 90)]);
        assert!(d.contains_key(&object_name("fast", "n1")));
    }

    #[test]
    fn names_are_stable_distinct_and_valid() {
        let long = "n".repeat(253);
        let names = [object_name("a", "b.c"), object_name("a.b", "c"), object_name(&long, &long)];
        assert_ne!(names[0], names[1]);
        for n in &names {
            assert!(berth::validate::volume_name(n).is_ok(), "{n}"); // a DNS-1123 label of at most 63 characters
        }
        assert_eq!(object_name("a", "b"), object_name("a", "b"));
    }

    #[test]
    fn the_object_selects_exactly_the_node_and_is_rewritten_only_on_change() {
        let entry = Entry {
            class: "fast".into(),
            class_uid: "u".into(),
            node: "node-1".into(),
            hostname: "host-1".into(),
            capacity: 10 << 30,
            maximum_volume_size: 10 << 30,
        };
        let object = build("berth-x", "berth-system", &entry);
        assert_eq!(
            object.node_topology.as_ref().unwrap().match_labels.as_ref().unwrap()[keys::HOSTNAME_LABEL],
            "host-1"
        );
        assert_eq!(object.capacity, Some(Quantity("10737418240".into())));
        assert_eq!(object.metadata.owner_references.as_ref().unwrap()[0].kind, "StorageClass");
        // The API server may write the quantity in another form; the same number is the same.
        let mut stored = object.clone();
        stored.capacity = Some(Quantity("10Gi".into()));
        assert!(same(&stored, &object));
        let smaller = build("berth-x", "berth-system", &Entry { capacity: 1, ..entry });
        assert!(!same(&stored, &smaller));
    }
}
