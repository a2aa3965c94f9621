//! Leader election on a Lease (kube-lease-manager) and the leadership epoch that fences agents.
//!
//! One replica acts; the others keep their caches warm and wait. The epoch is the Lease's `leaseTransitions`
//! after this replica acquired it: every acquisition by another holder increments it, so a new leader's epoch is
//! higher than its predecessor's and agents refuse the predecessor's late calls (docs/agent-api.md, "Fencing").
//! A replica that loses the lease exits at once instead of trying to stop work in flight: the agents refuse
//! whatever it still sends, and its restart stands by with fresh state.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube_lease_manager::{LeaseCreateMode, LeaseManager, LeaseManagerBuilder};

pub struct Leadership {
    manager: LeaseManager,
    leases: Api<Lease>,
    lease_name: String,
    identity: String,
}

/// The Lease's name: the provisioner name with `/` replaced, as external-provisioner names its own.
pub fn lease_name(provisioner: &str) -> String {
    provisioner.replace('/', "-")
}

impl Leadership {
    pub async fn new(
        client: kube::Client,
        namespace: &str,
        lease_name: String,
        identity: String,
        duration: Duration,
        renew_before: Duration,
    ) -> Result<Leadership> {
        if renew_before >= duration {
            bail!("the lease must be renewed before it expires: renew-before {renew_before:?} >= {duration:?}");
        }
        let manager = LeaseManagerBuilder::new(client.clone(), lease_name.clone())
            .with_namespace(namespace)
            .with_identity(identity.clone())
            .with_duration(duration.as_secs())
            .with_grace(renew_before.as_secs())
            .with_field_manager(format!("berth-controller-{identity}"))
            .with_create_mode(LeaseCreateMode::AutoCreate)
            .build()
            .await
            .with_context(|| format!("the Lease {namespace}/{lease_name}"))?;
        Ok(Leadership { manager, leases: Api::namespaced(client, namespace), lease_name, identity })
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until this replica holds the lease and returns its epoch. API errors are retried: a standby has
    /// nothing to lose by waiting.
    pub async fn acquire(&self) -> u64 {
        loop {
            match self.manager.changed().await {
                Ok(true) => match self.epoch().await {
                    Ok(epoch) => return epoch,
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "acquired the lease but cannot read it"),
                },
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "waiting for the lease");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// The Lease's transition count, checked to be held by this replica.
    async fn epoch(&self) -> Result<u64> {
        let lease = self.leases.get(&self.lease_name).await?;
        let spec = lease.spec.unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            bail!("the lease is held by {:?}", spec.holder_identity);
        }
        Ok(u64::try_from(spec.lease_transitions.unwrap_or(0)).unwrap_or(0))
    }

    /// Keeps renewing the lease; returns (with why) when it is lost. A failed renewal counts as lost: this
    /// replica can no longer know that nobody else leads.
    pub async fn hold(&self) -> String {
        loop {
            match self.manager.changed().await {
                Ok(true) => {}
                Ok(false) => return "another replica holds the lease".into(),
                Err(e) => return format!("renewing the lease failed: {e}"),
            }
        }
    }

    /// Gives the lease up so a standby takes over without waiting for it to expire.
    pub async fn release(&self) {
        match self.manager.release().await {
            Ok(()) => tracing::info!(lease = %self.lease_name, "lease released"),
            Err(e) => tracing::warn!(error = %e, lease = %self.lease_name, "cannot release the lease; it expires"),
        }
    }
}
