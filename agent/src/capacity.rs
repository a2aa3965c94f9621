//! Capacity arithmetic (terms.md): pure functions of what the agent observed, so the rules are tested without a
//! disk. The one rule behind all of them: never promise a byte that a volume already made may still claim.

/// What statvfs says of a filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    /// Size of the filesystem.
    pub size_bytes: u64,
    /// Bytes an unprivileged writer can still write (f_bavail).
    pub available_bytes: u64,
    /// Inodes in all (f_files; 0 when the filesystem does not say) and still free to unprivileged writers
    /// (f_favail): a filesystem out of inodes takes no new file, whatever its free bytes.
    pub inodes: u64,
    pub available_inodes: u64,
}

impl FsUsage {
    /// The bytes the free inodes stand for, at the filesystem's own ratio of bytes to inodes: a volume gets its
    /// share of inodes with its bytes (backend::quota::limit_inodes), so free inodes limit what can be promised.
    fn inode_bound_bytes(&self) -> u64 {
        if self.inodes == 0 {
            return u64::MAX;
        }
        let bytes = u128::from(self.available_inodes) * u128::from(self.size_bytes) / u128::from(self.inodes);
        u64::try_from(bytes).unwrap_or(u64::MAX)
    }
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
    /// Space that is taken and cannot grow: counted as allocated, with nothing more to claim (debris).
    pub fn settled(size_bytes: u64) -> VolumeUsage {
        VolumeUsage { size_bytes, used_bytes: Some(size_bytes) }
    }

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
    let fs_free =
        fs.available_bytes.min(fs.inode_bound_bytes()).saturating_sub(limits.headroom).saturating_sub(still_claimable);
    let free = capacity.saturating_sub(allocated).min(fs_free);
    // A directory can grow to anything the filesystem has, so the largest single volume is all that is free.
    Capacity { capacity, allocated, free, maximum_volume_size: free }
}

/// What lvm2 reports of an lvm pool's space.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LvmSpace {
    /// Thick volumes: the volume group's size and unallocated bytes (whole extents).
    Thick { vg_size: u64, vg_free: u64 },
    /// Thin volumes in a thin pool of `pool_size` data bytes, `data_percent` of it written and `metadata_percent`
    /// of its metadata used (`None`: lvm2 reports none, as for an inactive thin pool: unknown, so nothing is
    /// promised), and `virtual_sum`:
    /// the virtual sizes of every thin volume in the pool (Berth's or not, snapshots included).
    Thin {
        pool_size: u64,
        data_percent: Option<f64>,
        metadata_percent: Option<f64>,
        virtual_sum: u64,
        ratio: f64,
        threshold_percent: f64,
    },
}

/// The capacity of an lvm pool. Thick: free is what the volume group has unallocated (other LVs in it, Berth's
/// or not, are already subtracted by lvm2). Thin: capacity is the thin pool's size × the overprovision ratio,
/// free is that minus every thin volume's virtual size, and nothing once the pool's data usage reached the
/// threshold. `own_sizes` are the sizes promised to the pool's volumes; the config's cap and headroom apply.
pub fn lvm_capacity(limits: PoolLimits, space: LvmSpace, own_sizes: &[u64]) -> Capacity {
    let allocated: u64 = own_sizes.iter().sum();
    let (size, available) = match space {
        LvmSpace::Thick { vg_size, vg_free } => (vg_size, vg_free),
        LvmSpace::Thin { pool_size, data_percent, metadata_percent, virtual_sum, ratio, threshold_percent } => {
            let promised = (pool_size as f64 * ratio).floor() as u64;
            // A thin pool out of metadata fails every write as surely as one out of data: either at the threshold
            // takes nothing new.
            let full = [data_percent, metadata_percent].iter().any(|p| p.is_none_or(|p| p >= threshold_percent));
            let available = if full { 0 } else { promised.saturating_sub(virtual_sum) };
            (promised, available)
        }
    };
    let capacity = limits.cap.map_or(size, |cap| cap.min(size));
    let free = capacity.saturating_sub(allocated).min(available.saturating_sub(limits.headroom));
    Capacity { capacity, allocated, free, maximum_volume_size: free }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GI: u64 = 1 << 30;

    fn fs(size: u64, available: u64) -> FsUsage {
        // Plenty of inodes: one per KiB, all free.
        FsUsage { size_bytes: size, available_bytes: available, inodes: size >> 10, available_inodes: size >> 10 }
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
    fn free_inodes_bound_what_is_promised() {
        // 100 GiB, one inode per MiB, 90 GiB of bytes free but only a tenth of the inodes: 10 GiB's worth.
        let short =
            FsUsage { size_bytes: 100 * GI, available_bytes: 90 * GI, inodes: 102_400, available_inodes: 10_240 };
        assert_eq!(pool_capacity(NO_LIMITS, short, &[], &[]).free, 10 * GI);
        // Out of inodes: nothing, whatever the bytes.
        assert_eq!(pool_capacity(NO_LIMITS, FsUsage { available_inodes: 0, ..short }, &[], &[]).free, 0);
        // A filesystem that reports no inode count is bound by its bytes only.
        let uncounted = FsUsage { inodes: 0, available_inodes: 0, ..short };
        assert_eq!(pool_capacity(NO_LIMITS, uncounted, &[], &[]).free, 90 * GI);
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

    fn thin(pool: u64, percent: f64, virtual_sum: u64, ratio: f64) -> LvmSpace {
        LvmSpace::Thin {
            pool_size: pool,
            data_percent: Some(percent),
            metadata_percent: Some(1.0),
            virtual_sum,
            ratio,
            threshold_percent: 90.0,
        }
    }

    #[test]
    fn thick_lvm_pool_offers_the_volume_groups_free_extents() {
        // 10 GiB VG, 3 GiB ours, 2 GiB someone else's: 5 GiB free, whatever the sizes say.
        let c = lvm_capacity(NO_LIMITS, LvmSpace::Thick { vg_size: 10 * GI, vg_free: 5 * GI }, &[3 * GI]);
        assert_eq!(c, Capacity { capacity: 10 * GI, allocated: 3 * GI, free: 5 * GI, maximum_volume_size: 5 * GI });
        let capped = PoolLimits { cap: Some(4 * GI), headroom: 0 };
        assert_eq!(lvm_capacity(capped, LvmSpace::Thick { vg_size: 10 * GI, vg_free: 5 * GI }, &[3 * GI]).free, GI);
        let headroom = PoolLimits { cap: None, headroom: GI };
        assert_eq!(lvm_capacity(headroom, LvmSpace::Thick { vg_size: 10 * GI, vg_free: 5 * GI }, &[]).free, 4 * GI);
    }

    #[test]
    fn thin_pool_is_its_size_times_the_ratio_minus_every_virtual_size() {
        // 10 GiB pool × 3 = 30 GiB; 12 GiB of thin volumes (8 ours, 4 a snapshot or someone else's).
        let c = lvm_capacity(NO_LIMITS, thin(10 * GI, 20.0, 12 * GI, 3.0), &[8 * GI]);
        assert_eq!(c, Capacity { capacity: 30 * GI, allocated: 8 * GI, free: 18 * GI, maximum_volume_size: 18 * GI });
        // Ratio 1: never more virtual than real.
        assert_eq!(lvm_capacity(NO_LIMITS, thin(10 * GI, 0.0, 12 * GI, 1.0), &[]).free, 0);
        assert_eq!(lvm_capacity(NO_LIMITS, thin(10 * GI, 0.0, 4 * GI, 1.5), &[]).free, 11 * GI);
    }

    #[test]
    fn a_thin_pool_whose_usage_lvm2_does_not_report_promises_nothing() {
        let space = |data_percent, metadata_percent| LvmSpace::Thin {
            pool_size: 10 * GI,
            data_percent,
            metadata_percent,
            virtual_sum: 0,
            ratio: 1.0,
            threshold_percent: 90.0,
        };
        assert_eq!(lvm_capacity(NO_LIMITS, space(Some(1.0), Some(1.0)), &[]).free, 10 * GI);
        assert_eq!(lvm_capacity(NO_LIMITS, space(None, Some(1.0)), &[]).free, 0, "an empty report is not 0 % used");
        assert_eq!(lvm_capacity(NO_LIMITS, space(Some(1.0), None), &[]).free, 0, "nor is an empty metadata report");
    }

    #[test]
    fn a_thin_pool_out_of_metadata_takes_nothing_new() {
        let space = |metadata_percent| LvmSpace::Thin {
            pool_size: 10 * GI,
            data_percent: Some(1.0),
            metadata_percent: Some(metadata_percent),
            virtual_sum: 0,
            ratio: 1.0,
            threshold_percent: 90.0,
        };
        assert_eq!(lvm_capacity(NO_LIMITS, space(89.9), &[]).free, 10 * GI);
        assert_eq!(lvm_capacity(NO_LIMITS, space(90.0), &[]).free, 0);
    }

    #[test]
    fn thin_pool_past_its_data_threshold_takes_nothing_new() {
        assert_eq!(lvm_capacity(NO_LIMITS, thin(10 * GI, 89.9, GI, 3.0), &[GI]).free, 29 * GI);
        let full = lvm_capacity(NO_LIMITS, thin(10 * GI, 90.0, GI, 3.0), &[GI]);
        assert_eq!((full.free, full.maximum_volume_size, full.capacity), (0, 0, 30 * GI));
    }
}
