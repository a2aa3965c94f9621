//! Least-privilege credentials for Berth's processes on the bed: the controller and the agents run with tokens of
//! the ServiceAccounts deploy/rbac/ defines (not admin), so every end-to-end test also proves that RBAC is enough.
//! An agent's token is bound to a Pod on its node, as a DaemonSet pod's projected token is: the API server puts
//! the node's name into it, which deploy/admission/'s policy requires for BerthNode writes.

use std::path::PathBuf;

use anyhow::{Context, Result};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};

use crate::TestBed;
use crate::agents::{CONTROLLER_NAMESPACE as NAMESPACE, CONTROLLER_SERVICE_ACCOUNT};

pub const AGENT_SERVICE_ACCOUNT: &str = "berth-agent";

/// Long enough for any test and for a `hack/up` session of a day.
const TOKEN_SECONDS: i64 = 24 * 3600;

impl TestBed {
    /// A kubeconfig for the controller: a token of `berth-system/berth-controller`.
    pub async fn controller_kubeconfig(&self) -> Result<PathBuf> {
        let token = self.token(CONTROLLER_SERVICE_ACCOUNT, None).await?;
        let path = self.dir().join("berth-controller.kubeconfig");
        self.write_token_kubeconfig(&path, &token)?;
        Ok(path)
    }

    /// A kubeconfig for `node`'s agent: a token of `berth-system/berth-agent` bound to a Pod on that node (created
    /// if missing; kwok runs it, it does nothing).
    pub async fn agent_kubeconfig(&self, node: &str) -> Result<PathBuf> {
        let pods: Api<Pod> = Api::namespaced(self.client(), NAMESPACE);
        let name = format!("berth-agent-{node}");
        let pod = match pods.get_opt(&name).await? {
            Some(p) => p,
            None => {
                let pod = Pod {
                    metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() },
                    spec: Some(PodSpec {
                        node_name: Some(node.to_owned()),
                        service_account_name: Some(AGENT_SERVICE_ACCOUNT.into()),
                        containers: vec![Container {
                            name: "agent".into(),
                            image: Some("registry.invalid/berth-agent:test".into()),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                pods.create(&PostParams::default(), &pod).await.with_context(|| format!("creating pod {name}"))?
            }
        };
        let bound = BoundObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(name.clone()),
            uid: pod.metadata.uid.clone(),
        };
        let token = self.token(AGENT_SERVICE_ACCOUNT, Some(bound)).await?;
        let path = self.dir().join(format!("berth-agent-{node}.kubeconfig"));
        self.write_token_kubeconfig(&path, &token)?;
        Ok(path)
    }

    /// A token of `berth-system/<account>` for the API server's own audience, optionally bound to an object.
    async fn token(&self, account: &str, bound: Option<BoundObjectReference>) -> Result<String> {
        let sas: Api<ServiceAccount> = Api::namespaced(self.client(), NAMESPACE);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(Vec::new()),
                expiration_seconds: Some(TOKEN_SECONDS),
                bound_object_ref: bound,
                ..Default::default()
            }),
            ..Default::default()
        };
        let answer = sas
            .create_token_request(account, &PostParams::default(), &request)
            .await
            .with_context(|| format!("TokenRequest for {NAMESPACE}/{account} (is deploy/rbac/ applied?)"))?;
        answer.status.and_then(|s| s.token).context("TokenRequest returned no token")
    }
}
