//! How both binaries log: the agent and the controller share one format and one default filter, so a line from
//! either reads the same in `kubectl logs`.

/// Installs the process's tracing subscriber: `RUST_LOG` when set, else `info` with kube's and hyper's chatter
/// kept to warnings; colours only on a terminal, so log files and `kubectl logs` stay greppable.
pub fn init() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn,hyper=warn".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
}
