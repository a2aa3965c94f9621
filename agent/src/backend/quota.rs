//! Project quotas (XFS and ext4): the kernel interface directory volumes are size-limited with.
//!
//! A volume's directory carries a project ID and the "inherit" flag, set with the generic `FS_IOC_FSSETXATTR`
//! ioctl before anything is made inside it, so every file and directory later made in it is counted against that
//! project. The limit is set with `quotactl_fd(2)` (Linux 5.14+), which takes any open file of the filesystem
//! instead of the block device's path, and is the same call for both filesystems.
//!
//! Kernel behaviour this is built around (docs/storageclass.md tells users):
//! - XFS refuses a write past a project's limit with ENOSPC ("No space left on device"), for root too.
//! - ext4 refuses it with EDQUOT ("Disk quota exceeded"), but a process with CAP_SYS_RESOURCE ignores the limit.
//! - Project IDs change only through this ioctl from the initial user namespace; a process owning a file can use
//!   it too (`chattr -p`), which is the known limit of project quotas as isolation.

use std::fs::File;
use std::os::fd::AsRawFd;

/// `PRJQUOTA` in `<linux/quota.h>`.
const PRJQUOTA: libc::c_int = 2;
/// `Q_XGETQSTATV` (`<linux/dqblk_xfs.h>`): quota state, understood by XFS and ext4 alike.
const Q_XGETQSTATV: libc::c_int = (b'X' as libc::c_int) << 8 | 8;
const FS_QSTATV_VERSION1: i8 = 1;
/// Flags of `fs_quota_statv.qs_flags`: project quota accounting is on / limits are enforced.
const FS_QUOTA_PDQ_ACCT: u16 = 1 << 4;
const FS_QUOTA_PDQ_ENFD: u16 = 1 << 5;
/// `FS_XFLAG_PROJINHERIT`: new files and directories inside take the directory's project ID.
const FS_XFLAG_PROJINHERIT: u32 = 0x0000_0200;
/// Quota block limits are counted in 1 KiB blocks (`QIF_DQBLKSIZE`).
const QUOTA_BLOCK: u64 = 1024;

/// The first project ID Berth hands out: far above the small numbers administrators pick by hand
/// (`/etc/projid`) and kubelet's own range (from 1048577); within 32 bits for XFS (projid32bit, the default).
pub const FIRST_PROJECT_ID: u32 = 1_000_000_000;

/// `struct fsxattr` of `<linux/fs.h>`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

/// `_IOR('X', 31, struct fsxattr)` and `_IOW('X', 32, struct fsxattr)`.
const FS_IOC_FSGETXATTR: libc::Ioctl = ioc(2, 31);
const FS_IOC_FSSETXATTR: libc::Ioctl = ioc(1, 32);

const fn ioc(direction: u32, nr: u32) -> libc::Ioctl {
    ((direction << 30) | ((size_of::<FsXattr>() as u32) << 16) | ((b'X' as u32) << 8) | nr) as libc::Ioctl
}

/// `QCMD(cmd, type)` of `<sys/quota.h>`.
const fn qcmd(cmd: libc::c_int, kind: libc::c_int) -> libc::c_int {
    (cmd << 8) | (kind & 0xff)
}

/// The first bytes of `struct fs_quota_statv`, with room for the rest (the kernel writes all of it).
#[repr(C, align(8))]
struct QuotaStatV {
    version: i8,
    pad1: u8,
    flags: u16,
    rest: [u8; 252],
}

/// What project quotas a filesystem has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaState {
    /// Usage is counted and limits are refused past.
    Enforced,
    /// Usage is counted, limits are not enforced (ext4 with the quota feature, mounted without `prjquota`).
    Accounted,
    /// No project quotas (not mounted with them, or a filesystem without them).
    Off,
}

/// Usage of one project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectUsage {
    pub bytes: u64,
    pub inodes: u64,
}

fn quotactl(fs: &File, cmd: libc::c_int, id: u32, data: *mut libc::c_void) -> std::io::Result<()> {
    // SAFETY: quotactl_fd reads or writes one structure of the kind `cmd` names at `data`; every caller passes a
    // pointer to a live structure of that kind.
    let r = unsafe { libc::syscall(libc::SYS_quotactl_fd, fs.as_raw_fd(), cmd, id, data) };
    if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// The project quota state of the filesystem `fs` is on. Any failure (no quota support at all, a kernel without
/// `quotactl_fd`) reads as `Off`: directories then work without limits, as before.
pub fn state(fs: &File) -> QuotaState {
    let mut st = QuotaStatV { version: FS_QSTATV_VERSION1, pad1: 0, flags: 0, rest: [0; 252] };
    if quotactl(fs, qcmd(Q_XGETQSTATV, PRJQUOTA), 0, (&raw mut st).cast()).is_err() {
        return QuotaState::Off;
    }
    match (st.flags & FS_QUOTA_PDQ_ACCT != 0, st.flags & FS_QUOTA_PDQ_ENFD != 0) {
        (true, true) => QuotaState::Enforced,
        (true, false) => QuotaState::Accounted,
        _ => QuotaState::Off,
    }
}

/// The project ID of the file or directory `f`.
pub fn project_of(f: &File) -> std::io::Result<u32> {
    let mut attr = FsXattr::default();
    // SAFETY: FS_IOC_FSGETXATTR writes one `struct fsxattr`, which `attr` is.
    if unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FSGETXATTR, &raw mut attr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(attr.projid)
}

/// Puts the directory `dir` in project `id`, with inheritance: what is made inside it afterwards is in `id` too.
pub fn set_project(dir: &File, id: u32) -> std::io::Result<()> {
    let mut attr = FsXattr::default();
    // SAFETY: as in `project_of`; FS_IOC_FSSETXATTR reads the same structure back.
    unsafe {
        if libc::ioctl(dir.as_raw_fd(), FS_IOC_FSGETXATTR, &raw mut attr) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        attr.projid = id;
        attr.xflags |= FS_XFLAG_PROJINHERIT;
        if libc::ioctl(dir.as_raw_fd(), FS_IOC_FSSETXATTR, &raw const attr) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The hard block limit for `bytes`, in quota blocks (rounded up: the volume gets at least its size).
pub fn limit_blocks(bytes: u64) -> u64 {
    bytes.div_ceil(QUOTA_BLOCK)
}

/// Limits project `id` on `fs` to `bytes` (hard limit; no soft limit, no inode limit).
pub fn set_limit(fs: &File, id: u32, bytes: u64) -> std::io::Result<()> {
    // SAFETY: dqblk is plain integers; all-zero is a valid value.
    let mut q: libc::dqblk = unsafe { std::mem::zeroed() };
    q.dqb_bhardlimit = limit_blocks(bytes);
    q.dqb_bsoftlimit = 0;
    q.dqb_valid = libc::QIF_BLIMITS;
    quotactl(fs, qcmd(libc::Q_SETQUOTA, PRJQUOTA), id, (&raw mut q).cast())
}

/// What project `id` uses on `fs`. A project the filesystem has never seen uses nothing (XFS says ENOENT).
pub fn usage(fs: &File, id: u32) -> std::io::Result<ProjectUsage> {
    // SAFETY: as in `set_limit`.
    let mut q: libc::dqblk = unsafe { std::mem::zeroed() };
    match quotactl(fs, qcmd(libc::Q_GETQUOTA, PRJQUOTA), id, (&raw mut q).cast()) {
        Ok(()) => Ok(ProjectUsage { bytes: q.dqb_curspace, inodes: q.dqb_curinodes }),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(ProjectUsage { bytes: 0, inodes: 0 }),
        Err(e) => Err(e),
    }
}

/// The first project ID from `start` on (wrapping to [`FIRST_PROJECT_ID`]) that no file on the filesystem
/// carries, by `inodes_of(id)`. A file that carries an ID is counted in its usage, so an ID without inodes is
/// free: live volumes, volumes being removed and other tools' projects all have inodes. The caller serialises
/// allocations (the agent's lock) and marks the directory before the next one, so two volumes never share an ID.
pub fn first_free(start: u32, mut inodes_of: impl FnMut(u32) -> std::io::Result<u64>) -> std::io::Result<u32> {
    let start = start.max(FIRST_PROJECT_ID);
    let ids = (start..=u32::MAX).chain(FIRST_PROJECT_ID..start);
    for id in ids {
        if inodes_of(id)? == 0 {
            return Ok(id);
        }
    }
    Err(std::io::Error::other("every project ID Berth may use is taken"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_abi_numbers() {
        // Values from <linux/fs.h>, <linux/quota.h> and <linux/dqblk_xfs.h> on Linux 6.x.
        assert_eq!(size_of::<FsXattr>(), 28);
        assert_eq!(FS_IOC_FSGETXATTR, 0x801c_581f);
        assert_eq!(FS_IOC_FSSETXATTR, 0x401c_5820);
        assert_eq!(qcmd(libc::Q_GETQUOTA, PRJQUOTA), 0x8000_0702_u32 as i32);
        assert_eq!(qcmd(Q_XGETQSTATV, PRJQUOTA), 0x0058_0802);
        assert_eq!(size_of::<libc::dqblk>(), 72);
        // struct fs_quota_statv is 160 bytes; the buffer must hold all of it.
        assert!(size_of::<QuotaStatV>() >= 160);
    }

    #[test]
    fn limits_round_up_to_whole_quota_blocks() {
        assert_eq!(limit_blocks(0), 0);
        assert_eq!(limit_blocks(1), 1);
        assert_eq!(limit_blocks(1024), 1);
        assert_eq!(limit_blocks(1025), 2);
        assert_eq!(limit_blocks(1 << 30), 1 << 20);
    }

    #[test]
    fn allocation_skips_ids_with_files_and_wraps() {
        let used = [FIRST_PROJECT_ID, FIRST_PROJECT_ID + 1, FIRST_PROJECT_ID + 3];
        let inodes = |id: u32| Ok(if used.contains(&id) { 3 } else { 0 });
        assert_eq!(first_free(0, inodes).unwrap(), FIRST_PROJECT_ID + 2);
        assert_eq!(first_free(FIRST_PROJECT_ID + 3, inodes).unwrap(), FIRST_PROJECT_ID + 4);
        // From the top of the range it wraps to the bottom rather than failing.
        let top = |id: u32| Ok(if id == u32::MAX { 1 } else { 0 });
        assert_eq!(first_free(u32::MAX, top).unwrap(), FIRST_PROJECT_ID);
        // An error reading usage is not mistaken for a free ID.
        assert!(first_free(0, |_| Err(std::io::Error::other("EIO"))).is_err());
    }
}
