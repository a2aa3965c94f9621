//! Annotation, label and finalizer keys defined by Kubernetes that Berth reads or writes.
//! See `provisioning-protocol.md` for who writes each one.

/// Written on a claim by kube-controller-manager's PV controller: which provisioner must act on it.
pub const STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
/// The older spelling of [`STORAGE_PROVISIONER`], still written by kube-controller-manager; read as a fallback.
pub const STORAGE_PROVISIONER_BETA: &str = "volume.beta.kubernetes.io/storage-provisioner";
/// Written on a WaitForFirstConsumer claim by kube-scheduler: the node the pod will run on.
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// Written on a PV by its provisioner.
pub const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// The node label that node-local PVs are pinned to. Its value may differ from the Node's name.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
/// Keeps a Delete-policy PV object until its storage is freed (KEP-2644).
pub const PV_DELETION_FINALIZER: &str = "external-provisioner.volume.kubernetes.io/finalizer";
