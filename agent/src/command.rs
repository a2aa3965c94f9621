//! External commands (lvm2, mkfs, mount, resize) and the agent's own long device I/O (zeroing) with deadlines
//! (issue 18 item 3).
//!
//! A command that outlives its deadline is reported ([`CommandError::TimedOut`]) but never killed: lvm2 killed
//! between suspending and resuming a device leaves it suspended, and mkfs or blkdiscard killed halfway leave a
//! device in a state nobody can tell. It stays listed in its pool's [`Stuck`] until it exits; the pool takes no
//! work meanwhile and reads its inventory from disk again afterwards (agent.rs), since the command may still have
//! changed something after its caller gave up.

use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CommandError {
    #[error("cannot run {command}: {error}")]
    Spawn { command: String, error: std::io::Error },
    /// The agent's own work ([`call`]) failed, or a command's output could not be read.
    #[error("{command}: {error}")]
    Failed { command: String, error: std::io::Error },
    #[error("{command} did not finish within its {} s deadline; it is left running (never killed)", deadline.as_secs_f64())]
    TimedOut { command: String, deadline: Duration },
}

/// The commands of one pool that outlived their deadlines and still run.
#[derive(Debug, Default)]
pub struct Stuck {
    state: Mutex<StuckState>,
}

#[derive(Debug, Default)]
struct StuckState {
    next_id: u64,
    running: Vec<StuckCommand>,
    /// Set when a stuck command exits; taken by [`Stuck::take_settled`].
    settled: bool,
}

#[derive(Debug)]
struct StuckCommand {
    id: u64,
    command: String,
    deadline: Duration,
    started: Instant,
}

impl Stuck {
    fn lock(&self) -> std::sync::MutexGuard<'_, StuckState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What still runs past its deadline, for refusals and `/healthz`; `None` when nothing does.
    pub fn describe(&self) -> Option<String> {
        let state = self.lock();
        let oldest = state.running.iter().min_by_key(|c| c.started)?;
        let more = match state.running.len() - 1 {
            0 => String::new(),
            n => format!(" (and {n} more)"),
        };
        Some(format!(
            "`{}` has run {} s, past its {} s deadline{more}",
            oldest.command,
            oldest.started.elapsed().as_secs(),
            oldest.deadline.as_secs_f64()
        ))
    }

    /// Whether a stuck command has exited since the last call, once.
    pub fn take_settled(&self) -> bool {
        std::mem::take(&mut self.lock().settled)
    }

    fn add(&self, command: &str, deadline: Duration, started: Instant) -> u64 {
        let mut state = self.lock();
        state.next_id += 1;
        let id = state.next_id;
        state.running.push(StuckCommand { id, command: command.to_owned(), deadline, started });
        id
    }

    fn exited(&self, id: u64) {
        let mut state = self.lock();
        state.running.retain(|c| c.id != id);
        state.settled = true;
    }
}

/// Where the waiting thread leaves the work's result, or learns that nobody waits for it any more.
enum Slot<T> {
    Waiting,
    Done(std::io::Result<T>),
    Abandoned(u64),
}

/// Runs `cmd` (stdin closed, output collected) and waits at most `deadline`; past it the command is left running
/// and listed in `stuck` until it exits.
pub fn output(cmd: &mut Command, deadline: Duration, stuck: &Arc<Stuck>) -> Result<Output, CommandError> {
    let command = describe(cmd);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| CommandError::Spawn { command: command.clone(), error })?;
    // Reads stdout and stderr to the end (so a chatty command never blocks on a full pipe), then reaps it.
    let status = |out: &std::io::Result<Output>| match out {
        Ok(o) => o.status.to_string(),
        Err(e) => e.to_string(),
    };
    call(&command, deadline, stuck, move || child.wait_with_output(), status)
}

/// Runs `work`, blocking I/O of the agent's own (an ioctl that writes a whole device), on a thread of its own and
/// waits at most `deadline`: past it the work is left to finish, never interrupted (no more than a command is
/// killed), and listed in `stuck` as `what` until it returns. `summary` says in the log how it ended then.
pub fn call<T: Send + 'static>(
    what: &str,
    deadline: Duration,
    stuck: &Arc<Stuck>,
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    summary: impl FnOnce(&std::io::Result<T>) -> String + Send + 'static,
) -> Result<T, CommandError> {
    let command = what.to_owned();
    let started = Instant::now();
    let slot = Arc::new((Mutex::new(Slot::Waiting), Condvar::new()));
    let waiter = {
        let (slot, stuck, command) = (slot.clone(), stuck.clone(), command.clone());
        move || {
            let out = work();
            let (lock, done) = &*slot;
            let mut slot = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            match *slot {
                Slot::Abandoned(id) => {
                    tracing::warn!(
                        command,
                        seconds = started.elapsed().as_secs(),
                        result = summary(&out),
                        "a command that outlived its deadline has exited"
                    );
                    stuck.exited(id);
                }
                _ => {
                    *slot = Slot::Done(out);
                    done.notify_all();
                }
            }
        }
    };
    if let Err(error) = std::thread::Builder::new().name("command".into()).spawn(waiter) {
        // A child runs on unreaped; say so rather than wait without a deadline.
        return Err(CommandError::Spawn { command, error });
    }
    let (lock, done) = &*slot;
    let guard = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let (mut slot, _) = done
        .wait_timeout_while(guard, deadline, |s| matches!(s, Slot::Waiting))
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match std::mem::replace(&mut *slot, Slot::Waiting) {
        Slot::Done(out) => out.map_err(|error| CommandError::Failed { command, error }),
        _ => {
            // Listed before the slot is released, so the waiter's removal cannot come first.
            *slot = Slot::Abandoned(stuck.add(&command, deadline, started));
            tracing::error!(
                command,
                deadline_seconds = deadline.as_secs_f64(),
                "a command outlived its deadline; it is left running and its pool takes no work until it exits"
            );
            Err(CommandError::TimedOut { command, deadline })
        }
    }
}

/// The program and its arguments, as a log line shows them (long argument lists cut).
fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    if text.len() > 200 {
        let cut = (0..=200).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        text.truncate(cut);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_within_its_deadline_gives_its_output() {
        let stuck = Arc::new(Stuck::default());
        let out =
            output(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]), Duration::from_secs(30), &stuck)
                .unwrap();
        assert_eq!((out.status.code(), &out.stdout[..], &out.stderr[..]), (Some(3), &b"out\n"[..], &b"err\n"[..]));
        assert!(stuck.describe().is_none());
        assert!(!stuck.take_settled());
    }

    #[test]
    fn a_command_past_its_deadline_is_reported_left_running_and_listed_until_it_exits() {
        let stuck = Arc::new(Stuck::default());
        let dir = tempfile::tempdir().unwrap();
        let done = dir.path().join("done");
        let script = format!("sleep 2; touch {}", done.display());
        let started = Instant::now();
        let e = output(Command::new("sh").args(["-c", &script]), Duration::from_millis(200), &stuck).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2), "returned at the deadline, not at the exit");
        assert!(matches!(&e, CommandError::TimedOut { command, .. } if command.starts_with("sh -c sleep 2")), "{e}");
        let what = stuck.describe().expect("listed while it runs");
        assert!(what.contains("sh -c sleep 2") && what.contains("past its 0.2 s deadline"), "{what}");
        assert!(!stuck.take_settled());
        // Never killed: it finishes its work, and then leaves the list.
        let until = Instant::now() + Duration::from_secs(30);
        while stuck.describe().is_some() {
            assert!(Instant::now() < until, "still listed 30 s later: {:?}", stuck.describe());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(done.exists(), "the command ran to its end");
        assert!(stuck.take_settled());
        assert!(!stuck.take_settled(), "once");
    }

    #[test]
    fn a_program_that_does_not_exist_is_a_spawn_error() {
        let stuck = Arc::new(Stuck::default());
        let e = output(&mut Command::new("/nonexistent/berth-test"), Duration::from_secs(1), &stuck).unwrap_err();
        assert!(matches!(e, CommandError::Spawn { .. }), "{e}");
    }
}
