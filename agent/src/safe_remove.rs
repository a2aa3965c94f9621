//! Removing a volume's directory tree without ever acting outside it: entries are opened relative to their parent
//! directory (`openat`/`unlinkat`, never by path), symlinks are removed, not followed, and nothing on another
//! mount (a filesystem mounted inside the volume, or a bind mount) is entered or removed.
//!
//! The tree is a pod's to shape, so the walk's cost must not grow with it: memory and descriptors are bounded
//! whatever the depth and width. One directory is open at a time (two while stepping up or down); each is read in
//! a fixed buffer as a stream, never listed whole; going back up is `openat(dir, "..")`, so no path or name is kept
//! per level — only a resume position for the first [`REMEMBERED_LEVELS`] levels (8 bytes each). An empty child
//! is removed by one `rmdir`; a child that is not empty is entered, and once emptied the walk returns to the
//! parent and meets it again, now removable. Deeper than the remembered levels the parent is rescanned from its
//! start, which costs little: everything the scan passed before is gone by then.

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags, RawDir, SeekFrom, StatxFlags};
use rustix::io::Errno;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RemoveError {
    #[error("{path} is on another mount; refusing to remove anything there")]
    OtherMount { path: String },
    #[error("{path}: {errno}")]
    Io { path: String, errno: Errno },
    #[error("{path}: the tree was moved while it was being removed (its top is no longer where the walk began)")]
    Moved { path: String },
}

/// The directory-reading buffer: one `getdents64` fills it with hundreds of entries.
const BUFFER_BYTES: usize = 32 * 1024;
/// Levels whose resume position is kept (32 KiB of positions); deeper levels are rescanned from their start.
pub const REMEMBERED_LEVELS: usize = 4096;
/// Passes over the whole tree before giving up on a top that stays non-empty (something keeps writing into it,
/// or a filesystem whose resume positions shift as entries go, such as tmpfs on older kernels).
const PASSES: usize = 3;

fn io(path: &str) -> impl Fn(Errno) -> RemoveError + '_ {
    move |errno| RemoveError::Io { path: path.to_owned(), errno }
}

/// The mount a name (not followed if a symlink) lives on, and whether it is a directory. An empty `name` with
/// `AtFlags::EMPTY_PATH` asks about `dir` itself.
fn probe_at(dir: impl AsFd, name: &CStr, flags: AtFlags, path: &str) -> Result<(u64, bool), RemoveError> {
    let st = rustix::fs::statx(dir, name, AtFlags::SYMLINK_NOFOLLOW | flags, StatxFlags::TYPE | StatxFlags::MNT_ID)
        .map_err(io(path))?;
    // Without a mount id from the kernel (Linux < 5.8) mounts could not be told apart: refuse rather than guess.
    if !StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::MNT_ID) {
        return Err(RemoveError::Io { path: format!("{path} (statx gave no mount id)"), errno: Errno::NOSYS });
    }
    let is_dir = FileType::from_raw_mode(st.stx_mode.into()) == FileType::Directory;
    Ok((st.stx_mnt_id, is_dir))
}

fn probe(dir: impl AsFd, name: &CStr, path: &str) -> Result<(u64, bool), RemoveError> {
    probe_at(dir, name, AtFlags::empty(), path)
}

fn mount_of(dir: impl AsFd, path: &str) -> Result<u64, RemoveError> {
    probe_at(dir, c"", AtFlags::EMPTY_PATH, path).map(|(mount, _)| mount)
}

fn open_dir(dir: impl AsFd, name: &CStr, path: &str) -> Result<OwnedFd, RemoveError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::openat(dir, name, flags, Mode::empty()).map_err(io(path))
}

fn identity(dir: impl AsFd, path: &str) -> Result<(u64, u64), RemoveError> {
    let st = rustix::fs::fstat(dir).map_err(io(path))?;
    Ok((st.st_dev, st.st_ino))
}

/// Removes `path` and everything below it, on `path`'s own mount only. A missing `path` is success.
/// Iterative (no recursion), so a deep tree made by a pod cannot overflow the agent's stack.
pub fn remove_tree(path: &Path) -> Result<(), RemoveError> {
    let shown = path.display().to_string();
    let parent = path.parent().unwrap_or(Path::new("/"));
    let name = std::ffi::CString::new(path.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default())
        .map_err(|_| io(&shown)(Errno::INVAL))?;
    let parent_path = std::ffi::CString::new(parent.as_os_str().as_encoded_bytes()).unwrap_or_default();
    let parent_fd = open_dir(CWD, &parent_path, &shown)?;
    let (mount, is_dir) = match probe(&parent_fd, &name, &shown) {
        Err(RemoveError::Io { errno: Errno::NOENT, .. }) => return Ok(()),
        other => other?,
    };
    // The top itself may be a mount point (something mounted onto the volume directory): never enter it.
    if mount != mount_of(&parent_fd, &shown)? {
        return Err(RemoveError::OtherMount { path: shown });
    }
    if !is_dir {
        return rustix::fs::unlinkat(&parent_fd, &name, AtFlags::empty()).map_err(io(&shown));
    }
    let mut walk = Walk {
        mount,
        top: (0, 0),
        shown: &shown,
        buffer: vec![MaybeUninit::uninit(); BUFFER_BYTES],
        resume: Vec::new(),
    };
    for pass in 1..=PASSES {
        let top = match open_dir(&parent_fd, &name, &shown) {
            Err(RemoveError::Io { errno: Errno::NOENT, .. }) => return Ok(()),
            other => other?,
        };
        if mount_of(&top, &shown)? != mount {
            return Err(RemoveError::OtherMount { path: shown });
        }
        walk.top = identity(&top, &shown)?;
        walk.empty(top)?;
        match rustix::fs::unlinkat(&parent_fd, &name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(Errno::NOENT) => return Ok(()),
            Err(Errno::NOTEMPTY | Errno::EXIST) if pass < PASSES => {
                tracing::debug!(path = %shown, pass, "not empty after a pass; another pass");
            }
            Err(e) => return Err(io(&shown)(e)),
        }
    }
    unreachable!("the last pass returns")
}

/// What one scan of a directory found.
enum Scan {
    /// Every entry is gone (as far as this scan saw).
    Done,
    /// `child` is a non-empty directory on the same mount, met at resume position `at` of the scanned one.
    Descend { child: OwnedFd, at: u64 },
}

struct Walk<'a> {
    /// The mount everything removed must be on.
    mount: u64,
    /// Device and inode of the tree's top, to recognise it when the walk comes back up.
    top: (u64, u64),
    shown: &'a str,
    buffer: Vec<MaybeUninit<u8>>,
    /// `resume[d]`: where to continue scanning the directory at depth `d` when the walk returns to it.
    resume: Vec<u64>,
}

impl Walk<'_> {
    /// Removes everything below `top` (which is left, empty).
    fn empty(&mut self, top: OwnedFd) -> Result<(), RemoveError> {
        let (mut dir, mut depth, mut from) = (top, 0usize, 0u64);
        loop {
            match self.scan(&dir, depth, from)? {
                Scan::Descend { child, at } => {
                    if depth < REMEMBERED_LEVELS {
                        self.resume.truncate(depth);
                        self.resume.push(at);
                    }
                    (dir, depth, from) = (child, depth + 1, 0);
                }
                Scan::Done if depth == 0 => return Ok(()),
                Scan::Done => {
                    // Back to the parent, which meets this directory again and removes it (or, if something was
                    // added meanwhile, enters it again).
                    let parent = open_dir(&dir, c"..", &Walk::at_path(self.shown, depth, c".."))?;
                    if mount_of(&parent, self.shown)? != self.mount {
                        return Err(RemoveError::Moved { path: self.shown.to_owned() });
                    }
                    depth -= 1;
                    if depth == 0 && identity(&parent, self.shown)? != self.top {
                        return Err(RemoveError::Moved { path: self.shown.to_owned() });
                    }
                    // Kept only for the first REMEMBERED_LEVELS levels; deeper ones start again from the beginning.
                    from = self.resume.get(depth).copied().unwrap_or(0);
                    dir = parent;
                }
            }
        }
    }

    /// Reads `dir` from position `from` as a stream, removing files, symlinks and empty directories, until the end
    /// or the first directory that is not empty.
    fn scan(&mut self, dir: &OwnedFd, depth: usize, from: u64) -> Result<Scan, RemoveError> {
        rustix::fs::seek(dir, SeekFrom::Start(from)).map_err(io(self.shown))?;
        let (mount, shown) = (self.mount, self.shown);
        let mut entries = RawDir::new(dir, &mut self.buffer);
        // The position of the entry being handled: the previous entry's cookie.
        let mut position = from;
        let mut found = None;
        while let Some(entry) = entries.next() {
            let entry = entry.map_err(io(shown))?;
            let (name, at) = (entry.file_name(), position);
            position = entry.next_entry_cookie();
            if name == c"." || name == c".." {
                continue;
            }
            let here = || Walk::at_path(shown, depth, name);
            let (entry_mount, is_dir) = match probe(dir, name, shown) {
                Err(RemoveError::Io { errno: Errno::NOENT, .. }) => continue, // gone meanwhile
                other => other.map_err(|e| e.at(here()))?,
            };
            if entry_mount != mount {
                return Err(RemoveError::OtherMount { path: here() });
            }
            let flags = if is_dir { AtFlags::REMOVEDIR } else { AtFlags::empty() };
            match rustix::fs::unlinkat(dir, name, flags) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(Errno::NOTEMPTY | Errno::EXIST) if is_dir => {
                    let child = open_dir(dir, name, &here())?;
                    // Opened by name after the check: make sure what was opened is still on this mount.
                    if mount_of(&child, &here())? != mount {
                        return Err(RemoveError::OtherMount { path: here() });
                    }
                    found = Some(Scan::Descend { child, at });
                    break;
                }
                Err(e) => return Err(io(&here())(e)),
            }
            crate::failpoints::point("hostpath-purge-after-unlink");
        }
        Ok(found.unwrap_or(Scan::Done))
    }

    /// Where an entry is, for messages: the top and the depth (the names in between are not kept).
    fn at_path(shown: &str, depth: usize, name: &CStr) -> String {
        match depth {
            0 => format!("{shown}/{}", name.to_string_lossy()),
            d => format!("{shown}/…/{} (depth {})", name.to_string_lossy(), d + 1),
        }
    }
}

impl RemoveError {
    /// The same error about `path`.
    fn at(self, path: String) -> RemoveError {
        match self {
            RemoveError::OtherMount { .. } => RemoveError::OtherMount { path },
            RemoveError::Io { errno, .. } => RemoveError::Io { path, errno },
            RemoveError::Moved { .. } => RemoveError::Moved { path },
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
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

    fn mkdir_in(dir: &OwnedFd, name: &str) -> OwnedFd {
        let name = std::ffi::CString::new(name).unwrap();
        rustix::fs::mkdirat(dir, &name, Mode::RWXU).unwrap();
        open_dir(dir, &name, "test").unwrap()
    }

    fn file_in(dir: &OwnedFd, name: &str) {
        let name = std::ffi::CString::new(name).unwrap();
        rustix::fs::openat(dir, &name, OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC, Mode::RUSR).unwrap();
    }

    /// A chain `depth` levels deep (far beyond PATH_MAX: built by descriptor, as a pod can), with, at each depth in
    /// `bushy`, `width` non-empty sibling directories and files, so the walk must come back to that level and
    /// resume it several times (from a remembered position, or from the start below REMEMBERED_LEVELS). Also what
    /// copy_tree.rs's tests copy.
    pub(crate) fn plant(top: &Path, depth: usize, bushy: &[usize], width: usize) {
        std::fs::create_dir(top).unwrap();
        let mut dir = open_dir(CWD, &std::ffi::CString::new(top.as_os_str().as_encoded_bytes()).unwrap(), "t").unwrap();
        for d in 0..depth {
            if bushy.contains(&d) {
                for i in 0..width {
                    let sibling = mkdir_in(&dir, &format!("s{i}"));
                    file_in(&sibling, "f");
                    file_in(&dir, &format!("f{i}"));
                }
            }
            dir = mkdir_in(&dir, "d");
        }
        file_in(&dir, "bottom");
    }

    #[test]
    fn missing_is_success() {
        let base = tempfile::tempdir().unwrap();
        remove_tree(&base.path().join("nothing")).unwrap();
    }

    #[test]
    fn trees_far_deeper_than_path_max_and_wide_levels_are_removed() {
        let base = tempfile::tempdir().unwrap();
        let vol = base.path().join("deep");
        // 20,000 levels: 40,000 bytes of path, ten times PATH_MAX; the old walk held a descriptor per level.
        let bushy = [0, 3, REMEMBERED_LEVELS - 1, REMEMBERED_LEVELS + 2, 19_998];
        plant(&vol, 20_000, &bushy, 300);
        remove_tree(&vol).unwrap();
        assert!(!vol.exists());
    }

    #[test]
    fn removal_on_tmpfs_whose_positions_shift_as_entries_go() {
        if std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap_or(1) != 0 {
            panic!("this test mounts a tmpfs and needs root (CI runs as root)");
        }
        let base = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(base.path()).status();
        assert!(status.unwrap().success());
        let vol = base.path().join("vol");
        plant(&vol, 50, &[0, 1, 2, 49], 2_000);
        let removed = remove_tree(&vol);
        let gone = !vol.exists();
        std::process::Command::new("umount").arg(base.path()).status().unwrap();
        removed.unwrap();
        assert!(gone);
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
