//! Whether each node's agent is alive. An agent writes its BerthNode status when its pools change and at least
//! every heartbeat (the agent's `--status-heartbeat-seconds`); one whose status this controller has not seen change
//! for `--agent-stale-after` is stale: its capacity is published as zero and no claim is sent to it, until its
//! status changes again. Time is the controller's own monotonic clock from when it saw each change (as client-go's
//! leader election judges a lease), so clocks that differ between nodes do not matter, and after a restart every
//! agent gets the full period again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth::berth_node::BerthNode;
use futures::StreamExt;
use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender};
use kube::runtime::reflector::Store;

pub struct Liveness {
    stale_after: Duration,
    /// Node → (its status as last seen, serialised; when this controller saw it change).
    seen: Mutex<BTreeMap<String, (String, Instant)>>,
    /// The stale nodes as of the last [`Liveness::observe`].
    stale: Mutex<BTreeSet<String>>,
}

/// Whether a status last seen changing at `changed` is stale at `now`.
pub fn stale(changed: Instant, now: Instant, after: Duration) -> bool {
    now.saturating_duration_since(changed) >= after
}

impl Liveness {
    pub fn new(stale_after: Duration) -> Liveness {
        Liveness { stale_after, seen: Mutex::default(), stale: Mutex::default() }
    }

    /// Records the statuses seen now (node → serialised status; nodes without a status are not listed) and
    /// returns the nodes whose staleness changed: (became stale, came back).
    pub fn observe(&self, statuses: BTreeMap<String, String>, now: Instant) -> (Vec<String>, Vec<String>) {
        let mut seen = self.seen.lock().expect("liveness");
        seen.retain(|node, _| statuses.contains_key(node));
        for (node, status) in statuses {
            match seen.get_mut(&node) {
                Some((last, _)) if *last == status => {}
                Some(entry) => *entry = (status, now),
                None => {
                    seen.insert(node, (status, now));
                }
            }
        }
        let now_stale: BTreeSet<String> = seen
            .iter()
            .filter(|(_, (_, changed))| stale(*changed, now, self.stale_after))
            .map(|(node, _)| node.clone())
            .collect();
        let mut before = self.stale.lock().expect("liveness");
        let went = now_stale.difference(&before).cloned().collect();
        let back = before.difference(&now_stale).filter(|n| seen.contains_key(*n)).cloned().collect();
        *before = now_stale;
        (went, back)
    }

    /// Whether `node`'s agent counted as stale at the last observation.
    pub fn is_stale(&self, node: &str) -> bool {
        self.stale.lock().expect("liveness").contains(node)
    }
}

fn statuses(store: &Store<BerthNode>) -> BTreeMap<String, String> {
    store
        .state()
        .iter()
        .filter_map(|b| Some((b.spec.node_name.clone(), serde_json::to_string(b.status.as_ref()?).ok()?)))
        .collect()
}

/// Observes the BerthNodes whenever one changes (`changes`) and at least four times per stale period, and tells
/// `notify` (the claim reconciler and the capacity publisher) when an agent went stale or came back.
pub async fn run(
    liveness: std::sync::Arc<Liveness>,
    store: Store<BerthNode>,
    mut changes: UnboundedReceiver<()>,
    notify: Vec<UnboundedSender<()>>,
) {
    let tick = (liveness.stale_after / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let (went, back) = liveness.observe(statuses(&store), Instant::now());
        for node in &went {
            tracing::warn!(%node, stale_after = ?liveness.stale_after, "the node's agent has not updated its status: taken for dead (zero capacity, no new volumes) until it does");
        }
        for node in &back {
            tracing::info!(%node, "the node's agent updates its status again: serving");
        }
        if !went.is_empty() || !back.is_empty() {
            for tx in &notify {
                let _ = tx.unbounded_send(());
            }
        }
        // A burst of changes is one observation.
        let _ = tokio::time::timeout(tick, changes.next()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statuses(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(n, s)| (n.to_string(), s.to_string())).collect()
    }

    #[test]
    fn an_agent_is_stale_after_a_period_without_change_and_back_at_its_next_change() {
        let l = Liveness::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        assert_eq!(l.observe(statuses(&[("a", "1"), ("b", "1")]), t0), (vec![], vec![]));
        // a keeps changing, b does not.
        assert_eq!(l.observe(statuses(&[("a", "2"), ("b", "1")]), s(6)), (vec![], vec![]));
        assert_eq!(l.observe(statuses(&[("a", "3"), ("b", "1")]), s(10)), (vec!["b".into()], vec![]));
        assert!(l.is_stale("b") && !l.is_stale("a"));
        // Reported once, not at every observation.
        assert_eq!(l.observe(statuses(&[("a", "3"), ("b", "1")]), s(12)), (vec![], vec![]));
        assert_eq!(l.observe(statuses(&[("a", "3"), ("b", "2")]), s(13)), (vec![], vec!["b".into()]));
        assert!(!l.is_stale("b"));
        // a's last change was at 10 s.
        assert_eq!(l.observe(statuses(&[("a", "3"), ("b", "2")]), s(20)), (vec!["a".into()], vec![]));
    }

    #[test]
    fn a_node_seen_first_gets_the_full_period_and_a_removed_one_is_forgotten() {
        let l = Liveness::new(Duration::from_secs(10));
        let t0 = Instant::now();
        l.observe(statuses(&[("a", "1")]), t0);
        assert_eq!(l.observe(statuses(&[("a", "1")]), t0 + Duration::from_secs(11)), (vec!["a".into()], vec![]));
        // The BerthNode is deleted: neither stale nor "back".
        assert_eq!(l.observe(statuses(&[]), t0 + Duration::from_secs(12)), (vec![], vec![]));
        assert!(!l.is_stale("a"));
        // Made again: a fresh start.
        l.observe(statuses(&[("a", "1")]), t0 + Duration::from_secs(13));
        assert!(!l.is_stale("a"));
    }
}
