//! Fencing by leadership epoch (terms.md): a mutating request carries the controller's epoch; one older than the
//! newest the agent has seen is refused, so a deposed leader's late request cannot act. The newest epoch is kept
//! on disk (fsynced before it is admitted) so a restarted agent still refuses the deposed leader.

use std::path::PathBuf;
use std::sync::Mutex;

#[derive(Debug, PartialEq, Eq)]
pub enum AdmitError {
    /// Older than `newest`, already seen.
    Stale { newest: u64 },
    /// Newer, but could not be made durable: refused, or a restart could forget it and admit the deposed leader.
    NotPersisted(String),
}

pub struct EpochFence {
    newest: Mutex<u64>,
    file: PathBuf,
}

impl EpochFence {
    /// A file that exists but does not hold a number is an error: starting at 0 would re-admit a deposed leader.
    pub fn load(file: PathBuf) -> anyhow::Result<EpochFence> {
        let newest = match std::fs::read_to_string(&file) {
            Ok(text) => text
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("{} does not hold a leadership epoch: {text:?}", file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => anyhow::bail!("reading {}: {e}", file.display()),
        };
        Ok(EpochFence { newest: Mutex::new(newest), file })
    }

    fn persist(&self, epoch: u64) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = self.file.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(epoch.to_string().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.file)?;
        let dir = self.file.parent().unwrap_or(std::path::Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    }

    /// Refuses an epoch older than the newest seen; records (durably, before admitting) a newer one.
    pub fn admit(&self, epoch: u64) -> Result<(), AdmitError> {
        let mut newest = self.newest.lock().unwrap_or_else(|p| p.into_inner());
        if epoch < *newest {
            return Err(AdmitError::Stale { newest: *newest });
        }
        if epoch > *newest {
            self.persist(epoch).map_err(|e| {
                AdmitError::NotPersisted(format!(
                    "cannot record leadership epoch {epoch} in {}: {e}",
                    self.file.display()
                ))
            })?;
            *newest = epoch;
        }
        Ok(())
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
        assert_eq!(fence.admit(2), Err(AdmitError::Stale { newest: 3 }));
        assert_eq!(fence.admit(5), Ok(()));
        let restarted = EpochFence::load(file).unwrap();
        assert_eq!(restarted.admit(4), Err(AdmitError::Stale { newest: 5 }));
        assert_eq!(restarted.admit(5), Ok(()));
    }

    #[test]
    fn a_corrupt_epoch_file_stops_the_agent_instead_of_forgetting() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("epoch");
        std::fs::write(&file, "garbage").unwrap();
        assert!(EpochFence::load(file).is_err());
    }

    #[test]
    fn an_epoch_that_cannot_be_recorded_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fence = EpochFence::load(dir.path().join("missing-dir/epoch")).unwrap();
        assert!(matches!(fence.admit(1), Err(AdmitError::NotPersisted(_))));
        assert_eq!(fence.admit(0), Ok(()), "the current epoch needs no write");
    }
}
