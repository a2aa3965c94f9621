//! The test bed leaves nothing behind: not when a test panics, not when a test process is killed outright, and its
//! simulated nodes stay Ready for as long as it runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use testbed::kube_util::{node_is_ready, node_taints};
use testbed::{FsType, TestBed, TestBedConfig};

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn mounted_under(dir: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(dir.to_str().unwrap())
}

fn loop_backed_under(dir: &Path) -> bool {
    let out =
        std::process::Command::new("losetup").args(["--list", "--noheadings", "-O", "BACK-FILE"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).contains(dir.to_str().unwrap())
}

#[test]
fn bed_is_torn_down_when_a_test_panics() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seen: std::sync::Mutex<Option<(PathBuf, Vec<u32>)>> = Default::default();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            let bed = TestBed::start(TestBedConfig::nodes_with_disks(&[64 << 20], FsType::Ext4)).await.unwrap();
            let pids = bed.processes().into_iter().map(|(_, pid)| pid).collect();
            *seen.lock().unwrap() = Some((bed.dir().to_path_buf(), pids));
            panic!("a test fails while its bed runs");
        })
    }));
    assert!(result.is_err(), "the closure panics");
    let (dir, pids) = seen.lock().unwrap().take().expect("the bed started");
    assert_eq!(pids.len(), 5, "etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok");
    for pid in pids {
        assert!(!process_exists(pid), "process {pid} outlived the panicking test");
    }
    assert!(!dir.exists(), "{} outlived the panicking test", dir.display());
    assert!(!mounted_under(&dir));
    assert!(!loop_backed_under(&dir));
    // The logs are kept for the post-mortem.
    let kept = testbed::bins::repo_root().join("target/testbed-logs").join(dir.file_name().unwrap());
    assert!(kept.join("kube-apiserver.log").is_file(), "{} has no logs", kept.display());
}

/// A test process killed outright (SIGKILL: no unwinding, no `Drop`): its control plane dies with it
/// (PDEATHSIG), and the mount, loop device and directory it leaves are cleaned up by the next bed started on the
/// same base directory, which leaves the directory of a live bed alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_test_process_takes_its_processes_along_and_the_next_bed_cleans_up() {
    use std::io::BufRead;
    let base = tempfile::tempdir().unwrap();
    let mut killed = std::process::Command::new(env!("CARGO_BIN_EXE_berth-testbed"))
        .args(["--nodes", "1", "--pool-size", "256Mi", "--base-dir"])
        .arg(base.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(killed.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let kubeconfig = line.trim().strip_prefix("export KUBECONFIG=").unwrap_or_else(|| panic!("got {line:?}"));
    let dead = Path::new(kubeconfig).parent().unwrap().to_path_buf();
    let children = processes_mentioning(&dead);
    assert_eq!(children.len(), 5, "the bed's five processes run: {children:?}");
    assert!(mounted_under(&dead) && loop_backed_under(&dead));

    killed.kill().unwrap();
    killed.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while children.iter().any(|&pid| process_exists(pid)) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let alive: Vec<u32> = children.into_iter().filter(|&pid| process_exists(pid)).collect();
    assert!(alive.is_empty(), "processes {alive:?} outlived their killed test process");
    assert!(dead.exists() && mounted_under(&dead), "what a killed process cannot clean up is still there");

    // A bed of a live owner (this process) next to it must be left alone.
    let live = base.path().join("berth-bed.live");
    std::fs::create_dir_all(&live).unwrap();
    let me = std::fs::read_to_string("/proc/self/stat").unwrap();
    let start = me[me.rfind(')').unwrap() + 2..].split(' ').nth(19).unwrap().to_owned();
    std::fs::write(live.join("owner"), format!("{} {start}", std::process::id())).unwrap();

    let config = TestBedConfig { base_dir: Some(base.path().to_path_buf()), ..TestBedConfig::nodes(0) };
    let bed = TestBed::start(config).await.unwrap();
    assert!(!mounted_under(&dead), "the dead bed's disk is still mounted");
    assert!(!loop_backed_under(&dead), "the dead bed's loop device is still attached");
    assert!(!dead.exists(), "the dead bed's directory is still there");
    assert!(live.exists(), "a live bed's directory was removed");
    drop(bed);
}

/// Pids of the processes whose command line mentions `dir`.
fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let needle = dir.to_str().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(needle)
        })
        .collect()
}

/// kwok renews each node's Lease, so the node lifecycle controller keeps the nodes Ready and untainted past its
/// grace period (50 s by default), as a kubelet would.
#[tokio::test(flavor = "multi_thread")]
async fn simulated_nodes_stay_ready_past_the_node_monitor_grace_period() {
    let bed = TestBed::start(TestBedConfig::nodes(2)).await.unwrap();
    let leases: Api<Lease> = Api::namespaced(bed.client(), "kube-node-lease");
    let renew_time = |l: Lease| l.spec.and_then(|s| s.renew_time).map(|t| t.0);
    let first = renew_time(leases.get("node-0").await.unwrap()).expect("kwok holds node-0's lease");
    tokio::time::sleep(Duration::from_secs(65)).await;
    let later = renew_time(leases.get("node-0").await.unwrap()).unwrap();
    assert!(later > first, "the lease was not renewed: {first:?} then {later:?}");
    let nodes: Api<Node> = Api::all(bed.client());
    for node in bed.nodes() {
        let n = nodes.get(&node.name).await.unwrap();
        assert!(node_is_ready(&n), "{} is not Ready after 65 s", node.name);
        assert!(node_taints(&n).is_empty(), "{} is tainted after 65 s: {:?}", node.name, node_taints(&n));
    }
}
