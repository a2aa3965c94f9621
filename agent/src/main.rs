//! `berth-agent`: one per node. Carves volumes out of the node's pools and reports their capacity over an
//! authenticated HTTPS API (docs/agent-api.md); publishes itself in the node's BerthNode. The code is the library's
//! (`cli.rs` for the command line).
fn main() -> anyhow::Result<()> {
    berth_agent::cli::main()
}
