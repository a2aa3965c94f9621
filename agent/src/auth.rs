//! Who may call the agent: a bearer token that the API server's TokenReview accepts *for this node's agent
//! audience*, of the controller's identity. Positive answers are cached briefly; negative ones are not, so a
//! rejected caller cannot poison the cache.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth::agent_api::ErrorReason;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use crate::agent::Refusal;

const CACHE_FOR: Duration = Duration::from_secs(10);
const CACHE_MAX: usize = 1024;

pub struct Authenticator {
    client: kube::Client,
    audience: String,
    allowed_user: String,
    cache: Mutex<HashMap<String, Instant>>,
}

impl Authenticator {
    pub fn new(client: kube::Client, audience: String, allowed_user: String) -> Authenticator {
        Authenticator { client, audience, allowed_user, cache: Mutex::new(HashMap::new()) }
    }

    /// `Ok(())` for the controller; 401 without a valid token for this audience; 403 for anyone else.
    pub async fn check(&self, authorization: Option<&str>) -> Result<(), Refusal> {
        let unauthenticated = |m: &str| Refusal::new(ErrorReason::Unauthenticated, m);
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthenticated("a bearer token is required"))?;
        if let Some(until) = self.cache.lock().expect("auth cache").get(token)
            && *until > Instant::now()
        {
            return Ok(());
        }
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_owned(), audiences: Some(vec![self.audience.clone()]) },
            ..Default::default()
        };
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let status = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::new(ErrorReason::Internal, format!("TokenReview failed: {e}")))?
            .status
            .unwrap_or_default();
        let audience_ok = status.audiences.as_ref().is_some_and(|a| a.contains(&self.audience));
        if status.authenticated != Some(true) || !audience_ok {
            return Err(unauthenticated(&format!("the token is not valid for audience {}", self.audience)));
        }
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        if user != self.allowed_user {
            return Err(Refusal::new(ErrorReason::Forbidden, format!("{user} may not call this agent")));
        }
        let mut cache = self.cache.lock().expect("auth cache");
        if cache.len() >= CACHE_MAX {
            let now = Instant::now();
            cache.retain(|_, until| *until > now);
        }
        if cache.len() < CACHE_MAX {
            cache.insert(token.to_owned(), Instant::now() + CACHE_FOR);
        }
        Ok(())
    }
}
