//! Small helpers the end-to-end tests share: readiness predicates and bounded waits on real objects.

use std::fmt::Debug;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::core::v1::{Event, Namespace, Node, Pod, PodCondition, ServiceAccount, Taint};
use kube::Resource;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::runtime::wait::await_condition;
use serde::de::DeserializeOwned;

pub fn node_is_ready(node: &Node) -> bool {
    let conditions = node.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether `pod` is Ready.
pub fn pod_is_ready(pod: &Pod) -> bool {
    pod_ready_condition(pod).is_some()
}

/// When `pod` became Ready, if it is Ready now (and its condition says when).
pub fn pod_ready_time(pod: &Pod) -> Option<k8s_openapi::jiff::Timestamp> {
    pod_ready_condition(pod)?.last_transition_time.as_ref().map(|t| t.0)
}

fn pod_ready_condition(pod: &Pod) -> Option<&PodCondition> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    conditions.iter().find(|c| c.type_ == "Ready" && c.status == "True")
}

pub fn node_taints(node: &Node) -> Vec<Taint> {
    node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default()
}

/// Waits (watching, not polling) until the named object satisfies `condition`, and returns it; fails after
/// `timeout` with the object as last seen.
pub async fn wait_for<K>(api: &Api<K>, name: &str, timeout: Duration, condition: impl Fn(&K) -> bool) -> Result<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let cond = |obj: Option<&K>| obj.is_some_and(&condition);
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, cond)).await {
        Ok(found) => found?.ok_or_else(|| anyhow!("{name} was deleted while waiting")),
        Err(_) => {
            let last = api.get_opt(name).await.ok().flatten();
            Err(anyhow!("{name}: condition not met within {timeout:?}; last seen: {last:#?}"))
        }
    }
}

/// Waits until the named object is gone.
pub async fn wait_deleted<K>(api: &Api<K>, name: &str, timeout: Duration) -> Result<()>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let gone = |obj: Option<&K>| obj.is_none();
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, gone)).await {
        Ok(r) => Ok(r.map(|_| ())?),
        Err(_) => {
            let last = api.get_opt(name).await.ok().flatten();
            Err(anyhow!("{name} still exists after {timeout:?}: {last:#?}"))
        }
    }
}

/// The events of the object `name` in `namespace`, oldest first, one line each (`Warning FailedMount: …`), for
/// failure messages; an error reading them becomes the text.
pub async fn events_of(client: &kube::Client, namespace: &str, name: &str) -> String {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let params = ListParams::default().fields(&format!("involvedObject.name={name}"));
    match api.list(&params).await {
        Ok(list) => {
            let mut events = list.items;
            events.sort_by_key(|e| e.last_timestamp.clone().or(e.first_timestamp.clone()).map(|t| t.0));
            let line = |e: &Event| {
                let kind = e.involved_object.kind.as_deref().unwrap_or("?");
                let (ty, reason) = (e.type_.as_deref().unwrap_or("?"), e.reason.as_deref().unwrap_or("?"));
                format!("  {kind} {ty} {reason} (x{}): {}", e.count.unwrap_or(1), e.message.as_deref().unwrap_or(""))
            };
            events.iter().map(line).collect::<Vec<_>>().join("\n")
        }
        Err(e) => format!("  (events of {namespace}/{name} unreadable: {e})"),
    }
}

/// Creates a namespace and waits for its `default` ServiceAccount (pods are refused until it exists).
pub async fn create_namespace(client: &kube::Client, name: &str) -> Result<()> {
    let ns = Namespace { metadata: ObjectMeta { name: Some(name.into()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("namespace {name}"))?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    wait_for(&sas, "default", Duration::from_secs(30), |_| true).await?;
    Ok(())
}
