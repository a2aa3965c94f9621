//! Calls to node agents (docs/agent-api.md): found through their BerthNode, TLS pinned to the certificate the
//! agent published, a ServiceAccount token with that node's agent audience (TokenRequest), the leadership epoch
//! on every mutating call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth::agent_api::{CreateVolumeRequest, EPOCH_HEADER, ErrorBody, ErrorReason, ExpandVolumeRequest, Volume};
use berth::berth_node::BerthNodeStatus;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use thiserror::Error;

use crate::leader::{Leadership, LeaseError};

#[derive(Debug, Error)]
pub enum AgentError {
    /// The agent answered with a typed refusal.
    #[error("agent refused ({reason:?}): {message}")]
    Refused { reason: ErrorReason, message: String },
    /// The agent has seen a newer epoch and this replica no longer holds the lease: another leads. Not retried,
    /// no event: the new leader does the work, and this replica exits as soon as its lease loop notices. (While
    /// it still holds the lease, a `StaleEpoch` answer raises its epoch instead: see [`AgentClient::send`].)
    #[error("a newer leader has taken over: {0}")]
    Deposed(String),
    /// No usable answer: connection, TLS or timeout. The agent may or may not have acted.
    #[error("agent unreachable: {0}")]
    Unreachable(String),
    /// Anything else (tokens, unexpected answers).
    #[error("{0}")]
    Other(String),
}

const TOKEN_SECONDS: i64 = 3600;
/// How long a clone's create is waited for (any other call: 60 s). Past it the controller retries as after any
/// timeout, and the agent answers `Conflict` ("being made") until the copy is over.
const CLONE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

pub struct AgentClient {
    client: kube::Client,
    sa_namespace: String,
    sa_name: String,
    /// The epoch every mutating call carries, and what raises it.
    leadership: Arc<Leadership>,
    /// Node → (token, renew after).
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    /// Node → (its agent's pinned certificate, the HTTPS client for it). One per node: an agent makes a new
    /// certificate at every start, and a client per certificate ever seen would pile up for as long as the
    /// controller runs.
    https: Mutex<HashMap<String, (String, reqwest::Client)>>,
}

/// The client cached for `node` if it was made for `certificate`, else a new one from `build`, which replaces it.
fn client_for<C: Clone, E>(
    cache: &mut HashMap<String, (String, C)>,
    node: &str,
    certificate: &str,
    build: impl FnOnce() -> Result<C, E>,
) -> Result<C, E> {
    if let Some((pinned, client)) = cache.get(node)
        && pinned == certificate
    {
        return Ok(client.clone());
    }
    let client = build()?;
    cache.insert(node.to_owned(), (certificate.to_owned(), client.clone()));
    Ok(client)
}

impl AgentClient {
    pub fn new(
        client: kube::Client,
        sa_namespace: String,
        sa_name: String,
        leadership: Arc<Leadership>,
    ) -> AgentClient {
        AgentClient { client, sa_namespace, sa_name, leadership, tokens: Mutex::default(), https: Mutex::default() }
    }

    async fn token(&self, node: &str) -> Result<String, AgentError> {
        if let Some((token, renew_after)) = self.tokens.lock().expect("token cache").get(node)
            && Instant::now() < *renew_after
        {
            return Ok(token.clone());
        }
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![berth::agent_audience(node)]),
                expiration_seconds: Some(TOKEN_SECONDS),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.sa_namespace);
        let token = sas
            .create_token_request(&self.sa_name, &PostParams::default(), &request)
            .await
            .map_err(|e| AgentError::Other(format!("TokenRequest for {}/{}: {e}", self.sa_namespace, self.sa_name)))?
            .status
            .and_then(|s| s.token)
            .ok_or_else(|| AgentError::Other("TokenRequest returned no token".into()))?;
        // Renewed well before it expires.
        let renew_after = Instant::now() + Duration::from_secs(TOKEN_SECONDS as u64 * 8 / 10);
        self.tokens.lock().expect("token cache").insert(node.to_owned(), (token.clone(), renew_after));
        Ok(token)
    }

    fn https(&self, node: &str, certificate: &str) -> Result<reqwest::Client, AgentError> {
        let mut clients = self.https.lock().unwrap_or_else(|p| p.into_inner());
        client_for(&mut clients, node, certificate, || {
            let cert = reqwest::Certificate::from_pem(certificate.as_bytes())
                .map_err(|e| AgentError::Other(format!("the agent's published certificate: {e}")))?;
            reqwest::Client::builder()
                .add_root_certificate(cert)
                .tls_built_in_root_certs(false)
                .connect_timeout(Duration::from_secs(3))
                .timeout(Duration::from_secs(60))
                // Below the agent's header read timeout (30 s), which closes idle connections: the client lets go of
                // an idle connection first, instead of sending into one the agent is closing.
                .pool_idle_timeout(Duration::from_secs(20))
                .build()
                .map_err(|e| AgentError::Other(e.to_string()))
        })
    }

    /// One call. An agent that has seen a newer epoch than this leader's (`StaleEpoch`) makes the leader raise
    /// its epoch above it while it still holds the lease — a Lease deleted and made again counts from zero — and
    /// the call is sent once more; only a replica that no longer holds the lease gets [`AgentError::Deposed`].
    async fn send(
        &self,
        node: &str,
        status: &BerthNodeStatus,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<reqwest::Response, AgentError> {
        self.send_within(node, status, method, path, body, None).await
    }

    /// [`Self::send`], waiting at most `timeout` for the answer instead of the client's 60 s.
    async fn send_within(
        &self,
        node: &str,
        status: &BerthNodeStatus,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, AgentError> {
        let mut raised = false;
        loop {
            let token = self.token(node).await?;
            let epoch = self.leadership.epoch();
            let mut request = self
                .https(node, &status.certificate)?
                .request(method.clone(), format!("{}{path}", status.endpoint))
                .bearer_auth(token)
                .header(EPOCH_HEADER, epoch.to_string());
            if let Some(body) = &body {
                request = request.json(body);
            }
            if let Some(timeout) = timeout {
                request = request.timeout(timeout);
            }
            let response =
                request.send().await.map_err(|e| AgentError::Unreachable(format!("{}: {e}", status.endpoint)))?;
            if response.status().is_success() {
                return Ok(response);
            }
            let code = response.status();
            let body = match response.json::<ErrorBody>().await {
                Ok(body) if body.reason == ErrorReason::StaleEpoch => body,
                Ok(body) => return Err(AgentError::Refused { reason: body.reason, message: body.message }),
                Err(_) => return Err(AgentError::Other(format!("agent answered {code} without an error body"))),
            };
            if raised {
                return Err(AgentError::Other(format!(
                    "node {node}: epoch {epoch} still refused after raising it: {}",
                    body.message
                )));
            }
            // An agent too old to say its newest epoch: one above ours, and again if that is not enough.
            let newest = body.newest_epoch.unwrap_or(epoch);
            match self.leadership.raise_above(newest).await {
                Ok(_) => raised = true,
                Err(LeaseError::Lost(why)) => return Err(AgentError::Deposed(format!("{}; {why}", body.message))),
                Err(e) => {
                    return Err(AgentError::Other(format!(
                        "node {node} refused epoch {epoch} as stale ({}) and raising it failed: {e}",
                        body.message
                    )));
                }
            }
        }
    }

    /// Creates (or confirms) the volume; the agent makes this idempotent by name.
    pub async fn create(
        &self,
        node: &str,
        status: &BerthNodeStatus,
        name: &str,
        request: &CreateVolumeRequest,
    ) -> Result<Volume, AgentError> {
        let body = serde_json::to_value(request).map_err(|e| AgentError::Other(e.to_string()))?;
        let path = format!("/v1/volumes/{name}");
        // A directory clone answers once its files are copied, which takes as long as they are many and large (the
        // agent's own deadline bounds it): waited for longer than any other call, so that the answer is the
        // clone's, not a timeout followed by "being made" until the copy is over.
        let timeout = request.source.is_some().then_some(CLONE_TIMEOUT);
        let response = self.send_within(node, status, reqwest::Method::PUT, &path, Some(body), timeout).await?;
        response.json().await.map_err(|e| AgentError::Other(format!("agent's volume: {e}")))
    }

    /// Grows the volume to `size_bytes` (the same size again is a no-op).
    pub async fn expand(
        &self,
        node: &str,
        status: &BerthNodeStatus,
        name: &str,
        size_bytes: u64,
    ) -> Result<Volume, AgentError> {
        let body = serde_json::to_value(ExpandVolumeRequest { size_bytes }).expect("serialisable");
        let path = format!("/v1/volumes/{name}/expand");
        let response = self.send(node, status, reqwest::Method::POST, &path, Some(body)).await?;
        response.json().await.map_err(|e| AgentError::Other(format!("agent's volume: {e}")))
    }

    /// Tells the agent this leader's epoch, so it refuses older leaders from now on.
    pub async fn fence(&self, node: &str, status: &BerthNodeStatus) -> Result<(), AgentError> {
        self.send(node, status, reqwest::Method::PUT, "/v1/epoch", None).await.map(|_| ())
    }

    /// Every volume the agent has.
    pub async fn list(&self, node: &str, status: &BerthNodeStatus) -> Result<Vec<Volume>, AgentError> {
        let response = self.send(node, status, reqwest::Method::GET, "/v1/volumes", None).await?;
        let list: berth::agent_api::VolumeList =
            response.json().await.map_err(|e| AgentError::Other(format!("agent's volume list: {e}")))?;
        Ok(list.volumes)
    }

    /// The volume, `None` if the agent has none.
    pub async fn get(&self, node: &str, status: &BerthNodeStatus, name: &str) -> Result<Option<Volume>, AgentError> {
        match self.send(node, status, reqwest::Method::GET, &format!("/v1/volumes/{name}"), None).await {
            Ok(response) => {
                response.json().await.map(Some).map_err(|e| AgentError::Other(format!("agent's volume: {e}")))
            }
            Err(AgentError::Refused { reason: ErrorReason::NotFound, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Records on the agent that the volume's PV exists: it is never an orphan from now on.
    pub async fn publish(&self, node: &str, status: &BerthNodeStatus, name: &str) -> Result<Volume, AgentError> {
        let path = format!("/v1/volumes/{name}/published");
        let response = self.send(node, status, reqwest::Method::PUT, &path, None).await?;
        response.json().await.map_err(|e| AgentError::Other(format!("agent's volume: {e}")))
    }

    /// Deletes the volume (a Delete-policy PV was released); `false` if the agent had none.
    pub async fn delete(&self, node: &str, status: &BerthNodeStatus, name: &str) -> Result<bool, AgentError> {
        self.delete_at(node, status, &format!("/v1/volumes/{name}")).await
    }

    /// Deletes the volume only if it was never published (`Refused { reason: Published }` otherwise): for
    /// volumes no PV was ever made for (orphans, earlier attempts of a claim on another node).
    pub async fn delete_unpublished(
        &self,
        node: &str,
        status: &BerthNodeStatus,
        name: &str,
    ) -> Result<bool, AgentError> {
        self.delete_at(node, status, &format!("/v1/volumes/{name}?unpublishedOnly=true")).await
    }

    async fn delete_at(&self, node: &str, status: &BerthNodeStatus, path: &str) -> Result<bool, AgentError> {
        let response = self.send(node, status, reqwest::Method::DELETE, path, None).await?;
        let body: serde_json::Value = response.json().await.map_err(|e| AgentError::Other(e.to_string()))?;
        Ok(body["deleted"].as_bool().unwrap_or(false))
    }
}

#[cfg(test)]
mod client_cache_tests {
    use super::*;

    #[test]
    fn one_client_per_node_replaced_when_its_agent_has_a_new_certificate() {
        let mut cache = HashMap::new();
        let mut built = 0;
        let mut get = |cache: &mut HashMap<String, (String, u32)>, node: &str, cert: &str| {
            client_for(cache, node, cert, || {
                built += 1;
                Ok::<_, ()>(built)
            })
            .unwrap()
        };
        assert_eq!(get(&mut cache, "node-0", "cert-a"), 1);
        assert_eq!(get(&mut cache, "node-0", "cert-a"), 1, "the same certificate: the same client");
        assert_eq!(get(&mut cache, "node-1", "cert-b"), 2);
        // The agent restarted with a new certificate, many times: still one client for the node.
        for (i, cert) in ["cert-c", "cert-d", "cert-e"].into_iter().enumerate() {
            assert_eq!(get(&mut cache, "node-0", cert), 3 + i as u32);
        }
        assert_eq!(cache.len(), 2);
    }
}
