//! `berth-controller`: the skeleton the controller issue fills in (claims → volumes → PVs); today it only parses
//! its command line so the binary, its packaging and `--help` exist.

use clap::Parser;

/// Berth's controller: watches claims of StorageClasses whose provisioner is ours, has the selected node's agent
/// create the volume and creates the PV pinned to that node. Not implemented yet: this build only validates its
/// arguments.
#[derive(Parser, Debug)]
#[command(name = "berth-controller", version)]
struct Args {
    /// The provisioner name StorageClasses use.
    #[arg(long, default_value = berth::PROVISIONER_NAME)]
    provisioner: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::bail!("berth-controller {:?}: the controller is not implemented in this build", args.provisioner)
}
