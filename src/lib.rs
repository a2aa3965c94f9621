//! Shared vocabulary of Berth: the provisioner name, the well-known Kubernetes keys Berth reads and writes, the
//! naming and validation rules every component must agree on, the agent's HTTP API types and the BerthNode custom
//! resource. Terms follow `../shared/reference/terms.md`.

pub mod agent_api;
pub mod berth_node;
pub mod keys;
pub mod logging;
pub mod naming;
pub mod quantity;
pub mod validate;
pub mod version;

#[cfg(test)]
mod crd_file_test;

/// The provisioner name StorageClasses use. A DNS subdomain on purpose: kube-scheduler matches it against a
/// CSIDriver object's name to opt into capacity-aware scheduling, and object names cannot contain `/`.
pub const PROVISIONER_NAME: &str = "local.berth.dev";

/// The audience of the tokens the controller sends to the agent of `node` (terms.md: agent audience). An agent
/// accepts only its own, so a token captured by one agent is useless against every other.
pub fn agent_audience(node: &str) -> String {
    format!("{PROVISIONER_NAME}/agent/{node}")
}
