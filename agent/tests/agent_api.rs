//! `berth-agent` against the real world: real HTTPS, real directories on a small loop-mounted filesystem of a
//! simulated node, real TokenReview by the test bed's API server, the real BerthNode CRD.

use std::path::Path;
use std::time::Duration;

use berth::agent_api::{ErrorBody, ErrorReason, PoolList, Volume, VolumeList};
use berth::berth_node::BerthNode;
use futures::StreamExt;
use kube::api::Api;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use testbed::agents::{AgentProcess, PoolSpec};
use testbed::kube_util::wait_for;
use testbed::on_node::poll;
use testbed::{FsType, TestBed, TestBedConfig};

const MI: u64 = 1 << 20;
const VOL: &str = "pvc-0f8e3c1a-5b2d-4c7e-9a10-2b3c4d5e6f70";
const VOL2: &str = "pvc-1f8e3c1a-5b2d-4c7e-9a10-2b3c4d5e6f71";

/// Fields drop in order: the agent goes before the bed, whose API server would otherwise wait for its watches.
struct World {
    agent: AgentProcess,
    bed: TestBed,
    http: reqwest::Client,
    token: String,
}

/// A bed with one node whose 256 MiB ext4 disk holds two pools, `fast` and `slow`, and its agent.
async fn world() -> World {
    let bed = TestBed::start(TestBedConfig::nodes_with_disks(&[256 * MI], FsType::Ext4)).await.unwrap();
    bed.install_berth().await.unwrap();
    let pools = [PoolSpec::new("fast"), PoolSpec::new("slow")];
    let agent = bed.start_agent(Path::new(env!("CARGO_BIN_EXE_berth-agent")), 0, &pools, true).await.unwrap();
    let http = agent.http().unwrap();
    let token = bed.controller_token("node-0").await.unwrap();
    World { bed, agent, http, token }
}

fn create_body(pool: &str, size: u64) -> Value {
    json!({"pool": pool, "sizeBytes": size, "claim": {"namespace": "db", "name": "data-0"}})
}

impl World {
    /// A mutating request as the controller sends it.
    fn request(&self, method: Method, path: &str, epoch: u64) -> reqwest::RequestBuilder {
        self.agent.controller_request(&self.http, method, path, &self.token, epoch)
    }

    async fn put(&self, name: &str, epoch: u64, body: &Value) -> reqwest::Response {
        self.request(Method::PUT, &format!("/v1/volumes/{name}"), epoch).json(body).send().await.unwrap()
    }

    async fn delete(&self, name: &str, epoch: u64) -> reqwest::Response {
        self.request(Method::DELETE, &format!("/v1/volumes/{name}"), epoch).send().await.unwrap()
    }

    /// `DELETE …?unpublishedOnly=true`: what the orphan audit sends.
    async fn delete_unpublished(&self, name: &str, epoch: u64) -> reqwest::Response {
        self.request(Method::DELETE, &format!("/v1/volumes/{name}?unpublishedOnly=true"), epoch).send().await.unwrap()
    }

    async fn publish(&self, name: &str, epoch: u64) -> reqwest::Response {
        self.request(Method::PUT, &format!("/v1/volumes/{name}/published"), epoch).send().await.unwrap()
    }

    async fn metrics(&self) -> String {
        self.http.get(self.agent.url("/metrics")).send().await.unwrap().text().await.unwrap()
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let resp = self.http.get(self.agent.url(path)).bearer_auth(&self.token).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "GET {path}");
        resp.json().await.unwrap()
    }

    async fn pool(&self, name: &str) -> berth::agent_api::PoolStatus {
        let list: PoolList = self.get("/v1/pools").await;
        list.pools.into_iter().find(|p| p.name == name).unwrap()
    }

    /// The volume directories on disk, in every pool.
    fn on_disk(&self) -> Vec<String> {
        let mut names = Vec::new();
        for pool in ["fast", "slow"] {
            for e in std::fs::read_dir(self.agent.pool_root(pool)).unwrap().flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if !n.starts_with('.') {
                    names.push(format!("{pool}/{n}"));
                }
            }
        }
        names.sort();
        names
    }
}

async fn refusal(resp: reqwest::Response) -> (StatusCode, ErrorReason, String) {
    let status = resp.status();
    let body: ErrorBody = resp.json().await.unwrap_or_else(|e| panic!("{status}: error body is not an ErrorBody: {e}"));
    (status, body.reason, body.message)
}

#[tokio::test(flavor = "multi_thread")]
async fn create_repeat_conflict_delete() {
    let w = world().await;
    let resp = w.put(VOL, 1, &create_body("fast", 10 * MI)).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let made: Volume = resp.json().await.unwrap();
    assert_eq!(made.pool, "fast");
    assert_eq!(made.size_bytes, 10 * MI);
    assert_eq!(made.mode, 0o750, "default: not world-writable");
    let data = Path::new(&made.path);
    assert_eq!(data, w.agent.pool_root("fast").join(VOL).join("data"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(data).unwrap().permissions().mode() & 0o7777, 0o750);
    let marker: Value =
        serde_json::from_str(&std::fs::read_to_string(data.parent().unwrap().join("volume.json")).unwrap()).unwrap();
    assert_eq!(marker["version"], 1);
    assert_eq!(marker["name"], VOL);
    assert_eq!(marker["pool"], "fast");
    assert_eq!(marker["sizeBytes"], 10 * MI);
    assert_eq!(marker["claim"], json!({"namespace": "db", "name": "data-0"}));
    assert!(marker["createdAt"].as_str().unwrap().ends_with('Z'));

    // The same request again: the same volume, nothing new.
    let again = w.put(VOL, 1, &create_body("fast", 10 * MI)).await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.json::<Volume>().await.unwrap(), made);

    // Another size or another pool: 409, nothing changes.
    for body in [create_body("fast", 20 * MI), create_body("slow", 10 * MI)] {
        let (status, reason, message) = refusal(w.put(VOL, 1, &body).await).await;
        assert_eq!((status, reason), (StatusCode::CONFLICT, ErrorReason::Conflict), "{message}");
    }
    assert_eq!(w.on_disk(), vec![format!("fast/{VOL}")]);
    let listed: VolumeList = w.get("/v1/volumes").await;
    assert_eq!(listed.volumes, vec![made.clone()]);
    // The host's filesystems have no project quotas: no enforcement, no used bytes; the size is a metric.
    assert_eq!(w.pool("fast").await.enforcement, "none");
    assert_eq!(listed.volumes[0].used_bytes, None);
    let size_series = format!(r#"berth_volume_size_bytes{{node="node-0",pool="fast",volume="{VOL}"}} {}"#, 10 * MI);
    let metrics = w.metrics().await;
    assert!(metrics.contains(&size_series), "{metrics}");
    assert!(
        metrics
            .contains(r#"berth_pool_enforcement{node="node-0",pool="fast",backend="hostpath",enforcement="none"} 1"#)
    );
    assert!(!metrics.contains("berth_volume_used_bytes{"), "no usage is known without quotas");

    // Ownership and mode from the request.
    let mut owned = create_body("slow", MI);
    owned["uid"] = json!(999);
    owned["gid"] = json!(999);
    owned["mode"] = json!(0o2770);
    let v2: Volume = w.put(VOL2, 1, &owned).await.json().await.unwrap();
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&v2.path).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (999, 999, 0o2770));

    // Delete, twice; then it is gone everywhere.
    let del = w.delete(VOL, 1).await;
    assert_eq!(del.status(), StatusCode::OK);
    assert_eq!(del.json::<Value>().await.unwrap(), json!({"deleted": true}));
    let del = w.delete(VOL, 1).await;
    assert_eq!(del.status(), StatusCode::OK, "deleting a missing volume succeeds");
    assert_eq!(del.json::<Value>().await.unwrap(), json!({"deleted": false}));
    let missing = w.http.get(w.agent.url(&format!("/v1/volumes/{VOL}"))).bearer_auth(&w.token).send().await.unwrap();
    assert_eq!(refusal(missing).await.1, ErrorReason::NotFound);
    assert_eq!(w.on_disk(), vec![format!("slow/{VOL2}")]);
    assert!(!w.agent.pool_root("fast").join(VOL).exists());
    let metrics = w.metrics().await;
    assert!(!metrics.contains(VOL), "a deleted volume's series go with it:\n{metrics}");
    assert!(metrics.contains(&format!(r#"volume="{VOL2}""#)));
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_what_does_not_fit_including_space_taken_outside_berth() {
    let w = world().await;
    let fast = w.pool("fast").await;
    assert!(fast.ready);
    assert!(fast.free_bytes > 200 * MI && fast.free_bytes < 256 * MI, "{fast:?}");

    let (status, reason, message) = refusal(w.put(VOL, 1, &create_body("fast", 1 << 30)).await).await;
    assert_eq!((status, reason), (StatusCode::INSUFFICIENT_STORAGE, ErrorReason::InsufficientSpace), "{message}");

    // Two pools on one disk do not promise the same bytes twice.
    let made: Volume = w.put(VOL, 1, &create_body("fast", 100 * MI)).await.json().await.unwrap();
    let (fast, slow) = (w.pool("fast").await, w.pool("slow").await);
    assert_eq!(fast.allocated_bytes, 100 * MI);
    assert_eq!(slow.allocated_bytes, 0);
    assert!(slow.free_bytes <= fast.free_bytes + MI && slow.free_bytes < 156 * MI, "{slow:?}");

    // Fill the disk outside Berth: what fit before no longer does.
    let filler = w.agent.pool_root("slow").parent().unwrap().join("filler");
    let free_before = w.pool("slow").await.free_bytes;
    assert!(free_before > 60 * MI);
    std::fs::write(&filler, vec![1u8; (free_before - 40 * MI) as usize]).unwrap();
    let f = std::fs::File::open(&filler).unwrap();
    f.sync_all().unwrap();
    let slow = w.pool("slow").await;
    assert!(slow.free_bytes < 45 * MI, "{slow:?}");
    let (status, reason, _) = refusal(w.put(VOL2, 1, &create_body("slow", 50 * MI)).await).await;
    assert_eq!((status, reason), (StatusCode::INSUFFICIENT_STORAGE, ErrorReason::InsufficientSpace));
    assert_eq!(w.on_disk(), vec![format!("fast/{}", made.name)], "nothing was created by the refusals");
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_recovers_the_inventory_and_removes_debris() {
    let mut w = world().await;
    let made: Volume = w.put(VOL, 1, &create_body("fast", 5 * MI)).await.json().await.unwrap();
    std::fs::write(Path::new(&made.path).join("db.sqlite"), "precious").unwrap();
    w.agent.kill();
    // Debris of a create and a delete interrupted by the crash.
    let staging = w.agent.pool_root("fast").join(".berth-tmp");
    std::fs::create_dir_all(staging.join("create-pvc-x-00000001/data")).unwrap();
    std::fs::create_dir_all(staging.join("delete-pvc-y-00000002/data/deep")).unwrap();
    w.agent.start().await.unwrap();
    w.http = w.agent.http().unwrap();
    let listed: VolumeList = w.get("/v1/volumes").await;
    assert_eq!(listed.volumes, vec![made.clone()]);
    assert_eq!(std::fs::read_to_string(Path::new(&made.path).join("db.sqlite")).unwrap(), "precious");
    // Debris goes in the background, after the API serves (issue 18): two small directories, in seconds.
    let left = || std::fs::read_dir(&staging).unwrap().count();
    poll("debris removed", Duration::from_secs(30), || Ok((left() == 0).then_some(())))
        .await
        .unwrap_or_else(|e| panic!("{e}: {} left in {}; agent log:\n{}", left(), staging.display(), w.agent.log()));
    let log = w.agent.log();
    let last_start = log.rfind("inventory recovered from disk").expect("the restart's recovery is logged");
    let after = &log[last_start..];
    let (serving, removed) = (after.find("serving"), after.find("debris removed"));
    assert!(serving.is_some() && serving < removed, "the API serves before debris is removed:\n{after}");
    assert_eq!(after.matches("debris removed").count(), 2, "{after}");
    assert_eq!(w.pool("fast").await.allocated_bytes, 5 * MI);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_without_its_marker_is_not_ready_and_gets_nothing() {
    let w = world().await;
    std::fs::remove_file(w.agent.pool_root("fast").join(".berth-pool")).unwrap();
    let fast = w.pool("fast").await;
    assert!(!fast.ready);
    assert!(fast.reason.as_deref().unwrap().contains(".berth-pool"), "{fast:?}");
    assert_eq!(fast.free_bytes, 0);
    let (status, reason, _) = refusal(w.put(VOL, 1, &create_body("fast", MI)).await).await;
    assert_eq!((status, reason), (StatusCode::SERVICE_UNAVAILABLE, ErrorReason::PoolNotReady));
    assert!(w.on_disk().is_empty());
    // The other pool still works, and the BerthNode says which pool is down.
    assert_eq!(w.put(VOL2, 1, &create_body("slow", MI)).await.status(), StatusCode::CREATED);
    let nodes: Api<BerthNode> = Api::all(w.bed.client());
    let node = wait_for(&nodes, "node-0", Duration::from_secs(10), |n| {
        n.status.as_ref().is_some_and(|s| s.pools.iter().any(|p| p.name == "fast" && !p.ready))
    })
    .await
    .unwrap();
    assert_eq!(node.status.unwrap().summary.pools, "fast (not ready),slow");
    // A pool root that was never initialised is not ready either: the agent does not create roots itself.
    let metrics = w.metrics().await;
    assert!(metrics.contains(r#"berth_pool_ready{node="node-0",pool="fast",backend="hostpath"} 0"#), "{metrics}");
    assert!(metrics.contains(r#"berth_pool_ready{node="node-0",pool="slow",backend="hostpath"} 1"#));
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_does_not_follow_a_planted_symlink() {
    let w = world().await;
    let made: Volume = w.put(VOL, 1, &create_body("fast", MI)).await.json().await.unwrap();
    let outside = w.bed.dir().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("precious"), "keep").unwrap();
    std::os::unix::fs::symlink(&outside, Path::new(&made.path).join("link-to-outside")).unwrap();
    std::os::unix::fs::symlink(outside.join("precious"), Path::new(&made.path).join("link-to-file")).unwrap();
    assert_eq!(w.delete(VOL, 1).await.status(), StatusCode::OK);
    assert_eq!(std::fs::read_to_string(outside.join("precious")).unwrap(), "keep");
    assert!(w.on_disk().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_controller_with_a_token_for_this_node_may_call() {
    let w = world().await;
    let url = w.agent.url("/v1/volumes");
    let status = |r: reqwest::Response| r.status();
    let unauthenticated = (StatusCode::UNAUTHORIZED, ErrorReason::Unauthenticated);
    // No token.
    let (code, reason, message) = refusal(w.http.get(&url).send().await.unwrap()).await;
    assert_eq!((code, reason), unauthenticated, "{message}");
    // A made-up token.
    let (code, reason, message) = refusal(w.http.get(&url).bearer_auth("not-a-token").send().await.unwrap()).await;
    assert_eq!((code, reason), unauthenticated, "{message}");
    // The controller's token for another node's agent (captured elsewhere, replayed here).
    let other_node = w.bed.controller_token("node-1").await.unwrap();
    let (code, reason, message) = refusal(w.http.get(&url).bearer_auth(&other_node).send().await.unwrap()).await;
    assert_eq!((code, reason), unauthenticated, "{message}");
    // Another ServiceAccount, with the right audience.
    let intruder = w.bed.service_account_token("default", "intruder", &berth::agent_audience("node-0")).await.unwrap();
    let resp = w
        .http
        .put(w.agent.url(&format!("/v1/volumes/{VOL}")))
        .bearer_auth(&intruder)
        .header("berth-leader-epoch", "1")
        .json(&create_body("fast", MI))
        .send()
        .await
        .unwrap();
    let (code, reason, message) = refusal(resp).await;
    assert_eq!((code, reason), (StatusCode::FORBIDDEN, ErrorReason::Forbidden));
    assert!(message.contains("system:serviceaccount:default:intruder"), "{message}");
    // Open endpoints stay open.
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(status(w.http.get(w.agent.url(open)).send().await.unwrap()), StatusCode::OK, "{open}");
    }
    // The controller gets in.
    assert_eq!(status(w.http.get(&url).bearer_auth(&w.token).send().await.unwrap()), StatusCode::OK);
    assert!(w.on_disk().is_empty());
}

/// Authentication is a layer in front of every /v1 handler: a caller without a token is refused before its body is
/// read (here: one that never ends), and a flood of made-up tokens costs the API server a bounded number of
/// TokenReviews while the controller keeps working.
#[tokio::test(flavor = "multi_thread")]
async fn authentication_comes_before_the_body_and_failed_reviews_are_rate_limited() {
    let w = world().await;
    assert_eq!(
        w.http.get(w.agent.url("/v1/pools")).bearer_auth(&w.token).send().await.unwrap().status(),
        StatusCode::OK
    );
    let endless = futures::stream::pending::<Result<Vec<u8>, std::io::Error>>();
    let resp = w
        .http
        .put(w.agent.url(&format!("/v1/volumes/{VOL}")))
        .header("berth-leader-epoch", "1")
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(endless))
        .send()
        .await
        .expect("answered without the body (the client gives up after 30 s)");
    let (code, reason, message) = refusal(resp).await;
    assert_eq!((code, reason), (StatusCode::UNAUTHORIZED, ErrorReason::Unauthenticated), "{message}");

    let mut seen = Vec::new();
    for i in 0..80 {
        let resp = w.http.get(w.agent.url("/v1/volumes")).bearer_auth(format!("made-up-{i}")).send().await.unwrap();
        seen.push(refusal(resp).await);
        if seen.last().is_some_and(|(_, reason, _)| *reason == ErrorReason::Unavailable) {
            break;
        }
    }
    let reviewed = seen.iter().filter(|(code, _, _)| *code == StatusCode::UNAUTHORIZED).count();
    let (code, reason, message) = seen.last().unwrap().clone();
    assert_eq!((code, reason), (StatusCode::SERVICE_UNAVAILABLE, ErrorReason::Unavailable), "{message}");
    assert!((32..52).contains(&reviewed), "{reviewed} made-up tokens were reviewed before the limit");
    // The controller's token, reviewed before the flood, still gets in while unknown tokens are refused.
    assert_eq!(
        w.http.get(w.agent.url("/v1/pools")).bearer_auth(&w.token).send().await.unwrap().status(),
        StatusCode::OK
    );
}

/// The API server stopped for as long as it lives: SIGCONT when dropped, also when the test fails.
struct Stopped(i32);

impl Stopped {
    fn new(pid: u32) -> Stopped {
        let pid = pid as i32;
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP {pid}");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// A TokenReview that cannot be made is 503 Unavailable, not 500, and has a deadline: with the API server stopped
/// (SIGSTOP: it answers nothing, as behind a partition), a caller whose token is not in the agent's cache is refused
/// once the review's 10 s have passed, instead of waiting as long as the API server is silent. Running again, the
/// API server reviews the same token and the caller is served.
#[tokio::test(flavor = "multi_thread")]
async fn a_tokenreview_outage_is_503_within_the_reviews_deadline() {
    let w = world().await;
    // A new token of the controller: reviewed by nobody yet.
    let token = w.bed.controller_token("node-0").await.unwrap();
    let (_, apiserver) = w.bed.processes().into_iter().find(|(name, _)| name == "kube-apiserver").unwrap();
    let stopped = Stopped::new(apiserver);
    let started = std::time::Instant::now();
    let resp = w.http.get(w.agent.url("/v1/pools")).bearer_auth(&token).send().await.unwrap();
    let took = started.elapsed();
    let (status, reason, message) = refusal(resp).await;
    assert_eq!((status, reason), (StatusCode::SERVICE_UNAVAILABLE, ErrorReason::Unavailable), "{message}");
    assert!(message.contains("TokenReview did not answer within 10 s"), "{message}");
    assert!(took >= Duration::from_secs(9) && took < Duration::from_secs(20), "answered after {took:?}");
    drop(stopped);
    let served = w.http.get(w.agent.url("/v1/pools")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(served.status(), StatusCode::OK);
}

/// Anyone who can reach the port gets at most `--max-connections` at once: more are closed as they are accepted,
/// and connections that say nothing give theirs back (the TLS handshake has 10 s), with nothing closed by the test.
#[tokio::test(flavor = "multi_thread")]
async fn connections_are_capped_and_silent_ones_do_not_keep_their_place() {
    let mut w = world().await;
    w.agent.kill();
    w.agent.add_args(&["--max-connections=4"]);
    w.agent.start().await.unwrap();
    let address = w.agent.endpoint.trim_start_matches("https://").to_owned();
    // Five silent connections: the agent closes one of them at once (whichever it accepted last), and then the
    // other four hold every place.
    let mut silent: Vec<std::net::TcpStream> =
        (0..5).map(|_| std::net::TcpStream::connect(&address).unwrap()).collect();
    let closed = |s: &std::net::TcpStream| {
        s.set_nonblocking(true).unwrap();
        match (&*s).read(&mut [0u8; 16]) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    use std::io::Read;
    let mut refused_at = None;
    for _ in 0..50 {
        refused_at = silent.iter().position(closed);
        if refused_at.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused_at = refused_at.expect("the agent closed none of five connections with a limit of four");
    silent.remove(refused_at);
    // A fresh client each time: a pooled connection would not need a new place.
    let ask = || async { w.agent.http().unwrap().get(w.agent.url("/v1/pools")).bearer_auth(&w.token).send().await };
    let refused = ask().await;
    assert!(refused.is_err(), "a connection beyond the limit was served: {refused:?}");
    let mut answered = None;
    for _ in 0..60 {
        if let Ok(resp) = ask().await {
            answered = Some(resp.status());
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(answered, Some(StatusCode::OK), "no place was given back within 30 s");
    assert!(silent.iter().all(closed), "the silent connections were closed (the handshake's deadline)");
    assert!(w.agent.log().contains("connection limit reached"), "{}", w.agent.log());
}

/// An authenticated caller that sends its headers and then stalls in the middle of its body gets 408 Timeout once
/// `--body-read-timeout-seconds` have passed (instead of holding a connection place forever), nothing is made, and
/// the same request sent whole afterwards is served.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_stalls_after_the_headers_is_refused_in_time() {
    let mut w = world().await;
    w.agent.kill();
    w.agent.add_args(&["--body-read-timeout-seconds=2"]);
    w.agent.start().await.unwrap();
    // A new certificate with the new process.
    w.http = w.agent.http().unwrap();
    let http = w.http.clone();
    let body = serde_json::to_vec(&create_body("fast", 4 * MI)).unwrap();
    let (first, _) = body.split_at(body.len() / 2);
    // Half the body, then nothing (the stream never ends).
    let chunks = futures::stream::iter([Ok::<_, std::io::Error>(first.to_vec())]).chain(futures::stream::pending());
    let started = std::time::Instant::now();
    let resp = w
        .agent
        .controller_request(&http, Method::PUT, &format!("/v1/volumes/{VOL}"), &w.token, 1)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    let (status, reason, message) = refusal(resp).await;
    assert_eq!((status, reason), (StatusCode::REQUEST_TIMEOUT, ErrorReason::Timeout), "{message}");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(20), "answered after {took:?}");
    assert!(w.on_disk().is_empty(), "{:?}", w.on_disk());
    assert!(w.agent.log().contains("Timeout"), "{}", w.agent.log());
    // A whole body is served as always.
    assert_eq!(w.put(VOL, 1, &create_body("fast", 4 * MI)).await.status(), StatusCode::CREATED);
}

/// Every authenticated endpoint and method refuses, with the exact status and reason: no token, a made-up token, the
/// controller's token for this node that has expired, and the controller's token for another node (401
/// Unauthenticated), and another identity's token for this node (403 Forbidden). Nothing is made on disk.
#[tokio::test(flavor = "multi_thread")]
async fn every_endpoint_refuses_everyone_but_this_nodes_controller() {
    let w = world().await;
    let other_node = w.bed.controller_token("node-1").await.unwrap();
    // Signed with the bed's key, the API server's own TokenReview refuses it as expired (and its unexpired twin not).
    let expired = w
        .bed
        .expired_service_account_token(
            testbed::agents::CONTROLLER_NAMESPACE,
            testbed::agents::CONTROLLER_SERVICE_ACCOUNT,
            &berth::agent_audience("node-0"),
        )
        .await
        .unwrap();
    let intruder = w.bed.service_account_token("default", "intruder", &berth::agent_audience("node-0")).await.unwrap();
    let endpoints = [
        (Method::GET, "/v1/pools".to_owned(), None),
        (Method::PUT, "/v1/epoch".to_owned(), None),
        (Method::GET, "/v1/volumes".to_owned(), None),
        (Method::GET, format!("/v1/volumes/{VOL}"), None),
        (Method::PUT, format!("/v1/volumes/{VOL}"), Some(create_body("fast", MI))),
        (Method::DELETE, format!("/v1/volumes/{VOL}"), None),
        (Method::POST, format!("/v1/volumes/{VOL}/expand"), Some(json!({"sizeBytes": 2 * MI}))),
        (Method::PUT, format!("/v1/volumes/{VOL}/published"), None),
    ];
    let callers = [
        (None, StatusCode::UNAUTHORIZED, ErrorReason::Unauthenticated, "no token"),
        (Some("not-a-token"), StatusCode::UNAUTHORIZED, ErrorReason::Unauthenticated, "a made-up token"),
        (Some(expired.as_str()), StatusCode::UNAUTHORIZED, ErrorReason::Unauthenticated, "an expired token"),
        (Some(other_node.as_str()), StatusCode::UNAUTHORIZED, ErrorReason::Unauthenticated, "another node's"),
        (Some(intruder.as_str()), StatusCode::FORBIDDEN, ErrorReason::Forbidden, "another identity"),
    ];
    for (method, path, body) in &endpoints {
        for (token, status, reason, who) in &callers {
            let mut req = w.http.request(method.clone(), w.agent.url(path)).header("berth-leader-epoch", "1");
            if let Some(token) = token {
                req = req.bearer_auth(token);
            }
            if let Some(body) = body {
                req = req.json(body);
            }
            let (code, got, message) = refusal(req.send().await.unwrap()).await;
            assert_eq!((code, got), (*status, *reason), "{method} {path} with {who}: {message}");
        }
    }
    assert!(w.on_disk().is_empty(), "{:?}", w.on_disk());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_older_leadership_epoch_is_refused() {
    let w = world().await;
    assert_eq!(w.put(VOL, 7, &create_body("fast", MI)).await.status(), StatusCode::CREATED);
    let stale = w.delete(VOL, 6).await;
    assert_eq!(stale.status(), StatusCode::CONFLICT);
    let body: ErrorBody = stale.json().await.unwrap();
    assert_eq!(body.reason, ErrorReason::StaleEpoch, "{}", body.message);
    // The refusal says which epoch the agent has seen, so a leader whose Lease was made anew can rise above it.
    assert_eq!(body.newest_epoch, Some(7), "{}", body.message);
    let (_, reason, _) = refusal(w.put(VOL2, 3, &create_body("fast", MI)).await).await;
    assert_eq!(reason, ErrorReason::StaleEpoch);
    assert_eq!(w.on_disk(), vec![format!("fast/{VOL}")]);
    // Missing or malformed epochs are invalid requests.
    let resp = w.http.delete(w.agent.url(&format!("/v1/volumes/{VOL}"))).bearer_auth(&w.token).send().await.unwrap();
    assert_eq!(refusal(resp).await.1, ErrorReason::Invalid);
    assert_eq!(w.delete(VOL, 8).await.status(), StatusCode::OK);
    // A new leader fences the agent before it needs it: epoch 8 is refused from then on, 9 still works.
    let fence = |epoch: u64| {
        w.http
            .put(w.agent.url("/v1/epoch"))
            .bearer_auth(&w.token)
            .header("berth-leader-epoch", epoch.to_string())
            .send()
    };
    assert_eq!(fence(9).await.unwrap().status(), StatusCode::OK);
    assert_eq!(refusal(fence(8).await.unwrap()).await.1, ErrorReason::StaleEpoch);
    assert_eq!(refusal(w.put(VOL2, 8, &create_body("fast", MI)).await).await.1, ErrorReason::StaleEpoch);
    assert_eq!(w.put(VOL2, 9, &create_body("fast", MI)).await.status(), StatusCode::CREATED);
}

/// Hostile bodies and names are refused with their exact status and reason, and nothing is made. The names are sent
/// raw (`AgentProcess::raw_request`): an HTTP client resolves `..` and `%2e%2e` before they leave it, so only raw
/// requests show what the agent does with them.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_input_is_refused_and_changes_nothing() {
    let w = world().await;
    let send = |body: Vec<u8>| {
        w.http
            .put(w.agent.url(&format!("/v1/volumes/{VOL}")))
            .bearer_auth(&w.token)
            .header("berth-leader-epoch", "1")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let invalid = (StatusCode::BAD_REQUEST, ErrorReason::Invalid);
    let bodies: Vec<(&[u8], (StatusCode, ErrorReason))> = vec![
        (b"{not json", invalid),
        (br#"{"pool":"fast","sizeBytes":1,"claim":{"namespace":"a","name":"b"},"path":"/etc"}"#, invalid),
        (br#"{"pool":"fast","sizeBytes":0,"claim":{"namespace":"a","name":"b"}}"#, invalid),
        (br#"{"pool":"fast","sizeBytes":-5,"claim":{"namespace":"a","name":"b"}}"#, invalid),
        (br#"{"pool":"../..","sizeBytes":1,"claim":{"namespace":"a","name":"b"}}"#, invalid),
        (br#"{"pool":"fast","sizeBytes":1,"claim":{"namespace":"a","name":"b"},"mode":4095}"#, invalid),
        (
            br#"{"pool":"nope","sizeBytes":1,"claim":{"namespace":"a","name":"b"}}"#,
            (StatusCode::UNPROCESSABLE_ENTITY, ErrorReason::UnknownPool),
        ),
        (
            br#"{"pool":"fast","sizeBytes":1,"volumeMode":"Block","claim":{"namespace":"a","name":"b"}}"#,
            (StatusCode::UNPROCESSABLE_ENTITY, ErrorReason::Unsupported),
        ),
        (&[b' '; 64 * 1024], (StatusCode::PAYLOAD_TOO_LARGE, ErrorReason::TooLarge)),
    ];
    for (body, expected) in bodies {
        let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        let resp = send(body.to_vec()).await.unwrap_or_else(|e| panic!("{shown}: {e:?}"));
        if expected.1 == ErrorReason::TooLarge {
            // The unread rest of the body ends the connection; the client must be told not to reuse it.
            assert_eq!(resp.headers().get("connection").map(|v| v.as_bytes()), Some(&b"close"[..]), "{shown}");
        }
        let (status, reason, message) = refusal(resp).await;
        assert_eq!((status, reason), expected, "{shown}: {message}");
        assert!(!message.is_empty());
    }

    let good = serde_json::to_vec(&create_body("fast", MI)).unwrap();
    let not_found = (StatusCode::NOT_FOUND, ErrorReason::NotFound);
    let long = format!("/v1/volumes/{}", "a".repeat(300));
    let names: Vec<(&str, &str, (StatusCode, ErrorReason))> = vec![
        ("PUT", "/v1/volumes/..", invalid),
        ("PUT", "/v1/volumes/.", invalid),
        ("PUT", "/v1/volumes/%2E%2E", invalid),
        ("PUT", "/v1/volumes/%2e%2e", invalid),
        ("PUT", "/v1/volumes/..%2F..%2Fetc", invalid),
        ("PUT", "/v1/volumes/a%2Fb", invalid),
        ("PUT", "/v1/volumes/a%2F..%2F..%2Fetc", invalid),
        ("PUT", "/v1/volumes/a%00b", invalid),
        ("PUT", "/v1/volumes/pvc-%C3%A9", invalid),
        // Not UTF-8 once decoded: found by fuzz/fuzz_targets/api_requests.rs (it was axum's plain-text 400).
        ("PUT", "/v1/volumes/pvc-%FF", invalid),
        ("PUT", &long, invalid),
        ("PUT", "/v1/volumes/Upper", invalid),
        // More than one segment is no endpoint, `..` or not.
        ("PUT", "/v1/volumes/../../etc", not_found),
        ("PUT", "/v1/volumes/a/../b", not_found),
        ("DELETE", "/v1/volumes/..", invalid),
        ("DELETE", "/v1/volumes/%2e%2e?unpublishedOnly=true", invalid),
        ("POST", "/v1/volumes/%2e%2e/expand", invalid),
        ("PUT", "/v1/volumes/%2e%2e/published", invalid),
    ];
    let auth = format!("Bearer {}", w.token);
    let headers = [("authorization", auth.as_str()), ("berth-leader-epoch", "1"), ("content-type", "application/json")];
    let grow = br#"{"sizeBytes":2097152}"#;
    for (method, target, expected) in names {
        // A body the endpoint takes, so that the name is what is wrong.
        let body: &[u8] = match method {
            "PUT" if !target.ends_with("/published") => &good,
            "POST" => grow,
            _ => b"",
        };
        let (status, body) = w.agent.raw_request(method, target, &headers, body).await.unwrap();
        let refusal: ErrorBody = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!("{method} {target}: {status}, no ErrorBody ({e}): {}", String::from_utf8_lossy(&body))
        });
        assert_eq!(
            (status, refusal.reason),
            (expected.0.as_u16(), expected.1),
            "{method} {target}: {}",
            refusal.message
        );
    }
    assert!(w.on_disk().is_empty(), "{:?}", w.on_disk());
    let staging = w.agent.pool_root("fast").join(".berth-tmp");
    let left: Vec<_> = std::fs::read_dir(&staging).into_iter().flatten().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "left in {}: {left:?}", staging.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_shows_the_pools_and_sigterm_exits_cleanly() {
    let mut w = world().await;
    assert_eq!(w.put(VOL, 1, &create_body("fast", 50 * MI)).await.status(), StatusCode::CREATED);
    let nodes: Api<BerthNode> = Api::all(w.bed.client());
    wait_for(&nodes, "node-0", Duration::from_secs(10), |n| n.status.as_ref().is_some_and(|s| s.summary.volumes == 1))
        .await
        .unwrap();
    let out = w.bed.kubectl(&["get", "berthnodes"]).unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "NODE", "POOLS", "FREE", "CAPACITY", "VOLUMES", "AGE"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..3], ["node-0", "node-0", "fast,slow"]);
    assert!(row[3].ends_with("Mi"), "free {}", row[3]);
    assert_eq!(row[5], "1");

    let status = w.agent.terminate(Duration::from_secs(15)).expect("the agent exits after SIGTERM");
    assert!(status.success(), "{status}");
    assert!(w.agent.log().contains("shutting down"));
}

/// A pool whose disk was not there when the agent started (marker missing) is read once it is: until then its
/// volumes are unknown, so a delete cannot answer "there was none" and must refuse instead of leaking the data.
#[tokio::test(flavor = "multi_thread")]
async fn a_pool_not_ready_at_start_is_read_when_it_becomes_ready() {
    let mut w = world().await;
    let made: Volume = w.put(VOL, 1, &create_body("fast", MI)).await.json().await.unwrap();
    w.agent.kill();
    let marker = w.agent.pool_root("fast").join(".berth-pool");
    let hidden = w.agent.pool_root("fast").join("marker-while-unmounted");
    std::fs::rename(&marker, &hidden).unwrap();
    w.agent.start().await.unwrap();
    w.http = w.agent.http().unwrap();

    let (code, reason, message) = refusal(w.delete(VOL, 1).await).await;
    assert_eq!((code, reason), (StatusCode::SERVICE_UNAVAILABLE, ErrorReason::PoolNotReady), "{message}");
    assert!(Path::new(&made.path).exists(), "the data of the volume was touched");
    let listed: VolumeList = w.get("/v1/volumes").await;
    assert!(listed.volumes.is_empty());

    std::fs::rename(&hidden, &marker).unwrap();
    let fast = w.pool("fast").await;
    assert!(fast.ready && fast.volumes == 1 && fast.allocated_bytes == MI, "{fast:?}");
    // Known again: the same request is answered idempotently, another is a conflict, delete works.
    assert_eq!(w.put(VOL, 1, &create_body("fast", MI)).await.status(), StatusCode::OK);
    assert_eq!(refusal(w.put(VOL, 1, &create_body("fast", 2 * MI)).await).await.1, ErrorReason::Conflict);
    let del = w.delete(VOL, 1).await;
    assert_eq!(del.json::<Value>().await.unwrap(), json!({"deleted": true}));
    assert!(!Path::new(&made.path).exists());
}

/// The BerthNode is not rewritten while nothing changes, and a disk filling up outside Berth reaches it without
/// any Berth operation (the agent samples free space every 0.5 s; how fast is a benchmark's business, the bound
/// here only keeps the test from hanging).
#[tokio::test(flavor = "multi_thread")]
async fn berthnode_is_quiet_when_idle_and_quick_when_the_disk_fills() {
    let w = world().await;
    let nodes: Api<BerthNode> = Api::all(w.bed.client());
    let before = nodes.get("node-0").await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle = nodes.get("node-0").await.unwrap();
    assert_eq!(before.metadata.resource_version, idle.metadata.resource_version, "rewritten while idle");

    let free_before = idle.status.unwrap().pools.iter().find(|p| p.name == "fast").unwrap().free_bytes;
    let filler = w.agent.pool_root("fast").parent().unwrap().join("outside-berth");
    let started = std::time::Instant::now();
    std::fs::write(&filler, vec![7u8; 64 * MI as usize]).unwrap();
    std::fs::File::open(&filler).unwrap().sync_all().unwrap();
    let seen = wait_for(&nodes, "node-0", Duration::from_secs(5), |n| {
        n.status
            .as_ref()
            .is_some_and(|s| s.pools.iter().any(|p| p.name == "fast" && p.free_bytes + 60 * MI < free_before))
    })
    .await
    .unwrap();
    println!("the BerthNode showed the filled disk after {:?}", started.elapsed());
    assert_ne!(seen.metadata.resource_version, idle.metadata.resource_version);
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_grow_when_the_pool_has_room_and_never_shrink() {
    let mut w = world().await;
    let made: Volume = w.put(VOL, 1, &create_body("fast", 8 * MI)).await.json().await.unwrap();
    std::fs::write(Path::new(&made.path).join("db.sqlite"), "precious").unwrap();
    let expand = |size: u64, epoch: u64| {
        w.http
            .post(w.agent.url(&format!("/v1/volumes/{VOL}/expand")))
            .bearer_auth(&w.token)
            .header("berth-leader-epoch", epoch.to_string())
            .json(&json!({"sizeBytes": size}))
            .send()
    };
    // What a crash between writing the new marker and renaming it leaves must not block every later expand.
    let volume_dir = Path::new(&made.path).parent().unwrap().to_owned();
    std::fs::write(volume_dir.join("volume.json.tmp"), "{\"half\": ").unwrap();
    let resp = expand(32 * MI, 1).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", resp.text().await.unwrap());
    let resp = expand(32 * MI, 1).await.unwrap();
    let grown: Volume = resp.json().await.unwrap();
    assert!(!volume_dir.join("volume.json.tmp").exists());
    assert_eq!((grown.size_bytes, grown.path.clone()), (32 * MI, made.path.clone()));
    assert_eq!(w.pool("fast").await.allocated_bytes, 32 * MI);
    // The same size again changes nothing; smaller is refused; more than the pool has is refused.
    assert_eq!(expand(32 * MI, 1).await.unwrap().status(), StatusCode::OK);
    let (code, reason, message) = refusal(expand(16 * MI, 1).await.unwrap()).await;
    assert_eq!((code, reason), (StatusCode::BAD_REQUEST, ErrorReason::Invalid), "{message}");
    let (code, reason, message) = refusal(expand(4096 * MI, 1).await.unwrap()).await;
    assert_eq!((code, reason), (StatusCode::INSUFFICIENT_STORAGE, ErrorReason::InsufficientSpace), "{message}");
    let other = w.http.post(w.agent.url(&format!("/v1/volumes/{VOL2}/expand"))).bearer_auth(&w.token);
    let resp = other.header("berth-leader-epoch", "1").json(&json!({"sizeBytes": MI})).send().await.unwrap();
    assert_eq!(refusal(resp).await.1, ErrorReason::NotFound);
    assert_eq!(refusal(expand(64 * MI, 0).await.unwrap()).await.1, ErrorReason::StaleEpoch);
    // Hostile bodies: not JSON, an unknown field, a size that is not a number, too large.
    let url = w.agent.url(&format!("/v1/volumes/{VOL}/expand"));
    let hostile: [Vec<u8>; 4] = [
        b"{not json".to_vec(),
        br#"{"sizeBytes": 67108864, "path": "/etc"}"#.to_vec(),
        br#"{"sizeBytes": "64Mi"}"#.to_vec(),
        vec![b' '; 64 * 1024],
    ];
    for (body, want) in hostile.into_iter().zip([
        ErrorReason::Invalid,
        ErrorReason::Invalid,
        ErrorReason::Invalid,
        ErrorReason::TooLarge,
    ]) {
        let resp = w
            .http
            .post(&url)
            .bearer_auth(&w.token)
            .header("berth-leader-epoch", "1")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(refusal(resp).await.1, want);
    }
    assert_eq!(w.pool("fast").await.allocated_bytes, 32 * MI, "refused requests changed nothing");

    // The new size is on disk: a restarted agent has it, and the data is there.
    w.agent.kill();
    w.agent.start().await.unwrap();
    w.http = w.agent.http().unwrap();
    let listed: VolumeList = w.get("/v1/volumes").await;
    assert_eq!(listed.volumes.iter().map(|v| v.size_bytes).collect::<Vec<_>>(), [32 * MI]);
    assert_eq!(std::fs::read_to_string(Path::new(&made.path).join("db.sqlite")).unwrap(), "precious");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_published_volume_is_never_deleted_as_unpublished_also_after_a_restart() {
    let mut w = world().await;
    let made: Volume = w.put(VOL, 1, &create_body("fast", MI)).await.json().await.unwrap();
    assert_eq!(made.published, Some(false), "a new volume has no PV yet");
    let other: Volume = w.put(VOL2, 1, &create_body("fast", MI)).await.json().await.unwrap();
    let dir = w.agent.pool_root("fast").join(VOL);
    assert!(dir.join("unpublished").is_file(), "the mark is on disk beside the marker");

    let published = w.publish(VOL, 1).await;
    assert_eq!(published.status(), StatusCode::OK);
    assert_eq!(published.json::<Volume>().await.unwrap().published, Some(true));
    assert!(!dir.join("unpublished").exists());
    assert_eq!(w.publish(VOL, 1).await.status(), StatusCode::OK, "publishing twice is fine");
    let (code, reason, _) = refusal(w.publish("pvc-00000000-0000-4000-8000-00000000000f", 1).await).await;
    assert_eq!((code, reason), (StatusCode::NOT_FOUND, ErrorReason::NotFound));
    // Publishing is a mutation, fenced like the others: once epoch 9 was seen, 8 is refused.
    assert_eq!(w.put(VOL2, 9, &create_body("fast", MI)).await.status(), StatusCode::OK);
    assert_eq!(refusal(w.publish(VOL2, 8).await).await.1, ErrorReason::StaleEpoch);

    // The mark survives a restart, both ways.
    std::fs::write(Path::new(&made.path).join("kept"), "data").unwrap();
    w.agent.kill();
    w.agent.start().await.unwrap();
    w.http = w.agent.http().unwrap();
    let listed: VolumeList = w.get("/v1/volumes").await;
    let flags: Vec<(String, Option<bool>)> = listed.volumes.iter().map(|v| (v.name.clone(), v.published)).collect();
    assert_eq!(flags, vec![(VOL.to_owned(), Some(true)), (VOL2.to_owned(), Some(false))]);

    // The conditional delete: refused for the published volume (nothing changes), done for the other.
    let (code, reason, message) = refusal(w.delete_unpublished(VOL, 9).await).await;
    assert_eq!((code, reason), (StatusCode::CONFLICT, ErrorReason::Published), "{message}");
    assert_eq!(std::fs::read_to_string(Path::new(&made.path).join("kept")).unwrap(), "data");
    let del = w.delete_unpublished(VOL2, 9).await;
    assert_eq!(del.json::<Value>().await.unwrap(), json!({"deleted": true}));
    assert!(!Path::new(&other.path).exists());
    // A query the agent does not know is refused, not ignored.
    let resp = w
        .http
        .delete(w.agent.url(&format!("/v1/volumes/{VOL}?force=true")))
        .bearer_auth(&w.token)
        .header("berth-leader-epoch", "9")
        .send()
        .await
        .unwrap();
    assert_eq!(refusal(resp).await.1, ErrorReason::Invalid);
    assert_eq!(w.on_disk(), vec![format!("fast/{VOL}")]);
    // On the other endpoints too: a create, an expansion, a publish or a read with a query the caller believes
    // means something (a dry run) is refused, not done as if it had not been asked.
    let (vol3, vol3_url) =
        ("pvc-00000000-0000-4000-8000-00000000000e", "/v1/volumes/pvc-00000000-0000-4000-8000-00000000000e");
    for (method, path, body) in [
        (reqwest::Method::PUT, format!("{vol3_url}?dryRun=true"), Some(create_body("fast", MI))),
        (reqwest::Method::POST, format!("/v1/volumes/{VOL}/expand?dryRun=true"), Some(json!({"sizeBytes": 2 * MI}))),
        (reqwest::Method::PUT, format!("/v1/volumes/{VOL}/published?x=1"), None),
        (reqwest::Method::GET, "/v1/volumes?watch=true".to_owned(), None),
    ] {
        let mut request =
            w.http.request(method.clone(), w.agent.url(&path)).bearer_auth(&w.token).header("berth-leader-epoch", "9");
        if let Some(body) = body {
            request = request.json(&body);
        }
        let (code, reason, message) = refusal(request.send().await.unwrap()).await;
        assert_eq!((code, reason), (StatusCode::BAD_REQUEST, ErrorReason::Invalid), "{method} {path}: {message}");
        assert!(message.contains("no query parameters"), "{method} {path}: {message}");
    }
    assert_eq!(w.on_disk(), vec![format!("fast/{VOL}")], "no {vol3}");
    let listed: VolumeList = w.get("/v1/volumes").await;
    assert_eq!(listed.volumes.iter().map(|v| v.size_bytes).collect::<Vec<_>>(), [MI], "not grown");
    // The plain delete (a Delete-policy PV released) still removes a published volume.
    assert_eq!(w.delete(VOL, 9).await.json::<Value>().await.unwrap(), json!({"deleted": true}));
    assert!(w.on_disk().is_empty());
}

/// A volume a pod still has is not deleted (issue 19): kubelet bind-mounts a `local` PV's directory into each pod
/// that uses it, and a claim deleted before its pod is gone gets its volume deleted while that mount lives. The
/// agent reads the host's mount table and refuses with 409 `InUse` (as the delete and the orphan audit's
/// `unpublishedOnly` delete); nothing is moved or removed; once the mount is gone the delete succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_a_pod_still_mounts_is_not_deleted_until_it_is_unmounted() {
    use testbed::bind_mount::BindMount;
    let w = world().await;
    let made: Volume = w.put(VOL, 1, &create_body("fast", 10 * MI)).await.json().await.unwrap();
    let data = Path::new(&made.path).to_owned();
    std::fs::create_dir_all(data.join("logs/app")).unwrap();
    std::fs::write(data.join("db.sqlite"), "precious").unwrap();
    // Where kubelet would mount it for a pod: outside the pool, on another filesystem than the volume's.
    let pods = w.bed.dir().join("kubelet/pods");
    let pod = BindMount::new(&data, &pods.join("u1/volumes/kubernetes.io~local-volume").join(VOL)).unwrap();

    let held = |message: &str, at: &Path| {
        assert!(message.contains(&at.display().to_string()), "the refusal names the mount: {message}");
    };
    let (status, reason, message) = refusal(w.delete(VOL, 1).await).await;
    assert_eq!((status, reason), (StatusCode::CONFLICT, ErrorReason::InUse), "{message}");
    held(&message, pod.target());
    let (status, reason, message) = refusal(w.delete_unpublished(VOL, 1).await).await;
    assert_eq!((status, reason), (StatusCode::CONFLICT, ErrorReason::InUse), "the audit's delete too: {message}");
    // Nothing changed: the volume is listed, its files are there, and the pod still sees them.
    assert_eq!(w.on_disk(), vec![format!("fast/{VOL}")]);
    let listed: VolumeList = w.get("/v1/volumes").await;
    assert_eq!(listed.volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), [VOL]);
    assert_eq!(std::fs::read_to_string(pod.target().join("db.sqlite")).unwrap(), "precious");
    assert!(std::fs::read_dir(w.agent.pool_root("fast").join(".berth-tmp")).map_or(true, |mut d| d.next().is_none()));

    // The pod goes; another one mounts only a subdirectory (a subPath): still in use.
    pod.unmount().unwrap();
    let sub = BindMount::new(&data.join("logs/app"), &pods.join("u2/volume-subpaths").join(VOL).join("c/0")).unwrap();
    let (status, reason, message) = refusal(w.delete(VOL, 1).await).await;
    assert_eq!((status, reason), (StatusCode::CONFLICT, ErrorReason::InUse), "{message}");
    held(&message, sub.target());
    assert_eq!(std::fs::read_to_string(data.join("db.sqlite")).unwrap(), "precious");

    // Nothing holds it any more: deleted.
    sub.unmount().unwrap();
    let del = w.delete(VOL, 1).await;
    assert_eq!(del.status(), StatusCode::OK);
    assert_eq!(del.json::<Value>().await.unwrap(), json!({"deleted": true}));
    assert!(w.on_disk().is_empty());
    let refused = r#"operation="delete""#;
    assert!(w.agent.log().lines().any(|l| l.contains(refused) && l.contains("InUse")), "{}", w.agent.log());
}
