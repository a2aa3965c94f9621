//! Capacity arithmetic (terms.md): pure functions of what the agent observed, so the rules are tested without a
//! disk. The one rule behind all of them: never promise a byte that a volume already made may still claim.

/// What statvfs says of a filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    /// Size of the filesystem.
    pub size_bytes: u64,
    /// Bytes an unprivileged writer can still write (f_bavail).
    pub available_bytes: u64,
}

/// One live volume on a filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeUsage {
    /// The size promised to it.
    pub size_bytes: u64,
    /// Bytes it uses now, where the filesystem tracks it (project quotas); `None` when unknown.
    pub used_bytes: Option<u64>,
}

impl VolumeUsage {
    /// Bytes this volume may still write and that the filesystem's available space does not yet reflect.
    /// Unknown usage counts as nothing written yet: conservative (the bytes it did write are then counted twice,
    /// once in the filesystem's used space and once here), never over-promising.
    fn may_still_claim(&self) -> u64 {
        self.size_bytes.saturating_sub(self.used_bytes.unwrap_or(0))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLimits {
    /// "Hand out at most this much of this disk."
    pub cap: Option<u64>,
    /// Never promise the last this-much of the filesystem.
    pub headroom: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capacity {
    pub capacity: u64,
    pub allocated: u64,
    pub free: u64,
    pub maximum_volume_size: u64,
}

/// The capacity of one pool on filesystem `fs`. `own` are the pool's volumes; `others` the volumes of every
/// other pool on the same filesystem, so that two pools sharing a disk never promise the same bytes twice.
pub fn pool_capacity(limits: PoolLimits, fs: FsUsage, own: &[VolumeUsage], others: &[VolumeUsage]) -> Capacity {
    let capacity = limits.cap.map_or(fs.size_bytes, |cap| cap.min(fs.size_bytes));
    let allocated: u64 = own.iter().map(|v| v.size_bytes).sum();
    let still_claimable: u64 = own.iter().chain(others).map(VolumeUsage::may_still_claim).sum();
    let fs_free = fs.available_bytes.saturating_sub(limits.headroom).saturating_sub(still_claimable);
    let free = capacity.saturating_sub(allocated).min(fs_free);
    // A directory can grow to anything the filesystem has, so the largest single volume is all that is free.
    Capacity { capacity, allocated, free, maximum_volume_size: free }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GI: u64 = 1 << 30;

    fn fs(size: u64, available: u64) -> FsUsage {
        FsUsage { size_bytes: size, available_bytes: available }
    }

    fn vol(size: u64) -> VolumeUsage {
        VolumeUsage { size_bytes: size, used_bytes: None }
    }

    const NO_LIMITS: PoolLimits = PoolLimits { cap: None, headroom: 0 };

    #[test]
    fn empty_pool_offers_the_available_space() {
        let c = pool_capacity(NO_LIMITS, fs(100 * GI, 90 * GI), &[], &[]);
        assert_eq!(c, Capacity { capacity: 100 * GI, allocated: 0, free: 90 * GI, maximum_volume_size: 90 * GI });
    }

    #[test]
    fn every_volume_is_assumed_to_grow_to_its_size() {
        // Two 10 GiB volumes, nothing written yet: 20 GiB of the 90 available are spoken for.
        let c = pool_capacity(NO_LIMITS, fs(100 * GI, 90 * GI), &[vol(10 * GI), vol(10 * GI)], &[]);
        assert_eq!(c.allocated, 20 * GI);
        assert_eq!(c.free, 70 * GI);
    }

    #[test]
    fn known_usage_is_exact_unknown_usage_is_conservative() {
        // A 10 GiB volume that wrote 4 GiB: available already dropped by 4, it may claim 6 more.
        let written = VolumeUsage { size_bytes: 10 * GI, used_bytes: Some(4 * GI) };
        assert_eq!(pool_capacity(NO_LIMITS, fs(100 * GI, 86 * GI), &[written], &[]).free, 80 * GI);
        // Without quotas the same situation promises less, never more.
        assert_eq!(pool_capacity(NO_LIMITS, fs(100 * GI, 86 * GI), &[vol(10 * GI)], &[]).free, 76 * GI);
        // A volume that wrote past its size (no enforcement) claims nothing more, it does not add space.
        let over = VolumeUsage { size_bytes: GI, used_bytes: Some(3 * GI) };
        assert_eq!(pool_capacity(NO_LIMITS, fs(100 * GI, 50 * GI), &[over], &[]).free, 50 * GI);
    }

    #[test]
    fn cap_bounds_capacity_and_free() {
        let limits = PoolLimits { cap: Some(30 * GI), headroom: 0 };
        let c = pool_capacity(limits, fs(100 * GI, 90 * GI), &[vol(25 * GI)], &[]);
        assert_eq!(c.capacity, 30 * GI);
        assert_eq!(c.free, 5 * GI);
        // A cap larger than the disk is not capacity the disk has.
        let big = PoolLimits { cap: Some(1000 * GI), headroom: 0 };
        assert_eq!(pool_capacity(big, fs(100 * GI, 90 * GI), &[], &[]).capacity, 100 * GI);
    }

    #[test]
    fn headroom_is_never_promised() {
        let limits = PoolLimits { cap: None, headroom: 5 * GI };
        assert_eq!(pool_capacity(limits, fs(100 * GI, 90 * GI), &[], &[]).free, 85 * GI);
        assert_eq!(pool_capacity(limits, fs(100 * GI, 3 * GI), &[], &[]).free, 0);
    }

    #[test]
    fn pools_on_one_filesystem_do_not_promise_the_same_bytes() {
        let disk = fs(100 * GI, 60 * GI);
        let a = [vol(20 * GI)];
        let b = [vol(30 * GI)];
        let free_a = pool_capacity(NO_LIMITS, disk, &a, &b).free;
        let free_b = pool_capacity(NO_LIMITS, disk, &b, &a).free;
        assert_eq!(free_a, 10 * GI);
        assert_eq!(free_b, 10 * GI);
    }

    #[test]
    fn a_disk_filled_outside_berth_shows_at_once() {
        let before = pool_capacity(NO_LIMITS, fs(10 * GI, 10 * GI), &[vol(GI)], &[]).free;
        let after = pool_capacity(NO_LIMITS, fs(10 * GI, 2 * GI), &[vol(GI)], &[]).free;
        assert_eq!((before, after), (9 * GI, GI));
        assert_eq!(pool_capacity(NO_LIMITS, fs(10 * GI, 0), &[vol(GI)], &[]).free, 0);
    }
}
