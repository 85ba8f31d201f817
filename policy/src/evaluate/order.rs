//! The order of policies within a tier, as `docs/design.md` decides it: `priority`
//! ascending (the API: a lower number is evaluated first); equal priorities (the API leaves
//! their order to the implementation) by kind — ClusterNetworkPolicy, then
//! AdminNetworkPolicy, then BaselineAdminNetworkPolicy — then by name. Written out here
//! rather than taken from the derived orderings the compiler uses.

use std::cmp::Ordering;

use crate::model::{Policy, PolicyId, PolicyKind};

fn kind_rank(kind: PolicyKind) -> u8 {
    match kind {
        PolicyKind::NetworkPolicy => 0,
        PolicyKind::ClusterNetworkPolicy => 1,
        PolicyKind::AdminNetworkPolicy => 2,
        PolicyKind::BaselineAdminNetworkPolicy => 3,
    }
}

/// Policy identities by kind, then namespace (cluster-scoped first), then name: the order
/// in which attributions and `isolated_by` lists are reported.
pub(super) fn identity_order(a: &PolicyId, b: &PolicyId) -> Ordering {
    let namespace = |id: &PolicyId| id.namespace.clone();
    kind_rank(a.kind)
        .cmp(&kind_rank(b.kind))
        .then_with(|| match (namespace(a), namespace(b)) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Less,
            (Some(_), None) => Ordering::Greater,
            (Some(x), Some(y)) => x.cmp(&y),
        })
        .then_with(|| a.name.cmp(&b.name))
}

/// The evaluation order of two policies of one tier.
pub(super) fn evaluation_order(a: &Policy, b: &Policy) -> Ordering {
    a.priority
        .cmp(&b.priority)
        .then_with(|| identity_order(&a.id, &b.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(kind: PolicyKind, name: &str) -> PolicyId {
        PolicyId {
            kind,
            namespace: None,
            name: name.into(),
        }
    }

    #[test]
    fn kind_before_name_and_cluster_scoped_first() {
        let cnp = id(PolicyKind::ClusterNetworkPolicy, "z");
        let anp = id(PolicyKind::AdminNetworkPolicy, "a");
        let banp = id(PolicyKind::BaselineAdminNetworkPolicy, "a");
        assert_eq!(identity_order(&cnp, &anp), Ordering::Less);
        assert_eq!(identity_order(&anp, &banp), Ordering::Less);
        let mut np = id(PolicyKind::NetworkPolicy, "a");
        let cluster_scoped = np.clone();
        np.namespace = Some("ns".into());
        assert_eq!(identity_order(&cluster_scoped, &np), Ordering::Less);
    }
}
