//! Leader election on the Lease `local.berth.dev`, and the leadership epoch that fences agents.
//!
//! One replica acts; the others keep their caches warm and wait. Written here rather than taken from a crate
//! because three properties matter for a storage controller and none of the crates gives all of them:
//! - **The epoch is taken in the same write that takes the lease.** Acquiring sets the holder and increments
//!   `leaseTransitions` in one compare-and-swap (`replace` with the resourceVersion read), and the new count is
//!   this leadership's epoch. There is no second step that could fail after the lease was won and leave a
//!   replica holding the lease without acting.
//! - **Expiry is judged on the standby's own clock.** A standby takes a held lease only when the record has not
//!   changed for its `leaseDurationSeconds` as measured on its own monotonic clock (client-go's "observed time"),
//!   so clock skew between nodes does not matter.
//! - **A failed renewal is retried until the lease would run out** (client-go's renew deadline), so one failed
//!   request does not make a leader quit while its lease is valid for seconds more.
//!
//! Agents keep the highest epoch they have seen. A Lease deleted and made again counts from zero, so a leader
//! can find itself below them: [`Leadership::raise_above`] then raises `leaseTransitions` past the agent's
//! epoch, again with a compare-and-swap that succeeds only while this replica holds the lease (agent_client.rs
//! calls it when an agent answers `StaleEpoch`; lib.rs then fences every agent with the new epoch).
//!
//! A replica that loses the lease exits at once instead of trying to stop work in flight: the agents refuse
//! whatever it still sends, and its restart stands by with fresh state.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

/// How often a standby reads the Lease, and a leader retries a failed renewal (client-go's retry period is 2 s).
const RETRY: Duration = Duration::from_secs(1);
/// The longest a single Lease request may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// A leader gives up this long before its lease would run out, for clocks that tick at slightly different rates.
const SAFETY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("the Lease request took longer than {CALL_TIMEOUT:?}")]
    Timeout,
    #[error("another replica wrote the Lease first")]
    Conflict,
    /// This replica does not hold the lease (any more).
    #[error("{0}")]
    Lost(String),
    #[error("leaseTransitions cannot go past {}", i32::MAX)]
    Exhausted,
    #[error("failpoint: {0}")]
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    Failpoint(String),
}

/// The Lease's name: the provisioner name (external-provisioner names its own after its provisioner too). Fixed,
/// like the provisioner name: BerthNodes are cluster-scoped, so one install of Berth serves a cluster.
pub const LEASE_NAME: &str = berth::PROVISIONER_NAME;

/// Whether a replica that does not lead may take the lease now, given the record it just read (`None`: no spec)
/// and the instant (its own clock) since which it has seen that record unchanged.
pub fn may_take(spec: Option<&LeaseSpec>, identity: &str, unchanged_since: Instant, now: Instant) -> bool {
    let Some(spec) = spec else { return true };
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        // This replica's previous process: a restarted container keeps its pod's name. Taking it bumps the epoch
        // all the same, so nothing the previous process still sends is admitted.
        Some(holder) if holder == identity => true,
        Some(_) => {
            let seconds = spec.lease_duration_seconds.filter(|s| *s > 0).unwrap_or(15);
            now.saturating_duration_since(unchanged_since) >= Duration::from_secs(seconds as u64)
        }
    }
}

/// The epoch that follows `transitions` when it must also be above `floor` (the highest epoch an agent has seen).
pub fn next_epoch(transitions: i32, floor: u64) -> Result<i32, LeaseError> {
    let base = u64::try_from(transitions.max(0)).unwrap_or(0).max(floor);
    base.checked_add(1).and_then(|e| i32::try_from(e).ok()).ok_or(LeaseError::Exhausted)
}

pub struct Leadership {
    leases: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    renew_before: Duration,
    /// When this replica last wrote the Lease as its holder, on its own clock (taken before the request was sent,
    /// so the lease is surely its own until this plus `duration`). `None` until it leads.
    renewed: Mutex<Option<Instant>>,
    /// This leadership's epoch (0 until it leads); lib.rs fences every agent again when it changes.
    epoch: watch::Sender<u64>,
    /// One epoch raise at a time: several agents may refuse the same stale epoch at once.
    raising: tokio::sync::Mutex<()>,
    /// Set when a raise found the lease held by another replica: [`Leadership::hold`] returns at once.
    lost: tokio::sync::Notify,
}

impl Leadership {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        identity: String,
        duration: Duration,
        renew_before: Duration,
    ) -> Result<Leadership, String> {
        if renew_before >= duration || duration < Duration::from_secs(2) {
            return Err(format!(
                "the lease must last at least 2 s and be renewed before it expires: renew-before {renew_before:?}, duration {duration:?}"
            ));
        }
        Ok(Leadership {
            leases: Api::namespaced(client, namespace),
            name: LEASE_NAME.to_owned(),
            identity,
            duration,
            renew_before,
            renewed: Mutex::new(None),
            epoch: watch::channel(0).0,
            raising: tokio::sync::Mutex::new(()),
            lost: tokio::sync::Notify::new(),
        })
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The epoch agents are sent now.
    pub fn epoch(&self) -> u64 {
        *self.epoch.borrow()
    }

    /// Changes of [`Leadership::epoch`] (raises).
    pub fn epoch_changes(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    fn renewed_at(&self, at: Instant) {
        *self.renewed.lock().expect("renewed") = Some(at);
    }

    /// When the lease runs out for this replica: past this, another may hold it.
    fn runs_out(&self) -> Option<Instant> {
        self.renewed.lock().expect("renewed").map(|at| at + self.duration - SAFETY)
    }

    async fn call<T>(fut: impl Future<Output = Result<T, kube::Error>>) -> Result<T, LeaseError> {
        match tokio::time::timeout(CALL_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(kube::Error::Api(e))) if e.code == 409 => Err(LeaseError::Conflict),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(LeaseError::Timeout),
        }
    }

    fn held_spec(&self, transitions: i32, acquire: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: Some(acquire.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Waits until this replica holds the lease; returns its epoch. Errors are retried: a standby has nothing to
    /// lose by waiting.
    pub async fn acquire(&self) -> u64 {
        let mut seen: Option<(Option<LeaseSpec>, Instant)> = None;
        let mut last_error = String::new();
        loop {
            match self.try_acquire(&mut seen).await {
                Ok(Some(epoch)) => return epoch,
                Ok(None) => {}
                Err(e) => {
                    let e = e.to_string();
                    if e != last_error {
                        tracing::warn!(lease = %self.name, error = %e, "cannot take the lease yet; retrying");
                    }
                    last_error = e;
                }
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    async fn try_acquire(&self, seen: &mut Option<(Option<LeaseSpec>, Instant)>) -> Result<Option<u64>, LeaseError> {
        let now = Instant::now();
        let Some(mut lease) = Self::call(self.leases.get_opt(&self.name)).await? else {
            // No Lease (a first install, or it was deleted): make it, held by this replica.
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(self.held_spec(1, None)),
            };
            fail::fail_point!("leader-epoch-write", |a| Err(LeaseError::Failpoint(a.unwrap_or_default())));
            return match Self::call(self.leases.create(&PostParams::default(), &lease)).await {
                Ok(_) => self.won(1, now).map(Some),
                Err(LeaseError::Conflict) => Ok(None),
                Err(e) => Err(e),
            };
        };
        if seen.as_ref().is_none_or(|(spec, _)| *spec != lease.spec) {
            *seen = Some((lease.spec.clone(), now));
        }
        let since = seen.as_ref().map_or(now, |(_, at)| *at);
        if !may_take(lease.spec.as_ref(), &self.identity, since, now) {
            return Ok(None);
        }
        let previous = lease.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0);
        let transitions = next_epoch(previous, 0)?;
        lease.spec = Some(self.held_spec(transitions, None));
        fail::fail_point!("leader-epoch-write", |a| Err(LeaseError::Failpoint(a.unwrap_or_default())));
        // `replace` carries the resourceVersion just read: it fails if anyone wrote the Lease since.
        match Self::call(self.leases.replace(&self.name, &PostParams::default(), &lease)).await {
            Ok(_) => self.won(transitions, now).map(Some),
            Err(LeaseError::Conflict) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn won(&self, transitions: i32, sent: Instant) -> Result<u64, LeaseError> {
        self.renewed_at(sent);
        let epoch = u64::try_from(transitions).map_err(|_| LeaseError::Exhausted)?;
        self.epoch.send_replace(epoch);
        Ok(epoch)
    }

    /// One renewal: the Lease must still name this replica.
    async fn renew(&self) -> Result<(), LeaseError> {
        let sent = Instant::now();
        let Some(mut lease) = Self::call(self.leases.get_opt(&self.name)).await? else {
            return Err(LeaseError::Lost(format!("the Lease {} was deleted", self.name)));
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Err(LeaseError::Lost(format!("the lease is held by {:?}", spec.holder_identity)));
        }
        lease.spec = Some(self.held_spec(spec.lease_transitions.unwrap_or(0), spec.acquire_time));
        Self::call(self.leases.replace(&self.name, &PostParams::default(), &lease)).await?;
        self.renewed_at(sent);
        Ok(())
    }

    /// Keeps renewing the lease; returns (with why) once it is lost: held by another replica, deleted, or not
    /// renewed before it ran out (failed renewals are retried every second until then).
    pub async fn hold(&self) -> String {
        loop {
            let Some(runs_out) = self.runs_out() else { return "this replica never held the lease".into() };
            let due = runs_out + SAFETY - self.renew_before;
            tokio::select! {
                () = tokio::time::sleep_until(due.into()) => {}
                () = self.lost.notified() => return "another replica holds the lease".into(),
            }
            let mut failures = 0u32;
            loop {
                let runs_out = self.runs_out().expect("held");
                let left = runs_out.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return format!("the lease was not renewed before it ran out ({failures} failed attempts)");
                }
                let attempt = tokio::time::timeout(left.min(CALL_TIMEOUT), self.renew()).await;
                match attempt {
                    Ok(Ok(())) => {
                        if failures > 0 {
                            tracing::info!(lease = %self.name, failures, "lease renewed after failed attempts");
                        }
                        break;
                    }
                    Ok(Err(LeaseError::Lost(why))) => return why,
                    Ok(Err(e)) => {
                        failures += 1;
                        tracing::warn!(lease = %self.name, error = %e, ?left, "renewing the lease failed; retrying until it runs out");
                    }
                    Err(_) => {
                        failures += 1;
                        tracing::warn!(lease = %self.name, ?left, "renewing the lease timed out; retrying until it runs out");
                    }
                }
                tokio::time::sleep(RETRY.min(left)).await;
            }
        }
    }

    /// Raises this leadership's epoch above `newest` (an epoch an agent has seen), unless it already is. Succeeds
    /// only while this replica holds the lease; if another does, [`Leadership::hold`] returns at once.
    pub async fn raise_above(&self, newest: u64) -> Result<u64, LeaseError> {
        let _one_at_a_time = self.raising.lock().await;
        loop {
            let current = self.epoch();
            if current > newest {
                return Ok(current);
            }
            if self.runs_out().is_none_or(|at| Instant::now() >= at) {
                return Err(LeaseError::Lost("the lease ran out".into()));
            }
            let sent = Instant::now();
            let Some(mut lease) = Self::call(self.leases.get_opt(&self.name)).await? else {
                // Deleted while this replica leads: it is not the holder any more. Its restart makes it anew.
                self.lost.notify_one();
                return Err(LeaseError::Lost(format!("the Lease {} was deleted", self.name)));
            };
            let spec = lease.spec.clone().unwrap_or_default();
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                self.lost.notify_one();
                return Err(LeaseError::Lost(format!("the lease is held by {:?}", spec.holder_identity)));
            }
            let transitions = next_epoch(spec.lease_transitions.unwrap_or(0), newest.max(current))?;
            lease.spec = Some(self.held_spec(transitions, spec.acquire_time));
            fail::fail_point!("leader-epoch-write", |a| Err(LeaseError::Failpoint(a.unwrap_or_default())));
            match Self::call(self.leases.replace(&self.name, &PostParams::default(), &lease)).await {
                Ok(_) => {
                    let epoch = self.won(transitions, sent)?;
                    tracing::warn!(lease = %self.name, from = current, to = epoch, agents_newest = newest, "an agent had seen a newer epoch than this leader's (was the Lease deleted?); raised the epoch above it");
                    return Ok(epoch);
                }
                Err(LeaseError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Gives the lease up so a standby takes over without waiting for it to expire. `leaseTransitions` stays.
    pub async fn release(&self) {
        let released = async {
            let Some(mut lease) = Self::call(self.leases.get_opt(&self.name)).await? else { return Ok(()) };
            let mut spec = lease.spec.clone().unwrap_or_default();
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(());
            }
            (spec.holder_identity, spec.acquire_time, spec.renew_time) = (None, None, None);
            lease.spec = Some(spec);
            Self::call(self.leases.replace(&self.name, &PostParams::default(), &lease)).await.map(|_| ())
        };
        match released.await {
            Ok(()) => tracing::info!(lease = %self.name, "lease released"),
            Err(e) => tracing::warn!(error = %e, lease = %self.name, "cannot release the lease; it expires"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: Option<&str>, seconds: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: Some(seconds),
            ..Default::default()
        }
    }

    #[test]
    fn a_held_lease_is_taken_only_after_it_stayed_unchanged_for_its_duration() {
        let t0 = Instant::now();
        let spec = held_by(Some("other"), 15);
        assert!(!may_take(Some(&spec), "me", t0, t0));
        assert!(!may_take(Some(&spec), "me", t0, t0 + Duration::from_secs(14)));
        assert!(may_take(Some(&spec), "me", t0, t0 + Duration::from_secs(15)));
        // Free, released or never held: at once. Its own (a restarted process of this replica): at once.
        assert!(may_take(None, "me", t0, t0));
        assert!(may_take(Some(&held_by(None, 15)), "me", t0, t0));
        assert!(may_take(Some(&held_by(Some(""), 15)), "me", t0, t0));
        assert!(may_take(Some(&held_by(Some("me"), 15)), "me", t0, t0));
        // A record without a duration counts as the default 15 s.
        let no_duration = LeaseSpec { lease_duration_seconds: None, ..spec };
        assert!(!may_take(Some(&no_duration), "me", t0, t0 + Duration::from_secs(10)));
    }

    #[test]
    fn the_next_epoch_is_above_the_transitions_and_any_agents_epoch() {
        assert_eq!(next_epoch(0, 0).unwrap(), 1);
        assert_eq!(next_epoch(7, 0).unwrap(), 8);
        // A Lease made anew counts from 0; an agent that saw epoch 41 needs 42.
        assert_eq!(next_epoch(1, 41).unwrap(), 42);
        assert_eq!(next_epoch(-3, 0).unwrap(), 1, "a negative count (edited by hand) is treated as 0");
        assert!(matches!(next_epoch(i32::MAX, 0), Err(LeaseError::Exhausted)));
        assert!(matches!(next_epoch(0, u64::MAX), Err(LeaseError::Exhausted)));
    }
}
