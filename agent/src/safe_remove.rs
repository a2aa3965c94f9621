//! Removing a volume's directory tree without ever acting outside it: entries are opened relative to their parent
//! directory (`openat`/`unlinkat`, never by path), symlinks are removed, not followed, and nothing on another
//! mount (a filesystem mounted inside the volume, or a bind mount) is entered or removed.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, CWD, Dir, FileType, Mode, OFlags, StatxFlags};
use rustix::io::Errno;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RemoveError {
    #[error("{path} is on another mount; refusing to remove anything there")]
    OtherMount { path: String },
    #[error("{path}: {errno}")]
    Io { path: String, errno: Errno },
}

fn io(path: &str) -> impl Fn(Errno) -> RemoveError + '_ {
    move |errno| RemoveError::Io { path: path.to_owned(), errno }
}

/// The mount a name (not followed if a symlink) lives on, and whether it is a directory.
fn probe(dir: impl AsFd, name: &CStr, path: &str) -> Result<(u64, bool), RemoveError> {
    let st = rustix::fs::statx(dir, name, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::TYPE | StatxFlags::MNT_ID)
        .map_err(io(path))?;
    // Without a mount id from the kernel (Linux < 5.8) mounts could not be told apart: refuse rather than guess.
    if !StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::MNT_ID) {
        return Err(RemoveError::Io { path: format!("{path} (statx gave no mount id)"), errno: Errno::NOSYS });
    }
    let is_dir = FileType::from_raw_mode(st.stx_mode.into()) == FileType::Directory;
    Ok((st.stx_mnt_id, is_dir))
}

fn open_dir(dir: impl AsFd, name: &CStr, path: &str) -> Result<OwnedFd, RemoveError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::openat(dir, name, flags, Mode::empty()).map_err(io(path))
}

fn entries(fd: &OwnedFd, path: &str) -> Result<Vec<CString>, RemoveError> {
    let mut names = Vec::new();
    for entry in Dir::read_from(fd).map_err(io(path))? {
        let entry = entry.map_err(io(path))?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

struct Frame {
    fd: OwnedFd,
    name: CString,
    path: String,
    pending: Vec<CString>,
}

/// Removes `path` and everything below it, on `path`'s own mount only. A missing `path` is success.
/// Iterative (no recursion), so a deep tree made by a pod cannot overflow the agent's stack.
pub fn remove_tree(path: &Path) -> Result<(), RemoveError> {
    let shown = path.display().to_string();
    let parent = path.parent().unwrap_or(Path::new("/"));
    let name = CString::new(path.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default())
        .map_err(|_| io(&shown)(Errno::INVAL))?;
    let parent_fd = open_dir(CWD, &CString::new(parent.as_os_str().as_encoded_bytes()).unwrap_or_default(), &shown)?;
    let (mount, is_dir) = match probe(&parent_fd, &name, &shown) {
        Err(RemoveError::Io { errno: Errno::NOENT, .. }) => return Ok(()),
        other => other?,
    };
    // The top itself may be a mount point (something mounted onto the volume directory): never enter it.
    let (parent_mount, _) = probe(&parent_fd, c".", &shown)?;
    if mount != parent_mount {
        return Err(RemoveError::OtherMount { path: shown });
    }
    if !is_dir {
        return rustix::fs::unlinkat(&parent_fd, &name, AtFlags::empty()).map_err(io(&shown));
    }
    let fd = open_dir(&parent_fd, &name, &shown)?;
    let pending = entries(&fd, &shown)?;
    let mut stack = vec![Frame { fd, name, path: shown, pending }];
    while let Some(top) = stack.last_mut() {
        let Some(child) = top.pending.pop() else {
            let done = stack.pop().expect("non-empty");
            let parent: &OwnedFd = stack.last().map_or(&parent_fd, |f| &f.fd);
            rustix::fs::unlinkat(parent, &done.name, AtFlags::REMOVEDIR).map_err(io(&done.path))?;
            continue;
        };
        let child_path = format!("{}/{}", top.path, child.to_string_lossy());
        let (child_mount, child_is_dir) = match probe(&top.fd, &child, &child_path) {
            Err(RemoveError::Io { errno: Errno::NOENT, .. }) => continue, // gone meanwhile
            other => other?,
        };
        if child_mount != mount {
            return Err(RemoveError::OtherMount { path: child_path });
        }
        if child_is_dir {
            let fd = open_dir(&top.fd, &child, &child_path)?;
            let pending = entries(&fd, &child_path)?;
            stack.push(Frame { fd, name: child, path: child_path, pending });
        } else {
            rustix::fs::unlinkat(&top.fd, &child, AtFlags::empty()).map_err(io(&child_path))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn removes_a_tree_and_only_unlinks_symlinks() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("precious"), "keep me").unwrap();
        let base = tempfile::tempdir().unwrap();
        let vol = base.path().join("vol");
        std::fs::create_dir_all(vol.join("a/b/c")).unwrap();
        std::fs::write(vol.join("a/b/c/file"), "x").unwrap();
        symlink(outside.path(), vol.join("a/escape-dir")).unwrap();
        symlink(outside.path().join("precious"), vol.join("escape-file")).unwrap();
        remove_tree(&vol).unwrap();
        assert!(!vol.exists());
        assert_eq!(std::fs::read_to_string(outside.path().join("precious")).unwrap(), "keep me");
    }

    #[test]
    fn the_top_itself_being_a_symlink_is_only_unlinked() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("precious"), "keep me").unwrap();
        let base = tempfile::tempdir().unwrap();
        symlink(outside.path(), base.path().join("vol")).unwrap();
        remove_tree(&base.path().join("vol")).unwrap();
        assert!(outside.path().join("precious").exists());
        assert!(!base.path().join("vol").exists());
    }

    #[test]
    fn missing_is_success_and_deep_trees_do_not_recurse() {
        let base = tempfile::tempdir().unwrap();
        remove_tree(&base.path().join("nothing")).unwrap();
        let vol = base.path().join("deep");
        let mut p = vol.clone();
        std::fs::create_dir(&p).unwrap();
        // Deeper than any path a single syscall could name.
        for _ in 0..600 {
            p.push("dddddddddd");
            rustix::fs::mkdirat(CWD, &p, Mode::RWXU).ok();
            if !p.exists() {
                break;
            }
        }
        remove_tree(&vol).unwrap();
        assert!(!vol.exists());
    }

    #[test]
    fn stops_at_a_mount_inside_the_tree() {
        if std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap_or(1) != 0 {
            panic!("this test mounts a tmpfs and needs root (CI runs as root)");
        }
        let base = tempfile::tempdir().unwrap();
        let vol = base.path().join("vol");
        let mnt = vol.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let status = std::process::Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(&mnt).status().unwrap();
        assert!(status.success());
        std::fs::write(mnt.join("other-fs-file"), "keep").unwrap();
        let err = remove_tree(&vol).unwrap_err();
        let kept = mnt.join("other-fs-file").exists();
        std::process::Command::new("umount").arg(&mnt).status().unwrap();
        assert!(matches!(err, RemoveError::OtherMount { .. }), "{err}");
        assert!(kept, "a file on the mounted filesystem was removed");
    }
}
