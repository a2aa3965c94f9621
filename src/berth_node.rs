//! `BerthNode` (group `berth.dev`): one per node, written by that node's agent. How the controller finds an
//! agent (endpoint and the certificate to pin) and what its pools can hold.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::agent_api::PoolStatus;

#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[kube(
    group = "berth.dev",
    version = "v1alpha1",
    kind = "BerthNode",
    plural = "berthnodes",
    shortname = "bn",
    status = "BerthNodeStatus",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Pools","type":"string","jsonPath":".status.summary.pools"}"#,
    printcolumn = r#"{"name":"Free","type":"string","jsonPath":".status.summary.free"}"#,
    printcolumn = r#"{"name":"Capacity","type":"string","jsonPath":".status.summary.capacity"}"#,
    printcolumn = r#"{"name":"Volumes","type":"integer","jsonPath":".status.summary.volumes"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BerthNodeSpec {
    /// The Node this agent serves (the object is named after it too).
    pub node_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct BerthNodeStatus {
    /// `https://host:port` of the agent's API.
    pub endpoint: String,
    /// PEM of the agent's serving certificate: the controller pins it instead of trusting a CA.
    pub certificate: String,
    pub agent_version: String,
    pub pools: Vec<PoolStatus>,
    /// Human-readable totals for `kubectl get berthnodes`.
    pub summary: BerthNodeSummary,
    /// RFC 3339; refreshed on every status write and at least every heartbeat interval.
    pub heartbeat_time: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct BerthNodeSummary {
    /// Pool names, comma-separated; a pool that is not ready is marked `(not ready)`.
    pub pools: String,
    /// Free bytes summed over ready pools, human-readable (binary units).
    pub free: String,
    pub capacity: String,
    // Kubernetes knows int32/int64, not Rust's unsigned formats.
    #[schemars(extend("format" = "int32"))]
    pub volumes: u32,
}

/// Bytes in binary units with one decimal (`10.0Gi`), as `kubectl` users read quantities.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["", "Ki", "Mi", "Gi", "Ti", "Pi"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes}") } else { format!("{value:.1}{}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn human_bytes_reads_like_kubectl() {
        assert_eq!(human_bytes(0), "0");
        assert_eq!(human_bytes(1023), "1023");
        assert_eq!(human_bytes(10 << 30), "10.0Gi");
        assert_eq!(human_bytes((3 << 20) / 2), "1.5Mi");
    }

    #[test]
    fn crd_is_cluster_scoped_with_a_status_subresource() {
        let crd = BerthNode::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("berthnodes.berth.dev"));
        assert_eq!(crd.spec.scope, "Cluster");
        let version = &crd.spec.versions[0];
        assert!(version.subresources.as_ref().unwrap().status.is_some());
    }
}
