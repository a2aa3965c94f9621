//! High availability: two replicas elect a leader on a Lease; one acts, the other takes over when the leader is
//! killed, stopped past its lease or shut down; a deposed leader's late calls are refused by the agents.

mod common;

use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use testbed::kube_util::wait_for;
use testbed::process::Proc;

/// A short lease, so takeovers happen within seconds.
const LEASE_SECONDS: u64 = 4;
const SHORT_LEASE: [&str; 2] = ["--lease-duration-seconds=4", "--lease-renew-before-seconds=2"];

struct Claims {
    claims: Api<PersistentVolumeClaim>,
    pods: Api<Pod>,
}

impl Claims {
    async fn new(w: &World) -> Claims {
        add_class(w, class("berth-local", "WaitForFirstConsumer", "Delete", &[("pool", "fast")])).await;
        let client = w.bed.client();
        Claims { claims: Api::namespaced(client.clone(), "app"), pods: Api::namespaced(client, "app") }
    }

    /// A claim and a pod using it; the claim's volume name.
    async fn add(&self, name: &str) -> String {
        let c = self.claims.create(&PostParams::default(), &claim(name, "berth-local", "16Mi")).await.unwrap();
        self.pods.create(&PostParams::default(), &pod(name, name)).await.unwrap();
        format!("pvc-{}", c.metadata.uid.unwrap())
    }

    async fn wait_bound(&self, name: &str) {
        wait_for(&self.claims, name, WAIT, bound).await.unwrap();
    }
}

/// Replica a (the failpoints build with `a_points`, if given) leads; then replica b stands by. Both with `lease`.
async fn leader_and_standby(w: &World, lease: &[&str], a_points: Option<&str>) -> (Proc, Proc) {
    let a = match a_points {
        Some(points) => start_with_failpoints(w, "replica-a", lease, points).await,
        None => w.bed.start_controller_named("replica-a", &controller_bin(), lease, &[]).await.unwrap(),
    };
    wait_for_log(&a, &["leading"], WAIT).await;
    let b = w.bed.start_controller_named("replica-b", &controller_bin(), lease, &[]).await.unwrap();
    wait_for_log(&b, &["standing by"], WAIT).await;
    (a, b)
}

/// Whether the log says `volume` was provisioned by that replica. (The line comes after the PV, so a claim can be
/// Bound a moment before it: wait for the line where it must be there.)
fn provisioned(log: &str, volume: &str) -> bool {
    log.lines().any(|l| l.contains("provisioned") && l.contains(volume))
}

#[tokio::test(flavor = "multi_thread")]
async fn one_of_two_replicas_acts_and_the_other_takes_over_when_it_is_killed() {
    let mut w = world_without_controller(&[256 * MI, 256 * MI]).await;
    let (mut a, b) = leader_and_standby(&w, &SHORT_LEASE, None).await;

    let c = Claims::new(&w).await;
    let one = c.add("one").await;
    c.wait_bound("one").await;
    wait_for_log(&a, &["provisioned", &one], WAIT).await;
    assert!(!provisioned(&b.log_text(), &one), "the standby did nothing");
    assert!(!b.log_text().contains("leading"), "one leader at a time");
    let (a_metrics, b_metrics) = (metrics_of(&a).await, metrics_of(&b).await);
    assert_eq!(
        (sample(&a_metrics, "berth_controller_leader"), sample(&b_metrics, "berth_controller_leader")),
        (1.0, 0.0)
    );
    let succeeded = r#"berth_controller_provisions_total{class="berth-local",result="success"}"#;
    assert_eq!(sample(&a_metrics, succeeded), 1.0, "{a_metrics}");

    a.signal_and_wait(libc::SIGKILL, Duration::from_secs(5)).unwrap();
    let killed = Instant::now();
    let two = c.add("two").await;
    c.wait_bound("two").await;
    let took = killed.elapsed();
    wait_for_log(&b, &["provisioned", &two], WAIT).await;
    // The standby waits for the lease to expire (up to LEASE_SECONDS after the last renewal), then provisions at
    // once; the slack is for the scheduler and the binding.
    assert!(took < Duration::from_secs(LEASE_SECONDS + 6), "took over and provisioned in {took:?}");
    assert_eq!(agent_creates(&w, &one) + agent_creates(&w, &two), 2);
    w.controllers.extend([a, b]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_hands_the_lease_to_the_standby_at_once() {
    let mut w = world_without_controller(&[256 * MI]).await;
    // A long lease: a standby that had to wait for it to expire would take 60 s.
    let long_lease = ["--lease-duration-seconds=60", "--lease-renew-before-seconds=20"];
    let (mut a, b) = leader_and_standby(&w, &long_lease, None).await;

    let status = a.signal_and_wait(libc::SIGTERM, Duration::from_secs(30)).expect("the leader stops on SIGTERM");
    assert!(status.success(), "{status}");
    assert!(a.log_text().contains("lease released"), "{}", a.log_text());
    let stopped = Instant::now();
    wait_for_log(&b, &["leading"], Duration::from_secs(30)).await;
    assert!(stopped.elapsed() < Duration::from_secs(30), "the standby did not wait for the 60 s lease");
    let c = Claims::new(&w).await;
    let one = c.add("one").await;
    c.wait_bound("one").await;
    wait_for_log(&b, &["provisioned", &one], WAIT).await;
    w.controllers.extend([a, b]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_stopped_past_its_lease_is_refused_when_it_resumes() {
    let mut w = world_without_controller(&[256 * MI, 256 * MI]).await;
    // Replica a pauses 1.5 s before each agent create, so it can be stopped with a create about to be sent; once
    // it notices it lost the lease it waits 5 s more before exiting, so that late create does go out.
    let a_points = "provision-before-agent-create=return(1500);leader-before-exit=return(5000)";
    let (mut a, b) = leader_and_standby(&w, &SHORT_LEASE, Some(a_points)).await;

    let c = Claims::new(&w).await;
    let one = c.add("one").await;
    c.wait_bound("one").await;
    let two = c.add("two").await;
    wait_for_log(&a, &["failpoint: pausing", "provision-before-agent-create"], WAIT).await;
    // Wait for the pause on "two" (the first pause was for "one").
    let deadline = Instant::now() + WAIT;
    while a.log_text().matches("provision-before-agent-create").count() < 2 {
        assert!(Instant::now() < deadline, "replica a never started on claim two");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.signal(libc::SIGSTOP);

    // The standby takes over past the lease, fences the agents, and provisions "two" itself.
    wait_for_log(&b, &["leading"], WAIT).await;
    c.wait_bound("two").await;
    wait_for_log(&b, &["provisioned", &two], WAIT).await;

    a.signal(libc::SIGCONT);
    let status = a.wait_exit(Duration::from_secs(30)).expect("the deposed leader exits");
    assert!(!status.success(), "{status}");
    let a_log = a.log_text();
    assert!(a_log.contains("lost leadership"), "{a_log}");
    assert!(a_log.lines().any(|l| l.contains("deposed") && l.contains(&two)), "its late create was refused: {a_log}");
    let refused = w.agents.iter().any(|ag| {
        ag.log().lines().any(|l| l.contains(&format!("volume=\"{two}\"")) && l.contains("result=StaleEpoch"))
    });
    assert!(refused, "an agent refused the deposed leader's create of {two}");
    assert_eq!((agent_creates(&w, &one), agent_creates(&w, &two)), (1, 1), "each volume created once");
    assert_eq!(all_volume_dirs(&w).len(), 2, "{:?}", all_volume_dirs(&w));
    let pvs = Api::<PersistentVolume>::all(w.bed.client()).list(&ListParams::default()).await.unwrap().items;
    assert_eq!(pvs.len(), 2);
    w.controllers.extend([a, b]);
}

fn leases(w: &World) -> Api<Lease> {
    Api::namespaced(w.bed.client(), "berth-system")
}

/// The agent's answer to `PUT /v1/epoch` with `epoch`.
async fn fence_status(w: &World, epoch: u64) -> u16 {
    let agent = &w.agents[0];
    let token = w.bed.controller_token(&agent.node).await.unwrap();
    let resp = agent
        .http()
        .unwrap()
        .put(agent.url("/v1/epoch"))
        .bearer_auth(token)
        .header("berth-leader-epoch", epoch.to_string())
        .send()
        .await
        .unwrap();
    resp.status().as_u16()
}

/// A Lease deleted while the controller is stopped (an uninstall and reinstall, a GitOps prune) is made anew and
/// counts from 1, while the agents keep the epoch they last saw. The new leader raises its epoch above theirs and
/// works; the epoch from before the deletion stays refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_lease_does_not_send_the_epoch_backwards() {
    let mut w = world_without_controller(&[256 * MI]).await;
    // A Lease that has seen 41 transitions: the first leader's epoch is 42.
    let lease = Lease {
        metadata: ObjectMeta { name: Some("local.berth.dev".into()), ..Default::default() },
        spec: Some(LeaseSpec { lease_transitions: Some(41), ..Default::default() }),
    };
    leases(&w).create(&PostParams::default(), &lease).await.unwrap();
    let mut a = w.bed.start_controller_named("replica-a", &controller_bin(), &[], &[]).await.unwrap();
    wait_for_log(&a, &["leading", "epoch=42"], WAIT).await;
    let c = Claims::new(&w).await;
    c.add("one").await;
    c.wait_bound("one").await;
    assert!(a.signal_and_wait(libc::SIGTERM, Duration::from_secs(30)).unwrap().success());
    leases(&w).delete("local.berth.dev", &Default::default()).await.unwrap();

    let b = w.bed.start_controller_named("replica-b", &controller_bin(), &[], &[]).await.unwrap();
    wait_for_log(&b, &["leading", "epoch=1"], WAIT).await;
    let two = c.add("two").await;
    c.wait_bound("two").await;
    wait_for_log(&b, &["provisioned", &two], WAIT).await;
    let raised = wait_for_log(&b, &["raised the epoch above it"], WAIT).await;
    assert!(raised.contains("agents_newest=42"), "{raised}");
    let epoch = leases(&w).get("local.berth.dev").await.unwrap().spec.unwrap().lease_transitions.unwrap();
    assert!(epoch > 42, "the Lease carries the raised epoch: {epoch}");
    assert_eq!(fence_status(&w, 42).await, 409, "the epoch from before the deletion is refused");
    w.controllers.extend([a, b]);
}

/// The write that takes the lease is the one that sets the epoch: if it fails, the replica does not hold the
/// lease (so it cannot hold it without acting), retries, and leads within the lease time.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_epoch_write_is_retried_and_never_leaves_the_lease_held_without_a_leader() {
    let mut w = world_without_controller(&[256 * MI]).await;
    let a = start_with_failpoints(&w, "replica-a", &SHORT_LEASE, "leader-epoch-write=1*return(injected)").await;
    wait_for_log(&a, &["cannot take the lease yet", "failpoint: injected"], WAIT).await;
    let failed = Instant::now();
    wait_for_log(&a, &["leading"], WAIT).await;
    assert!(failed.elapsed() < Duration::from_secs(LEASE_SECONDS), "led {:?} after the failure", failed.elapsed());
    let c = Claims::new(&w).await;
    let one = c.add("one").await;
    c.wait_bound("one").await;
    wait_for_log(&a, &["provisioned", &one], WAIT).await;
    w.controllers.push(a);
    drop(w);

    // A replica whose every epoch write fails never holds the lease: another takes it at once, not after a lease
    // term, once the first is stopped.
    let mut w = world_without_controller(&[256 * MI]).await;
    let failing = start_with_failpoints(&w, "replica-f", &SHORT_LEASE, "leader-epoch-write=return(injected)").await;
    wait_for_log(&failing, &["cannot take the lease yet"], WAIT).await;
    let holder = leases(&w).get_opt("local.berth.dev").await.unwrap().and_then(|l| l.spec?.holder_identity);
    assert_eq!(holder, None, "the failing replica holds nothing");
    let b = w.bed.start_controller_named("replica-b", &controller_bin(), &SHORT_LEASE, &[]).await.unwrap();
    wait_for_log(&b, &["leading"], WAIT).await;
    assert!(!failing.log_text().contains("leading"));
    w.controllers.extend([failing, b]);
}

/// The controller's Role without the rule that lets it write its Lease: renewals are refused with 403.
async fn lease_writes(w: &World, allowed: bool) {
    let roles: Api<Role> = Api::namespaced(w.bed.client(), "berth-system");
    let mut role = roles.get("berth-controller").await.unwrap();
    let rules = role.rules.get_or_insert_default();
    let writes = |r: &PolicyRule| r.resource_names.as_deref() == Some(&["local.berth.dev".to_string()][..]);
    if allowed {
        if !rules.iter().any(writes) {
            rules.push(PolicyRule {
                api_groups: Some(vec!["coordination.k8s.io".into()]),
                resources: Some(vec!["leases".into()]),
                resource_names: Some(vec!["local.berth.dev".into()]),
                verbs: vec!["update".into(), "patch".into()],
                ..Default::default()
            });
        }
    } else {
        rules.retain(|r| !writes(r));
    }
    roles.replace("berth-controller", &PostParams::default(), &role).await.unwrap();
}

/// A renewal that fails is retried until the lease would run out (client-go's renew deadline): a leader rides out
/// a short API outage, and exits only once its lease has run out.
#[tokio::test(flavor = "multi_thread")]
async fn failed_renewals_are_retried_until_the_lease_runs_out() {
    let mut w = world_without_controller(&[256 * MI]).await;
    // Renewed every 4 s; 7 s of retries (12 s less a 1 s margin, from the last renewal) before giving up.
    let lease = ["--lease-duration-seconds=12", "--lease-renew-before-seconds=8"];
    let mut a = w.bed.start_controller_named("replica-a", &controller_bin(), &lease, &[]).await.unwrap();
    wait_for_log(&a, &["leading"], WAIT).await;

    lease_writes(&w, false).await;
    wait_for_log(&a, &["renewing the lease failed; retrying until it runs out"], WAIT).await;
    lease_writes(&w, true).await;
    wait_for_log(&a, &["lease renewed after failed attempts"], WAIT).await;
    a.ensure_running().expect("the leader rode out the failed renewals");
    let c = Claims::new(&w).await;
    let one = c.add("one").await;
    c.wait_bound("one").await;
    wait_for_log(&a, &["provisioned", &one], WAIT).await;

    // An outage that outlasts the lease: the leader exits, only after the lease ran out.
    lease_writes(&w, false).await;
    let first_failure = {
        let before = a.log_text().matches("renewing the lease failed").count();
        let deadline = Instant::now() + WAIT;
        while a.log_text().matches("renewing the lease failed").count() == before {
            assert!(Instant::now() < deadline, "no failed renewal");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Instant::now()
    };
    let status = a.wait_exit(Duration::from_secs(30)).expect("the leader exits once its lease ran out");
    assert!(!status.success(), "{status}");
    let exited_after = first_failure.elapsed();
    assert!(exited_after >= Duration::from_secs(2), "it gave up {exited_after:?} after the first failure, too soon");
    assert!(a.log_text().contains("was not renewed before it ran out"), "{}", a.log_text());
    w.controllers.push(a);
}
