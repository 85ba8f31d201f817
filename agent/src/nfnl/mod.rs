//! Netfilter netlink (nf_tables) spoken directly, for what `nft` does slowly at issue 4's
//! scale: loading and changing the elements of big address sets ([`setelem`]), writing
//! rules and whole incremental transactions ([`rules`], [`transaction`]), reading the
//! table back for drift detection ([`image`]) and reading counters ([`counters`]).
//!
//! nft 1.0.x fills its whole cache (every element of every set) before listing anything,
//! and parses every element as JSON or text; these paths skip both.
//!
//! Only the few message kinds the agent needs are encoded, by hand: the attribute layout
//! is the kernel's UAPI (`linux/netfilter/nf_tables.h`), stable by contract.

pub mod conntrack;
pub mod counters;
pub mod digest;
pub mod events;
pub mod image;
pub mod intervals;
pub mod nflog;
pub mod rules;
pub mod scratch;
pub mod setelem;
pub mod transaction;

use std::os::fd::AsRawFd;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

pub(crate) const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(crate) const NFPROTO_INET: u8 = 1;
pub(crate) const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
/// Largest attribute: its length is a `u16`, so a nested element list must stay below it.
pub(crate) const MAX_ATTR_LEN: usize = 0xffff;

/// nf_tables message types (`enum nf_tables_msg_types`).
pub mod msg {
    pub const NEWTABLE: u16 = 0;
    pub const GETTABLE: u16 = 1;
    pub const NEWCHAIN: u16 = 3;
    pub const GETCHAIN: u16 = 4;
    pub const DELCHAIN: u16 = 5;
    pub const NEWRULE: u16 = 6;
    pub const GETRULE: u16 = 7;
    pub const DELRULE: u16 = 8;
    pub const NEWSET: u16 = 9;
    pub const GETSET: u16 = 10;
    pub const NEWSETELEM: u16 = 12;
    pub const GETSETELEM: u16 = 13;
    pub const DELSETELEM: u16 = 14;
    pub const NEWOBJ: u16 = 18;
    pub const GETOBJ: u16 = 19;
    pub const DELOBJ: u16 = 20;
}

#[derive(Debug, thiserror::Error)]
pub enum NfnlError {
    #[error("netfilter netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("netfilter netlink: kernel answered error {code} ({})", os_error(*.code))]
    Kernel { code: i32 },
    #[error("netfilter netlink: {what}: kernel answered error {code} ({})", os_error(*.code))]
    Rejected { what: String, code: i32 },
    #[error("netfilter netlink: malformed message: {0}")]
    Malformed(&'static str),
    #[error("cannot enter network namespace {0}: {1}")]
    Netns(String, String),
}

/// The text of a netlink error code (a negative errno).
fn os_error(code: i32) -> std::io::Error {
    std::io::Error::from_raw_os_error(code.saturating_neg())
}

/// A netlink message under construction: header, `nfgenmsg`, attributes.
pub(crate) struct Message {
    buf: Vec<u8>,
}

impl Message {
    /// An nf_tables message of `kind` for the `inet` family.
    pub fn nftables(kind: u16, flags: u16) -> Message {
        Message::raw(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            flags,
            [NFPROTO_INET, 0, 0, 0],
        )
    }

    pub(crate) fn raw(kind: u16, flags: u16, nfgenmsg: [u8; 4]) -> Message {
        let mut buf = vec![0u8; NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&nfgenmsg);
        Message { buf }
    }

    pub fn attr(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        push_attr(&mut self.buf, kind, payload);
        self
    }

    /// A NUL-terminated string attribute.
    pub fn attr_str(&mut self, kind: u16, text: &str) -> &mut Self {
        let mut payload = Vec::with_capacity(text.len() + 1);
        payload.extend_from_slice(text.as_bytes());
        payload.push(0);
        self.attr(kind, &payload)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// The finished message with sequence number `seq`.
    pub fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

pub(crate) fn push_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// (type without flags, payload) of each attribute in `data`.
pub(crate) fn attrs(mut data: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), NfnlError>> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([data[0], data[1]]));
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            data = &[];
            return Some(Err(NfnlError::Malformed("attribute length")));
        }
        let payload = &data[4..len];
        data = &data[len.next_multiple_of(4).min(data.len())..];
        Some(Ok((kind, payload)))
    })
}

/// The text of a NUL-terminated string attribute.
pub(crate) fn attr_text(payload: &[u8]) -> &[u8] {
    payload.split(|&b| b == 0).next().unwrap_or_default()
}

/// One message of a reply: its type and its body after the `nfgenmsg`.
pub(crate) struct Reply {
    pub kind: u16,
    pub body: Vec<u8>,
}

/// `make()` here, or on a short-lived thread that entered `/var/run/netns/NAME`: a socket
/// stays in the namespace it was created in, and the caller uses it from anywhere.
pub(crate) fn in_namespace<T: Send + 'static>(
    netns: Option<&str>,
    make: impl FnOnce() -> Result<T, NfnlError> + Send + 'static,
) -> Result<T, NfnlError> {
    match netns {
        None => make(),
        Some(name) => crate::netns::spawn_in(name, make)
            .join()
            .map_err(|_| NfnlError::Malformed("namespace thread panicked"))?
            .map_err(|e| NfnlError::Netns(e.path, e.reason))?,
    }
}

/// A NETLINK_NETFILTER socket, opened in the agent's namespace or in a named one.
pub struct NfnlSocket {
    socket: Socket,
    seq: u32,
}

impl NfnlSocket {
    /// Opens a socket in the current network namespace, or in `/var/run/netns/NAME`: a
    /// socket stays in the namespace it was created in, so a short-lived thread that
    /// entered the namespace creates it and the caller keeps using it from anywhere.
    pub fn open(netns: Option<&str>) -> Result<NfnlSocket, NfnlError> {
        let socket = in_namespace(netns, new_socket)?;
        Ok(NfnlSocket { socket, seq: 0 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends a request and collects the reply messages of type `NEW…` until the dump ends
    /// (or the single answer came). `Ok(None)` when the kernel says the object does not
    /// exist (ENOENT).
    pub(crate) fn request(&mut self, msg: Message) -> Result<Option<Vec<Reply>>, NfnlError> {
        let mut out = Vec::new();
        let found = self.request_each(msg, |kind, body| {
            out.push(Reply {
                kind,
                body: body.to_vec(),
            })
        })?;
        Ok(found.then_some(out))
    }

    /// As [`NfnlSocket::request`], but hands each reply message to `each` as it arrives:
    /// its type (without the subsystem) and its body after the `nfgenmsg`, uncopied, so a
    /// dump of a large table costs no allocation per message. `Ok(false)` on ENOENT.
    pub(crate) fn request_each(
        &mut self,
        msg: Message,
        mut each: impl FnMut(u16, &[u8]),
    ) -> Result<bool, NfnlError> {
        let seq = self.next_seq();
        let dump = {
            let flags = u16::from_ne_bytes([msg.buf[6], msg.buf[7]]);
            flags & NLM_F_DUMP == NLM_F_DUMP
        };
        let mut msg = msg;
        if !dump {
            // A single answer ends with an ACK, so the reader knows when to stop.
            let flags = u16::from_ne_bytes([msg.buf[6], msg.buf[7]]) | NLM_F_ACK;
            msg.buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        }
        self.socket.send(&msg.finish(seq), 0)?;
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 17);
        loop {
            buf.clear();
            let n = self.socket.recv(&mut buf, 0)?;
            if n == 0 {
                return Err(NfnlError::Malformed(
                    "socket closed before the answer ended",
                ));
            }
            for message in messages_of(&buf[..n]) {
                let Split {
                    kind,
                    seq: msg_seq,
                    body,
                    ..
                } = message?;
                if msg_seq != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(true),
                    NLMSG_ERROR => {
                        let code = error_code(body)?;
                        return match code {
                            0 => Ok(true),
                            c if c == -libc::ENOENT => Ok(false),
                            c => Err(NfnlError::Kernel { code: c }),
                        };
                    }
                    kind => each(kind & 0xff, body.get(4..).unwrap_or_default()),
                }
            }
        }
    }

    /// Sends `messages` as one nf_tables batch (one transaction: all or nothing) and waits
    /// for the kernel's verdict on each. `what(i)` names message `i` in an error.
    pub(crate) fn batch(
        &mut self,
        messages: Vec<Message>,
        what: impl Fn(usize) -> String,
    ) -> Result<(), NfnlError> {
        if messages.is_empty() {
            return Ok(());
        }
        let subsys = NFNL_SUBSYS_NFTABLES.to_be_bytes();
        let begin_seq = self.next_seq();
        let mut buf = Message::raw(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            [0, 0, subsys[0], subsys[1]],
        )
        .finish(begin_seq);
        let first = begin_seq.wrapping_add(1);
        let count = messages.len() as u32;
        // The kernel reports every failing message of a batch whether it asked for an
        // acknowledgement or not, and delivers its reports in message order once the batch
        // is committed or aborted. So only the last message asks: its acknowledgement
        // comes after any error, and the kernel queues one skb instead of one per message
        // (21,000 in a tiered node's first load).
        let size: usize = messages.iter().map(|m| m.buf.len() + 4).sum();
        buf.reserve(size + 64);
        for (i, mut m) in messages.into_iter().enumerate() {
            if i + 1 == count as usize {
                let flags = u16::from_ne_bytes([m.buf[6], m.buf[7]]) | NLM_F_ACK;
                m.buf[6..8].copy_from_slice(&flags.to_ne_bytes());
            }
            let seq = self.next_seq();
            buf.extend_from_slice(&m.finish(seq));
        }
        let end_seq = self.next_seq();
        buf.extend_from_slice(
            &Message::raw(
                NFNL_MSG_BATCH_END,
                NLM_F_REQUEST,
                [0, 0, subsys[0], subsys[1]],
            )
            .finish(end_seq),
        );
        // The whole batch must be one datagram: the kernel aborts a batch whose END is
        // not in the same skb, and refuses a datagram larger than the send buffer.
        set_sndbuf_force(&self.socket, buf.len() + 4096)?;
        // At worst one report per message (all of them failing), each a small skb of
        // ~1 KiB truesize: the default receive buffer (~208 KiB) holds ~200 of them, and the
        // kernel drops the rest and reports ENOBUFS (issue 12.8: five groups of a million
        // addresses, 1,500 messages).
        set_rcvbuf_force(&self.socket, (count as usize + 2) * ACK_TRUESIZE)?;
        self.socket.send(&buf, 0)?;
        // The kernel processes the batch during send(), so every answer is queued by now;
        // still, read until every message is accounted for.
        let mut acked = false;
        let mut first_error: Option<(Option<usize>, i32)> = None;
        let mut rbuf: Vec<u8> = Vec::with_capacity(1 << 16);
        while !acked && first_error.is_none() {
            rbuf.clear();
            let n = self.socket.recv(&mut rbuf, 0)?;
            for message in messages_of(&rbuf[..n]) {
                let Split {
                    kind,
                    seq: msg_seq,
                    body,
                    ..
                } = message?;
                if kind != NLMSG_ERROR || msg_seq.wrapping_sub(begin_seq) > count + 1 {
                    continue;
                }
                let index = msg_seq.wrapping_sub(first);
                let index = (index < count).then_some(index as usize);
                match error_code(body)? {
                    0 if index == Some(count as usize - 1) => acked = true,
                    0 => {}
                    code => {
                        first_error.get_or_insert((index, code));
                    }
                }
            }
        }
        match first_error {
            None => Ok(()),
            Some((index, code)) => Err(NfnlError::Rejected {
                what: index.map_or_else(|| "batch".to_string(), what),
                code,
            }),
        }
    }
}

fn new_socket() -> Result<Socket, NfnlError> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    // Errors then carry only the failing message's header, not a copy of a 64 KiB body.
    socket.set_cap_ack(true)?;
    // The kernel answers during send(), so a reply that never comes is a bug somewhere:
    // fail instead of hanging the agent.
    let timeout = libc::timeval {
        tv_sec: 10,
        tv_usec: 0,
    };
    setsockopt(&socket, libc::SO_RCVTIMEO, &timeout)?;
    Ok(socket)
}

/// What one acknowledgement costs in a receive buffer, generously.
const ACK_TRUESIZE: usize = 2048;
const MIN_RCVBUF: usize = 256 << 10;

fn set_rcvbuf_force(socket: &Socket, size: usize) -> Result<(), NfnlError> {
    let size = libc::c_int::try_from(size.max(MIN_RCVBUF))
        .map_err(|_| NfnlError::Malformed("batch too large"))?;
    setsockopt(socket, libc::SO_RCVBUFFORCE, &size)
}

fn set_sndbuf_force(socket: &Socket, size: usize) -> Result<(), NfnlError> {
    let size = libc::c_int::try_from(size).map_err(|_| NfnlError::Malformed("batch too large"))?;
    setsockopt(socket, libc::SO_SNDBUFFORCE, &size)
}

/// A `SOL_SOCKET` option whose value is a plain C struct or integer.
pub(crate) fn setsockopt<T>(
    socket: &Socket,
    option: libc::c_int,
    value: &T,
) -> Result<(), NfnlError> {
    // SAFETY: a valid socket descriptor and a pointer to a live T of the given size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(NfnlError::Io(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The first message of a datagram, and what follows it.
struct Split<'a> {
    kind: u16,
    seq: u32,
    body: &'a [u8],
    rest: &'a [u8],
}

/// The messages of one datagram, in order; a malformed one ends the walk.
fn messages_of(mut data: &[u8]) -> impl Iterator<Item = Result<Split<'_>, NfnlError>> {
    std::iter::from_fn(move || {
        if data.len() < NLMSG_HDRLEN {
            return None;
        }
        let next = split_message(data);
        data = match &next {
            Ok(split) => split.rest,
            Err(_) => &[],
        };
        Some(next)
    })
}

fn split_message(data: &[u8]) -> Result<Split<'_>, NfnlError> {
    if data.len() < NLMSG_HDRLEN {
        return Err(NfnlError::Malformed("message shorter than its header"));
    }
    let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
    let kind = u16::from_ne_bytes([data[4], data[5]]);
    let seq = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
    if len < NLMSG_HDRLEN || len > data.len() {
        return Err(NfnlError::Malformed("message length"));
    }
    Ok(Split {
        kind,
        seq,
        body: &data[NLMSG_HDRLEN..len],
        rest: &data[len.next_multiple_of(4).min(data.len())..],
    })
}

fn error_code(body: &[u8]) -> Result<i32, NfnlError> {
    body.get(0..4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(NfnlError::Malformed("error message"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_length_type_flags_and_attributes() {
        let mut m = Message::nftables(msg::GETOBJ, NLM_F_REQUEST | NLM_F_DUMP);
        m.attr_str(1, "palisade").attr(3, &1u32.to_be_bytes());
        let bytes = m.finish(7);
        assert_eq!(bytes.len() % 4, 0);
        let Split {
            kind,
            seq,
            body,
            rest,
        } = split_message(&bytes).unwrap();
        assert_eq!(kind, (NFNL_SUBSYS_NFTABLES << 8) | msg::GETOBJ);
        assert_eq!((seq, rest.len()), (7, 0));
        assert_eq!(body[0], NFPROTO_INET);
        let found: Vec<(u16, Vec<u8>)> = attrs(&body[4..])
            .map(|a| a.map(|(k, p)| (k, p.to_vec())).unwrap())
            .collect();
        assert_eq!(
            found,
            vec![
                (1, b"palisade\0".to_vec()),
                (3, 1u32.to_be_bytes().to_vec())
            ]
        );
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let mut bytes = Message::nftables(msg::GETOBJ, NLM_F_REQUEST).finish(1);
        bytes[0] = 200;
        assert!(split_message(&bytes).is_err());
        assert!(attrs(&[8, 0, 1, 0, 0]).next().unwrap().is_err());
        assert!(error_code(&[1, 2]).is_err());
    }
}
