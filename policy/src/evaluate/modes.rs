//! Which policies are enforced, read directly from the decision in `docs/design.md`
//! ("Audit"): the policy object's `palisade.dev/enforcement` annotation; for a
//! NetworkPolicy without one, its Namespace's label of that name; else the cluster default.
//! A label value other than `audit` or `enforce` means `enforce`.

use crate::model::{Cluster, Enforcement, Policy, PolicyKind};

const KEY: &str = "palisade.dev/enforcement";

pub(super) fn is_enforced(cluster: &Cluster, policy: &Policy, default: Enforcement) -> bool {
    let mode = match policy.enforcement {
        Some(mode) => mode,
        None if policy.id.kind == PolicyKind::NetworkPolicy => {
            let label = policy
                .id
                .namespace
                .as_ref()
                .and_then(|ns| cluster.namespaces.get(ns))
                .and_then(|ns| ns.labels.get(KEY));
            match label.map(String::as_str) {
                None => default,
                Some("audit") => Enforcement::Audit,
                Some(_) => Enforcement::Enforce,
            }
        }
        None => default,
    };
    mode != Enforcement::Audit
}
