//! An lvm pool on the host, where the kernel has no device-mapper: lvm2 works on the metadata only (`global {
//! activation = 0 }`, the config form of `--driverloaded n`) of a volume group on a loop device. What that covers
//! with the real agent, real lvm2, real HTTPS and the real TokenReview: readiness by the volume group's tag
//! (`init-pool`), capacity from `vgs`, the inventory rebuilt from LV tags alone, the typed refusal of what does not
//! fit, and a volume group that disappears. Everything that activates, formats or mounts is in the VM tier
//! (`hack/test-vm lvm`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use berth::agent_api::{ErrorBody, ErrorReason, PoolList, PoolStatus, VolumeList};
use reqwest::StatusCode;
use serde_json::json;
use testbed::agents::{AgentProcess, PoolSpec};
use testbed::{TestBed, TestBedConfig};

const MI: u64 = 1 << 20;
const META_ONLY: &str = "global { activation = 0 }";
const VOL: &str = "pvc-2f8e3c1a-5b2d-4c7e-9a10-2b3c4d5e6f70";

fn lvm(args: &[&str]) -> String {
    let out = Command::new("lvm")
        .args(args)
        .args(["--config", META_ONLY])
        .env("LC_ALL", "C")
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "lvm {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A volume group on a loop device over a sparse file; removed with everything in it on drop.
struct LoopVg {
    name: String,
    device: String,
    _dir: tempfile::TempDir,
    removed: bool,
}

impl LoopVg {
    fn new(size: u64) -> LoopVg {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vg.img");
        std::fs::File::create_new(&image).unwrap().set_len(size).unwrap();
        let out = Command::new("losetup").args(["--find", "--show"]).arg(&image).output().unwrap();
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        let device = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let name = format!("berth-test-{:08x}", fastrand::u32(..));
        lvm(&["pvcreate", "-y", &device]);
        lvm(&["vgcreate", &name, &device]);
        LoopVg { name, device, _dir: dir, removed: false }
    }

    fn tags(&self) -> String {
        lvm(&["vgs", "--noheadings", "-o", "vg_tags", &self.name]).trim().to_owned()
    }

    fn free(&self) -> u64 {
        lvm(&["vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_free", &self.name]).trim().parse().unwrap()
    }

    fn remove(&mut self) {
        if !self.removed {
            lvm(&["vgremove", "-y", "-f", &self.name]);
            self.removed = true;
        }
    }
}

impl Drop for LoopVg {
    fn drop(&mut self) {
        if !self.removed {
            let _ = Command::new("lvm").args(["vgremove", "-y", "-f", &self.name, "--config", META_ONLY]).output();
        }
        let _ = Command::new("lvm").args(["pvremove", "-y", &self.device, "--config", META_ONLY]).output();
        let _ = Command::new("losetup").args(["--detach", &self.device]).output();
    }
}

/// Fields drop in order: the agent goes before the bed, whose API server would otherwise wait for its watches.
struct World {
    agent: AgentProcess,
    _bed: TestBed,
    http: reqwest::Client,
    token: String,
}

impl World {
    /// A bed with one node whose agent has one lvm pool, `lvm`, on `vg` (with `extra` config lines).
    async fn start(vg: &LoopVg, extra: &str) -> World {
        let bed = TestBed::start(TestBedConfig::nodes(1)).await.unwrap();
        bed.install_berth().await.unwrap();
        let pool = PoolSpec {
            backend: "lvm".into(),
            extra: format!("volume-group = {:?}\nlvm-config = {META_ONLY:?}\n{extra}", vg.name),
            ..PoolSpec::new("lvm")
        };
        let agent = bed.start_agent(Path::new(env!("CARGO_BIN_EXE_berth-agent")), 0, &[pool], false).await.unwrap();
        World { http: agent.http().unwrap(), token: bed.controller_token("node-0").await.unwrap(), agent, _bed: bed }
    }

    /// `berth-agent init-pool` of the `lvm` pool, as an administrator runs it.
    fn init_pool(&self) {
        let out = Command::new(env!("CARGO_BIN_EXE_berth-agent"))
            .args(["init-pool", "--config"])
            .arg(&self.agent.config)
            .args(["--pool", "lvm"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    async fn pool(&self) -> PoolStatus {
        let resp = self.http.get(self.agent.url("/v1/pools")).bearer_auth(&self.token).send().await.unwrap();
        let list: PoolList = resp.json().await.unwrap();
        list.pools.into_iter().find(|p| p.name == "lvm").unwrap()
    }

    /// Waits (the agent samples every 0.5 s, and re-reads a pool once it turns ready) until `f` holds.
    async fn pool_until(&self, f: impl Fn(&PoolStatus) -> bool) -> PoolStatus {
        for _ in 0..100 {
            let p = self.pool().await;
            if f(&p) {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("pool never reached the state: {:?}", self.pool().await);
    }

    async fn put(&self, name: &str, size: u64) -> (StatusCode, ErrorBody) {
        let body = json!({"pool": "lvm", "sizeBytes": size, "claim": {"namespace": "db", "name": "data-0"}});
        let resp = self
            .http
            .put(self.agent.url(&format!("/v1/volumes/{name}")))
            .bearer_auth(&self.token)
            .header("berth-leader-epoch", "1")
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lvm_pool_metadata_on_a_loop_device() {
    let mut vg = LoopVg::new(256 * MI);
    // A volume an earlier agent made (metadata only: -an, not zeroed), and an LV that is not Berth's.
    lvm(&[
        "lvcreate",
        "-an",
        "-Zn",
        "-L",
        "32m",
        "-n",
        &format!("berth-{VOL}"),
        &vg.name,
        "--addtag",
        "berth:pool=lvm",
        "--addtag",
        "berth:v=1",
        "--addtag",
        &format!("berth:volume={VOL}"),
        "--addtag",
        "berth:size=33554432",
        "--addtag",
        "berth:volmode=Filesystem",
        "--addtag",
        "berth:claim=db/data-db-0",
        "--addtag",
        "berth:owner=999:999",
        "--addtag",
        "berth:perm=2770",
        "--addtag",
        "berth:created=2026-11-29T05:51:27Z",
        "--addtag",
        "berth:fs=xfs",
        "--addtag",
        "berth:mountopts=6e6f6174696d65",
    ]);
    lvm(&["lvcreate", "-an", "-Zn", "-L", "8m", "-n", "not-berths", &vg.name]);

    // Not initialised: the volume group carries no pool tag yet.
    let w = World::start(&vg, "").await;
    let p = w.pool().await;
    assert!(!p.ready, "{p:?}");
    assert!(p.reason.as_deref().unwrap_or_default().contains("init-pool"), "{p:?}");
    let (status, body) = w.put("pvc-a", MI).await;
    assert_eq!((status, body.reason), (StatusCode::SERVICE_UNAVAILABLE, ErrorReason::PoolNotReady), "{}", body.message);

    // init-pool tags the volume group (and makes the root for mount points); the running agent picks it up.
    w.init_pool();
    assert_eq!(vg.tags(), "berth:pool=lvm");
    assert!(w.agent.pool_root("lvm").is_dir());
    let p = w.pool_until(|p| p.ready).await;
    assert_eq!((p.backend.as_str(), p.enforcement.as_str()), ("lvm", "device"));
    // Capacity from vgs: the VG's free extents (the foreign LV's 8 MiB are already gone from them).
    assert_eq!(p.free_bytes, vg.free());
    assert_eq!(p.free_bytes, p.capacity_bytes - 40 * MI);
    assert_eq!((p.volumes, p.allocated_bytes), (1, 32 * MI), "the tagged LV is in the inventory, the other one not");

    // The inventory, from the tags alone.
    let resp = w.http.get(w.agent.url("/v1/volumes")).bearer_auth(&w.token).send().await.unwrap();
    let list: VolumeList = resp.json().await.unwrap();
    assert_eq!(list.volumes.len(), 1);
    let v = &list.volumes[0];
    assert_eq!((v.name.as_str(), v.size_bytes, v.uid, v.gid, v.mode), (VOL, 32 * MI, 999, 999, 0o2770));
    assert_eq!((v.claim.namespace.as_str(), v.claim.name.as_str()), ("db", "data-db-0"));
    assert_eq!((v.fs_type.as_deref(), v.mount_options.clone()), (Some("xfs"), vec!["noatime".to_string()]));
    assert_eq!(PathBuf::from(&v.path), w.agent.pool_root("lvm").join(VOL).join("data"));
    assert!(!Path::new(&v.path).exists(), "not mounted (no device-mapper here), so the PV path must not exist");

    // What does not fit: the typed refusal, and nothing made.
    let (status, body) = w.put("pvc-b", p.free_bytes + 4 * MI).await;
    assert_eq!(
        (status, body.reason),
        (StatusCode::INSUFFICIENT_STORAGE, ErrorReason::InsufficientSpace),
        "{}",
        body.message
    );
    assert!(!lvm(&["lvs", "--noheadings", "-o", "lv_name", &vg.name]).contains("pvc-b"));

    // The volume group goes away: not ready, with lvm2's reason, and nothing is promised.
    vg.remove();
    let p = w.pool_until(|p| !p.ready).await;
    assert!(p.reason.as_deref().unwrap_or_default().contains("not found"), "{p:?}");
    let (status, body) = w.put("pvc-c", MI).await;
    assert_eq!((status, body.reason), (StatusCode::SERVICE_UNAVAILABLE, ErrorReason::PoolNotReady), "{}", body.message);
}

/// lvm2 that hangs (here: waiting for the volume group's lock, which another process holds, as behind a stuck
/// `pvmove`) costs a request at most the pool's command deadline: it answers 503 naming the command, the pool is
/// busy (not ready, and `/healthz` says so while staying 200) without waiting again, the command is never killed,
/// and once it exits the pool is read from disk again and serves.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_lvm2_makes_its_pool_busy_not_the_agent_stuck() {
    let vg = LoopVg::new(64 * MI);
    let w = World::start(&vg, "command-timeout-seconds = 2").await;
    w.init_pool();
    let before = w.pool_until(|p| p.ready).await;

    // Someone else holds the volume group's lock (lvm2's flock on a file where its default config keeps it). Held
    // by this process, so that dropping the descriptor releases it, also when the test fails.
    let lock_file = format!("/run/lock/lvm/V_{}", vg.name);
    std::fs::create_dir_all("/run/lock/lvm").unwrap();
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_file).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();

    // Without a deadline this request waits for as long as the lock is held (the client gives up after 30 s).
    let (status, body) = w.put("pvc-a", MI).await;
    assert_eq!((status, body.reason), (StatusCode::SERVICE_UNAVAILABLE, ErrorReason::PoolNotReady), "{}", body.message);
    assert!(body.message.contains("lvm vgs") && body.message.contains("2 s deadline"), "{}", body.message);
    let p = w.pool().await;
    assert!(!p.ready && p.reason.as_deref().unwrap_or_default().contains("busy"), "{p:?}");
    let health = w.http.get(w.agent.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK, "liveness must not restart the agent over it");
    let health = health.text().await.unwrap();
    assert!(health.starts_with("busy: lvm: `lvm vgs"), "{health}");
    // The stuck lvm2 is left running: it is still waiting for the lock.
    let waiting = Command::new("pgrep").args(["-f", &format!("lvm vgs.*{}", vg.name)]).output().unwrap();
    assert!(waiting.status.success(), "the stuck lvm2 was killed");

    // The lock is released: lvm2 finishes, the pool is read again and serves as before.
    drop(lock);
    let after = w.pool_until(|p| p.ready).await;
    assert_eq!((after.free_bytes, after.volumes), (before.free_bytes, before.volumes), "nothing changed meanwhile");
    let health = w.http.get(w.agent.url("/healthz")).send().await.unwrap().text().await.unwrap();
    assert_eq!(health, "ok");
    assert!(w.agent.log().contains("a command that outlived its deadline has exited"), "{}", w.agent.log());
}
