//! The agents' versions as their BerthNodes publish them: each one is logged when first seen and when it changes,
//! with a warning when it is outside the window this controller supports (berth::version::skew, deploy/README.md).

use std::collections::BTreeMap;

use berth::berth_node::BerthNode;
use berth::version::{Skew, skew};

/// What changed about one node's agent version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub node: String,
    pub version: String,
    pub skew: Skew,
}

/// Node → the agent version last reported for it.
#[derive(Default)]
pub struct AgentVersions {
    seen: BTreeMap<String, String>,
}

impl AgentVersions {
    /// The nodes whose agent version is new or changed since the last call, judged against `controller`'s
    /// version. Nodes whose BerthNode is gone are forgotten (a new agent there is reported again).
    pub fn observe(&mut self, controller: &str, agents: &[std::sync::Arc<BerthNode>]) -> Vec<Change> {
        let now: BTreeMap<String, String> = agents
            .iter()
            .filter_map(|b| Some((b.spec.node_name.clone(), b.status.as_ref()?.agent_version.clone())))
            .collect();
        let changes = now
            .iter()
            .filter(|(node, version)| self.seen.get(*node) != Some(*version))
            .map(|(node, version)| Change {
                node: node.clone(),
                version: version.clone(),
                skew: skew(controller, version),
            })
            .collect();
        self.seen = now;
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth::berth_node::{BerthNodeSpec, BerthNodeStatus};
    use std::sync::Arc;

    fn agent(node: &str, version: &str) -> Arc<BerthNode> {
        let mut b = BerthNode::new(node, BerthNodeSpec { node_name: node.into() });
        b.status = Some(BerthNodeStatus { agent_version: version.into(), ..Default::default() });
        Arc::new(b)
    }

    #[test]
    fn each_version_is_reported_once_and_again_when_it_changes() {
        let mut versions = AgentVersions::default();
        let first = versions.observe("0.1.0", &[agent("a", "0.1.0+x"), agent("b", "0.2.0")]);
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].skew, Skew::Same);
        assert!(matches!(first[1].skew, Skew::Unsupported(_)), "{first:?}");
        assert_eq!(versions.observe("0.1.0", &[agent("a", "0.1.0+x"), agent("b", "0.2.0")]), vec![], "heartbeats");
        let upgraded = versions.observe("0.1.0", &[agent("a", "0.1.0+x"), agent("b", "0.1.1")]);
        assert_eq!(upgraded, vec![Change { node: "b".into(), version: "0.1.1".into(), skew: Skew::Supported }]);
        assert_eq!(versions.observe("0.1.0", &[agent("a", "0.1.0+x")]), vec![], "b's BerthNode deleted");
        assert_eq!(versions.observe("0.1.0", &[agent("a", "0.1.0+x"), agent("b", "0.1.1")]).len(), 1, "b is back");
    }
}
