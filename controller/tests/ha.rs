//! High availability: two replicas elect a leader on a Lease; one acts, the other takes over when the leader is
//! killed, stopped past its lease or shut down; a deposed leader's late calls are refused by the agents.

mod common;

use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams, PostParams};
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
    assert!(provisioned(&a.log_text(), &one), "the leader provisioned {one}");
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
    assert!(provisioned(&b.log_text(), &two), "the new leader provisioned {two}");
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
    assert!(provisioned(&b.log_text(), &one));
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
    assert!(provisioned(&b.log_text(), &two));

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
