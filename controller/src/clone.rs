//! Clones: a claim whose `dataSource`/`dataSourceRef` names another claim gets a copy of that claim's volume, made
//! by the source's agent in the source's pool (a thin snapshot in an lvm thin pool; other pools refuse). What the
//! claim names and whether its source can be cloned are pure functions of the observed objects; the reconciler
//! looks the source up ([`lookup`]), `decide` places the clone on the source's node, and the claim read is the one
//! [`Copies::begin`] protects (the source is read once an attempt).
//!
//! While a clone is being made its source carries [`SOURCE_FINALIZER`], so that deleting the source waits until
//! the copy is over (as external-provisioner's cloning protection does). Only the leader makes clones, and the
//! agents refuse a deposed leader's calls, so the leader's own count of clones in flight ([`Copies`]) is the whole
//! truth: a finalizer found while none is in flight was left by a crash or a former leader, and is lifted.

use berth::keys;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use std::collections::HashMap;

use kube::api::{Api, Patch, PatchParams};

use crate::decide::Retry;
use crate::pv::NODE_ANNOTATION;

/// On a claim while a clone of it is being made: its deletion waits until the copy is done.
pub const SOURCE_FINALIZER: &str = "local.berth.dev/cloning-protection";

/// The source claim's name, when `claim` asks for a clone of a claim in its own namespace; `Err` with the reason
/// when it names a data source Berth cannot fill; `None` when it names none. `dataSourceRef` wins over
/// `dataSource` (the API server keeps the two equal where both can say it).
pub fn source_name(claim: &PersistentVolumeClaim) -> Option<Result<String, String>> {
    let spec = claim.spec.as_ref()?;
    let (group, kind, name, namespace) = match (&spec.data_source_ref, &spec.data_source) {
        (Some(r), _) => (r.api_group.as_deref(), r.kind.as_str(), r.name.as_str(), r.namespace.as_deref()),
        (None, Some(s)) => (s.api_group.as_deref(), s.kind.as_str(), s.name.as_str(), None),
        (None, None) => return None,
    };
    let own = claim.metadata.namespace.as_deref().unwrap_or_default();
    Some(match (group.unwrap_or_default(), kind) {
        ("", "PersistentVolumeClaim") if namespace.is_some_and(|n| n != own) => Err(format!(
            "the dataSource is a claim in namespace {:?}: Berth clones only claims of the clone's own namespace",
            namespace.unwrap_or_default()
        )),
        ("", "PersistentVolumeClaim") => Ok(name.to_owned()),
        ("snapshot.storage.k8s.io", "VolumeSnapshot") => {
            Err("the dataSource is a VolumeSnapshot: Berth is not a CSI driver, so it has no VolumeSnapshots; clone \
             the claim itself instead (dataSource kind PersistentVolumeClaim)"
                .to_owned())
        }
        (group, kind) => Err(format!(
            "Berth cannot fill a volume from a dataSource of kind {kind:?}{}: it clones claims only (dataSource kind \
             PersistentVolumeClaim); the volume would come back empty",
            if group.is_empty() { String::new() } else { format!(" (apiGroup {group:?})") }
        )),
    })
}

/// What the reconciler found of a clone's source: its claim (None: there is none) and that claim's PV.
#[derive(Debug, Clone, Copy, Default)]
pub struct Found<'a> {
    pub claim: Option<&'a PersistentVolumeClaim>,
    pub pv: Option<&'a PersistentVolume>,
}

/// A source that can be cloned: where its volume is and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub claim: String,
    /// The agent's name for the volume (its PV's name).
    pub volume: String,
    pub node: String,
    pub pool: String,
    pub class: String,
    pub size_bytes: u64,
    /// `Filesystem` or `Block`.
    pub volume_mode: String,
}

/// Why a source cannot be cloned now, and when to look again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unusable {
    pub message: String,
    pub retry: Retry,
}

fn unusable(message: String, retry: Retry) -> Unusable {
    Unusable { message, retry }
}

/// Whether the source `name` (in the clone's namespace) can be cloned by `provisioner`, from what was found of it.
pub fn source(provisioner: &str, name: &str, found: Found<'_>) -> Result<Source, Unusable> {
    let what = format!("the clone's source, claim {name:?},");
    // A source that does not exist yet, or is not bound yet, may be soon: looked at again with backoff.
    let Some(claim) = found.claim else { return Err(unusable(format!("{what} does not exist"), Retry::Backoff)) };
    if claim.metadata.deletion_timestamp.is_some() {
        return Err(unusable(format!("{what} is being deleted"), Retry::OnChange));
    }
    let Some(volume) = claim.spec.as_ref().and_then(|s| s.volume_name.clone()) else {
        return Err(unusable(format!("{what} is not Bound yet"), Retry::Backoff));
    };
    let Some(pv) = found.pv else {
        return Err(unusable(format!("{what} is bound to PV {volume:?}, which is not there (yet)"), Retry::Backoff));
    };
    let annotations = pv.metadata.annotations.clone().unwrap_or_default();
    let by = annotations.get(keys::PROVISIONED_BY).map(String::as_str).unwrap_or("nobody (a PV made by hand)");
    let node = annotations.get(NODE_ANNOTATION).filter(|n| !n.is_empty());
    let pool = pv.metadata.labels.as_ref().and_then(|l| l.get(crate::pv::POOL_LABEL));
    let (Some(node), Some(pool), true) = (node, pool, by == provisioner) else {
        return Err(unusable(
            format!("{what} has a volume provisioned by {by}, not by Berth: Berth clones only its own volumes"),
            Retry::OnChange,
        ));
    };
    let spec = pv.spec.clone().unwrap_or_default();
    let size = spec.capacity.as_ref().and_then(|c| c.get("storage")).map(|q| berth::quantity::bytes(&q.0));
    let Some(Ok(size_bytes)) = size else {
        return Err(unusable(format!("{what} has a PV without a readable capacity"), Retry::OnChange));
    };
    Ok(Source {
        claim: name.to_owned(),
        volume,
        node: node.clone(),
        pool: pool.clone(),
        class: spec.storage_class_name.unwrap_or_default(),
        size_bytes,
        volume_mode: spec.volume_mode.unwrap_or_else(|| "Filesystem".into()),
    })
}

/// Why `source` cannot be cloned into a claim of `class` (pool `pool`) of `size` bytes and mode `volume_mode`:
/// a clone is made by the source's agent in the source's pool, from a volume of the same kind.
pub fn mismatch(source: &Source, class: &str, pool: &str, size: u64, volume_mode: &str) -> Option<String> {
    let what = format!("the clone's source, claim {:?},", source.claim);
    if source.class != class {
        return Some(format!(
            "{what} is of StorageClass {:?}; a clone must be of its source's class ({class:?} asked)",
            source.class
        ));
    }
    if source.pool != pool {
        return Some(format!("{what} is in pool {:?}; a clone is made in its source's pool ({pool:?})", source.pool));
    }
    if size < source.size_bytes {
        return Some(format!(
            "{what} has {} bytes; a clone is at least as large as its source (the claim asks for {size})",
            source.size_bytes
        ));
    }
    if source.volume_mode != volume_mode {
        return Some(format!("{what} is a {} volume; the claim asks for {volume_mode}", source.volume_mode));
    }
    None
}

/// The clone must go where its source is, and the scheduler chose `selected`: what the claim's event says. It names
/// only the source's node (not the node chosen), so that repeats publish the same event once.
pub fn elsewhere_message(source: &Source, hostname: Option<&str>) -> String {
    let pin = match hostname {
        Some(h) => format!("e.g. nodeSelector {{{}: {h}}}", keys::HOSTNAME_LABEL),
        None => "a nodeSelector or node affinity".to_owned(),
    };
    format!(
        "a clone is made on its source's node, and the source, claim {:?}, is on node {}; the scheduler chose \
         another node for the pod, so it is asked again: pin the pod that uses this claim to node {} ({pin})",
        source.claim, source.node, source.node
    )
}

/// Reads the source claim (from the API server: the decision to copy it must not rest on a stale cache) and its PV
/// from `volumes`. The claim read is also what [`Copies::begin`] protects, guarded by its uid.
pub async fn lookup(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    volumes: &kube::runtime::reflector::Store<PersistentVolume>,
) -> Result<(Option<PersistentVolumeClaim>, Option<std::sync::Arc<PersistentVolume>>), kube::Error> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let claim = claims.get_opt(name).await?;
    let pv = claim
        .as_ref()
        .and_then(|c| c.spec.as_ref()?.volume_name.clone())
        .and_then(|v| volumes.get(&kube::runtime::reflector::ObjectRef::new(&v)));
    Ok((claim, pv))
}

/// The clones being made now, by source claim (namespace, name). Taking the lock serialises every change of a
/// source's finalizer with the count it follows from.
#[derive(Default)]
pub struct Copies {
    in_flight: tokio::sync::Mutex<HashMap<(String, String), usize>>,
}

impl Copies {
    /// Counts a clone of `source` (the claim as the reconciler read it for the decision, not read again) as in
    /// flight and puts [`SOURCE_FINALIZER`] on it, then returns the source as it is now. `Ok(None)` (nothing
    /// counted): the source is gone, was made again (not `uid`), or is being deleted (the API server refuses new
    /// finalizers then): no copy may start. Every `Ok(Some)` is followed by one [`Copies::end`].
    pub async fn begin(
        &self,
        client: &kube::Client,
        source: &PersistentVolumeClaim,
        uid: Option<&str>,
    ) -> Result<Option<PersistentVolumeClaim>, kube::Error> {
        let mut in_flight = self.in_flight.lock().await;
        let protected = protect(client, source, uid).await?;
        if protected.is_some() {
            let meta = &source.metadata;
            let key = (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default());
            *in_flight.entry(key).or_default() += 1;
        }
        Ok(protected)
    }

    /// A clone of `namespace/name` is over (made, refused or failed): the source's finalizer is lifted when it was
    /// the last in flight.
    pub async fn end(&self, client: &kube::Client, namespace: &str, name: &str) -> Result<(), kube::Error> {
        let mut in_flight = self.in_flight.lock().await;
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(n) = in_flight.get_mut(&key) {
            *n -= 1;
            if *n > 0 {
                return Ok(());
            }
            in_flight.remove(&key);
        }
        lift(client, namespace, name).await
    }

    /// Lifts the finalizer of `namespace/name` if no clone of it is in flight here: what a crash or a former leader
    /// left.
    pub async fn sweep(&self, client: &kube::Client, namespace: &str, name: &str) -> Result<(), kube::Error> {
        let in_flight = self.in_flight.lock().await;
        if in_flight.contains_key(&(namespace.to_owned(), name.to_owned())) {
            return Ok(());
        }
        lift(client, namespace, name).await
    }
}

/// Puts [`SOURCE_FINALIZER`] on `source` if it is still the claim read, with the patch [`protect_patch`] makes:
/// the claim as it is then, or `None` when it is not (gone, made again, being deleted).
async fn protect(
    client: &kube::Client,
    source: &PersistentVolumeClaim,
    uid: Option<&str>,
) -> Result<Option<PersistentVolumeClaim>, kube::Error> {
    let Some(patch) = protect_patch(source, uid) else { return Ok(None) };
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(client.clone(), source.metadata.namespace.as_deref().unwrap_or_default());
    let name = source.metadata.name.as_deref().unwrap_or_default();
    match claims.patch(name, &PatchParams::default(), &Patch::Strategic(patch)).await {
        Ok(c) if c.metadata.deletion_timestamp.is_none() => Ok(Some(c)),
        Ok(_) => Ok(None),
        // Gone since it was read (404), made again (the uid precondition: 422), or being deleted (no new finalizers
        // then: 422).
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 422 || e.code == 409 => Ok(None),
        Err(e) => Err(e),
    }
}

/// The patch that puts [`SOURCE_FINALIZER`] on `source`, which was read before the patch is sent: `None` when what
/// was read already rules the copy out (being deleted, or not the claim `uid`, the one the source's PV is bound
/// to). Its `metadata.uid` is a precondition: a claim made again under the name since is refused (422), so it is
/// never protected by mistake. It is a strategic merge, whose `finalizers` add to the claim's list as it is when
/// the patch applies, once: the list that was read says nothing of now (another clone of the source may have
/// protected it meanwhile, or a sweep lifted a finalizer a crash left), so the patch does not rest on it, and is
/// sent even when the finalizer was there.
fn protect_patch(source: &PersistentVolumeClaim, uid: Option<&str>) -> Option<serde_json::Value> {
    let uid = uid.filter(|u| source.metadata.uid.as_deref() == Some(*u))?;
    if source.metadata.deletion_timestamp.is_some() {
        return None;
    }
    Some(serde_json::json!({"metadata": {"uid": uid, "finalizers": [SOURCE_FINALIZER]}}))
}

/// Removes [`SOURCE_FINALIZER`] from the claim, if it has it. A patch that finds the list changed does nothing:
/// the change brings the claim back.
async fn lift(client: &kube::Client, namespace: &str, name: &str) -> Result<(), kube::Error> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let Some(source) = claims.get_opt(name).await? else { return Ok(()) };
    let finalizers = source.metadata.finalizers.clone().unwrap_or_default();
    let Some(i) = finalizers.iter().position(|f| f == SOURCE_FINALIZER) else { return Ok(()) };
    let path = format!("/metadata/finalizers/{i}");
    let ops = serde_json::json!([
        {"op": "test", "path": "/metadata/uid", "value": source.metadata.uid},
        {"op": "test", "path": path, "value": SOURCE_FINALIZER},
        {"op": "remove", "path": path},
    ]);
    match claims.patch(name, &PatchParams::default(), &json_patch(ops)).await {
        Ok(_) => {
            tracing::info!(claim = %format!("{namespace}/{name}"), "no clone of the claim is being made: its cloning protection is lifted");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 422 || e.code == 409 || e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

fn json_patch(ops: serde_json::Value) -> Patch<()> {
    Patch::Json(serde_json::from_value(ops).expect("a well-formed JSON patch"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        PersistentVolumeClaimSpec, PersistentVolumeSpec, TypedLocalObjectReference, TypedObjectReference,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use std::collections::BTreeMap;

    const P: &str = "local.berth.dev";

    fn with_source(kind: &str, group: Option<&str>, namespace: Option<&str>) -> PersistentVolumeClaim {
        let mut c = PersistentVolumeClaim::default();
        c.metadata.namespace = Some("db".into());
        c.spec = Some(PersistentVolumeClaimSpec {
            data_source_ref: Some(TypedObjectReference {
                api_group: group.map(str::to_owned),
                kind: kind.into(),
                name: "prod".into(),
                namespace: namespace.map(str::to_owned),
            }),
            ..Default::default()
        });
        c
    }

    #[test]
    fn a_claim_in_the_same_namespace_is_a_source_and_nothing_else_is() {
        assert_eq!(source_name(&PersistentVolumeClaim::default()), None);
        assert_eq!(source_name(&with_source("PersistentVolumeClaim", None, None)), Some(Ok("prod".into())));
        assert_eq!(source_name(&with_source("PersistentVolumeClaim", Some(""), Some("db"))), Some(Ok("prod".into())));
        let other_ns = source_name(&with_source("PersistentVolumeClaim", None, Some("web"))).unwrap().unwrap_err();
        assert!(other_ns.contains("namespace \"web\""), "{other_ns}");
        let snapshot = source_name(&with_source("VolumeSnapshot", Some("snapshot.storage.k8s.io"), None));
        assert!(snapshot.unwrap().unwrap_err().contains("not a CSI driver"));
        let other = source_name(&with_source("Populator", Some("example.com"), None)).unwrap().unwrap_err();
        assert!(other.contains("\"Populator\" (apiGroup \"example.com\")"), "{other}");
        // The older field alone (API servers mirror it into dataSourceRef, but a claim read from elsewhere may not).
        let old = PersistentVolumeClaim {
            spec: Some(PersistentVolumeClaimSpec {
                data_source: Some(TypedLocalObjectReference {
                    api_group: None,
                    kind: "PersistentVolumeClaim".into(),
                    name: "prod".into(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(source_name(&old), Some(Ok("prod".into())));
    }

    fn bound(volume: Option<&str>) -> PersistentVolumeClaim {
        let mut c = PersistentVolumeClaim::default();
        c.metadata.name = Some("prod".into());
        c.spec = Some(PersistentVolumeClaimSpec { volume_name: volume.map(str::to_owned), ..Default::default() });
        c
    }

    fn berth_pv(by: &str) -> PersistentVolume {
        let mut pv = PersistentVolume::default();
        pv.metadata.name = Some("pvc-1".into());
        pv.metadata.annotations = Some(BTreeMap::from([
            (keys::PROVISIONED_BY.to_owned(), by.to_owned()),
            (NODE_ANNOTATION.to_owned(), "node-a".to_owned()),
        ]));
        pv.metadata.labels = Some(BTreeMap::from([(crate::pv::POOL_LABEL.to_owned(), "thin".to_owned())]));
        pv.spec = Some(PersistentVolumeSpec {
            capacity: Some(BTreeMap::from([("storage".to_owned(), Quantity("1Gi".into()))])),
            storage_class_name: Some("berth-thin".into()),
            volume_mode: Some("Filesystem".into()),
            ..Default::default()
        });
        pv
    }

    #[test]
    fn a_bound_claim_with_a_berth_pv_is_a_source_with_its_node_pool_and_size() {
        let (claim, pv) = (bound(Some("pvc-1")), berth_pv(P));
        let s = source(P, "prod", Found { claim: Some(&claim), pv: Some(&pv) }).unwrap();
        let want = Source {
            claim: "prod".into(),
            volume: "pvc-1".into(),
            node: "node-a".into(),
            pool: "thin".into(),
            class: "berth-thin".into(),
            size_bytes: 1 << 30,
            volume_mode: "Filesystem".into(),
        };
        assert_eq!(s, want);
        assert_eq!(mismatch(&s, "berth-thin", "thin", 1 << 30, "Filesystem"), None);
        assert_eq!(mismatch(&s, "berth-thin", "thin", 2 << 30, "Filesystem"), None, "a clone may be larger");
        for (class, pool, size, mode, says) in [
            ("other", "thin", 1 << 30, "Filesystem", "of StorageClass \"berth-thin\""),
            ("berth-thin", "thick", 1 << 30, "Filesystem", "in pool \"thin\""),
            ("berth-thin", "thin", (1 << 30) - 1, "Filesystem", "at least as large"),
            ("berth-thin", "thin", 1 << 30, "Block", "a Filesystem volume"),
        ] {
            let why = mismatch(&s, class, pool, size, mode).unwrap();
            assert!(why.contains(says), "{why}");
        }
    }

    #[test]
    fn the_protection_goes_only_on_the_claim_read_with_its_uid_as_a_precondition() {
        let mut read = bound(Some("pvc-1"));
        read.metadata.uid = Some("u1".into());
        read.metadata.finalizers = Some(vec!["kubernetes.io/pvc-protection".into()]);
        let want = serde_json::json!({"metadata": {"uid": "u1", "finalizers": [SOURCE_FINALIZER]}});
        assert_eq!(protect_patch(&read, Some("u1")), Some(want.clone()));
        // The same patch when the finalizer was read: a sweep may have lifted it since.
        read.metadata.finalizers.as_mut().unwrap().push(SOURCE_FINALIZER.into());
        assert_eq!(protect_patch(&read, Some("u1")), Some(want));
        // Its PV is bound to another claim of the name (or to none known), or it is being deleted: no copy.
        assert_eq!(protect_patch(&read, Some("u0")), None);
        assert_eq!(protect_patch(&read, None), None);
        read.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        assert_eq!(protect_patch(&read, Some("u1")), None);
    }

    #[test]
    fn a_source_that_is_missing_unbound_deleted_or_not_berths_is_refused_with_the_right_retry() {
        let pv = berth_pv(P);
        let refused = |found: Found<'_>| source(P, "prod", found).unwrap_err();
        let missing = refused(Found::default());
        assert!(missing.message.contains("does not exist") && missing.retry == Retry::Backoff, "{missing:?}");
        let unbound = bound(None);
        let u = refused(Found { claim: Some(&unbound), pv: None });
        assert!(u.message.contains("not Bound yet") && u.retry == Retry::Backoff, "{u:?}");
        let no_pv = bound(Some("pvc-1"));
        assert_eq!(refused(Found { claim: Some(&no_pv), pv: None }).retry, Retry::Backoff);
        let mut deleted = bound(Some("pvc-1"));
        deleted.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        let d = refused(Found { claim: Some(&deleted), pv: Some(&pv) });
        assert!(d.message.contains("being deleted") && d.retry == Retry::OnChange, "{d:?}");
        let theirs = berth_pv("rancher.io/local-path");
        let t = refused(Found { claim: Some(&no_pv), pv: Some(&theirs) });
        assert!(t.message.contains("provisioned by rancher.io/local-path") && t.retry == Retry::OnChange, "{t:?}");
    }
}
