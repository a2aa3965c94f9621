//! Project quotas on directory volumes through the real agent, in the guest's kernel (the host's has no quota
//! support). Hostpath pools on LVs of the disk `quota.img`, each LV mounted at `<base>/mnt-<lv>`: `xfs` (XFS
//! mounted with `prjquota`), `inherit` (on the same XFS, under a root that passes project 7 on to what is made in
//! it, as an administrator may have set up), `ext4` (ext4 with the quota and project features, mounted with
//! `prjquota`), `acct` (the same ext4 mounted without `prjquota`: usage counted, limits not enforced) and `plain`
//! (ext4 without quotas). Writes
//! are made by an unprivileged user (uid 999, the volumes' owner), as a pod's would be. Two boots:
//! `quota_phase_one` fills, refuses and grows volumes; `quota_phase_two` finds their projects and limits on disk,
//! then runs the agent without quotas on the disk and without CAP_SYS_ADMIN.
//!
//! Phase one ends in a power cut (issue 19): everything before is synced by the test, then the guest stops
//! committing journals by itself (ext4 `commit=600`, XFS `xfssyncd_centisecs` at its maximum), so that only what the
//! agent syncs is on disk when the host kills qemu. In that window the agent (phase one runs its failpoints build,
//! `berth-agent-failpoints`) grows a volume (`XB`), creates one on the XFS (`XP`) and one on the ext4 (`EW`), and
//! deletes one on the plain ext4 (`PD`), each the last change to its filesystem; data a pod synced (`XB`'s
//! `data/synced`) is acknowledged before them. A pod-like writer (uid 999, no fsync) then fills `EW`, files written
//! without a sync are left as canaries, and a create on the `acct` ext4 (`AX`) stops for good between the fsync
//! of its staging directory and its rename (`hostpath-create-after-staging-sync`, `return(pause)` after the
//! creates before it), never answered. The acknowledged changes that must hold are those of the window and all of
//! phase one's before it (creates, `EI`'s delete, `XA`'s and `EA`'s growth, the data written with `conv=fsync`).
//! The guest prints `testbed::vm::CUT_THE_POWER` and waits; the host kills qemu by SIGKILL. Phase two checks,
//! before the agent runs, that the canaries are gone (the cut was one) and that every limit on disk is its
//! volume's, then with it: the inventory equal to the volumes on disk and to what was acknowledged (every create
//! there with its size, every delete gone, the unanswered create at most debris, removed), the synced data whole,
//! the writer's volume a volume with its quota (its file may be short), no stray project quota records.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth::agent_api::{ErrorReason, Volume};
use berth::berth_node::BerthNode;
use serde_json::json;

use crate::lvm_agent::{GuestAgent, MI, NODE, base, body, env, init_pools, pools, refusal, volumes};
use crate::{in_vm, lvm, sh, volume_group};
use testbed::vm::CUT_THE_POWER;

const XA: &str = "pvc-22222222-0000-4000-8000-00000000000a";
const XB: &str = "pvc-22222222-0000-4000-8000-00000000000b";
const XC: &str = "pvc-22222222-0000-4000-8000-00000000000c";
const XD: &str = "pvc-22222222-0000-4000-8000-00000000000d";
const EA: &str = "pvc-22222222-0000-4000-8000-0000000000ea";
const EI: &str = "pvc-22222222-0000-4000-8000-0000000000e1";
const PA: &str = "pvc-22222222-0000-4000-8000-0000000000fa";
const AA: &str = "pvc-22222222-0000-4000-8000-0000000000aa";
const IA: &str = "pvc-22222222-0000-4000-8000-0000000000ba";
const XU: &str = "pvc-22222222-0000-4000-8000-0000000000ca";
/// The power cut's (see the module doc): created on the XFS as the last change to it.
const XP: &str = "pvc-22222222-0000-4000-8000-0000000000d1";
/// Created on the ext4 as the last change the agent makes to it, then filled by the writer until the cut.
const EW: &str = "pvc-22222222-0000-4000-8000-0000000000d2";
/// Made before the window, deleted in it as the last change to the plain ext4.
const PD: &str = "pvc-22222222-0000-4000-8000-0000000000d3";
/// The create stopped between its fsync and its rename, never answered (on the `acct` ext4).
const AX: &str = "pvc-22222222-0000-4000-8000-0000000000d4";
/// The creates of phase one before `AX`'s, which its failpoint lets through (checked in the agent's log).
const CREATES_BEFORE_AX: usize = 10;
/// The inventory after the cut: every volume acknowledged and not deleted, with its pool and size.
const AFTER_THE_CUT: [(&str, &str, u64); 8] = [
    (XA, "xfs", 96 * MI),
    (XB, "xfs", 80 * MI),
    (XP, "xfs", 16 * MI),
    (IA, "inherit", 8 * MI),
    (EA, "ext4", 48 * MI),
    (EW, "ext4", 16 * MI),
    (AA, "acct", 8 * MI),
    (PA, "plain", 16 * MI),
];
/// Files written without a sync just before the cut, on the XFS and on the plain ext4 (outside the pool roots).
const CANARIES: [&str; 2] = ["mnt-xfs/power-cut-canary", "mnt-plain/power-cut-canary"];
const POOLS: [&str; 5] = ["xfs", "inherit", "ext4", "acct", "plain"];
/// The LVs (filesystems) and their mount options.
const LVS: [(&str, &str, &str); 4] = [
    ("xfs", "320m", "prjquota"),
    ("ext4", "128m", "prjquota"),
    ("acct", "64m", "defaults"),
    ("plain", "128m", "defaults"),
];
const USER: u32 = 999;
/// The agent's allowance for its own files in a volume's project (hostpath.rs `QUOTA_ALLOWANCE`).
const ALLOWANCE: u64 = 64 << 10;

fn owned() -> serde_json::Value {
    json!({"uid": USER, "gid": USER, "mode": 0o2770})
}

/// A pool's root: a directory of its LV's mount (`inherit` shares the xfs LV).
fn root(pool: &str) -> PathBuf {
    let lv = if pool == "inherit" { "xfs" } else { pool };
    base().join(format!("mnt-{lv}")).join(pool)
}

fn config() -> PathBuf {
    let path = base().join("quota-agent.toml");
    let pools: String = POOLS
        .iter()
        .map(|p| format!("[[pool]]\nname = \"{p}\"\nbackend = \"hostpath\"\nroot = {:?}\n\n", root(p)))
        .collect();
    std::fs::write(&path, pools).unwrap();
    path
}

/// Mounts the LVs' filesystems (made by phase one).
fn mount_pools() {
    for (lv, _, options) in LVS {
        let mount = base().join(format!("mnt-{lv}"));
        std::fs::create_dir_all(&mount).unwrap();
        sh("mount", &["-o", options, &format!("/dev/mapper/quota-{lv}"), mount.to_str().unwrap()]);
    }
}

fn unmount_pools() {
    for (lv, _, _) in LVS {
        sh("umount", &[base().join(format!("mnt-{lv}")).to_str().unwrap()]);
    }
}

/// Writes `mib` MiB of zeroes to `file` as `uid` (synced, so the filesystem has counted them): `Err` carries
/// dd's message.
fn write_as(uid: u32, file: &Path, mib: u64) -> Result<(), String> {
    let out = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", file.display()))
        .args(["bs=1M", &format!("count={mib}"), "conv=fsync"])
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
}

/// Makes empty files `f0`, `f1`, … in `dir` as `uid` until `most` are made or one fails: how many were made and the
/// shell's error. (A shell builtin's redirection: no process per file. `true`, not `:`: a failed redirection of a
/// special builtin such as `:` ends a POSIX shell.)
fn make_files_as(uid: u32, dir: &Path, most: u64) -> (u64, String) {
    let script = format!(
        "cd '{}' || exit 1; i=0; while [ $i -lt {most} ]; do true > f$i || break; i=$((i+1)); done; echo $i",
        dir.display()
    );
    let out = Command::new("sh").args(["-c", &script]).uid(uid).gid(uid).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr).into_owned());
    let made =
        stdout.trim().parse().unwrap_or_else(|_| panic!("making files in {}: {stdout:?} {stderr}", dir.display()));
    (made, stderr)
}

fn fails_with(result: Result<(), String>, error: &str, what: &str) {
    match result {
        Ok(()) => panic!("{what}: the write succeeded; it should have failed with {error:?}"),
        Err(e) => assert!(e.contains(error), "{what}: expected {error:?}, got {e}"),
    }
}

/// The project ID of a volume's directory (lsattr -p prints it first).
fn project_of(pool: &str, volume: &str) -> u32 {
    let out = sh("lsattr", &["-pd", root(pool).join(volume).to_str().unwrap()]);
    out.split_whitespace().next().unwrap().parse().unwrap()
}

fn free_of(list: &berth::agent_api::PoolList, pool: &str) -> u64 {
    list.pools.iter().find(|p| p.name == pool).unwrap().free_bytes
}

fn used_of(list: &[Volume], name: &str) -> Option<u64> {
    list.iter().find(|v| v.name == name).unwrap().used_bytes
}

async fn metrics(agent: &GuestAgent) -> String {
    agent.http.get("https://127.0.0.1:7443/metrics").send().await.unwrap().text().await.unwrap()
}

fn data(v: &str, pool: &str) -> PathBuf {
    root(pool).join(v).join("data")
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "run by vm_host::hostpath_quotas_across_a_reboot in a boot of its own"]
async fn quota_phase_one() {
    in_vm();
    sh("modprobe", &["dm_mod"]);
    volume_group("quota.img", "quota");
    for (lv, size, _) in LVS {
        lvm(&["lvcreate", "-y", "-L", size, "-n", lv, "quota"]);
    }
    sh("mkfs.xfs", &["-q", "/dev/mapper/quota-xfs"]);
    for lv in ["ext4", "acct"] {
        sh("mkfs.ext4", &["-q", "-O", "quota,project", "-I", "256", &format!("/dev/mapper/quota-{lv}")]);
    }
    sh("mkfs.ext4", &["-q", "/dev/mapper/quota-plain"]);
    // XFS forces its log every `xfssyncd_centisecs` (30 s): at its maximum, 2 hours, from the mount on (the work is
    // queued with the value of the time), the power cut's window is not committed by it (see power_cut).
    sh("modprobe", &["xfs"]);
    std::fs::write("/proc/sys/fs/xfs/xfssyncd_centisecs", "720000").unwrap();
    mount_pools();
    std::fs::create_dir(root("inherit")).unwrap();
    sh("xfs_io", &["-c", "chproj 7", "-c", "chattr +P", root("inherit").to_str().unwrap()]);
    init_pools(&config(), &POOLS);
    // The failpoints build from the start (without a failpoint it is the agent; a restart into it would cost the
    // CI budget 12 s under TCG): `AX`'s create, the last, stops between its fsync and its rename (see power_cut).
    let failpoints_bin = env("BERTH_AGENT_FAILPOINTS_BIN");
    assert!(Path::new(&failpoints_bin).exists(), "{failpoints_bin} is built by hack/test-vm");
    let stop_ax = format!("hostpath-create-after-staging-sync={CREATES_BEFORE_AX}*off->return(pause)");
    let agent = GuestAgent::start_as("quota-one", &config(), &[], &failpoints_bin, &[("FAILPOINTS", &stop_ax)]).await;

    // Enforcement follows each filesystem's quota state, in the API and in the BerthNode.
    let list = pools(&agent).await;
    let enforcement: Vec<(&str, &str)> = list.pools.iter().map(|p| (p.name.as_str(), p.enforcement.as_str())).collect();
    let expected = [("xfs", "quota"), ("inherit", "none"), ("ext4", "quota"), ("acct", "none"), ("plain", "none")];
    assert_eq!(enforcement, expected);
    let nodes: kube::Api<BerthNode> = kube::Api::all(kube::Client::try_default().await.unwrap());
    testbed::kube_util::wait_for(&nodes, NODE, Duration::from_secs(60), |n| {
        n.status.as_ref().is_some_and(|s| {
            s.pools.iter().map(|p| (p.name.as_str(), p.enforcement.as_str())).eq(enforcement.iter().copied())
        })
    })
    .await
    .expect("the BerthNode reports each pool's enforcement");

    agent.create(XA, &body("xfs", 64 * MI, owned())).await;
    agent.create(XB, &body("xfs", 64 * MI, owned())).await;
    agent.create(EA, &body("ext4", 32 * MI, owned())).await;
    agent.create(PA, &body("plain", 16 * MI, owned())).await;
    agent.create(AA, &body("acct", 8 * MI, owned())).await;
    // Under a root that passes its own project on, a volume stays in that project (a project of its own could
    // not be renamed in: EXDEV) and the pool does not claim to enforce anything.
    agent.create(IA, &body("inherit", 8 * MI, owned())).await;
    assert_eq!(project_of("inherit", IA), 7);
    let (xa_id, xb_id) = (project_of("xfs", XA), project_of("xfs", XB));
    assert!(xa_id >= 1_000_000_000 && xb_id >= 1_000_000_000, "Berth's project IDs: {xa_id}, {xb_id}");
    assert_ne!(xa_id, xb_id, "two volumes of one filesystem share a project");
    assert_eq!(project_of("xfs", &format!("{XA}/data")), xa_id, "data/ inherits the volume's project");
    let before = pools(&agent).await;

    // A volume's whole size is writable by its owner; a byte past it is not. XFS says ENOSPC, ext4 EDQUOT.
    write_as(USER, &data(XA, "xfs").join("fill"), 64).expect("the full size of an xfs volume");
    fails_with(write_as(USER, &data(XA, "xfs").join("past"), 1), "No space left on device", "xfs past the quota");
    write_as(USER, &data(EA, "ext4").join("fill"), 32).expect("the full size of an ext4 volume");
    fails_with(write_as(USER, &data(EA, "ext4").join("past"), 1), "Disk quota exceeded", "ext4 past the quota");
    // The kernel facts docs/storageclass.md tells users: XFS holds root to the limit too; ext4 lets a process
    // with CAP_SYS_RESOURCE (root, a privileged container) write past it.
    fails_with(write_as(0, &data(XA, "xfs").join("root"), 1), "No space left on device", "root past an xfs quota");
    write_as(0, &data(EA, "ext4").join("root"), 1).expect("root ignores an ext4 hard limit");
    std::fs::remove_file(data(EA, "ext4").join("root")).unwrap();
    // Empty files cost no blocks but each takes one of ext4's fixed inodes: a volume may make its share of them
    // (as its share of the filesystem's bytes), no more, so no pod can leave its neighbours unable to make a file.
    agent.create(EI, &body("ext4", 16 * MI, owned())).await;
    let fs = sh("stat", &["-f", "-c", "%c %b %S", root("ext4").to_str().unwrap()]);
    let [inodes, blocks, block_size]: [u64; 3] =
        fs.split_whitespace().map(|n| n.parse().unwrap()).collect::<Vec<_>>().try_into().unwrap();
    // The project's limit is for the size plus the agent's allowance for its own files.
    let limit = ((16 * MI + ALLOWANCE) * inodes).div_ceil(blocks * block_size).max(1024);
    let (made, error) = make_files_as(USER, &data(EI, "ext4"), limit + 1000);
    assert!(error.contains("Disk quota exceeded"), "stopped after {made} files (limit {limit}) by: {error}");
    // The volume's own directories and marker count too.
    assert!((limit - 8..=limit).contains(&made), "{made} files made, limit {limit}");
    agent.delete(EI).await;

    // Without quotas nothing stops a volume at its size.
    write_as(USER, &data(PA, "plain").join("fill"), 32).expect("a volume without enforcement outgrows its size");
    // Counted but not enforced (ext4 mounted without prjquota): the volume outgrows its size, its usage is known.
    write_as(USER, &data(AA, "acct").join("fill"), 16).expect("quotas counted but not enforced");

    // Used bytes are the quota's count: exact, so bytes written inside a volume's size change no pool's free
    // space (the filesystem's available space went down by what the volume may no longer claim). Without
    // quotas the agent cannot tell, and counts the written bytes twice: free space drops.
    let after = pools(&agent).await;
    let list = volumes(&agent).await.volumes;
    let xa_used = used_of(&list, XA).expect("usage of a volume with a project");
    assert!((64 * MI..=64 * MI + ALLOWANCE).contains(&xa_used), "xfs volume uses {xa_used}");
    let ea_used = used_of(&list, EA).expect("usage of an ext4 volume with a project");
    assert!((32 * MI..=32 * MI + ALLOWANCE).contains(&ea_used), "ext4 volume uses {ea_used}");
    assert_eq!(used_of(&list, PA), None, "no usage without quotas");
    assert!(used_of(&list, AA).is_some_and(|u| u >= 16 * MI), "usage counted without enforcement");
    assert_eq!(used_of(&list, IA), None, "project 7 is not the volume's own: its usage is not the volume's");
    let drift = free_of(&before, "xfs").abs_diff(free_of(&after, "xfs"));
    assert!(drift <= 2 * MI, "writing inside the size moved the xfs pool's free space by {drift}");
    assert!(free_of(&before, "plain") - free_of(&after, "plain") >= 16 * MI, "the plain pool counts conservatively");
    let text = metrics(&agent).await;
    for (pool, volume, used) in [("xfs", XA, xa_used), ("ext4", EA, ea_used)] {
        let series = format!("berth_volume_used_bytes{{node=\"{NODE}\",pool=\"{pool}\",volume=\"{volume}\"");
        let line = text.lines().find(|l| l.starts_with(&series)).unwrap_or_else(|| panic!("{series} in:\n{text}"));
        let value: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(value.abs_diff(used) <= MI, "{line}: the API said {used}");
    }
    assert!(!text.contains(&format!("berth_volume_used_bytes{{node=\"{NODE}\",pool=\"plain\"")), "{text}");
    assert!(text.contains(
        "berth_pool_enforcement{node=\"node-0\",pool=\"plain\",backend=\"hostpath\",enforcement=\"none\"} 1"
    ));

    // Expansion raises the limit: the next 16 MiB fit, then the new limit holds.
    assert_eq!(agent.expand(XA, 96 * MI).await.size_bytes, 96 * MI);
    write_as(USER, &data(XA, "xfs").join("more"), 16).expect("writing into the grown xfs volume");
    fails_with(write_as(USER, &data(XA, "xfs").join("much"), 32), "No space left on device", "past the new size");
    agent.expand(EA, 48 * MI).await;
    write_as(USER, &data(EA, "ext4").join("more"), 8).expect("writing into the grown ext4 volume");
    fails_with(write_as(USER, &data(EA, "ext4").join("much"), 16), "Disk quota exceeded", "past the new ext4 size");

    agent.create(PD, &body("plain", 8 * MI, owned())).await;
    power_cut(agent, xa_id, xb_id).await;
}

/// The end of phase one (see the module doc): the window in which only the agent's own syncs (and a pod's) make
/// anything durable, ended by a power cut the host makes on [`CUT_THE_POWER`]. Does not return.
async fn power_cut(agent: GuestAgent, xa_id: u32, xb_id: u32) {
    // The guest's periodic commits held back (XFS's since the mount, see quota_phase_one; the next boot has the
    // defaults again): a cut at any moment of the window then loses what nobody synced, as an unlucky one would.
    // (jbd2 gives each transaction the interval in force when it starts: the sync below ends the last one of 5 s.)
    for lv in ["ext4", "acct", "plain"] {
        sh("mount", &["-o", "remount,commit=600", base().join(format!("mnt-{lv}")).to_str().unwrap()]);
    }
    // As if the agent had crashed between raising a quota and rewriting the marker: the limit is wrong on disk.
    // The next start sets it back from the marker.
    sh("xfs_quota", &["-x", "-c", &format!("limit -p bhard=1g {xa_id}"), root("xfs").to_str().unwrap()]);
    // (The pool base is the host's directory: this is there at once.)
    std::fs::write(base().join("quota-projects"), format!("{xa_id} {xb_id}")).unwrap();
    // Everything so far is on disk; from here only what is synced.
    sh("sync", &[]);
    let window = Instant::now();

    // Data a pod wrote and synced: acknowledged once its fsync returned.
    let synced: Vec<u8> = std::iter::repeat_with(|| fastrand::u8(..)).take(4 * MI as usize).collect();
    std::fs::write(base().join("power-cut-synced"), &synced).unwrap();
    write_synced_as(USER, &data(XB, "xfs").join("synced"), &synced);
    // Acknowledged changes, each the last change to its filesystem: nothing but the agent's own syncs makes them
    // durable (any later fsync on the same filesystem would commit its whole journal).
    assert_eq!(agent.expand(XB, 80 * MI).await.size_bytes, 80 * MI);
    agent.create(XP, &body("xfs", 16 * MI, owned())).await;
    agent.create(EW, &body("ext4", 16 * MI, owned())).await;
    agent.delete(PD).await;
    for canary in CANARIES {
        std::fs::write(base().join(canary), "written without a sync just before the power cut").unwrap();
    }
    // A pod filling its volume (without fsync) when the power goes.
    let mut writer = start_writer(&data(EW, "ext4"));
    let fill = data(EW, "ext4").join("fill");
    poll_until("the writer has written 1 MiB", || std::fs::metadata(&fill).is_ok_and(|m| m.len() >= MI)).await;
    // The create that never answers: stopped between the fsync of its staging directory and its rename.
    let log = base().join("agent-quota-one.log");
    let created = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("operation=\"create\"") && l.contains("status=201"))
        .count();
    assert_eq!(created, CREATES_BEFORE_AX, "the creates before {AX}'s, which its failpoint lets through");
    let agent = std::sync::Arc::new(agent);
    let request = tokio::spawn({
        let agent = agent.clone();
        async move { agent.put(AX, &body("acct", 8 * MI, owned())).await.status() }
    });
    poll_until("the create stops at its failpoint", || {
        std::fs::read_to_string(&log).unwrap_or_default().lines().any(|l| {
            l.contains("this request stops here") && l.contains("failpoint=\"hostpath-create-after-staging-sync\"")
        })
    })
    .await;
    assert!(!request.is_finished(), "the create stopped at its failpoint was answered");
    assert!(writer.try_wait().unwrap().is_none(), "the writer is still writing");
    assert!(!root("acct").join(AX).exists(), "{AX} was not renamed into place");
    println!("power cut: the window took {:.1} s", window.elapsed().as_secs_f64());
    println!("{CUT_THE_POWER}");
    // Nothing after this syncs: the host kills qemu now.
    tokio::time::sleep(Duration::from_secs(600)).await;
    panic!("no power cut 10 minutes after asking for it");
}

/// Polls `done` every 100 ms for up to a minute.
async fn poll_until(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < until, "{what}: not within a minute");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes `bytes` to `file` as `uid` and syncs it (dd conv=fsync), as a pod that calls fsync: on disk once this
/// returns.
fn write_synced_as(uid: u32, file: &Path, bytes: &[u8]) {
    use std::io::Write;
    let mut dd = Command::new("dd")
        .arg(format!("of={}", file.display()))
        .args(["bs=1M", "iflag=fullblock", "conv=fsync", "status=none"])
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    dd.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = dd.wait_with_output().unwrap();
    assert!(out.status.success(), "dd of {}: {}", file.display(), String::from_utf8_lossy(&out.stderr));
}

/// A pod filling its volume: 256 KiB at a time into `<dir>/fill`, as uid 999, without fsync, starting over from
/// the beginning when the quota stops it, until it is killed.
fn start_writer(dir: &Path) -> Child {
    let script = format!(
        "cd '{}' || exit 1; i=0; while :; do \
         if dd if=/dev/zero of=fill bs=256k count=1 seek=$i conv=notrunc status=none 2>/dev/null; \
         then i=$((i+1)); else i=0; fi; sleep 0.05; done",
        dir.display()
    );
    Command::new("sh")
        .args(["-c", &script])
        .uid(USER)
        .gid(USER)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "run by vm_host::hostpath_quotas_across_a_reboot in a boot of its own"]
async fn quota_phase_two() {
    in_vm();
    sh("modprobe", &["dm_mod"]);
    lvm(&["vgchange", "-ay", "quota"]);
    mount_pools();
    let checks = Instant::now();
    let debris = found_after_the_cut();
    let mut took = checks.elapsed();
    let agent = GuestAgent::start_with("quota-two", &config()).await;
    let checks = Instant::now();
    held_through_the_cut(&agent, &debris).await;
    took += checks.elapsed();
    println!("power cut: its checks took {:.1} s (the agent's start not counted)", took.as_secs_f64());
    let recorded = std::fs::read_to_string(base().join("quota-projects")).unwrap();
    let ids: Vec<u32> = recorded.split_whitespace().map(|s| s.parse().unwrap()).collect();
    assert_eq!([project_of("xfs", XA), project_of("xfs", XB)], [ids[0], ids[1]], "projects are on disk");
    let list = volumes(&agent).await.volumes;
    assert_eq!(list.iter().find(|v| v.name == XA).unwrap().size_bytes, 96 * MI);

    // The 1 GiB limit set behind the agent's back is gone: the marker's 96 MiB holds again.
    fails_with(write_as(USER, &data(XA, "xfs").join("again"), 32), "No space left on device", "after the restart");

    // A new volume gets a project no file carries: not one of the recovered volumes'.
    agent.create(XC, &body("xfs", 8 * MI, owned())).await;
    let xc_id = project_of("xfs", XC);
    assert!(!ids.contains(&xc_id), "{XC} got project {xc_id}, already in use ({ids:?})");
    // After a delete the next volume gets a project of its own and a limit of its own size.
    agent.delete(XB).await;
    agent.create(XD, &body("xfs", 8 * MI, owned())).await;
    let xd_id = project_of("xfs", XD);
    assert!(xd_id != ids[0] && xd_id != xc_id, "{XD} got project {xd_id}, already in use");
    fails_with(write_as(USER, &data(XD, "xfs").join("fill"), 16), "No space left on device", "a new volume's limit");
    // The volume under the inheriting root is back, still in project 7, and can be deleted (no EXDEV).
    assert_eq!(project_of("inherit", IA), 7);
    let text = metrics(&agent).await;
    assert!(!text.contains(XB), "the deleted volume's series are gone:\n{text}");
    assert!(text.contains(&format!("volume=\"{XD}\"")), "{text}");
    // Churn: volumes made and deleted leave no project quota records behind (issue 19's soak).
    crate::churn::quota(&agent, "xfs", &base().join("mnt-xfs"), owned()).await;
    // The same XFS mounted without quotas: the pool says `none`, and growing a volume that has a project is
    // refused (its limit could not be raised) and changes nothing.
    agent.stop();
    let xfs = base().join("mnt-xfs");
    sh("umount", &[xfs.to_str().unwrap()]);
    sh("mount", &["-o", "noquota", "/dev/mapper/quota-xfs", xfs.to_str().unwrap()]);
    let agent = GuestAgent::start_with("quota-two-noquota", &config()).await;
    assert!(pools_of(&agent).await.contains(&("xfs".to_owned(), "none".to_owned())));
    // (A small growth: without quotas the pool counts conservatively and has only a few MiB left to add.)
    let (status, reason, message) = refusal(agent.post_expand(XA, 100 * MI).await).await;
    assert_eq!((status.as_u16(), reason), (503, ErrorReason::PoolNotReady), "{message}");
    assert!(message.contains("no project quotas"), "{message}");
    let list = volumes(&agent).await.volumes;
    assert_eq!(
        list.iter().find(|v| v.name == XA).unwrap().size_bytes,
        96 * MI,
        "the refused expansion changed nothing"
    );
    agent.stop();

    // Quotas back, but an agent without CAP_SYS_ADMIN, as the base DaemonSet runs it (without deploy/quota). Here
    // no seccomp filter refuses quotactl as a whole (RuntimeDefault would): the kernel shows the quota state and
    // refuses every call that uses it with EPERM. The pools work, as if their filesystems had no quotas, and say
    // why.
    sh("umount", &[xfs.to_str().unwrap()]);
    sh("mount", &["-o", "prjquota", "/dev/mapper/quota-xfs", xfs.to_str().unwrap()]);
    let agent = GuestAgent::start_under("quota-two-unprivileged", &config(), &WITHOUT_SYS_ADMIN).await;
    assert!(!has_sys_admin(agent.pid()), "the agent runs without CAP_SYS_ADMIN");
    let list = pools(&agent).await;
    let refused = ["xfs", "ext4", "acct"];
    for p in &list.pools {
        assert!(p.ready, "{}: {:?}", p.name, p.reason);
        assert_eq!(p.enforcement, "none", "{}", p.name);
        // The pools whose filesystems have project quotas say why they do not use them; the others need no reason.
        let reason = p.enforcement_reason.as_deref();
        if refused.contains(&p.name.as_str()) {
            let reason = reason.unwrap_or_else(|| panic!("{}: no enforcementReason", p.name));
            assert!(reason.contains("CAP_SYS_ADMIN") && reason.contains("deploy/quota"), "{}: {reason}", p.name);
        } else {
            assert_eq!(reason, None, "{}", p.name);
        }
    }
    let nodes: kube::Api<BerthNode> = kube::Api::all(kube::Client::try_default().await.unwrap());
    testbed::kube_util::wait_for(&nodes, NODE, Duration::from_secs(60), |n| {
        n.status.as_ref().is_some_and(|s| {
            s.pools
                .iter()
                .any(|p| p.name == "xfs" && p.enforcement_reason.as_deref().is_some_and(|r| r.contains("deploy/quota")))
        })
    })
    .await
    .expect("the BerthNode says why the xfs pool enforces nothing");
    // Growing a volume that has a project is refused: its limit could not be raised. (First: without usage from
    // the quotas the pool counts conservatively, and has little left to add once the next volume is filled.)
    let (status, reason, message) = refusal(agent.post_expand(XA, 100 * MI).await).await;
    assert_eq!((status.as_u16(), reason), (503, ErrorReason::PoolNotReady), "{message}");
    assert!(message.contains("CAP_SYS_ADMIN"), "{message}");
    // A create makes a plain directory: no project, no limit.
    agent.create(XU, &body("xfs", 8 * MI, owned())).await;
    assert_eq!(project_of("xfs", XU), 0, "a volume of an agent refused quotas has no project");
    write_as(USER, &data(XU, "xfs").join("fill"), 16).expect("nothing limits a volume without a project");
    // One warning per refused pool, naming it and its root, however many samples saw it.
    let log = std::fs::read_to_string(base().join("agent-quota-two-unprivileged.log")).unwrap();
    for pool in POOLS {
        let warnings = log
            .lines()
            .filter(|l| l.contains("project quotas are refused") && l.contains(&format!("pool={pool} ")))
            .collect::<Vec<_>>();
        let expected = usize::from(refused.contains(&pool));
        assert_eq!(warnings.len(), expected, "{pool}:\n{log}");
        if let Some(w) = warnings.first() {
            assert!(w.contains(&root(pool).display().to_string()) && w.contains("CAP_SYS_ADMIN"), "{w}");
        }
    }
    // Putting a directory in a project needs no CAP_SYS_ADMIN (ownership or CAP_FOWNER, docs/storageclass.md):
    // quotactl is what the agent lacks.
    let probe = xfs.join("chproj-probe");
    std::fs::create_dir(&probe).unwrap();
    let mut chproj = WITHOUT_SYS_ADMIN.to_vec();
    chproj.extend(["xfs_io", "-c", "chproj 4242", probe.to_str().unwrap()]);
    sh(chproj[0], &chproj[1..]);
    assert_eq!(sh("lsattr", &["-pd", probe.to_str().unwrap()]).split_whitespace().next(), Some("4242"));
    std::fs::remove_dir(&probe).unwrap();

    for v in [XA, XC, XD, EA, PA, AA, IA, XU] {
        agent.delete(v).await;
    }
    agent.stop();
    unmount_pools();
}

/// The LVs' filesystems with project quotas, each with the pools on it.
const QUOTA_LVS: [(&str, &[&str]); 3] = [("xfs", &["xfs", "inherit"]), ("ext4", &["ext4"]), ("acct", &["acct"])];

/// Berth's project records on the filesystem of LV `lv` that hold some usage or a limit: project ID → (KiB used,
/// hard block limit in KiB), from `xfs_quota -x -c 'report -p -n -N -b -i'` (`-f` on ext4, a foreign filesystem
/// to it). As `churn::projects_on`, with the limits.
fn project_records(lv: &str) -> BTreeMap<u32, (u64, u64)> {
    let mount = base().join(format!("mnt-{lv}"));
    let mut args = vec!["-x"];
    if lv != "xfs" {
        args.push("-f");
    }
    args.extend(["-c", "report -p -n -N -b -i", mount.to_str().unwrap()]);
    let report = sh("xfs_quota", &args);
    // A line per record: `#<id>`, then KiB used, soft and hard limits, warnings, a grace period in brackets; the
    // same for inodes.
    report
        .lines()
        .filter_map(|l| l.trim().strip_prefix('#'))
        .filter_map(|l| {
            let fields: Vec<u64> = l.split_whitespace().filter_map(|f| f.parse().ok()).collect();
            match fields[..] {
                [id, used, _, hard, ..] if id >= 1_000_000_000 && fields[1..].iter().any(|&n| n > 0) => {
                    Some((u32::try_from(id).unwrap(), (used, hard)))
                }
                _ => None,
            }
        })
        .collect()
}

/// The hard limit a volume of `size` bytes has, in KiB (hostpath.rs: its size and the agent's allowance).
fn limit_kib(size: u64) -> u64 {
    (size + ALLOWANCE).div_ceil(1024)
}

/// What is in each pool's `.berth-tmp/`: (pool, entry).
fn staging_entries() -> Vec<(String, String)> {
    let mut found = Vec::new();
    for pool in POOLS {
        for e in std::fs::read_dir(root(pool).join(".berth-tmp")).into_iter().flatten().flatten() {
            found.push((pool.to_owned(), e.file_name().to_string_lossy().into_owned()));
        }
    }
    found
}

/// A volume as the inventory holds it: pool, size, published.
type Held = (String, u64, bool);

/// The volumes on disk: each directory of a pool root with a marker of its own name and pool, and whether it has
/// the `unpublished` mark (hostpath.rs).
fn volumes_on_disk() -> BTreeMap<String, Held> {
    let mut found = BTreeMap::new();
    for pool in POOLS {
        for e in std::fs::read_dir(root(pool)).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !e.file_type().unwrap().is_dir() {
                continue;
            }
            let text = std::fs::read_to_string(e.path().join("volume.json"))
                .unwrap_or_else(|err| panic!("{}: a directory without a readable marker ({err})", e.path().display()));
            let marker: berth_agent::backend::VolumeRecord = serde_json::from_str(&text)
                .unwrap_or_else(|err| panic!("{}: marker {text:?}: {err}", e.path().display()));
            assert_eq!((marker.name.as_str(), marker.pool.as_str()), (name.as_str(), pool), "{}", e.path().display());
            let published = !e.path().join("unpublished").exists();
            found.insert(name, (pool.to_owned(), marker.size_bytes, published));
        }
    }
    found
}

/// Phase two, before the agent runs: what the power cut left. The files written without a sync are gone (else the
/// cut was none), and every limit on disk is its volume's: durable with the create or expansion that set it, not
/// set again by the agent's start (but `XA`'s, set wrong on purpose before the cut). Returns what was in the
/// staging directories.
fn found_after_the_cut() -> Vec<(String, String)> {
    for canary in CANARIES {
        assert!(
            !base().join(canary).exists(),
            "{canary}, written without a sync just before the power cut, survived it: the cut was none (or the guest \
             synced after asking for it), and this test proves nothing"
        );
    }
    let debris = staging_entries();
    println!("after the power cut, before the agent: in the staging directories {debris:?}");
    let mut wrong = Vec::new();
    for (lv, pools) in QUOTA_LVS {
        let records = project_records(lv);
        let ours = AFTER_THE_CUT.iter().filter(|(n, p, _)| pools.contains(p) && *p != "inherit" && *n != XA);
        for (name, pool, size) in ours {
            // A volume that is not there is for the inventory's check to report.
            let Ok(dir) = std::fs::File::open(root(pool).join(name)) else { continue };
            let id = berth_agent::backend::quota::project_of(&dir).unwrap().id;
            let hard = records.get(&id).map(|r| r.1);
            if hard != Some(limit_kib(*size)) {
                wrong.push(format!("{name}: project {id} limited to {hard:?} KiB, its size is {size}"));
            }
        }
    }
    assert!(wrong.is_empty(), "limits on disk after the power cut: {wrong:?}");
    debris
}

/// Phase two, the agent started: every acknowledged change held, the create never answered is at most debris,
/// which the agent removes, and the inventory is the disk's.
async fn held_through_the_cut(agent: &GuestAgent, debris: &[(String, String)]) {
    let until = Instant::now() + Duration::from_secs(60);
    while !staging_entries().is_empty() {
        assert!(Instant::now() < until, "debris left a minute after the start: {:?}", staging_entries());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The inventory: every acknowledged create there with its size (and growth), every delete gone, no half
    // volume; the disk and GET /v1/volumes agree.
    let expected: BTreeMap<String, Held> =
        AFTER_THE_CUT.iter().map(|(n, p, size)| (n.to_string(), (p.to_string(), *size, false))).collect();
    let listed: BTreeMap<String, Held> = volumes(agent)
        .await
        .volumes
        .into_iter()
        .map(|v| (v.name, (v.pool, v.size_bytes, v.published == Some(true))))
        .collect();
    let on_disk = volumes_on_disk();
    let missing: Vec<&String> = expected.keys().filter(|n| !on_disk.contains_key(*n)).collect();
    let extra: Vec<&String> = on_disk.keys().filter(|n| !expected.contains_key(*n)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "after the power cut: acknowledged volumes missing {missing:?}, volumes that should not be there {extra:?} \
         (acknowledged deletes: {EI} before the window, {PD} in it; never answered: {AX}; debris found: {debris:?})"
    );
    assert_eq!(on_disk, expected, "the volumes on disk after the power cut");
    assert_eq!(listed, on_disk, "GET /v1/volumes after the power cut");
    // Data synced before the cut, whole.
    let synced = std::fs::read(base().join("power-cut-synced")).unwrap();
    assert!(std::fs::read(data(XB, "xfs").join("synced")).unwrap() == synced, "{XB}/data/synced after the power cut");
    let before = [(XA, "xfs", "fill", 64), (XA, "xfs", "more", 16), (EA, "ext4", "fill", 32), (EA, "ext4", "more", 8)];
    for (volume, pool, file, mib) in before {
        let len = std::fs::metadata(data(volume, pool).join(file)).map(|m| m.len()).ok();
        assert_eq!(len, Some(mib * MI), "{volume}/data/{file}, written and synced before the power cut");
    }
    // Each volume with a project of its own has its limit (XA's set again from its marker), and the filesystems
    // hold no other records of Berth's projects: none of the create that never answered, none of the delete.
    for (lv, pools) in QUOTA_LVS {
        let records = project_records(lv);
        let mut own = BTreeSet::new();
        for (name, pool, size) in AFTER_THE_CUT.iter().filter(|(_, p, _)| pools.contains(p) && *p != "inherit") {
            let id = project_of(pool, name);
            let hard = records.get(&id).map(|r| r.1);
            assert_eq!(hard, Some(limit_kib(*size)), "{name}: the limit of project {id} after the start");
            own.insert(id);
        }
        let stray: Vec<&u32> = records.keys().filter(|id| !own.contains(id)).collect();
        assert!(stray.is_empty(), "mnt-{lv}: project quota records of no volume after the power cut: {stray:?}");
    }
    // The writer's volume: its file may be short (nothing synced it), what it has reads back as written, and the
    // quota holds.
    let fill = std::fs::read(data(EW, "ext4").join("fill")).unwrap_or_default();
    assert!(
        fill.len() as u64 <= 16 * MI + ALLOWANCE && fill.iter().all(|&b| b == 0),
        "{EW}/data/fill: {} bytes",
        fill.len()
    );
    fails_with(write_as(USER, &data(EW, "ext4").join("after"), 32), "Disk quota exceeded", "the writer's volume");
    println!(
        "power cut held: {XB} grown with its synced data, {XP} and {EW} created, {PD} deleted; the writer's file has \
         {} bytes; the unanswered create {AX} was {}",
        fill.len(),
        if debris.iter().any(|(_, e)| e.contains(AX)) { "debris, removed" } else { "gone" }
    );
    // The rest of phase two runs on the volumes it had before the power cut was added.
    for v in [XP, EW] {
        agent.delete(v).await;
    }
}

/// util-linux's setpriv, removing CAP_SYS_ADMIN from the bounding and inheritable sets before it execs what
/// follows: a process of uid 0 then starts without it.
const WITHOUT_SYS_ADMIN: [&str; 5] = ["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin"];

/// Whether process `pid` has CAP_SYS_ADMIN (bit 21) in its effective set.
fn has_sys_admin(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim();
    u64::from_str_radix(hex, 16).unwrap() & (1 << 21) != 0
}

/// Create+delete of a directory volume through the agent on XFS with project quotas, against the same on an XFS
/// without them, alternating in one boot (docs/benchmarks.md).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "run by vm_host::hostpath_quota_benchmark in a boot of its own"]
async fn quota_benchmark() {
    use std::time::Instant;
    in_vm();
    sh("modprobe", &["dm_mod"]);
    volume_group("qbench.img", "quota");
    let pools = [("quota", "prjquota"), ("noquota", "noquota")];
    let mut toml = String::new();
    for (pool, options) in pools {
        lvm(&["lvcreate", "-y", "-L", "320m", "-n", pool, "quota"]);
        sh("mkfs.xfs", &["-q", &format!("/dev/mapper/quota-{pool}")]);
        let mount = base().join(format!("mnt-{pool}"));
        std::fs::create_dir_all(&mount).unwrap();
        sh("mount", &["-o", options, &format!("/dev/mapper/quota-{pool}"), mount.to_str().unwrap()]);
        toml += &format!("[[pool]]\nname = \"{pool}\"\nbackend = \"hostpath\"\nroot = {:?}\n\n", mount.join(pool));
    }
    let config = base().join("qbench-agent.toml");
    std::fs::write(&config, toml).unwrap();
    init_pools(&config, &["quota", "noquota"]);
    let agent = GuestAgent::start_with("qbench", &config).await;
    let list = pools_of(&agent).await;
    assert_eq!(list, [("quota".to_owned(), "quota".to_owned()), ("noquota".to_owned(), "none".to_owned())]);
    let rounds: usize = std::env::var("BERTH_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(30);
    let mut times: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    // A warm-up round each (the token review is then cached, as for a controller calling repeatedly), then the
    // pools alternate so drift in the machine's speed falls on both.
    for round in 0..=rounds {
        for (pool, _) in pools {
            let name = format!("pvc-qbench-{pool}-{round}");
            let t = Instant::now();
            agent.create(&name, &body(pool, MI, owned())).await;
            agent.delete(&name).await;
            if round > 0 {
                times.entry(pool).or_default().push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
    agent.stop();
    let median = |pool: &str| {
        let mut v = times[pool].clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (with, without) = (median("quota"), median("noquota"));
    println!("BENCH rounds={rounds} quota_ms={with:.1} noquota_ms={without:.1} ratio={:.2}", with / without);
}

async fn pools_of(agent: &GuestAgent) -> Vec<(String, String)> {
    pools(agent).await.pools.into_iter().map(|p| (p.name, p.enforcement)).collect()
}
