//! ServiceAccount tokens the test signs itself, with the bed's signing key, for what TokenRequest will not issue:
//! an expired token (TokenRequest refuses lifetimes under 10 minutes). The claims are those kube-apiserver puts in
//! a token of a ServiceAccount; each token is checked with the API server's own TokenReview.

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

use crate::TestBed;
use crate::bed::SERVICE_ACCOUNT_ISSUER;

impl TestBed {
    /// A token of ServiceAccount `namespace/name` (which must exist) for `audience` that expired an hour ago,
    /// well past the API server's leeway. Before it is returned, the API server's TokenReview has accepted its
    /// twin that expires an hour from now, and refused it as expired: the one thing wrong with it is its age.
    pub async fn expired_service_account_token(&self, namespace: &str, name: &str, audience: &str) -> Result<String> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
        let fresh = self.signed_service_account_token(namespace, name, audience, now - 60, now + 3600).await?;
        let review = self.token_review(&fresh, audience).await?;
        ensure!(review.authenticated == Some(true), "the API server refused a fresh self-signed token: {review:?}");
        let expired = self.signed_service_account_token(namespace, name, audience, now - 7200, now - 3600).await?;
        let review = self.token_review(&expired, audience).await?;
        let error = review.error.clone().unwrap_or_default();
        if review.authenticated == Some(true) || !error.contains("expired") {
            bail!("the API server did not refuse the expired token as expired: {review:?}");
        }
        Ok(expired)
    }

    /// A token like the API server's own, signed with the bed's key: valid from `issued` until `expires` (seconds
    /// since the epoch).
    async fn signed_service_account_token(
        &self,
        namespace: &str,
        name: &str,
        audience: &str,
        issued: i64,
        expires: i64,
    ) -> Result<String> {
        let sas: Api<ServiceAccount> = Api::namespaced(self.client(), namespace);
        let uid = sas.get(name).await?.metadata.uid.context("ServiceAccount without uid")?;
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT"});
        let claims = serde_json::json!({
            "aud": [audience],
            "exp": expires,
            "iat": issued,
            "nbf": issued,
            "iss": SERVICE_ACCOUNT_ISSUER,
            "jti": format!("berth-test-{:016x}", fastrand::u64(..)),
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}},
            "sub": format!("system:serviceaccount:{namespace}:{name}"),
        });
        let encode = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("serialisable"));
        let signed = format!("{}.{}", encode(&header), encode(&claims));
        let pem = std::fs::read_to_string(&self.pki().sa_private_key)?;
        let pkcs8 = rcgen::KeyPair::from_pem(&pem)?.serialize_der();
        let rng = ring::rand::SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .map_err(|e| anyhow::anyhow!("the bed's service-account key: {e}"))?;
        // ES256 in a JWS is the fixed-size r‖s, not DER (RFC 7518 3.4).
        let signature = key.sign(&rng, signed.as_bytes()).map_err(|e| anyhow::anyhow!("signing: {e}"))?;
        Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref())))
    }

    /// The API server's TokenReview of `token` for `audience`, as an agent asks it.
    pub async fn token_review(&self, token: &str, audience: &str) -> Result<TokenReviewStatus> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.into(), audiences: Some(vec![audience.into()]) },
            ..Default::default()
        };
        let reviews: Api<TokenReview> = Api::all(self.client());
        Ok(reviews.create(&PostParams::default(), &review).await?.status.unwrap_or_default())
    }
}
