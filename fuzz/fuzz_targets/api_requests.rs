//! The agent's HTTP API in process: the input is raw HTTP/1.1 requests (as they arrive after TLS, paths and
//! headers untouched by any client), at most 8 of them, each sent to the agent's real router (`api::router`:
//! authentication layer, body limit, fencing, handlers) over a fresh agent with a real hostpath pool in a directory
//! of its own, on tmpfs. The API server's TokenReview is stood in for by a service that knows four tokens
//! (`TOKENS`); any other token is not authenticated, as the API server would say.
//!
//! Properties, for every request:
//! - a `/v1` request without the controller's token for this node never succeeds;
//! - no request gets 500: an I/O error in a private directory on tmpfs is a bug;
//! - every refusal of the agent's own is a JSON `ErrorBody` whose status is the one docs/agent-api.md gives its
//!   reason;
//! - a refused request changes nothing on disk (only a newer leadership epoch may be recorded), and nothing
//!   outside the pool's root ever changes;
//! - a created volume's answer names a valid volume whose path is `<root>/<name>/data`, a directory that exists;
//!
//! and after the last request, the agent's inventory is exactly the volumes on disk.
#![no_main]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use berth::agent_api::{ErrorBody, ErrorReason, Volume};
use berth_agent::agent::{Agent, Pool};
use berth_agent::api::{ApiState, router};
use berth_agent::auth::Authenticator;
use berth_agent::backend::hostpath::HostPath;
use berth_agent::config::AgentConfig;
use berth_agent::epoch::EpochFence;
use berth_agent::in_use::MountTables;
use berth_agent::metrics::Metrics;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const NODE: &str = "node-0";
const CONTROLLER: &str = "system:serviceaccount:berth-system:berth-controller";
const MAX_REQUESTS: usize = 8;
/// Bodies beyond the agent's limit (16 KiB) are cut here; the agent refuses them all the same.
const MAX_BODY: usize = 20 << 10;

/// What the stand-in TokenReview answers for a token: `None` when the API server cannot be reached.
fn review(token: &str) -> Option<TokenReviewStatus> {
    let ours = vec![berth::agent_audience(NODE)];
    let user = |name: &str| Some(UserInfo { username: Some(name.into()), ..Default::default() });
    let authenticated = |audiences: Vec<String>, name: &str| TokenReviewStatus {
        authenticated: Some(true),
        audiences: Some(audiences),
        user: user(name),
        ..Default::default()
    };
    match token {
        "controller" => Some(authenticated(ours, CONTROLLER)),
        // Authenticated, but for another node's agent: the agent must check the audience itself.
        "other-node" => Some(authenticated(vec![berth::agent_audience("node-1")], CONTROLLER)),
        "intruder" => Some(authenticated(ours, "system:serviceaccount:default:intruder")),
        "outage" => None,
        _ => Some(TokenReviewStatus { authenticated: Some(false), ..Default::default() }),
    }
}

struct Shared {
    runtime: tokio::runtime::Runtime,
    client: kube::Client,
    dir: PathBuf,
}

static SHARED: OnceLock<Shared> = OnceLock::new();

fn shared() -> &'static Shared {
    SHARED.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let service = tower::service_fn(|request: http::Request<kube::client::Body>| async move {
            let body = request.into_body().collect().await?.to_bytes();
            let mut review_: TokenReview = serde_json::from_slice(&body)?;
            let (status, answer) = match review(&review_.spec.token) {
                Some(s) => (StatusCode::CREATED, Some(s)),
                None => (StatusCode::INTERNAL_SERVER_ERROR, None),
            };
            review_.status = answer;
            let json = serde_json::to_vec(&review_)?;
            let response = http::Response::builder().status(status).header("content-type", "application/json");
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(response.body(Full::new(Bytes::from(json)))?)
        });
        // The client's buffer task lives on this runtime, driven whenever an input runs.
        let client = runtime.block_on(async { kube::Client::new(service, "default") });
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = base.join(format!("berth-fuzz-api-{}", std::process::id()));
        // libFuzzer ends a run with exit(): the last input's directory goes with it. After a crash it stays, to look at.
        unsafe { libc::atexit(remove_dir) };
        Shared { runtime, client, dir }
    })
}

extern "C" fn remove_dir() {
    if let Some(shared) = SHARED.get() {
        let _ = std::fs::remove_dir_all(&shared.dir);
    }
}

/// The requests in `data`: raw HTTP/1.1, each body as long as its Content-Length says (what is left, at most).
/// Requests that hyper would refuse before the agent saw them (no valid method, target or header) end the list.
fn requests(mut data: &[u8]) -> Vec<http::Request<Body>> {
    let mut out = Vec::new();
    while out.len() < MAX_REQUESTS {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(head)) = parsed.parse(data) else { break };
        let mut builder = http::Request::builder().method(parsed.method.unwrap_or_default().as_bytes());
        builder = builder.uri(parsed.path.unwrap_or_default());
        let mut length = 0;
        for h in parsed.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                length = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0);
            }
            builder = builder.header(h.name, h.value);
        }
        data = &data[head..];
        let length: usize = length.min(data.len()).min(MAX_BODY);
        let body = Bytes::copy_from_slice(&data[..length]);
        data = &data[length..];
        let Ok(request) = builder.body(Body::from(body)) else { break };
        out.push(request);
    }
    out
}

/// Every file and directory under `dir` with its contents (directories: empty), by path relative to `dir`.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap().map(Result::unwrap) {
            let path = entry.path();
            let relative = path.strip_prefix(dir).unwrap().to_path_buf();
            if entry.file_type().unwrap().is_dir() {
                todo.push(path);
                out.insert(relative, Vec::new());
            } else {
                out.insert(relative, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

/// The status docs/agent-api.md gives a refusal's reason.
fn documented_status(reason: ErrorReason) -> u16 {
    use ErrorReason::*;
    match reason {
        Invalid => 400,
        Unauthenticated => 401,
        Forbidden => 403,
        NotFound => 404,
        Timeout => 408,
        Conflict | StaleEpoch | Published | InUse => 409,
        TooLarge => 413,
        UnknownPool | Unsupported => 422,
        PoolNotReady | ShuttingDown | Unavailable => 503,
        InsufficientSpace => 507,
        Internal => 500,
    }
}

fn epoch_file(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("state/leader-epoch")).map_or(0, |t| t.trim().parse().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let requests = requests(data);
    if requests.is_empty() {
        return;
    }
    let shared = shared();
    let dir = &shared.dir;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("state")).unwrap();
    std::fs::create_dir_all(dir.join("outside")).unwrap();
    std::fs::write(dir.join("outside/keep"), b"not the agent's").unwrap();
    let root = dir.join("pools/fast");
    let config = AgentConfig::from_toml(&format!(
        "[[pool]]\nname = \"fast\"\nbackend = \"hostpath\"\nroot = {:?}\ncapacity = \"64Mi\"\n\n\
         [[pool]]\nname = \"cold\"\nbackend = \"hostpath\"\nroot = {:?}\n",
        root,
        dir.join("pools/cold")
    ))
    .unwrap();
    // The agent's own /proc: what a delete checks for mounts of the volume (none here).
    let mounts = MountTables::new(Path::new("/proc"));
    HostPath::new("fast", &root, mounts.clone()).init().unwrap();
    let pools = config
        .pools
        .iter()
        .map(|p| Pool { config: p.clone(), backend: Box::new(HostPath::new(&p.name, &p.root, mounts.clone())) as _ })
        .collect();
    let fence = EpochFence::load(dir.join("state/leader-epoch")).unwrap();
    let agent = Arc::new(Agent::start(NODE.into(), pools, fence));
    let state = Arc::new(ApiState {
        agent: agent.clone(),
        auth: Authenticator::new(shared.client.clone(), berth::agent_audience(NODE), CONTROLLER.into()),
        metrics: Arc::new(Metrics::new()),
        shutting_down: AtomicBool::new(false),
        body_read_timeout: Duration::from_secs(1),
    });
    let app = router(state);

    for request in requests {
        let what = format!("{} {}", request.method(), request.uri());
        let v1 = request.uri().path().starts_with("/v1");
        let controller =
            request.headers().get_all(http::header::AUTHORIZATION).iter().any(|v| v == "Bearer controller");
        let before = snapshot(dir);
        let epoch_before = epoch_file(dir);
        let response = shared.runtime.block_on(app.clone().oneshot(request)).unwrap();
        let status = response.status();
        let body = shared.runtime.block_on(response.into_body().collect()).unwrap().to_bytes();
        let after = snapshot(dir);
        let said = String::from_utf8_lossy(&body);

        assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{what}: {said}");
        assert!(epoch_file(dir) >= epoch_before, "{what}: the leadership epoch went back");
        let outside = |s: &BTreeMap<PathBuf, Vec<u8>>| -> Vec<_> {
            s.iter()
                .filter(|(p, _)| !p.starts_with("pools/fast") && !p.starts_with("state"))
                .map(|(p, c)| (p.clone(), c.clone()))
                .collect()
        };
        assert_eq!(outside(&before), outside(&after), "{what}: changed something outside the pool's root");
        if v1 && !controller {
            assert!(!status.is_success(), "{what}: {status} without the controller's token: {said}");
        }
        if status.is_success() {
            if v1 && status == StatusCode::CREATED {
                let volume: Volume = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{what}: {e}: {said}"));
                assert!(berth::validate::volume_name(&volume.name).is_ok(), "{what}: {said}");
                assert_eq!(Path::new(&volume.path), root.join(&volume.name).join("data"), "{what}");
                assert!(Path::new(&volume.path).is_dir(), "{what}: {said}");
            }
            continue;
        }
        let mut unchanged = after.clone();
        unchanged.remove(Path::new("state/leader-epoch"));
        let mut was = before.clone();
        was.remove(Path::new("state/leader-epoch"));
        assert_eq!(was, unchanged, "{what}: refused with {status} ({said}) but changed the disk");
        if status.is_client_error() || status.is_server_error() {
            let refusal: ErrorBody = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("{what}: {status} is no ErrorBody ({e}): {said}"));
            assert!(!refusal.message.is_empty(), "{what}");
            let expected = match status {
                StatusCode::METHOD_NOT_ALLOWED => (405, ErrorReason::Invalid),
                _ => (documented_status(refusal.reason), refusal.reason),
            };
            assert_eq!((status.as_u16(), refusal.reason), expected, "{what}: {said}");
        }
    }

    let mut listed: Vec<String> = agent.volumes().into_iter().map(|v| v.name).collect();
    listed.sort();
    let mut on_disk: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('.'))
        .collect();
    on_disk.sort();
    assert_eq!(listed, on_disk, "the inventory is not what is on disk");
});
