//! The agent killed at every step of every operation on an lvm pool (issue 19), in the guest's kernel, in one
//! boot: for each `lvm-…` point of `berth_agent::failpoints::POINTS` the `berth-agent-failpoints` build is started
//! with that point armed, the operation is asked for and the agent dies there by SIGKILL before it answers. What
//! the crash left is checked (an LV tagged `berth:creating`/`berth:deleting`, a volume with its tags, none), the
//! plain agent restarts on the same config and state, the request is retried as the controller would until it
//! succeeds, and then: exactly one LV per claim (none after a delete), no LV tagged as debris once debris removal is
//! done, every volume mounted at its mount point and no other mount point left, `GET /v1/volumes` equal to the LVs'
//! tags, and the same inventory after the next restart.
//!
//! One volume kind for every point: thick ext4 `Filesystem` volumes of 8 MiB (the steps of block and thin volumes
//! are a subset, or the same lvm2 calls). The volumes the create points leave are those the publish, expand and
//! delete points work on, so no point pays for a create of its own.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth::agent_api::VolumeList;
use berth_agent::failpoints::POINTS;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::lvm_agent::{GuestAgent, MI, base, env, init_pools, mount_of, root};
use crate::{in_vm, lvm, sh, volume_group};

const SIZE: u64 = 8 * MI;
const GROWN: u64 = 16 * MI;
const POOL: &str = "thick";
const URL: &str = "https://127.0.0.1:7443";
/// Long enough for a few lvm2 commands under TCG (about 0.8 s each) while the agent samples its pool.
const WITHIN: Duration = Duration::from_secs(90);
const CREATING: &str = "berth:creating";
const DELETING: &str = "berth:deleting";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    Publish,
    Expand,
    Delete,
}

/// What a crash at a point leaves, before anything restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Left {
    /// The volume's LV tagged with this tag: debris, out of the inventory.
    Debris(&'static str),
    /// The volume, mounted, its size tag `size`, its LV `lv_size` bytes, published or not.
    Volume { size: u64, lv_size: u64, published: bool },
    /// The volume's LV untagged but unmounted (the delete stopped between the two).
    Unmounted,
    /// No LV any more.
    Gone,
}

const fn volume(size: u64, lv_size: u64, published: bool) -> Left {
    Left::Volume { size, lv_size, published }
}

/// Every lvm point: the operation that reaches it and what a crash there leaves.
const LVM: &[(&str, Op, Left)] = &[
    ("lvm-create-after-lvcreate", Op::Create, Left::Debris(CREATING)),
    ("lvm-create-after-mkfs", Op::Create, Left::Debris(CREATING)),
    ("lvm-create-after-mount", Op::Create, Left::Debris(CREATING)),
    ("lvm-create-after-data-dir", Op::Create, Left::Debris(CREATING)),
    ("lvm-create-after-untag", Op::Create, volume(SIZE, SIZE, false)),
    ("lvm-publish-after-untag", Op::Publish, volume(SIZE, SIZE, true)),
    ("lvm-expand-after-lvextend", Op::Expand, volume(SIZE, GROWN, false)),
    ("lvm-expand-after-resize", Op::Expand, volume(SIZE, GROWN, false)),
    ("lvm-expand-after-retag", Op::Expand, volume(GROWN, GROWN, false)),
    ("lvm-detach-after-unmount", Op::Delete, Left::Unmounted),
    ("lvm-detach-after-tag", Op::Delete, Left::Debris(DELETING)),
    ("lvm-purge-after-zero", Op::Delete, Left::Debris(DELETING)),
    ("lvm-purge-after-lvremove", Op::Delete, Left::Gone),
];

/// Name → (size, published), as the inventory should hold it.
type Model = BTreeMap<String, (u64, bool)>;

struct Lv {
    name: String,
    tags: Vec<String>,
    size: u64,
}

fn lvs() -> Vec<Lv> {
    let json =
        lvm(&["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", "lv_name,lv_tags,lv_size", "berth"]);
    let v: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("lvs JSON {json:?}: {e}"));
    let rows = v["report"][0]["lv"].as_array().cloned().unwrap_or_default();
    rows.iter()
        .map(|r| Lv {
            name: r["lv_name"].as_str().unwrap().to_owned(),
            tags: r["lv_tags"].as_str().unwrap().split(',').filter(|t| !t.is_empty()).map(str::to_owned).collect(),
            size: r["lv_size"].as_str().unwrap().parse().unwrap(),
        })
        .collect()
}

fn lv_of(volume: &str) -> Option<Lv> {
    lvs().into_iter().find(|l| l.name == format!("berth-{volume}"))
}

fn size_tag(lv: &Lv) -> u64 {
    lv.tags.iter().find_map(|t| t.strip_prefix("berth:size=")).unwrap().parse().unwrap()
}

/// Whether any LV still carries a debris tag.
fn debris_left() -> Vec<String> {
    lvs().into_iter().filter(|l| l.tags.iter().any(|t| t == CREATING || t == DELETING)).map(|l| l.name).collect()
}

/// The volumes as the LVs' tags say, after checking that each is mounted at its mount point with its data/
/// directory, that its LV holds its size, and that the pool root holds no other mount point.
fn on_disk() -> Model {
    let mut model = Model::new();
    for lv in lvs() {
        let Some(name) = lv.name.strip_prefix("berth-") else { continue };
        assert!(!lv.tags.iter().any(|t| t == CREATING || t == DELETING), "{} is debris", lv.name);
        let size = size_tag(&lv);
        assert!(lv.size >= size, "{}: the LV has {} bytes, its tag says {size}", lv.name, lv.size);
        let mount_point = root(POOL).join(name);
        let mounted = mount_of(&mount_point).map(|(fs, _)| fs);
        assert_eq!(mounted.as_deref(), Some("ext4"), "{name} is mounted at {}", mount_point.display());
        assert!(mount_point.join("data").is_dir(), "{name}/data");
        model.insert(name.to_owned(), (size, !lv.tags.iter().any(|t| t == "berth:unpublished")));
    }
    let mut dirs: Vec<String> = std::fs::read_dir(root(POOL))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    assert_eq!(dirs, model.keys().cloned().collect::<Vec<_>>(), "mount points in {}", root(POOL).display());
    model
}

fn config() -> PathBuf {
    let path = base().join("crash.toml");
    let lvm_config = "activation { udev_sync = 0 udev_rules = 0 }";
    std::fs::write(
        &path,
        format!(
            "[[pool]]\nname = {POOL:?}\nbackend = \"lvm\"\nroot = {:?}\nvolume-group = \"berth\"\nlvm-config = {lvm_config:?}\n",
            root(POOL)
        ),
    )
    .unwrap();
    path
}

/// Sends `op`'s request for `volume` once: its status and body, or the transport error.
async fn send(agent: &GuestAgent, op: Op, volume: &str) -> Result<(StatusCode, Value), reqwest::Error> {
    let url = format!("{URL}/v1/volumes/{volume}");
    let request = match op {
        Op::Create => agent.http.put(&url).json(&json!({"pool": POOL, "sizeBytes": SIZE, "fsType": "ext4",
            "claim": {"namespace": "crash", "name": volume}})),
        Op::Publish => agent.http.put(format!("{url}/published")),
        Op::Expand => agent.http.post(format!("{url}/expand")).json(&json!({"sizeBytes": GROWN})),
        Op::Delete => agent.http.delete(&url),
    };
    let resp = request.bearer_auth(env("BERTH_CONTROLLER_TOKEN")).header("berth-leader-epoch", "1").send().await?;
    let status = resp.status();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

/// Retries `op` on `volume` as the controller does until it succeeds (a create meets `Conflict` while the debris
/// of its earlier attempt is removed); its answer.
async fn retry(agent: &GuestAgent, op: Op, volume: &str, point: &str) -> (StatusCode, Value) {
    let deadline = Instant::now() + WITHIN;
    loop {
        let answer = send(agent, op, volume).await;
        match &answer {
            Ok((status, body)) if status.is_success() => return (*status, body.clone()),
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(250)).await,
            other => panic!("{point}: {op:?} of {volume} did not succeed within {WITHIN:?}: {other:?}"),
        }
    }
}

async fn listed(agent: &GuestAgent) -> Model {
    let list: VolumeList = agent.get("/v1/volumes").await;
    list.volumes.into_iter().map(|v| (v.name, (v.size_bytes, v.published == Some(true)))).collect()
}

async fn check(agent: &GuestAgent, what: &str, model: &Model) {
    assert_eq!(&on_disk(), model, "{what}: the volumes on disk");
    assert_eq!(&listed(agent).await, model, "{what}: GET /v1/volumes");
}

fn log_lines_naming(point: &str) -> usize {
    let log = std::fs::read_to_string(base().join("agent-crash.log")).unwrap_or_default();
    let said = format!("failpoint=\"{point}\"");
    log.lines().filter(|l| l.contains("killing the agent") && l.contains(&said)).count()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "run by vm_host::lvm_crash_matrix in a boot of its own"]
async fn lvm_crash_matrix() {
    in_vm();
    let listed_points: Vec<&str> = POINTS.iter().copied().filter(|p| p.starts_with("lvm-")).collect();
    let tested: Vec<&str> = LVM.iter().map(|(p, _, _)| *p).collect();
    assert_eq!(tested, listed_points, "LVM lists every lvm point of POINTS, in order");
    let failpoints_bin = env("BERTH_AGENT_FAILPOINTS_BIN");
    assert!(Path::new(&failpoints_bin).exists(), "{failpoints_bin} is built by hack/test-vm");
    sh("modprobe", &["dm_mod"]);
    volume_group("crash.img", "berth");
    let config = config();
    init_pools(&config, &[POOL]);
    let started = Instant::now();

    let mut agent = GuestAgent::start_with("crash", &config).await;
    let mut model = Model::new();
    // The volumes the create points leave, in order: the publish point works on the first, the expand points on the
    // next three, the delete points on the first four; the last is left.
    let mut made: Vec<String> = Vec::new();
    let (mut publishes, mut expands, mut deletes) = (0, 1, 0);
    for (i, &(point, op, left)) in LVM.iter().enumerate() {
        let t = Instant::now();
        let next = |i: &mut usize| {
            *i += 1;
            made[*i - 1].clone()
        };
        let volume = match op {
            Op::Create => format!("pvc-22222222-0000-4000-8000-{i:012}"),
            Op::Publish => next(&mut publishes),
            Op::Expand => next(&mut expands),
            Op::Delete => next(&mut deletes),
        };
        // The restart into the armed build is also the second restart after the previous point: nothing changes.
        agent.stop();
        let armed = format!("{point}=return");
        agent = GuestAgent::start_as("crash", &config, &[], &failpoints_bin, &[("FAILPOINTS", &armed)]).await;
        check(&agent, &format!("{point}: after the next restart"), &model).await;

        let answer = send(&agent, op, &volume).await;
        assert!(answer.is_err(), "{point}: the agent answered {answer:?} instead of dying");
        let status = agent.wait_exit(WITHIN).unwrap_or_else(|| panic!("the agent did not die at {point}"));
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{point}: {status}");
        assert_eq!(log_lines_naming(point), 1, "the agent's log names {point} as where it died, once");

        // What the crash left.
        let lv = lv_of(&volume);
        let mount_point = root(POOL).join(&volume);
        match left {
            Left::Debris(tag) => {
                let lv = lv.unwrap_or_else(|| panic!("{point}: no LV"));
                assert!(lv.tags.iter().any(|t| t == tag), "{point}: tagged {tag}: {:?}", lv.tags);
            }
            Left::Volume { size, lv_size, published } => {
                let lv = lv.unwrap_or_else(|| panic!("{point}: no LV"));
                assert!(!lv.tags.iter().any(|t| t == CREATING || t == DELETING), "{point}: {:?}", lv.tags);
                assert_eq!((size_tag(&lv), lv.size), (size, lv_size), "{point}: size tag and LV size");
                assert_eq!(!lv.tags.iter().any(|t| t == "berth:unpublished"), published, "{point}: published");
                assert!(mount_of(&mount_point).is_some(), "{point}: mounted");
            }
            Left::Unmounted => {
                let lv = lv.unwrap_or_else(|| panic!("{point}: no LV"));
                assert!(!lv.tags.iter().any(|t| t == CREATING || t == DELETING), "{point}: {:?}", lv.tags);
                assert!(mount_of(&mount_point).is_none(), "{point}: unmounted");
            }
            Left::Gone => assert!(lv.is_none(), "{point}: the LV is gone"),
        }

        agent = GuestAgent::start_with("crash", &config).await;
        let (status, body) = retry(&agent, op, &volume, point).await;
        match op {
            Op::Create => {
                // 201 when the crash came while the LV was still debris (the retry made it anew), 200 after.
                let expected = if matches!(left, Left::Debris(_)) { StatusCode::CREATED } else { StatusCode::OK };
                assert_eq!(status, expected, "{point}: {body}");
                assert_eq!(body["sizeBytes"], SIZE, "{point}: {body}");
                assert_eq!(body["path"], root(POOL).join(&volume).join("data").display().to_string());
                model.insert(volume.clone(), (SIZE, false));
                made.push(volume.clone());
            }
            Op::Publish => {
                assert_eq!(body["published"], true, "{point}: {body}");
                model.get_mut(&volume).unwrap().1 = true;
            }
            Op::Expand => {
                assert_eq!(body["sizeBytes"], GROWN, "{point}: {body}");
                model.get_mut(&volume).unwrap().0 = GROWN;
                let (fs, dev) = crate::lvm_agent::sizes_of(&root(POOL).join(&volume));
                assert_eq!(dev, GROWN, "{point}: the device");
                assert!(fs > SIZE, "{point}: the filesystem grew: {fs}");
            }
            Op::Delete => {
                // Only a crash before the `deleting` tag left a volume for the retry to delete.
                assert_eq!(body, json!({"deleted": left == Left::Unmounted}), "{point}");
                model.remove(&volume);
            }
        }
        let deadline = Instant::now() + WITHIN;
        while !debris_left().is_empty() {
            assert!(Instant::now() < deadline, "{point}: debris left after {WITHIN:?}: {:?}", debris_left());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        check(&agent, &format!("{point}: after the retry"), &model).await;
        println!("{point}: {:.1} s", t.elapsed().as_secs_f64());
    }
    agent.stop();
    let agent = GuestAgent::start_with("crash", &config).await;
    check(&agent, "after the last restart", &model).await;
    assert_eq!(model.len(), 1, "the last create point's volume is left: {model:?}");
    agent.stop();
    println!("{} lvm points in {:.1} s", LVM.len(), started.elapsed().as_secs_f64());
}
