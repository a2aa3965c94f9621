//! Copying a directory volume's tree into a new volume (a clone of a hostpath volume, issue 20), without ever
//! reading or writing outside the two trees: entries are opened relative to their parent directory, symlinks are
//! copied as links and never followed, and nothing on another mount (a filesystem mounted inside the volume, a bind
//! mount) is entered.
//!
//! The source is a pod's to shape, so the walk's cost must not grow with it, as in safe_remove.rs: one directory of
//! each tree open at a time (two while stepping), each read in a fixed buffer as a stream, back up by
//! `openat(dir, "..")`, a resume position kept only for the first [`REMEMBERED_LEVELS`] levels. A deeper level is
//! scanned again from its start when the walk returns to it, and what the destination already has is skipped: an
//! entry exists in the destination only once it is complete (a file is copied before the walk leaves its
//! directory; a directory's walk is over before its parent is scanned again).
//!
//! File data is shared by reflink (`FICLONE`) where the filesystem can (XFS with `reflink=1`, btrfs), and copied
//! otherwise with `copy_file_range`, hole by hole (`SEEK_DATA`/`SEEK_HOLE`), so a sparse file stays sparse.
//! Owners, permission bits (setuid and setgid included), timestamps and extended attributes are kept. What the
//! agent may not make is left out and counted ([`Copied::left_out`]): device nodes and sockets (a volume's pods
//! cannot use either through a `nodev` mount), extended attributes the kernel refuses it (`security.capability`
//! without CAP_SETFCAP), entries on another mount. Hard links are kept while their record fits in
//! [`HARD_LINK_BUDGET`] bytes; past it, further links are copied as files of their own (counted).
//!
//! A copy of a volume a pod is writing is not crash-consistent: each file is copied as it is when the walk reaches
//! it.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags, RawDir, SeekFrom, StatxFlags, Timestamps, XattrFlags};
use rustix::io::Errno;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CopyError {
    #[error("{path}: {errno}")]
    Io { path: String, errno: Errno },
    #[error("{path}: the tree was moved while it was being copied (its top is no longer where the walk began)")]
    Moved { path: String },
    #[error("{path}: the copy was still running at its deadline, after {seconds} s and {entries} entries: stopped")]
    TimedOut { path: String, seconds: u64, entries: u64 },
}

/// The directory-reading buffer: one `getdents64` fills it with hundreds of entries.
const BUFFER_BYTES: usize = 32 * 1024;
/// Levels whose resume position is kept (32 KiB of positions); deeper levels are scanned again from their start.
pub const REMEMBERED_LEVELS: usize = 4096;
/// Bytes the record of hard links may take (inode and the path from the top of each first link): past it, further
/// links of files not recorded yet are copied as files of their own.
pub const HARD_LINK_BUDGET: usize = 8 << 20;
/// Time the walk is given for each entry it meets, on top of what its caller allows: a copy's time grows with its
/// number of entries more than with its bytes (about 60 µs a file on XFS with reflinks, docs/benchmarks.md), and a
/// copy that keeps going is not hung. At most [`ENTRIES_TIME_AT_MOST`] in all, so that a tree growing ahead of the
/// walk cannot keep it going for ever.
pub const TIME_PER_ENTRY: Duration = Duration::from_millis(1);
pub const ENTRIES_TIME_AT_MOST: Duration = Duration::from_secs(3600);
/// The most one `copy_file_range` is asked to copy, so that the deadline is looked at between calls.
const CHUNK_BYTES: usize = 64 << 20;
/// The longest path the kernel takes (linkat's first link).
const PATH_MAX: usize = 4096;
/// Names of what was left out that are kept for the report (the count is always whole).
const NAMES_KEPT: usize = 16;
/// The kernel's limits for the list of a file's extended attribute names and for one value.
const XATTR_BYTES: usize = 64 * 1024;

/// What a copy did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Copied {
    pub directories: u64,
    pub files: u64,
    pub symlinks: u64,
    /// Bytes of file data shared by reflink.
    pub reflinked_bytes: u64,
    /// Bytes of file data written (holes are not).
    pub copied_bytes: u64,
    /// Links made to a file already copied.
    pub hard_links: u64,
    /// Further links copied as files of their own, once the record of hard links was full.
    pub hard_links_split: u64,
    /// What was left out, and why: the first few, and how many in all.
    pub left_out: Vec<String>,
    pub left_out_count: u64,
}

impl Copied {
    fn leave_out(&mut self, what: String) {
        self.left_out_count += 1;
        if self.left_out.len() < NAMES_KEPT {
            self.left_out.push(what);
        }
    }
}

fn io(path: &str) -> impl Fn(Errno) -> CopyError + '_ {
    move |errno| CopyError::Io { path: path.to_owned(), errno }
}

fn open_dir(dir: impl AsFd, name: &CStr, path: &str) -> Result<OwnedFd, CopyError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::openat(dir, name, flags, Mode::empty()).map_err(io(path))
}

const STAT: StatxFlags = StatxFlags::BASIC_STATS.union(StatxFlags::MNT_ID);

/// What statx says of `name` in `dir` (not followed if a symlink); an empty `name` asks about `dir` itself.
fn stat_at(dir: impl AsFd, name: &CStr, path: &str) -> Result<rustix::fs::Statx, CopyError> {
    let flags = AtFlags::SYMLINK_NOFOLLOW | if name.is_empty() { AtFlags::EMPTY_PATH } else { AtFlags::empty() };
    let st = rustix::fs::statx(dir, name, flags, STAT).map_err(io(path))?;
    // Without a mount id (Linux < 5.8) mounts could not be told apart: refuse rather than guess.
    if !StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::MNT_ID) {
        return Err(CopyError::Io { path: format!("{path} (statx gave no mount id)"), errno: Errno::NOSYS });
    }
    Ok(st)
}

fn file_type(st: &rustix::fs::Statx) -> FileType {
    FileType::from_raw_mode(st.stx_mode.into())
}

fn identity(st: &rustix::fs::Statx) -> (u32, u32, u64) {
    (st.stx_dev_major, st.stx_dev_minor, st.stx_ino)
}

/// Copies everything below the directory `from` into the directory `to` (which must exist and be empty: what is
/// in it is not looked for), then gives `to` the owner, mode, timestamps and extended attributes of `from`. Only
/// entries on `from`'s own mount are copied. `to`'s tree is the agent's own (not in any pod's reach while it is made).
/// The walk stops with [`CopyError::TimedOut`] once `allowed` has passed, and [`TIME_PER_ENTRY`] more for each
/// entry met so far (looked at between entries and between chunks of a file's data): what it made is the caller's
/// to remove.
pub fn copy_tree(from: &Path, to: &Path, allowed: Duration) -> Result<Copied, CopyError> {
    let started = Instant::now();
    let (shown, shown_to) = (from.display().to_string(), to.display().to_string());
    let c = |p: &Path, shown: &str| CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| io(shown)(Errno::INVAL));
    let src = open_dir(CWD, &c(from, &shown)?, &shown)?;
    let dst = open_dir(CWD, &c(to, &shown_to)?, &shown_to)?;
    // The destination's top, which hard links are made relative to.
    let dst_top = open_dir(CWD, &c(to, &shown_to)?, &shown_to)?;
    let top = stat_at(&src, c"", &shown)?;
    let mut walk = Walk {
        mount: top.stx_mnt_id,
        top: identity(&top),
        shown: &shown,
        buffer: vec![MaybeUninit::uninit(); BUFFER_BYTES],
        resume: Vec::new(),
        links: HashMap::new(),
        links_bytes: 0,
        names: Vec::new(),
        reflink: true,
        started,
        allowed,
        entries: 0,
        xattr_names: vec![0; XATTR_BYTES],
        xattr_value: vec![0; XATTR_BYTES],
        copied: Copied::default(),
    };
    walk.run(src, dst, dst_top)?;
    Ok(walk.copied)
}

/// What one scan of a directory found.
enum Scan {
    /// Every entry is copied.
    Done,
    /// `child` (source and destination) is a directory to copy, met at resume position `at` of the scanned one.
    Descend { src: OwnedFd, dst: OwnedFd, name: CString, at: u64 },
}

struct Walk<'a> {
    /// The mount everything copied must be on.
    mount: u64,
    /// Device and inode of the source's top, to recognise it when the walk comes back up.
    top: (u32, u32, u64),
    shown: &'a str,
    buffer: Vec<MaybeUninit<u8>>,
    /// `resume[d]`: where to continue scanning the directory at depth `d` when the walk returns to it.
    resume: Vec<u64>,
    /// Source inode of a file with several links → its first link's path below the destination's top.
    links: HashMap<u64, CString>,
    links_bytes: usize,
    /// The names from the top to the directory being copied, while their path fits in PATH_MAX: the path of a
    /// first link, to record hard links by.
    names: Vec<CString>,
    /// Whether reflinks are still tried: not once the filesystem said it makes none.
    reflink: bool,
    /// When the walk began, the time it was given, and the entries it met (each gives it more).
    started: Instant,
    allowed: Duration,
    entries: u64,
    /// Buffers for extended attributes, allocated once (not per file: a million files would zero 128 GiB).
    xattr_names: Vec<u8>,
    xattr_value: Vec<u8>,
    copied: Copied,
}

impl Walk<'_> {
    fn run(&mut self, top_src: OwnedFd, top_dst: OwnedFd, dst_top: OwnedFd) -> Result<(), CopyError> {
        // `fresh`: the destination directory is empty (just made, or the empty top), so nothing in it needs
        // looking for before it is made.
        let (mut src, mut dst, mut depth, mut from, mut fresh) = (top_src, top_dst, 0usize, 0u64, true);
        loop {
            match self.scan(&src, &dst, &dst_top, depth, from, fresh)? {
                Scan::Descend { src: s, dst: d, name, at } => {
                    if depth < REMEMBERED_LEVELS {
                        self.resume.truncate(depth);
                        self.resume.push(at);
                    }
                    // The names are kept while their path fits in PATH_MAX (what linkat takes): bounded, whatever
                    // the depth; deeper first links are not recorded.
                    self.names.truncate(depth);
                    let used: usize = self.names.iter().map(|n| n.as_bytes().len() + 1).sum();
                    if self.names.len() == depth && used + name.as_bytes().len() < PATH_MAX {
                        self.names.push(name);
                    }
                    (src, dst, depth, from, fresh) = (s, d, depth + 1, 0, true);
                }
                Scan::Done => {
                    // The directory is complete: now its own owner, mode, times and attributes.
                    self.finish_directory(&src, &dst, depth)?;
                    if depth == 0 {
                        return Ok(());
                    }
                    let here = format!("{} (depth {depth})", self.shown);
                    let parent = open_dir(&src, c"..", &here)?;
                    let st = stat_at(&parent, c"", &here)?;
                    depth -= 1;
                    // A directory moved while it was copied could lead the walk up out of the tree: the top must be
                    // met exactly at depth 0, and everything on the way on the same mount.
                    if st.stx_mnt_id != self.mount || (identity(&st) == self.top) != (depth == 0) {
                        return Err(CopyError::Moved { path: self.shown.to_owned() });
                    }
                    dst = open_dir(&dst, c"..", &here)?;
                    src = parent;
                    from = self.resume.get(depth).copied().unwrap_or(0);
                    fresh = false;
                }
            }
        }
    }

    /// Reads `src` from position `from` as a stream, copying files, symlinks and what else it may into `dst`,
    /// until the end or the first directory not copied yet, which it makes (empty) and returns. Unless `fresh`
    /// (`dst` was empty when the scan began), entries `dst` already has are skipped.
    #[allow(clippy::too_many_arguments, reason = "one call site, each argument a different thing")]
    fn scan(
        &mut self,
        src: &OwnedFd,
        dst: &OwnedFd,
        dst_top: &OwnedFd,
        depth: usize,
        from: u64,
        fresh: bool,
    ) -> Result<Scan, CopyError> {
        rustix::fs::seek(src, SeekFrom::Start(from)).map_err(io(self.shown))?;
        let shown = self.shown;
        let mut buffer = std::mem::take(&mut self.buffer);
        let mut entries = RawDir::new(src, &mut buffer);
        let mut position = from;
        let mut found = Scan::Done;
        while let Some(entry) = entries.next() {
            let entry = entry.map_err(io(shown))?;
            let (name, at) = (entry.file_name().to_owned(), position);
            position = entry.next_entry_cookie();
            if name.as_c_str() == c"." || name.as_c_str() == c".." {
                continue;
            }
            self.in_time()?;
            let here = at_path(shown, depth, &name);
            // Already in the destination: copied before the walk last left this directory (see the module's doc).
            if !fresh {
                match rustix::fs::statx(dst, &name, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::TYPE) {
                    Ok(_) => continue,
                    Err(Errno::NOENT) => {}
                    Err(e) => return Err(io(&here)(e)),
                }
            }
            let st = match stat_at(src, &name, &here) {
                Err(CopyError::Io { errno: Errno::NOENT, .. }) => continue, // gone meanwhile
                other => other?,
            };
            if st.stx_mnt_id != self.mount {
                self.copied.leave_out(format!("{here}: on another mount"));
                continue;
            }
            match file_type(&st) {
                FileType::Directory => {
                    let child = open_dir(src, &name, &here)?;
                    // Opened by name after the check: make sure what was opened is still on this mount.
                    if stat_at(&child, c"", &here)?.stx_mnt_id != self.mount {
                        self.copied.leave_out(format!("{here}: on another mount"));
                        continue;
                    }
                    rustix::fs::mkdirat(dst, &name, Mode::RWXU).map_err(io(&here))?;
                    let made = open_dir(dst, &name, &here)?;
                    self.copied.directories += 1;
                    found = Scan::Descend { src: child, dst: made, name, at };
                    break;
                }
                FileType::RegularFile => self.file(src, dst, dst_top, &name, &st, depth, &here)?,
                FileType::Symlink => {
                    let target = rustix::fs::readlinkat(src, &name, Vec::new()).map_err(io(&here))?;
                    rustix::fs::symlinkat(&target, dst, &name).map_err(io(&here))?;
                    let (uid, gid) = (rustix::fs::Uid::from_raw(st.stx_uid), rustix::fs::Gid::from_raw(st.stx_gid));
                    rustix::fs::chownat(dst, &name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(io(&here))?;
                    rustix::fs::utimensat(dst, &name, &times(&st), AtFlags::SYMLINK_NOFOLLOW).map_err(io(&here))?;
                    self.copied.symlinks += 1;
                }
                FileType::Fifo => {
                    let mode = Mode::from_raw_mode(st.stx_mode.into());
                    rustix::fs::mknodat(dst, &name, FileType::Fifo, mode, 0).map_err(io(&here))?;
                    let (uid, gid) = (rustix::fs::Uid::from_raw(st.stx_uid), rustix::fs::Gid::from_raw(st.stx_gid));
                    rustix::fs::chownat(dst, &name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(io(&here))?;
                    self.copied.files += 1;
                }
                other => self.copied.leave_out(format!("{here}: a {other:?} (not made in a clone)")),
            }
        }
        self.buffer = buffer;
        Ok(found)
    }

    #[allow(clippy::too_many_arguments, reason = "one call site, each argument a different thing")]
    fn file(
        &mut self,
        src: &OwnedFd,
        dst: &OwnedFd,
        dst_top: &OwnedFd,
        name: &CStr,
        st: &rustix::fs::Statx,
        depth: usize,
        here: &str,
    ) -> Result<(), CopyError> {
        if st.stx_nlink > 1 {
            if let Some(first) = self.links.get(&st.stx_ino) {
                match rustix::fs::linkat(dst_top, first.as_c_str(), dst, name, AtFlags::empty()) {
                    Ok(()) => {
                        self.copied.hard_links += 1;
                        return Ok(());
                    }
                    // The first link's path grew past what the kernel takes: a file of its own.
                    Err(Errno::NAMETOOLONG) => self.copied.hard_links_split += 1,
                    Err(e) => return Err(io(here)(e)),
                }
            } else if let Some(path) = self.link_path(name, depth) {
                self.links_bytes += path.as_bytes().len() + 16;
                self.links.insert(st.stx_ino, path);
            } else {
                self.copied.hard_links_split += 1;
            }
        }
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let input = match rustix::fs::openat(src, name, flags, Mode::empty()) {
            Err(Errno::NOENT) => return Ok(()), // gone meanwhile
            other => other.map_err(io(here))?,
        };
        let create = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let output = rustix::fs::openat(dst, name, create, Mode::RUSR | Mode::WUSR).map_err(io(here))?;
        let size = rustix::fs::fstat(&input).map_err(io(here))?.st_size as u64;
        let reflinked = match (size, self.reflink) {
            (0, _) | (_, false) => false,
            _ => match rustix::fs::ioctl_ficlone(&output, &input) {
                Ok(()) => true,
                // This filesystem makes no reflinks (EBADF: older kernels' way of saying so): none is tried again.
                Err(Errno::OPNOTSUPP | Errno::XDEV | Errno::NOSYS | Errno::BADF) => {
                    self.reflink = false;
                    false
                }
                // Not between these two files: this one is copied.
                Err(Errno::INVAL) => false,
                Err(e) => return Err(io(here)(e)),
            },
        };
        if reflinked {
            self.copied.reflinked_bytes += size;
        } else if size > 0 {
            // A copy, hole by hole.
            self.copied.copied_bytes += copy_data(&input, &output, size, self.deadline()).map_err(|e| match e {
                Errno::TIMEDOUT => self.timed_out(),
                e => io(here)(e),
            })?;
        }
        self.attributes(&input, &output, here)?;
        owner_and_mode(&output, st, here)?;
        rustix::fs::futimens(&output, &times(st)).map_err(io(here))?;
        self.copied.files += 1;
        crate::failpoints::point("hostpath-clone-after-file");
        Ok(())
    }

    fn deadline(&self) -> Instant {
        self.started + time_for(self.allowed, self.entries)
    }

    /// Whether the walk may go on to one more entry (which is counted).
    fn in_time(&mut self) -> Result<(), CopyError> {
        if Instant::now() >= self.deadline() {
            return Err(self.timed_out());
        }
        self.entries += 1;
        Ok(())
    }

    fn timed_out(&self) -> CopyError {
        let seconds = self.started.elapsed().as_secs();
        CopyError::TimedOut { path: self.shown.to_owned(), seconds, entries: self.entries }
    }

    /// The path below the destination's top of `name` at `depth`, if the record of hard links has room for it.
    fn link_path(&self, name: &CStr, depth: usize) -> Option<CString> {
        if self.names.len() < depth
            || self.names[..depth].iter().map(|n| n.as_bytes().len() + 1).sum::<usize>() + name.to_bytes().len()
                >= PATH_MAX
        {
            return None;
        }
        let mut path = Vec::new();
        for part in self.names[..depth].iter().map(|n| n.as_bytes()).chain([name.to_bytes()]) {
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(part);
        }
        (self.links_bytes + path.len() + 16 <= HARD_LINK_BUDGET).then(|| CString::new(path).expect("no NUL in names"))
    }

    /// Copies the extended attributes of `input` to `output`; one the kernel refuses the agent is left out
    /// (counted).
    fn attributes(&mut self, input: &OwnedFd, output: &OwnedFd, here: &str) -> Result<(), CopyError> {
        let len = match rustix::fs::flistxattr(input, &mut self.xattr_names[..]) {
            Ok(n) => n,
            Err(Errno::OPNOTSUPP) => return Ok(()),
            Err(e) => return Err(io(here)(e)),
        };
        for name in self.xattr_names[..len].split(|b| *b == 0).filter(|n| !n.is_empty()) {
            let name = CString::new(name).expect("split at NUL");
            let n = match rustix::fs::fgetxattr(input, &name, &mut self.xattr_value[..]) {
                Ok(n) => n,
                Err(Errno::NODATA) => continue, // removed meanwhile
                Err(e) => return Err(io(here)(e)),
            };
            match rustix::fs::fsetxattr(output, &name, &self.xattr_value[..n], XattrFlags::empty()) {
                Ok(()) => {}
                Err(Errno::PERM | Errno::ACCESS | Errno::OPNOTSUPP) => {
                    let what = format!("{here}: attribute {} (refused to the agent)", name.to_string_lossy());
                    self.copied.leave_out(what);
                }
                Err(e) => return Err(io(here)(e)),
            }
        }
        Ok(())
    }

    /// A directory whose content is copied gets its source's attributes, owner, mode and times (last: writing into
    /// it changed its times).
    fn finish_directory(&mut self, src: &OwnedFd, dst: &OwnedFd, depth: usize) -> Result<(), CopyError> {
        let here = format!("{} (depth {depth})", self.shown);
        let st = stat_at(src, c"", &here)?;
        self.attributes(src, dst, &here)?;
        owner_and_mode(dst, &st, &here)?;
        rustix::fs::futimens(dst, &times(&st)).map_err(io(&here))
    }
}

/// The time a walk allowed `allowed` has once it has met `entries` entries.
fn time_for(allowed: Duration, entries: u64) -> Duration {
    let per_entry = TIME_PER_ENTRY.saturating_mul(entries.try_into().unwrap_or(u32::MAX));
    allowed + per_entry.min(ENTRIES_TIME_AT_MOST)
}

/// Copies the data of `input` (`size` bytes) into the empty `output`, data extent by data extent, so holes stay
/// holes; returns the bytes written. Past `deadline` (looked at between chunks) it stops with ETIMEDOUT.
fn copy_data(input: &OwnedFd, output: &OwnedFd, size: u64, deadline: Instant) -> Result<u64, Errno> {
    let mut written = 0;
    let mut at = 0u64;
    while at < size {
        let start = match rustix::fs::seek(input, SeekFrom::Data(at)) {
            Ok(s) => s,
            Err(Errno::NXIO) => break, // only a hole up to the end
            Err(e) => return Err(e),
        };
        let end = rustix::fs::seek(input, SeekFrom::Hole(start))?.min(size);
        let (mut from, mut to) = (start, start);
        while from < end {
            if Instant::now() >= deadline {
                return Err(Errno::TIMEDOUT);
            }
            let len = ((end - from) as usize).min(CHUNK_BYTES);
            let n = rustix::fs::copy_file_range(input, Some(&mut from), output, Some(&mut to), len)?;
            if n == 0 {
                break; // the file shrank meanwhile
            }
            written += n as u64;
        }
        at = end;
    }
    // The size, with a hole at the end if there is one.
    rustix::fs::ftruncate(output, size)?;
    Ok(written)
}

/// The source's owner, then its mode (after: a change of owner clears setuid and setgid).
fn owner_and_mode(output: &OwnedFd, st: &rustix::fs::Statx, here: &str) -> Result<(), CopyError> {
    let (uid, gid) = (rustix::fs::Uid::from_raw(st.stx_uid), rustix::fs::Gid::from_raw(st.stx_gid));
    rustix::fs::fchown(output, Some(uid), Some(gid)).map_err(io(here))?;
    rustix::fs::fchmod(output, Mode::from_raw_mode(u32::from(st.stx_mode) & 0o7777)).map_err(io(here))
}

fn times(st: &rustix::fs::Statx) -> Timestamps {
    let t = |ts: rustix::fs::StatxTimestamp| rustix::fs::Timespec { tv_sec: ts.tv_sec, tv_nsec: ts.tv_nsec.into() };
    Timestamps { last_access: t(st.stx_atime), last_modification: t(st.stx_mtime) }
}

/// Where an entry is, for messages: the top and the depth (the names in between are not kept).
fn at_path(shown: &str, depth: usize, name: &CStr) -> String {
    match depth {
        0 => format!("{shown}/{}", name.to_string_lossy()),
        d => format!("{shown}/…/{} (depth {})", name.to_string_lossy(), d + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

    const A_MINUTE: Duration = Duration::from_secs(60);

    fn root() -> bool {
        std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1) == 0
    }

    #[test]
    fn a_tree_is_copied_with_its_links_modes_owners_holes_and_attributes_and_nothing_outside() {
        assert!(root(), "this test sets owners and needs root (CI runs as root)");
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "not yours").unwrap();
        let base = tempfile::tempdir().unwrap();
        let (from, to) = (base.path().join("from"), base.path().join("to"));
        std::fs::create_dir_all(from.join("a/b")).unwrap();
        std::fs::create_dir(&to).unwrap();
        std::fs::write(from.join("a/b/file"), "data").unwrap();
        std::fs::hard_link(from.join("a/b/file"), from.join("link")).unwrap();
        symlink(outside.path().join("secret"), from.join("escape")).unwrap();
        symlink(outside.path(), from.join("a/escape-dir")).unwrap();
        let sparse = std::fs::File::create(from.join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        std::os::unix::fs::FileExt::write_at(&sparse, b"middle", 512 << 20).unwrap();
        drop(sparse);
        // The owner first: a change of owner clears setuid.
        std::os::unix::fs::chown(from.join("a/b/file"), Some(1234), Some(5678)).unwrap();
        std::fs::set_permissions(from.join("a/b/file"), std::fs::Permissions::from_mode(0o4750)).unwrap();
        std::os::unix::fs::chown(from.join("a"), Some(999), Some(999)).unwrap();
        std::fs::set_permissions(from.join("a"), std::fs::Permissions::from_mode(0o2770)).unwrap();
        std::os::unix::fs::lchown(from.join("escape"), Some(42), Some(43)).unwrap();
        let with_xattr = rustix::fs::setxattr(from.join("a/b/file"), "user.kind", b"table", XattrFlags::empty());

        let copied = copy_tree(&from, &to, A_MINUTE).unwrap();
        assert_eq!((copied.files, copied.directories, copied.symlinks, copied.hard_links), (2, 2, 2, 1), "{copied:?}");
        assert_eq!(copied.left_out_count, 0, "{copied:?}");
        assert_eq!(std::fs::read_to_string(to.join("a/b/file")).unwrap(), "data");
        let (file, link) =
            (std::fs::metadata(to.join("a/b/file")).unwrap(), std::fs::metadata(to.join("link")).unwrap());
        assert_eq!(file.ino(), link.ino(), "the hard link is kept");
        assert_eq!((file.mode() & 0o7777, file.uid(), file.gid()), (0o4750, 1234, 5678));
        let a = std::fs::metadata(to.join("a")).unwrap();
        assert_eq!((a.mode() & 0o7777, a.uid(), a.gid()), (0o2770, 999, 999));
        assert_eq!(std::fs::read_link(to.join("escape")).unwrap(), outside.path().join("secret"));
        assert_eq!(std::fs::symlink_metadata(to.join("escape")).unwrap().uid(), 42);
        assert!(std::fs::symlink_metadata(to.join("a/escape-dir")).unwrap().file_type().is_symlink());
        let sparse = std::fs::metadata(to.join("sparse")).unwrap();
        assert_eq!(sparse.len(), 1 << 30);
        assert!(sparse.blocks() * 512 < 16 << 20, "a sparse file stays sparse: {} blocks", sparse.blocks());
        let mut middle = [0u8; 6];
        std::os::unix::fs::FileExt::read_at(&std::fs::File::open(to.join("sparse")).unwrap(), &mut middle, 512 << 20)
            .unwrap();
        assert_eq!(&middle, b"middle");
        assert_eq!(
            std::fs::metadata(to.join("a/b/file")).unwrap().modified().unwrap(),
            std::fs::metadata(from.join("a/b/file")).unwrap().modified().unwrap()
        );
        if with_xattr.is_ok() {
            let mut v = [0u8; 16];
            let n = rustix::fs::getxattr(to.join("a/b/file"), "user.kind", &mut v[..]).unwrap();
            assert_eq!(&v[..n], b"table");
        }
        assert_eq!(std::fs::read_to_string(outside.path().join("secret")).unwrap(), "not yours");
        assert!(!to.join("secret").exists());
    }

    #[test]
    fn a_copy_past_its_deadline_stops_and_says_so() {
        let base = tempfile::tempdir().unwrap();
        let (from, to) = (base.path().join("from"), base.path().join("to"));
        std::fs::create_dir_all(from.join("dir")).unwrap();
        std::fs::write(from.join("dir/file"), vec![7u8; 4096]).unwrap();
        std::fs::create_dir(&to).unwrap();
        let stopped = copy_tree(&from, &to, Duration::ZERO).unwrap_err();
        assert!(matches!(stopped, CopyError::TimedOut { seconds: 0, entries: 0, .. }), "{stopped:?}");
        assert!(stopped.to_string().contains("deadline"), "{stopped}");
        // A file's data is copied chunk by chunk, each only before the deadline.
        let input: OwnedFd = std::fs::File::open(from.join("dir/file")).unwrap().into();
        let output: OwnedFd = std::fs::File::create(to.join("late")).unwrap().into();
        assert_eq!(copy_data(&input, &output, 4096, Instant::now()), Err(Errno::TIMEDOUT));
        let later = Instant::now() + A_MINUTE;
        assert_eq!(copy_data(&input, &output, 4096, later), Ok(4096));
    }

    #[test]
    fn a_copy_gets_more_time_for_each_entry_up_to_an_hour() {
        assert_eq!(time_for(A_MINUTE, 0), A_MINUTE);
        assert_eq!(time_for(A_MINUTE, 2_000_000), A_MINUTE + Duration::from_secs(2_000));
        assert_eq!(time_for(A_MINUTE, 1 << 40), A_MINUTE + ENTRIES_TIME_AT_MOST);
    }

    #[test]
    fn device_nodes_and_sockets_are_left_out_and_counted() {
        assert!(root(), "this test makes a device node and needs root (CI runs as root)");
        let base = tempfile::tempdir().unwrap();
        let (from, to) = (base.path().join("from"), base.path().join("to"));
        std::fs::create_dir(&from).unwrap();
        std::fs::create_dir(&to).unwrap();
        let dir = open_dir(CWD, &CString::new(from.as_os_str().as_encoded_bytes()).unwrap(), "t").unwrap();
        rustix::fs::mknodat(&dir, "null", FileType::CharacterDevice, Mode::RUSR, rustix::fs::makedev(1, 3)).unwrap();
        rustix::fs::mknodat(&dir, "pipe", FileType::Fifo, Mode::RUSR | Mode::WUSR, 0).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(from.join("sock")).unwrap();
        let copied = copy_tree(&from, &to, A_MINUTE).unwrap();
        assert_eq!(copied.left_out_count, 2, "{copied:?}");
        assert!(!to.join("null").exists() && !to.join("sock").exists());
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::symlink_metadata(to.join("pipe")).unwrap().file_type().is_fifo());
    }

    /// Counts the entries below `dir` by descriptor (the tree is deeper than any path).
    fn count(dir: OwnedFd) -> u64 {
        let mut n = 0;
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            let names: Vec<CString> = {
                let mut buf = vec![MaybeUninit::uninit(); 4096];
                let mut it = RawDir::new(&d, &mut buf);
                let mut v = Vec::new();
                while let Some(e) = it.next() {
                    let e = e.unwrap();
                    if e.file_name() != c"." && e.file_name() != c".." {
                        v.push(e.file_name().to_owned());
                    }
                }
                v
            };
            for name in names {
                n += 1;
                if let Ok(child) = open_dir(&d, &name, "count") {
                    stack.push(child);
                }
            }
        }
        n
    }

    #[test]
    fn trees_far_deeper_than_path_max_and_wide_levels_are_copied_whole() {
        let base = tempfile::tempdir().unwrap();
        let (from, to) = (base.path().join("from"), base.path().join("to"));
        std::fs::create_dir(&to).unwrap();
        // Levels past REMEMBERED_LEVELS are scanned again from their start when the walk comes back to them.
        let (depth, bushy, width) = (6_000usize, [0usize, 3, REMEMBERED_LEVELS + 2, 5_998], 50usize);
        crate::safe_remove::tests::plant(&from, depth, &bushy, width);
        let copied = copy_tree(&from, &to, A_MINUTE).unwrap();
        let want = depth as u64 + 1 + bushy.len() as u64 * width as u64 * 3;
        assert_eq!(copied.files + copied.directories, want, "{copied:?}");
        let to_fd = open_dir(CWD, &CString::new(to.as_os_str().as_encoded_bytes()).unwrap(), "t").unwrap();
        assert_eq!(count(to_fd), want);
    }
}
