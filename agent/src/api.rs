//! The HTTPS API (`/v1`, docs/agent-api.md): authentication, fencing and input limits at the edge; the decisions
//! are the agent core's.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::Request;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use berth::agent_api::{
    CreateVolumeRequest, DeleteVolumeQuery, EPOCH_HEADER, ErrorBody, ErrorReason, ExpandVolumeRequest, MAX_BODY_BYTES,
    PoolList, VolumeList,
};

use crate::agent::{Agent, Created, Refusal};
use crate::auth::Authenticator;
use crate::metrics::Metrics;

pub struct ApiState {
    pub agent: Arc<Agent>,
    pub auth: Authenticator,
    pub metrics: Arc<Metrics>,
    pub shutting_down: AtomicBool,
    /// How long an authenticated caller has to send its whole body once its headers are in.
    pub body_read_timeout: std::time::Duration,
}

pub fn router(state: Arc<ApiState>) -> Router {
    // Every /v1 route is behind the controller's authentication, as a layer: a new handler cannot forget it, and
    // it runs before any handler's extractors, so a caller without a valid token never gets a body read.
    let v1 = Router::new()
        .route("/v1/pools", get(list_pools))
        .route("/v1/epoch", put(fence))
        .route("/v1/volumes", get(list_volumes))
        .route("/v1/volumes/{name}", get(get_volume).put(create_volume).delete(delete_volume))
        .route("/v1/volumes/{name}/expand", post(expand_volume))
        .route("/v1/volumes/{name}/published", put(publish_volume))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_controller));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(|| async { Refusal::new(ErrorReason::NotFound, "no such endpoint (see docs/agent-api.md)") })
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                axum::Json(ErrorBody {
                    reason: ErrorReason::Invalid,
                    message: "method not allowed on this endpoint".into(),
                    newest_epoch: None,
                }),
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

fn status_of(reason: ErrorReason) -> StatusCode {
    match reason {
        ErrorReason::Invalid => StatusCode::BAD_REQUEST,
        ErrorReason::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorReason::Forbidden => StatusCode::FORBIDDEN,
        ErrorReason::NotFound => StatusCode::NOT_FOUND,
        ErrorReason::Conflict | ErrorReason::StaleEpoch | ErrorReason::Published | ErrorReason::InUse => {
            StatusCode::CONFLICT
        }
        ErrorReason::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorReason::Timeout => StatusCode::REQUEST_TIMEOUT,
        ErrorReason::UnknownPool | ErrorReason::Unsupported => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorReason::PoolNotReady | ErrorReason::ShuttingDown | ErrorReason::Unavailable => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorReason::InsufficientSpace => StatusCode::INSUFFICIENT_STORAGE,
        ErrorReason::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = ErrorBody { reason: self.reason, message: self.message, newest_epoch: self.newest_epoch };
        let mut response = (status_of(self.reason), axum::Json(body)).into_response();
        if matches!(self.reason, ErrorReason::TooLarge | ErrorReason::Timeout) {
            // The rest of the body is never read, so hyper closes the connection after this response. Without
            // saying so, a client may put the connection back in its pool and send its next request into the
            // closing socket (it then fails with "incomplete message": seen in CI).
            response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
        }
        response
    }
}

/// Liveness: 200 while the server runs, saying "busy" with the pools whose commands outlived their deadlines. It
/// never fails for them: restarting the agent's container would SIGKILL the stuck lvm2 (crate::command).
async fn healthz(State(s): State<Arc<ApiState>>) -> String {
    match s.agent.busy_pools() {
        busy if busy.is_empty() => "ok".into(),
        busy => format!("busy: {}", busy.join("; ")),
    }
}

async fn readyz(State(s): State<Arc<ApiState>>) -> Response {
    if s.shutting_down.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else {
        "ok".into_response()
    }
}

/// Pool metrics are kept current by the sampler; volume metrics are read by a scrape, at most once a second unless
/// the inventory changed (metrics::volumes_due), so a deleted volume's series goes at once but a pod that scrapes
/// in a loop cannot make every scrape cost the agent's lock and a quota call per volume.
async fn metrics(State(s): State<Arc<ApiState>>) -> Response {
    let (now, generation) = (Instant::now(), s.agent.generation());
    if s.metrics.volumes_due(now, generation) {
        let agent = s.agent.clone();
        match tokio::task::spawn_blocking(move || agent.volumes()).await {
            Ok(volumes) => s.metrics.set_volumes(&s.agent.node, &volumes, now, generation),
            Err(e) => tracing::error!(error = %e, "reading volume usage for /metrics failed"),
        }
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.encode())
        .into_response()
}

/// The authentication layer of every `/v1` route: the controller's token, checked before the request's body is
/// read. A refusal is logged here (the handlers never see the request).
async fn require_controller(State(s): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    let value = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let checked = match s.auth.check(value).await {
        Ok(()) => match query_refusal(request.method(), request.uri().query()) {
            None => read_body(request, s.body_read_timeout).await,
            Some(refusal) => Err((refusal, request.method().clone(), request.uri().path().to_owned())),
        },
        Err(refusal) => Err((refusal, request.method().clone(), request.uri().path().to_owned())),
    };
    match checked {
        Ok(request) => next.run(request).await,
        Err((refusal, method, path)) => {
            tracing::warn!(method = method.as_str(), path, result = ?refusal.reason, message = %refusal.message, "request refused");
            refusal.into_response()
        }
    }
}

/// A `/v1` request's query: only `DELETE /v1/volumes/{name}` takes one (its handler refuses what it does not
/// know); on any other endpoint a query is refused rather than ignored, so that a caller who thinks it asked for
/// something (`PUT …?dryRun=true`) is not answered as if it had, with the operation done.
fn query_refusal(method: &axum::http::Method, query: Option<&str>) -> Option<Refusal> {
    let query = query.filter(|q| !q.is_empty())?;
    (method != axum::http::Method::DELETE).then(|| {
        Refusal::new(ErrorReason::Invalid, format!("query {query:?}: this endpoint takes no query parameters"))
    })
}

/// The whole body, read within `timeout` of the headers (whose own deadline is the edge's): a caller that sends
/// headers and then trickles or stalls its body gets 408 and loses the connection instead of holding one of the
/// agent's connection places. At most [`MAX_BODY_BYTES`] are read (413 beyond).
async fn read_body(
    request: Request,
    timeout: std::time::Duration,
) -> Result<Request, (Refusal, axum::http::Method, String)> {
    let (parts, body) = request.into_parts();
    let refused =
        |reason, message: String| (Refusal::new(reason, message), parts.method.clone(), parts.uri.path().to_owned());
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(bytes)) => Ok(Request::from_parts(parts, axum::body::Body::from(bytes))),
        Ok(Err(e)) => {
            let inner = e.into_inner();
            let limit = |e: &(dyn std::error::Error + 'static)| e.is::<http_body_util::LengthLimitError>();
            let too_large = limit(inner.as_ref()) || inner.source().is_some_and(limit);
            Err(if too_large {
                refused(ErrorReason::TooLarge, format!("request body: larger than {MAX_BODY_BYTES} bytes"))
            } else {
                refused(ErrorReason::Invalid, "request body: the connection broke while it was read".into())
            })
        }
        Err(_) => Err(refused(
            ErrorReason::Timeout,
            format!("request body: not complete within {} s of the headers", timeout.as_secs()),
        )),
    }
}

/// Checks what every mutating request must have: the agent still taking work, and an epoch (compared with the
/// newest one by the agent core, in the same critical section as the operation).
fn admit_mutation(s: &ApiState, headers: &HeaderMap) -> Result<u64, Refusal> {
    if s.shutting_down.load(Ordering::SeqCst) {
        return Err(Refusal::new(ErrorReason::ShuttingDown, "the agent is shutting down; retry on its successor"));
    }
    let raw = headers
        .get(EPOCH_HEADER)
        .ok_or_else(|| Refusal::new(ErrorReason::Invalid, format!("the {EPOCH_HEADER} header is required")))?;
    let epoch: u64 = raw
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Refusal::new(ErrorReason::Invalid, format!("{EPOCH_HEADER} must be a whole number")))?;
    Ok(epoch)
}

/// `PUT /v1/epoch`: a new leader announces its epoch; older epochs are refused from then on.
async fn fence(State(s): State<Arc<ApiState>>, headers: HeaderMap) -> Result<Response, Refusal> {
    let started = Instant::now();
    let result = async {
        let epoch = admit_mutation(&s, &headers)?;
        let agent = s.agent.clone();
        tokio::task::spawn_blocking(move || agent.fence(epoch)).await.map_err(internal)??;
        Ok(axum::Json(serde_json::json!({ "epoch": epoch })).into_response())
    }
    .await;
    record(&s, "fence", "", started, &result);
    result
}

async fn list_pools(State(s): State<Arc<ApiState>>) -> Result<Response, Refusal> {
    let agent = s.agent.clone();
    let pools = tokio::task::spawn_blocking(move || agent.pool_statuses()).await.map_err(internal)?;
    Ok(axum::Json(PoolList { node: s.agent.node.clone(), pools }).into_response())
}

async fn list_volumes(State(s): State<Arc<ApiState>>) -> Result<Response, Refusal> {
    let agent = s.agent.clone();
    let volumes = tokio::task::spawn_blocking(move || agent.volumes()).await.map_err(internal)?;
    Ok(axum::Json(VolumeList { volumes }).into_response())
}

async fn get_volume(State(s): State<Arc<ApiState>>, VolumeName(name): VolumeName) -> Result<Response, Refusal> {
    let agent = s.agent.clone();
    let volume_name = name.clone();
    let volume = tokio::task::spawn_blocking(move || agent.volume(&volume_name))
        .await
        .map_err(internal)?
        .ok_or_else(|| s.agent.not_found(&name))?;
    Ok(axum::Json(volume).into_response())
}

/// The `{name}` of a volume's routes. Axum's own refusal of a name that is not UTF-8 once percent-decoded is
/// plain text; this is a refusal like every other, with its JSON body (found by fuzz/fuzz_targets/api_requests.rs).
struct VolumeName(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for VolumeName {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Refusal> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| Refusal::new(ErrorReason::Invalid, format!("volume name: {}", e.body_text())))?;
        Ok(VolumeName(name))
    }
}

fn internal(e: impl std::fmt::Display) -> Refusal {
    Refusal::new(ErrorReason::Internal, e.to_string())
}

/// One log line and one metric observation per volume operation.
fn record(s: &ApiState, operation: &str, volume: &str, started: Instant, result: &Result<Response, Refusal>) {
    let elapsed = started.elapsed();
    let duration_ms = elapsed.as_millis() as u64;
    let label = match result {
        Ok(_) => "ok".to_owned(),
        Err(refusal) => format!("{:?}", refusal.reason),
    };
    s.metrics.observe(operation, &label, elapsed.as_secs_f64());
    match result {
        Ok(r) => tracing::info!(operation, volume, status = r.status().as_u16(), duration_ms, result = %label),
        Err(e) => tracing::warn!(operation, volume, duration_ms, result = %label, message = %e.message),
    }
}

async fn create_volume(
    State(s): State<Arc<ApiState>>,
    VolumeName(name): VolumeName,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Refusal> {
    let started = Instant::now();
    let result = async {
        let epoch = admit_mutation(&s, &headers)?;
        let req: CreateVolumeRequest = parse_body(body, "CreateVolumeRequest")?;
        let agent = s.agent.clone();
        let now =
            time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).map_err(internal)?;
        let (volume_name, request) = (name.clone(), req.clone());
        let created = tokio::task::spawn_blocking(move || agent.create(&volume_name, &request, &now, epoch))
            .await
            .map_err(internal)??;
        Ok(match created {
            Created::New(v) => (StatusCode::CREATED, axum::Json(v)).into_response(),
            Created::Existing(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        })
    }
    .await;
    record(&s, "create", &name, started, &result);
    result
}

/// The request body, or the refusal for a body that is too large or not valid JSON of `T`.
fn parse_body<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>, what: &str) -> Result<T, Refusal> {
    let body = body.map_err(|e| {
        let reason =
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE { ErrorReason::TooLarge } else { ErrorReason::Invalid };
        Refusal::new(reason, format!("request body: {e} (at most {MAX_BODY_BYTES} bytes)"))
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| Refusal::new(ErrorReason::Invalid, format!("request body is not a {what}: {e}")))
}

async fn expand_volume(
    State(s): State<Arc<ApiState>>,
    VolumeName(name): VolumeName,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Refusal> {
    let started = Instant::now();
    let result = async {
        let epoch = admit_mutation(&s, &headers)?;
        let req: ExpandVolumeRequest = parse_body(body, "ExpandVolumeRequest")?;
        let agent = s.agent.clone();
        let volume_name = name.clone();
        let grown = tokio::task::spawn_blocking(move || agent.expand(&volume_name, req.size_bytes, epoch))
            .await
            .map_err(internal)??;
        Ok(axum::Json(grown).into_response())
    }
    .await;
    record(&s, "expand", &name, started, &result);
    result
}

/// `PUT /v1/volumes/{name}/published`: a PV has been made for the volume; it is never an orphan from now on.
async fn publish_volume(
    State(s): State<Arc<ApiState>>,
    VolumeName(name): VolumeName,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    let started = Instant::now();
    let result = async {
        let epoch = admit_mutation(&s, &headers)?;
        let agent = s.agent.clone();
        let volume_name = name.clone();
        let volume =
            tokio::task::spawn_blocking(move || agent.publish(&volume_name, epoch)).await.map_err(internal)??;
        Ok(axum::Json(volume).into_response())
    }
    .await;
    record(&s, "publish", &name, started, &result);
    result
}

async fn delete_volume(
    State(s): State<Arc<ApiState>>,
    VolumeName(name): VolumeName,
    headers: HeaderMap,
    query: Result<Query<DeleteVolumeQuery>, QueryRejection>,
) -> Result<Response, Refusal> {
    let started = Instant::now();
    let result = async {
        let epoch = admit_mutation(&s, &headers)?;
        let Query(query) = query.map_err(|e| Refusal::new(ErrorReason::Invalid, format!("query: {e}")))?;
        let agent = s.agent.clone();
        let volume_name = name.clone();
        let existed = tokio::task::spawn_blocking(move || agent.delete(&volume_name, epoch, query.unpublished_only))
            .await
            .map_err(internal)??;
        Ok(axum::Json(serde_json::json!({ "deleted": existed })).into_response())
    }
    .await;
    record(&s, "delete", &name, started, &result);
    result
}

#[cfg(test)]
mod tests {
    use axum::http::Method;

    use super::*;

    #[test]
    fn only_delete_takes_a_query() {
        for (method, query, refused) in [
            (Method::PUT, Some("dryRun=true"), true),
            (Method::POST, Some("x"), true),
            (Method::GET, Some("watch=1"), true),
            (Method::PUT, None, false),
            (Method::PUT, Some(""), false),
            (Method::GET, None, false),
            // DELETE's handler reads its query and refuses what it does not know.
            (Method::DELETE, Some("unpublishedOnly=true"), false),
            (Method::DELETE, Some("force=true"), false),
        ] {
            let refusal = query_refusal(&method, query);
            assert_eq!(refusal.is_some(), refused, "{method} ?{query:?}");
            if let Some(r) = refusal {
                assert_eq!(r.reason, ErrorReason::Invalid);
            }
        }
    }
}
