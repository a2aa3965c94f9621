//! Tests that run *inside* the VM (a real kernel with device-mapper), started by `vm_host`. They refuse to run
//! on the host: run them with `hack/test-vm`.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use testbed::vm::guest_disk;

fn in_vm() {
    assert_eq!(
        std::env::var("BERTH_IN_VM").as_deref(),
        Ok("1"),
        "this test needs the VM's kernel: run hack/test-vm, not cargo test directly"
    );
}

fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// lvm2 as Berth will call it: C locale, JSON reports in bytes. No udev runs in the guest, so lvm2 must not
/// wait for it; it creates the /dev/mapper nodes itself.
fn lvm(args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.extend(["--config", "activation { udev_sync = 0 udev_rules = 0 }"]);
    let out = Command::new("lvm").args(&all).env("LC_ALL", "C").output().expect("lvm");
    assert!(out.status.success(), "lvm {all:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn lv_report(vg: &str) -> Vec<Value> {
    let json = lvm(&[
        "lvs",
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        "lv_name,vg_name,lv_size,lv_path,lv_dm_path,lv_active",
        vg,
    ]);
    let v: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("lvs JSON {json:?}: {e}"));
    v["report"][0]["lv"].as_array().cloned().unwrap_or_default()
}

fn is_block_device(p: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
}

#[test]
fn kernel_is_the_vms_not_the_hosts() {
    in_vm();
    let host = std::env::var("BERTH_HOST_KERNEL").expect("BERTH_HOST_KERNEL is set by the VM runner");
    let guest = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_ne!(guest.trim(), host.trim(), "the command ran on the host's kernel");
}

#[test]
fn lvm_smoke_active_volume_with_a_device_node() {
    in_vm();
    sh("modprobe", &["dm_mod"]);
    let disk = guest_disk("smoke.img").expect("the smoke disk is attached");
    let disk = disk.to_str().unwrap();
    lvm(&["pvcreate", "-y", disk]);
    lvm(&["vgcreate", "berth-smoke", disk]);
    lvm(&["lvcreate", "-y", "-L", "64m", "-n", "vol-1", "berth-smoke"]);
    let lvs = lv_report("berth-smoke");
    assert_eq!(lvs.len(), 1, "{lvs:?}");
    let lv = &lvs[0];
    assert_eq!(lv["lv_name"], "vol-1");
    assert_eq!(lv["lv_size"], "67108864");
    assert_eq!(lv["lv_active"], "active");
    // device-mapper doubles hyphens inside names; the report gives the right path.
    assert_eq!(lv["lv_dm_path"], "/dev/mapper/berth--smoke-vol--1");
    let dm_path = lv["lv_dm_path"].as_str().unwrap();
    assert!(is_block_device(dm_path), "{dm_path} is not a block device");
}

/// The host side serves a token on its 127.0.0.1; the guest must read it through 10.0.2.2.
#[test]
fn host_loopback_is_reachable() {
    in_vm();
    use std::io::Read;
    let port = std::env::var("BERTH_HOST_PORT").expect("set by vm_host");
    let token = std::env::var("BERTH_HOST_TOKEN").expect("set by vm_host");
    let mut conn = std::net::TcpStream::connect((testbed::vm::HOST_FROM_GUEST, port.parse::<u16>().unwrap()))
        .expect("connect to the host through 10.0.2.2");
    let mut got = String::new();
    conn.read_to_string(&mut got).unwrap();
    assert_eq!(got.trim(), token);
}

/// First boot of the reboot test: a volume group with a filesystem holding a token, then everything closed.
#[test]
#[ignore = "run by vm_host::disks_survive_a_reboot in a boot of its own"]
fn reboot_phase_one() {
    in_vm();
    sh("modprobe", &["dm_mod"]);
    let disk = guest_disk("reboot.img").unwrap();
    let disk = disk.to_str().unwrap();
    lvm(&["pvcreate", "-y", disk]);
    lvm(&["vgcreate", "berth-reboot", disk]);
    lvm(&["lvcreate", "-y", "-L", "32m", "-n", "data", "berth-reboot"]);
    let dev = lv_report("berth-reboot")[0]["lv_dm_path"].as_str().unwrap().to_owned();
    sh("mkfs.ext4", &["-q", &dev]);
    std::fs::create_dir_all("/tmp/mnt").unwrap();
    sh("mount", &[&dev, "/tmp/mnt"]);
    std::fs::write("/tmp/mnt/token", std::env::var("BERTH_TOKEN").unwrap()).unwrap();
    sh("umount", &["/tmp/mnt"]);
    lvm(&["vgchange", "-an", "berth-reboot"]);
}

/// Second boot: the same disk image, the volume group found again, the token still there.
#[test]
#[ignore = "run by vm_host::disks_survive_a_reboot in a boot of its own"]
fn reboot_phase_two() {
    in_vm();
    sh("modprobe", &["dm_mod"]);
    lvm(&["vgchange", "-ay", "berth-reboot"]);
    let dev = lv_report("berth-reboot")[0]["lv_dm_path"].as_str().unwrap().to_owned();
    assert!(Path::new(&dev).exists());
    std::fs::create_dir_all("/tmp/mnt").unwrap();
    sh("mount", &[&dev, "/tmp/mnt"]);
    let token = std::fs::read_to_string("/tmp/mnt/token").unwrap();
    assert_eq!(token, std::env::var("BERTH_TOKEN").unwrap());
    sh("umount", &["/tmp/mnt"]);
}
