//! What should happen to a claim now: a pure function of the observed claim, class, PV and nodes. The
//! reconciler carries the decision out; everything here is tested without an API server.

use std::collections::BTreeMap;

use berth::agent_api::{ClaimRef, CreateVolumeRequest, PoolStatus, VolumeMode};
use berth::keys;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;

use crate::clone::{self, Found, Source};
use crate::params::{self, ClassParams, PvSource};
use crate::pv::{NODE_ANNOTATION, NodeRef};

/// What the controller knows of a node: its labels (None when the Node object is gone), its agent's pools
/// (None when it has no BerthNode, i.e. no agent), and whether the agent is stale (liveness.rs: its status has not
/// changed for `--agent-stale-after`, so its pools are not taken at their word).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub labels: Option<BTreeMap<String, String>>,
    pub pools: Option<Vec<PoolStatus>>,
    pub stale: bool,
}

impl NodeView {
    fn hostname(&self) -> Option<&str> {
        self.labels.as_ref()?.get(keys::HOSTNAME_LABEL).map(String::as_str)
    }

    fn pool(&self, name: &str) -> Option<&PoolStatus> {
        self.pools.as_ref()?.iter().find(|p| p.name == name)
    }
}

/// When a refused claim is worth looking at again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Only when the claim, its class, or the nodes and agents change: nothing else can fix it.
    OnChange,
    /// With backoff: the condition may pass by itself (space freed, an agent returning).
    Backoff,
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant, reason = "one decision per reconcile, never stored in bulk")]
pub enum Decision {
    /// Not a claim of this provisioner.
    NotOurs,
    /// Bound, being deleted, or its PV exists: nothing to provision.
    Done,
    /// WaitForFirstConsumer and the scheduler has not picked a node yet.
    WaitForScheduler,
    /// A `ProvisioningFailed` event with `message`, nothing created.
    Refuse { message: String, retry: Retry },
    /// The class's parameters are wrong: reported on the claim and on the class, looked at again when it changes.
    InvalidClass { message: String },
    /// The selected node cannot take the volume: event, then remove `selected-node`.
    Reschedule { message: String },
    /// A clone, and the scheduler selected a node other than its source's: as `Reschedule`, but a repeat waits
    /// with backoff (the scheduler does not know where the source is, and may pick the same node again).
    CloneElsewhere { message: String },
    /// Ask `node`'s agent for the volume, then create the PV. `abandon`: the node an earlier attempt chose (the
    /// claim's `local.berth.dev/node`), whose agent may hold a volume for the claim that must go first.
    Provision { node: NodeRef, params: ClassParams, request: CreateVolumeRequest, abandon: Option<String> },
}

/// Why a stale agent's node is not used.
const STALE: &str = "its Berth agent has not updated its status for longer than the controller's --agent-stale-after \
     (is it running?)";

fn refuse(message: impl Into<String>, retry: Retry) -> Decision {
    Decision::Refuse { message: message.into(), retry }
}

/// The node on which an earlier attempt asked for the claim's volume (`local.berth.dev/node`, written on the claim
/// before the agent is called): the only node that may hold a volume for the claim without a PV.
pub fn recorded_node(claim: &PersistentVolumeClaim) -> Option<&str> {
    claim.metadata.annotations.as_ref()?.get(NODE_ANNOTATION).map(String::as_str).filter(|n| !n.is_empty())
}

/// The provisioner a claim is for: the GA annotation, else the beta one.
pub fn claim_provisioner(claim: &PersistentVolumeClaim) -> Option<&str> {
    let annotations = claim.metadata.annotations.as_ref()?;
    annotations
        .get(keys::STORAGE_PROVISIONER)
        .or_else(|| annotations.get(keys::STORAGE_PROVISIONER_BETA))
        .map(String::as_str)
}

/// `source`: what the reconciler found of the claim's clone source, if it names one (clone.rs).
pub fn decide(
    provisioner: &str,
    claim: &PersistentVolumeClaim,
    class: Option<&StorageClass>,
    pv_exists: bool,
    nodes: &[NodeView],
    source: Found<'_>,
) -> Decision {
    // A claim of one of Berth's classes that kube-controller-manager has not handed over yet (a WaitForFirstConsumer
    // claim before the scheduler picked a node — which it never does when Berth publishes no capacity for the class)
    // is looked at only to explain what is wrong with it: it is provisioned only once handed over.
    let explain_only = match claim_provisioner(claim) {
        Some(p) if p == provisioner => false,
        Some(_) => return Decision::NotOurs,
        None if class.is_some_and(|c| c.provisioner == provisioner) => true,
        None => return Decision::NotOurs,
    };
    let decision = decide_ours(provisioner, claim, class, pv_exists, nodes, source);
    if !explain_only {
        return decision;
    }
    match decision {
        Decision::Refuse { retry: Retry::OnChange, .. } | Decision::InvalidClass { .. } => decision,
        Decision::Done => Decision::NotOurs,
        _ => Decision::WaitForScheduler,
    }
}

fn decide_ours(
    provisioner: &str,
    claim: &PersistentVolumeClaim,
    class: Option<&StorageClass>,
    pv_exists: bool,
    nodes: &[NodeView],
    found: Found<'_>,
) -> Decision {
    let spec = claim.spec.clone().unwrap_or_default();
    if claim.metadata.deletion_timestamp.is_some() || spec.volume_name.is_some() || pv_exists {
        return Decision::Done;
    }
    let Some(class) = class else {
        let name = spec.storage_class_name.as_deref().unwrap_or("");
        return refuse(format!("StorageClass {name:?} not found"), Retry::OnChange);
    };
    let params = match params::parse(class.parameters.as_ref()) {
        Ok(p) => p,
        Err(e) => {
            let name = class.metadata.name.as_deref().unwrap_or_default();
            return Decision::InvalidClass { message: format!("StorageClass {name:?}: {e}") };
        }
    };
    // What Berth cannot serve is refused whole rather than half-served.
    let source = match clone::source_name(claim) {
        None => None,
        Some(Err(why)) => return refuse(why, Retry::OnChange),
        Some(Ok(name)) => match clone::source(provisioner, &name, found) {
            Ok(source) => Some(source),
            Err(unusable) => return refuse(unusable.message, unusable.retry),
        },
    };
    if spec.volume_attributes_class_name.as_deref().is_some_and(|n| !n.is_empty()) {
        return refuse(
            "Berth does not support VolumeAttributesClasses (spec.volumeAttributesClassName): the volume would not \
             have the attributes asked for",
            Retry::OnChange,
        );
    }
    if spec.selector.is_some() {
        return refuse(
            "claims with a selector bind to existing PVs; Berth does not provision for them",
            Retry::OnChange,
        );
    }
    let modes = spec.access_modes.clone().unwrap_or_default();
    if let Some(shared) = modes.iter().find(|m| *m == "ReadWriteMany" || *m == "ReadOnlyMany") {
        return refuse(
            format!("access mode {shared}: a node-local volume is reachable from one node only"),
            Retry::OnChange,
        );
    }
    let block = spec.volume_mode.as_deref() == Some("Block");
    if params.pv_source == PvSource::HostPath {
        if block {
            return refuse(
                "volumeMode Block needs pvSource \"local\": hostPath PVs cannot be raw block devices",
                Retry::OnChange,
            );
        }
        if class.mount_options.as_ref().is_some_and(|o| !o.is_empty()) {
            return refuse(
                "mountOptions on a class with pvSource \"hostPath\": kubelet refuses mount options on hostPath PVs",
                Retry::OnChange,
            );
        }
    }
    let requested = spec.resources.as_ref().and_then(|r| r.requests.as_ref()).and_then(|r| r.get("storage"));
    let size = match requested.map(|q| berth::quantity::bytes(&q.0)) {
        Some(Ok(n)) if n > 0 => n,
        Some(Ok(_)) => return refuse("requested storage is 0", Retry::OnChange),
        Some(Err(e)) => return refuse(format!("requested storage: {e}"), Retry::OnChange),
        None => return refuse("the claim requests no storage (spec.resources.requests.storage)", Retry::OnChange),
    };
    let (namespace, name) =
        (claim.metadata.namespace.clone().unwrap_or_default(), claim.metadata.name.clone().unwrap_or_default());
    let mut request = CreateVolumeRequest {
        pool: params.pool.clone(),
        size_bytes: size,
        volume_mode: if block { VolumeMode::Block } else { VolumeMode::Filesystem },
        claim: ClaimRef { namespace, name },
        uid: params.uid,
        gid: params.gid,
        mode: params.mode,
        // A raw block volume has no filesystem: the class's fsType does not apply to it (the agent refuses one),
        // so one class serves both volume modes, as fsType does for CSI drivers.
        fs_type: if block { None } else { params.fs_type.clone() },
        mount_options: vec![],
        source: None,
    };
    if let Some(source) = source {
        let (class_name, mode) =
            (class.metadata.name.as_deref().unwrap_or_default(), if block { "Block" } else { "Filesystem" });
        if let Some(why) = clone::mismatch(&source, class_name, &params.pool, size, mode) {
            return refuse(why, Retry::OnChange);
        }
        request.source = Some(source.volume.clone());
        return place_clone(claim, class, params, request, &source, nodes);
    }
    let pool_anywhere = nodes.iter().any(|n| n.pool(&params.pool).is_some());
    if !pool_anywhere {
        return refuse(format!("pool {:?} exists on no node (no agent reports it)", params.pool), Retry::OnChange);
    }
    if let Some(why) = served_nowhere(&params, block, size, nodes) {
        return refuse(why, Retry::OnChange);
    }
    let need = Need { pool: &params.pool, block, size };

    if class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer") {
        let selected = claim.metadata.annotations.as_ref().and_then(|a| a.get(keys::SELECTED_NODE));
        let Some(selected) = selected else { return Decision::WaitForScheduler };
        return match fit(nodes.iter().find(|n| &n.name == selected), &need) {
            Ok(fit) => provision(claim, fit, class, params, request),
            Err(why) => Decision::Reschedule {
                message: format!("node {selected}: {}; asking the scheduler for another node", why.explain(&need)),
            },
        };
    }

    // Immediate binding: Berth picks the node — the most free space in the pool among the allowed nodes, ties
    // broken by node name so every replica and every retry picks the same one.
    let allowed = |n: &NodeView| match (&class.allowed_topologies, &n.labels) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(terms), Some(labels)) => {
            terms.is_empty()
                || terms.iter().any(|term| {
                    term.match_label_expressions.as_ref().is_none_or(|exprs| {
                        exprs.iter().all(|e| labels.get(&e.key).is_some_and(|v| e.values.contains(v)))
                    })
                })
        }
    };
    // An earlier attempt chose a node: stay there while it can serve the pool, whatever its free space says now
    // (the volume may already be there, counted in it), so room is not asked of it. Moving would make a second
    // volume.
    let regardless_of_room = Need { size: 0, ..need };
    let stay = recorded_node(claim)
        .and_then(|r| nodes.iter().find(|n| n.name == r))
        .filter(|n| allowed(n))
        .and_then(|n| fit(Some(n), &regardless_of_room).ok());
    if let Some(fit) = stay {
        return provision(claim, fit, class, params, request);
    }
    let best = nodes
        .iter()
        .filter(|n| allowed(n))
        .filter_map(|n| fit(Some(n), &need).ok())
        .max_by(|a, b| a.pool.free_bytes.cmp(&b.pool.free_bytes).then_with(|| b.node.name.cmp(&a.node.name)));
    match best {
        Some(fit) => provision(claim, fit, class, params, request),
        None if nodes.iter().filter(|n| n.pool(&params.pool).is_some()).all(|n| n.stale) => {
            refuse(format!("pool {:?} is only on nodes whose agents are stale: {STALE}", params.pool), Retry::Backoff)
        }
        None => refuse(format!("no allowed node has {size} bytes free in pool {:?}", params.pool), Retry::Backoff),
    }
}

/// A clone is made where its source is, by that node's agent: with Immediate binding Berth goes there; with
/// WaitForFirstConsumer the scheduler must have chosen that node (it does not know where the source is), or it is
/// asked again. A node that cannot take the clone now is waited for, not left: no other node can make it.
fn place_clone(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    params: ClassParams,
    request: CreateVolumeRequest,
    source: &Source,
    nodes: &[NodeView],
) -> Decision {
    let node = nodes.iter().find(|n| n.name == source.node);
    if class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer") {
        let selected = claim.metadata.annotations.as_ref().and_then(|a| a.get(keys::SELECTED_NODE));
        match selected {
            None => return Decision::WaitForScheduler,
            Some(s) if *s != source.node => {
                return Decision::CloneElsewhere {
                    message: clone::elsewhere_message(source, node.and_then(NodeView::hostname)),
                };
            }
            Some(_) => {}
        }
    }
    let block = request.volume_mode == VolumeMode::Block;
    let need = Need { pool: &params.pool, block, size: request.size_bytes };
    match fit(node, &need) {
        Ok(fit) => provision(claim, fit, class, params, request),
        Err(why) => {
            refuse(format!("the clone's source is on node {}, and {}", source.node, why.explain(&need)), why.retry())
        }
    }
}

/// What a volume asks of the node that makes it.
#[derive(Debug, Clone, Copy)]
struct Need<'a> {
    pool: &'a str,
    block: bool,
    size: u64,
}

/// A node that can take a volume: where to send it, and its pool there.
#[derive(Debug)]
struct Fit<'n> {
    node: NodeRef,
    pool: &'n PoolStatus,
}

/// Why a node cannot take a volume now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Unfit {
    /// Neither a Node object nor a Berth agent of that name.
    NoNode,
    /// A Berth agent, but no Node object (so no hostname to pin a PV to).
    NoNodeObject,
    NoAgent,
    Stale,
    NoPool,
    /// Raw block asked of a hostpath pool: only lvm pools make block devices.
    HostpathForBlock,
    NotReady {
        reason: Option<String>,
    },
    TooSmall {
        max: u64,
    },
}

impl Unfit {
    /// Whether it may pass by itself (an agent heard from again, a pool made ready, room freed), so is worth
    /// looking at again with backoff; the rest needs the nodes or agents to change.
    fn retry(&self) -> Retry {
        match self {
            Unfit::Stale | Unfit::NotReady { .. } | Unfit::TooSmall { .. } => Retry::Backoff,
            Unfit::NoNode | Unfit::NoNodeObject | Unfit::NoAgent | Unfit::NoPool | Unfit::HostpathForBlock => {
                Retry::OnChange
            }
        }
    }

    /// What to say of the node, for the volume `need` describes (the words follow "node N:" or "…, and").
    fn explain(&self, need: &Need<'_>) -> String {
        let pool = need.pool;
        match self {
            Unfit::NoNode => "there is no such node".into(),
            Unfit::NoNodeObject => "its Node object is gone".into(),
            Unfit::NoAgent => "no Berth agent runs there".into(),
            Unfit::Stale => STALE.into(),
            Unfit::NoPool => format!("it has no pool {pool:?}"),
            Unfit::HostpathForBlock => format!("pool {pool:?} there is a hostpath pool; raw block needs lvm"),
            Unfit::NotReady { reason } => {
                format!("pool {pool:?} there is not ready ({})", reason.as_deref().unwrap_or("no reason given"))
            }
            Unfit::TooSmall { max } => {
                format!("pool {pool:?} there can take at most {max} bytes now, the claim asks for {}", need.size)
            }
        }
    }
}

/// Whether `node` (None: no node of that name is known) can take the volume `need` describes now: the node and
/// pool to ask, or why not. The one answer for every placement — the scheduler's node, a clone's source's node,
/// Immediate's candidates — so they never disagree about a node.
fn fit<'n>(node: Option<&'n NodeView>, need: &Need<'_>) -> Result<Fit<'n>, Unfit> {
    let node = node.ok_or(Unfit::NoNode)?;
    let hostname = node.hostname().ok_or(Unfit::NoNodeObject)?;
    if node.pools.is_none() {
        return Err(Unfit::NoAgent);
    }
    // A stale agent's pools are not taken at their word.
    if node.stale {
        return Err(Unfit::Stale);
    }
    let pool = node.pool(need.pool).ok_or(Unfit::NoPool)?;
    if need.block && pool.backend == "hostpath" {
        return Err(Unfit::HostpathForBlock);
    }
    if !pool.ready {
        return Err(Unfit::NotReady { reason: pool.reason.clone() });
    }
    if pool.maximum_volume_size_bytes < need.size {
        return Err(Unfit::TooSmall { max: pool.maximum_volume_size_bytes });
    }
    Ok(Fit { node: NodeRef { name: node.name.clone(), hostname: hostname.to_owned() }, pool })
}

/// Provision the claim on the node `fit` found. An earlier attempt's node other than this one is abandoned: its
/// agent may hold a volume of the claim, which goes first.
fn provision(
    claim: &PersistentVolumeClaim,
    fit: Fit<'_>,
    class: &StorageClass,
    params: ClassParams,
    request: CreateVolumeRequest,
) -> Decision {
    let abandon = recorded_node(claim).filter(|r| *r != fit.node.name).map(str::to_owned);
    Decision::Provision { request: for_pool(request, fit.pool, class), node: fit.node, params, abandon }
}

/// Why no node that has the pool can ever serve this claim, whatever the scheduler picks: then the claim is
/// refused once, instead of being sent from node to node. (Nodes appearing or changing bring it back.)
fn served_nowhere(params: &ClassParams, block: bool, size: u64, nodes: &[NodeView]) -> Option<String> {
    let pool = &params.pool;
    let lvm_somewhere = nodes.iter().filter_map(|n| n.pool(pool)).any(|p| p.backend != "hostpath");
    if block && !lvm_somewhere {
        return Some(format!(
            "volumeMode Block needs an lvm pool, and pool {pool:?} is a hostpath pool on every node that has it"
        ));
    }
    if !block && let Some(fs) = &params.fs_type {
        if !lvm_somewhere {
            return Some(format!(
                "fsType {fs:?}: only lvm pools make filesystems, and pool {pool:?} is a hostpath pool on every node \
                 that has it (remove fsType from the class, or use an lvm pool)"
            ));
        }
        if fs == "xfs" && size < berth::agent_api::XFS_MIN_BYTES {
            return Some(format!(
                "an xfs filesystem needs at least {} bytes (mkfs.xfs refuses smaller); the claim asks for {size}",
                berth::agent_api::XFS_MIN_BYTES
            ));
        }
    }
    None
}

/// An lvm pool makes and mounts the filesystem of a `Filesystem` volume itself, so the class's mount options go to
/// the agent's mount (and not onto the PV, see pv.rs); other pools' volumes are mounted by kubelet with them.
fn for_pool(mut request: CreateVolumeRequest, pool: &PoolStatus, class: &StorageClass) -> CreateVolumeRequest {
    if pool.backend == "lvm" && request.volume_mode == VolumeMode::Filesystem {
        request.mount_options = class.mount_options.clone().unwrap_or_default();
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        PersistentVolumeClaimSpec, TypedLocalObjectReference, VolumeResourceRequirements,
    };
    use k8s_openapi::api::core::v1::{TopologySelectorLabelRequirement, TopologySelectorTerm};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use kube::api::ObjectMeta;

    const P: &str = "local.berth.dev";
    const GI: u64 = 1 << 30;

    /// A claim that names no clone source.
    fn decide(
        provisioner: &str,
        claim: &PersistentVolumeClaim,
        class: Option<&StorageClass>,
        pv_exists: bool,
        nodes: &[NodeView],
    ) -> Decision {
        super::decide(provisioner, claim, class, pv_exists, nodes, Found::default())
    }

    fn claim(size: &str, selected: Option<&str>) -> PersistentVolumeClaim {
        let mut annotations = BTreeMap::from([(keys::STORAGE_PROVISIONER.to_string(), P.to_string())]);
        if let Some(node) = selected {
            annotations.insert(keys::SELECTED_NODE.into(), node.into());
        }
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("data".into()),
                namespace: Some("db".into()),
                uid: Some("0f8e3c1a-5b2d-4c7e-9a10-2b3c4d5e6f70".into()),
                annotations: Some(annotations),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: Some("berth".into()),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([("storage".into(), Quantity(size.into()))])),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn class(mode: &str, params: &[(&str, &str)]) -> StorageClass {
        StorageClass {
            metadata: ObjectMeta { name: Some("berth".into()), ..Default::default() },
            provisioner: P.into(),
            volume_binding_mode: Some(mode.into()),
            parameters: Some(params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        }
    }

    fn pool(name: &str, free: u64) -> PoolStatus {
        PoolStatus {
            name: name.into(),
            backend: "hostpath".into(),
            ready: true,
            reason: None,
            capacity_bytes: 100 * GI,
            allocated_bytes: 0,
            free_bytes: free,
            maximum_volume_size_bytes: free,
            volumes: 0,
            enforcement: "none".into(),
            enforcement_reason: None,
        }
    }

    fn node(name: &str, pools: Option<Vec<PoolStatus>>) -> NodeView {
        let labels = BTreeMap::from([
            (keys::HOSTNAME_LABEL.to_string(), format!("host-{name}")),
            ("zone".to_string(), format!("zone-{name}")),
        ]);
        NodeView { name: name.into(), labels: Some(labels), pools, stale: false }
    }

    fn wffc() -> StorageClass {
        class("WaitForFirstConsumer", &[("pool", "fast")])
    }

    fn provisioned_on(d: &Decision) -> Option<(&str, &str)> {
        match d {
            Decision::Provision { node, .. } => Some((node.name.as_str(), node.hostname.as_str())),
            _ => None,
        }
    }

    #[test]
    fn wffc_waits_for_the_scheduler_then_provisions_on_the_selected_node() {
        let nodes = [node("a", Some(vec![pool("fast", 50 * GI)])), node("b", Some(vec![pool("fast", 80 * GI)]))];
        assert_eq!(decide(P, &claim("10Gi", None), Some(&wffc()), false, &nodes), Decision::WaitForScheduler);
        let d = decide(P, &claim("10Gi", Some("a")), Some(&wffc()), false, &nodes);
        assert_eq!(provisioned_on(&d), Some(("a", "host-a")), "{d:?}");
        let Decision::Provision { request, .. } = d else { unreachable!() };
        assert_eq!((request.pool.as_str(), request.size_bytes), ("fast", 10 * GI));
        assert_eq!(request.claim, ClaimRef { namespace: "db".into(), name: "data".into() });
    }

    #[test]
    fn mount_options_go_to_an_lvm_pools_agent_and_fs_type_always_travels() {
        let mut class = class("WaitForFirstConsumer", &[("pool", "fast"), ("fsType", "xfs")]);
        class.mount_options = Some(vec!["noatime".into()]);
        let lvm = PoolStatus { backend: "lvm".into(), ..pool("fast", 50 * GI) };
        let on = |p: PoolStatus| {
            // b has an lvm pool of that name, so the class can be served somewhere.
            let nodes = [node("a", Some(vec![p])), node("b", Some(vec![lvm.clone()]))];
            let d = decide(P, &claim("10Gi", Some("a")), Some(&class), false, &nodes);
            let Decision::Provision { request, .. } = d else { panic!("{d:?}") };
            request
        };
        let to_lvm = on(lvm.clone());
        assert_eq!((to_lvm.fs_type.as_deref(), to_lvm.mount_options), (Some("xfs"), vec!["noatime".to_string()]));
        // A hostpath pool's volume is mounted by kubelet, with the options from the PV.
        assert_eq!(on(pool("fast", 50 * GI)).mount_options, Vec::<String>::new());
    }

    #[test]
    fn a_block_claim_of_a_class_with_a_filesystem_gets_a_raw_volume() {
        let mut class = class("WaitForFirstConsumer", &[("pool", "fast"), ("fsType", "xfs")]);
        class.mount_options = Some(vec!["noatime".into()]);
        let lvm = PoolStatus { backend: "lvm".into(), ..pool("fast", 50 * GI) };
        let mut c = claim("64Mi", Some("a"));
        c.spec.as_mut().unwrap().volume_mode = Some("Block".into());
        let d = decide(P, &c, Some(&class), false, &[node("a", Some(vec![lvm]))]);
        let Decision::Provision { request, .. } = d else { panic!("{d:?}") };
        assert_eq!(request.volume_mode, VolumeMode::Block);
        assert_eq!((request.fs_type, request.mount_options), (None, vec![]), "no filesystem, no mount options");
    }

    #[test]
    fn not_ours_bound_or_already_provisioned_is_left_alone() {
        let nodes = [node("a", Some(vec![pool("fast", 50 * GI)]))];
        let mut other = claim("1Gi", Some("a"));
        other
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(keys::STORAGE_PROVISIONER.into(), "rancher.io/local-path".into());
        assert_eq!(decide(P, &other, Some(&wffc()), false, &nodes), Decision::NotOurs);
        let mut beta = claim("1Gi", Some("a"));
        let a = beta.metadata.annotations.as_mut().unwrap();
        a.remove(keys::STORAGE_PROVISIONER);
        a.insert(keys::STORAGE_PROVISIONER_BETA.into(), P.into());
        assert!(
            provisioned_on(&decide(P, &beta, Some(&wffc()), false, &nodes)).is_some(),
            "the beta key is a fallback"
        );
        assert_eq!(decide(P, &claim("1Gi", Some("a")), Some(&wffc()), true, &nodes), Decision::Done);
    }

    #[test]
    fn the_selected_node_that_cannot_take_it_means_reschedule() {
        let nodes = [
            node("full", Some(vec![pool("fast", GI)])),
            node("no-agent", None),
            node("other-pool", Some(vec![pool("slow", 99 * GI)])),
            node(
                "down",
                Some(vec![PoolStatus { ready: false, reason: Some("marker missing".into()), ..pool("fast", 0) }]),
            ),
            NodeView { name: "gone".into(), labels: None, pools: Some(vec![pool("fast", 99 * GI)]), stale: false },
        ];
        for selected in ["full", "no-agent", "other-pool", "down", "gone", "never-existed"] {
            let d = decide(P, &claim("10Gi", Some(selected)), Some(&wffc()), false, &nodes);
            assert!(matches!(&d, Decision::Reschedule { message } if message.contains(selected)), "{selected}: {d:?}");
        }
    }

    #[test]
    fn a_pool_that_exists_nowhere_is_final_not_a_reschedule_loop() {
        let nodes = [node("a", Some(vec![pool("fast", 50 * GI)]))];
        let typo = class("WaitForFirstConsumer", &[("pool", "fsat")]);
        let d = decide(P, &claim("1Gi", Some("a")), Some(&typo), false, &nodes);
        assert!(
            matches!(&d, Decision::Refuse { retry: Retry::OnChange, message } if message.contains("fsat")),
            "{d:?}"
        );
    }

    #[test]
    fn what_berth_cannot_serve_is_refused() {
        let nodes = [node("a", Some(vec![pool("fast", 50 * GI)]))];
        let mut cases: Vec<(PersistentVolumeClaim, StorageClass, &str)> = Vec::new();
        let mut c = claim("1Gi", Some("a"));
        c.spec.as_mut().unwrap().data_source = Some(TypedLocalObjectReference {
            kind: "VolumeSnapshot".into(),
            name: "src".into(),
            api_group: Some("snapshot.storage.k8s.io".into()),
        });
        cases.push((c, wffc(), "VolumeSnapshot"));
        let mut c = claim("1Gi", Some("a"));
        c.spec.as_mut().unwrap().selector = Some(Default::default());
        cases.push((c, wffc(), "selector"));
        let mut c = claim("1Gi", Some("a"));
        c.spec.as_mut().unwrap().access_modes = Some(vec!["ReadWriteMany".into()]);
        cases.push((c, wffc(), "ReadWriteMany"));
        let mut c = claim("1Gi", Some("a"));
        c.spec.as_mut().unwrap().volume_mode = Some("Block".into());
        cases.push((c, class("WaitForFirstConsumer", &[("pool", "fast"), ("pvSource", "hostPath")]), "Block"));
        let mut hp = class("WaitForFirstConsumer", &[("pool", "fast"), ("pvSource", "hostPath")]);
        hp.mount_options = Some(vec!["noatime".into()]);
        cases.push((claim("1Gi", Some("a")), hp, "mountOptions"));
        cases.push((
            claim("1Gi", Some("a")),
            class("WaitForFirstConsumer", &[("pool", "fast"), ("size", "1")]),
            "size",
        ));
        cases.push((claim("0", Some("a")), wffc(), "0"));
        cases.push((claim("5m", Some("a")), wffc(), "milli"));
        let mut c = claim("1Gi", Some("a"));
        c.spec.as_mut().unwrap().volume_attributes_class_name = Some("gold".into());
        cases.push((c, wffc(), "VolumeAttributesClass"));
        for (c, cl, what) in cases {
            let d = decide(P, &c, Some(&cl), false, &nodes);
            assert!(
                matches!(&d, Decision::Refuse { message, .. } | Decision::InvalidClass { message } if message.contains(what)),
                "{what}: {d:?}"
            );
        }
        assert!(matches!(decide(P, &claim("1Gi", Some("a")), None, false, &nodes), Decision::Refuse { .. }));
        // Raw block on a hostpath pool reschedules when an lvm pool of that name is elsewhere.
        let lvm = PoolStatus { backend: "lvm".into(), ..pool("fast", 50 * GI) };
        let mixed = [node("a", Some(vec![pool("fast", 50 * GI)])), node("b", Some(vec![lvm]))];
        let mut c = claim("1Gi", Some("a"));
        c.spec.as_mut().unwrap().volume_mode = Some("Block".into());
        assert!(matches!(decide(P, &c, Some(&wffc()), false, &mixed), Decision::Reschedule { .. }));
    }

    #[test]
    fn what_no_node_with_the_pool_can_serve_is_refused_once_not_rescheduled() {
        let nodes = [node("a", Some(vec![pool("fast", 50 * GI)])), node("b", Some(vec![pool("fast", 50 * GI)]))];
        let final_refusal = |d: &Decision, what: &str| matches!(d, Decision::Refuse { retry: Retry::OnChange, message } if message.contains(what));
        let mut block = claim("1Gi", Some("a"));
        block.spec.as_mut().unwrap().volume_mode = Some("Block".into());
        for class in [wffc(), class("Immediate", &[("pool", "fast")])] {
            let d = decide(P, &block, Some(&class), false, &nodes);
            assert!(final_refusal(&d, "hostpath pool on every node"), "{d:?}");
        }
        let xfs = class("WaitForFirstConsumer", &[("pool", "fast"), ("fsType", "xfs")]);
        let d = decide(P, &claim("1Gi", Some("a")), Some(&xfs), false, &nodes);
        assert!(final_refusal(&d, "only lvm pools make filesystems"), "{d:?}");
        let lvm = PoolStatus { backend: "lvm".into(), ..pool("fast", 50 * GI) };
        let lvm_nodes = [node("a", Some(vec![lvm]))];
        let d = decide(P, &claim("100Mi", Some("a")), Some(&xfs), false, &lvm_nodes);
        assert!(final_refusal(&d, "at least 300000000 bytes"), "{d:?}");
        assert!(provisioned_on(&decide(P, &claim("300Mi", Some("a")), Some(&xfs), false, &lvm_nodes)).is_some());
        // A raw block claim of an xfs class has no filesystem: the minimum does not apply.
        let mut small_block = claim("16Mi", Some("a"));
        small_block.spec.as_mut().unwrap().volume_mode = Some("Block".into());
        assert!(provisioned_on(&decide(P, &small_block, Some(&xfs), false, &lvm_nodes)).is_some());
    }

    fn unannounced(size: &str) -> PersistentVolumeClaim {
        let mut c = claim(size, None);
        c.metadata.annotations = None;
        c
    }

    #[test]
    fn a_claim_not_handed_over_yet_is_only_explained_never_provisioned() {
        let nodes = [node("a", Some(vec![pool("fast", 50 * GI)]))];
        // Nothing wrong: wait (for the scheduler, then kube-controller-manager's annotation).
        assert_eq!(decide(P, &unannounced("1Gi"), Some(&wffc()), false, &nodes), Decision::WaitForScheduler);
        let mut picked = unannounced("1Gi");
        picked.metadata.annotations = Some(BTreeMap::from([(keys::SELECTED_NODE.into(), "a".into())]));
        assert_eq!(decide(P, &picked, Some(&wffc()), false, &nodes), Decision::WaitForScheduler);
        // What no scheduling can fix is said at once.
        let typo = class("WaitForFirstConsumer", &[("pool", "fast"), ("poool", "x")]);
        let d = decide(P, &unannounced("1Gi"), Some(&typo), false, &nodes);
        assert!(matches!(&d, Decision::InvalidClass { message } if message.contains("poool")), "{d:?}");
        let nowhere = class("WaitForFirstConsumer", &[("pool", "nowhere")]);
        let d = decide(P, &unannounced("1Gi"), Some(&nowhere), false, &nodes);
        assert!(matches!(&d, Decision::Refuse { retry: Retry::OnChange, message } if message.contains("nowhere")));
        // Space is the scheduler's business here, not a refusal.
        assert_eq!(decide(P, &unannounced("900Gi"), Some(&wffc()), false, &nodes), Decision::WaitForScheduler);
        // Another provisioner's class, a bound claim: not ours.
        let mut other = wffc();
        other.provisioner = "rancher.io/local-path".into();
        assert_eq!(decide(P, &unannounced("1Gi"), Some(&other), false, &nodes), Decision::NotOurs);
        assert_eq!(decide(P, &unannounced("1Gi"), None, false, &nodes), Decision::NotOurs);
        assert_eq!(decide(P, &unannounced("1Gi"), Some(&wffc()), true, &nodes), Decision::NotOurs);
    }

    fn stale(mut n: NodeView) -> NodeView {
        n.stale = true;
        n
    }

    #[test]
    fn a_stale_agents_node_gets_nothing() {
        let nodes = [stale(node("a", Some(vec![pool("fast", 80 * GI)]))), node("b", Some(vec![pool("fast", 50 * GI)]))];
        let d = decide(P, &claim("10Gi", Some("a")), Some(&wffc()), false, &nodes);
        assert!(matches!(&d, Decision::Reschedule { message } if message.contains("agent-stale-after")), "{d:?}");
        let now = class("Immediate", &[("pool", "fast")]);
        assert_eq!(provisioned_on(&decide(P, &claim("10Gi", None), Some(&now), false, &nodes)), Some(("b", "host-b")));
        // An Immediate claim recorded on the stale node moves (and abandons it).
        let d = decide(P, &recorded(claim("10Gi", None), "a"), Some(&now), false, &nodes);
        assert_eq!((provisioned_on(&d), abandoned(&d)), (Some(("b", "host-b")), Some("a")), "{d:?}");
        let only_stale = [stale(node("a", Some(vec![pool("fast", 80 * GI)])))];
        let d = decide(P, &claim("10Gi", None), Some(&now), false, &only_stale);
        assert!(
            matches!(&d, Decision::Refuse { retry: Retry::Backoff, message } if message.contains("stale")),
            "{d:?}"
        );
    }

    #[test]
    fn immediate_picks_the_allowed_node_with_most_free_space_deterministically() {
        let now = class("Immediate", &[("pool", "fast")]);
        let nodes = [
            node("a", Some(vec![pool("fast", 50 * GI)])),
            node("b", Some(vec![pool("fast", 80 * GI)])),
            node("c", Some(vec![pool("fast", 80 * GI)])),
            node("d", Some(vec![pool("fast", 200 * GI), pool("slow", 0)])),
            NodeView { name: "e".into(), labels: None, pools: Some(vec![pool("fast", 900 * GI)]), stale: false },
        ];
        assert_eq!(provisioned_on(&decide(P, &claim("1Gi", None), Some(&now), false, &nodes)), Some(("d", "host-d")));
        let mut limited = now.clone();
        limited.allowed_topologies = Some(vec![TopologySelectorTerm {
            match_label_expressions: Some(vec![TopologySelectorLabelRequirement {
                key: "zone".into(),
                values: vec!["zone-a".into(), "zone-b".into(), "zone-c".into()],
            }]),
        }]);
        // b and c tie: the name decides, the same way every time.
        assert_eq!(
            provisioned_on(&decide(P, &claim("1Gi", None), Some(&limited), false, &nodes)),
            Some(("b", "host-b"))
        );
        let d = decide(P, &claim("100Gi", None), Some(&limited), false, &nodes);
        assert!(matches!(d, Decision::Refuse { retry: Retry::Backoff, .. }), "{d:?}");
    }

    fn recorded(mut c: PersistentVolumeClaim, node: &str) -> PersistentVolumeClaim {
        c.metadata.annotations.get_or_insert_default().insert(NODE_ANNOTATION.into(), node.into());
        c
    }

    fn abandoned(d: &Decision) -> Option<&str> {
        match d {
            Decision::Provision { abandon, .. } => abandon.as_deref(),
            _ => None,
        }
    }

    #[test]
    fn an_immediate_claim_stays_on_the_node_an_earlier_attempt_chose() {
        let now = class("Immediate", &[("pool", "fast")]);
        // The earlier attempt's volume counts in a's free space now: a fresh pick would take b.
        let nodes = [node("a", Some(vec![pool("fast", 40 * GI)])), node("b", Some(vec![pool("fast", 50 * GI)]))];
        let d = decide(P, &recorded(claim("10Gi", None), "a"), Some(&now), false, &nodes);
        assert_eq!((provisioned_on(&d), abandoned(&d)), (Some(("a", "host-a")), None), "{d:?}");
        // Also when the pool there reports less than the claim asks: the volume may already be there; the agent
        // answers (200 for the volume it has, 507 if it has none and no room).
        let full = [node("a", Some(vec![pool("fast", GI)])), node("b", Some(vec![pool("fast", 50 * GI)]))];
        let d = decide(P, &recorded(claim("10Gi", None), "a"), Some(&now), false, &full);
        assert_eq!(provisioned_on(&d), Some(("a", "host-a")), "{d:?}");
        // A recorded node that cannot serve the pool any more: another one, and the recorded one is abandoned.
        for gone in [
            node("a", None),
            node("a", Some(vec![pool("slow", 99 * GI)])),
            node("a", Some(vec![PoolStatus { ready: false, ..pool("fast", 99 * GI) }])),
            NodeView { name: "a".into(), labels: None, pools: Some(vec![pool("fast", 99 * GI)]), stale: false },
        ] {
            let nodes = [gone.clone(), node("b", Some(vec![pool("fast", 50 * GI)]))];
            let d = decide(P, &recorded(claim("10Gi", None), "a"), Some(&now), false, &nodes);
            assert_eq!((provisioned_on(&d), abandoned(&d)), (Some(("b", "host-b")), Some("a")), "{gone:?}: {d:?}");
        }
    }

    #[test]
    fn a_wffc_claim_moved_by_the_scheduler_abandons_its_earlier_node() {
        let nodes = [node("a", Some(vec![pool("fast", 50 * GI)])), node("b", Some(vec![pool("fast", 50 * GI)]))];
        let d = decide(P, &recorded(claim("10Gi", Some("b")), "a"), Some(&wffc()), false, &nodes);
        assert_eq!((provisioned_on(&d), abandoned(&d)), (Some(("b", "host-b")), Some("a")), "{d:?}");
        let d = decide(P, &recorded(claim("10Gi", Some("b")), "b"), Some(&wffc()), false, &nodes);
        assert_eq!((provisioned_on(&d), abandoned(&d)), (Some(("b", "host-b")), None), "{d:?}");
        let d = decide(P, &claim("10Gi", Some("b")), Some(&wffc()), false, &nodes);
        assert_eq!(abandoned(&d), None);
    }

    /// A clone of the Bound claim `prod` (1 GiB in pool `fast` of class `berth`, on node `a`).
    fn clone_of_prod(size: &str, selected: Option<&str>) -> PersistentVolumeClaim {
        let mut c = claim(size, selected);
        c.spec.as_mut().unwrap().data_source_ref = Some(k8s_openapi::api::core::v1::TypedObjectReference {
            kind: "PersistentVolumeClaim".into(),
            name: "prod".into(),
            ..Default::default()
        });
        c
    }

    fn prod() -> (PersistentVolumeClaim, k8s_openapi::api::core::v1::PersistentVolume) {
        let mut source = claim("1Gi", None);
        source.metadata.name = Some("prod".into());
        source.spec.as_mut().unwrap().volume_name = Some("pvc-prod".into());
        let mut pv = k8s_openapi::api::core::v1::PersistentVolume::default();
        pv.metadata.name = Some("pvc-prod".into());
        pv.metadata.annotations = Some(BTreeMap::from([
            (keys::PROVISIONED_BY.to_owned(), P.to_owned()),
            (NODE_ANNOTATION.to_owned(), "a".to_owned()),
        ]));
        pv.metadata.labels = Some(BTreeMap::from([(crate::pv::POOL_LABEL.to_owned(), "fast".to_owned())]));
        pv.spec = Some(k8s_openapi::api::core::v1::PersistentVolumeSpec {
            capacity: Some(BTreeMap::from([("storage".to_owned(), Quantity("1Gi".into()))])),
            storage_class_name: Some("berth".into()),
            volume_mode: Some("Filesystem".into()),
            ..Default::default()
        });
        (source, pv)
    }

    #[test]
    fn a_clone_goes_to_its_sources_node_and_pool_and_asks_for_its_volume() {
        let (source, pv) = prod();
        let found = Found { claim: Some(&source), pv: Some(&pv) };
        // Node b has more room: an Immediate claim without a source would go there.
        let nodes = [node("a", Some(vec![pool("fast", 5 * GI)])), node("b", Some(vec![pool("fast", 80 * GI)]))];
        let immediate = class("Immediate", &[("pool", "fast")]);
        let d = super::decide(P, &clone_of_prod("2Gi", None), Some(&immediate), false, &nodes, found);
        let Decision::Provision { node, request, .. } = &d else { panic!("{d:?}") };
        assert_eq!(
            (node.name.as_str(), request.source.as_deref(), request.size_bytes),
            ("a", Some("pvc-prod"), 2 * GI)
        );
        // WaitForFirstConsumer: nothing until the scheduler chose; the source's node is provisioned.
        let wait = super::decide(P, &clone_of_prod("1Gi", None), Some(&wffc()), false, &nodes, found);
        assert_eq!(wait, Decision::WaitForScheduler);
        let d = super::decide(P, &clone_of_prod("1Gi", Some("a")), Some(&wffc()), false, &nodes, found);
        assert_eq!(provisioned_on(&d), Some(("a", "host-a")));
        // Another node: asked again, with how to pin the pod, and the same words whichever node was chosen.
        let b = super::decide(P, &clone_of_prod("1Gi", Some("b")), Some(&wffc()), false, &nodes, found);
        let Decision::CloneElsewhere { message } = &b else { panic!("{b:?}") };
        assert!(message.contains("node a") && message.contains("kubernetes.io/hostname: host-a"), "{message}");
        let c = super::decide(P, &clone_of_prod("1Gi", Some("c")), Some(&wffc()), false, &nodes, found);
        assert_eq!(b, c);
    }

    #[test]
    fn a_clone_the_sources_node_cannot_make_now_waits_for_it_and_goes_nowhere_else() {
        let (source, pv) = prod();
        let found = Found { claim: Some(&source), pv: Some(&pv) };
        let immediate = class("Immediate", &[("pool", "fast")]);
        let full = [node("a", Some(vec![pool("fast", GI / 2)])), node("b", Some(vec![pool("fast", 80 * GI)]))];
        for (class, selected) in [(&immediate, None), (&wffc(), Some("a"))] {
            let d = super::decide(P, &clone_of_prod("1Gi", selected), Some(class), false, &full, found);
            assert!(
                matches!(&d, Decision::Refuse { message, retry: Retry::Backoff } if message.contains("node a")),
                "{d:?}"
            );
        }
        let mut stale = node("a", Some(vec![pool("fast", 5 * GI)]));
        stale.stale = true;
        let d = super::decide(P, &clone_of_prod("1Gi", None), Some(&immediate), false, &[stale], found);
        assert!(matches!(&d, Decision::Refuse { retry: Retry::Backoff, .. }), "{d:?}");
        let gone = [node("b", Some(vec![pool("fast", 80 * GI)]))];
        let d = super::decide(P, &clone_of_prod("1Gi", None), Some(&immediate), false, &gone, found);
        assert!(
            matches!(&d, Decision::Refuse { message, retry: Retry::OnChange } if message.contains("no such node")),
            "{d:?}"
        );
    }

    #[test]
    fn why_a_node_cannot_take_a_volume_is_checked_in_one_order_and_says_whether_waiting_helps() {
        let need = Need { pool: "fast", block: false, size: 10 * GI };
        let lvm = PoolStatus { backend: "lvm".into(), ..pool("fast", 50 * GI) };
        let a = node("a", Some(vec![lvm.clone()]));
        let taken = fit(Some(&a), &need).unwrap();
        assert_eq!((taken.node, taken.pool), (NodeRef { name: "a".into(), hostname: "host-a".into() }, &lvm));
        let no_labels =
            NodeView { name: "a".into(), labels: None, pools: Some(vec![pool("fast", 50 * GI)]), stale: false };
        let down = PoolStatus { ready: false, reason: Some("marker missing".into()), ..pool("fast", 0) };
        for (node, need, unfit, retry) in [
            (None, need, Unfit::NoNode, Retry::OnChange),
            (Some(no_labels), need, Unfit::NoNodeObject, Retry::OnChange),
            (Some(node("a", None)), need, Unfit::NoAgent, Retry::OnChange),
            // Staleness comes before anything the stale agent says of its pools.
            (Some(stale(node("a", Some(vec![])))), need, Unfit::Stale, Retry::Backoff),
            (Some(node("a", Some(vec![pool("slow", 50 * GI)]))), need, Unfit::NoPool, Retry::OnChange),
            (
                Some(node("a", Some(vec![down.clone()]))),
                Need { block: true, ..need },
                Unfit::HostpathForBlock,
                Retry::OnChange,
            ),
            (
                Some(node("a", Some(vec![down]))),
                need,
                Unfit::NotReady { reason: Some("marker missing".into()) },
                Retry::Backoff,
            ),
            (Some(node("a", Some(vec![pool("fast", GI)]))), need, Unfit::TooSmall { max: GI }, Retry::Backoff),
        ] {
            let why = fit(node.as_ref(), &need).unwrap_err();
            assert_eq!((&why, why.retry()), (&unfit, retry));
            assert!(!why.explain(&need).is_empty());
        }
        let full = Unfit::TooSmall { max: GI }.explain(&need);
        assert_eq!(
            full,
            format!("pool \"fast\" there can take at most {GI} bytes now, the claim asks for {}", 10 * GI)
        );
    }

    #[test]
    fn a_wffc_claim_and_a_clone_say_the_same_of_a_node_that_cannot_take_them() {
        let (source, pv) = prod();
        let found = Found { claim: Some(&source), pv: Some(&pv) };
        let down = PoolStatus { ready: false, reason: Some("marker missing".into()), ..pool("fast", 50 * GI) };
        let nodes = [node("a", Some(vec![down])), node("b", Some(vec![pool("fast", 80 * GI)]))];
        let d = decide(P, &claim("1Gi", Some("a")), Some(&wffc()), false, &nodes);
        let Decision::Reschedule { message: moved } = &d else { panic!("{d:?}") };
        let c = super::decide(P, &clone_of_prod("1Gi", Some("a")), Some(&wffc()), false, &nodes, found);
        let Decision::Refuse { message: waits, retry: Retry::Backoff } = &c else { panic!("{c:?}") };
        let why = "pool \"fast\" there is not ready (marker missing)";
        assert_eq!(moved, &format!("node a: {why}; asking the scheduler for another node"));
        assert_eq!(waits, &format!("the clone's source is on node a, and {why}"));
    }

    #[test]
    fn a_clone_of_another_class_a_smaller_size_or_a_missing_source_is_refused() {
        let (source, pv) = prod();
        let found = Found { claim: Some(&source), pv: Some(&pv) };
        let nodes = [node("a", Some(vec![pool("fast", 50 * GI), pool("slow", 50 * GI)]))];
        let mut other = class("WaitForFirstConsumer", &[("pool", "slow")]);
        other.metadata.name = Some("other".into());
        for (c, cl, f, says) in [
            (clone_of_prod("1Gi", Some("a")), other, found, "StorageClass"),
            (clone_of_prod("512Mi", Some("a")), wffc(), found, "at least as large"),
            (clone_of_prod("1Gi", Some("a")), wffc(), Found::default(), "does not exist"),
        ] {
            let d = super::decide(P, &c, Some(&cl), false, &nodes, f);
            assert!(matches!(&d, Decision::Refuse { message, .. } if message.contains(says)), "{says}: {d:?}");
        }
    }
}
