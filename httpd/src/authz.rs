//! Who may read: bearer tokens authenticated by TokenReview and authorized by
//! SubjectAccessReview, with a short cache, the way controller-runtime's
//! `WithAuthenticationAndAuthorization` filter and the kube-rbac-proxy do it.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

/// The outcome of an access check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// No token, or one the apiserver does not accept: 401.
    Unauthenticated(String),
    /// A valid identity without `get` on the path: 403.
    Forbidden(String),
    /// The apiserver could not be asked: 503 (nothing is served on a doubt).
    Unavailable(String),
}

pub type DecisionFuture = Pin<Box<dyn Future<Output = Decision> + Send + 'static>>;

/// Decides whether the holder of `token` may `get` the non-resource URL `path`.
pub trait Authorize: Send + Sync + 'static {
    fn authorize(&self, token: String, path: String) -> DecisionFuture;
}

// Short, as the apiserver's own webhook-token cache: a revoked token or binding stops
// working within seconds. Refusals are kept less long than grants.
const CACHE_ALLOWED: Duration = Duration::from_secs(10);
const CACHE_REFUSED: Duration = Duration::from_secs(5);
const CACHE_MAX: usize = 10_000;

/// Decisions by a hash of (token, path), each with the time it expires.
type Cache = Arc<Mutex<HashMap<[u8; 32], (Decision, Instant)>>>;

/// Asks the apiserver. Reviews are cached by a hash of the token and the path (the token
/// itself is not kept).
#[derive(Clone)]
pub struct KubeAuthorizer {
    client: kube::Client,
    cache: Cache,
}

impl KubeAuthorizer {
    pub fn new(client: kube::Client) -> Self {
        KubeAuthorizer {
            client,
            cache: Arc::default(),
        }
    }

    /// A client from `kubeconfig`, or else from `KUBECONFIG` or the pod's in-cluster
    /// credentials (its ServiceAccount token, which must be allowed to create
    /// tokenreviews and subjectaccessreviews).
    pub async fn connect(kubeconfig: Option<&Path>) -> Result<Self, String> {
        let config = match kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => kube::Config::infer().await.map_err(|e| {
                format!("no Kubernetes credentials for metrics authentication: {e}")
            })?,
        };
        let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
        Ok(Self::new(client))
    }

    async fn decide(&self, token: String, path: String) -> Decision {
        if token.is_empty() {
            return Decision::Unauthenticated("no bearer token".into());
        }
        let mut hasher = Sha256::new();
        hasher.update(token.as_bytes());
        hasher.update([0]);
        hasher.update(path.as_bytes());
        let key: [u8; 32] = hasher.finalize().into();
        if let Some((d, until)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            if Instant::now() < *until {
                return d.clone();
            }
        }
        let decision = self.review(token, path).await;
        let ttl = match decision {
            Decision::Allowed => CACHE_ALLOWED,
            Decision::Unavailable(_) => return decision,
            _ => CACHE_REFUSED,
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_MAX {
            let now = Instant::now();
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (decision.clone(), Instant::now() + ttl));
        decision
    }

    async fn review(&self, token: String, path: String) -> Decision {
        let reviews: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let review = TokenReview {
            // No audience: the apiserver's own, which ServiceAccount tokens of scrapers
            // (Prometheus's) carry.
            spec: TokenReviewSpec {
                token,
                audiences: None,
            },
            ..Default::default()
        };
        let status = match reviews.create(&PostParams::default(), &review).await {
            Ok(answer) => answer.status.unwrap_or_default(),
            Err(e) => return Decision::Unavailable(format!("token review failed: {e}")),
        };
        if status.authenticated != Some(true) {
            return Decision::Unauthenticated(
                status
                    .error
                    .unwrap_or_else(|| "token not authenticated".into()),
            );
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.clone().unwrap_or_default();
        let sars: kube::Api<SubjectAccessReview> = kube::Api::all(self.client.clone());
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(path.clone()),
                    verb: Some("get".into()),
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        match sars.create(&PostParams::default(), &sar).await {
            Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => Decision::Allowed,
            Ok(_) => Decision::Forbidden(format!("{username} may not get {path}")),
            Err(e) => Decision::Unavailable(format!("subject access review failed: {e}")),
        }
    }
}

impl Authorize for KubeAuthorizer {
    fn authorize(&self, token: String, path: String) -> DecisionFuture {
        let this = self.clone();
        Box::pin(async move { this.decide(token, path).await })
    }
}

type Ask = (String, String, oneshot::Sender<Decision>);

/// An authorizer that runs on a thread of its own, with its own runtime. The agent
/// starts it before it enters the node's network namespace, so that its connections to
/// the apiserver leave from the namespace it was started in (namespaces are per thread).
pub struct ThreadAuthorizer {
    asks: mpsc::UnboundedSender<Ask>,
}

impl ThreadAuthorizer {
    /// Starts the thread and builds the authorizer there with `make`; its error is
    /// returned here, so a process fails at start, not at its first scrape.
    pub fn spawn<A, F, Fut>(make: F) -> Result<Self, String>
    where
        A: Authorize,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<A, String>>,
    {
        let (asks, mut rx) = mpsc::unbounded_channel::<Ask>();
        let (ready_tx, ready) = std::sync::mpsc::channel::<Result<(), String>>();
        std::thread::Builder::new()
            .name("metrics-authz".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let authorizer = match make().await {
                        Ok(a) => a,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    while let Some((token, path, reply)) = rx.recv().await {
                        let decision = authorizer.authorize(token, path);
                        tokio::spawn(async move {
                            let _ = reply.send(decision.await);
                        });
                    }
                });
            })
            .map_err(|e| e.to_string())?;
        ready
            .recv()
            .map_err(|_| "the metrics authorizer thread ended".to_string())??;
        Ok(ThreadAuthorizer { asks })
    }
}

impl Authorize for ThreadAuthorizer {
    fn authorize(&self, token: String, path: String) -> DecisionFuture {
        let (reply, answer) = oneshot::channel();
        let sent = self.asks.send((token, path, reply));
        Box::pin(async move {
            if sent.is_err() {
                return Decision::Unavailable("the metrics authorizer thread ended".into());
            }
            answer
                .await
                .unwrap_or_else(|_| Decision::Unavailable("no answer from the authorizer".into()))
        })
    }
}
