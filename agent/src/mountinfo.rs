//! The kernel's mount tables, as `/proc/<pid>/mountinfo` shows them (proc(5)): what is mounted where, and from
//! which directory of which filesystem. Pure parsing and lookups; reading the files is the callers' business.
//!
//! A line: `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw`. The third field is the filesystem's
//! device (`major:minor`), the fourth the directory of that filesystem the mount shows (its *root*: `/` for a
//! whole filesystem, the source's path inside it for a bind mount), the fifth where it is mounted, relative to the
//! root directory of the process whose table it is. Paths are octal-escaped (`\040` for a space).

use std::path::Path;

/// A device number, `(major, minor)`.
pub type Device = (u32, u32);

/// One mount of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub device: Device,
    /// The directory of the filesystem this mount shows, from the filesystem's own root.
    pub root: String,
    /// Where it is mounted.
    pub mount_point: String,
}

/// The mounts of a mountinfo text, in its order (a mount stacked on another comes after it). Lines that do not
/// parse are skipped: the kernel writes every line the same way, so such a line is no mount.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let device = fields.nth(2)?.split_once(':')?;
            let device = (device.0.parse().ok()?, device.1.parse().ok()?);
            let root = unescape(fields.next()?);
            let mount_point = unescape(fields.next()?);
            Some(Mount { device, root, mount_point })
        })
        .collect()
}

/// Undoes the kernel's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `path` relative to `base` when it is `base` or inside it, component by component (`/a/b` is not inside `/a/bc`).
pub fn within<'a>(path: &'a str, base: &str) -> Option<&'a str> {
    if base == "/" {
        return path.strip_prefix('/');
    }
    match path.strip_prefix(base)? {
        "" => Some(""),
        rest => rest.strip_prefix('/'),
    }
}

/// `base` and `rel` joined with one `/`.
fn join(base: &str, rel: &str) -> String {
    match (base.trim_end_matches('/'), rel) {
        ("", "") => "/".to_owned(),
        (b, "") => b.to_owned(),
        (b, r) => format!("{b}/{r}"),
    }
}

/// Where the directory `path` (absolute, no symlinks) lies according to the table `mounts`: the device of the
/// filesystem holding it and its path from that filesystem's root. The mount whose mount point holds `path` most
/// closely decides; of mounts stacked on one point, the last (the one on top).
pub fn locate(mounts: &[Mount], path: &Path) -> Option<(Device, String)> {
    let path = path.to_str()?;
    let (mount, rel) = mounts.iter().filter_map(|m| within(path, &m.mount_point).map(|rel| (m, rel))).fold(
        None::<(&Mount, &str)>,
        |best, (m, rel)| match best {
            Some((b, _)) if b.mount_point.len() > m.mount_point.len() => best,
            _ => Some((m, rel)),
        },
    )?;
    Some((mount.device, join(&mount.root, rel)))
}

/// The device mounted at `target`, the topmost mount if several are stacked there.
pub fn mounted_at(mounts: &[Mount], target: &Path) -> Option<Device> {
    let target = target.to_str()?;
    mounts.iter().rfind(|m| m.mount_point == target).map(|m| m.device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node whose pool disk (8:16) is mounted at /var/lib/berth/pools/fast, a second pool on the root
    /// filesystem (8:1), and kubelet's bind mounts of two volumes into pods (one with a space in its pod path).
    const HOST: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 8:16 / /var/lib/berth/pools/fast rw,relatime shared:20 - xfs /dev/sdb rw,prjquota
51 22 8:16 /pvc-a/data /var/lib/kubelet/pods/u1/volumes/kubernetes.io~local-volume/pvc-a rw shared:20 - xfs /dev/sdb rw
52 22 8:1 /var/lib/berth/pools/local/pvc-b/data /var/lib/kubelet/pods/u\\0402/volumes/pvc-b rw shared:1 - ext4 /dev/sda1 rw
";

    #[test]
    fn lines_give_device_root_and_mount_point_unescaped() {
        let mounts = parse(HOST);
        assert_eq!(mounts.len(), 4);
        assert_eq!(
            mounts[2],
            Mount {
                device: (8, 16),
                root: "/pvc-a/data".into(),
                mount_point: "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~local-volume/pvc-a".into()
            }
        );
        assert_eq!(mounts[3].mount_point, "/var/lib/kubelet/pods/u 2/volumes/pvc-b");
        assert_eq!(unescape(r"a\134b\011c\12"), "a\\b\tc\\12", "a short escape is no escape");
        assert!(parse("garbage\n\n1 2 x:y / /\n").is_empty());
    }

    #[test]
    fn a_directory_is_located_in_its_filesystem() {
        let mounts = parse(HOST);
        let at = |p: &str| locate(&mounts, Path::new(p));
        assert_eq!(at("/var/lib/berth/pools/fast/pvc-a"), Some(((8, 16), "/pvc-a".into())));
        assert_eq!(at("/var/lib/berth/pools/fast"), Some(((8, 16), "/".into())));
        assert_eq!(
            at("/var/lib/berth/pools/fastest/pvc-c"),
            Some(((8, 1), "/var/lib/berth/pools/fastest/pvc-c".into()))
        );
        // The agent in a pod: the pools directory of the host's root filesystem is a hostPath mount, whose root is
        // that directory.
        let pod = parse(
            "900 800 0:50 / / rw - overlay overlay rw\n901 900 8:1 /var/lib/berth/pools /var/lib/berth/pools rw - ext4 /dev/sda1 rw\n",
        );
        assert_eq!(
            locate(&pod, Path::new("/var/lib/berth/pools/local/pvc-b")),
            Some(((8, 1), "/var/lib/berth/pools/local/pvc-b".into()))
        );
    }

    #[test]
    fn the_topmost_mount_at_a_point_counts() {
        let info = "22 1 0:21 / /var/lib/berth rw shared:1 - tmpfs tmpfs rw\n\
                    40 22 253:3 / /var/lib/berth/lvm/pvc-a rw,noatime shared:5 - xfs /dev/mapper/vg-berth--pvc--a rw\n\
                    41 40 253:7 / /var/lib/berth/lvm/pvc-a rw shared:6 - ext4 /dev/mapper/x rw\n";
        let mounts = parse(info);
        assert_eq!(mounted_at(&mounts, Path::new("/var/lib/berth/lvm/pvc-a")), Some((253, 7)));
        assert_eq!(mounted_at(&mounts, Path::new("/var/lib/berth/lvm/pvc-b")), None);
        assert_eq!(locate(&mounts, Path::new("/var/lib/berth/lvm/pvc-a/data")), Some(((253, 7), "/data".into())));
    }

    #[test]
    fn within_goes_by_whole_components() {
        assert_eq!(within("/a/b/c", "/a/b"), Some("c"));
        assert_eq!(within("/a/b", "/a/b"), Some(""));
        assert_eq!(within("/a/bc", "/a/b"), None);
        assert_eq!(within("/a", "/"), Some("a"));
        assert_eq!(join("/", ""), "/");
        assert_eq!(join("/", "x/y"), "/x/y");
        assert_eq!(join("/r", "x"), "/r/x");
    }
}
