//! `berth-agent`: one per node. This is the skeleton the agent issue fills in (pools, capacity, the HTTPS API);
//! today it only parses its command line so the binary, its packaging and `--help` exist.

use clap::Parser;

/// Berth's node agent: creates, expands and deletes volumes in this node's pools and reports their free capacity
/// over an authenticated HTTPS API. Not implemented yet: this build only validates its arguments.
#[derive(Parser, Debug)]
#[command(name = "berth-agent", version)]
struct Args {
    /// The node this agent serves (the Kubernetes Node name).
    #[arg(long, env = "BERTH_NODE_NAME")]
    node_name: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::bail!(
        "berth-agent for node {:?}: the agent is not implemented in this build (provisioner {})",
        args.node_name,
        berth::PROVISIONER_NAME
    )
}
