//! Fencing by leadership epoch (terms.md): a mutating request carries the controller's epoch; one older than the
//! newest the agent has seen is refused, so a deposed leader's late request cannot act. The newest epoch is kept
//! on disk so a restarted agent still refuses the deposed leader.

use std::path::PathBuf;
use std::sync::Mutex;

pub struct EpochFence {
    newest: Mutex<u64>,
    file: PathBuf,
}

impl EpochFence {
    pub fn load(file: PathBuf) -> std::io::Result<EpochFence> {
        let newest = match std::fs::read_to_string(&file) {
            Ok(text) => text.trim().parse().unwrap_or(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        Ok(EpochFence {
            newest: Mutex::new(newest),
            file,
        })
    }

    /// `Err(newest)` if `epoch` is older than the newest seen; otherwise records it.
    pub fn admit(&self, epoch: u64) -> Result<(), u64> {
        let mut newest = self.newest.lock().expect("epoch lock");
        if epoch < *newest {
            return Err(*newest);
        }
        if epoch > *newest {
            // Written before admitting: a crash right after must not forget it.
            let tmp = self.file.with_extension("tmp");
            if let Err(e) = std::fs::write(&tmp, epoch.to_string())
                .and_then(|_| std::fs::rename(&tmp, &self.file))
            {
                tracing::error!(error = %e, file = %self.file.display(), "cannot persist the leadership epoch");
            }
            *newest = epoch;
        }
        Ok(())
    }

    #[cfg(test)]
    pub fn newest(&self) -> u64 {
        *self.newest.lock().expect("epoch lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_epochs_are_refused_also_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("epoch");
        let fence = EpochFence::load(file.clone()).unwrap();
        assert_eq!(fence.admit(3), Ok(()));
        assert_eq!(fence.admit(3), Ok(()));
        assert_eq!(fence.admit(2), Err(3));
        assert_eq!(fence.admit(5), Ok(()));
        let restarted = EpochFence::load(file).unwrap();
        assert_eq!(restarted.admit(4), Err(5));
        assert_eq!(restarted.newest(), 5);
    }
}
