//! Tests that run *inside* the VM (a real kernel with device-mapper), started by `vm_host`. They refuse to run
//! on the host: run them with `hack/test-vm`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use testbed::vm::guest_disk;

#[path = "vm_guest/churn.rs"]
mod churn;
#[path = "vm_guest/crash.rs"]
mod crash;
#[path = "vm_guest/quotas.rs"]
mod quotas;

#[path = "vm_guest/in_use.rs"]
mod in_use;

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

/// Makes the volume group `vg` on the whole disk image `image` (attached by the host side).
fn volume_group(image: &str, vg: &str) {
    let disk = guest_disk(image).unwrap_or_else(|e| panic!("disk {image}: {e}"));
    let disk = disk.to_str().unwrap();
    lvm(&["pvcreate", "-y", disk]);
    lvm(&["vgcreate", vg, disk]);
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
    volume_group("smoke.img", "berth-smoke");
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
    volume_group("reboot.img", "berth-reboot");
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

// ---------------------------------------------------------------------------------------------------------------
// LVM pools through the real agent: `berth-agent` runs in the guest with two lvm pools on the disk `lvm.img`
// (thick, and thin in a thin pool of the same volume group); its API is called over HTTPS with the controller's
// token, which the agent checks with the host's API server (TokenReview through 10.0.2.2). Two boots from the
// same disk image and pool directory: `lvm_agent_phase_one` makes and fills volumes, `lvm_agent_phase_two` finds
// them after a real reboot (nothing mounted, nothing active).

mod lvm_agent {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command};
    use std::time::Duration;

    use berth::agent_api::{ErrorBody, ErrorReason, PoolList, Volume, VolumeList};
    use berth::berth_node::BerthNode;
    use kube::api::Api;
    use reqwest::StatusCode;
    use serde_json::{Value, json};

    pub const FS_EXT4: &str = "pvc-11111111-0000-4000-8000-000000000001";
    pub const FS_XFS: &str = "pvc-11111111-0000-4000-8000-000000000002";
    pub const THIN_XFS: &str = "pvc-11111111-0000-4000-8000-000000000003";
    pub const BLOCK: &str = "pvc-11111111-0000-4000-8000-000000000004";
    pub const DOOMED_BLOCK: &str = "pvc-11111111-0000-4000-8000-000000000005";
    pub const FRESH_BLOCK: &str = "pvc-11111111-0000-4000-8000-000000000006";
    pub const DOOMED_FS: &str = "pvc-11111111-0000-4000-8000-000000000007";
    pub const GROW_EXT4: &str = "pvc-11111111-0000-4000-8000-000000000008";
    /// A clone of THIN_XFS (issue 20), larger than it.
    pub const CLONE_XFS: &str = "pvc-11111111-0000-4000-8000-000000000009";
    pub const THIN_BLOCK: &str = "pvc-11111111-0000-4000-8000-00000000000a";
    /// A clone of THIN_BLOCK.
    pub const CLONE_BLOCK: &str = "pvc-11111111-0000-4000-8000-00000000000b";
    pub const NODE: &str = "node-0";
    pub const MI: u64 = 1 << 20;
    const LVM_CONFIG: &str = "activation { udev_sync = 0 udev_rules = 0 }";
    const PATTERN: &[u8] = b"BERTH-DELETED-DATA-PATTERN-0123456789abcdef";

    pub fn env(key: &str) -> String {
        std::env::var(key).unwrap_or_else(|_| panic!("{key} is set by vm_host"))
    }

    /// Persistent across boots (a host directory shared read-write): pool roots (mount points), agent state.
    pub fn base() -> PathBuf {
        PathBuf::from(env("BERTH_POOL_BASE"))
    }

    pub fn root(pool: &str) -> PathBuf {
        base().join(pool)
    }

    pub fn lvm(args: &[&str]) -> String {
        super::lvm(args)
    }

    pub fn lv_names() -> Vec<String> {
        super::lv_report("berth").iter().map(|l| l["lv_name"].as_str().unwrap().to_owned()).collect()
    }

    /// `berth-agent init-pool` for each of `pools` in `config`.
    pub fn init_pools(config: &Path, pools: &[&str]) {
        for pool in pools {
            let out = Command::new(env("BERTH_AGENT_BIN"))
                .args(["init-pool", "--config"])
                .arg(config)
                .args(["--pool", pool])
                .output()
                .unwrap();
            assert!(out.status.success(), "init-pool {pool}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    pub fn config() -> PathBuf {
        let path = base().join("agent.toml");
        let pools = format!(
            "[[pool]]\nname = \"thick\"\nbackend = \"lvm\"\nroot = {thick:?}\nvolume-group = \"berth\"\nlvm-config = {LVM_CONFIG:?}\n\n\
             [[pool]]\nname = \"thin\"\nbackend = \"lvm\"\nroot = {thin:?}\nvolume-group = \"berth\"\nthin-pool = \"thin\"\n\
             overprovision-ratio = 2.0\nlvm-config = {LVM_CONFIG:?}\n",
            thick = root("thick"),
            thin = root("thin"),
        );
        std::fs::write(&path, pools).unwrap();
        path
    }

    pub struct GuestAgent {
        child: Child,
        pub http: reqwest::Client,
        token: String,
    }

    const URL: &str = "https://127.0.0.1:7443";

    impl GuestAgent {
        /// Starts `berth-agent run` with the lvm pools' config (see [`GuestAgent::start_with`]).
        pub async fn start(phase: &str) -> GuestAgent {
            GuestAgent::start_with(phase, &config()).await
        }

        /// Starts `berth-agent run` with `config` and waits for the BerthNode to carry a certificate other than
        /// the one before.
        pub async fn start_with(phase: &str, config: &Path) -> GuestAgent {
            GuestAgent::start_under(phase, config, &[]).await
        }

        /// [`GuestAgent::start_with`], the agent started by `wrapper` (a program and its arguments, such as
        /// `setpriv …`, which execs the agent's command line given after them) when it is not empty.
        pub async fn start_under(phase: &str, config: &Path, wrapper: &[&str]) -> GuestAgent {
            GuestAgent::start_as(phase, config, wrapper, &env("BERTH_AGENT_BIN"), &[]).await
        }

        /// [`GuestAgent::start_under`] with the agent binary `binary` (the failpoints build) and `extra_env`.
        pub async fn start_as(
            phase: &str,
            config: &Path,
            wrapper: &[&str],
            binary: &str,
            extra_env: &[(&str, &str)],
        ) -> GuestAgent {
            let client = kube::Client::try_default().await.expect("KUBECONFIG reaches the host's API server");
            let nodes: Api<BerthNode> = Api::all(client);
            let old = nodes.get_opt(NODE).await.unwrap().and_then(|n| n.status).map(|s| s.certificate);
            // Appended to: a phase that restarts its agent keeps every run's lines.
            let log = std::fs::File::options()
                .create(true)
                .append(true)
                .open(base().join(format!("agent-{phase}.log")))
                .unwrap();
            let mut command = match wrapper.split_first() {
                Some((program, args)) => {
                    let mut c = Command::new(program);
                    c.args(args).arg(binary);
                    c
                }
                None => Command::new(binary),
            };
            command.envs(extra_env.iter().copied());
            let child = command
                .args(["run", "--config"])
                .arg(config)
                .args(["--node-name", NODE, "--listen", "127.0.0.1:7443", "--state-dir"])
                .arg(base().join("state"))
                .env("RUST_LOG", "info,kube=warn")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            let node = testbed::kube_util::wait_for(&nodes, NODE, Duration::from_secs(120), |n| {
                n.status.as_ref().is_some_and(|s| s.endpoint == URL && Some(&s.certificate) != old.as_ref())
            })
            .await
            .unwrap_or_else(|e| {
                let log = std::fs::read_to_string(base().join(format!("agent-{phase}.log"))).unwrap_or_default();
                panic!("the agent did not publish itself: {e}\n{log}")
            });
            let cert = node.status.unwrap().certificate;
            let http = reqwest::Client::builder()
                .add_root_certificate(reqwest::Certificate::from_pem(cert.as_bytes()).unwrap())
                .tls_built_in_root_certs(false)
                .timeout(Duration::from_secs(120))
                // Below the agent's header read timeout, which closes idle connections (as the controller's).
                .pool_idle_timeout(Duration::from_secs(20))
                .build()
                .unwrap();
            GuestAgent { child, http, token: env("BERTH_CONTROLLER_TOKEN") }
        }

        pub async fn put(&self, name: &str, body: &Value) -> reqwest::Response {
            self.http
                .put(format!("{URL}/v1/volumes/{name}"))
                .bearer_auth(&self.token)
                .header("berth-leader-epoch", "1")
                .json(body)
                .send()
                .await
                .unwrap()
        }

        pub async fn create(&self, name: &str, body: &Value) -> Volume {
            let resp = self.put(name, body).await;
            let status = resp.status();
            let text = resp.text().await.unwrap();
            assert_eq!(status, StatusCode::CREATED, "create {name}: {text}");
            serde_json::from_str(&text).unwrap()
        }

        pub async fn post_expand(&self, name: &str, size: u64) -> reqwest::Response {
            self.http
                .post(format!("{URL}/v1/volumes/{name}/expand"))
                .bearer_auth(&self.token)
                .header("berth-leader-epoch", "1")
                .json(&json!({ "sizeBytes": size }))
                .send()
                .await
                .unwrap()
        }

        pub async fn expand(&self, name: &str, size: u64) -> Volume {
            let resp = self.post_expand(name, size).await;
            let status = resp.status();
            let text = resp.text().await.unwrap();
            assert_eq!(status, StatusCode::OK, "expand {name}: {text}");
            serde_json::from_str(&text).unwrap()
        }

        pub async fn delete_response(&self, name: &str) -> reqwest::Response {
            self.http
                .delete(format!("{URL}/v1/volumes/{name}"))
                .bearer_auth(&self.token)
                .header("berth-leader-epoch", "1")
                .send()
                .await
                .unwrap()
        }

        pub async fn delete(&self, name: &str) {
            let resp = self.delete_response(name).await;
            let status = resp.status();
            let body: Value = resp.json().await.unwrap();
            assert_eq!((status, body), (StatusCode::OK, json!({"deleted": true})), "delete {name}");
        }

        pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
            let resp = self.http.get(format!("{URL}{path}")).bearer_auth(&self.token).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "GET {path}");
            resp.json().await.unwrap()
        }

        pub fn pid(&self) -> u32 {
            self.child.id()
        }

        /// Waits up to `timeout` for the agent to exit by itself (a crash point): its exit status, or None.
        pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
            let deadline = std::time::Instant::now() + timeout;
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    return Some(status);
                }
                if std::time::Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        pub fn stop(mut self) {
            let _ = terminate(self.child.id());
            let _ = self.child.wait();
        }
    }

    fn terminate(pid: u32) -> std::io::Result<()> {
        let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
        if status.success() { Ok(()) } else { Err(std::io::Error::other("kill failed")) }
    }

    /// `extra` with `"source": source`: the body of a clone of `source`.
    pub fn cloning(source: &str, mut extra: Value) -> Value {
        extra["source"] = json!(source);
        extra
    }

    pub fn body(pool: &str, size: u64, extra: Value) -> Value {
        let mut b = json!({"pool": pool, "sizeBytes": size, "claim": {"namespace": "db", "name": "data-0"}});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    }

    /// The mount at `target` from /proc/self/mountinfo: (filesystem type, mount options).
    pub fn mount_of(target: &Path) -> Option<(String, String)> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        info.lines().rev().find_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            if f.get(4) != Some(&target.to_str().unwrap()) {
                return None;
            }
            let dash = f.iter().position(|x| *x == "-")?;
            Some((f[dash + 1].to_owned(), f[5].to_owned()))
        })
    }

    /// The size of the filesystem mounted at `mount` (df), and of its block device (blockdev), in bytes.
    pub fn sizes_of(mount: &Path) -> (u64, u64) {
        let mount = mount.to_str().unwrap();
        let df = crate::sh("df", &["-B1", "--output=size", mount]);
        let fs = df.lines().nth(1).unwrap().trim().parse().unwrap();
        let dev = crate::sh("findmnt", &["-n", "-o", "SOURCE", mount]);
        let dev = crate::sh("blockdev", &["--getsize64", dev.trim()]).trim().parse().unwrap();
        (fs, dev)
    }

    pub fn check_filesystem_volume(v: &Volume, fs: &str, token: &str) {
        let data = Path::new(&v.path);
        assert_eq!(data, root(&v.pool).join(&v.name).join("data"), "PV path = <root>/<volume>/data");
        let (mounted_fs, opts) = mount_of(data.parent().unwrap()).unwrap_or_else(|| panic!("{} not mounted", v.name));
        assert_eq!(mounted_fs, fs);
        assert!(opts.split(',').any(|o| o == "noatime"), "the class's mount option is on the agent's mount: {opts}");
        for forced in ["nosuid", "nodev"] {
            assert!(opts.split(',').any(|o| o == forced), "the agent's mount is {forced}: {opts}");
        }
        let meta = std::fs::metadata(data).unwrap();
        assert_eq!((meta.uid(), meta.gid(), meta.permissions().mode() & 0o7777), (999, 999, 0o2770));
        assert_eq!(std::fs::read_to_string(data.join("token")).unwrap(), token);
    }

    /// The physical extents of LV `berth/<lv>` (`/dev/vda:4-7`, one item per segment).
    pub fn extents(lv: &str) -> Vec<String> {
        let out = lvm(&["lvs", "--noheadings", "--segments", "-o", "seg_pe_ranges", &format!("berth/{lv}")]);
        out.split_whitespace().map(str::to_owned).collect()
    }

    pub fn write_pattern(dev: &str, len: u64) {
        let mut f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
        let mut buf = Vec::with_capacity(len as usize);
        while (buf.len() as u64) < len {
            buf.extend_from_slice(PATTERN);
        }
        buf.truncate(len as usize);
        f.write_all(&buf).unwrap();
        f.sync_all().unwrap();
    }

    pub fn contains_pattern(dev: &str) -> bool {
        let mut all = Vec::new();
        std::fs::File::open(dev).unwrap().read_to_end(&mut all).unwrap();
        all.windows(PATTERN.len()).any(|w| w == PATTERN)
    }

    /// Whether `len` bytes of `dev` from `offset` are all zeroes.
    pub fn zeroes_at(dev: &str, offset: u64, len: u64) -> bool {
        let mut f = std::fs::File::open(dev).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        let mut buf = vec![1u8; len as usize];
        f.read_exact(&mut buf).unwrap();
        buf.iter().all(|&b| b == 0)
    }

    pub fn write_block_token(dev: &str, token: &str) {
        let mut f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(token.as_bytes()).unwrap();
        f.sync_all().unwrap();
    }

    pub fn read_block_token(dev: &str, len: usize) -> String {
        let mut f = std::fs::File::open(dev).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        let mut buf = vec![0; len];
        f.read_exact(&mut buf).unwrap();
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Writes `len` bytes that `seed` decides (not compressible, not zeroes) to a new file at `path`, synced: one
    /// MiB of pseudo-random bytes, written again and again with each 4 KiB block stamped with its index in the file,
    /// so no two blocks are alike and a block read from the wrong place shows. (A MiB drawn afresh each time cost
    /// seconds per 64 MiB in this unoptimised build under TCG.)
    pub fn write_seeded(path: &Path, len: u64, seed: u64) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut f = std::fs::File::create(path).unwrap();
        let mut chunk = vec![0u8; MI as usize];
        rng.fill(&mut chunk);
        let mut block = 0u64;
        for _ in 0..len.div_ceil(MI) {
            for stamp in chunk.chunks_mut(4096) {
                stamp[..8].copy_from_slice(&block.to_le_bytes());
                block += 1;
            }
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }

    /// The CRC and length of the file at `path` (`cksum`): enough to tell contents apart here, and a tenth of
    /// sha256sum's time (seconds per 64 MiB under TCG).
    pub fn checksum(path: &Path) -> String {
        let out = crate::sh("cksum", &[path.to_str().unwrap()]);
        out.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
    }

    /// The UUID of the XFS filesystem on `dev` (as xfs_admin reads it, also while mounted).
    pub fn xfs_uuid(dev: &str) -> String {
        let out = crate::sh("xfs_admin", &["-u", dev]);
        out.trim().strip_prefix("UUID = ").unwrap_or_else(|| panic!("xfs_admin -u {dev}: {out}")).to_owned()
    }

    /// The device-mapper node of LV `berth/berth-<volume>`.
    pub fn dm_path(volume: &str) -> String {
        format!("/dev/mapper/berth-berth--{}", volume.replace('-', "--"))
    }

    pub async fn refusal(resp: reqwest::Response) -> (StatusCode, ErrorReason, String) {
        let status = resp.status();
        let body: ErrorBody = resp.json().await.unwrap();
        (status, body.reason, body.message)
    }

    pub async fn pools(agent: &GuestAgent) -> PoolList {
        agent.get("/v1/pools").await
    }

    pub async fn volumes(agent: &GuestAgent) -> VolumeList {
        agent.get("/v1/volumes").await
    }

    pub const FS_EXTRA: fn(&str) -> Value =
        |fs| json!({"fsType": fs, "mountOptions": ["noatime"], "uid": 999, "gid": 999, "mode": 0o2770});
    pub const SMALL: u64 = 64 * MI;
    /// mkfs.xfs refuses less than 300 MB.
    pub const XFS_SIZE: u64 = 320 * MI;
    pub const BLOCK_SIZE: u64 = 16 * MI;
    /// THIN_XFS once grown in phase one, and its clone, larger.
    pub const THIN_XFS_GROWN: u64 = XFS_SIZE + 32 * MI;
    pub const CLONE_XFS_SIZE: u64 = THIN_XFS_GROWN + 32 * MI;
    /// The pattern file phase one writes into THIN_XFS before it is cloned, and where its checksum is kept for
    /// phase two.
    pub const PATTERN_FILE: &str = "pattern";
    pub fn pattern_sum_file() -> PathBuf {
        base().join("clone-pattern.cksum")
    }
}

/// First boot: the volume group and thin pool, the agent, four volumes written to, a deleted block volume whose
/// data must not reach its successor, a deleted filesystem volume, and the refusal of what does not fit.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "run by vm_host::lvm_pools_through_the_agent_across_a_reboot in a boot of its own"]
async fn lvm_agent_phase_one() {
    use berth::agent_api::ErrorReason;
    use lvm_agent::*;
    in_vm();
    sh("modprobe", &["dm_mod"]);
    sh("modprobe", &["dm_thin_pool"]);
    volume_group("lvm.img", "berth");
    // 512 MiB: room for the clone of a thin xfs volume beside it, both over mkfs.xfs's 300 MB.
    lvm(&["lvcreate", "-y", "-L", "512m", "-T", "berth/thin"]);
    init_pools(&config(), &["thick", "thin"]);
    let token = env("BERTH_TOKEN");
    let agent = GuestAgent::start("one").await;
    let p = pools(&agent).await;
    let thin = p.pools.iter().find(|p| p.name == "thin").unwrap();
    assert!(thin.ready, "{thin:?}");
    assert_eq!(thin.capacity_bytes, 1 << 30, "thin pool 512 MiB x ratio 2");
    assert_eq!(thin.enforcement, "device");

    let ext4 = agent.create(FS_EXT4, &body("thick", SMALL, FS_EXTRA("ext4"))).await;
    let xfs = agent.create(FS_XFS, &body("thick", XFS_SIZE, FS_EXTRA("xfs"))).await;
    let thin_xfs = agent.create(THIN_XFS, &body("thin", XFS_SIZE, FS_EXTRA("xfs"))).await;
    let block = agent.create(BLOCK, &body("thick", BLOCK_SIZE, serde_json::json!({"volumeMode": "Block"}))).await;
    assert_eq!(ext4.fs_type.as_deref(), Some("ext4"));
    for (v, fs) in [(&ext4, "ext4"), (&xfs, "xfs"), (&thin_xfs, "xfs")] {
        std::fs::write(Path::new(&v.path).join("token"), &token).unwrap();
        check_filesystem_volume(v, fs, &token);
    }
    // The block volume's path is lvm2's device-mapper node (hyphens doubled), not a string Berth built.
    assert_eq!(block.path, format!("/dev/mapper/berth-berth--{}", BLOCK.replace('-', "--")));
    assert!(is_block_device(&block.path));
    write_block_token(&block.path, &token);
    // Used bytes of a filesystem volume are its own filesystem's; a raw block volume has none.
    let listed = volumes(&agent).await.volumes;
    let used = |name: &str| listed.iter().find(|v| v.name == name).unwrap().used_bytes;
    assert!(used(FS_EXT4).is_some_and(|u| u > 0 && u < SMALL), "ext4 volume uses {:?}", used(FS_EXT4));
    assert!(used(THIN_XFS).is_some_and(|u| u > 0 && u < XFS_SIZE), "thin xfs volume uses {:?}", used(THIN_XFS));
    assert_eq!(used(BLOCK), None);
    // The same request again: the same volume.
    let again = agent.put(FS_XFS, &body("thick", XFS_SIZE, FS_EXTRA("xfs"))).await;
    assert_eq!(again.status(), reqwest::StatusCode::OK);
    let mut names = lv_names();
    names.retain(|n| n.starts_with("berth-pvc-"));
    assert_eq!(names.len(), 4, "{names:?}");

    // Delete a block volume full of a pattern; a new one of the same size must not show it.
    let doomed =
        agent.create(DOOMED_BLOCK, &body("thick", BLOCK_SIZE, serde_json::json!({"volumeMode": "Block"}))).await;
    write_pattern(&doomed.path, BLOCK_SIZE);
    assert!(contains_pattern(&doomed.path), "the pattern is readable before the delete");
    let segments_before = lvm(&["lvs", "--noheadings", "-o", "seg_pe_ranges", &format!("berth/berth-{DOOMED_BLOCK}")]);
    agent.delete(DOOMED_BLOCK).await;
    assert!(!lv_names().contains(&format!("berth-{DOOMED_BLOCK}")), "the LV is gone");
    let fresh = agent.create(FRESH_BLOCK, &body("thick", BLOCK_SIZE, serde_json::json!({"volumeMode": "Block"}))).await;
    let segments_after = lvm(&["lvs", "--noheadings", "-o", "seg_pe_ranges", &format!("berth/berth-{FRESH_BLOCK}")]);
    // lvm2 hands out the first free extents: the new volume sits where the deleted one was (else the test
    // would prove nothing).
    assert_eq!(
        segments_before.split(':').nth(1).map(str::trim),
        segments_after.split(':').nth(1).map(str::trim),
        "{segments_before} vs {segments_after}"
    );
    assert!(!contains_pattern(&fresh.path), "data of a deleted block volume showed up in a new one");
    agent.delete(FRESH_BLOCK).await;

    // A filesystem volume: deleted, unmounted, its LV and mount point gone.
    let doomed_fs = agent.create(DOOMED_FS, &body("thin", SMALL, FS_EXTRA("ext4"))).await;
    let mount_point = Path::new(&doomed_fs.path).parent().unwrap().to_owned();
    agent.delete(DOOMED_FS).await;
    assert!(mount_of(&mount_point).is_none() && !mount_point.exists());
    assert!(!lv_names().contains(&format!("berth-{DOOMED_FS}")));

    // Out of extents: the typed refusal, over HTTP, and nothing made.
    let (status, reason, message) = refusal(
        agent.put("pvc-11111111-0000-4000-8000-0000000000ff", &body("thick", 8 << 30, serde_json::json!({}))).await,
    )
    .await;
    assert_eq!(
        (status, reason),
        (reqwest::StatusCode::INSUFFICIENT_STORAGE, ErrorReason::InsufficientSpace),
        "{message}"
    );
    let thin_status = pools(&agent).await.pools.into_iter().find(|p| p.name == "thin").unwrap();
    let (status, reason, _) = refusal(
        agent
            .put(
                "pvc-11111111-0000-4000-8000-0000000000fe",
                &body("thin", thin_status.free_bytes + (4 << 20), serde_json::json!({})),
            )
            .await,
    )
    .await;
    assert_eq!((status, reason), (reqwest::StatusCode::INSUFFICIENT_STORAGE, ErrorReason::InsufficientSpace));
    assert_eq!(volumes(&agent).await.volumes.len(), 4);

    // Online growth while mounted, data intact, the real sizes checked: a thick ext4 volume made for it, and the
    // thin xfs volume (which phase two then finds grown after the reboot).
    let grow = agent.create(GROW_EXT4, &body("thick", 32 * MI, FS_EXTRA("ext4"))).await;
    std::fs::write(Path::new(&grow.path).join("token"), &token).unwrap();
    for (v, from, to) in [(&grow, 32 * MI, 64 * MI), (&thin_xfs, XFS_SIZE, THIN_XFS_GROWN)] {
        let mount = Path::new(&v.path).parent().unwrap();
        let (fs_before, dev_before) = sizes_of(mount);
        assert_eq!(dev_before, from, "{}", v.name);
        let grown = agent.expand(&v.name, to).await;
        assert_eq!(grown.size_bytes, to);
        let (fs_after, dev_after) = sizes_of(mount);
        assert_eq!(dev_after, to, "blockdev --getsize64 of {}", v.name);
        assert!(fs_after >= fs_before + (to - from) * 3 / 4, "df of {}: {fs_before} -> {fs_after}", v.name);
        assert_eq!(std::fs::read_to_string(Path::new(&v.path).join("token")).unwrap(), token);
        assert!(mount_of(mount).is_some(), "still mounted");
    }
    agent.delete(GROW_EXT4).await;

    clones_phase_one(&agent, &token).await;
    agent.stop();
    // The clone's filesystem, taken while its source was mounted and written to, then replayed, given a UUID of
    // its own and grown by the agent: consistent to xfs_repair, which needs it unmounted (phase two's agent mounts
    // it again).
    let clone_mount = root("thin").join(CLONE_XFS);
    sh("umount", &[clone_mount.to_str().unwrap()]);
    sh("xfs_repair", &["-n", &dm_path(CLONE_XFS)]);
    // A real reboot follows: the VM powers off with everything mounted and active, as a node that loses power.
}

/// Clones (issue 20), in the thin pool: a thin xfs volume cloned while mounted and written to, larger than its
/// source; a raw block volume cloned; a clone in the thick pool and one smaller than its source refused with
/// nothing made. Each clone keeps the content its source had when it was made and goes its own way after. Phase
/// two finds the xfs and block clones after the reboot and deletes their sources first. (The controller's part of a
/// clone is the same for every backend, and controller/tests/clones.rs proves it with the real control plane.)
async fn clones_phase_one(agent: &lvm_agent::GuestAgent, token: &str) {
    use berth::agent_api::ErrorReason;
    use lvm_agent::*;
    use serde_json::json;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let section = std::time::Instant::now();
    let source_data = root("thin").join(THIN_XFS).join("data");
    write_seeded(&source_data.join(PATTERN_FILE), 64 * MI, 1);
    let first = checksum(&source_data.join(PATTERN_FILE));
    std::fs::write(pattern_sum_file(), &first).unwrap();
    // A pod-like writer keeps writing (and syncing) in the source while it is cloned, so the snapshot catches its
    // filesystem mid-flight.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, dir) = (stop.clone(), source_data.clone());
        std::thread::spawn(move || {
            let mut writes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                write_seeded(&dir.join(format!("busy-{}", writes % 8)), MI, writes);
                writes += 1;
            }
            writes
        })
    };
    // Let it run a little before the clone.
    while !source_data.join("busy-1").exists() {
        assert!(!writer.is_finished(), "the writer died");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let clone_body = body("thin", CLONE_XFS_SIZE, cloning(THIN_XFS, FS_EXTRA("xfs")));
    let started = std::time::Instant::now();
    let clone = agent.create(CLONE_XFS, &clone_body).await;
    println!("clone of a thin xfs volume in use made in {:.1} s", started.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes > 2, "the source was written to while it was cloned ({writes} files written)");
    assert_eq!((clone.size_bytes, clone.published), (CLONE_XFS_SIZE, Some(false)));
    // Its source's data directory (owner, mode, the token in it), under its own mount, with the class's option.
    check_filesystem_volume(&clone, "xfs", token);
    // Beside its source, both mounted: the clone got a UUID of its own.
    let source_mount = source_data.parent().unwrap();
    let clone_mount = Path::new(&clone.path).parent().unwrap();
    assert!(mount_of(source_mount).is_some() && mount_of(clone_mount).is_some());
    assert_ne!(xfs_uuid(&dm_path(CLONE_XFS)), xfs_uuid(&dm_path(THIN_XFS)));
    // Larger than its source: the device and the filesystem grown.
    let (clone_fs, clone_dev) = sizes_of(clone_mount);
    let (source_fs, source_dev) = sizes_of(source_mount);
    assert_eq!((clone_dev, source_dev), (CLONE_XFS_SIZE, THIN_XFS_GROWN));
    assert!(clone_fs >= source_fs + 24 * MI, "df: the clone's {clone_fs}, its source's {source_fs}");
    // Its own record in its LV's tags (a thin snapshot inherits none of its origin's), its origin the source's LV.
    let report =
        lvm(&["lvs", "--noheadings", "--separator", "|", "-o", "lv_tags,origin", &format!("berth/berth-{CLONE_XFS}")]);
    let (tags, origin) = report.trim().split_once('|').unwrap();
    assert_eq!(origin, format!("berth-{THIN_XFS}"));
    let volume_tags: Vec<&str> = tags.split(',').filter(|t| t.starts_with("berth:volume=")).collect();
    assert_eq!(volume_tags, [format!("berth:volume={CLONE_XFS}")], "{tags}");
    // The content of the moment: the source overwritten, the clone keeps the first pattern.
    write_seeded(&source_data.join(PATTERN_FILE), 64 * MI, 2);
    let second = checksum(&source_data.join(PATTERN_FILE));
    assert_ne!(second, first);
    assert_eq!(checksum(&Path::new(&clone.path).join(PATTERN_FILE)), first);
    // The same request again: the same clone.
    let again = agent.put(CLONE_XFS, &clone_body).await;
    assert_eq!(again.status(), reqwest::StatusCode::OK);

    // A raw block volume's clone: its path is lvm2's device node for the new LV; the bytes are the source's.
    let block = json!({"volumeMode": "Block"});
    let source = agent.create(THIN_BLOCK, &body("thin", BLOCK_SIZE, block.clone())).await;
    write_block_token(&source.path, token);
    let clone_body = body("thin", BLOCK_SIZE, cloning(THIN_BLOCK, block.clone()));
    let clone = agent.create(CLONE_BLOCK, &clone_body).await;
    assert_eq!(clone.path, dm_path(CLONE_BLOCK));
    assert!(is_block_device(&clone.path));
    assert_eq!(read_block_token(&clone.path, token.len()), token);
    write_block_token(&source.path, &"x".repeat(token.len()));
    assert_eq!(read_block_token(&clone.path, token.len()), token, "the clone keeps what its source had");

    // Refused, nothing made: a clone in the thick pool (it would be a full copy), and one smaller than its source.
    let lvs_before = lv_names();
    let thick = body("thick", SMALL, cloning(FS_EXT4, FS_EXTRA("ext4")));
    let (status, reason, message) = refusal(agent.put("pvc-11111111-0000-4000-8000-0000000000fd", &thick).await).await;
    assert_eq!((status, reason), (reqwest::StatusCode::UNPROCESSABLE_ENTITY, ErrorReason::Unsupported), "{message}");
    assert!(message.contains("thick lvm pool") && message.contains("thin pools"), "{message}");
    let smaller = body("thin", XFS_SIZE, cloning(THIN_XFS, FS_EXTRA("xfs")));
    let (status, reason, message) =
        refusal(agent.put("pvc-11111111-0000-4000-8000-0000000000fc", &smaller).await).await;
    assert_eq!((status, reason), (reqwest::StatusCode::BAD_REQUEST, ErrorReason::Invalid), "{message}");
    assert!(message.contains("at least its source's size"), "{message}");
    assert_eq!(lv_names(), lvs_before, "a refused clone made nothing");
    println!("clones, phase one: {:.1} s", section.elapsed().as_secs_f64());
}

fn super_lv_active() -> Vec<String> {
    lv_report("berth")
        .iter()
        .filter(|l| l["lv_active"] == "active")
        .map(|l| l["lv_name"].as_str().unwrap().to_owned())
        .collect()
}

/// Second boot: nothing is mounted or active; the PV paths do not exist until the agent runs; then every volume
/// is back with its data, and deleting them leaves no LV.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "run by vm_host::lvm_pools_through_the_agent_across_a_reboot in a boot of its own"]
async fn lvm_agent_phase_two() {
    use lvm_agent::*;
    in_vm();
    sh("modprobe", &["dm_mod"]);
    sh("modprobe", &["dm_thin_pool"]);
    let token = env("BERTH_TOKEN");
    let fs_volumes =
        [(FS_EXT4, "thick", "ext4"), (FS_XFS, "thick", "xfs"), (THIN_XFS, "thin", "xfs"), (CLONE_XFS, "thin", "xfs")];
    for (name, pool, _) in fs_volumes {
        let data = root(pool).join(name).join("data");
        assert!(mount_of(data.parent().unwrap()).is_none(), "{name} mounted before the agent ran");
        assert!(!data.exists(), "{} exists before the agent ran: a pod would write to the system disk", data.display());
    }
    let block_dev = format!("/dev/mapper/berth-berth--{}", BLOCK.replace('-', "--"));
    // A block volume's path is lvm2's device node: absent while the LV is inactive, and the volume itself once
    // anything (boot-time autoactivation, the agent) activates it; never a file of the system disk.
    let active_before: Vec<String> = super_lv_active();
    println!("active before the agent ran: {active_before:?}");
    assert!(!Path::new(&block_dev).exists() || is_block_device(&block_dev), "{block_dev} is not a device");

    // Debris of a create and of a delete interrupted between lvm2 commands (the agent crashed), and an LV with the
    // pool's tag but no record Berth can read.
    for (name, tag) in [("berth-pvc-debris-create", "berth:creating"), ("berth-pvc-debris-delete", "berth:deleting")] {
        lvm(&[
            "lvcreate",
            "-y",
            "-W",
            "y",
            "-L",
            "8m",
            "-n",
            name,
            "berth",
            "--addtag",
            "berth:pool=thick",
            "--addtag",
            tag,
        ]);
    }
    lvm(&["lvcreate", "-y", "-W", "y", "-L", "8m", "-n", "stranger", "berth", "--addtag", "berth:pool=thick"]);

    let agent = GuestAgent::start("two").await;
    // Debris goes in the background once the API serves (zeroing a thick LV takes as long as writing it).
    let debris_gone = || Ok((!lv_names().iter().any(|n| n.contains("debris"))).then_some(()));
    let within = std::time::Duration::from_secs(60);
    if let Err(e) = testbed::on_node::poll("LVM debris removed", within, debris_gone).await {
        panic!("{e}: {:?}", lv_names());
    }
    let names_now = lv_names();
    assert!(names_now.contains(&"stranger".to_string()), "an LV without a readable record is left alone");
    let listed = volumes(&agent).await.volumes;
    let names: Vec<&str> = listed.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, [FS_EXT4, FS_XFS, THIN_XFS, BLOCK, CLONE_XFS, THIN_BLOCK, CLONE_BLOCK]);
    for (name, _, fs) in fs_volumes {
        let v = listed.iter().find(|v| v.name == name).unwrap();
        check_filesystem_volume(v, fs, &token);
    }
    let block = listed.iter().find(|v| v.name == BLOCK).unwrap();
    assert_eq!(block.path, block_dev);
    assert_eq!(read_block_token(&block.path, token.len()), token);
    clones_phase_two(&agent, &listed, &token).await;
    for name in [FS_EXT4, FS_XFS, BLOCK] {
        agent.delete(name).await;
    }
    let left: Vec<String> = lv_names().into_iter().filter(|n| n.starts_with("berth-")).collect();
    assert_eq!(left, Vec::<String>::new());
    assert_eq!(volumes(&agent).await.volumes.len(), 0);
    crate::churn::lvm(&agent, &[&root("thick"), &root("thin")]).await;
    agent.stop();
}

/// The clones of phase one after the reboot: active, the xfs one mounted with its size, data and own UUID; then
/// their sources deleted first, and the clones still whole without them (thin snapshots are volumes of their own),
/// then deleted too.
async fn clones_phase_two(agent: &lvm_agent::GuestAgent, listed: &[berth::agent_api::Volume], token: &str) {
    use lvm_agent::*;
    let section = std::time::Instant::now();
    let by_name = |name: &str| listed.iter().find(|v| v.name == name).unwrap();
    let (clone, clone_block) = (by_name(CLONE_XFS), by_name(CLONE_BLOCK));
    let first = std::fs::read_to_string(pattern_sum_file()).unwrap();
    let pattern = Path::new(&clone.path).join(PATTERN_FILE);
    let clone_mount = Path::new(&clone.path).parent().unwrap();
    assert_eq!(clone.size_bytes, CLONE_XFS_SIZE);
    assert_eq!(sizes_of(clone_mount).1, CLONE_XFS_SIZE);
    assert_ne!(xfs_uuid(&dm_path(CLONE_XFS)), xfs_uuid(&dm_path(THIN_XFS)));
    assert_eq!(clone_block.path, dm_path(CLONE_BLOCK));
    assert_eq!(read_block_token(&clone_block.path, token.len()), token);
    assert_eq!(read_block_token(&by_name(THIN_BLOCK).path, token.len()), "x".repeat(token.len()));
    for source in [THIN_XFS, THIN_BLOCK] {
        agent.delete(source).await;
    }
    assert!(mount_of(clone_mount).is_some(), "the clone is still mounted");
    assert_eq!(checksum(&pattern), first);
    assert_eq!(read_block_token(&clone_block.path, token.len()), token);
    let names: Vec<String> = volumes(agent).await.volumes.into_iter().map(|v| v.name).collect();
    assert!(names.contains(&CLONE_XFS.to_owned()) && names.contains(&CLONE_BLOCK.to_owned()), "{names:?}");
    for clone in [CLONE_XFS, CLONE_BLOCK] {
        agent.delete(clone).await;
    }
    println!("clones, phase two: {:.1} s", section.elapsed().as_secs_f64());
}

/// Thin clones (issue 20): does a clone's time depend on its source's size? Two thin sources of 1 GiB and 4 GiB
/// each as a raw block volume and as an xfs filesystem volume, with 32 MiB written into each (a thin snapshot's
/// cost is lvm2 metadata, not the data). Baseline first, with the agent stopped, as the agent runs lvm2 (same
/// `--config`): bare `lvcreate -s --setactivationskip n` of each source + `lvremove`. Then through the agent: a clone
/// of each source (PUT with `source`, the source's size) + DELETE of the clone. The sizes alternate round by round.
/// Prints one `BENCH` line per mode: medians, the ratios 4 GiB / 1 GiB and agent / bare.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "run by vm_host::lvm_thin_clone_benchmark in a boot of its own"]
async fn lvm_clone_benchmark() {
    use lvm_agent::*;
    use std::collections::BTreeMap;
    use std::time::Instant;
    in_vm();
    sh("modprobe", &["dm_mod"]);
    sh("modprobe", &["dm_thin_pool"]);
    volume_group("clonebench.img", "berth");
    // 512 MiB of data, twice what is written (each xfs source's mkfs writes its 64 MiB log, and 32 MiB go into each
    // source); the pool promises 32 times that (16 GiB): the four sources (10 GiB) and one clone of 4 GiB at a time.
    lvm(&["lvcreate", "-y", "-L", "512m", "-T", "berth/thin"]);
    let config = base().join("clone-bench.toml");
    std::fs::write(
        &config,
        format!(
            "[[pool]]\nname = \"thin\"\nbackend = \"lvm\"\nroot = {:?}\nvolume-group = \"berth\"\nthin-pool = \"thin\"\n\
             overprovision-ratio = 32.0\nlvm-config = \"activation {{ udev_sync = 0 udev_rules = 0 }}\"\n",
            root("thin")
        ),
    )
    .unwrap();
    init_pools(&config, &["thin"]);
    let rounds: usize = std::env::var("BERTH_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(5);
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    const GIB: u64 = 1 << 30;
    let modes = [("block", json_block()), ("xfs", FS_EXTRA("xfs"))];
    let sizes = [1u64, 4];
    let source = |mode: &str, gib: u64| format!("pvc-clone-bench-{mode}-{gib}g");
    // Round i runs the sizes in this order: 1, 4 in even rounds, 4, 1 in odd ones.
    let order = |i: usize| if i.is_multiple_of(2) { sizes } else { [sizes[1], sizes[0]] };

    let agent = GuestAgent::start_with("clone-bench", &config).await;
    let made = Instant::now();
    for (mode, extra) in &modes {
        for gib in sizes {
            let v = agent.create(&source(mode, gib), &body("thin", gib * GIB, extra.clone())).await;
            if *mode == "block" {
                write_pattern(&v.path, 32 * MI);
            } else {
                write_seeded(&Path::new(&v.path).join("fill"), 32 * MI, gib);
            }
        }
    }
    println!("sources made and written in {:.1} s", made.elapsed().as_secs_f64());
    agent.stop();

    // (mode, GiB) -> the times of the rounds.
    let mut bare_snapshot: BTreeMap<(&str, u64), Vec<f64>> = BTreeMap::new();
    let mut bare_total: BTreeMap<(&str, u64), Vec<f64>> = BTreeMap::new();
    for i in 0..rounds {
        for gib in order(i) {
            for (mode, _) in &modes {
                let name = format!("bare-{mode}-{gib}g-{i}");
                let origin = format!("berth/berth-{}", source(mode, gib));
                let t = Instant::now();
                lvm(&["lvcreate", "-y", "-s", "--setactivationskip", "n", "-n", &name, &origin]);
                let snapshot = ms(t);
                lvm(&["lvremove", "-y", &format!("berth/{name}")]);
                bare_snapshot.entry((*mode, gib)).or_default().push(snapshot);
                bare_total.entry((*mode, gib)).or_default().push(ms(t));
            }
        }
    }

    let agent = GuestAgent::start_with("clone-bench", &config).await;
    // One round first: the token review is then cached, as it is for a controller calling repeatedly.
    for (mode, extra) in &modes {
        let clone = body("thin", GIB, cloning(&source(mode, 1), extra.clone()));
        agent.create("pvc-clone-bench-warm", &clone).await;
        agent.delete("pvc-clone-bench-warm").await;
    }
    let mut clone_only: BTreeMap<(&str, u64), Vec<f64>> = BTreeMap::new();
    let mut through: BTreeMap<(&str, u64), Vec<f64>> = BTreeMap::new();
    for i in 0..rounds {
        for gib in order(i) {
            for (mode, extra) in &modes {
                let name = format!("pvc-clone-bench-{mode}-{gib}g-{i}");
                let clone = body("thin", gib * GIB, cloning(&source(mode, gib), extra.clone()));
                let t = Instant::now();
                let v = agent.create(&name, &clone).await;
                let made = ms(t);
                assert_eq!(v.size_bytes, gib * GIB);
                agent.delete(&name).await;
                clone_only.entry((*mode, gib)).or_default().push(made);
                through.entry((*mode, gib)).or_default().push(ms(t));
            }
        }
    }
    agent.stop();
    for (mode, _) in &modes {
        let m = |times: &BTreeMap<(&str, u64), Vec<f64>>, gib: u64| median(&times[&(*mode, gib)]);
        let (bare_1, bare_4) = (m(&bare_total, 1), m(&bare_total, 4));
        let (snap_1, snap_4) = (m(&bare_snapshot, 1), m(&bare_snapshot, 4));
        let (agent_1, agent_4) = (m(&through, 1), m(&through, 4));
        let (clone_1, clone_4) = (m(&clone_only, 1), m(&clone_only, 4));
        println!(
            "BENCH clone mode={mode} rounds={rounds} bare_1g_ms={bare_1:.0} bare_4g_ms={bare_4:.0} bare_4g_to_1g={:.3} \
             bare_snapshot_1g_ms={snap_1:.0} bare_snapshot_4g_ms={snap_4:.0} \
             agent_1g_ms={agent_1:.0} agent_4g_ms={agent_4:.0} agent_4g_to_1g={:.3} \
             agent_clone_1g_ms={clone_1:.0} agent_clone_4g_ms={clone_4:.0} agent_clone_4g_to_1g={:.3} \
             agent_to_bare_1g={:.2} agent_to_bare_4g={:.2}",
            bare_4 / bare_1,
            agent_4 / agent_1,
            clone_4 / clone_1,
            agent_1 / bare_1,
            agent_4 / bare_4,
        );
        for (what, times) in [("bare", &bare_total), ("agent", &through), ("agent_clone", &clone_only)] {
            for gib in sizes {
                let all: Vec<String> = times[&(*mode, gib)].iter().map(|t| format!("{t:.0}")).collect();
                println!("clone bench {mode} {what} {gib} GiB, each round (ms): {}", all.join(" "));
            }
        }
    }
}

/// The agent's cost over bare lvm2: LV create+delete through the agent's HTTPS API (block volumes in a thick pool:
/// lvcreate, tag changes, activation checks, and the zeroing of the deleted LV) against bare `lvcreate`/`lvremove`
/// of the same size, in the same boot. Prints one `BENCH` line.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "run by vm_host::lvm_create_delete_benchmark in a boot of its own"]
async fn lvm_agent_benchmark() {
    use lvm_agent::*;
    use std::time::Instant;
    in_vm();
    sh("modprobe", &["dm_mod"]);
    sh("modprobe", &["dm_thin_pool"]);
    volume_group("bench.img", "berth");
    lvm(&["lvcreate", "-y", "-L", "128m", "-T", "berth/thin"]);
    init_pools(&config(), &["thick", "thin"]);
    let rounds: usize = std::env::var("BERTH_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(10);
    let size = "16m";
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut bare = Vec::new();
    for i in 0..rounds {
        let name = format!("bare-{i}");
        let t = Instant::now();
        lvm(&["lvcreate", "-y", "-W", "y", "-L", size, "-n", &name, "berth"]);
        lvm(&["lvremove", "-y", &format!("berth/{name}")]);
        bare.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let agent = GuestAgent::start("bench").await;
    let mut through = std::collections::BTreeMap::new();
    for (pool, extra) in [("thick", json_block()), ("thin", json_block())] {
        // One round first: the token review is then cached, as it is for a controller calling repeatedly.
        agent.create("pvc-bench-warm", &body(pool, BLOCK_SIZE, extra.clone())).await;
        agent.delete("pvc-bench-warm").await;
        let mut times = Vec::new();
        for i in 0..rounds {
            let name = format!("pvc-bench-{i}");
            let t = Instant::now();
            agent.create(&name, &body(pool, BLOCK_SIZE, extra.clone())).await;
            agent.delete(&name).await;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        through.insert(pool, median(times));
    }
    // The cost of zeroing (issue 19): a 1 GiB thick block volume is zeroed at its create (and at its delete).
    // Timed: the bare lvcreate+lvremove of 1 GiB, the agent's create of such a volume, and the zeroing itself as
    // the agent logs it (BLKZEROOUT of the whole LV).
    let zero_rounds = rounds.min(3);
    let mut bare_gib = Vec::new();
    for i in 0..zero_rounds {
        let name = format!("bare-gib-{i}");
        let t = Instant::now();
        lvm(&["lvcreate", "-y", "-W", "y", "-L", "1g", "-n", &name, "berth"]);
        lvm(&["lvremove", "-y", &format!("berth/{name}")]);
        bare_gib.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // What zeroing costs where the device cannot write zeroes by itself (then the kernel writes zero pages): 1 GiB
    // of zeroes written to an LV with O_DIRECT.
    let mut written_gib = Vec::new();
    for i in 0..zero_rounds {
        let name = format!("written-gib-{i}");
        lvm(&["lvcreate", "-y", "-W", "y", "-L", "1g", "-n", &name, "berth"]);
        let dev = format!("of=/dev/mapper/berth-written--gib--{i}");
        let t = Instant::now();
        sh("dd", &["if=/dev/zero", &dev, "bs=4M", "count=256", "oflag=direct", "status=none"]);
        written_gib.push(t.elapsed().as_secs_f64() * 1000.0);
        lvm(&["lvremove", "-y", &format!("berth/{name}")]);
    }
    let mut create_gib = Vec::new();
    for i in 0..zero_rounds {
        let name = format!("pvc-bench-gib-{i}");
        let t = Instant::now();
        agent.create(&name, &body("thick", 1 << 30, json_block())).await;
        create_gib.push(t.elapsed().as_secs_f64() * 1000.0);
        agent.delete(&name).await;
    }
    agent.stop();
    let log = std::fs::read_to_string(base().join("agent-bench.log")).unwrap();
    let zeroing_ms: Vec<f64> = log
        .lines()
        .filter(|l| l.contains(" zeroed ") && l.contains("bytes=1073741824"))
        .filter_map(|l| l.split("seconds=").nth(1)?.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| s * 1000.0)
        .collect();
    assert_eq!(zeroing_ms.len(), 2 * zero_rounds, "a zeroing at each create and delete of 1 GiB:\n{log}");
    let bare = median(bare);
    println!(
        "BENCH rounds={rounds} size={size} bare_ms={bare:.0} agent_thick_block_ms={:.0} agent_thin_block_ms={:.0} ratio_thick={:.2} ratio_thin={:.2}",
        through["thick"],
        through["thin"],
        through["thick"] / bare,
        through["thin"] / bare
    );
    let (bare_gib, create_gib, zeroing) = (median(bare_gib), median(create_gib), median(zeroing_ms));
    let written = median(written_gib);
    println!(
        "BENCH zeroing rounds={zero_rounds} bare_1gib_ms={bare_gib:.0} agent_thick_block_1gib_create_ms={create_gib:.0} zeroing_ms_per_gib={zeroing:.0} ratio_create_to_bare={:.2} zeroing_share_of_create={:.2} written_zeroes_ms_per_gib={written:.0}",
        create_gib / bare_gib,
        zeroing / create_gib
    );
}

fn json_block() -> Value {
    serde_json::json!({"volumeMode": "Block"})
}

/// End to end with the agent here and the control plane and controller on the host: the agent listens on the
/// guest's address, port-forwarded to the host's 127.0.0.1 (`BERTH_ADVERTISE`, the address the controller dials),
/// and publishes itself through 10.0.2.2. Waits for the host's claim of class `berth-lvm` to be provisioned here
/// and bound, checks that the PV's path is inside the xfs filesystem the agent mounted, then deletes the claim and
/// waits for the PV and the LV to go.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "run by vm_host::lvm_end_to_end_agent_in_the_vm in a boot of its own"]
async fn lvm_e2e_agent() {
    use k8s_openapi::api::core::v1::PersistentVolume;
    use kube::api::{Api, ListParams};
    use lvm_agent::*;
    use std::time::{Duration, Instant};
    in_vm();
    sh("modprobe", &["dm_mod"]);
    sh("modprobe", &["dm_thin_pool"]);
    volume_group("e2e.img", "berth");
    lvm(&["lvcreate", "-y", "-L", "128m", "-T", "berth/thin"]);
    // The example classes name the pools "lvm" and "lvm-thin".
    let config = base().join("e2e.toml");
    let lvm_config = "activation { udev_sync = 0 udev_rules = 0 }";
    std::fs::write(
        &config,
        format!(
            "[[pool]]\nname = \"lvm\"\nbackend = \"lvm\"\nroot = {:?}\nvolume-group = \"berth\"\nlvm-config = {lvm_config:?}\n\n\
             [[pool]]\nname = \"lvm-thin\"\nbackend = \"lvm\"\nroot = {:?}\nvolume-group = \"berth\"\nthin-pool = \"thin\"\nlvm-config = {lvm_config:?}\n",
            root("lvm"),
            root("lvm-thin")
        ),
    )
    .unwrap();
    for pool in ["lvm", "lvm-thin"] {
        let out = Command::new(env("BERTH_AGENT_BIN"))
            .args(["init-pool", "--config"])
            .arg(&config)
            .args(["--pool", pool])
            .output()
            .unwrap();
        assert!(out.status.success(), "init-pool {pool}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let advertise = env("BERTH_ADVERTISE");
    let log = std::fs::File::create(base().join("agent-e2e.log")).unwrap();
    let mut agent = Command::new(env("BERTH_AGENT_BIN"))
        .args(["run", "--config"])
        .arg(&config)
        .args(["--node-name", NODE, "--listen", "10.0.2.15:7443", "--advertise", &advertise, "--state-dir"])
        .arg(base().join("state"))
        .env("RUST_LOG", "info,kube=warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let client = kube::Client::try_default().await.unwrap();
    let pvs: Api<PersistentVolume> = Api::all(client);
    let deadline = Instant::now() + Duration::from_secs(300);
    let pv = loop {
        let list = pvs.list(&ListParams::default()).await.unwrap().items;
        let bound = list.into_iter().find(|pv| {
            pv.spec.as_ref().and_then(|s| s.storage_class_name.as_deref()) == Some("berth-lvm")
                && pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
        });
        if let Some(pv) = bound {
            break pv;
        }
        assert!(Instant::now() < deadline, "no Bound PV of class berth-lvm after 300 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let spec = pv.spec.unwrap();
    let path = PathBuf::from(spec.local.expect("a local PV").path);
    assert!(spec.mount_options.is_none(), "the class's mountOptions went to the agent's mount, not the PV");
    let (fs, opts) = mount_of(path.parent().unwrap()).unwrap_or_else(|| panic!("{} is not mounted", path.display()));
    assert_eq!(fs, "xfs");
    assert!(opts.split(',').any(|o| o == "noatime"), "{opts}");
    std::fs::write(path.join("written-by-the-e2e-test"), "ok").unwrap();
    let pv_name = pv.metadata.name.unwrap_or_default();
    println!("PV {pv_name} bound, path {} mounted ({fs}, {opts})", path.display());
    assert!(lv_names().contains(&format!("berth-{pv_name}")));

    // The user deletes the pod and the claim: the controller has the agent delete the volume, then the PV goes.
    use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
    let client = kube::Client::try_default().await.unwrap();
    let dp = kube::api::DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
    Api::<Pod>::namespaced(client.clone(), "default").delete("db", &dp).await.unwrap();
    Api::<PersistentVolumeClaim>::namespaced(client, "default").delete("data", &dp).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while pvs.get_opt(&pv_name).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "PV {pv_name} still there 300 s after its claim was deleted");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!lv_names().contains(&format!("berth-{pv_name}")), "the PV is gone but its LV is not");
    assert!(mount_of(path.parent().unwrap()).is_none() && !path.parent().unwrap().exists());
    let _ = Command::new("kill").args(["-TERM", &agent.id().to_string()]).status();
    let _ = agent.wait();
}
