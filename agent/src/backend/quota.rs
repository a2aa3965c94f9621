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
//! - Project IDs change only through this ioctl from the initial user namespace; a process owning a file (or with
//!   CAP_FOWNER) can use it too (`chattr -p`), moving the file out of its volume's project and into any other: the
//!   known limit of project quotas as isolation. Berth picks IDs at random so another volume's is not guessable.
//!
//! Privileges: reading the quota state (`Q_XGETQSTATV`) needs none; every other quota call on a project
//! (`Q_GETQUOTA`, `Q_SETQUOTA`) needs CAP_SYS_ADMIN, and container runtimes' default seccomp profiles (containerd's
//! and Docker's `RuntimeDefault`) allow the `quotactl` and `quotactl_fd` syscalls at all only to a container that
//! has CAP_SYS_ADMIN; others get EPERM. Setting a directory's project needs only its ownership or CAP_FOWNER, from
//! the initial user namespace. An agent refused quotactl cannot give volumes limits: [`QuotaState::Refused`].

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

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

/// Berth's project IDs: far above the small numbers administrators pick by hand (`/etc/projid`) and kubelet's own
/// range (from 1048577); within 32 bits for XFS (projid32bit, the default). `u32::MAX` is the kernel's invalid ID.
pub const PROJECT_IDS: std::ops::RangeInclusive<u32> = 1_000_000_000..=u32::MAX - 1;

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

const FS_IOC_FSGETXATTR: libc::Ioctl = libc::_IOR::<FsXattr>(b'X' as u32, 31);
const FS_IOC_FSSETXATTR: libc::Ioctl = libc::_IOW::<FsXattr>(b'X' as u32, 32);

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
    /// The filesystem has project quotas (or its mount asks for them), but the kernel refuses the agent what
    /// using them takes (EPERM or EACCES): volumes can get no projects.
    Refused(Refused),
}

impl QuotaState {
    /// Whether new volumes get projects of their own (and recovered ones their limits back).
    pub fn gives_projects(self) -> bool {
        matches!(self, QuotaState::Enforced | QuotaState::Accounted)
    }
}

/// What the kernel refused the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `quotactl`: the agent lacks CAP_SYS_ADMIN, or a seccomp profile refuses the syscall.
    Quotactl,
    /// `FS_IOC_FSSETXATTR` of a new volume's directory: a security module, or an agent without CAP_FOWNER.
    SetProject,
}

/// Whether `e` is the kernel refusing the caller (EPERM, EACCES) rather than failing.
pub fn is_refusal(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES))
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

/// The project quota state of the filesystem `fs` is on, as far as the agent may use it.
pub fn state(fs: &File) -> std::io::Result<QuotaState> {
    let mut st = QuotaStatV { version: FS_QSTATV_VERSION1, pad1: 0, flags: 0, rest: [0; 252] };
    let flags = quotactl(fs, qcmd(Q_XGETQSTATV, PRJQUOTA), 0, (&raw mut st).cast()).map(|()| st.flags);
    // Project 0 is every file's until it is given another, so asking for its usage creates nothing.
    let access = || usage(fs, 0).map(drop);
    let options = || {
        let dev = fs.metadata().ok()?.dev();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        super_options(&mountinfo, (rustix::fs::major(dev), rustix::fs::minor(dev))).map(str::to_owned)
    };
    state_from(flags, access, options)
}

/// The state from the kernel's answers: `flags`, `Q_XGETQSTATV`'s; `access`, asked when they show quotas, a call
/// that needs what using them needs (reading the state needs no privilege, so a kernel that shows quotas may still
/// refuse every other call); `options`, asked when `Q_XGETQSTATV` itself is refused (a seccomp profile refuses the
/// syscall whatever it asks), the filesystem's mount options from mountinfo (`None`: not found).
///
/// The errors of a filesystem or kernel without project quotas mean `Off`; a refusal means `Refused` unless the
/// mount options say the filesystem has no project quotas anyway (a pool without them is not worth a warning);
/// any other error (EIO, ENOMEM…) is not an answer, and a volume must not be made without its limit because of it.
fn state_from(
    flags: std::io::Result<u16>,
    access: impl FnOnce() -> std::io::Result<()>,
    options: impl FnOnce() -> Option<String>,
) -> std::io::Result<QuotaState> {
    let flags = match flags {
        Ok(flags) => flags,
        Err(e) if is_refusal(&e) => {
            let off = options().is_some_and(|o| !asks_for_project_quotas(&o));
            return Ok(if off { QuotaState::Off } else { QuotaState::Refused(Refused::Quotactl) });
        }
        Err(e) => {
            let none = [libc::ENOSYS, libc::ESRCH, libc::EINVAL, libc::EOPNOTSUPP, libc::ENOTTY];
            return if e.raw_os_error().is_some_and(|n| none.contains(&n)) { Ok(QuotaState::Off) } else { Err(e) };
        }
    };
    let state = match (flags & FS_QUOTA_PDQ_ACCT != 0, flags & FS_QUOTA_PDQ_ENFD != 0) {
        (true, true) => QuotaState::Enforced,
        (true, false) => QuotaState::Accounted,
        _ => return Ok(QuotaState::Off),
    };
    // Only a refusal changes the answer: another error here is for the create's own calls to report.
    Ok(match access() {
        Err(e) if is_refusal(&e) => QuotaState::Refused(Refused::Quotactl),
        _ => state,
    })
}

/// The super options (per filesystem, so any mount of it will do) of the filesystem on device `dev` in
/// `/proc/self/mountinfo` text.
fn super_options(mountinfo: &str, dev: (u32, u32)) -> Option<&str> {
    let dev = format!("{}:{}", dev.0, dev.1);
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        if mount.split(' ').nth(2)? != dev {
            return None;
        }
        // "<fstype> <source> <super options>"
        fs.split(' ').nth(2)
    })
}

/// Whether mount options ask for project quotas: XFS shows `prjquota` (enforced) or `pqnoenforce` (counted only),
/// ext4 `prjquota`. (ext4 with the quota feature but without the option counts usage and enforces nothing: its
/// options do not show it, and no limit would hold there anyway.)
fn asks_for_project_quotas(options: &str) -> bool {
    options.split(',').any(|o| matches!(o, "prjquota" | "pquota" | "pqnoenforce"))
}

/// The project of a file or directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Project {
    pub id: u32,
    /// New files and directories made inside take its ID.
    pub inherit: bool,
}

/// The project of the file or directory `f`.
pub fn project_of(f: &File) -> std::io::Result<Project> {
    let mut attr = FsXattr::default();
    // SAFETY: FS_IOC_FSGETXATTR writes one `struct fsxattr`, which `attr` is.
    if unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FSGETXATTR, &raw mut attr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Project { id: attr.projid, inherit: attr.xflags & FS_XFLAG_PROJINHERIT != 0 })
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

/// The fewest inodes a volume's limit allows, however small the volume.
pub const MIN_INODES: u64 = 1024;

/// The hard inode limit for a volume of `bytes` on a filesystem of `fs_bytes` with `fs_inodes` inodes in all: its
/// share of the inodes, as its share of the bytes (at least [`MIN_INODES`]). Without it a pod could use up a shared
/// ext4's fixed inode table with empty files, which cost no blocks, and every other volume there could make no file.
/// `None` when the filesystem reports no inode count (0).
pub fn limit_inodes(bytes: u64, fs_bytes: u64, fs_inodes: u64) -> Option<u64> {
    if fs_inodes == 0 || fs_bytes == 0 {
        return None;
    }
    let share = (u128::from(bytes) * u128::from(fs_inodes)).div_ceil(u128::from(fs_bytes));
    Some(u64::try_from(share).unwrap_or(u64::MAX).max(MIN_INODES))
}

/// Limits project `id` on `fs` to `bytes` and its share of the filesystem's inodes (hard limits, no soft limits).
pub fn set_limit(fs: &File, id: u32, bytes: u64) -> std::io::Result<()> {
    let st = rustix::fs::fstatvfs(fs)?;
    // SAFETY: dqblk is plain integers; all-zero is a valid value.
    let mut q: libc::dqblk = unsafe { std::mem::zeroed() };
    q.dqb_bhardlimit = limit_blocks(bytes);
    q.dqb_bsoftlimit = 0;
    q.dqb_valid = libc::QIF_BLIMITS;
    if let Some(inodes) = limit_inodes(bytes, st.f_blocks * st.f_frsize, st.f_files) {
        q.dqb_ihardlimit = inodes;
        q.dqb_isoftlimit = 0;
        q.dqb_valid |= libc::QIF_ILIMITS;
    }
    quotactl(fs, qcmd(libc::Q_SETQUOTA, PRJQUOTA), id, (&raw mut q).cast())
}

/// Removes project `id`'s limits on `fs` (zero is "no limit"), so that the filesystem's quota records do not grow
/// with every volume ever made: XFS and ext4 keep a record for an ID as long as it has a limit.
pub fn clear_limit(fs: &File, id: u32) -> std::io::Result<()> {
    // SAFETY: as in `set_limit`.
    let mut q: libc::dqblk = unsafe { std::mem::zeroed() };
    q.dqb_valid = libc::QIF_BLIMITS | libc::QIF_ILIMITS;
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

/// The first project ID of [`PROJECT_IDS`] from `start` on (wrapping round) that no file on the filesystem
/// carries, by `inodes_of(id)`. A file that carries an ID is counted in its usage, so an ID without inodes is
/// free: live volumes, volumes being removed and other tools' projects all have inodes. The caller serialises
/// allocations (the agent's lock) and marks the directory before the next one, so two volumes never share an ID.
pub fn first_free(start: u32, mut inodes_of: impl FnMut(u32) -> std::io::Result<u64>) -> std::io::Result<u32> {
    let (first, last) = (*PROJECT_IDS.start(), *PROJECT_IDS.end());
    let start = start.clamp(first, last);
    let ids = (start..=last).chain(first..start);
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
        #[cfg(target_arch = "x86_64")]
        assert_eq!((FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR), (0x801c_581f, 0x401c_5820));
        assert_eq!(qcmd(libc::Q_GETQUOTA, PRJQUOTA), 0x8000_0702_u32 as i32);
        assert_eq!(qcmd(Q_XGETQSTATV, PRJQUOTA), 0x0058_0802);
        assert_eq!(size_of::<libc::dqblk>(), 72);
        // struct fs_quota_statv is 160 bytes; the buffer must hold all of it.
        assert!(size_of::<QuotaStatV>() >= 160);
    }

    #[test]
    fn a_volume_gets_its_share_of_the_inodes() {
        const MI: u64 = 1 << 20;
        // A 128 MiB ext4 with one inode per 4 KiB: a 16 MiB volume may make 4096 files.
        assert_eq!(limit_inodes(16 * MI, 128 * MI, 32768), Some(4096));
        // Rounded up, never below the floor.
        assert_eq!(limit_inodes(16 * MI + 1, 128 * MI, 32768), Some(4097));
        assert_eq!(limit_inodes(MI, 128 * MI, 32768), Some(MIN_INODES));
        // No inode count (some filesystems report 0): no inode limit.
        assert_eq!(limit_inodes(16 * MI, 128 * MI, 0), None);
        // Huge numbers do not overflow.
        assert_eq!(limit_inodes(u64::MAX, 1, u64::MAX), Some(u64::MAX));
    }

    #[test]
    fn limits_round_up_to_whole_quota_blocks() {
        assert_eq!(limit_blocks(0), 0);
        assert_eq!(limit_blocks(1), 1);
        assert_eq!(limit_blocks(1024), 1);
        assert_eq!(limit_blocks(1025), 2);
        assert_eq!(limit_blocks(1 << 30), 1 << 20);
    }

    fn err<T>(n: i32) -> std::io::Result<T> {
        Err(std::io::Error::from_raw_os_error(n))
    }

    /// The state from `Q_XGETQSTATV`'s answer, the privileged call allowed and no mount options found.
    fn state_of(flags: std::io::Result<u16>) -> std::io::Result<QuotaState> {
        state_from(flags, || Ok(()), || None)
    }

    #[test]
    fn only_the_errors_of_no_quotas_mean_off() {
        for n in [libc::ENOSYS, libc::ESRCH, libc::EOPNOTSUPP, libc::ENOTTY] {
            assert_eq!(state_of(err(n)).unwrap(), QuotaState::Off, "errno {n}");
        }
        assert!(state_of(err(libc::EIO)).is_err(), "an I/O error is not 'no quotas'");
        assert_eq!(state_of(Ok(FS_QUOTA_PDQ_ACCT | FS_QUOTA_PDQ_ENFD)).unwrap(), QuotaState::Enforced);
        assert_eq!(state_of(Ok(FS_QUOTA_PDQ_ACCT)).unwrap(), QuotaState::Accounted);
        // User and group quotas only (bits 0-3): no project quotas.
        assert_eq!(state_of(Ok(0b1111)).unwrap(), QuotaState::Off);
        assert!(QuotaState::Enforced.gives_projects() && QuotaState::Accounted.gives_projects());
        assert!(!QuotaState::Off.gives_projects());
    }

    #[test]
    fn quotas_the_kernel_refuses_the_agent_are_refused_not_off() {
        const REFUSED: QuotaState = QuotaState::Refused(Refused::Quotactl);
        let enforced = || Ok(FS_QUOTA_PDQ_ACCT | FS_QUOTA_PDQ_ENFD);
        let never = || -> Option<String> { panic!("mount options are read only when the state is refused") };
        // Without CAP_SYS_ADMIN (no seccomp filter): the state is shown, every other call refused with EPERM.
        for n in [libc::EPERM, libc::EACCES] {
            assert_eq!(state_from(enforced(), || err(n), never).unwrap(), REFUSED, "errno {n}");
        }
        assert_eq!(state_from(Ok(FS_QUOTA_PDQ_ACCT), || err(libc::EPERM), never).unwrap(), REFUSED);
        // Another error of that call is not a refusal: the create's own calls report it.
        assert_eq!(state_from(enforced(), || err(libc::EIO), never).unwrap(), QuotaState::Enforced);
        // Without quotas the privileged call is not made at all.
        let unasked = || -> std::io::Result<()> { panic!("no quotas, nothing to ask") };
        assert_eq!(state_from(Ok(0), unasked, never).unwrap(), QuotaState::Off);
        assert_eq!(state_from(err(libc::ENOSYS), unasked, never).unwrap(), QuotaState::Off);

        // Under RuntimeDefault seccomp without CAP_SYS_ADMIN even the state is refused: the mount options tell
        // whether there was anything to refuse.
        let refused_state =
            |options: Option<&str>| state_from(err(libc::EPERM), unasked, || options.map(str::to_owned)).unwrap();
        assert_eq!(refused_state(Some("rw,attr2,inode64,logbufs=8,logbsize=32k,prjquota")), REFUSED, "xfs");
        assert_eq!(refused_state(Some("rw,attr2,inode64,pqnoenforce")), REFUSED, "xfs, counted only");
        assert_eq!(refused_state(Some("rw,relatime,prjquota")), REFUSED, "ext4");
        assert_eq!(refused_state(Some("rw,attr2,inode64,logbufs=8,logbsize=32k,noquota")), QuotaState::Off);
        assert_eq!(refused_state(Some("rw,relatime,usrquota")), QuotaState::Off, "user quotas only");
        assert_eq!(refused_state(Some("rw")), QuotaState::Off, "tmpfs, ext4 without quotas");
        // Options not found: the refusal stands (loud rather than silent).
        assert_eq!(refused_state(None), REFUSED);
        assert!(!REFUSED.gives_projects());
    }

    #[test]
    fn super_options_are_found_by_device() {
        let mountinfo = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
98 22 253:3 / /var/lib/berth/pools rw,relatime shared:50 - xfs /dev/mapper/vg-berth rw,attr2,inode64,prjquota
99 98 253:3 /fast /var/lib/berth/pools/fast rw,relatime shared:50 - xfs /dev/mapper/vg-berth rw,attr2,inode64,prjquota
";
        assert_eq!(super_options(mountinfo, (253, 3)), Some("rw,attr2,inode64,prjquota"));
        assert_eq!(super_options(mountinfo, (259, 2)), Some("rw,errors=remount-ro"));
        assert_eq!(super_options(mountinfo, (8, 1)), None);
        // Optional fields before the separator vary in number: the device is always the third field.
        let more = "30 22 0:27 / /tmp rw shared:3 master:2 - tmpfs tmpfs rw,size=1024k\n";
        assert_eq!(super_options(more, (0, 27)), Some("rw,size=1024k"));
    }

    #[test]
    fn allocation_skips_ids_with_files_and_wraps() {
        let first = *PROJECT_IDS.start();
        let used = [first, first + 1, first + 3];
        let inodes = |id: u32| Ok(if used.contains(&id) { 3 } else { 0 });
        assert_eq!(first_free(0, inodes).unwrap(), first + 2);
        assert_eq!(first_free(first + 3, inodes).unwrap(), first + 4);
        // From the top of the range it wraps to the bottom rather than failing; the kernel's invalid ID is never
        // handed out.
        let top = |id: u32| Ok(if id == u32::MAX - 1 { 1 } else { 0 });
        assert_eq!(first_free(u32::MAX, top).unwrap(), first);
        // An error reading usage is not mistaken for a free ID.
        assert!(first_free(0, |_| Err(std::io::Error::other("EIO"))).is_err());
    }
}
