//! The elements of class maps (`SetKind::Classes`: `type ipv4_addr : verdict`, `flags
//! interval`) over netlink, as nft sends them: an interval `lo-hi : goto CHAIN` is an end
//! element at `hi + 1` (flagged `NFT_SET_ELEM_INTERVAL_END`; none when `hi` is the family's
//! last address) and a start element at `lo` carrying the verdict. Deleting an interval
//! deletes the same two; an end and a start at one key (adjacent intervals) are distinct
//! elements to the kernel.

use std::net::IpAddr;

use super::{push_attr, rules, NfnlError, NLA_F_NESTED};
use crate::render::SetElement;

const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_DATA_VALUE: u16 = 1;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;

/// Whether this is a class element that [`elements`] can encode.
pub fn encodable(element: &SetElement) -> bool {
    match element {
        SetElement::Class { range, .. } => {
            matches!(
                (range.lo, range.hi),
                (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_))
            ) && range.lo <= range.hi
        }
        _ => false,
    }
}

/// An address of `bits` bits as a key, in network byte order.
fn key_bytes(a: u128, bits: usize) -> Vec<u8> {
    a.to_be_bytes()[16 - bits / 8..].to_vec()
}

/// The kernel elements of `elements`, each as it sits in `NFTA_SET_ELEM_LIST_ELEMENTS`,
/// sorted by key with an end before a start at the same key.
pub fn elements(elements: &[SetElement]) -> Result<Vec<Vec<u8>>, NfnlError> {
    let mut out: Vec<(u128, bool, Vec<u8>)> = Vec::with_capacity(elements.len() * 2);
    for element in elements {
        let SetElement::Class { range, chain } = element else {
            return Err(NfnlError::Malformed(
                "a class map holds only class elements",
            ));
        };
        let (lo, hi, bits) = match (range.lo, range.hi) {
            (IpAddr::V4(lo), IpAddr::V4(hi)) => {
                (u128::from(u32::from(lo)), u128::from(u32::from(hi)), 32)
            }
            (IpAddr::V6(lo), IpAddr::V6(hi)) => (u128::from(lo), u128::from(hi), 128),
            _ => return Err(NfnlError::Malformed("a class range mixes families")),
        };
        if lo > hi {
            return Err(NfnlError::Malformed("a class range ends before it starts"));
        }
        let last = if bits == 32 {
            u128::from(u32::MAX)
        } else {
            u128::MAX
        };
        if hi < last {
            out.push((hi + 1, false, element_bytes(&key_bytes(hi + 1, bits), None)));
        }
        out.push((lo, true, element_bytes(&key_bytes(lo, bits), Some(chain))));
    }
    out.sort_by_key(|(key, start, _)| (*key, *start));
    Ok(out.into_iter().map(|(_, _, bytes)| bytes).collect())
}

/// The kernel elements of `elements` in a class map of prefixes
/// ([`crate::render::SetKind::ClassPrefixes`]): each network address a key carrying its
/// `goto`, no interval ends.
pub fn keyed(elements: &[SetElement]) -> Result<Vec<Vec<u8>>, NfnlError> {
    elements
        .iter()
        .map(|element| {
            let SetElement::Class { range, chain } = element else {
                return Err(NfnlError::Malformed(
                    "a class map holds only class elements",
                ));
            };
            if range.lo != range.hi {
                return Err(NfnlError::Malformed(
                    "a class map of prefixes holds single network addresses",
                ));
            }
            Ok(element_bytes(&rules::address_bytes(&range.lo), Some(chain)))
        })
        .collect()
}

/// One element: its key, and the start's `goto` chain, or the end flag.
fn element_bytes(key: &[u8], goto: Option<&str>) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + key.len());
    push_attr(&mut value, NFTA_DATA_VALUE, key);
    let mut elem = Vec::with_capacity(64);
    push_attr(&mut elem, NFTA_SET_ELEM_KEY | NLA_F_NESTED, &value);
    match goto {
        Some(chain) => {
            let data = rules::verdict_data(rules::NFT_GOTO, Some(chain));
            push_attr(&mut elem, NFTA_SET_ELEM_DATA | NLA_F_NESTED, &data);
        }
        None => push_attr(
            &mut elem,
            NFTA_SET_ELEM_FLAGS,
            &NFT_SET_ELEM_INTERVAL_END.to_be_bytes(),
        ),
    }
    let mut list = Vec::with_capacity(4 + elem.len());
    push_attr(&mut list, NFTA_LIST_ELEM | NLA_F_NESTED, &elem);
    list
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nfnl::attrs;
    use crate::render::AddrRange;

    const NFTA_VERDICT_CHAIN: u16 = 2;

    fn class(lo: &str, hi: &str, chain: &str) -> SetElement {
        SetElement::Class {
            range: AddrRange {
                lo: lo.parse().unwrap(),
                hi: hi.parse().unwrap(),
            },
            chain: chain.into(),
        }
    }

    /// (key, flags, chain) of each encoded element.
    fn decoded(list: &[Vec<u8>]) -> Vec<(Vec<u8>, u32, String)> {
        list.iter()
            .map(|bytes| {
                let (_, elem) = attrs(bytes).next().unwrap().unwrap();
                let (mut key, mut flags, mut chain) = (Vec::new(), 0, String::new());
                for a in attrs(elem) {
                    let (kind, payload) = a.unwrap();
                    match kind {
                        NFTA_SET_ELEM_KEY => {
                            key = attrs(payload).next().unwrap().unwrap().1.to_vec()
                        }
                        NFTA_SET_ELEM_FLAGS => {
                            flags = u32::from_be_bytes(payload.try_into().unwrap())
                        }
                        NFTA_SET_ELEM_DATA => {
                            let (_, verdict) = attrs(payload).next().unwrap().unwrap();
                            for v in attrs(verdict) {
                                let (k, p) = v.unwrap();
                                if k == NFTA_VERDICT_CHAIN {
                                    chain = String::from_utf8(p[..p.len() - 1].to_vec()).unwrap();
                                } else {
                                    assert_eq!(p, rules::NFT_GOTO.to_be_bytes());
                                }
                            }
                        }
                        _ => panic!("attribute {kind}"),
                    }
                }
                (key, flags, chain)
            })
            .collect()
    }

    #[test]
    fn intervals_are_an_end_after_and_a_start_with_the_verdict() {
        let list = elements(&[
            class("10.0.0.2", "10.0.0.3", "c2"),
            class("10.0.0.1", "10.0.0.1", "c1"),
            class("255.255.255.0", "255.255.255.255", "c3"),
        ])
        .unwrap();
        assert_eq!(
            decoded(&list),
            vec![
                (vec![10, 0, 0, 1], 0, "c1".into()),
                (vec![10, 0, 0, 2], 1, String::new()),
                (vec![10, 0, 0, 2], 0, "c2".into()),
                (vec![10, 0, 0, 4], 1, String::new()),
                (vec![255, 255, 255, 0], 0, "c3".into()),
            ],
            "sorted, an end before a start at one key, none past the last address"
        );
        let v6 = elements(&[class("fd00::", "fd00::ff", "c")]).unwrap();
        assert_eq!(decoded(&v6)[0].0.len(), 1 + 15, "{:?}", decoded(&v6));
    }

    #[test]
    fn other_elements_are_refused() {
        let addr: IpAddr = "10.0.0.1".parse().unwrap();
        let plain = SetElement::Addr(AddrRange { lo: addr, hi: addr });
        assert!(!encodable(&plain));
        assert!(elements(&[plain]).is_err());
        let mixed = class("10.0.0.1", "::1", "c");
        assert!(!encodable(&mixed));
        assert!(elements(&[mixed]).is_err());
    }
}
