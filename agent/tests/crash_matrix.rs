//! The agent killed at every step of every operation on a hostpath pool (issue 19; clones, issue 20): for each crash point of
//! `berth_agent::failpoints::POINTS` the `berth-agent-failpoints` build is started with that point armed, the
//! operation is asked for, and the agent dies there by SIGKILL before it answers. What the crash left is checked,
//! the plain agent restarts on the same config and state, and the request is retried as the controller would until
//! it succeeds. Then: exactly one volume directory per claim (none after a delete), its marker and mark as the
//! operations said, nothing left in `.berth-tmp/` once debris removal is done, `GET /v1/volumes` equal to the disk,
//! and the same inventory again after the next restart. Real HTTPS, real TokenReview, a real ext4 disk (the host has
//! no project quotas: project IDs are checked in the VM tier's quota tests). The lvm points run in the VM tier
//! (`vm_host::lvm_crash_matrix`).

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth::agent_api::{Volume, VolumeList};
use berth::berth_node::BerthNode;
use berth_agent::failpoints::POINTS;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use testbed::agents::{AgentProcess, PoolSpec};
use testbed::{FsType, TestBed, TestBedConfig};

const MI: u64 = 1 << 20;
const SIZE: u64 = 4 * MI;
const GROWN: u64 = 8 * MI;
const POOL: &str = "fast";
/// How long the restarted agent has to do what it was asked (it answers at once) and to remove debris (a few
/// small directories).
const WITHIN: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    Publish,
    Expand,
    Delete,
    /// A clone of another volume (made first, with a pod's files) into the point's volume.
    Clone,
}

/// What a crash at a point leaves on disk, before anything restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Left {
    /// The volume is not in place; its pieces are one entry of `.berth-tmp/` (debris).
    Staged,
    /// The volume is in place with nothing staged; its marker says `size`, a half-done marker replacement
    /// (`volume.json.tmp`) is beside it or not, and it has been published or not.
    InPlace { size: u64, tmp_marker: bool, published: bool },
}

const fn in_place(size: u64, tmp_marker: bool, published: bool) -> Left {
    Left::InPlace { size, tmp_marker, published }
}

/// Every hostpath point: the operation that reaches it and what a crash there leaves.
const HOSTPATH: &[(&str, Op, Left)] = &[
    ("hostpath-create-after-mkdir", Op::Create, Left::Staged),
    ("hostpath-create-after-project", Op::Create, Left::Staged),
    ("hostpath-create-after-data-dir", Op::Create, Left::Staged),
    ("hostpath-create-after-unpublished-mark", Op::Create, Left::Staged),
    ("hostpath-create-after-marker", Op::Create, Left::Staged),
    ("hostpath-create-after-staging-sync", Op::Create, Left::Staged),
    ("hostpath-create-after-rename", Op::Create, in_place(SIZE, false, false)),
    ("hostpath-create-after-root-sync", Op::Create, in_place(SIZE, false, false)),
    ("hostpath-clone-after-file", Op::Clone, Left::Staged),
    ("hostpath-clone-after-copy", Op::Clone, Left::Staged),
    ("hostpath-publish-after-unmark", Op::Publish, in_place(SIZE, false, true)),
    ("hostpath-expand-after-quota", Op::Expand, in_place(SIZE, false, false)),
    ("hostpath-expand-after-tmp-marker", Op::Expand, in_place(SIZE, true, false)),
    ("hostpath-expand-after-rename", Op::Expand, in_place(GROWN, false, false)),
    ("hostpath-expand-after-sync", Op::Expand, in_place(GROWN, false, false)),
    ("hostpath-detach-after-rename", Op::Delete, Left::Staged),
    ("hostpath-detach-after-sync", Op::Delete, Left::Staged),
    ("hostpath-purge-after-release-project", Op::Delete, Left::Staged),
    ("hostpath-purge-after-unlink", Op::Delete, Left::Staged),
];

/// A volume as the inventory should hold it: size and whether it has been published.
type Model = BTreeMap<String, (u64, bool)>;

/// Fields drop in order: the agent goes before the bed, whose API server would otherwise wait for its watches.
struct World {
    agent: AgentProcess,
    bed: TestBed,
    http: reqwest::Client,
    token: String,
    failpoints_bin: PathBuf,
}

impl World {
    fn root(&self) -> &Path {
        self.agent.pool_root(POOL)
    }

    fn staging(&self) -> PathBuf {
        self.root().join(".berth-tmp")
    }

    /// Entries of `.berth-tmp/` (none when the agent never made it).
    fn staged(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.staging()) else { return vec![] };
        let mut names: Vec<String> = entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    /// The volumes on disk as their markers and marks say, after checking that the pool root holds nothing but
    /// volume directories and the agent's own dot entries, and each volume nothing but its marker, `data/` and its
    /// `unpublished` mark.
    fn on_disk(&self) -> Model {
        let mut model = Model::new();
        for entry in std::fs::read_dir(self.root()).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == ".berth-pool" || name == ".berth-tmp" {
                continue;
            }
            assert!(entry.file_type().unwrap().is_dir(), "{name} in the pool root is not a volume directory");
            let mut inside: Vec<String> = std::fs::read_dir(entry.path())
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            inside.sort();
            let published = !inside.iter().any(|n| n == "unpublished");
            let expected: &[&str] =
                if published { &["data", "volume.json"] } else { &["data", "unpublished", "volume.json"] };
            assert_eq!(inside, expected, "what volume {name} holds");
            let marker: Value =
                serde_json::from_str(&std::fs::read_to_string(entry.path().join("volume.json")).unwrap()).unwrap();
            assert_eq!(marker["name"], name.as_str());
            model.insert(name, (marker["sizeBytes"].as_u64().unwrap(), published));
        }
        model
    }

    /// `GET /v1/volumes`, as a model.
    async fn listed(&self) -> Model {
        let resp = self.http.get(self.agent.url("/v1/volumes")).bearer_auth(&self.token).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let list: VolumeList = resp.json().await.unwrap();
        list.volumes.into_iter().map(|v| (v.name, (v.size_bytes, v.published == Some(true)))).collect()
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.agent.controller_request(&self.http, method, path, &self.token, 1)
    }

    /// Sends `op`'s request for `volume` once: its status and body, or the transport error.
    async fn send(&self, op: Op, volume: &str) -> Result<(StatusCode, Value), reqwest::Error> {
        let path = format!("/v1/volumes/{volume}");
        let request = match op {
            Op::Create => self.request(Method::PUT, &path).json(&create_body(volume)),
            Op::Clone => {
                let mut body = create_body(volume);
                body["source"] = source_of(volume).into();
                self.request(Method::PUT, &path).json(&body)
            }
            Op::Publish => self.request(Method::PUT, &format!("{path}/published")),
            Op::Expand => self.request(Method::POST, &format!("{path}/expand")).json(&json!({"sizeBytes": GROWN})),
            Op::Delete => self.request(Method::DELETE, &path),
        };
        let resp = request.send().await?;
        let status = resp.status();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// The plain agent again, after its last run ended.
    async fn restart_plain(&mut self) {
        self.agent.start().await.unwrap();
        self.http = self.agent.http().unwrap();
    }

    fn stop(&mut self) {
        let status = self.agent.terminate(Duration::from_secs(15)).expect("the agent stops on SIGTERM");
        assert!(status.success(), "{status}");
    }

    /// The failpoints build with `point` armed, in place of the running agent (stopped cleanly).
    async fn restart_armed(&mut self, point: &str) {
        self.stop();
        let armed = format!("{point}=return");
        self.agent.start_as(&self.failpoints_bin.clone(), &[("FAILPOINTS", &armed)]).await.unwrap();
        self.http = self.agent.http().unwrap();
    }

    /// Waits for the agent to die at `point`: by SIGKILL, having said where.
    fn expect_killed_at(&mut self, point: &str) {
        let status = self
            .agent
            .wait_exit(Duration::from_secs(15))
            .unwrap_or_else(|| panic!("the agent did not die at {point}; its log:\n{}", self.agent.log()));
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{point}: {status}");
        let said = format!("failpoint=\"{point}\"");
        let lines = self.agent.log().lines().filter(|l| l.contains("killing the agent") && l.contains(&said)).count();
        assert_eq!(lines, 1, "the agent's log names {point} as where it died, once");
    }

    /// Polls until `.berth-tmp/` is empty: debris removal is done.
    async fn debris_removed(&self, point: &str) {
        let deadline = Instant::now() + WITHIN;
        while !self.staged().is_empty() {
            assert!(
                Instant::now() < deadline,
                "{point}: {:?} still in .berth-tmp after {WITHIN:?}; the agent's log:\n{}",
                self.staged(),
                self.agent.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The disk holds exactly `model`, and so does the inventory.
    async fn check(&self, what: &str, model: &Model) {
        assert_eq!(&self.on_disk(), model, "{what}: the volumes on disk");
        assert_eq!(&self.listed().await, model, "{what}: GET /v1/volumes");
    }
}

fn create_body(volume: &str) -> Value {
    // The claim is named after the volume: one claim, one volume name, as the controller asks.
    json!({"pool": POOL, "sizeBytes": SIZE, "claim": {"namespace": "crash", "name": volume}})
}

/// A volume name of its own for the `i`th point.
fn volume_for(i: usize) -> String {
    format!("pvc-00000000-0000-4000-8000-{i:012}")
}

/// The source of the clone into `volume` (a name no point has).
fn source_of(volume: &str) -> String {
    volume.replace("pvc-00000000", "pvc-50000000")
}

/// How many files and directories are below `dir`.
fn tree_entries(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| if e.file_type().unwrap().is_dir() { 1 + tree_entries(&e.path()) } else { 1 })
        .sum()
}

/// Retries `op` on `volume` as the controller does until it succeeds; its answer.
async fn retry(w: &World, op: Op, volume: &str, point: &str) -> (StatusCode, Value) {
    let deadline = Instant::now() + WITHIN;
    loop {
        let answer = w.send(op, volume).await;
        match &answer {
            Ok((status, body)) if status.is_success() => return (*status, body.clone()),
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("{point}: {op:?} of {volume} did not succeed within {WITHIN:?}: {other:?}"),
        }
    }
}

async fn world() -> World {
    let bed = TestBed::start(TestBedConfig::nodes_with_disks(&[256 * MI], FsType::Ext4)).await.unwrap();
    bed.install_berth().await.unwrap();
    let plain = Path::new(env!("CARGO_BIN_EXE_berth-agent"));
    let agent = bed.start_agent(plain, 0, &[PoolSpec::new(POOL)], true).await.unwrap();
    let failpoints_bin =
        testbed::bins::workspace_binary_with_features("berth-agent", "berth-agent-failpoints", &["failpoints"])
            .unwrap();
    let http = agent.http().unwrap();
    let token = bed.controller_token("node-0").await.unwrap();
    World { bed, agent, http, token, failpoints_bin }
}

#[test]
fn the_matrix_covers_every_hostpath_point() {
    let listed: Vec<&str> = POINTS.iter().copied().filter(|p| p.starts_with("hostpath-")).collect();
    let tested: Vec<&str> = HOSTPATH.iter().map(|(p, _, _)| *p).collect();
    assert_eq!(tested, listed, "HOSTPATH lists every hostpath point of POINTS, in order");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkill_at_every_hostpath_step_leaves_one_volume_per_claim_and_nothing_else() {
    let started = Instant::now();
    let mut w = world().await;
    let mut model = Model::new();
    for (i, &(point, op, left)) in HOSTPATH.iter().enumerate() {
        let volume = volume_for(i);
        // The restart into the armed build is also the second restart after the previous point: nothing changes.
        w.restart_armed(point).await;
        w.check(&format!("{point}: after the next restart"), &model).await;
        if op != Op::Create {
            // The volume the operation is on, or the clone's source.
            let first = if op == Op::Clone { source_of(&volume) } else { volume.clone() };
            let (status, body) = w.send(Op::Create, &first).await.unwrap();
            assert_eq!(status, StatusCode::CREATED, "{point}: {body}");
            model.insert(first.clone(), (SIZE, false));
            // Something of a pod's for the delete to remove or the clone to copy: a file, and a directory holding
            // one.
            let data = w.root().join(&first).join("data");
            std::fs::write(data.join("a"), "pod data").unwrap();
            std::fs::create_dir(data.join("sub")).unwrap();
            std::fs::write(data.join("sub/b"), "more").unwrap();
        }

        let answer = w.send(op, &volume).await;
        assert!(answer.is_err(), "{point}: the agent answered {answer:?} instead of dying");
        w.expect_killed_at(point);

        // What the crash left.
        let staged = w.staged();
        let is_in_place = w.root().join(&volume).exists();
        match left {
            Left::Staged => {
                let kind = if op == Op::Delete { "delete" } else { "create" };
                assert!(!is_in_place, "{point}: the volume is not in place");
                assert_eq!(staged.len(), 1, "{point}: one piece of debris: {staged:?}");
                assert!(staged[0].starts_with(&format!("{kind}-{volume}-")), "{point}: {staged:?}");
            }
            Left::InPlace { size, tmp_marker, published } => {
                assert!(is_in_place && staged.is_empty(), "{point}: in place, nothing staged: {staged:?}");
                let dir = w.root().join(&volume);
                let marker: Value =
                    serde_json::from_str(&std::fs::read_to_string(dir.join("volume.json")).unwrap()).unwrap();
                assert_eq!(marker["sizeBytes"], size, "{point}: the marker's size");
                assert_eq!(dir.join("volume.json.tmp").exists(), tmp_marker, "{point}: a half-replaced marker");
                assert_eq!(!dir.join("unpublished").exists(), published, "{point}: published");
            }
        }

        // The plain agent restarts; the controller retries until it succeeds.
        w.restart_plain().await;
        let (status, body) = retry(&w, op, &volume, point).await;
        match op {
            Op::Create => {
                // 201 when the crash came before the rename (the retry made it), 200 after (it survived).
                let expected = if left == Left::Staged { StatusCode::CREATED } else { StatusCode::OK };
                assert_eq!(status, expected, "{point}: {body}");
                let made: Volume = serde_json::from_value(body).unwrap();
                assert_eq!((made.name.as_str(), made.pool.as_str(), made.size_bytes), (volume.as_str(), POOL, SIZE));
                assert_eq!(made.claim.name, volume);
                assert_eq!(Path::new(&made.path), w.root().join(&volume).join("data"));
                model.insert(volume.clone(), (SIZE, false));
            }
            Op::Clone => {
                // The crash came before the rename: the retry made the clone, with its source's files.
                assert_eq!(status, StatusCode::CREATED, "{point}: {body}");
                let made: Volume = serde_json::from_value(body).unwrap();
                assert_eq!(Path::new(&made.path), w.root().join(&volume).join("data"));
                let data = Path::new(&made.path);
                assert_eq!(std::fs::read_to_string(data.join("a")).unwrap(), "pod data", "{point}");
                assert_eq!(std::fs::read_to_string(data.join("sub/b")).unwrap(), "more", "{point}");
                model.insert(volume.clone(), (SIZE, false));
            }
            Op::Publish => {
                assert_eq!(body["published"], true, "{point}: {body}");
                model.insert(volume.clone(), (SIZE, true));
            }
            Op::Expand => {
                assert_eq!(body["sizeBytes"], GROWN, "{point}: {body}");
                model.insert(volume.clone(), (GROWN, false));
            }
            Op::Delete => {
                // The crash came after the volume left the inventory: what is left is debris, not a volume.
                assert_eq!(body, json!({"deleted": false}), "{point}");
                model.remove(&volume);
            }
        }
        w.debris_removed(point).await;
        w.check(&format!("{point}: after the retry"), &model).await;
    }
    w.stop();
    w.restart_plain().await;
    w.check("after the last restart", &model).await;
    eprintln!("{} points in {:?}", HOSTPATH.len(), started.elapsed());
}

/// The debris thread itself killed mid-removal: the next start finds the rest and removes it.
#[tokio::test(flavor = "multi_thread")]
async fn a_sigkill_while_debris_is_removed_leaves_the_rest_to_the_next_start() {
    let mut w = world().await;
    let volume = volume_for(0);
    w.restart_armed("hostpath-detach-after-rename").await;
    let (status, _) = w.send(Op::Create, &volume).await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    let data = w.root().join(&volume).join("data");
    for i in 0..20 {
        std::fs::write(data.join(format!("f{i}")), "pod data").unwrap();
    }
    assert!(w.send(Op::Delete, &volume).await.is_err(), "the agent died before answering");
    w.expect_killed_at("hostpath-detach-after-rename");
    let debris = w.staged();
    assert_eq!(debris.len(), 1, "{debris:?}");
    let piece = w.staging().join(&debris[0]);
    // The marker, the mark, data/ and the pod's files.
    assert_eq!(tree_entries(&piece), 23);

    // Armed at the removal: the debris thread, started once the API serves, dies after its first unlink (the agent
    // may not have published itself by then).
    w.agent.launch_as(&w.failpoints_bin.clone(), &[("FAILPOINTS", "hostpath-purge-after-unlink=return")]).unwrap();
    w.expect_killed_at("hostpath-purge-after-unlink");
    assert_eq!(w.staged(), debris, "the debris is still there");
    assert_eq!(tree_entries(&piece), 22, "one entry went");

    // Whether or not it published itself before it died, the next start is told apart by its certificate.
    let nodes: kube::Api<BerthNode> = kube::Api::all(w.bed.client());
    let published = nodes.get("node-0").await.unwrap().status.map(|s| s.certificate).unwrap_or_default();
    w.agent.certificate = published;
    w.restart_plain().await;
    w.debris_removed("the restart after the debris thread's crash").await;
    w.check("after the debris is gone", &Model::new()).await;
    let (status, body) = retry(&w, Op::Delete, &volume, "delete again").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"deleted": false})));
}
