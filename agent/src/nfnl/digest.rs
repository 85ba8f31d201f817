//! Digests of set contents, so drift detection covers set elements without keeping or
//! comparing 150,000 of them: the wrapping sum of a hash per element. A sum does not
//! depend on the kernel's dump order, and the agent computes the same value from the
//! elements it loaded, without reading them back.

use crate::render::SetElement;

use super::{attrs, msg, Message, NfnlError, NfnlSocket, NLM_F_DUMP, NLM_F_REQUEST};

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_KEY_END: u16 = 9;
const NFTA_DATA_VALUE: u16 = 1;

/// FNV-1a over the parts (each followed by a separator), then a 64-bit finaliser so that
/// sums of similar keys do not cancel out.
fn hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.iter() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// One element's hash: its key, interval end, flags (when not 0) and data.
fn element_hash(key: &[u8], key_end: &[u8], flags: u32, data: &[u8]) -> u64 {
    let flags = flags.to_be_bytes();
    let flags: &[u8] = if flags == [0; 4] { &[] } else { &flags };
    hash(&[key, key_end, flags, data])
}

/// The digest of a host set with these elements, as the kernel's dump of it gives.
/// Elements that are not single addresses do not occur in host sets; they count as
/// nothing here, so a set holding them never matches its dump.
pub fn of_hosts(elements: &[SetElement]) -> u64 {
    elements
        .iter()
        .filter_map(super::setelem::key)
        .map(|key| element_hash(key.as_ref(), &[], 0, &[]))
        .fold(0, u64::wrapping_add)
}

/// The value inside a nested `NFTA_DATA_VALUE` attribute.
fn value(nested: &[u8]) -> Result<&[u8], NfnlError> {
    for attr in attrs(nested) {
        let (kind, payload) = attr?;
        if kind == NFTA_DATA_VALUE {
            return Ok(payload);
        }
    }
    Ok(&[])
}

/// The hash of one element as the kernel dumps it (the payload of `NFTA_LIST_ELEM`).
fn of_dumped(element: &[u8]) -> Result<u64, NfnlError> {
    let (mut key, mut key_end, mut flags, mut data): (&[u8], &[u8], u32, &[u8]) =
        (&[], &[], 0, &[]);
    for attr in attrs(element) {
        let (kind, payload) = attr?;
        match kind {
            NFTA_SET_ELEM_KEY => key = value(payload)?,
            NFTA_SET_ELEM_KEY_END => key_end = value(payload)?,
            NFTA_SET_ELEM_DATA => data = payload,
            NFTA_SET_ELEM_FLAGS => {
                let bytes: [u8; 4] = payload
                    .try_into()
                    .map_err(|_| NfnlError::Malformed("element flags are not 4 bytes"))?;
                flags = u32::from_be_bytes(bytes);
            }
            _ => {}
        }
    }
    Ok(element_hash(key, key_end, flags, data))
}

/// The digest of a set whose elements are these, as the kernel dumps them.
pub(crate) fn of_elements(elements: &[Vec<u8>]) -> Result<u64, NfnlError> {
    elements
        .iter()
        .try_fold(0u64, |sum, e| Ok(sum.wrapping_add(of_dumped(e)?)))
}

/// The digest of set `set` of `inet TABLE` as the kernel holds it; `None` if the set does
/// not exist.
pub fn read(socket: &mut NfnlSocket, table: &str, set: &str) -> Result<Option<u64>, NfnlError> {
    let mut req = Message::nftables(msg::GETSETELEM, NLM_F_REQUEST | NLM_F_DUMP);
    req.attr_str(NFTA_SET_ELEM_LIST_TABLE, table)
        .attr_str(NFTA_SET_ELEM_LIST_SET, set);
    let Some(replies) = socket.request(req)? else {
        return Ok(None);
    };
    let mut digest = 0u64;
    for reply in replies.iter().filter(|r| r.kind == msg::NEWSETELEM) {
        for attr in attrs(&reply.body) {
            let (kind, payload) = attr?;
            if kind != NFTA_SET_ELEM_LIST_ELEMENTS {
                continue;
            }
            for element in attrs(payload) {
                digest = digest.wrapping_add(of_dumped(element?.1)?);
            }
        }
    }
    Ok(Some(digest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nfnl::{push_attr, NLA_F_NESTED};
    use crate::render::AddrRange;

    fn addr(a: &str) -> SetElement {
        let ip = a.parse().unwrap();
        SetElement::Addr(AddrRange { lo: ip, hi: ip })
    }

    /// An element as the kernel dumps a host set's element.
    fn dumped(key: &[u8], flags: Option<u32>) -> Vec<u8> {
        let mut value = Vec::new();
        push_attr(&mut value, NFTA_DATA_VALUE, key);
        let mut elem = Vec::new();
        push_attr(&mut elem, NFTA_SET_ELEM_KEY | NLA_F_NESTED, &value);
        if let Some(f) = flags {
            push_attr(&mut elem, NFTA_SET_ELEM_FLAGS, &f.to_be_bytes());
        }
        elem
    }

    #[test]
    fn host_digests_match_the_dump_in_any_order() {
        let elements = [addr("10.0.0.1"), addr("10.0.0.2"), addr("fd00::1")];
        let mut keys: Vec<Vec<u8>> = elements
            .iter()
            .map(|e| crate::nfnl::setelem::key(e).unwrap().as_ref().to_vec())
            .collect();
        keys.reverse();
        let dump = keys
            .iter()
            .map(|k| of_dumped(&dumped(k, Some(0))).unwrap())
            .fold(0u64, u64::wrapping_add);
        assert_eq!(of_hosts(&elements), dump);
    }

    #[test]
    fn any_element_change_changes_the_digest() {
        let base = of_hosts(&[addr("10.0.0.1"), addr("10.0.0.2")]);
        assert_ne!(base, of_hosts(&[addr("10.0.0.1"), addr("10.0.0.3")]));
        assert_ne!(base, of_hosts(&[addr("10.0.0.1")]));
        assert_ne!(
            of_dumped(&dumped(&[10, 0, 0, 1], None)).unwrap(),
            of_dumped(&dumped(&[10, 0, 0, 1], Some(1))).unwrap(),
            "an interval end is not a start"
        );
    }
}
