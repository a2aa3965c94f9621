//! A clone of a 1 GiB directory volume through the agent against `cp -a` of the same tree, in the same run
//! (issue 20).
//!
//!     cargo bench -p berth-agent --bench directory_clone        # BERTH_BENCH_ROUNDS=n for other than 5 rounds
//!
//! Runs as root. The benchmark makes a loop-mounted XFS filesystem with `reflink=1` (a sparse image in a temp
//! dir) and starts the test bed in it (`base_dir`), so the agent's hostpath pool — and so the source, its clones
//! and the `cp` copies — are on it (checked with statfs). Through a real `berth-agent` it creates a source volume
//! and fills its `data/` with a 1 GiB tree of pseudo-random bytes (one 512 MiB file, 120 of 4 MiB, 400 small
//! ones in 20 directories), synced. Then, per round, in one order in even rounds and the reverse in odd ones:
//!
//! - the agent: PUT of a clone of the source (timed until the 201; the agent stages the clone, copies the tree
//!   with copy_tree.rs — FICLONE per file, owners, modes, times, xattrs — `syncfs` of the pool's filesystem, the
//!   rename into place, an fsync of the pool root), then DELETE of it (timed separately; the agent moves it aside
//!   and removes its files before answering, without a sync);
//! - `cp -a <source's data dir> <new dir>` + `sync -f <new dir>` (a `syncfs` of the same filesystem), then
//!   `rm -rf` of it (timed, not synced);
//! - the same with `cp -a --reflink=never`, the plain copy (GNU cp reflinks by default since coreutils 9.0).
//!
//! Each side's free-space drop is read with statvfs before it and after its sync. Before each timed step the
//! filesystem is synced and its free space left to settle (XFS frees deleted files' blocks in the background),
//! untimed. First, in a warm-up round not counted, each copy (the agent's clone, `cp -a`'s, the plain one) is
//! compared with the source, file by file (names, types, modes, owners, sizes, bytes), and the agent's reflinking
//! is checked: its log's `reflinked_bytes` is the tree's bytes and `copied_bytes=0`, and `filefrag -v` shows the
//! clone's big file's extents shared. Each round prints a line; at the end one `BENCH` line with the medians.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use berth::agent_api::Volume;
use reqwest::{Method, StatusCode};
use serde_json::json;
use testbed::agents::{AgentProcess, PoolSpec};
use testbed::{TestBed, TestBedConfig};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The XFS image (sparse): the source (1 GiB written), a plain copy (1 GiB more) at a time, and the agent's
/// promises (2 GiB for the source, 2 GiB for a clone: the host kernel has no project quotas, so a volume's
/// promise counts whole against the free space).
const IMAGE_BYTES: u64 = 8 * GIB;
const CLAIM_BYTES: u64 = 2 * GIB;
const POOL: &str = "clone";
const SOURCE: &str = "pvc-00000000-0000-4000-8000-00000000c0de";
/// Any one command (a copy of 1 GiB takes seconds; under a stall, minutes).
const COMMAND_DEADLINE: Duration = Duration::from_secs(600);
/// Any one request to the agent (a clone that copied instead of reflinking writes 1 GiB).
const REQUEST_DEADLINE: Duration = Duration::from_secs(600);
const XFS_SUPER_MAGIC: i64 = 0x5846_5342;

/// Runs `program args` with a deadline (coreutils' `timeout`, SIGKILL 5 s after its TERM); its stdout, or a panic
/// with its stderr.
fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let out = Command::new("timeout")
        .args(["--kill-after=5", &COMMAND_DEADLINE.as_secs().to_string(), program])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    let shown = || args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
    assert!(
        out.status.success(),
        "{program} {} failed ({}; 124 or 137: past its deadline of {COMMAND_DEADLINE:?}): {}",
        shown(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loop-mounted XFS filesystem with reflink on a sparse image in a temp dir; unmounted and detached on drop
/// (also while panicking), then the image is removed with the temp dir.
struct XfsDisk {
    dir: tempfile::TempDir,
    loop_device: Option<String>,
    mounted: bool,
}

impl XfsDisk {
    fn create(size_bytes: u64) -> XfsDisk {
        let dir = tempfile::Builder::new().prefix("berth-clone-bench-").tempdir().unwrap();
        let image = dir.path().join("xfs.img");
        std::fs::File::create_new(&image).and_then(|f| f.set_len(size_bytes)).unwrap();
        let mut disk = XfsDisk { dir, loop_device: None, mounted: false };
        let device = run("losetup", &[OsStr::new("--find"), OsStr::new("--show"), image.as_os_str()]);
        disk.loop_device = Some(device.trim().to_owned());
        let device = disk.loop_device.clone().unwrap();
        run("mkfs.xfs", &["-q", "-f", "-m", "reflink=1", &device]);
        std::fs::create_dir(disk.mount_point()).unwrap();
        run("mount", &[OsStr::new("-t"), OsStr::new("xfs"), OsStr::new(&device), disk.mount_point().as_os_str()]);
        disk.mounted = true;
        let info = run("xfs_info", &[disk.mount_point()]);
        assert!(info.contains("reflink=1"), "mkfs.xfs -m reflink=1 made a filesystem without reflink:\n{info}");
        disk
    }

    fn mount_point(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// Bytes available to an unprivileged writer, as `df` shows them.
    fn free_bytes(&self) -> u64 {
        let st = rustix::fs::statvfs(self.mount_point()).unwrap();
        st.f_bavail * st.f_frsize
    }

    /// Syncs the filesystem and waits (up to 10 s) until its free space stops changing: XFS inactivates deleted
    /// inodes and frees their blocks in the background.
    fn settle(&self) {
        syncfs(&self.mount_point());
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = self.free_bytes();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            let now = self.free_bytes();
            if now == last {
                return;
            }
            last = now;
        }
        eprintln!("free space still changing after 10 s; measuring anyway");
    }
}

impl Drop for XfsDisk {
    fn drop(&mut self) {
        let mp = self.mount_point();
        // Not `run`: no panic while dropping (maybe panicking already); a lazy unmount as the fallback, so a
        // process still holding a file there cannot keep the loop device busy.
        let quiet = |program: &str, args: &[&OsStr]| {
            Command::new("timeout")
                .args(["--kill-after=5", "60", program])
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        if self.mounted
            && !quiet("umount", &[mp.as_os_str()])
            && !quiet("umount", &[OsStr::new("--lazy"), mp.as_os_str()])
        {
            eprintln!("could not unmount {}", mp.display());
        }
        if let Some(device) = &self.loop_device
            && !quiet("losetup", &[OsStr::new("--detach"), OsStr::new(device)])
        {
            eprintln!("could not detach {device}");
        }
    }
}

fn syncfs(path: &Path) {
    let dir = std::fs::File::open(path).unwrap();
    rustix::fs::syncfs(&dir).unwrap();
}

/// xorshift64*: fast incompressible bytes, a different stream per file.
struct Bytes(u64);

impl Bytes {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn write_file(path: &Path, size: u64, seed: u64) {
    let mut f = std::fs::File::create_new(path).unwrap();
    let mut bytes = Bytes(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut buf = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        bytes.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
}

/// The source's tree: one 512 MiB file, 120 files of 4 MiB in 4 directories, 400 files of 4–160 KiB in 20
/// directories (one level deeper for half of them). Returns (files, directories below `data`, bytes).
fn fill(data: &Path) -> (u64, u64, u64) {
    let (mut files, mut dirs, mut bytes) = (0u64, 0u64, 0u64);
    let mut add = |path: PathBuf, size: u64| {
        write_file(&path, size, files + 1);
        files += 1;
        bytes += size;
    };
    add(data.join("big.bin"), 512 * MIB);
    for d in 0..4 {
        let dir = data.join(format!("medium/m{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..30 {
            add(dir.join(format!("part-{i:03}.bin")), 4 * MIB);
        }
    }
    dirs += 6; // medium/, its 4, small/
    for d in 0..20u64 {
        let dir =
            if d % 2 == 0 { data.join(format!("small/s{d:02}")) } else { data.join(format!("small/s{d:02}/deeper")) };
        std::fs::create_dir_all(&dir).unwrap();
        dirs += if d % 2 == 0 { 1 } else { 2 };
        for i in 0..20u64 {
            add(dir.join(format!("f{i:02}.dat")), ((d * 20 + i) % 40 + 1) * 4096);
        }
    }
    (files, dirs, bytes)
}

/// Compares two trees: the same names, types, sizes, modes, owners and bytes. Returns the files compared.
fn compare_trees(a: &Path, b: &Path) -> u64 {
    let (ma, mb) = (std::fs::symlink_metadata(a).unwrap(), std::fs::symlink_metadata(b).unwrap());
    // Sizes of regular files only: a directory's size is its filesystem's business.
    let len = |m: &std::fs::Metadata| if m.is_file() { m.len() } else { 0 };
    assert_eq!(
        (ma.file_type(), len(&ma), ma.permissions().mode(), ma.uid(), ma.gid()),
        (mb.file_type(), len(&mb), mb.permissions().mode(), mb.uid(), mb.gid()),
        "{} and {} differ",
        a.display(),
        b.display()
    );
    if ma.is_dir() {
        let names = |d: &Path| {
            let mut v: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
            v.sort();
            v
        };
        let (na, nb) = (names(a), names(b));
        assert_eq!(na, nb, "{} and {} hold different names", a.display(), b.display());
        return na.iter().map(|n| compare_trees(&a.join(n), &b.join(n))).sum();
    }
    let (mut fa, mut fb) = (std::fs::File::open(a).unwrap(), std::fs::File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    loop {
        let n = fa.read(&mut ba).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        assert!(ba[..n] == bb[..n], "{} and {} hold different bytes", a.display(), b.display());
        if n == 0 {
            return 1;
        }
    }
}

/// The extents of `path` that `filefrag -v` flags as shared (and all of them).
fn shared_extents(path: &Path) -> (usize, usize) {
    let out = run("filefrag", &[OsStr::new("-v"), path.as_os_str()]);
    let extents: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().split(':').next().is_some_and(|n| n.trim().parse::<u64>().is_ok()))
        .collect();
    (extents.iter().filter(|l| l.contains("shared")).count(), extents.len())
}

/// The fields of the agent's last "copied a volume's files into its clone" line.
fn last_copy_log(agent: &AgentProcess) -> (f64, u64, u64) {
    let log = agent.log();
    let line = log
        .lines()
        .rfind(|l| l.contains("copied a volume's files into its clone"))
        .expect("the agent logs each clone's copy");
    let field = |name: &str| {
        let at = line.find(&format!(" {name}=")).unwrap_or_else(|| panic!("no {name} in {line}")) + name.len() + 2;
        line[at..].split(' ').next().unwrap().to_owned()
    };
    (
        field("seconds").parse().unwrap(),
        field("reflinked_bytes").parse().unwrap(),
        field("copied_bytes").parse().unwrap(),
    )
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / MIB as f64
}

#[derive(Default)]
struct Samples {
    agent_clone: Vec<f64>,
    agent_copy: Vec<f64>,
    agent_delete: Vec<f64>,
    agent_drop: Vec<f64>,
    cp: Vec<f64>,
    cp_rm: Vec<f64>,
    cp_drop: Vec<f64>,
    never: Vec<f64>,
    never_rm: Vec<f64>,
    never_drop: Vec<f64>,
    idle_sync: Vec<f64>,
}

struct Bench<'a> {
    disk: &'a XfsDisk,
    agent: &'a AgentProcess,
    http: reqwest::Client,
    token: String,
    source_data: PathBuf,
    work: PathBuf,
}

impl Bench<'_> {
    /// The agent's clone (PUT until 201) and its delete; (clone ms, the agent's own copy+syncfs ms, delete ms,
    /// free-space drop in bytes, the clone's data dir — gone by the time this returns, unless `keep`).
    async fn agent_round(&self, round: usize, keep: bool) -> (f64, f64, f64, i64, PathBuf) {
        let name = format!("pvc-00000000-0000-4000-8000-{round:012}");
        let path = format!("/v1/volumes/{name}");
        let body = json!({
            "pool": POOL, "sizeBytes": CLAIM_BYTES, "source": SOURCE,
            "claim": {"namespace": "bench", "name": format!("clone-{round}")},
        });
        tokio::task::block_in_place(|| self.disk.settle());
        let before = self.disk.free_bytes() as i64;
        let started = Instant::now();
        let created = self
            .agent
            .controller_request(&self.http, Method::PUT, &path, &self.token, 1)
            .timeout(REQUEST_DEADLINE)
            .json(&body)
            .send()
            .await
            .unwrap();
        let clone_time = started.elapsed();
        let status = created.status();
        let text = created.text().await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{text}\nagent log:\n{}", self.agent.log());
        let used = before - self.disk.free_bytes() as i64;
        let (copy_seconds, _, copied) = last_copy_log(self.agent);
        assert_eq!(copied, 0, "the clone copied bytes instead of reflinking them");
        let volume: Volume = serde_json::from_str(&text).unwrap();
        if keep {
            return (ms(clone_time), copy_seconds * 1000.0, 0.0, used, PathBuf::from(volume.path));
        }
        tokio::task::block_in_place(|| self.disk.settle());
        let started = Instant::now();
        let deleted = self
            .agent
            .controller_request(&self.http, Method::DELETE, &path, &self.token, 1)
            .timeout(REQUEST_DEADLINE)
            .send()
            .await
            .unwrap();
        let delete_time = started.elapsed();
        assert_eq!(deleted.status(), StatusCode::OK, "{}", deleted.text().await.unwrap());
        (ms(clone_time), copy_seconds * 1000.0, ms(delete_time), used, PathBuf::from(volume.path))
    }

    /// `cp -a [extra] <source> <copy>` + `sync -f <copy>`, then `rm -rf <copy>`: (copy ms, rm ms, free-space
    /// drop in bytes).
    fn cp_round(&self, round: usize, extra: &[&str], keep: bool) -> (f64, f64, i64, PathBuf) {
        let copy = self.work.join(format!("copy-{round}-{}", extra.len()));
        self.disk.settle();
        let before = self.disk.free_bytes() as i64;
        let started = Instant::now();
        let mut args: Vec<&OsStr> = vec![OsStr::new("-a")];
        args.extend(extra.iter().map(OsStr::new));
        args.extend([self.source_data.as_os_str(), copy.as_os_str()]);
        run("cp", &args);
        run("sync", &[OsStr::new("-f"), copy.as_os_str()]);
        let copy_time = started.elapsed();
        let used = before - self.disk.free_bytes() as i64;
        if keep {
            return (ms(copy_time), 0.0, used, copy);
        }
        self.disk.settle();
        let started = Instant::now();
        run("rm", &[OsStr::new("-rf"), copy.as_os_str()]);
        (ms(copy_time), ms(started.elapsed()), used, copy)
    }

    /// A `sync -f` of the filesystem with nothing to write: the floor under both sides' syncs.
    fn idle_sync(&self) -> f64 {
        self.disk.settle();
        let started = Instant::now();
        run("sync", &[OsStr::new("-f"), self.work.as_os_str()]);
        ms(started.elapsed())
    }

    async fn round(&self, round: usize, samples: &mut Samples) {
        let agent_first = round.is_multiple_of(2);
        let mut agent = None;
        let mut cps = Vec::new();
        if agent_first {
            agent = Some(self.agent_round(round, false).await);
        }
        let flavours: [&[&str]; 2] =
            if agent_first { [&[], &["--reflink=never"]] } else { [&["--reflink=never"], &[]] };
        for extra in flavours {
            cps.push((extra.is_empty(), tokio::task::block_in_place(|| self.cp_round(round, extra, false))));
        }
        if !agent_first {
            agent = Some(self.agent_round(round, false).await);
        }
        let idle = tokio::task::block_in_place(|| self.idle_sync());
        let (clone, copy, delete, agent_drop, _) = agent.unwrap();
        let (cp, never) = {
            let find = |reflink: bool| cps.iter().find(|(r, _)| *r == reflink).unwrap().1.clone();
            (find(true), find(false))
        };
        println!(
            "round {round} ({} first): agent clone {clone:.1} ms (its copy+syncfs {copy:.1} ms), delete {delete:.1} ms, \
             drop {:.1} MiB | cp -a {:.1} ms, rm {:.1} ms, drop {:.1} MiB | cp -a --reflink=never {:.1} ms, rm {:.1} ms, \
             drop {:.1} MiB | idle sync -f {idle:.1} ms",
            if agent_first { "agent" } else { "cp" },
            mib(agent_drop),
            cp.0,
            cp.1,
            mib(cp.2),
            never.0,
            never.1,
            mib(never.2),
        );
        samples.agent_clone.push(clone);
        samples.agent_copy.push(copy);
        samples.agent_delete.push(delete);
        samples.agent_drop.push(mib(agent_drop));
        samples.cp.push(cp.0);
        samples.cp_rm.push(cp.1);
        samples.cp_drop.push(mib(cp.2));
        samples.never.push(never.0);
        samples.never_rm.push(never.1);
        samples.never_drop.push(mib(never.2));
        samples.idle_sync.push(idle);
    }
}

#[tokio::main]
async fn main() {
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1);
    assert_eq!(uid, 0, "the benchmark mounts a filesystem: run it as root");
    let rounds: usize = std::env::var("BERTH_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(5);
    let cp_version = run("cp", &["--version"]);
    println!("{}", cp_version.lines().next().unwrap_or_default());
    println!("load average at start: {}", std::fs::read_to_string("/proc/loadavg").unwrap().trim());

    // Made first, so it is dropped (unmounted, detached) after the bed and the agent are gone.
    let disk = XfsDisk::create(IMAGE_BYTES);
    let mut config = TestBedConfig::nodes(1);
    config.base_dir = Some(disk.mount_point());
    let bed = TestBed::start(config).await.unwrap();
    bed.install_berth().await.unwrap();
    let agent =
        bed.start_agent(Path::new(env!("CARGO_BIN_EXE_berth-agent")), 0, &[PoolSpec::new(POOL)], true).await.unwrap();
    let root = agent.pool_root(POOL).to_owned();
    let st = rustix::fs::statfs(&root).unwrap();
    assert_eq!(
        st.f_type as i64,
        XFS_SUPER_MAGIC,
        "the pool root {} is not on XFS (f_type {:#x})",
        root.display(),
        st.f_type
    );
    let (root_dev, mount_dev) =
        (std::fs::metadata(&root).unwrap().dev(), std::fs::metadata(disk.mount_point()).unwrap().dev());
    assert_eq!(root_dev, mount_dev, "the pool root {} is not on the benchmark's XFS mount", root.display());
    println!("pool root {} on the XFS (reflink=1) mount {}", root.display(), disk.mount_point().display());

    let http = agent.http().unwrap();
    let token = bed.controller_token("node-0").await.unwrap();
    let body = json!({"pool": POOL, "sizeBytes": CLAIM_BYTES, "claim": {"namespace": "bench", "name": "source"}});
    let created = agent
        .controller_request(&http, Method::PUT, &format!("/v1/volumes/{SOURCE}"), &token, 1)
        .timeout(REQUEST_DEADLINE)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED, "{}", created.text().await.unwrap());
    let source_data = PathBuf::from(created.json::<Volume>().await.unwrap().path);
    let before = disk.free_bytes();
    let started = Instant::now();
    let (files, dirs, bytes) = tokio::task::block_in_place(|| {
        let made = fill(&source_data);
        syncfs(&source_data);
        made
    });
    println!(
        "source {}: {files} files and {dirs} directories below it, {bytes} bytes ({:.1} MiB) written and synced in {:.1} s; \
         free space down {:.1} MiB",
        source_data.display(),
        mib(bytes as i64),
        started.elapsed().as_secs_f64(),
        mib(before as i64 - disk.free_bytes() as i64)
    );
    let work = disk.mount_point().join("cp-work");
    std::fs::create_dir(&work).unwrap();
    let bench = Bench { disk: &disk, agent: &agent, http, token, source_data: source_data.clone(), work };

    // Once: the clone's content is the source's, and it shares the source's blocks; so does cp -a's copy, and the
    // plain copy's does not. (Also the warm-up: these are not counted.)
    let (clone_ms, copy_ms, _, clone_drop, clone_data) = bench.agent_round(1_000_000, true).await;
    let (cp_ms, _, cp_drop, cp_copy) = tokio::task::block_in_place(|| bench.cp_round(1_000_000, &[], true));
    let (never_ms, _, never_drop, never_copy) =
        tokio::task::block_in_place(|| bench.cp_round(1_000_000, &["--reflink=never"], true));
    tokio::task::block_in_place(|| {
        for (what, copy) in [("agent clone", &clone_data), ("cp -a", &cp_copy), ("cp -a --reflink=never", &never_copy)]
        {
            let compared = compare_trees(&source_data, copy);
            assert_eq!(compared, files, "{what}: every file compared");
            let (shared, extents) = shared_extents(&copy.join("big.bin"));
            println!(
                "check: {what}: {compared} files equal to the source's; big.bin: {shared} of {extents} extents shared"
            );
        }
    });
    let (_, reflinked, copied) = last_copy_log(&agent);
    println!(
        "check: the agent's log: reflinked_bytes={reflinked} copied_bytes={copied}; warm-up: agent clone {clone_ms:.1} \
         ms (copy+syncfs {copy_ms:.1} ms, drop {:.1} MiB), cp -a {cp_ms:.1} ms (drop {:.1} MiB), cp -a \
         --reflink=never {never_ms:.1} ms (drop {:.1} MiB)",
        mib(clone_drop),
        mib(cp_drop),
        mib(never_drop)
    );
    assert_eq!((reflinked, copied), (bytes, 0), "the agent's clone reflinked every byte");
    assert!(shared_extents(&clone_data.join("big.bin")).0 > 0, "filefrag shows the clone's big.bin shared");
    let warm_up = "pvc-00000000-0000-4000-8000-000001000000";
    let deleted = agent
        .controller_request(&bench.http, Method::DELETE, &format!("/v1/volumes/{warm_up}"), &bench.token, 1)
        .timeout(REQUEST_DEADLINE)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::OK);
    tokio::task::block_in_place(|| {
        run("rm", &[OsStr::new("-rf"), cp_copy.as_os_str(), never_copy.as_os_str()]);
    });

    let mut samples = Samples::default();
    for round in 0..rounds {
        bench.round(round, &mut samples).await;
    }
    println!("load average at end: {}", std::fs::read_to_string("/proc/loadavg").unwrap().trim());
    let (agent_ms, cp_ms, never_ms) = (median(&samples.agent_clone), median(&samples.cp), median(&samples.never));
    println!(
        "BENCH directory_clone rounds={rounds} tree_bytes={bytes} files={files} agent_clone_ms={agent_ms:.1} \
         agent_copy_syncfs_ms={:.1} agent_delete_ms={:.1} cp_a_ms={cp_ms:.1} cp_a_rm_ms={:.1} \
         cp_a_reflink_never_ms={never_ms:.1} cp_a_reflink_never_rm_ms={:.1} ratio_agent_cp_a={:.2} \
         ratio_agent_cp_never={:.3} free_drop_agent_mib={:.1} free_drop_cp_a_mib={:.1} \
         free_drop_cp_never_mib={:.1} idle_sync_ms={:.1}",
        median(&samples.agent_copy),
        median(&samples.agent_delete),
        median(&samples.cp_rm),
        median(&samples.never_rm),
        agent_ms / cp_ms,
        agent_ms / never_ms,
        median(&samples.agent_drop),
        median(&samples.cp_drop),
        median(&samples.never_drop),
        median(&samples.idle_sync),
    );
}
