//! A netlink batch asks the kernel to acknowledge only its last message (the kernel
//! reports a failing message whether or not it asked). Root, in a network namespace of its
//! own: a batch succeeds whole, and a batch with a failing message (in the middle, or the
//! last one) is refused naming that message, and changes nothing.

mod common;

use std::process::Command;

use common::{can_run, Netns, NFT, ROOT};
use palisade_agent::nfnl::{counters, transaction, NfnlError, NfnlSocket};
use palisade_agent::render::{RuleDef, Verdict};

fn rules_of(ns: &Netns, chain: &str) -> usize {
    let out = Command::new("ip")
        .args([
            "netns", "exec", &ns.0, "nft", "list", "chain", "inet", "t", chain,
        ])
        .output()
        .expect("nft list chain");
    assert!(out.status.success(), "nft list chain {chain}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim() == "accept" || l.trim() == "drop")
        .count()
}

fn rule(verdict: Verdict) -> RuleDef {
    RuleDef {
        matches: Vec::new(),
        counter: None,
        verdict,
    }
}

#[test]
fn a_batch_is_refused_whole_naming_its_failing_message() {
    if !can_run(&[ROOT, NFT]) {
        return;
    }
    let ns = Netns::new(&format!("pnb-{}", std::process::id()));
    let mut s = NfnlSocket::open(Some(&ns.0)).expect("netlink socket");
    counters::create_table(&mut s, "t").expect("table");
    transaction::create_chains(&mut s, "t", &["a", "c"]).expect("chains");

    let accept = [rule(Verdict::Accept), rule(Verdict::Drop)];
    let refused = |chains: &[(&str, &[RuleDef])]| {
        let mut s = NfnlSocket::open(Some(&ns.0)).expect("netlink socket");
        match transaction::append_rules(&mut s, "t", chains) {
            Err(NfnlError::Rejected { what, code }) => (what, code),
            other => panic!("{chains:?}: expected a refusal, got {other:?}"),
        }
    };
    // Chain b does not exist: its rules fail between a's and c's.
    let (what, code) = refused(&[("a", &accept), ("b", &accept), ("c", &accept)]);
    assert_eq!(what, "adding a rule to chain b");
    assert_eq!(code, -libc::ENOENT);
    assert_eq!(
        (rules_of(&ns, "a"), rules_of(&ns, "c")),
        (0, 0),
        "refused whole"
    );
    // The failing message is the last one, the one that asks for the acknowledgement.
    let (what, _) = refused(&[("a", &accept), ("c", &accept[..1]), ("b", &accept[..1])]);
    assert_eq!(what, "adding a rule to chain b");
    assert_eq!(
        (rules_of(&ns, "a"), rules_of(&ns, "c")),
        (0, 0),
        "refused whole"
    );

    let sent = transaction::append_rules(&mut s, "t", &[("a", &accept), ("c", &accept[..1])]);
    assert!(
        sent.expect("a batch of existing chains"),
        "every rule encodable"
    );
    assert_eq!((rules_of(&ns, "a"), rules_of(&ns, "c")), (2, 1));
}
