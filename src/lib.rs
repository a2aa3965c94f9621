//! Shared vocabulary of Berth: the provisioner name, the well-known Kubernetes keys Berth reads and writes, and
//! the naming rules every component must agree on. Terms follow `../shared/reference/terms.md`.

pub mod keys;
pub mod naming;

/// The provisioner name StorageClasses use. A DNS subdomain on purpose: kube-scheduler matches it against a
/// CSIDriver object's name to opt into capacity-aware scheduling, and object names cannot contain `/`.
pub const PROVISIONER_NAME: &str = "local.berth.dev";
