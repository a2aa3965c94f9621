//! Runs commands inside a real Linux kernel (the Debian kernel under qemu, via virtme-ng) for what the host
//! kernel cannot do here: device-mapper (LVM), mkfs and mount of real volumes, project quotas.
//!
//! The guest shares the host's root filesystem read-only (writes to /etc, /var, /tmp … go to throw-away
//! overlays), so test binaries built on the host run as they are. Scripts live under the repository's `target/`;
//! list with [`Vm::rwdir`] any directory the guest must write to for the host to see. (test-bed.md warns that the
//! guest cannot see the host's /tmp; with virtme-ng 1.42 it sees it read-only through an overlay: the VM tier
//! passed from a clone under /tmp.) Each disk image appears as a virtio disk whose serial is the image's file name, so the
//! guest finds it at `/dev/disk/by-id/virtio-<file name>` (see [`guest_disk`]) whatever order it was added in.
//! With [`Vm::network`] the guest reaches the host's 127.0.0.1 — and only that address — as 10.0.2.2.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bins::repo_root;
use crate::process::{die_with_spawning_thread, tail};

/// How the host's 127.0.0.1 is called inside a guest with [`Vm::network`].
pub const HOST_FROM_GUEST: &str = "10.0.2.2";

#[derive(Debug, Clone)]
pub struct Vm {
    kernel: PathBuf,
    memory: String,
    cpus: u32,
    disks: Vec<PathBuf>,
    rwdirs: Vec<PathBuf>,
    env: Vec<(String, String)>,
    network: bool,
    /// (host port on 127.0.0.1, guest port).
    forwards: Vec<(u16, u16)>,
    deadline: Duration,
}

/// What a guest command did.
#[derive(Debug)]
pub struct VmRun {
    /// The guest command's exit status, as virtme-ng reports it.
    pub status: i32,
    /// Everything the guest and qemu printed, in order.
    pub output: String,
    /// Boot plus command.
    pub elapsed: Duration,
}

impl Vm {
    /// A VM with the newest kernel in /boot (or `$BERTH_VM_KERNEL`), 1 GiB of memory, 2 CPUs, no disks.
    pub fn new() -> Result<Vm> {
        let kernel = match std::env::var_os("BERTH_VM_KERNEL") {
            Some(k) => PathBuf::from(k),
            None => newest_kernel()?,
        };
        Ok(Vm {
            kernel,
            memory: "1G".into(),
            cpus: 2,
            disks: vec![],
            rwdirs: vec![],
            env: vec![],
            network: false,
            forwards: vec![],
            deadline: Duration::from_secs(15 * 60),
        })
    }

    /// The kernel release the guest will run (from the image's file name, `vmlinuz-<release>`).
    pub fn kernel_release(&self) -> String {
        let name = self.kernel.file_name().unwrap_or_default().to_string_lossy();
        name.strip_prefix("vmlinuz-").unwrap_or(&name).to_owned()
    }

    /// Adds a raw disk image. Its file name must be unique among the disks and at most 20 bytes (the virtio
    /// serial limit), since the guest finds the disk by it.
    pub fn disk(mut self, image: impl Into<PathBuf>) -> Self {
        self.disks.push(image.into());
        self
    }

    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    pub fn memory(mut self, memory: &str) -> Self {
        self.memory = memory.into();
        self
    }

    /// A host directory the guest may write to (at the same path).
    pub fn rwdir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.rwdirs.push(dir.into());
        self
    }

    /// An environment variable for the guest command.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// User-mode networking: the host's 127.0.0.1 is reachable from the guest as [`HOST_FROM_GUEST`].
    pub fn network(mut self) -> Self {
        self.network = true;
        self
    }

    /// User-mode networking (as [`Vm::network`]) with the host's `127.0.0.1:host_port` forwarded to the guest's
    /// `guest_port` (on its address 10.0.2.15). Bound to 127.0.0.1 explicitly: qemu binds every interface otherwise.
    pub fn forward(mut self, host_port: u16, guest_port: u16) -> Self {
        self.network = true;
        self.forwards.push((host_port, guest_port));
        self
    }

    /// The longest a guest command may run (boot included) before it is killed; default 15 minutes.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Boots, runs `command` (a bash command line) as root in the guest, streams its output to stdout with a
    /// `[vm]` prefix, and returns its exit status. The guest also gets `BERTH_IN_VM=1` and
    /// `BERTH_HOST_KERNEL=<the host's kernel release>`.
    ///
    /// A boot that has not reached the command within [`BOOT_DEADLINE`] is killed and retried once (seen on a
    /// fresh machine: one boot spun 13 minutes without output, the same run by hand took 16 s); a command that
    /// outlives [`Vm::deadline`] is killed. Either way the error carries the end of the guest's console.
    pub fn run(&self, command: &str) -> Result<VmRun> {
        let started = Instant::now();
        let mut guest = self.boot(command)?;
        let status = guest.wait(self.deadline.saturating_sub(started.elapsed()))?;
        Ok(VmRun { status, output: guest.output(), elapsed: started.elapsed() })
    }

    /// Boots and starts `command` as [`Vm::run`] does (the same boot deadline and retry), but returns once the
    /// command has started: the guest runs until [`RunningVm::stop`] or drop.
    pub fn spawn(&self, command: &str) -> Result<RunningVm> {
        self.boot(command)
    }

    /// Launches the guest and waits for its command to start, retrying a hung boot once.
    fn boot(&self, command: &str) -> Result<RunningVm> {
        for attempt in 1..=2 {
            let mut guest = self.launch(command)?;
            if guest.wait_for_boot(BOOT_DEADLINE)? {
                if attempt > 1 {
                    println!("[vm] the second boot reached its command (the first hung)");
                }
                return Ok(guest);
            }
            let console = tail(&guest.output(), 60);
            guest.kill();
            if attempt > 1 {
                bail!(
                    "two boots in a row did not reach the guest command within {BOOT_DEADLINE:?} each; console of the second:\n{console}"
                );
            }
            println!(
                "[vm] the guest did not reach its command within {BOOT_DEADLINE:?}; its console so far:\n{console}\n[vm] retrying the boot once"
            );
        }
        unreachable!("the second attempt returns or fails")
    }

    fn launch(&self, command: &str) -> Result<RunningVm> {
        for disk in &self.disks {
            let name = disk.file_name().unwrap_or_default().to_string_lossy();
            if name.len() > 20 || name.contains([',', '=']) {
                bail!("disk image name {name:?}: at most 20 bytes, no ',' or '=' (it becomes the virtio serial)");
            }
        }
        // The script lives where the guest can read it: under the repository, not /tmp. vng names each disk
        // (its virtio serial) after the path it is given, so disks are passed as links named after the image,
        // relative to this directory.
        let scripts = repo_root().join("target/vm-runs");
        std::fs::create_dir_all(&scripts)?;
        let run_dir = tempfile::Builder::new().prefix("run-").tempdir_in(&scripts)?;
        let script = run_dir.path().join("run.sh");
        for disk in &self.disks {
            let link = run_dir.path().join(disk.file_name().unwrap_or_default());
            let target = std::path::absolute(disk)?;
            std::os::unix::fs::symlink(&target, &link)
                .with_context(|| format!("{} (two disks with one file name?)", link.display()))?;
        }
        let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim().to_owned();
        // The marker tells the host that the boot is over and the command runs; the console before it (kernel
        // and init messages, when vng prints any) is kept but only printed when the boot fails. Not
        // `vng --verbose`: with it the guest command's own output is lost (seen with virtme-ng 1.42).
        let mut text = format!("set -e\necho {BOOT_MARKER}\n");
        for (k, v) in [("BERTH_IN_VM", "1"), ("BERTH_HOST_KERNEL", host_kernel.as_str())]
            .into_iter()
            .chain(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        {
            text.push_str(&format!("export {k}={}\n", shell_quote(v)));
        }
        if self.network {
            // virtme-ng's own DHCP races the NIC's probe and sometimes configures nothing (seen: the NIC stayed
            // down). qemu's user network is fixed (guest 10.0.2.15/24, host 10.0.2.2), so configure it statically
            // once the NIC exists.
            text.push_str(concat!(
                "nic=; for _ in $(seq 300); do nic=$(ls /sys/class/net | grep -vx lo | head -n 1); ",
                "[ -n \"$nic\" ] && break; sleep 0.1; done\n",
                "[ -n \"$nic\" ] || { echo 'vm: no network interface after 30 s' >&2; exit 90; }\n",
                "ip link set \"$nic\" up && ip addr add 10.0.2.15/24 dev \"$nic\" && ip route add default via 10.0.2.2 ",
                "|| { echo \"vm: cannot configure $nic\" >&2; exit 90; }\n",
            ));
        }
        text.push_str("set +e\n");
        text.push_str(command);
        text.push('\n');
        std::fs::write(&script, text)?;

        let mut cmd = Command::new("vng");
        cmd.args(["--disable-kvm", "--force-9p", "--run"])
            .arg(&self.kernel)
            .args(["--memory", &self.memory, "--cpus", &self.cpus.to_string()])
            .arg("--cwd")
            .arg(repo_root())
            .current_dir(run_dir.path());
        for disk in &self.disks {
            cmd.arg("--disk").arg(disk.file_name().unwrap_or_default());
        }
        for dir in &self.rwdirs {
            cmd.arg(format!("--rwdir={}", dir.display()));
        }
        if self.network && self.forwards.is_empty() {
            cmd.args(["--network", "user", "--no-dhcp"]);
        } else if self.network {
            // vng's own user network has no port forwards: the same NIC made by hand (virtio-net-pci: TCG never
            // gets the microvm machine), configured by the script like vng's.
            let forwards: String =
                self.forwards.iter().map(|(h, g)| format!(",hostfwd=tcp:127.0.0.1:{h}-:{g}")).collect();
            // `--qemu-opts=…` in one argument: its value starts with '-'.
            cmd.arg(format!("--qemu-opts=-device virtio-net-pci,netdev=berthnet -netdev user,id=berthnet{forwards}"));
        }
        cmd.arg("--exec").arg(format!("bash {}", script.display()));
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // Its own process group, so that a kill reaches qemu too (vng runs it as a child); and killed with the
        // thread that started it if the test process dies without unwinding.
        cmd.process_group(0);
        die_with_spawning_thread(&mut cmd);
        let mut child = cmd.spawn().context("starting vng (PyPI package virtme-ng; .ci/run installs it)")?;
        let output = Arc::new(Mutex::new(String::new()));
        let (booted_tx, booted) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let readers = vec![
            stream(BufReader::new(stdout), output.clone(), Some(booted_tx)),
            stream(BufReader::new(stderr), output.clone(), None),
        ];
        Ok(RunningVm { child, output, booted, readers, _run_dir: run_dir, started: Instant::now() })
    }
}

/// How long a boot may take to reach the guest command: 25–60 s is usual under TCG.
pub const BOOT_DEADLINE: Duration = Duration::from_secs(240);
const BOOT_MARKER: &str = "berth-vm: the guest command starts";
/// What a guest command prints, on a line of its own, when it is ready for [`RunningVm::power_cut`]; after it the
/// guest must sync nothing.
pub const CUT_THE_POWER: &str = "berth-vm: cut the power now";

/// A guest started by [`Vm::spawn`] (or being run by [`Vm::run`]): killed, with qemu, on drop.
pub struct RunningVm {
    child: Child,
    output: Arc<Mutex<String>>,
    booted: mpsc::Receiver<()>,
    readers: Vec<std::thread::JoinHandle<()>>,
    _run_dir: tempfile::TempDir,
    started: Instant,
}

impl RunningVm {
    /// Everything the guest and qemu printed so far, console included.
    pub fn output(&self) -> String {
        self.output.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The last `lines` lines of [`RunningVm::output`].
    pub fn output_tail(&self, lines: usize) -> String {
        tail(&self.output(), lines)
    }

    /// Whether the guest is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the guest (qemu and vng) and waits for it.
    pub fn stop(mut self) {
        self.kill();
    }

    /// Cuts the guest's power: SIGKILL to qemu (in the process group of vng, which forks and execs it), so that
    /// nothing is flushed and nothing shut down. The guest loses what it had not written to its virtual disks yet
    /// (its page cache, journal transactions not committed); what it had written is in the host's page cache (the
    /// disks are qemu's default `cache=writeback`) and stays, as on a disk without a volatile write cache. Fails
    /// (the guest killed all the same) when no qemu process was in the group, or one outlived the signal.
    pub fn power_cut(mut self) -> Result<()> {
        let group = self.child.id() as libc::pid_t;
        let qemu: Vec<libc::pid_t> = processes_in_group(group)
            .into_iter()
            .filter(|(_, comm)| comm.starts_with("qemu-system"))
            .map(|(pid, _)| pid)
            .collect();
        self.kill();
        if qemu.is_empty() {
            bail!("no qemu process in the guest's process group {group}: the power cut would not be one");
        }
        let until = Instant::now() + Duration::from_secs(10);
        while let Some(pid) = qemu.iter().find(|&&pid| is_alive(pid)) {
            if Instant::now() > until {
                bail!("qemu (pid {pid}) still runs 10 s after SIGKILL");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn wait_for_boot(&mut self, deadline: Duration) -> Result<bool> {
        match self.booted.recv_timeout(deadline) {
            Ok(()) => Ok(true),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(false),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.wait()?;
                bail!("the guest exited ({status}) before its command started; console:\n{}", self.output_tail(60))
            }
        }
    }

    /// Waits for the guest command's exit status, killing the guest once `deadline` has passed.
    fn wait(&mut self, deadline: Duration) -> Result<i32> {
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait()? {
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                let Some(code) = status.code() else { bail!("vng was killed ({status})") };
                return Ok(code);
            }
            if Instant::now() > until {
                self.kill();
                bail!(
                    "the guest command did not finish within {:?} of its boot and was killed; its output ended with:\n{}",
                    self.started.elapsed(),
                    self.output_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn kill(&mut self) {
        // SAFETY: kill(2) on the process group of our own child, which is not yet reaped.
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// Collects the lines of `reader` into `all`. Lines before the boot marker are the console (kept, not printed);
/// from the marker on they are printed with a `[vm]` prefix, and `booted` hears of the marker.
fn stream(
    reader: impl BufRead + Send + 'static,
    all: Arc<Mutex<String>>,
    booted: Option<mpsc::Sender<()>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut printing = booted.is_none();
        for line in reader.split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line).replace('\r', "");
            if !printing && line.contains(BOOT_MARKER) {
                printing = true;
                if let Some(tx) = &booted {
                    let _ = tx.send(());
                }
            } else if printing {
                println!("[vm] {line}");
            }
            let mut all = all.lock().unwrap_or_else(|p| p.into_inner());
            all.push_str(&line);
            all.push('\n');
        }
    })
}

/// The processes of process group `group`: (pid, command name), from /proc.
fn processes_in_group(group: libc::pid_t) -> Vec<(libc::pid_t, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return vec![] };
    dir.flatten()
        .filter_map(|e| {
            let pid: libc::pid_t = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid pgrp …`: the name may hold spaces and parentheses, so split at the last ')'.
            let (head, rest) = stat.rsplit_once(')')?;
            let comm = head.split_once('(')?.1.to_owned();
            let pgrp: libc::pid_t = rest.split_whitespace().nth(2)?.parse().ok()?;
            (pgrp == group).then_some((pid, comm))
        })
        .collect()
}

/// Whether process `pid` exists and is not a zombie.
fn is_alive(pid: libc::pid_t) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next().map(|s| s != "Z")))
        .unwrap_or(false)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn newest_kernel() -> Result<PathBuf> {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .context("/boot")?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .collect();
    kernels.sort();
    kernels.pop().context("no /boot/vmlinuz-*: install the Debian package linux-image-amd64")
}

/// Inside the guest: the block device of the disk image named `image_name` (its virtio serial).
pub fn guest_disk(image_name: &str) -> Result<PathBuf> {
    for entry in std::fs::read_dir("/sys/block")?.flatten() {
        let serial = std::fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
        if serial.trim() == image_name {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    bail!("no disk with serial {image_name:?} in /sys/block")
}
