//! Which claims a change of a StorageClass, a Node or a BerthNode (an agent's heartbeat included) wakes. Such a
//! change can unblock only a claim that waits for a volume: one refused for a missing class, pool, agent or room,
//! or one whose agent went quiet. A Bound claim has nothing to gain from it (its expansion retries on its own
//! backoff, and a refused expansion waits for its request to change), so it is not woken: at 10,000 Bound claims a
//! heartbeat would otherwise be 10,000 reconciles, each reading every node's view.
//!
//! Changes are coalesced: whatever is queued when the claim controller next asks is one pass over the waiting
//! claims. A standby queues every change from its start; at takeover that backlog is one pass, after the
//! controller's own first pass over every claim.

use futures::channel::mpsc::UnboundedReceiver;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::runtime::reflector::{ObjectRef, Store};

use crate::decide::claim_provisioner;

/// Whether `claim` waits for a volume (`pv_exists`: whether Berth's PV for a claim uid's volume name exists), as
/// far as the claim shows without its class: not being deleted, not bound, no PV made for it yet, and handed to
/// this provisioner or to none yet (a claim of a Berth class before kube-controller-manager hands it over is
/// explained, and a class change can change the explanation).
pub fn waits(claim: &PersistentVolumeClaim, provisioner: &str, pv_exists: impl Fn(&str) -> bool) -> bool {
    let unbound = claim.spec.as_ref().is_none_or(|s| s.volume_name.is_none());
    let ours_or_nobodys = claim_provisioner(claim).is_none_or(|p| p == provisioner);
    let no_volume =
        berth::naming::volume_name(claim.metadata.uid.as_deref().unwrap_or_default()).map_or(true, |v| !pv_exists(&v));
    claim.metadata.deletion_timestamp.is_none() && unbound && ours_or_nobodys && no_volume
}

/// The claims to reconcile for the `changes` seen: one pass over the waiting claims of `claims` per batch of
/// changes queued at the time (`pv_exists` as for [`waits`]).
pub fn on_change(
    changes: UnboundedReceiver<()>,
    claims: Store<PersistentVolumeClaim>,
    pv_exists: impl Fn(&str) -> bool + Send + 'static,
) -> impl Stream<Item = ObjectRef<PersistentVolumeClaim>> + Send + 'static {
    // The items are `()`, so even an unbounded batch allocates nothing.
    changes.ready_chunks(usize::MAX).flat_map(move |_| {
        let waiting: Vec<_> = claims
            .state()
            .iter()
            .filter(|c| waits(c, berth::PROVISIONER_NAME, &pv_exists))
            .map(|c| ObjectRef::from_obj(&**c))
            .collect();
        futures::stream::iter(waiting)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PersistentVolumeClaimSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const UID: &str = "0a1b2c3d-0000-4000-8000-000000000001";

    fn claim(provisioner: Option<&str>, volume_name: Option<&str>) -> PersistentVolumeClaim {
        let mut c = PersistentVolumeClaim::default();
        c.metadata.uid = Some(UID.into());
        if let Some(p) = provisioner {
            c.metadata.annotations = Some([(berth::keys::STORAGE_PROVISIONER.to_string(), p.to_string())].into());
        }
        c.spec = Some(PersistentVolumeClaimSpec { volume_name: volume_name.map(Into::into), ..Default::default() });
        c
    }

    const OURS: &str = "local.berth.dev";

    #[test]
    fn only_claims_waiting_for_a_volume_of_ours_are_woken() {
        let none = |_: &str| false;
        assert!(waits(&claim(Some(OURS), None), OURS, none), "handed over, no volume yet");
        assert!(waits(&claim(None, None), OURS, none), "not handed over yet: its class may be ours");
        assert!(!waits(&claim(Some("other.example.com"), None), OURS, none), "another provisioner's");
        assert!(!waits(&claim(Some(OURS), Some("pvc-x")), OURS, none), "bound");
        let ours = format!("pvc-{UID}");
        assert!(!waits(&claim(Some(OURS), None), OURS, |v: &str| v == ours), "its PV exists, not bound yet");
        let mut deleting = claim(Some(OURS), None);
        deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        assert!(!waits(&deleting, OURS, none), "being deleted");
    }

    fn named(name: &str, uid: &str, volume_name: Option<&str>) -> PersistentVolumeClaim {
        let mut c = claim(Some(OURS), volume_name);
        c.metadata.name = Some(name.into());
        c.metadata.namespace = Some("apps".into());
        c.metadata.uid = Some(uid.into());
        c
    }

    #[tokio::test]
    async fn a_backlog_of_changes_wakes_each_waiting_claim_once() {
        let (claims, mut writer) = kube::runtime::reflector::store();
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(named("waiting", UID, None)));
        let bound = "0a1b2c3d-0000-4000-8000-000000000002";
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(named("bound", bound, Some("pvc-y"))));
        let (tx, rx) = futures::channel::mpsc::unbounded();
        // A standby's backlog: a thousand heartbeats queued before anything reads them.
        for _ in 0..1000 {
            tx.unbounded_send(()).unwrap();
        }
        drop(tx);
        let woken: Vec<_> = on_change(rx, claims, |_| false).map(|r| r.name).collect().await;
        assert_eq!(woken, vec!["waiting".to_string()]);
    }
}
