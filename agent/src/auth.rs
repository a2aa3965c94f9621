//! Who may call the agent: a bearer token that the API server's TokenReview accepts *for this node's agent
//! audience*, of the controller's identity. Positive answers are cached briefly; negative ones are not, so a
//! rejected caller cannot poison the cache.
//!
//! Every unknown token costs the API server one TokenReview, so failed reviews are rate-limited ([`Budget`]): after
//! a burst of invalid tokens, unknown tokens are refused (503 `Unavailable`) without a review until the budget
//! refills. The controller keeps working meanwhile: a token it presented successfully within the last
//! [`GRACE`] is still accepted while reviews are being refused (a revoked token, then, for at most that long).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth::agent_api::ErrorReason;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use crate::agent::Refusal;

const CACHE_FOR: Duration = Duration::from_secs(10);
const CACHE_MAX: usize = 1024;
/// How long a token that passed review is still accepted while unknown tokens are refused without review.
pub const GRACE: Duration = Duration::from_secs(300);
/// How long a TokenReview may take. The API server client has no read timeout of its own: without this, an API
/// server that stops answering would hold every caller, and a connection place each, for as long as it is silent.
pub const REVIEW_DEADLINE: Duration = Duration::from_secs(10);
/// Failed reviews allowed at once, and per second after that.
const FAILURE_BURST: f64 = 32.0;
const FAILURES_PER_SECOND: f64 = 2.0;

/// A token bucket of failed TokenReviews: a review takes one token before it is made and gives it back if it
/// succeeds (or if the API server, not the caller, failed).
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    tokens: f64,
    at: Instant,
}

impl Budget {
    pub fn new(now: Instant) -> Budget {
        Budget { tokens: FAILURE_BURST, at: now }
    }

    /// Takes one review's worth at `now`; `false` when none is left.
    pub fn take(&mut self, now: Instant) -> bool {
        let refilled = now.saturating_duration_since(self.at).as_secs_f64() * FAILURES_PER_SECOND;
        self.tokens = (self.tokens + refilled).min(FAILURE_BURST);
        self.at = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    pub fn refund(&mut self) {
        self.tokens = (self.tokens + 1.0).min(FAILURE_BURST);
    }
}

pub struct Authenticator {
    client: kube::Client,
    audience: String,
    allowed_user: String,
    /// Token → when it last passed review.
    cache: Mutex<HashMap<String, Instant>>,
    failures: Mutex<Budget>,
}

impl Authenticator {
    pub fn new(client: kube::Client, audience: String, allowed_user: String) -> Authenticator {
        Authenticator {
            client,
            audience,
            allowed_user,
            cache: Mutex::new(HashMap::new()),
            failures: Mutex::new(Budget::new(Instant::now())),
        }
    }

    /// `Ok(())` for the controller; 401 without a valid token for this audience; 403 for anyone else; 503 when
    /// the token cannot be reviewed now.
    pub async fn check(&self, authorization: Option<&str>) -> Result<(), Refusal> {
        let unauthenticated = |m: &str| Refusal::new(ErrorReason::Unauthenticated, m);
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthenticated("a bearer token is required"))?;
        let now = Instant::now();
        let reviewed = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(token).copied();
        if reviewed.is_some_and(|at| now.duration_since(at) < CACHE_FOR) {
            return Ok(());
        }
        if !self.failures.lock().unwrap_or_else(|p| p.into_inner()).take(now) {
            if reviewed.is_some_and(|at| now.duration_since(at) < GRACE) {
                return Ok(());
            }
            return Err(Refusal::new(
                ErrorReason::Unavailable,
                "too many invalid tokens recently: unknown tokens are not reviewed for a few seconds; retry",
            ));
        }
        let outcome = self.review(token).await;
        if !matches!(outcome, Err(Refusal { reason: ErrorReason::Unauthenticated | ErrorReason::Forbidden, .. })) {
            self.failures.lock().unwrap_or_else(|p| p.into_inner()).refund();
        }
        outcome?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, at| now.duration_since(*at) < GRACE);
        }
        if cache.len() < CACHE_MAX {
            cache.insert(token.to_owned(), now);
        }
        Ok(())
    }

    async fn review(&self, token: &str) -> Result<(), Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_owned(), audiences: Some(vec![self.audience.clone()]) },
            ..Default::default()
        };
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let status = tokio::time::timeout(REVIEW_DEADLINE, reviews.create(&PostParams::default(), &review))
            .await
            .map_err(|_| {
                let seconds = REVIEW_DEADLINE.as_secs();
                Refusal::new(ErrorReason::Unavailable, format!("TokenReview did not answer within {seconds} s"))
            })?
            .map_err(|e| Refusal::new(ErrorReason::Unavailable, format!("TokenReview failed: {e}")))?
            .status
            .unwrap_or_default();
        let audience_ok = status.audiences.as_ref().is_some_and(|a| a.contains(&self.audience));
        if status.authenticated != Some(true) || !audience_ok {
            return Err(Refusal::new(
                ErrorReason::Unauthenticated,
                format!("the token is not valid for audience {}", self.audience),
            ));
        }
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        if user != self.allowed_user {
            return Err(Refusal::new(ErrorReason::Forbidden, format!("{user} may not call this agent")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_reviews_are_limited_to_a_burst_then_a_steady_rate() {
        let start = Instant::now();
        let mut budget = Budget::new(start);
        let allowed = (0..100).filter(|_| budget.take(start)).count();
        assert_eq!(allowed, FAILURE_BURST as usize);
        assert!(!budget.take(start + Duration::from_millis(100)), "0.2 of a review is not a review");
        assert!(budget.take(start + Duration::from_millis(500)));
        assert!(!budget.take(start + Duration::from_millis(500)));
        // A successful review gives its token back.
        budget.refund();
        assert!(budget.take(start + Duration::from_millis(500)));
        // Idle long enough, the whole burst is back, never more.
        let later = start + Duration::from_secs(3600);
        assert_eq!((0..100).filter(|_| budget.take(later)).count(), FAILURE_BURST as usize);
    }
}
