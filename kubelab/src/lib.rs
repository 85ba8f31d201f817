//! A real Kubernetes control plane on loopback, for tests and `palisadectl`.
//!
//! [`KubeLab::start`] runs etcd, kube-apiserver (TLS, client-certificate admin in
//! `system:masters`, RBAC, ServiceAccount token signing with audience `palisade`) and
//! kube-controller-manager (namespace, serviceaccount, garbage-collector and endpointslice
//! controllers only), then installs the network-policy-api CRDs that users install, so the
//! apiserver admits and rejects exactly what a real cluster would. The binaries come from `scripts/tools.sh`
//! (`target/tools/bin`, or `$PALISADE_KUBE_BIN`).
//!
//! Processes in a lab node's network namespace (kube-proxy) reach the apiserver through
//! [`KubeLab::forward_into_netns`], a relay from that namespace's own loopback;
//! [`KubeLab::start_kube_proxy`] runs a real kube-proxy (nftables mode) in a node's namespace.
//!
//! Limits: there is no kubelet or scheduler, and no kube-proxy unless a test starts one.
//! Pods are never run: tests set their addresses and `Ready` condition through the status
//! subresource ([`KubeLab::set_pod_status`]) and delete them with grace period 0. There are no Endpoints for the `kubernetes` Service
//! (`--endpoint-reconciler-type=none`), no admission webhooks, and one etcd member without
//! fsync. Everything listens on 127.0.0.1 only; all state lives in a temp dir that the lab
//! removes when it stops (on drop, or at exit for [`shared`]).

mod apply;
mod crds;
mod error;
mod files;
mod flags;
mod forward;
mod lab;
mod objects;
mod pki;
mod process;
mod proxy;
mod shared;
mod system;
mod tools;

pub use apply::parse_objects;
pub use crds::{crd_files, CrdChannel, FIELD_MANAGER};
pub use error::{Error, Result};
pub use forward::NetnsForward;
pub use kube::api::DynamicObject;
pub use lab::{KubeLab, Options, SERVICE_ACCOUNT_ISSUER};
pub use objects::{container_port, LabPod, POD_IMAGE};
pub use pki::{Ca, CertPair};
pub use proxy::{kube_proxy_available, KubeProxy, KUBE_PROXY_TABLES, KUBE_PROXY_USER};
pub use shared::shared;
pub use system::{
    agent_pod_name, lab_pod, string_labels, token_kubeconfig, AGENT_ACCOUNT, CONTROLLER_ACCOUNT,
    KUBE_VERSION, SYSTEM_NS,
};
pub use tools::{
    control_plane_available, crd_dir_for, default_bin_dir, default_tools_dir, missing, skip,
    BIN_ENV, CONTROL_PLANE_BINARIES,
};
