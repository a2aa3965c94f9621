//! What every reconcile needs: the client, the caches of the objects decisions are made from, the agent client,
//! the event recorder and per-object retry counters.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth::berth_node::BerthNode;
use k8s_openapi::api::core::v1::{Node, PersistentVolume};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};

use crate::agent_client::AgentClient;
use crate::decide::NodeView;
use crate::liveness::Liveness;
use crate::metrics::Metrics;

/// What happens to a released Delete-policy PV whose Node object is gone (the node left the cluster).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GoneNodes {
    /// Keep the PV, with a `VolumeFailedDelete` event and retries (backoff up to 5 minutes): if a node of that
    /// name returns with its disk, the volume is deleted then.
    Wait,
    /// Remove the PV object: the data left with the node.
    Forget,
}

/// The caches decisions are made from.
pub struct Caches {
    pub classes: Store<StorageClass>,
    pub nodes: Store<Node>,
    pub berth_nodes: Store<BerthNode>,
    pub volumes: Store<PersistentVolume>,
}

/// Whether a retry counter's key still names something that exists: `claim/<uid>[/…]` a claim, `pv/<name>` and
/// `expand/<name>` a PV. Unknown kinds are kept.
pub fn still_wanted(key: &str, claim_uids: &BTreeSet<String>, pv_exists: &impl Fn(&str) -> bool) -> bool {
    let mut parts = key.splitn(3, '/');
    match (parts.next(), parts.next()) {
        (Some("claim"), Some(uid)) => claim_uids.contains(uid),
        (Some("pv" | "expand"), Some(name)) => pv_exists(name),
        _ => true,
    }
}

pub struct Context {
    pub client: kube::Client,
    pub caches: Caches,
    pub agents: AgentClient,
    pub recorder: Recorder,
    pub gone_nodes: GoneNodes,
    pub metrics: Arc<Metrics>,
    pub liveness: Arc<Liveness>,
    /// The clones being made now (their sources are protected meanwhile).
    pub copies: crate::clone::Copies,
    failures: Mutex<HashMap<String, u32>>,
    /// Keys (as for `failures`) whose next attempt waits until then: see [`Context::held`].
    held: Mutex<HashMap<String, Instant>>,
    /// (object uid, reason) → the note last published and when: see [`Context::event`].
    published: Mutex<HashMap<(String, String), (String, Instant)>>,
}

/// An identical event (same object, reason and note) is not published again within this window. Claims are
/// reconciled again whenever any StorageClass, Node or BerthNode changes; without this a claim refused for good
/// would cost an API write at every such change.
const REPEAT_EVENTS_AFTER: Duration = Duration::from_secs(600);

impl Context {
    pub fn new(
        client: kube::Client,
        caches: Caches,
        agents: AgentClient,
        recorder: Recorder,
        gone_nodes: GoneNodes,
        metrics: Arc<Metrics>,
        liveness: Arc<Liveness>,
    ) -> Context {
        Context {
            client,
            caches,
            agents,
            recorder,
            gone_nodes,
            metrics,
            liveness,
            copies: crate::clone::Copies::default(),
            failures: Mutex::default(),
            held: Mutex::default(),
            published: Mutex::default(),
        }
    }

    pub fn class(&self, name: &str) -> Option<std::sync::Arc<StorageClass>> {
        self.caches.classes.get(&ObjectRef::new(name))
    }

    pub fn pv_exists(&self, name: &str) -> bool {
        self.caches.volumes.get(&ObjectRef::new(name)).is_some()
    }

    pub fn berth_node(&self, name: &str) -> Option<std::sync::Arc<BerthNode>> {
        self.caches.berth_nodes.get(&ObjectRef::new(name))
    }

    /// Every node the controller knows of, from Nodes and BerthNodes alike.
    pub fn node_views(&self) -> Vec<NodeView> {
        let labels: BTreeMap<String, BTreeMap<String, String>> = self
            .caches
            .nodes
            .state()
            .iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, n.metadata.labels.clone().unwrap_or_default())))
            .collect();
        let pools: BTreeMap<String, Vec<berth::agent_api::PoolStatus>> = self
            .caches
            .berth_nodes
            .state()
            .iter()
            .filter_map(|b| Some((b.spec.node_name.clone(), b.status.as_ref()?.pools.clone())))
            .collect();
        let names: BTreeSet<&String> = labels.keys().chain(pools.keys()).collect();
        names
            .into_iter()
            .map(|n| NodeView {
                name: n.clone(),
                labels: labels.get(n).cloned(),
                pools: pools.get(n).cloned(),
                stale: self.liveness.is_stale(n),
            })
            .collect()
    }

    /// Backoff for the next retry of `key`: starts sub-second, doubles, caps at 5 minutes.
    pub fn next_backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().expect("failures");
        let n = failures.entry(key.to_owned()).or_insert(0);
        *n = (*n + 1).min(20);
        Duration::from_millis(250u64.saturating_mul(1 << (*n - 1).min(11))).min(Duration::from_secs(300))
    }

    /// Drops the retry counters of claims (by uid) and PVs (by name) that no longer exist, so the map does not grow
    /// with every claim ever refused.
    pub fn forget_failures(&self, claim_uids: &BTreeSet<String>, pv_exists: impl Fn(&str) -> bool) {
        self.failures.lock().expect("failures").retain(|key, _| still_wanted(key, claim_uids, &pv_exists));
        self.held.lock().expect("held").retain(|key, _| still_wanted(key, claim_uids, &pv_exists));
    }

    /// How long `key`'s next attempt must still wait (None: it may go now), for work that a change of the object
    /// brings back sooner than its backoff allows (a clone's claim that the scheduler keeps placing elsewhere).
    pub fn held(&self, key: &str) -> Option<Duration> {
        let until = *self.held.lock().expect("held").get(key)?;
        until.checked_duration_since(Instant::now()).filter(|left| !left.is_zero())
    }

    /// Holds `key`'s next attempt back for its next backoff ([`Context::next_backoff`]).
    pub fn hold(&self, key: &str) {
        let until = Instant::now() + self.next_backoff(key);
        self.held.lock().expect("held").insert(key.to_owned(), until);
    }

    pub fn attempts(&self, key: &str) -> u32 {
        self.failures.lock().expect("failures").get(key).copied().unwrap_or(0)
    }

    pub fn succeeded(&self, key: &str) {
        self.failures.lock().expect("failures").remove(key);
    }

    pub async fn event<K: Resource<DynamicType = ()>>(&self, obj: &K, warning: bool, reason: &str, note: String) {
        let key = (obj.meta().uid.clone().unwrap_or_default(), reason.to_owned());
        {
            let mut published = self.published.lock().expect("published events");
            let now = Instant::now();
            if published
                .get(&key)
                .is_some_and(|(last, at)| *last == note && now.duration_since(*at) < REPEAT_EVENTS_AFTER)
            {
                return;
            }
            published.retain(|_, (_, at)| now.duration_since(*at) < REPEAT_EVENTS_AFTER);
            published.insert(key, (note.clone(), now));
        }
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "cannot record an event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_counters_of_gone_claims_and_pvs_are_not_wanted() {
        let uids = BTreeSet::from(["u1".to_string()]);
        let pv_exists = |name: &str| name == "pvc-u1";
        for (key, wanted) in [
            ("claim/u1", true),
            ("claim/u1/abandon", true),
            ("claim/u2", false),
            ("claim/u2/abandon", false),
            ("pv/pvc-u1", true),
            ("expand/pvc-u1", true),
            ("pv/pvc-u2", false),
            ("expand/pvc-u2", false),
            ("other", true),
        ] {
            assert_eq!(still_wanted(key, &uids, &pv_exists), wanted, "{key}");
        }
    }
}
