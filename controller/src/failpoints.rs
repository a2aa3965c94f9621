//! Test-only crash and pause points (the `fail` crate). Compiled to nothing unless the `failpoints` feature is on,
//! which only the `berth-controller-failpoints` binary of the crash and HA tests has. FAILPOINTS sets them:
//! `provision-after-agent-create=return` aborts the process there; `leader-before-exit=return(3000)` pauses 3 s.

use std::time::Duration;

/// Waits the milliseconds FAILPOINTS gives `name` (`name=return(ms)`), without blocking a thread.
pub async fn pause(name: &str) {
    if !cfg!(feature = "failpoints") {
        return;
    }
    if let Some(Some(ms)) = fail::eval(name, |arg| arg.and_then(|a| a.parse::<u64>().ok())) {
        tracing::warn!(failpoint = name, ms, "failpoint: pausing");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}
