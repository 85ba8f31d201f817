//! An incremental transaction ([`crate::diff::Step`]s) as one nf_tables batch: all or
//! nothing, like the nft transaction it replaces, without nft's cache fill (every named
//! object of the table, every element of its interval sets) before the first command.

use super::{rules, setelem, Message, NfnlError, NfnlSocket};
use crate::diff::{ChainOp, Step};
use crate::nfnl::setelem::{Change, Op};
use crate::render::{json, BaseChain, RuleDef};

/// The batch's messages, each with what it does (for an error); `None` if a step is not
/// one netlink encodes here ([`crate::diff::netlink_only`]).
pub(crate) fn messages(
    table: &str,
    steps: &[Step],
) -> Result<Option<Vec<(Message, String)>>, NfnlError> {
    let mut out = Vec::with_capacity(steps.len());
    let mut ids = rules::SetIds::default();
    for step in steps {
        match step {
            Step::Nft(_) => return Ok(None),
            Step::Elements {
                set,
                kind,
                op,
                elements,
            } => {
                let change = Change {
                    set,
                    kind: *kind,
                    op: *op,
                    elements,
                };
                let what = match op {
                    Op::Add => format!("adding elements to set {set}"),
                    Op::Delete => format!("deleting elements from set {set}"),
                };
                for m in setelem::messages(table, &change)? {
                    out.push((m, what.clone()));
                }
            }
            Step::Counter { name, op } => out.push(match op {
                Op::Add => (
                    super::counters::create_message(table, name),
                    format!("creating counter {name}"),
                ),
                Op::Delete => (
                    rules::delete_counter(table, name),
                    format!("deleting counter {name}"),
                ),
            }),
            Step::Chain { name, op } => out.push(match op {
                ChainOp::Add => (
                    rules::add_chain(table, name),
                    format!("adding chain {name}"),
                ),
                ChainOp::Flush => (
                    rules::flush_chain(table, name),
                    format!("flushing chain {name}"),
                ),
                ChainOp::Delete => (
                    rules::delete_chain(table, name),
                    format!("deleting chain {name}"),
                ),
            }),
            Step::Rule { chain, rule } => {
                let Some(msgs) = rules::add_rule(table, chain, rule, &mut ids) else {
                    return Ok(None);
                };
                let what = format!("adding a rule to chain {chain}");
                out.extend(msgs.into_iter().map(|m| (m, what.clone())));
            }
            Step::Dispatch { map, op, entries } => {
                let goto = json::is_rest_map(map);
                let entries = entries.iter().map(|(k, v)| (k.as_str(), v.as_str()));
                let Some(m) = rules::dispatch_elements(table, map, *op == Op::Add, goto, entries)
                else {
                    return Ok(None);
                };
                let verb = match op {
                    Op::Add => "adding elements to",
                    Op::Delete => "deleting elements from",
                };
                out.push((m, format!("{verb} map {map}")));
            }
        }
    }
    Ok(Some(out))
}

/// Applies `steps` in one batch; `Ok(false)` (nothing sent) if a step is not encodable
/// here. The error names the step whose message the kernel refused; nothing of the batch
/// is then applied.
pub fn apply(socket: &mut NfnlSocket, table: &str, steps: &[Step]) -> Result<bool, NfnlError> {
    let Some(messages) = messages(table, steps)? else {
        return Ok(false);
    };
    send(socket, messages)?;
    Ok(true)
}

/// Messages per batch of a first load's chains and rules: the table is not hooked yet, so
/// the load need not be one transaction, and error reports (at worst one per message)
/// stay within a receive buffer sized for them.
const UNHOOKED_BATCH: usize = 2048;

/// Creates the regular chains `names`, empty, in a table no packet sees yet.
pub fn create_chains(
    socket: &mut NfnlSocket,
    table: &str,
    names: &[&str],
) -> Result<(), NfnlError> {
    let messages = names
        .iter()
        .map(|name| vec![(rules::add_chain(table, name), What::Chain(name))])
        .collect();
    in_batches(socket, messages)
}

/// Appends each chain's rules, in order, in a table no packet sees yet; `Ok(false)`
/// (nothing sent) if a rule is not one netlink encodes here.
pub fn append_rules(
    socket: &mut NfnlSocket,
    table: &str,
    chains: &[(&str, &[RuleDef])],
) -> Result<bool, NfnlError> {
    let mut messages = Vec::new();
    let mut ids = rules::SetIds::default();
    for (chain, rules) in chains {
        for rule in *rules {
            let Some(msgs) = rules::add_rule(table, chain, rule, &mut ids) else {
                return Ok(false);
            };
            messages.push(msgs.into_iter().map(|m| (m, What::Rule(chain))).collect());
        }
    }
    in_batches(socket, messages)?;
    Ok(true)
}

/// Sends `groups` in batches of about [`UNHOOKED_BATCH`] messages, each group whole in
/// one batch: a rule finds its anonymous sets by their ids in the same batch.
/// What a first load's message does, named only if the kernel refuses it.
enum What<'a> {
    Chain(&'a str),
    Rule(&'a str),
}

impl std::fmt::Display for What<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            What::Chain(name) => write!(f, "adding chain {name}"),
            What::Rule(chain) => write!(f, "adding a rule to chain {chain}"),
        }
    }
}

fn in_batches(
    socket: &mut NfnlSocket,
    groups: Vec<Vec<(Message, What<'_>)>>,
) -> Result<(), NfnlError> {
    let mut batch: Vec<(Message, What<'_>)> = Vec::new();
    for group in groups {
        if !batch.is_empty() && batch.len() + group.len() > UNHOOKED_BATCH {
            send(socket, std::mem::take(&mut batch))?;
        }
        batch.extend(group);
    }
    send(socket, batch)
}

fn send<W: std::fmt::Display>(
    socket: &mut NfnlSocket,
    messages: Vec<(Message, W)>,
) -> Result<(), NfnlError> {
    let (messages, what): (Vec<Message>, Vec<W>) = messages.into_iter().unzip();
    socket.batch(messages, |i| {
        what.get(i).map(W::to_string).unwrap_or_default()
    })
}

/// Adds the base chains with their statements in one batch: the moment the table starts
/// to filter, all at once. `Ok(false)` (nothing sent) if one is not encodable here.
pub fn add_base_chains(
    socket: &mut NfnlSocket,
    table: &str,
    chains: &[BaseChain],
) -> Result<bool, NfnlError> {
    let mut messages = Vec::new();
    for chain in chains {
        let Some(msgs) = rules::add_base_chain(table, chain) else {
            return Ok(false);
        };
        let what = format!("adding base chain {}", chain.name);
        messages.extend(msgs.into_iter().map(|m| (m, what.clone())));
    }
    send(socket, messages)?;
    Ok(true)
}
