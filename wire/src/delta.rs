//! Deltas between two states of one node, and the digest both ends compute.
//!
//! The digest is SHA-256 over the protobuf encoding of the state as a snapshot. Every map of
//! the compiled form is ordered and prost encodes fields in a fixed order, so equal states
//! encode to equal bytes on both ends, whatever version of either wrote them.

use std::collections::BTreeMap;
use std::sync::Arc;

use palisade_policy::ruleset::{Clause, Group, PodRules, RuleInstance, TierList};
use palisade_policy::NodeRuleSet;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::convert::{
    addr_from_bytes, addr_to_bytes, apply_group_patch, err, group_from, group_patch, group_to,
    pod_from, pod_lists, pod_to, rule_from, rule_to, tier_list_from, tier_list_to, Form, Lists,
    WireError,
};
use crate::pb;

/// The whole state as one update in this version's form (generation and digest left for
/// the caller).
pub fn snapshot(state: &NodeRuleSet) -> pb::NodeUpdate {
    snapshot_in(state, Form::CURRENT)
}

pub fn snapshot_in(state: &NodeRuleSet, form: Form) -> pb::NodeUpdate {
    pb::NodeUpdate {
        generation: 0,
        snapshot: true,
        node_addresses: Some(addresses_to(state)),
        upsert_groups: state.groups.iter().map(|(id, g)| group_to(id, g)).collect(),
        remove_groups: Vec::new(),
        upsert_pods: state.pods.iter().map(|p| pod_to(p, form)).collect(),
        remove_pods: Vec::new(),
        upsert_rules: state.rules.iter().map(|(id, o)| rule_to(id, o)).collect(),
        remove_rules: Vec::new(),
        digest: Vec::new(),
        upsert_lists: if form.shared_lists {
            lists_of(state).values().map(|l| tier_list_to(l)).collect()
        } else {
            Vec::new()
        },
        shared_lists: form.shared_lists,
        patch_groups: Vec::new(),
    }
}

/// The lists the state's pods reference, by id.
pub fn lists_of(state: &NodeRuleSet) -> Lists {
    let mut lists = Lists::new();
    for pod in &state.pods {
        for l in pod_lists(pod) {
            if !lists.contains_key(l.id()) {
                lists.insert(l.id().to_string(), l.clone());
            }
        }
    }
    lists
}

fn addresses_to(state: &NodeRuleSet) -> pb::NodeAddresses {
    pb::NodeAddresses {
        addresses: state.node_addresses.iter().map(addr_to_bytes).collect(),
    }
}

/// The digest of the state in this version's form.
pub fn digest(state: &NodeRuleSet) -> Vec<u8> {
    digest_in(state, Form::CURRENT)
}

/// The digest of the state's snapshot in `form`; of the form's parts, only the lists'
/// (named or inline) changes a snapshot.
pub fn digest_in(state: &NodeRuleSet, form: Form) -> Vec<u8> {
    let form = Form {
        group_patches: false,
        ..form
    };
    Sha256::digest(snapshot_in(state, form).encode_to_vec()).to_vec()
}

/// The update that turns `old` (`None`: nothing, send a snapshot) into `new`, in this
/// version's form, with `new`'s digest.
pub fn diff(old: Option<&NodeRuleSet>, new: &NodeRuleSet) -> pb::NodeUpdate {
    diff_in(old, new, Form::CURRENT)
}

/// The update that turns `old` (`None`: nothing, send a snapshot) into `new`, with `new`'s
/// digest. Groups, pods, rules and lists that did not change are not in it.
pub fn diff_in(old: Option<&NodeRuleSet>, new: &NodeRuleSet, form: Form) -> pb::NodeUpdate {
    let digest = digest_in(new, form);
    let Some(old) = old else {
        return pb::NodeUpdate {
            digest,
            ..snapshot_in(new, form)
        };
    };
    let mut update = pb::NodeUpdate {
        digest,
        shared_lists: form.shared_lists,
        ..Default::default()
    };
    if old.node_addresses != new.node_addresses {
        update.node_addresses = Some(addresses_to(new));
    }
    for (id, g) in &new.groups {
        match old.groups.get(id) {
            Some(o) if Arc::ptr_eq(o, g) || o == g => {}
            Some(o) if form.group_patches => {
                let whole = group_to(id, g);
                match group_patch(id, o, g) {
                    Some(p) if p.encoded_len() < whole.encoded_len() => update.patch_groups.push(p),
                    _ => update.upsert_groups.push(whole),
                }
            }
            _ => update.upsert_groups.push(group_to(id, g)),
        }
    }
    update.remove_groups = old
        .groups
        .keys()
        .filter(|id| !new.groups.contains_key(*id))
        .cloned()
        .collect();
    let old_pods: BTreeMap<(&str, &str), &PodRules> = old
        .pods
        .iter()
        .map(|p| ((p.namespace.as_str(), p.name.as_str()), p))
        .collect();
    let new_pods: BTreeMap<(&str, &str), &PodRules> = new
        .pods
        .iter()
        .map(|p| ((p.namespace.as_str(), p.name.as_str()), p))
        .collect();
    let mut held = form.shared_lists.then(|| lists_of(old));
    for (key, p) in &new_pods {
        if old_pods.get(key) == Some(p) {
            continue;
        }
        update.upsert_pods.push(pod_to(p, form));
        if let Some(held) = &mut held {
            for l in pod_lists(p) {
                if !held.contains_key(l.id()) {
                    update.upsert_lists.push(tier_list_to(l));
                    held.insert(l.id().to_string(), l.clone());
                }
            }
        }
    }
    update.upsert_lists.sort_by(|a, b| a.id.cmp(&b.id));
    for (ns, name) in old_pods.keys().filter(|k| !new_pods.contains_key(*k)) {
        update.remove_pods.push(pb::PodRef {
            namespace: ns.to_string(),
            name: name.to_string(),
        });
    }
    if Arc::ptr_eq(&old.rules, &new.rules) {
        return update;
    }
    for (id, o) in new.rules.iter() {
        if old.rules.get(id) != Some(o) {
            update.upsert_rules.push(rule_to(id, o));
        }
    }
    update.remove_rules = old
        .rules
        .keys()
        .filter(|id| !new.rules.contains_key(*id))
        .cloned()
        .collect();
    update
}

/// True when the update changes nothing (same digest before and after is the caller's test;
/// this one is about the message).
pub fn is_empty(update: &pb::NodeUpdate) -> bool {
    !update.snapshot
        && update.node_addresses.is_none()
        && update.upsert_groups.is_empty()
        && update.remove_groups.is_empty()
        && update.upsert_pods.is_empty()
        && update.remove_pods.is_empty()
        && update.upsert_rules.is_empty()
        && update.remove_rules.is_empty()
        && update.upsert_lists.is_empty()
        && update.patch_groups.is_empty()
}

/// Applies an update to `old` (ignored for a snapshot) and returns the new state, or an
/// error and no state at all: the caller keeps enforcing `old`. The result must reference
/// only groups and rules it holds and must have the update's digest.
pub fn apply(
    node: &str,
    old: Option<&NodeRuleSet>,
    update: &pb::NodeUpdate,
) -> Result<NodeRuleSet, WireError> {
    let mut state = match (update.snapshot, old) {
        (true, _) => NodeRuleSet {
            node: node.to_string(),
            ..Default::default()
        },
        (false, Some(old)) => old.clone(),
        (false, None) => return Err(err("snapshot", "the first update must be a snapshot")),
    };
    if update.snapshot && update.node_addresses.is_none() {
        return Err(err(
            "nodeAddresses",
            "a snapshot carries the node's addresses",
        ));
    }
    if let Some(a) = &update.node_addresses {
        state.node_addresses = a
            .addresses
            .iter()
            .enumerate()
            .map(|(i, b)| addr_from_bytes(b, &format!("nodeAddresses[{i}]")))
            .collect::<Result<_, _>>()?;
    }
    for id in &update.remove_groups {
        state.groups.remove(id);
    }
    for (i, g) in update.upsert_groups.iter().enumerate() {
        let (id, group) = group_from(g, &format!("upsertGroups[{i}]"))?;
        state.groups.insert(id, Arc::new(group));
    }
    for (i, p) in update.patch_groups.iter().enumerate() {
        let field = format!("patchGroups[{i}]");
        let old = state.groups.get(&p.id).ok_or_else(|| {
            err(
                format!("{field}.id"),
                format!("patches group {}, which the node does not hold", p.id),
            )
        })?;
        let patched = apply_group_patch(old, p, &field)?;
        state.groups.insert(p.id.clone(), Arc::new(patched));
    }
    // What this update uses; the reader reads every form.
    let form = Form {
        shared_lists: update.shared_lists,
        group_patches: true,
    };
    let mut lists = match (form.shared_lists, update.snapshot) {
        (true, false) => lists_of(&state),
        _ => Lists::new(),
    };
    if !form.shared_lists && !update.upsert_lists.is_empty() {
        return Err(err("upsertLists", "lists come only with sharedLists"));
    }
    for (i, l) in update.upsert_lists.iter().enumerate() {
        let list = tier_list_from(l, &format!("upsertLists[{i}]"))?;
        lists.insert(l.id.clone(), Arc::new(list));
    }
    let mut pods: BTreeMap<(String, String), PodRules> = std::mem::take(&mut state.pods)
        .into_iter()
        .map(|p| ((p.namespace.clone(), p.name.clone()), p))
        .collect();
    for p in &update.remove_pods {
        pods.remove(&(p.namespace.clone(), p.name.clone()));
    }
    for (i, p) in update.upsert_pods.iter().enumerate() {
        let pod = pod_from(p, &format!("upsertPods[{i}]"), &lists)?;
        pods.insert((pod.namespace.clone(), pod.name.clone()), pod);
    }
    state.pods = pods.into_values().collect();
    if !(update.remove_rules.is_empty() && update.upsert_rules.is_empty()) {
        // Copied only when they change: unchanged origins stay the same allocation.
        let rules = Arc::make_mut(&mut state.rules);
        for id in &update.remove_rules {
            rules.remove(id);
        }
        for (i, r) in update.upsert_rules.iter().enumerate() {
            let (id, origin) = rule_from(r, &format!("upsertRules[{i}]"))?;
            rules.insert(id, origin);
        }
    }
    check_references(&state)?;
    if digest_in(&state, form) != update.digest {
        return Err(err(
            "digest",
            "the state after this update differs from the controller's",
        ));
    }
    Ok(state)
}

fn check_references(state: &NodeRuleSet) -> Result<(), WireError> {
    // Pods share their Admin and Baseline lists: each is checked once, not once per pod.
    let mut checked: std::collections::HashSet<*const TierList> = Default::default();
    for pod in &state.pods {
        let directions = [Some(&pod.ingress), Some(&pod.egress)]
            .into_iter()
            .chain([pod.audit.ingress.as_ref(), pod.audit.egress.as_ref()])
            .flatten();
        for d in directions {
            let lists = [&d.admin, &d.baseline]
                .into_iter()
                .filter(|l| checked.insert(Arc::as_ptr(l)))
                .flat_map(|l| l.iter());
            for rule in d.network_policy.iter().chain(lists) {
                check_instance(state, pod, rule)?;
            }
        }
    }
    Ok(())
}

fn check_instance(
    state: &NodeRuleSet,
    pod: &PodRules,
    rule: &RuleInstance,
) -> Result<(), WireError> {
    let at = || format!("pod {}/{} rule {}", pod.namespace, pod.name, rule.rule);
    if !state.rules.contains_key(&rule.rule) {
        return Err(err(at(), "names a rule the node does not have"));
    }
    for clause in &rule.clauses {
        let ids: Vec<&String> = match clause {
            Clause::PeerPort { peers, .. } => peers.iter().flatten().collect(),
            Clause::NamedPort { group } => vec![group],
        };
        for id in ids {
            match (state.groups.get(id), clause) {
                (None, _) => return Err(err(at(), format!("names group {id}, which is missing"))),
                (Some(g), Clause::NamedPort { .. }) if !matches!(**g, Group::NamedPorts(_)) => {
                    return Err(err(at(), format!("group {id} is not a named-port group")))
                }
                _ => {}
            }
        }
    }
    Ok(())
}
