//! The error every reconciler returns: what failed (the API server or an agent), and a short label for the
//! `berth_controller_reconcile_errors` metric. Its own module so that the claim and PV reconcilers share it without
//! importing each other.

use crate::agent_client::AgentError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Agent(#[from] AgentError),
}

impl Error {
    /// The `error` label of the reconcile-error metric: a small fixed set, never a message.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(_)) => "api_refused",
            Error::Kube(_) => "api_unreachable",
            Error::Agent(AgentError::Refused { .. }) => "agent_refused",
            Error::Agent(AgentError::Deposed(_)) => "deposed",
            Error::Agent(AgentError::Unreachable(_)) => "agent_unreachable",
            Error::Agent(AgentError::Other(_)) => "agent_other",
        }
    }
}
