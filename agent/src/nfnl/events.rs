//! Watching the nf_tables event group (`NFNLGRP_NFTABLES`) for changes to our table made
//! by anyone but this agent (issue 12.5): a deleted table, a rule added to one of our
//! chains, a set element added by hand are seen within milliseconds, not at the next
//! periodic reconcile.
//!
//! The kernel multicasts one message per changed object (table, chain, rule, set, element,
//! object; attribute 1 names the table in each), then one `NFT_MSG_NEWGEN` per committed
//! transaction with the pid of the task that committed it. A transaction is ours when
//! that task is one of our threads (a netlink batch) or an `nft` we spawned
//! ([`crate::nft::spawned_by_us`]); anything else that touched our table is drift. Lost
//! events (`ENOBUFS`: the receive buffer overflowed, e.g. during our own load of 150,000
//! elements, one event each) count as drift too: the reconcile that follows compares the
//! whole table and costs nothing when it is in sync.

use std::sync::Arc;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};
use tokio::sync::Notify;

use super::{attr_text, attrs, messages_of, setsockopt, NfnlError, NFNL_SUBSYS_NFTABLES};

const NFNLGRP_NFTABLES: u32 = 7;
const NFT_MSG_NEWGEN: u16 = 15;
const NFTA_GEN_PROC_PID: u16 = 2;
/// Attribute 1 names the table in every nf_tables object message.
const ATTR_TABLE: u16 = 1;
/// Events of one big transaction of ours fit without overflowing (most of the time).
const RCVBUF: libc::c_int = 8 << 20;

/// What one event message says.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// An object of the named table changed.
    Touched(String),
    /// A transaction was committed by this task id.
    Committed(Option<u32>),
    Other,
}

/// Decodes one datagram's messages (only the table name and the committing pid).
pub fn decode(datagram: &[u8]) -> Vec<Event> {
    let mut out = Vec::new();
    for message in messages_of(datagram) {
        let Ok(m) = message else { break };
        if m.kind >> 8 != NFNL_SUBSYS_NFTABLES {
            out.push(Event::Other);
            continue;
        }
        let kind = m.kind & 0xff;
        let body = m.body.get(4..).unwrap_or_default();
        let wanted = if kind == NFT_MSG_NEWGEN {
            NFTA_GEN_PROC_PID
        } else {
            ATTR_TABLE
        };
        let payload = attrs(body)
            .map_while(Result::ok)
            .find(|(k, _)| *k == wanted)
            .map(|(_, p)| p);
        out.push(if kind == NFT_MSG_NEWGEN {
            Event::Committed(
                payload
                    .and_then(|p| <[u8; 4]>::try_from(p).ok())
                    .map(u32::from_be_bytes),
            )
        } else {
            match payload {
                Some(p) => Event::Touched(String::from_utf8_lossy(attr_text(p)).into_owned()),
                None => Event::Other,
            }
        });
    }
    out
}

/// Whether task `pid` belongs to this process, or is an `nft` it ran.
pub fn ours(pid: u32) -> bool {
    let me = std::process::id();
    pid == me
        || std::path::Path::new(&format!("/proc/{me}/task/{pid}")).exists()
        || crate::nft::spawned_by_us(pid)
}

/// Follows the event stream: `Touched` events for `table` are held until their
/// transaction's `Committed` names who made it.
#[derive(Default)]
pub struct Follower {
    touched: bool,
}

impl Follower {
    /// Whether these events end a foreign transaction that touched `table`.
    pub fn drift(&mut self, table: &str, events: &[Event], ours: impl Fn(u32) -> bool) -> bool {
        let mut drift = false;
        for e in events {
            match e {
                Event::Touched(t) if t == table => self.touched = true,
                Event::Committed(pid) => {
                    let touched = std::mem::take(&mut self.touched);
                    drift |= touched && !pid.is_some_and(&ours);
                }
                _ => {}
            }
        }
        drift
    }
}

/// Opens the event socket in this thread's namespace (or the named one).
pub fn open(netns: Option<&str>) -> Result<Socket, NfnlError> {
    let new = || -> Result<Socket, NfnlError> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.add_membership(NFNLGRP_NFTABLES)?;
        // Best effort: without CAP_NET_ADMIN's force the default buffer is used, and an
        // overflow only means an extra reconcile.
        let _ = setsockopt(&socket, libc::SO_RCVBUFFORCE, &RCVBUF);
        Ok(socket)
    };
    super::in_namespace(netns, new)
}

/// Watches on a thread of its own, waking `drift` for each foreign change to `table` (and
/// for lost events). Ends only with the process; an error of the socket other than an
/// overflow ends the watch with a log line (the periodic reconcile stays as backstop).
pub fn watch(socket: Socket, table: &'static str, drift: Arc<Notify>) {
    std::thread::Builder::new()
        .name("nft-events".into())
        .spawn(move || {
            let mut follower = Follower::default();
            let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
            loop {
                buf.clear();
                match socket.recv(&mut buf, 0) {
                    Ok(n) => {
                        if follower.drift(table, &decode(&buf[..n]), ours) {
                            drift.notify_one();
                        }
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        follower = Follower::default();
                        drift.notify_one();
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::error!(error = %e, "nftables event watch ended; drift is repaired at the periodic reconcile only");
                        return;
                    }
                }
            }
        })
        .map(drop)
        .unwrap_or_else(
            |e| tracing::error!(error = %e, "cannot start the nftables event watch"),
        );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nfnl::{msg, Message};

    fn gen(pid: u32) -> Vec<u8> {
        let mut m = Message::nftables(NFT_MSG_NEWGEN, 0);
        m.attr(1, &7u32.to_be_bytes())
            .attr(NFTA_GEN_PROC_PID, &pid.to_be_bytes())
            .attr_str(3, "nft");
        m.finish(0)
    }

    fn rule_of(table: &str) -> Vec<u8> {
        let mut m = Message::nftables(msg::NEWRULE, 0);
        m.attr_str(ATTR_TABLE, table).attr_str(2, "forward");
        m.finish(0)
    }

    #[test]
    fn events_name_the_table_and_the_committing_pid() {
        let mut datagram = rule_of("palisade");
        datagram.extend(gen(4242));
        assert_eq!(
            decode(&datagram),
            vec![
                Event::Touched("palisade".into()),
                Event::Committed(Some(4242))
            ]
        );
    }

    #[test]
    fn only_foreign_transactions_on_our_table_are_drift() {
        let mine = |pid: u32| pid == 1;
        let mut f = Follower::default();
        let ev = |t: &str, pid| [Event::Touched(t.into()), Event::Committed(Some(pid))];
        assert!(!f.drift("palisade", &ev("palisade", 1), mine), "our own");
        assert!(
            !f.drift("palisade", &ev("filter", 9), mine),
            "another table"
        );
        assert!(f.drift("palisade", &ev("palisade", 9), mine), "foreign");
        // A transaction's events may span datagrams.
        assert!(!f.drift("palisade", &[Event::Touched("palisade".into())], mine));
        assert!(f.drift("palisade", &[Event::Committed(Some(9))], mine));
        assert!(!f.drift("palisade", &[Event::Committed(Some(9))], mine));
    }

    #[test]
    fn truncated_events_do_not_panic() {
        let mut d = gen(1);
        d.truncate(d.len() - 3);
        let _ = decode(&d);
        let _ = decode(&[1, 2, 3]);
    }
}
