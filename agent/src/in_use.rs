//! Whether a volume is in use, decided before anything destructive is done to it (a delete, the removal of what a
//! delete left): a volume some pod still has must not be zeroed, emptied or removed under it. The delete is then
//! refused (`InUse`) and changes nothing; the controller retries until the pod is gone.
//!
//! `umount` alone proves nothing: a filesystem lives on while any mount of it does, and kubelet bind-mounts a
//! volume's directory into each pod that uses it. So:
//! - **Directory volumes**: the host's mount table (`/proc/1/mountinfo` of the host, which the agent reads
//!   through `--host-proc`) must have no mount of the volume's directory or of anything inside it (compared by
//!   device and path within the filesystem, as the kernel records a bind mount's source), and nothing mounted
//!   inside it ([`directory_holders`]).
//! - **Logical volumes**: the device-mapper device's open count must be 0 ([`device_held`]). Every mount of a
//!   filesystem shares one superblock, which holds the device open once however many mounts it has, so the agent
//!   first unmounts its own mount; if the device is still open, something else (a pod's bind mount, kubelet's loop
//!   device of a raw block volume, a process) has it, and the agent mounts it back.

use std::path::{Path, PathBuf};

use crate::mountinfo::{self, Device, Mount, within};

/// Where the agent reads mount tables: its own (`/proc/self/mountinfo`, where the pools are as the agent sees
/// them), and the host's, whose mounts are kubelet's (`<host proc>/1/mountinfo`: the table of the host's init,
/// which is kubelet's mount namespace; in a pod the host's /proc is mounted read-only at `--host-proc`).
#[derive(Debug, Clone)]
pub struct MountTables {
    host_proc: PathBuf,
}

impl MountTables {
    pub fn new(host_proc: &Path) -> MountTables {
        MountTables { host_proc: host_proc.to_owned() }
    }

    pub fn host_table(&self) -> PathBuf {
        self.host_proc.join("1/mountinfo")
    }

    /// The host's mounts; an error says where the table was looked for and what provides it.
    pub fn host(&self) -> Result<Vec<Mount>, String> {
        let path = self.host_table();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "cannot read the host's mount table {} ({e}): the agent needs the host's /proc to tell whether a \
                 volume is in use (deploy/agent mounts it read-only at /host/proc; the agent's --host-proc)",
                path.display()
            )
        })?;
        Ok(mountinfo::parse(&text))
    }

    /// The agent's own mounts.
    pub fn own(&self) -> Result<Vec<Mount>, String> {
        let text = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        Ok(mountinfo::parse(&text))
    }
}

/// The mounts of the host's table `host` that keep the directory `dir` in use: a mount showing it or anything
/// below it (kubelet's bind mount of a volume's `data/` into a pod, a subPath), and a mount on anything inside it
/// (a pod's mount propagated back). `dir` is the directory's path on the host, `at` its device and path within
/// its filesystem (see [`crate::mountinfo::locate`]).
pub fn directory_holders<'a>(host: &'a [Mount], dir: &Path, at: &(Device, String)) -> Vec<&'a Mount> {
    let (device, root) = at;
    let dir = dir.to_str().unwrap_or_default();
    host.iter()
        .filter(|m| {
            let shows_it = m.device == *device && within(&m.root, root).is_some();
            let mounted_inside = !dir.is_empty() && within(&m.mount_point, dir).is_some();
            shows_it || mounted_inside
        })
        .collect()
}

/// What a refusal says of the holders of `what`: where each is mounted.
pub fn describe_holders(what: &str, holders: &[&Mount]) -> String {
    const SHOWN: usize = 3;
    let mut points: Vec<&str> = holders.iter().take(SHOWN).map(|m| m.mount_point.as_str()).collect();
    let more = holders.len().saturating_sub(SHOWN);
    let more = if more > 0 { format!(" and {more} more") } else { String::new() };
    points.sort_unstable();
    format!(
        "{what} is in use: mounted at {}{more} (a pod still has it); nothing was changed, delete it again once it is unmounted",
        points.join(", ")
    )
}

/// Whether a logical volume's device is held open, from lvm2's report of it: `lv_device_open` (`open` when the
/// kernel's open count is above 0, empty when it is 0, `unknown` when there is no device-mapper device, i.e. the
/// LV is not active) and whether it is active. An active LV whose count lvm2 could not tell counts as held.
pub fn device_held(device_open: &str, active: bool) -> bool {
    match device_open {
        "open" => true,
        "" => false,
        _ => active,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mountinfo::{locate, parse};

    const VOLUME: &str = "/var/lib/berth/pools/fast/pvc-a";

    /// The pool disk 8:16 at /var/lib/berth/pools/fast, with `extra` lines.
    fn host(extra: &str) -> Vec<Mount> {
        parse(&format!(
            "22 1 8:1 / / rw shared:1 - ext4 /dev/sda1 rw\n\
             40 22 8:16 / /var/lib/berth/pools/fast rw shared:20 - xfs /dev/sdb rw\n{extra}"
        ))
    }

    fn holders_of(table: &[Mount], volume: &str) -> Vec<String> {
        let at = locate(table, Path::new(volume)).unwrap();
        directory_holders(table, Path::new(volume), &at).iter().map(|m| m.mount_point.clone()).collect()
    }

    #[test]
    fn a_volume_nobody_mounts_is_free() {
        assert!(holders_of(&host(""), VOLUME).is_empty(), "the pool's own mount does not hold its volumes");
    }

    #[test]
    fn kubelets_bind_mount_of_the_volume_holds_it() {
        let pod = "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~local-volume/pvc-a";
        let table = host(&format!("51 22 8:16 /pvc-a/data {pod} rw shared:20 - xfs /dev/sdb rw\n"));
        assert_eq!(holders_of(&table, VOLUME), [pod]);
        // Another volume of the same pool, even one whose name starts the same, is not held by it.
        assert!(holders_of(&table, "/var/lib/berth/pools/fast/pvc-b").is_empty());
        let near = host(&format!("51 22 8:16 /pvc-a0/data {pod} rw shared:20 - xfs /dev/sdb rw\n"));
        assert!(holders_of(&near, VOLUME).is_empty());
        // The same path on another filesystem is another directory.
        let other = host(&format!("51 22 8:32 /pvc-a/data {pod} rw - xfs /dev/sdc rw\n"));
        assert!(holders_of(&other, VOLUME).is_empty());
    }

    #[test]
    fn a_bind_of_the_volume_itself_or_a_subpath_holds_it() {
        let table = host(
            "51 22 8:16 /pvc-a /mnt/whole rw - xfs /dev/sdb rw\n\
             52 22 8:16 /pvc-a/data/logs/app /var/lib/kubelet/pods/u2/volume-subpaths/pvc-a/c/0 rw - xfs /dev/sdb rw\n",
        );
        assert_eq!(holders_of(&table, VOLUME), ["/mnt/whole", "/var/lib/kubelet/pods/u2/volume-subpaths/pvc-a/c/0"]);
    }

    #[test]
    fn something_mounted_inside_the_volume_holds_it() {
        let table = host("60 40 0:70 / /var/lib/berth/pools/fast/pvc-a/data/mnt rw - tmpfs tmpfs rw\n");
        assert_eq!(holders_of(&table, VOLUME), ["/var/lib/berth/pools/fast/pvc-a/data/mnt"]);
    }

    #[test]
    fn a_pool_on_the_root_filesystem_is_compared_by_its_path_there() {
        // The agent in a pod sees the pools through a hostPath mount; the host's table shows kubelet's bind with
        // the directory's path on the root filesystem.
        let own = parse("901 900 8:1 /var/lib/berth/pools /var/lib/berth/pools rw - ext4 /dev/sda1 rw\n");
        let volume = Path::new("/var/lib/berth/pools/local/pvc-b");
        let at = locate(&own, volume).unwrap();
        let table = host(
            "52 22 8:1 /var/lib/berth/pools/local/pvc-b/data /var/lib/kubelet/pods/u3/volumes/pvc-b rw - ext4 /dev/sda1 rw\n",
        );
        let held: Vec<&str> = directory_holders(&table, volume, &at).iter().map(|m| m.mount_point.as_str()).collect();
        assert_eq!(held, ["/var/lib/kubelet/pods/u3/volumes/pvc-b"]);
    }

    #[test]
    fn the_refusal_names_where_it_is_mounted() {
        let table = host("51 22 8:16 /pvc-a/data /var/lib/kubelet/pods/u1/volumes/pvc-a rw - xfs /dev/sdb rw\n");
        let at = locate(&table, Path::new(VOLUME)).unwrap();
        let message = describe_holders("volume pvc-a", &directory_holders(&table, Path::new(VOLUME), &at));
        assert!(
            message.starts_with("volume pvc-a is in use: mounted at /var/lib/kubelet/pods/u1/volumes/pvc-a"),
            "{message}"
        );
    }

    #[test]
    fn an_open_device_is_held_and_an_unknown_count_of_an_active_one_too() {
        assert!(device_held("open", true));
        assert!(!device_held("", true));
        // Not active: no device-mapper device, nothing can hold it.
        assert!(!device_held("unknown", false));
        assert!(device_held("unknown", true));
    }
}
