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
use kube::api::{Api, PostParams};
use kube_lease_manager::{LeaseCreateMode, LeaseManager, LeaseManagerBuilder};

pub struct Leadership {
    manager: LeaseManager,
    client: kube::Client,
    namespace: String,
    leases: Api<Lease>,
    lease_name: String,
    identity: String,
    duration: Duration,
    renew_before: Duration,
}

/// The Lease's name: the provisioner name with `/` replaced, as external-provisioner names its own.
pub fn lease_name(provisioner: &str) -> String {
    provisioner.replace('/', "-")
}

/// How often a standby looks whether the lease was released (client-go's leader election retries every 2 s).
const RELEASE_POLL: Duration = Duration::from_secs(1);

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
        let manager = Self::manager(&client, namespace, &lease_name, &identity, duration, renew_before).await?;
        Ok(Leadership {
            manager,
            leases: Api::namespaced(client.clone(), namespace),
            client,
            namespace: namespace.to_owned(),
            lease_name,
            identity,
            duration,
            renew_before,
        })
    }

    async fn manager(
        client: &kube::Client,
        namespace: &str,
        lease_name: &str,
        identity: &str,
        duration: Duration,
        renew_before: Duration,
    ) -> Result<LeaseManager> {
        LeaseManagerBuilder::new(client.clone(), lease_name)
            .with_namespace(namespace)
            .with_identity(identity)
            .with_duration(duration.as_secs())
            .with_grace(renew_before.as_secs())
            .with_field_manager(format!("berth-controller-{identity}"))
            .with_create_mode(LeaseCreateMode::AutoCreate)
            .build()
            .await
            .with_context(|| format!("the Lease {namespace}/{lease_name}"))
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until this replica holds the lease and returns its epoch. API errors are retried: a standby has
    /// nothing to lose by waiting.
    ///
    /// kube-lease-manager's standby sleeps until the holder's lease would expire, so on its own it would not
    /// notice a lease released on SIGTERM. Meanwhile the Lease is looked at every second; once it has no holder,
    /// a fresh manager (fresh state) takes it at once.
    pub async fn acquire(&mut self) -> u64 {
        loop {
            tokio::select! {
                changed = self.manager.changed() => match changed {
                    Ok(true) => match self.epoch().await {
                        Ok(epoch) => return epoch,
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "acquired the lease but cannot read it"),
                    },
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "waiting for the lease");
                        tokio::time::sleep(RELEASE_POLL).await;
                    }
                },
                () = self.released() => {
                    tracing::info!(lease = %self.lease_name, "the lease was released; taking it");
                    match Self::manager(&self.client, &self.namespace, &self.lease_name, &self.identity, self.duration, self.renew_before).await {
                        Ok(m) => self.manager = m,
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "waiting for the lease"),
                    }
                }
            }
        }
    }

    /// Resolves when the Lease exists without a holder.
    async fn released(&self) {
        loop {
            tokio::time::sleep(RELEASE_POLL).await;
            if let Ok(Some(lease)) = self.leases.get_opt(&self.lease_name).await
                && lease.spec.is_none_or(|s| s.holder_identity.is_none())
            {
                return;
            }
        }
    }

    /// The epoch of this leadership: the Lease's `leaseTransitions`, incremented once more by this replica with a
    /// compare-and-swap. kube-lease-manager increments it when it takes the lease, but in a separate patch; the
    /// increment here makes the epoch strictly higher than any value stored before, whatever happened between
    /// (a takeover interrupted between those two patches cannot leave two leaders with one epoch).
    async fn epoch(&self) -> Result<u64> {
        loop {
            let mut lease = self.leases.get(&self.lease_name).await?;
            let spec = lease.spec.get_or_insert_default();
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                bail!("the lease is held by {:?}", spec.holder_identity);
            }
            let next = spec.lease_transitions.unwrap_or(0).saturating_add(1);
            spec.lease_transitions = Some(next);
            // `replace` carries the resourceVersion just read: it fails if anyone wrote the Lease since.
            match self.leases.replace(&self.lease_name, &PostParams::default(), &lease).await {
                Ok(_) => return Ok(u64::try_from(next).unwrap_or(0)),
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(e.into()),
            }
        }
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
