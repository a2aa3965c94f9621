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
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bins::repo_root;

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

    /// Boots, runs `command` (a bash command line) as root in the guest, streams its output to stdout with a
    /// `[vm]` prefix, and returns its exit status. The guest also gets `BERTH_IN_VM=1` and
    /// `BERTH_HOST_KERNEL=<the host's kernel release>`.
    pub fn run(&self, command: &str) -> Result<VmRun> {
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
        let mut text = String::from("set -e\n");
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
        let started = Instant::now();
        let mut child = cmd.spawn().context("starting vng (PyPI package virtme-ng; .ci/run installs it)")?;
        let stderr = child.stderr.take().expect("piped");
        let err_thread = std::thread::spawn(move || stream(BufReader::new(stderr)));
        let mut output = stream(BufReader::new(child.stdout.take().expect("piped")));
        output.push_str(&err_thread.join().unwrap_or_default());
        let status = child.wait()?;
        let Some(code) = status.code() else { bail!("vng was killed ({status})") };
        Ok(VmRun { status: code, output, elapsed: started.elapsed() })
    }
}

fn stream(reader: impl BufRead) -> String {
    let mut all = String::new();
    for line in reader.split(b'\n').map_while(Result::ok) {
        let line = String::from_utf8_lossy(&line).replace('\r', "");
        println!("[vm] {line}");
        all.push_str(&line);
        all.push('\n');
    }
    all
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
