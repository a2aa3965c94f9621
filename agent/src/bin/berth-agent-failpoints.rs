//! The agent with crash points compiled in (feature `failpoints`), for the crash tests only: FAILPOINTS names the
//! point at which it kills itself (agent/src/failpoints.rs, agent/tests/crash_matrix.rs).
fn main() -> anyhow::Result<()> {
    berth_agent::cli::main()
}
