//! What the controller's `/metrics`, `/healthz` and `/readyz` answer; the server itself
//! (GET only, limits, access modes) is `palisade-httpd`, shared with the agent.

use std::sync::Arc;

use palisade_httpd::{Handler, Reply, ReplyFuture, StatusCode};

use crate::hub::Hub;

pub struct Endpoints(pub Arc<Hub>);

impl Handler for Endpoints {
    fn get(&self, path: &str) -> ReplyFuture {
        let reply = match path {
            "/metrics" => Reply::ok(self.0.metrics.encode()),
            "/healthz" => Reply::ok("ok\n"),
            "/readyz" if self.0.is_ready() => Reply::ok("ready\n"),
            "/readyz" => Reply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "caches not synced or first compile not done\n",
            ),
            _ => Reply::not_found(),
        };
        Box::pin(std::future::ready(reply))
    }
}
