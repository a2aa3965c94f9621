//! The agent killed at every step of every operation on an lvm pool (issue 19), in the guest's kernel, in one
//! boot: for each `lvm-…` point of `berth_agent::failpoints::POINTS` the `berth-agent-failpoints` build is started
//! with that point armed, the operation is asked for and the agent dies there by SIGKILL before it answers. What
//! the crash left is checked (an LV tagged `berth:creating`/`berth:deleting`, a volume with its tags, none), the
//! plain agent restarts on the same config and state, the request is retried as the controller would until it
//! succeeds, and then: exactly one LV per claim (none after a delete), no LV tagged as debris once debris removal is
//! done, every volume mounted at its mount point and no other mount point left, `GET /v1/volumes` equal to the LVs'
//! tags, and the same inventory after the next restart.
//!
//! Thick ext4 `Filesystem` volumes of 8 MiB for every point but those only a thick raw block volume reaches (its
//! zeroing at create, and the spare LV `<lv>.grow` its growth is zeroed through) and the clone points (issue 20),
//! which only a thin pool reaches; thin volumes take a subset of the same lvm2 calls otherwise. The volumes the
//! create points leave are those the publish, expand and delete points work on, so no point pays for a create of
//! its own, but for the block volumes the spare points grow: one create point leaves one, the others are made
//! (without a crash) before their point. Before each block point the free extents the next LV gets are dirtied from
//! outside Berth, and every block volume must read zeroes throughout, whatever crashed where. The clone points clone
//! one thin XFS volume (made without a crash before the first of them, a file written into it) into clones larger
//! than it: XFS, because only an XFS clone reaches `lvm-clone-after-uuid` (its UUID made its own), and larger, so
//! that each retry also grows the clone; every clone is kept, so the last restart mounts them all beside their
//! source, which XFS allows only to filesystems of distinct UUIDs.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth::agent_api::VolumeList;
use berth_agent::failpoints::POINTS;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::lvm_agent::{
    GuestAgent, MI, base, env, extents, init_pools, mount_of, root, write_pattern, xfs_uuid, zeroes_at,
};
use crate::{in_vm, lvm, sh, volume_group};

const SIZE: u64 = 8 * MI;
const GROWN: u64 = 16 * MI;
const POOL: &str = "thick";
/// The thin pool of the clone points, its LV `berth/thin`. Its data usage: about 65 MiB for the source, mostly
/// mkfs.xfs's 64 MiB log, and as much for each clone, whose log `xfs_admin -U` rewrites (50 % of 512 MiB at the
/// end, with three clones).
const THIN: &str = "thin";
const THIN_POOL: &str = "512m";
/// The source the clone points clone (mkfs.xfs refuses less than 300 MB), and its clones, larger.
const SOURCE: &str = "pvc-22222222-0000-4000-a000-000000000000";
const XFS_SIZE: u64 = 320 * MI;
const CLONE_SIZE: u64 = XFS_SIZE + 32 * MI;
/// The file written into the source before it is first cloned, which each clone must have as written.
const SOURCE_FILE: &str = "pod-file";
const URL: &str = "https://127.0.0.1:7443";
/// Long enough for a few lvm2 commands under TCG (about 0.8 s each) while the agent samples its pool.
const WITHIN: Duration = Duration::from_secs(90);
const CREATING: &str = "berth:creating";
const DELETING: &str = "berth:deleting";

/// What [`SOURCE_FILE`] holds: a MiB in which no two 4 KiB blocks are alike.
fn source_file_content() -> Vec<u8> {
    (0..MI).map(|i| (i % 251) as u8 ^ (i >> 12) as u8).collect()
}

/// The volume a point works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// ext4, mounted by the agent.
    Fs,
    /// Raw block: the LV's device, zeroed before a pod gets its bytes.
    Block,
    /// XFS in the thin pool, mounted by the agent: [`SOURCE`] (a create) and its clones.
    ThinXfs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    /// A clone of [`SOURCE`] into the point's volume.
    Clone,
    Publish,
    Expand,
    Delete,
}

/// What a crash at a point leaves, before anything restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Left {
    /// The volume's LV tagged with this tag: debris, out of the inventory.
    Debris(&'static str),
    /// The volume (mounted, if a filesystem), its size tag `size`, its LV `lv_size` bytes, published or not, and
    /// the spare LV of its growth there (tagged `berth:creating`: debris) or not.
    Volume { size: u64, lv_size: u64, published: bool, spare: bool },
    /// The volume's LV untagged but unmounted (the delete stopped between the two).
    Unmounted,
    /// No LV any more.
    Gone,
    /// A clone's LV tagged `berth:creating` (debris): its XFS filesystem its source's twin (the same UUID) or with
    /// a UUID of its own, and at its mount point nothing, an empty directory, or its filesystem mounted.
    CloneDebris { own_uuid: bool, at: At },
}

/// What a clone's mount point is when a crash stopped the clone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    Nothing,
    EmptyDir,
    Mounted,
}

const fn volume(size: u64, lv_size: u64, published: bool) -> Left {
    Left::Volume { size, lv_size, published, spare: false }
}

/// A block volume whose growth stopped with its spare LV made (`spare`) or already removed.
const fn growing(lv_size: u64, spare: bool) -> Left {
    Left::Volume { size: SIZE, lv_size, published: false, spare }
}

/// Every lvm point: the operation that reaches it, on which kind of volume, and what a crash there leaves.
const LVM: &[(&str, Op, Kind, Left)] = &[
    ("lvm-create-after-lvcreate", Op::Create, Kind::Fs, Left::Debris(CREATING)),
    ("lvm-create-after-mkfs", Op::Create, Kind::Fs, Left::Debris(CREATING)),
    ("lvm-create-after-mount", Op::Create, Kind::Fs, Left::Debris(CREATING)),
    ("lvm-create-after-data-dir", Op::Create, Kind::Fs, Left::Debris(CREATING)),
    // Zeroed, not yet finished: still debris (zeroed again when it is removed).
    ("lvm-create-after-zero", Op::Create, Kind::Block, Left::Debris(CREATING)),
    ("lvm-create-after-untag", Op::Create, Kind::Fs, volume(SIZE, SIZE, false)),
    ("lvm-clone-after-lvcreate", Op::Clone, Kind::ThinXfs, Left::CloneDebris { own_uuid: false, at: At::Nothing }),
    ("lvm-clone-after-uuid", Op::Clone, Kind::ThinXfs, Left::CloneDebris { own_uuid: true, at: At::EmptyDir }),
    ("lvm-clone-after-mount", Op::Clone, Kind::ThinXfs, Left::CloneDebris { own_uuid: true, at: At::Mounted }),
    ("lvm-publish-after-untag", Op::Publish, Kind::Fs, volume(SIZE, SIZE, true)),
    ("lvm-expand-after-lvextend", Op::Expand, Kind::Fs, volume(SIZE, GROWN, false)),
    ("lvm-expand-after-resize", Op::Expand, Kind::Fs, volume(SIZE, GROWN, false)),
    ("lvm-expand-after-retag", Op::Expand, Kind::Fs, volume(GROWN, GROWN, false)),
    // The volume untouched until lvextend; the spare is debris while it exists.
    ("lvm-expand-after-spare-lvcreate", Op::Expand, Kind::Block, growing(SIZE, true)),
    ("lvm-expand-after-spare-zero", Op::Expand, Kind::Block, growing(SIZE, true)),
    ("lvm-expand-after-spare-lvremove", Op::Expand, Kind::Block, growing(SIZE, false)),
    // Grown onto the zeroed extents, the size tag not yet: the retry only replaces the tag.
    ("lvm-expand-after-spare-lvextend", Op::Expand, Kind::Block, growing(GROWN, false)),
    ("lvm-detach-after-unmount", Op::Delete, Kind::Fs, Left::Unmounted),
    ("lvm-detach-after-tag", Op::Delete, Kind::Fs, Left::Debris(DELETING)),
    ("lvm-purge-after-zero", Op::Delete, Kind::Fs, Left::Debris(DELETING)),
    ("lvm-purge-after-lvremove", Op::Delete, Kind::Fs, Left::Gone),
];

/// Name → (size, published), as the inventory should hold it.
type Model = BTreeMap<String, (u64, bool)>;

struct Lv {
    name: String,
    tags: Vec<String>,
    size: u64,
    dm_path: String,
}

impl Lv {
    fn is_block(&self) -> bool {
        self.tags.iter().any(|t| t == "berth:volmode=Block")
    }
}

fn lvs() -> Vec<Lv> {
    let fields = "lv_name,lv_tags,lv_size,lv_dm_path";
    let json = lvm(&["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields, "berth"]);
    let v: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("lvs JSON {json:?}: {e}"));
    let rows = v["report"][0]["lv"].as_array().cloned().unwrap_or_default();
    rows.iter()
        .map(|r| Lv {
            name: r["lv_name"].as_str().unwrap().to_owned(),
            tags: r["lv_tags"].as_str().unwrap().split(',').filter(|t| !t.is_empty()).map(str::to_owned).collect(),
            size: r["lv_size"].as_str().unwrap().parse().unwrap(),
            dm_path: r["lv_dm_path"].as_str().unwrap().to_owned(),
        })
        .collect()
}

/// The spare LV a block volume's growth is zeroed through.
fn spare_of(volume: &str) -> Option<Lv> {
    lvs().into_iter().find(|l| l.name == format!("berth-{volume}.grow"))
}

/// Whether the whole of a block volume's LV reads zeroes (nobody writes to them here).
fn reads_zeroes(lv: &Lv) -> bool {
    zeroes_at(&lv.dm_path, 0, lv.size)
}

/// The physical extents (numbers on the one PV) of LV `berth/<lv>`.
fn extent_numbers(lv: &str) -> std::collections::BTreeSet<u64> {
    let mut set = std::collections::BTreeSet::new();
    for range in extents(lv) {
        let (_, span) = range.rsplit_once(':').unwrap();
        let (from, to) = span.split_once('-').unwrap_or((span, span));
        set.extend(from.parse::<u64>().unwrap()..=to.parse().unwrap());
    }
    set
}

/// Makes the next LV's extents hold bytes Berth never wrote: an LV on the lowest free extents (where lvm2 puts the
/// next one) filled with the pattern and removed outside Berth (lvremove does not zero). Its extents.
fn dirty_free_extents() -> std::collections::BTreeSet<u64> {
    lvm(&["lvcreate", "-y", "-W", "y", "-L", "32m", "-n", "stranger", "berth"]);
    let stranger = lvs().into_iter().find(|l| l.name == "stranger").unwrap();
    write_pattern(&stranger.dm_path, stranger.size);
    let dirty = extent_numbers("stranger");
    lvm(&["lvremove", "-y", "berth/stranger"]);
    dirty
}

fn lv_of(volume: &str) -> Option<Lv> {
    lvs().into_iter().find(|l| l.name == format!("berth-{volume}"))
}

fn tag<'a>(lv: &'a Lv, key: &str) -> Option<&'a str> {
    lv.tags.iter().find_map(|t| t.strip_prefix("berth:")?.strip_prefix(key)?.strip_prefix('='))
}

fn size_tag(lv: &Lv) -> u64 {
    tag(lv, "size").unwrap().parse().unwrap()
}

/// Whether any LV still carries a debris tag.
fn debris_left() -> Vec<String> {
    lvs().into_iter().filter(|l| l.tags.iter().any(|t| t == CREATING || t == DELETING)).map(|l| l.name).collect()
}

/// The volumes as the LVs' tags say, after checking that each filesystem volume is mounted at its mount point with
/// its data/ directory and filesystem and each block volume reads zeroes, that its LV holds its size, and that the
/// pool roots hold no other mount point.
fn on_disk() -> Model {
    let mut model = Model::new();
    let mut mounted_volumes: BTreeMap<&str, Vec<String>> = [(POOL, vec![]), (THIN, vec![])].into();
    for lv in lvs() {
        let Some(name) = lv.name.strip_prefix("berth-") else { continue };
        assert!(!lv.tags.iter().any(|t| t == CREATING || t == DELETING), "{} is debris", lv.name);
        let size = size_tag(&lv);
        assert!(lv.size >= size, "{}: the LV has {} bytes, its tag says {size}", lv.name, lv.size);
        model.insert(name.to_owned(), (size, !lv.tags.iter().any(|t| t == "berth:unpublished")));
        if lv.is_block() {
            assert!(reads_zeroes(&lv), "{name}: a block volume shows bytes Berth did not zero");
            continue;
        }
        let pool = tag(&lv, "pool").unwrap();
        let mounted_here = mounted_volumes.get_mut(pool).unwrap_or_else(|| panic!("{name}: pool {pool:?}"));
        mounted_here.push(name.to_owned());
        let mount_point = root(pool).join(name);
        let mounted = mount_of(&mount_point).map(|(fs, _)| fs);
        assert_eq!(mounted.as_deref(), tag(&lv, "fs"), "{name} is mounted at {}", mount_point.display());
        assert!(mount_point.join("data").is_dir(), "{name}/data");
    }
    for (pool, mounted_here) in mounted_volumes {
        let mut dirs: Vec<String> = std::fs::read_dir(root(pool))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        dirs.sort();
        assert_eq!(dirs, mounted_here, "mount points in {}", root(pool).display());
    }
    model
}

fn config() -> PathBuf {
    let path = base().join("crash.toml");
    let lvm_config = "activation { udev_sync = 0 udev_rules = 0 }";
    std::fs::write(
        &path,
        format!(
            "[[pool]]\nname = {POOL:?}\nbackend = \"lvm\"\nroot = {:?}\nvolume-group = \"berth\"\n\
             lvm-config = {lvm_config:?}\n\n\
             [[pool]]\nname = {THIN:?}\nbackend = \"lvm\"\nroot = {:?}\nvolume-group = \"berth\"\n\
             thin-pool = {THIN:?}\noverprovision-ratio = 8.0\nlvm-config = {lvm_config:?}\n",
            root(POOL),
            root(THIN),
        ),
    )
    .unwrap();
    path
}

/// Sends `op`'s request for `volume` (of `kind`) once: its status and body, or the transport error.
async fn send(agent: &GuestAgent, op: Op, kind: Kind, volume: &str) -> Result<(StatusCode, Value), reqwest::Error> {
    let url = format!("{URL}/v1/volumes/{volume}");
    let claim = json!({"namespace": "crash", "name": volume});
    let request = match (op, kind) {
        (Op::Create, Kind::Fs) => {
            agent.http.put(&url).json(&json!({"pool": POOL, "sizeBytes": SIZE, "fsType": "ext4", "claim": claim}))
        }
        (Op::Create, Kind::Block) => {
            agent.http.put(&url).json(&json!({"pool": POOL, "sizeBytes": SIZE, "volumeMode": "Block", "claim": claim}))
        }
        (Op::Create, Kind::ThinXfs) => {
            agent.http.put(&url).json(&json!({"pool": THIN, "sizeBytes": XFS_SIZE, "fsType": "xfs", "claim": claim}))
        }
        (Op::Clone, Kind::ThinXfs) => agent
            .http
            .put(&url)
            .json(&json!({"pool": THIN, "sizeBytes": CLONE_SIZE, "fsType": "xfs", "source": SOURCE, "claim": claim})),
        (Op::Clone, kind) => unreachable!("no clone of {kind:?} volumes"),
        (Op::Publish, _) => agent.http.put(format!("{url}/published")),
        (Op::Expand, _) => agent.http.post(format!("{url}/expand")).json(&json!({"sizeBytes": GROWN})),
        (Op::Delete, _) => agent.http.delete(&url),
    };
    let resp = request.bearer_auth(env("BERTH_CONTROLLER_TOKEN")).header("berth-leader-epoch", "1").send().await?;
    let status = resp.status();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

/// Retries `op` on `volume` as the controller does until it succeeds (a create meets `Conflict` while the debris
/// of its earlier attempt is removed, an expansion fails while the spare LV of its earlier attempt is); its answer,
/// and the refusals before it (printed: what the controller would have seen).
async fn retry(agent: &GuestAgent, op: Op, kind: Kind, volume: &str, point: &str) -> (StatusCode, Value) {
    let deadline = Instant::now() + WITHIN;
    let mut refusals = Vec::new();
    loop {
        let answer = send(agent, op, kind, volume).await;
        match &answer {
            Ok((status, body)) if status.is_success() => {
                if !refusals.is_empty() {
                    println!("{point}: refused before the retry succeeded (repeats folded): {refusals:?}");
                }
                return (*status, body.clone());
            }
            _ if Instant::now() < deadline => {
                if let Ok((status, body)) = &answer
                    && refusals.last() != Some(&(*status, body["reason"].clone()))
                {
                    refusals.push((*status, body["reason"].clone()));
                }
                tokio::time::sleep(Duration::from_millis(250)).await
            }
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
    let tested: Vec<&str> = LVM.iter().map(|(p, _, _, _)| *p).collect();
    assert_eq!(tested, listed_points, "LVM lists every lvm point of POINTS, in order");
    let failpoints_bin = env("BERTH_AGENT_FAILPOINTS_BIN");
    assert!(Path::new(&failpoints_bin).exists(), "{failpoints_bin} is built by hack/test-vm");
    sh("modprobe", &["dm_mod"]);
    sh("modprobe", &["dm_thin_pool"]);
    volume_group("crash.img", "berth");
    lvm(&["lvcreate", "-y", "-L", THIN_POOL, "-T", &format!("berth/{THIN}")]);
    let config = config();
    init_pools(&config, &[POOL, THIN]);
    let started = Instant::now();

    let mut agent = GuestAgent::start_with("crash", &config).await;
    let mut model = Model::new();
    // The filesystem volumes the create points leave, in order: the publish point works on the first, the expand
    // points on the next three, the delete points on the first four; the last is left. The block volumes: the one
    // the create point leaves, then one made for each further spare point; all are left. The clones, and their
    // source (its filesystem's UUID, once it is made): all are left.
    let (mut made_fs, mut made_block): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
    let mut made_clones: Vec<String> = Vec::new();
    let mut source_uuid: Option<String> = None;
    let (mut publishes, mut expands, mut block_expands, mut deletes) = (0, 1, 0, 0);
    for (i, &(point, op, kind, left)) in LVM.iter().enumerate() {
        let t = Instant::now();
        let next = |i: &mut usize, made: &[String]| {
            *i += 1;
            made[*i - 1].clone()
        };
        let volume = match (op, kind) {
            (Op::Create | Op::Clone, _) => format!("pvc-22222222-0000-4000-8000-{i:012}"),
            (Op::Publish, Kind::Fs) => next(&mut publishes, &made_fs),
            (Op::Expand, Kind::Fs) => next(&mut expands, &made_fs),
            (Op::Expand, Kind::Block) => {
                if block_expands == made_block.len() {
                    // Made by the plain agent, which runs until the armed restart below.
                    let volume = format!("pvc-22222222-0000-4000-9000-{i:012}");
                    let (status, body) = send(&agent, Op::Create, Kind::Block, &volume).await.unwrap();
                    assert_eq!(status, StatusCode::CREATED, "{point}: the block volume to grow: {body}");
                    model.insert(volume.clone(), (SIZE, false));
                    made_block.push(volume);
                }
                next(&mut block_expands, &made_block)
            }
            (Op::Delete, Kind::Fs) => next(&mut deletes, &made_fs),
            (op, kind) => unreachable!("no {op:?} point on {kind:?} volumes"),
        };
        if op == Op::Clone && source_uuid.is_none() {
            // Made by the plain agent, which runs until the armed restart below; a pod's file written into it.
            let (status, body) = send(&agent, Op::Create, Kind::ThinXfs, SOURCE).await.unwrap();
            assert_eq!(status, StatusCode::CREATED, "{point}: the source to clone: {body}");
            model.insert(SOURCE.to_owned(), (XFS_SIZE, false));
            let mut file = std::fs::File::create(root(THIN).join(SOURCE).join("data").join(SOURCE_FILE)).unwrap();
            file.write_all(&source_file_content()).unwrap();
            file.sync_all().unwrap();
            source_uuid = Some(xfs_uuid(&lv_of(SOURCE).unwrap().dm_path));
        }
        // The bytes the block point's new extents hold before Berth zeroes them (none after a crash may show).
        let dirty = (kind == Kind::Block).then(dirty_free_extents);
        let extents_before = lv_of(&volume).map(|_| extent_numbers(&format!("berth-{volume}"))).unwrap_or_default();
        // The restart into the armed build is also the second restart after the previous point: nothing changes.
        agent.stop();
        let armed = format!("{point}=return");
        agent = GuestAgent::start_as("crash", &config, &[], &failpoints_bin, &[("FAILPOINTS", &armed)]).await;
        check(&agent, &format!("{point}: after the next restart"), &model).await;

        let answer = send(&agent, op, kind, &volume).await;
        assert!(answer.is_err(), "{point}: the agent answered {answer:?} instead of dying");
        let status = agent.wait_exit(WITHIN).unwrap_or_else(|| panic!("the agent did not die at {point}"));
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{point}: {status}");
        assert_eq!(log_lines_naming(point), 1, "the agent's log names {point} as where it died, once");

        // What the crash left.
        let lv = lv_of(&volume);
        let mount_point = root(if kind == Kind::ThinXfs { THIN } else { POOL }).join(&volume);
        match left {
            Left::Debris(tag) => {
                let lv = lv.unwrap_or_else(|| panic!("{point}: no LV"));
                assert!(lv.tags.iter().any(|t| t == tag), "{point}: tagged {tag}: {:?}", lv.tags);
            }
            Left::Volume { size, lv_size, published, spare } => {
                let lv = lv.unwrap_or_else(|| panic!("{point}: no LV"));
                assert!(!lv.tags.iter().any(|t| t == CREATING || t == DELETING), "{point}: {:?}", lv.tags);
                assert_eq!((size_tag(&lv), lv.size), (size, lv_size), "{point}: size tag and LV size");
                assert_eq!(!lv.tags.iter().any(|t| t == "berth:unpublished"), published, "{point}: published");
                match kind {
                    Kind::Fs | Kind::ThinXfs => assert!(mount_of(&mount_point).is_some(), "{point}: mounted"),
                    // Grown or not, what the volume has now was zeroed.
                    Kind::Block => assert!(reads_zeroes(&lv), "{point}: the block volume reads zeroes"),
                }
                match spare_of(&volume) {
                    Some(s) => {
                        assert!(spare, "{point}: a spare LV {} is left", s.name);
                        assert!(s.tags.iter().any(|t| t == CREATING), "{point}: the spare is debris: {:?}", s.tags);
                    }
                    None => assert!(!spare, "{point}: no spare LV"),
                }
            }
            Left::Unmounted => {
                let lv = lv.unwrap_or_else(|| panic!("{point}: no LV"));
                assert!(!lv.tags.iter().any(|t| t == CREATING || t == DELETING), "{point}: {:?}", lv.tags);
                assert!(mount_of(&mount_point).is_none(), "{point}: unmounted");
            }
            Left::Gone => assert!(lv.is_none(), "{point}: the LV is gone"),
            Left::CloneDebris { own_uuid, at } => {
                let lv = lv.unwrap_or_else(|| panic!("{point}: no LV"));
                assert!(lv.tags.iter().any(|t| t == CREATING), "{point}: tagged {CREATING}: {:?}", lv.tags);
                let source_uuid = source_uuid.as_ref().unwrap();
                if Path::new(&lv.dm_path).exists() {
                    let uuid = xfs_uuid(&lv.dm_path);
                    assert_eq!(&uuid != source_uuid, own_uuid, "{point}: UUID {uuid}, the source's {source_uuid}");
                } else {
                    // Inactive: only before the clone's own activation.
                    assert!(!own_uuid, "{point}: {} is not active", lv.name);
                }
                let found = match mount_of(&mount_point) {
                    Some(_) => At::Mounted,
                    None if mount_point.is_dir() => At::EmptyDir,
                    None => At::Nothing,
                };
                assert_eq!(found, at, "{point}: at {}", mount_point.display());
            }
        }

        agent = GuestAgent::start_with("crash", &config).await;
        let (status, body) = retry(&agent, op, kind, &volume, point).await;
        match op {
            Op::Create => {
                // 201 when the crash came while the LV was still debris (the retry made it anew), 200 after.
                let expected = if matches!(left, Left::Debris(_)) { StatusCode::CREATED } else { StatusCode::OK };
                assert_eq!(status, expected, "{point}: {body}");
                assert_eq!(body["sizeBytes"], SIZE, "{point}: {body}");
                let path = match kind {
                    Kind::Fs => root(POOL).join(&volume).join("data").display().to_string(),
                    Kind::Block => lv_of(&volume).unwrap().dm_path,
                    Kind::ThinXfs => unreachable!("no create point makes a thin volume"),
                };
                assert_eq!(body["path"], path, "{point}");
                model.insert(volume.clone(), (SIZE, false));
                match kind {
                    Kind::Fs => made_fs.push(volume.clone()),
                    _ => made_block.push(volume.clone()),
                }
            }
            Op::Clone => {
                // The crash left debris, removed before the retry could make the clone anew.
                assert_eq!(status, StatusCode::CREATED, "{point}: {body}");
                assert_eq!(body["sizeBytes"], CLONE_SIZE, "{point}: {body}");
                let data = root(THIN).join(&volume).join("data");
                assert_eq!(body["path"], data.display().to_string(), "{point}");
                let file = std::fs::read(data.join(SOURCE_FILE)).unwrap();
                assert!(file == source_file_content(), "{point}: the clone has its source's file as written");
                let uuid = xfs_uuid(&lv_of(&volume).unwrap().dm_path);
                assert_ne!(Some(&uuid), source_uuid.as_ref(), "{point}: the clone's filesystem has a UUID of its own");
                let (fs, dev) = crate::lvm_agent::sizes_of(&root(THIN).join(&volume));
                let (source_fs, _) = crate::lvm_agent::sizes_of(&root(THIN).join(SOURCE));
                assert_eq!(dev, CLONE_SIZE, "{point}: the device");
                assert!(fs > source_fs, "{point}: the clone's filesystem grew past its source's: {fs}, {source_fs}");
                model.insert(volume.clone(), (CLONE_SIZE, false));
                made_clones.push(volume.clone());
            }
            Op::Publish => {
                assert_eq!(body["published"], true, "{point}: {body}");
                model.get_mut(&volume).unwrap().1 = true;
            }
            Op::Expand => {
                assert_eq!(body["sizeBytes"], GROWN, "{point}: {body}");
                model.get_mut(&volume).unwrap().0 = GROWN;
                match kind {
                    Kind::Fs => {
                        let (fs, dev) = crate::lvm_agent::sizes_of(&root(POOL).join(&volume));
                        assert_eq!(dev, GROWN, "{point}: the device");
                        assert!(fs > SIZE, "{point}: the filesystem grew: {fs}");
                    }
                    Kind::Block => {
                        let dev = lv_of(&volume).unwrap().dm_path;
                        assert_eq!(sh("blockdev", &["--getsize64", &dev]).trim(), GROWN.to_string(), "{point}");
                    }
                    Kind::ThinXfs => unreachable!("no expand point grows a thin volume"),
                }
            }
            Op::Delete => {
                // Only a crash before the `deleting` tag left a volume for the retry to delete.
                assert_eq!(body, json!({"deleted": left == Left::Unmounted}), "{point}");
                model.remove(&volume);
            }
        }
        if let Some(dirty) = dirty {
            // Else the zeroes read below prove nothing.
            let new: Vec<u64> =
                extent_numbers(&format!("berth-{volume}")).difference(&extents_before).copied().collect();
            assert!(
                new.iter().all(|e| dirty.contains(e)),
                "{point}: the volume's new extents {new:?} are among those dirtied {dirty:?}"
            );
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
    let left: Vec<&String> = model.keys().collect();
    let source = SOURCE.to_owned();
    let expected: Vec<&String> = {
        let mut v: Vec<&String> =
            made_block.iter().chain(made_fs.last()).chain(&made_clones).chain([&source]).collect();
        v.sort();
        v
    };
    assert_eq!(
        left, expected,
        "the last filesystem create point's volume, the block volumes, the clones and their source are left"
    );
    agent.stop();
    let used = lvm(&["lvs", "--noheadings", "-o", "data_percent", &format!("berth/{THIN}")]);
    println!("thin pool of {THIN_POOL}: {}% used by the source and {} clones", used.trim(), made_clones.len());
    println!("{} lvm points in {:.1} s", LVM.len(), started.elapsed().as_secs_f64());
}
