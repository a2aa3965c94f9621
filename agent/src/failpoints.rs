//! Test-only crash points (the `fail` crate): at each durable step of creating, publishing, expanding and deleting a
//! volume the agent can be made to kill itself with SIGKILL, as a power cut would (minus the page cache): nothing
//! after the point runs, no destructor, no cleanup. Compiled to nothing unless the `failpoints` feature is on, which
//! only the `berth-agent-failpoints` binary of the crash tests has. `FAILPOINTS=hostpath-create-after-rename=return`
//! arms one (agent/tests/crash_matrix.rs for hostpath pools, the VM tier's `lvm_crash_matrix` for lvm pools).
//! `return(pause)` stops the request there for good instead, the agent living on, for a power cut from outside to
//! find it there (the VM tier's `quota_phase_one`); `10*off->return(pause)` lets the first ten requests through.
//!
//! Names are `<backend>-<operation>-after-<step>`: the operation tells a test what request reaches the point.

/// Every crash point, in the order an operation meets them. The crash tests go through all of them; a unit test
/// checks that each is in the code exactly once and that the code has no other.
pub const POINTS: &[&str] = &[
    // hostpath create: the volume is built in `.berth-tmp/` and renamed into place (backend/hostpath.rs).
    "hostpath-create-after-mkdir",
    "hostpath-create-after-project",
    "hostpath-create-after-data-dir",
    "hostpath-create-after-unpublished-mark",
    "hostpath-create-after-marker",
    "hostpath-create-after-staging-sync",
    "hostpath-create-after-rename",
    "hostpath-create-after-root-sync",
    // hostpath clone: staged as a create is (the points above), then the source's files copied into it without
    // the agent's lock (copy_tree.rs; armed with `return`, after the first file), synced, and put in place by the
    // create's rename.
    "hostpath-clone-after-file",
    "hostpath-clone-after-copy",
    // hostpath publish: the `unpublished` mark removed (then the directory synced and the answer sent).
    "hostpath-publish-after-unmark",
    // hostpath expand: the quota raised, then the marker replaced (tmp written and synced, renamed, dir synced).
    "hostpath-expand-after-quota",
    "hostpath-expand-after-tmp-marker",
    "hostpath-expand-after-rename",
    "hostpath-expand-after-sync",
    // hostpath delete: moved into `.berth-tmp/` (detach), then removed (purge: the same code removes debris).
    "hostpath-detach-after-rename",
    "hostpath-detach-after-sync",
    "hostpath-purge-after-release-project",
    // After each entry remove_tree unlinks (safe_remove.rs): armed with `return`, after the first one.
    "hostpath-purge-after-unlink",
    // lvm create: the LV made with its record and `berth:creating`; a filesystem volume's mkfs, mount, data/ made
    // and synced; a thick raw block volume's zeroing (BLKZEROOUT, without the agent's lock; the point is where the
    // create is finished under it again); `creating` lifted (backend/lvm.rs).
    "lvm-create-after-lvcreate",
    "lvm-create-after-mkfs",
    "lvm-create-after-mount",
    "lvm-create-after-data-dir",
    "lvm-create-after-zero",
    "lvm-create-after-untag",
    // lvm clone (thin pools): the thin snapshot made with the clone's record and `berth:creating`, an unmounted LV
    // (then activated and, if larger, lvextended: a crash there leaves the same, only larger, so no point of its
    // own); an XFS clone's UUID made its own (mounted `nouuid` to replay its log, unmounted, `xfs_admin -U`): still
    // unmounted, but no longer its source's twin, and its mount point made; mounted: debris a crash leaves mounted,
    // which its removal unmounts (a crash between the `nouuid` mount and its unmount, or after a larger clone's
    // filesystem is grown, leaves the same). Then `creating` lifted, as a create's (`lvm-create-after-untag`).
    "lvm-clone-after-lvcreate",
    "lvm-clone-after-uuid",
    "lvm-clone-after-mount",
    // lvm publish: `berth:unpublished` lifted.
    "lvm-publish-after-untag",
    // lvm expand: lvextend, the filesystem grown, the size tag replaced.
    "lvm-expand-after-lvextend",
    "lvm-expand-after-resize",
    "lvm-expand-after-retag",
    // lvm expand of a thick raw block volume: the spare LV `<lv>.grow` made on the new extents (tagged
    // `berth:creating`), zeroed (without the lock; the point is where the expansion is finished under it again),
    // removed, lvextend onto exactly its extents; then the size tag replaced as above (no point of its own: what a
    // crash there leaves is what `lvm-expand-after-retag` leaves).
    "lvm-expand-after-spare-lvcreate",
    "lvm-expand-after-spare-zero",
    "lvm-expand-after-spare-lvremove",
    "lvm-expand-after-spare-lvextend",
    // lvm delete: unmounted (after the in-use check) and the mount point removed, tagged `berth:deleting`
    // (detach); zeroed (thick pools: BLKZEROOUT) and removed (purge: the same code removes debris).
    "lvm-detach-after-unmount",
    "lvm-detach-after-tag",
    "lvm-purge-after-zero",
    "lvm-purge-after-lvremove",
];

/// Kills the agent with SIGKILL here if FAILPOINTS arms `name` (any action that fires, e.g. `return`), or stops the
/// calling thread here for good if the action is `return(pause)` (logged, so a test knows the request got here);
/// nothing without the `failpoints` feature.
#[inline]
pub fn point(name: &str) {
    #[cfg(feature = "failpoints")]
    if let Some(arg) = fail::eval(name, |arg| arg) {
        if arg.as_deref() == Some("pause") {
            tracing::warn!(failpoint = name, "failpoint: this request stops here until the agent dies");
            loop {
                std::thread::park();
            }
        }
        tracing::warn!(failpoint = name, "failpoint: killing the agent with SIGKILL");
        // SAFETY: kill(2) with this process's own ID and a signal number; no memory is involved.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        // SIGKILL to oneself is delivered before kill(2) returns to a thread that can take it; this thread never
        // goes on either way.
        loop {
            std::thread::park();
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

#[cfg(test)]
mod tests {
    use super::POINTS;

    /// The names of every `failpoints::point("…")` call in the agent's sources, with repeats.
    fn points_in_sources() -> Vec<String> {
        let mut found = Vec::new();
        let mut dirs = vec![std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("failpoints.rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for rest in text.split("failpoints::point(\"").skip(1) {
                        found.push(rest.split('"').next().unwrap().to_owned());
                    }
                }
            }
        }
        found
    }

    #[test]
    fn every_point_is_in_the_code_exactly_once_and_the_code_has_no_other() {
        let found = points_in_sources();
        for name in POINTS {
            let n = found.iter().filter(|f| f == name).count();
            assert_eq!(n, 1, "crash point {name:?} is in the sources {n} times");
        }
        let unlisted: Vec<&String> = found.iter().filter(|f| !POINTS.contains(&f.as_str())).collect();
        assert!(unlisted.is_empty(), "crash points not in POINTS (so in no test): {unlisted:?}");
        let mut names = POINTS.to_vec();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), POINTS.len(), "POINTS names a point twice");
    }

    #[test]
    fn names_say_backend_and_operation() {
        for name in POINTS {
            let mut parts = name.splitn(3, '-');
            let (backend, operation) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(["hostpath", "lvm"].contains(&backend), "{name}");
            assert!(["create", "clone", "publish", "expand", "detach", "purge"].contains(&operation), "{name}");
            assert!(parts.next().is_some_and(|step| step.starts_with("after-")), "{name}");
        }
    }
}
