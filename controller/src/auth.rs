//! Who is on the other end of a stream, and which node it may read.
//!
//! On a cluster an agent presents its projected ServiceAccount token, bound to its pod and
//! with Palisade's audience. A TokenReview proves it; only the agent's ServiceAccount is
//! accepted, and only for the node the token's pod is bound to, so a compromised node
//! cannot read another node's rules. Reviews are cached for a short time, keyed by a hash
//! of the token (the token itself is not kept).
//!
//! Without an API server (the demo, file sources) a file maps node names to tokens.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use sha2::{Digest, Sha256};

/// The extra field a pod-bound ServiceAccount token's review carries with the pod's node.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

// Short: a deleted agent pod's token must stop working soon (the apiserver itself caches
// successful reviews for 10 s), and open streams are checked again anyway (serve::REAUTH).
const CACHE_OK: Duration = Duration::from_secs(10);
const CACHE_REFUSED: Duration = Duration::from_secs(5);
const CACHE_MAX: usize = 10_000;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error("{0} may not read node rules")]
    WrongIdentity(String),
    #[error("the token is not bound to a pod on a node")]
    NotBound,
    #[error("the token review failed: {0}")]
    Review(String),
}

impl AuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "no_token",
            AuthError::Invalid(_) => "invalid_token",
            AuthError::WrongIdentity(_) => "wrong_identity",
            AuthError::NotBound => "not_bound",
            AuthError::Review(_) => "review_failed",
        }
    }
}

pub enum Authenticator {
    TokenReview(TokenReviewer),
    Static(StaticTokens),
}

impl Authenticator {
    /// The node the token's holder may read.
    pub async fn node_of(&self, token: &str) -> Result<String, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        match self {
            Authenticator::TokenReview(r) => r.node_of(token).await,
            Authenticator::Static(s) => s.node_of(token),
        }
    }
}

/// A review's outcome and until when it may be reused.
type Review = (Result<String, AuthError>, Instant);

pub struct TokenReviewer {
    client: kube::Client,
    audience: String,
    /// `system:serviceaccount:NS:NAME`
    username: String,
    cache: Mutex<HashMap<[u8; 32], Review>>,
}

impl TokenReviewer {
    pub fn new(client: kube::Client, audience: &str, service_account: (&str, &str)) -> Self {
        TokenReviewer {
            client,
            audience: audience.to_string(),
            username: format!(
                "system:serviceaccount:{}:{}",
                service_account.0, service_account.1
            ),
            cache: Mutex::default(),
        }
    }

    async fn node_of(&self, token: &str) -> Result<String, AuthError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((result, until)) = self.cache.lock().unwrap().get(&key) {
            if Instant::now() < *until {
                return result.clone();
            }
        }
        let result = self.review(token).await;
        if matches!(result, Err(AuthError::Review(_))) {
            // The API server is away: not the token's fault, so nothing to remember.
            return result;
        }
        let ttl = if result.is_ok() {
            CACHE_OK
        } else {
            CACHE_REFUSED
        };
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= CACHE_MAX {
            let now = Instant::now();
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (result.clone(), Instant::now() + ttl));
        result
    }

    async fn review(&self, token: &str) -> Result<String, AuthError> {
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Review(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Invalid(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        if let Some(audiences) = &status.audiences {
            if !audiences.iter().any(|a| a == &self.audience) {
                return Err(AuthError::Invalid(format!(
                    "not issued for audience {:?}",
                    self.audience
                )));
            }
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.username {
            return Err(AuthError::WrongIdentity(username));
        }
        user.extra
            .and_then(|mut e| e.remove(NODE_NAME_EXTRA))
            .and_then(|v| v.into_iter().next())
            .filter(|n| !n.is_empty())
            .ok_or(AuthError::NotBound)
    }
}

/// `node: token` lines of a YAML map, for running without an API server.
pub struct StaticTokens {
    by_hash: HashMap<[u8; 32], String>,
}

impl StaticTokens {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
        let map: std::collections::BTreeMap<String, String> =
            serde_yaml::from_str(&text).map_err(|e| {
                anyhow::anyhow!("{}: expected `node: token` lines: {e}", path.display())
            })?;
        Ok(Self::new(map))
    }

    pub fn new(map: impl IntoIterator<Item = (String, String)>) -> Self {
        StaticTokens {
            by_hash: map
                .into_iter()
                .map(|(node, token)| (Sha256::digest(token.as_bytes()).into(), node))
                .collect(),
        }
    }

    fn node_of(&self, token: &str) -> Result<String, AuthError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.by_hash
            .get(&key)
            .cloned()
            .ok_or_else(|| AuthError::Invalid("unknown token".into()))
    }
}
