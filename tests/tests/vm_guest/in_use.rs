//! Issue 19 in a real kernel, through the real agent: a logical volume something still uses is not deleted (409
//! `InUse`, nothing changed), and the bytes a new or grown raw block volume of a thick pool gets read back as
//! zeroes, whatever its extents held before. In the second boot of `vm_host::hostpath_quotas_across_a_reboot`, on a
//! disk of its own (`inuse.img`).

use std::path::Path;
use std::process::Command;

use berth::agent_api::ErrorReason;
use reqwest::StatusCode;
use serde_json::json;
use testbed::bind_mount::BindMount;

use crate::lvm_agent::*;
use crate::{in_vm, sh, volume_group};

const FS: &str = "pvc-22222222-0000-4000-8000-000000000001";
const RAW: &str = "pvc-22222222-0000-4000-8000-000000000002";
const THIN_RAW: &str = "pvc-22222222-0000-4000-8000-000000000003";
const FRESH: &str = "pvc-22222222-0000-4000-8000-000000000004";

fn block() -> serde_json::Value {
    json!({"volumeMode": "Block"})
}

/// An LV made and filled with the pattern outside Berth, then removed outside Berth (lvremove does not zero):
/// its extents, which the next LV gets.
fn dirty_extents(size: &str) -> Vec<String> {
    lvm(&["lvcreate", "-y", "-W", "y", "-L", size, "-n", "stranger", "berth"]);
    let dev = crate::lv_report("berth").into_iter().find(|l| l["lv_name"] == "stranger").unwrap();
    let dev = dev["lv_dm_path"].as_str().unwrap().to_owned();
    let bytes = sh("blockdev", &["--getsize64", &dev]).trim().parse().unwrap();
    write_pattern(&dev, bytes);
    assert!(contains_pattern(&dev));
    let extents = extents("stranger");
    lvm(&["lvremove", "-y", "berth/stranger"]);
    extents
}

/// The extents of ranges such as `/dev/vda:4-7`.
fn extent_set(ranges: &[String]) -> std::collections::BTreeSet<(String, u64)> {
    let mut set = std::collections::BTreeSet::new();
    for range in ranges {
        let (pv, span) = range.rsplit_once(':').unwrap();
        let (from, to) = span.split_once('-').unwrap_or((span, span));
        for e in from.parse::<u64>().unwrap()..=to.parse().unwrap() {
            set.insert((pv.to_owned(), e));
        }
    }
    set
}

async fn in_use(agent: &GuestAgent, name: &str) -> String {
    let (status, reason, message) = refusal(agent.delete_response(name).await).await;
    assert_eq!((status, reason), (StatusCode::CONFLICT, ErrorReason::InUse), "{name}: {message}");
    assert!(lv_names().contains(&format!("berth-{name}")), "{name}'s LV is still there");
    let tags = lvm(&["lvs", "--noheadings", "-o", "lv_tags", &format!("berth/berth-{name}")]);
    assert!(!tags.contains("berth:deleting"), "nothing was changed: {tags}");
    assert!(volumes(agent).await.volumes.iter().any(|v| v.name == name), "{name} is still a volume");
    message
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "run by vm_host::hostpath_quotas_across_a_reboot in its second boot"]
async fn lvm_in_use_and_zeroing() {
    in_vm();
    sh("modprobe", &["dm_mod"]);
    sh("modprobe", &["dm_thin_pool"]);
    sh("modprobe", &["loop"]);
    volume_group("inuse.img", "berth");
    lvm(&["lvcreate", "-y", "-L", "128m", "-T", "berth/thin"]);
    init_pools(&config(), &["thick", "thin"]);
    let token = env("BERTH_TOKEN");
    let started = std::time::Instant::now();
    let step = |what: &str| println!("{:6.1} s  {what}", started.elapsed().as_secs_f64());

    // Zeroed at create: a thick raw block volume on the extents of an LV removed outside Berth, never zeroed.
    let dirty = dirty_extents("16m");
    let raw = GuestAgent::start("inuse").await;
    let made = raw.create(RAW, &body("thick", BLOCK_SIZE, block())).await;
    assert_eq!(
        extents(&format!("berth-{RAW}")),
        dirty,
        "the new volume sits on the dirty extents (else this proves nothing)"
    );
    assert!(!contains_pattern(&made.path), "a new block volume shows what an LV removed outside Berth held");
    assert!(zeroes_at(&made.path, 0, BLOCK_SIZE), "it reads zeroes");
    write_block_token(&made.path, &token);

    step("zeroed at create");
    // Zeroed when grown: the free extents after it dirtied the same way; the grown region lands on them.
    let dirty = dirty_extents("16m");
    let grown = raw.expand(RAW, 2 * BLOCK_SIZE).await;
    assert_eq!(grown.size_bytes, 2 * BLOCK_SIZE);
    let now = extents(&format!("berth-{RAW}"));
    assert!(
        extent_set(&dirty).is_subset(&extent_set(&now)),
        "the grown region is on the dirty extents: {now:?} vs {dirty:?}"
    );
    assert_eq!(sh("blockdev", &["--getsize64", &made.path]).trim(), (2 * BLOCK_SIZE).to_string());
    assert!(zeroes_at(&made.path, BLOCK_SIZE, BLOCK_SIZE), "the grown region reads zeroes");
    assert!(!contains_pattern(&made.path));
    assert_eq!(read_block_token(&made.path, token.len()), token, "the volume's own bytes are kept");
    assert!(!lv_names().iter().any(|n| n.ends_with(".grow")), "no spare LV left: {:?}", lv_names());

    step("zeroed when grown");
    // In use: a raw block volume mapped by kubelet through a loop device (as for a pod), then not.
    let loop_dev = sh("losetup", &["--find", "--show", "--read-only", &made.path]).trim().to_owned();
    let message = in_use(&raw, RAW).await;
    assert!(message.contains("is open"), "{message}");
    assert_eq!(read_block_token(&made.path, token.len()), token, "nothing zeroed");
    sh("losetup", &["-d", &loop_dev]);
    raw.delete(RAW).await;

    step("raw block in use (loop device)");
    // A thin raw block volume a process has open.
    let thin = raw.create(THIN_RAW, &body("thin", BLOCK_SIZE, block())).await;
    let holder = std::fs::File::open(&thin.path).unwrap();
    in_use(&raw, THIN_RAW).await;
    drop(holder);
    raw.delete(THIN_RAW).await;

    step("thin raw block in use (a process)");
    // A filesystem volume whose data directory kubelet bind-mounted into a pod: the agent's own umount
    // succeeds, the filesystem lives on in the pod's mount. Refused, and mounted back where it was.
    let fs = raw.create(FS, &body("thick", SMALL, FS_EXTRA("ext4"))).await;
    std::fs::write(Path::new(&fs.path).join("token"), &token).unwrap();
    let pod = BindMount::new(
        Path::new(&fs.path),
        Path::new("/tmp/pods/u1/volumes/kubernetes.io~local-volume").join(FS).as_path(),
    )
    .unwrap();
    let message = in_use(&raw, FS).await;
    assert!(message.contains(&pod.target().display().to_string()), "the refusal names the pod's mount: {message}");
    check_filesystem_volume(&fs, "ext4", &token);
    assert_eq!(std::fs::read_to_string(pod.target().join("token")).unwrap(), token);
    pod.unmount().unwrap();
    let mount_point = Path::new(&fs.path).parent().unwrap().to_owned();
    raw.delete(FS).await;
    assert!(mount_of(&mount_point).is_none() && !mount_point.exists());
    assert!(!lv_names().contains(&format!("berth-{FS}")));

    step("filesystem in use (a pod's bind mount)");
    // What a deleted volume held does not reach the next one either (zeroed at delete, and at create).
    let fresh = raw.create(FRESH, &body("thick", BLOCK_SIZE, block())).await;
    assert!(zeroes_at(&fresh.path, 0, BLOCK_SIZE));
    raw.delete(FRESH).await;
    let log = std::fs::read_to_string(base().join("agent-inuse.log")).unwrap();
    assert!(log.contains("zeroed"), "the agent logs its zeroing");
    step("a fresh block volume");
    raw.stop();
    let _ = Command::new("sync").status();
}
