//! A pod's own files must not be able to stop the agent (issue 18, item 1; issue 20 for clones): whatever tree a
//! pod leaves in its volume — 20,000 directories deep, a million entries in one directory — the agent copies it
//! into a clone and removes it within a memory limit like its DaemonSet's and a small descriptor limit. The bed
//! lives on a tmpfs with the inodes a million files need: on the CI machines' disk (ext4 mounted with `discard`)
//! planting them took from 24 s to 344 s.
//!
//! The clone is made by the agent under `prlimit --nofile` with its peak resident memory (`VmHWM`) measured: a
//! memory cgroup cannot hold the copy, because the kernel charges the inodes and dentries of the files the agent
//! makes on tmpfs (about a kilobyte each, a gigabyte for the clone) to the cgroup of their maker. The removals run
//! with the agent in a memory cgroup of its own as well (cgroup accounting, as a container's limit): the source
//! volume's tree is left as debris of a delete a crash interrupted, and the restarted agent serves first and
//! removes it in the background, while the API's delete of the clone runs.

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use berth::agent_api::Volume;
use reqwest::{Method, StatusCode};
use rustix::fs::{CWD, Mode, OFlags};
use serde_json::json;
use testbed::agents::PoolSpec;
use testbed::cgroup::{MemoryCgroup, require_root};
use testbed::on_node::poll;
use testbed::{TestBed, TestBedConfig};

const VOL: &str = "pvc-0f8e3c1a-5b2d-4c7e-9a10-2b3c4d5e6f70";
/// The clone of VOL.
const CLONE: &str = "pvc-2f8e3c1a-5b2d-4c7e-9a10-2b3c4d5e6f72";
/// Tighter than the DaemonSet's 256Mi, so that a walk that keeps a name per entry (1M × ~100 bytes) cannot fit:
/// the cgroup's limit for the removals, and the bound on the agent's peak resident memory for the copy.
const MEMORY_LIMIT: u64 = 64 << 20;
const DEPTH: usize = 20_000;
const ENTRIES: usize = 1_000_000;

fn open_dir(dir: impl rustix::fd::AsFd, name: &CString) -> OwnedFd {
    rustix::fs::openat(dir, name, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).unwrap()
}

/// What a hostile pod leaves: a chain `depth` directories deep (built by descriptor: no path could name its
/// bottom) and a directory of `entries` empty files with 64-byte names.
fn plant(top: &Path, depth: usize, entries: usize) {
    let top_fd = open_dir(CWD, &CString::new(top.as_os_str().as_encoded_bytes()).unwrap());
    let d = CString::new("d").unwrap();
    let mut dir = {
        rustix::fs::mkdirat(&top_fd, &d, Mode::RWXU).unwrap();
        open_dir(&top_fd, &d)
    };
    for _ in 1..depth {
        rustix::fs::mkdirat(&dir, &d, Mode::RWXU).unwrap();
        dir = open_dir(&dir, &d);
    }
    let wide = CString::new("wide").unwrap();
    rustix::fs::mkdirat(&top_fd, &wide, Mode::RWXU).unwrap();
    let wide = open_dir(&top_fd, &wide);
    for i in 0..entries {
        let name = CString::new(format!("{i:0>64}")).unwrap();
        rustix::fs::openat(&wide, &name, OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC, Mode::RUSR).unwrap();
    }
}

/// The shape of a tree [`plant`] made: how deep its chain of `d` goes, and how many entries `wide` holds. Read by
/// descriptor and as a stream, like the agent's own walks.
fn shape(top: &Path) -> (usize, usize) {
    let top_fd = open_dir(CWD, &CString::new(top.as_os_str().as_encoded_bytes()).unwrap());
    let d = CString::new("d").unwrap();
    let (mut depth, mut dir) = (0, top_fd.try_clone().unwrap());
    while let Ok(next) =
        rustix::fs::openat(&dir, &d, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
    {
        (depth, dir) = (depth + 1, next);
    }
    let entries = std::fs::read_dir(top.join("wide")).unwrap().count();
    (depth, entries)
}

/// The peak resident memory of process `pid` (`VmHWM`), in bytes.
fn peak_resident(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).expect("a VmHWM line");
    kib.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() << 10
}

/// A tmpfs mounted on a new directory for the test's bed, unmounted (lazily: nothing may still use it) on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(inodes: usize) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let options = format!("size=2g,nr_inodes={inodes},mode=0755");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &options, "berth-hostile-trees"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs on {}: {status}", dir.path().display());
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("--lazy").arg(self.0.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pods_deep_and_wide_tree_is_copied_and_removed_within_the_agents_limits() {
    require_root().unwrap();
    // Made first, so they are dropped (removed) after the bed and the agent are gone.
    let cgroup = MemoryCgroup::new(&format!("berth-agent-{}", std::process::id()), MEMORY_LIMIT).unwrap();
    let tmpfs = Tmpfs::mount(2 * (ENTRIES + DEPTH) + 100_000);
    let mut config = TestBedConfig::nodes(1);
    config.base_dir = Some(tmpfs.0.path().to_owned());
    let bed = TestBed::start(config).await.unwrap();
    bed.install_berth().await.unwrap();
    let binary = Path::new(env!("CARGO_BIN_EXE_berth-agent"));
    let mut agent = bed.start_agent(binary, 0, &[PoolSpec::new("fast")], true).await.unwrap();
    let token = bed.controller_token("node-0").await.unwrap();
    let http = agent.http().unwrap();
    let body = json!({"pool": "fast", "sizeBytes": 1 << 20, "claim": {"namespace": "db", "name": "data"}});
    let resp = agent
        .controller_request(&http, Method::PUT, &format!("/v1/volumes/{VOL}"), &token, 1)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let source = resp.json::<Volume>().await.unwrap();

    // The pod's tree, written while the agent runs; then the agent is restarted within its descriptor limit.
    let started = Instant::now();
    tokio::task::block_in_place(|| plant(Path::new(&source.path), DEPTH, ENTRIES));
    eprintln!("planted {DEPTH} levels and {ENTRIES} entries in {:?}", started.elapsed());
    agent.kill();
    agent.wrap(&["prlimit".into(), "--nofile=256:256".into(), "--".into()]);
    agent.start().await.unwrap();
    let http = agent.http().unwrap();

    // Its clone, the whole tree, made within the descriptor limit and the memory bound.
    // prlimit (and the cgroup's sh, below) exec the agent: the process is the agent's own.
    let pid = agent.pid().unwrap();
    let before = peak_resident(pid);
    let started = Instant::now();
    let body =
        json!({"pool": "fast", "sizeBytes": 1 << 20, "claim": {"namespace": "db", "name": "copy"}, "source": VOL});
    let resp = agent
        .controller_request(&http, Method::PUT, &format!("/v1/volumes/{CLONE}"), &token, 1)
        .timeout(Duration::from_secs(600))
        .json(&body)
        .send()
        .await;
    let (took, peak) = (started.elapsed(), peak_resident(pid));
    eprintln!("clone took {took:?}; the agent's peak resident memory {} MiB ({} MiB before)", peak >> 20, before >> 20);
    let log = agent.log();
    let resp = resp.unwrap_or_else(|e| panic!("PUT of the clone failed ({e}); agent log:\n{log}"));
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{text}\nagent log:\n{log}");
    let clone: Volume = serde_json::from_str(&text).unwrap();
    assert!(peak < MEMORY_LIMIT, "the agent's peak resident memory {peak} bytes while it copied");
    assert_ne!(clone.path, source.path);
    let copied = tokio::task::block_in_place(|| shape(Path::new(&clone.path)));
    assert_eq!(copied, (DEPTH, ENTRIES), "the clone has the whole tree (depth, entries)");
    agent.kill();

    // The source as a crash mid-delete leaves it: moved into staging, out of the inventory. The agent restarted in
    // its memory cgroup removes it in the background while the API's delete of the clone runs.
    let root = agent.pool_root("fast").to_owned();
    let staging = root.join(".berth-tmp");
    std::fs::rename(root.join(VOL), staging.join(format!("delete-{VOL}-00000001"))).unwrap();
    agent.wrap(&cgroup.prefix());
    agent.start().await.unwrap();
    let http = agent.http().unwrap();

    let started = Instant::now();
    let resp = agent
        .controller_request(&http, Method::DELETE, &format!("/v1/volumes/{CLONE}"), &token, 1)
        .timeout(Duration::from_secs(600))
        .send()
        .await;
    let took = started.elapsed();
    let peak = cgroup.peak_bytes().unwrap();
    eprintln!("delete took {took:?}; the agent's cgroup peaked at {} MiB", peak >> 20);
    let oom = cgroup.oom_kills().unwrap();
    let log = agent.log();
    let resp = resp.unwrap_or_else(|e| panic!("DELETE failed ({e}); OOM kills {oom}; agent log:\n{log}"));
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{text}\nagent log:\n{log}");
    assert_eq!(oom, 0, "the agent was OOM-killed");
    assert!(!root.join(CLONE).exists());

    // The debris goes too, in the background, and it went after the API was serving.
    let left = || std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0);
    let removal = poll("debris removed", Duration::from_secs(600), || Ok((left() == 0).then_some(()))).await;
    let (peak, oom, log) = (cgroup.peak_bytes().unwrap(), cgroup.oom_kills().unwrap(), agent.log());
    eprintln!("debris removed: {removal:?}; the agent's cgroup peaked at {} MiB", peak >> 20);
    assert_eq!(oom, 0, "the agent was OOM-killed; agent log:\n{log}");
    removal.unwrap_or_else(|e| panic!("{e}: {} left in {}; agent log:\n{log}", left(), staging.display()));
    let after = &log[log.rfind("inventory recovered from disk").expect("the restart's recovery is logged")..];
    let (serving, removed) = (after.find("serving"), after.find("debris removed"));
    assert!(serving.is_some() && serving < removed, "the API serves before debris is removed:\n{after}");
    let listed: serde_json::Value = agent
        .controller_request(&http, Method::GET, "/v1/volumes", &token, 1)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["volumes"], json!([]), "the volume and its clone are gone from the inventory");
}
