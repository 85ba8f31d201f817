//! palisade-controller: watches the cluster (or files), compiles every node's rule set
//! incrementally, and streams each node's agent exactly its own, over authenticated TLS.
//!
//! - [`source`]: Kubernetes watches or files, into converted objects ([`objects`]).
//! - [`inputs`]: the store of converted objects, into compiler changes.
//! - [`compile_loop`]: the one writer; coalesces bursts and publishes into the [`hub`].
//! - [`serve`]: the gRPC `RuleStream`, authenticated by [`auth`].
//! - [`metrics`], [`http`]: Prometheus metrics and health endpoints.

pub mod auth;
pub mod compile_loop;
pub mod config;
pub mod devtls;
pub mod endpoints;
pub mod hub;
pub mod inputs;
pub mod metrics;
pub mod objects;
pub mod run;
pub mod serve;
pub mod source;
pub mod status;
