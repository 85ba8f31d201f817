//! The `RuleStream` service: every stream is authenticated, bound to the one node its token
//! names, and fed that node's states from the hub as snapshot-then-deltas.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use palisade_policy::NodeRuleSet;
use palisade_wire::pb::agent_message::Kind as AgentKind;
use palisade_wire::pb::rule_stream_server::RuleStream;
use palisade_wire::pb::{AgentMessage, NodeUpdate};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{AuthError, Authenticator};
use crate::hub::Hub;

pub struct RuleService {
    hub: Arc<Hub>,
    auth: Arc<Authenticator>,
}

impl RuleService {
    pub fn new(hub: Arc<Hub>, auth: Arc<Authenticator>) -> Self {
        RuleService { hub, auth }
    }

    fn refuse(&self, e: AuthError) -> Status {
        self.hub
            .metrics
            .auth_failures
            .with_label_values(&[e.reason()])
            .inc();
        tracing::warn!(error = %e, "agent stream refused");
        match e {
            AuthError::Review(m) => Status::unavailable(m),
            AuthError::WrongIdentity(_) | AuthError::NotBound => {
                Status::permission_denied(e.to_string())
            }
            AuthError::Missing | AuthError::Invalid(_) => Status::unauthenticated(e.to_string()),
        }
    }
}

fn bearer<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// How often an open stream's token is reviewed again: a deleted agent pod, an expired or
/// revoked token ends its stream within this time.
pub const REAUTH: Duration = Duration::from_secs(60);

type UpdateStream = Pin<Box<dyn Stream<Item = Result<NodeUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl RuleStream for RuleService {
    type WatchStream = UpdateStream;

    async fn watch(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<UpdateStream>, Status> {
        let token = bearer(&request);
        let node = self
            .auth
            .node_of(&token)
            .await
            .map_err(|e| self.refuse(e))?;
        if !self.hub.is_ready() {
            // Serving before the first complete compile would hand out too little policy.
            return Err(Status::unavailable("not synced with the cluster yet"));
        }
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(AgentMessage {
                kind: Some(AgentKind::Hello(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        if hello.node != node {
            self.hub
                .metrics
                .auth_failures
                .with_label_values(&["other_node"])
                .inc();
            tracing::warn!(token_node = %node, asked = %hello.node, "agent asked for another node's rules");
            return Err(Status::permission_denied(format!(
                "this token may read node {node:?} only"
            )));
        }
        tracing::info!(%node, agent = %hello.agent_version, shared_lists = hello.shared_lists, "agent connected");
        // Agents from before shared lists read only inline ones.
        let form = if hello.shared_lists {
            palisade_wire::Form::SharedLists
        } else {
            palisade_wire::Form::Inline
        };
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(feed(
            self.hub.clone(),
            self.auth.clone(),
            token,
            node,
            form,
            inbound,
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Sends one node's states until the agent goes away, and records its acknowledgements.
async fn feed(
    hub: Arc<Hub>,
    auth: Arc<Authenticator>,
    token: String,
    node: String,
    form: palisade_wire::Form,
    mut inbound: Streaming<AgentMessage>,
    tx: mpsc::Sender<Result<NodeUpdate, Status>>,
) {
    hub.connected(&node);
    let mut states = hub.subscribe(&node);
    let mut sent: Option<Arc<NodeRuleSet>> = None;
    let mut reauth = tokio::time::interval(REAUTH);
    reauth.tick().await;
    loop {
        tokio::select! {
            _ = reauth.tick() => match auth.node_of(&token).await {
                Ok(n) if n == node => {}
                // The API server being away is no reason to cut a node off.
                Err(AuthError::Review(_)) => {}
                other => {
                    let why = match other { Err(e) => e.to_string(), Ok(n) => format!("the token now names node {n:?}") };
                    tracing::warn!(%node, reason = %why, "closing the stream: its token is no longer good");
                    hub.metrics.auth_failures.with_label_values(&["revoked"]).inc();
                    let _ = tx.send(Err(Status::unauthenticated(why))).await;
                    break;
                }
            },
            changed = states.changed() => {
                if changed.is_err() {
                    break;
                }
                let Some(published) = states.borrow_and_update().clone() else { continue };
                let mut update = palisade_wire::diff_in(sent.as_deref(), &published.rules, form);
                update.generation = published.generation;
                hub.metrics.bytes_sent.inc_by(update.encoded_len() as u64);
                if tx.send(Ok(update)).await.is_err() {
                    break;
                }
                sent = Some(published.rules);
            }
            msg = inbound.message() => match msg {
                Ok(Some(AgentMessage { kind: Some(AgentKind::Ack(ack)) })) => {
                    let error = (!ack.ok).then(|| ack.error.clone());
                    if let Some(e) = &error {
                        tracing::warn!(%node, generation = ack.generation, error = %e, "agent could not enforce");
                    }
                    hub.acked(&node, ack.generation, error);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            },
        }
    }
    hub.disconnected(&node);
    tracing::info!(%node, "agent disconnected");
}
