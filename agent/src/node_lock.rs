//! One agent per node. The agent holds an exclusive lock on `<state dir>/agent.lock` for as long as it runs, taken
//! before it touches a pool. Two agents on one node would both publish the node's BerthNode and work on the same
//! pools; that happens when a node moves from one of the Helm chart's DaemonSets to another (relabelled, or
//! `agent.nodeOverrides` changed): the new DaemonSet starts its pod while the old one's still finishes its work, for
//! up to its grace period. The second agent waits here until the first has exited; the kernel drops the lock with
//! the process, a kill -9 included, so nothing stale is ever left to clean up.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

use anyhow::{Context, Result};

/// The held lock: closing the file (when the agent exits) releases it.
#[derive(Debug)]
pub struct NodeLock {
    _file: File,
}

/// Takes the lock in `state_dir`, waiting (and saying so in the log) while another agent holds it.
pub fn acquire(state_dir: &Path) -> Result<NodeLock> {
    let path = state_dir.join("agent.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            tracing::warn!(
                lock = %path.display(),
                "another berth-agent is running on this node: waiting for it to exit before touching any pool"
            );
            file.lock().with_context(|| format!("locking {}", path.display()))?;
            tracing::info!("the other berth-agent has exited: starting");
        }
        Err(TryLockError::Error(e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
    }
    Ok(NodeLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_second_agent_waits_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = acquire(dir.path()).unwrap();
        let (tx, rx) = mpsc::channel();
        let path = dir.path().to_owned();
        let second = std::thread::spawn(move || {
            let lock = acquire(&path).unwrap();
            tx.send(()).unwrap();
            lock
        });
        // Still waiting while the first holds it (a bounded wait: the failure is "it got the lock").
        assert_eq!(rx.recv_timeout(Duration::from_millis(300)), Err(mpsc::RecvTimeoutError::Timeout));
        drop(first);
        rx.recv_timeout(Duration::from_secs(10)).expect("the second took the lock once the first let go");
        drop(second.join().unwrap());
        acquire(dir.path()).expect("free again after both");
    }
}
