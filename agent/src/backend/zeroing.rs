//! Writing zeroes over (part of) a block device, in the agent's own process: `BLKZEROOUT`, the kernel's "make
//! this range read back as zeroes" (WRITE ZEROES where the device has it, else written zero pages; never a mere
//! discard, which does not promise zeroes). Used on thick LVs before anyone gets their bytes: a new or grown block
//! volume, and a deleted LV before its extents are freed.
//!
//! The ioctl cannot be interrupted any more than a command should be killed, so it runs through
//! [`crate::command::call`]: it gets a deadline that grows with the bytes ([`deadline`]), and one that outlives it
//! is left to finish while its pool is busy.

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

/// `BLKZEROOUT`, `_IO(0x12, 127)` in linux/fs.h (the libc crate does not define it). Takes `[offset, length]` in
/// bytes, both multiples of the logical block size.
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// The slowest disk Berth plans for: zeroing gets the pool's command deadline plus the bytes at this rate.
const SLOWEST_BYTES_PER_SECOND: u64 = 10 << 20;

/// How long zeroing `len` bytes may take before its pool counts as busy.
pub fn deadline(base: Duration, len: u64) -> Duration {
    base + Duration::from_secs(len / SLOWEST_BYTES_PER_SECOND)
}

/// Zeroes `len` bytes of `device` from `offset`, durably. The device is opened exclusively (`O_EXCL`): a mounted
/// filesystem, or anything else that claimed it, makes this fail (EBUSY) rather than write under it.
pub fn zero_out(device: &Path, offset: u64, len: u64) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_EXCL).open(device)?;
    let range: [u64; 2] = [offset, len];
    // SAFETY: the descriptor is open for the call's duration; BLKZEROOUT reads two u64 from the pointer.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKZEROOUT, range.as_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_grows_with_the_bytes() {
        let base = Duration::from_secs(60);
        assert_eq!(deadline(base, 0), base);
        assert_eq!(deadline(base, 1 << 30), base + Duration::from_secs(102));
    }

    #[test]
    fn a_file_that_is_no_block_device_is_refused() {
        // BLKZEROOUT works on block devices only (the VM tests zero real LVs).
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, [1u8; 4096]).unwrap();
        let e = zero_out(&file, 0, 4096).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), [1u8; 4096]);
    }

    /// A loop device over a file of `bytes`, filled with 0xAB; detached when dropped.
    struct Loop {
        _dir: tempfile::TempDir,
        image: std::path::PathBuf,
        device: String,
    }

    impl Loop {
        fn new(bytes: usize) -> Loop {
            let dir = tempfile::tempdir().unwrap();
            let image = dir.path().join("disk.img");
            std::fs::write(&image, vec![0xABu8; bytes]).unwrap();
            let out = std::process::Command::new("losetup").args(["--find", "--show"]).arg(&image).output().unwrap();
            assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
            let device = String::from_utf8(out.stdout).unwrap().trim().to_owned();
            Loop { _dir: dir, image, device }
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup").args(["-d", &self.device]).status();
        }
    }

    #[test]
    fn exactly_the_range_reads_back_as_zeroes_and_a_mounted_device_is_left_alone() {
        let disk = Loop::new(1 << 20);
        zero_out(Path::new(&disk.device), 64 << 10, 128 << 10).unwrap();
        let bytes = std::fs::read(&disk.image).unwrap();
        assert!(bytes[..64 << 10].iter().all(|&b| b == 0xAB), "before the range: untouched");
        assert!(bytes[64 << 10..192 << 10].iter().all(|&b| b == 0), "the range: zeroes, on the backing file");
        assert!(bytes[192 << 10..].iter().all(|&b| b == 0xAB), "after the range: untouched");

        // Held exclusively (as a mounted filesystem holds its device): refused, nothing written.
        let held = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(&disk.device).unwrap();
        let e = zero_out(Path::new(&disk.device), 0, 64 << 10).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{e}");
        drop(held);
        assert!(std::fs::read(&disk.image).unwrap()[..64 << 10].iter().all(|&b| b == 0xAB));
    }
}
