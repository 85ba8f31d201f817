//! Label selectors as the Kubernetes API documents them (`meta/v1 LabelSelector`): the
//! results of `matchLabels` and `matchExpressions` are ANDed, and an empty selector
//! matches every object. Written from the documentation, not from `crate::selector`.

use crate::model::{Cluster, Labels};
use crate::selector::{LabelSelector, Operator, Requirement};

/// The value of `key`, found by walking the labels (no use of the map's own lookup).
fn value_of<'a>(labels: &'a Labels, key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k.as_str() == key)
        .map(|(_, v)| v.as_str())
}

/// One `matchExpressions` entry:
/// - `In`: the label is present and its value is one of `values`;
/// - `NotIn`: the label is absent, or its value is none of `values`;
/// - `Exists`: the label is present, whatever its value;
/// - `DoesNotExist`: the label is absent.
fn requirement_holds(requirement: &Requirement, labels: &Labels) -> bool {
    let value = value_of(labels, &requirement.key);
    let listed = |v: &str| requirement.values.iter().any(|x| x == v);
    match (requirement.operator, value) {
        (Operator::In, Some(v)) => listed(v),
        (Operator::In, None) => false,
        (Operator::NotIn, Some(v)) => !listed(v),
        (Operator::NotIn, None) => true,
        (Operator::Exists, found) => found.is_some(),
        (Operator::DoesNotExist, found) => found.is_none(),
    }
}

/// Whether `selector` selects an object with `labels`.
pub(super) fn selector_selects(selector: &LabelSelector, labels: &Labels) -> bool {
    let pairs_hold = selector
        .match_labels
        .iter()
        .all(|(k, v)| value_of(labels, k) == Some(v.as_str()));
    let expressions_hold = selector
        .match_expressions
        .iter()
        .all(|r| requirement_holds(r, labels));
    pairs_hold && expressions_hold
}

/// Whether a namespace is selected. A namespace that has no Namespace object in the cluster
/// has no labels, so only selectors that need no label select it.
pub(super) fn namespace_selected(
    cluster: &Cluster,
    namespace: &str,
    selector: &LabelSelector,
) -> bool {
    let none = Labels::new();
    let labels = cluster
        .namespaces
        .values()
        .find(|n| n.name == namespace)
        .map_or(&none, |n| &n.labels);
    selector_selects(selector, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(key: &str, operator: Operator, values: &[&str]) -> Requirement {
        Requirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn operators_as_documented() {
        let l: Labels = [("env", "prod")].into();
        let holds = |r: Requirement| requirement_holds(&r, &l);
        assert!(holds(req("env", Operator::In, &["prod", "dev"])));
        assert!(!holds(req("env", Operator::In, &["dev"])));
        assert!(!holds(req("team", Operator::In, &["x"])));
        assert!(holds(req("env", Operator::NotIn, &["dev"])));
        assert!(!holds(req("env", Operator::NotIn, &["prod"])));
        assert!(holds(req("team", Operator::NotIn, &["x"])));
        assert!(holds(req("env", Operator::Exists, &[])));
        assert!(!holds(req("team", Operator::Exists, &[])));
        assert!(holds(req("team", Operator::DoesNotExist, &[])));
        assert!(!holds(req("env", Operator::DoesNotExist, &[])));
    }

    #[test]
    fn empty_selector_selects_everything_and_labels_are_anded() {
        let l: Labels = [("app", "web"), ("tier", "fe")].into();
        assert!(selector_selects(&LabelSelector::default(), &Labels::new()));
        let both = LabelSelector::with_labels([("app", "web"), ("tier", "fe")]);
        assert!(selector_selects(&both, &l));
        let other = LabelSelector::with_labels([("app", "web"), ("tier", "be")]);
        assert!(!selector_selects(&other, &l));
    }
}
