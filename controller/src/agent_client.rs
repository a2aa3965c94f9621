//! Calls to node agents (docs/agent-api.md): found through their BerthNode, TLS pinned to the certificate the
//! agent published, a ServiceAccount token with that node's agent audience (TokenRequest), the leadership epoch
//! on every mutating call.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth::agent_api::{CreateVolumeRequest, EPOCH_HEADER, ErrorBody, ErrorReason, ExpandVolumeRequest, Volume};
use berth::berth_node::BerthNodeStatus;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AgentError {
    /// The agent answered with a typed refusal.
    #[error("agent refused ({reason:?}): {message}")]
    Refused { reason: ErrorReason, message: String },
    /// The agent has seen a newer leader's epoch: this replica no longer leads. Not retried, no event: the new
    /// leader does the work, and this replica exits as soon as its lease loop notices.
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

pub struct AgentClient {
    client: kube::Client,
    sa_namespace: String,
    sa_name: String,
    epoch: u64,
    /// Node → (token, renew after).
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    /// Pinned certificate → HTTPS client.
    https: Mutex<HashMap<String, reqwest::Client>>,
}

impl AgentClient {
    pub fn new(client: kube::Client, sa_namespace: String, sa_name: String, epoch: u64) -> AgentClient {
        AgentClient { client, sa_namespace, sa_name, epoch, tokens: Mutex::default(), https: Mutex::default() }
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

    fn https(&self, certificate: &str) -> Result<reqwest::Client, AgentError> {
        let mut clients = self.https.lock().expect("client cache");
        if let Some(c) = clients.get(certificate) {
            return Ok(c.clone());
        }
        let cert = reqwest::Certificate::from_pem(certificate.as_bytes())
            .map_err(|e| AgentError::Other(format!("the agent's published certificate: {e}")))?;
        let client = reqwest::Client::builder()
            .add_root_certificate(cert)
            .tls_built_in_root_certs(false)
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| AgentError::Other(e.to_string()))?;
        clients.insert(certificate.to_owned(), client.clone());
        Ok(client)
    }

    async fn send(
        &self,
        node: &str,
        status: &BerthNodeStatus,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<reqwest::Response, AgentError> {
        let token = self.token(node).await?;
        let mut request = self
            .https(&status.certificate)?
            .request(method, format!("{}{path}", status.endpoint))
            .bearer_auth(token)
            .header(EPOCH_HEADER, self.epoch.to_string());
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response =
            request.send().await.map_err(|e| AgentError::Unreachable(format!("{}: {e}", status.endpoint)))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let code = response.status();
        match response.json::<ErrorBody>().await {
            Ok(body) if body.reason == ErrorReason::StaleEpoch => Err(AgentError::Deposed(body.message)),
            Ok(body) => Err(AgentError::Refused { reason: body.reason, message: body.message }),
            Err(_) => Err(AgentError::Other(format!("agent answered {code} without an error body"))),
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
        let response =
            self.send(node, status, reqwest::Method::PUT, &format!("/v1/volumes/{name}"), Some(body)).await?;
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

    /// Deletes the volume; `false` if the agent had none.
    pub async fn delete(&self, node: &str, status: &BerthNodeStatus, name: &str) -> Result<bool, AgentError> {
        let response = self.send(node, status, reqwest::Method::DELETE, &format!("/v1/volumes/{name}"), None).await?;
        let body: serde_json::Value = response.json().await.map_err(|e| AgentError::Other(e.to_string()))?;
        Ok(body["deleted"].as_bool().unwrap_or(false))
    }
}
