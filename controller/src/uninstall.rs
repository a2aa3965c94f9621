//! `berth-controller --check-uninstall`: whether Berth may be uninstalled now. The Helm chart's pre-delete hook runs
//! it. A PV of Berth with reclaim policy Delete carries a finalizer only Berth's controller lifts (after the agent
//! deleted the volume); uninstalled while such PVs exist, their claims' deletion would leave them stuck, and their
//! data on the nodes, with nothing to free either. Retain PVs do not block once the controller has lifted that
//! finalizer: they are left, with their data, on purpose.

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Api, ListParams};

/// The PVs that block an uninstall, one line each (name, phase, claim), from every PV in the cluster.
pub fn blocking(pvs: &[PersistentVolume]) -> Vec<String> {
    pvs.iter()
        .filter(|pv| {
            let annotations = pv.metadata.annotations.as_ref();
            annotations.and_then(|a| a.get(berth::keys::PROVISIONED_BY)).map(String::as_str)
                == Some(berth::PROVISIONER_NAME)
        })
        // Delete-policy PVs, and any PV still carrying Berth's finalizer: one just switched to Retain keeps it until
        // the controller lifts it, and without a controller it would never be.
        .filter(|pv| {
            let policy = pv.spec.as_ref().and_then(|s| s.persistent_volume_reclaim_policy.as_deref());
            let finalized = pv.metadata.finalizers.iter().flatten().any(|f| f == berth::keys::PV_DELETION_FINALIZER);
            policy.unwrap_or("Delete") == "Delete" || finalized
        })
        .map(|pv| {
            let name = pv.metadata.name.as_deref().unwrap_or("?");
            let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
            let claim = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref()).map_or_else(
                || "no claim".to_owned(),
                |c| format!("claim {}/{}", c.namespace.as_deref().unwrap_or(""), c.name.as_deref().unwrap_or("")),
            );
            format!("{name} ({phase}, {claim})")
        })
        .collect()
}

/// Lists the PVs; an error naming the blocking ones (the process then exits non-zero), or Ok when there are none.
pub async fn check(client: kube::Client) -> Result<()> {
    let api = Api::<PersistentVolume>::all(client);
    let params = ListParams::default();
    let pvs = tokio::time::timeout(std::time::Duration::from_secs(60), api.list(&params))
        .await
        .context("listing PVs: no answer within 60 s")?
        .context("listing PVs")?;
    let blocking = blocking(&pvs.items);
    if blocking.is_empty() {
        println!("no PersistentVolume of Berth has reclaim policy Delete: Berth may be uninstalled");
        return Ok(());
    }
    anyhow::bail!(
        "Berth cannot be uninstalled while {} PersistentVolume(s) of it have reclaim policy Delete: {}. Their \
         finalizer is lifted only by Berth's controller once the volume is deleted, so without it they and their \
         data would stay. Delete their claims and wait until the PVs are gone, or set their reclaim policy to \
         Retain to keep the data (kubectl patch pv NAME -p '{{\"spec\":{{\"persistentVolumeReclaimPolicy\":\
         \"Retain\"}}}}') and wait until the controller has lifted their finalizer; then uninstall again.",
        blocking.len(),
        blocking.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pv(name: &str, provisioner: &str, reclaim: Option<&str>) -> PersistentVolume {
        // As the controller makes them: Berth's finalizer on Delete-policy PVs only.
        let finalizers: Vec<&str> =
            if reclaim == Some("Retain") { vec![] } else { vec![berth::keys::PV_DELETION_FINALIZER] };
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": provisioner},
                         "finalizers": finalizers},
            "spec": {"persistentVolumeReclaimPolicy": reclaim,
                     "claimRef": {"namespace": "db", "name": format!("data-{name}")}},
            "status": {"phase": "Bound"},
        }))
        .unwrap()
    }

    #[test]
    fn only_berths_delete_policy_volumes_block() {
        let pvs = [
            pv("a", "local.berth.dev", Some("Delete")),
            pv("b", "local.berth.dev", Some("Retain")),
            pv("c", "rancher.io/local-path", Some("Delete")),
            pv("d", "local.berth.dev", None),
        ];
        assert_eq!(blocking(&pvs), ["a (Bound, claim db/data-a)", "d (Bound, claim db/data-d)"]);
        assert!(blocking(&pvs[1..3]).is_empty());
        // Switched to Retain a moment ago: the finalizer is still there until the controller lifts it.
        let mut switched = pv("e", "local.berth.dev", Some("Retain"));
        switched.metadata.finalizers = Some(vec![berth::keys::PV_DELETION_FINALIZER.to_owned()]);
        assert_eq!(blocking(&[switched]), ["e (Bound, claim db/data-e)"]);
    }
}
