//! Splitting a CIDR group's ranges into prefixes grouped by length, so that the group can
//! be matched with one plain hash set per length (`ip saddr & 255.255.255.0 @set`)
//! instead of an interval set. The kernel looks interval sets up by binary search, about
//! 30 ns per step under retpolines (0.45 µs per miss on 10,000 /24s); a hash lookup per
//! length costs the same whatever the set's size.

use std::collections::BTreeMap;

/// Most prefix lengths a family of a group may have to be rendered as hash sets. Each
/// length costs one rule, mask and hash lookup per packet, so past a few lengths the
/// rules cost more than the binary search they replace (a 10,000-/24 interval set costs
/// 14 steps ≈ 4 hash lookups).
pub const MAX_PREFIX_LENGTHS: usize = 4;

/// Most prefixes per range of the group: ranges that split into many prefixes each (an
/// `except` hole in a large block, unaligned ranges) would load far more elements than
/// the interval set holds.
pub const MAX_PREFIXES_PER_RANGE: usize = 4;

/// The minimal prefix cover of the inclusive range `lo..=hi` of a `bits`-bit address
/// space (32 or 128), in address order: (network address, prefix length).
pub fn cover(lo: u128, hi: u128, bits: u32) -> Vec<(u128, u8)> {
    let mut out = Vec::new();
    let mut at = lo;
    if lo > hi {
        return out;
    }
    loop {
        // The largest block starting at `at` (aligned to it) that ends at or before `hi`.
        let align = if at == 0 {
            bits
        } else {
            at.trailing_zeros().min(bits)
        };
        let remaining = hi - at; // block size - 1 must be ≤ this
        let fit = if remaining == u128::MAX {
            128
        } else {
            127 - (remaining + 1).leading_zeros()
        };
        let host_bits = align.min(fit).min(bits);
        // host_bits ≤ bits ≤ 128, so the length fits a u8.
        out.push((at, (bits - host_bits) as u8));
        let last = if host_bits == 128 {
            u128::MAX
        } else {
            at + ((1u128 << host_bits) - 1)
        };
        if last >= hi {
            return out;
        }
        at = last + 1;
    }
}

/// The group's ranges of one family as network addresses per prefix length, or `None`
/// when an interval set suits them better: more than [`MAX_PREFIX_LENGTHS`] lengths,
/// more than [`MAX_PREFIXES_PER_RANGE`] prefixes per range, or a /0 (the whole family,
/// which a mask cannot express any better than an interval). Addresses are sorted.
pub fn by_length(ranges: &[(u128, u128)], bits: u32) -> Option<BTreeMap<u8, Vec<u128>>> {
    let budget = ranges.len().saturating_mul(MAX_PREFIXES_PER_RANGE);
    let mut buckets: BTreeMap<u8, Vec<u128>> = BTreeMap::new();
    let mut count = 0usize;
    for &(lo, hi) in ranges {
        for (net, len) in cover(lo, hi, bits) {
            count += 1;
            if len == 0 || count > budget {
                return None;
            }
            buckets.entry(len).or_default().push(net);
            if buckets.len() > MAX_PREFIX_LENGTHS {
                return None;
            }
        }
    }
    // Ranges are sorted and disjoint, so each bucket already is in address order.
    Some(buckets)
}

/// The fewest prefix lengths (at most `max_lengths`) that cover the tagged ranges with at
/// most `budget` prefixes, each range's minimal cover with every prefix widened to the
/// next longer chosen length (a /30 among chosen /32s is four /32s): the network
/// addresses per chosen length, with their ranges' tags, sorted. `None` when no choice
/// fits, or a range covers the whole family. Fewer lengths are fewer lookups per packet;
/// the budget bounds what widening adds to the elements.
pub fn widened<T: Copy>(
    ranges: &[(u128, u128, T)],
    bits: u32,
    max_lengths: usize,
    budget: usize,
) -> Option<BTreeMap<u8, Vec<(u128, T)>>> {
    let covers: Vec<Vec<(u128, u8)>> = ranges
        .iter()
        .map(|&(lo, hi, _)| cover(lo, hi, bits))
        .collect();
    // How many prefixes of each length the minimal covers hold.
    let mut count: BTreeMap<u8, u128> = BTreeMap::new();
    for &(_, len) in covers.iter().flatten() {
        if len == 0 {
            return None;
        }
        *count.entry(len).or_default() += 1;
    }
    let lengths: Vec<(u8, u128)> = count.into_iter().collect();
    let Some(last) = lengths.len().checked_sub(1) else {
        return Some(BTreeMap::new());
    };
    // Prefixes when lengths[i+1..=j] all widen to lengths[j].
    let widen = |i: Option<usize>, j: usize| -> u128 {
        let from = i.map_or(0, |i| i + 1);
        lengths[from..=j]
            .iter()
            .map(|&(len, n)| {
                let shift = u32::from(lengths[j].0 - len);
                n.saturating_mul(1u128.checked_shl(shift).unwrap_or(u128::MAX))
            })
            .fold(0, u128::saturating_add)
    };
    // best[m][j]: fewest prefixes for lengths[..=j] with m + 1 chosen lengths, the longest
    // lengths[j]; and the choice before it.
    let mut best: Vec<Vec<(u128, Option<usize>)>> = Vec::new();
    for m in 0..max_lengths.min(lengths.len()) {
        let row: Vec<(u128, Option<usize>)> = (0..lengths.len())
            .map(|j| match m {
                0 => (widen(None, j), None),
                _ => (0..j)
                    .map(|i| (best[m - 1][i].0.saturating_add(widen(Some(i), j)), Some(i)))
                    .min_by_key(|&(n, _)| n)
                    .unwrap_or((u128::MAX, None)),
            })
            .collect();
        let fits = row[last].0 <= budget as u128;
        best.push(row);
        if fits {
            break;
        }
    }
    let m = best.len().checked_sub(1)?;
    if best[m][last].0 > budget as u128 {
        return None;
    }
    let mut chosen = vec![lengths[last].0];
    let (mut row, mut at) = (m, last);
    while let Some(i) = best[row][at].1 {
        chosen.push(lengths[i].0);
        (row, at) = (row - 1, i);
    }
    chosen.sort_unstable();
    let mut out: BTreeMap<u8, Vec<(u128, T)>> = BTreeMap::new();
    for (cover, &(_, _, tag)) in covers.iter().zip(ranges) {
        for &(net, len) in cover {
            let to = chosen[chosen.partition_point(|&c| c < len)];
            let step = 1u128 << (bits - u32::from(to));
            let nets = out.entry(to).or_default();
            for k in 0..1u128 << (to - len) {
                nets.push((net + k * step, tag));
            }
        }
    }
    for nets in out.values_mut() {
        nets.sort_unstable_by_key(|&(net, _)| net);
    }
    Some(out)
}

/// The network mask of a prefix length in a `bits`-bit space.
pub fn mask(len: u8, bits: u32) -> u128 {
    let len = u32::from(len).min(bits);
    if len == 0 {
        return 0;
    }
    let full = if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    };
    if len == bits {
        return full;
    }
    full & !(full >> len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_aligned_and_unaligned_ranges_minimally() {
        assert_eq!(cover(0x0a00_0000, 0x0a00_00ff, 32), vec![(0x0a00_0000, 24)]);
        assert_eq!(cover(5, 5, 32), vec![(5, 32)]);
        // 1..=6: 1/32, 2/31, 4/31, 6/32.
        assert_eq!(cover(1, 6, 32), vec![(1, 32), (2, 31), (4, 31), (6, 32)]);
        assert_eq!(cover(0, u128::from(u32::MAX), 32), vec![(0, 0)]);
        assert_eq!(cover(0, u128::MAX, 128), vec![(0, 0)]);
        assert_eq!(cover(u128::MAX, u128::MAX, 128), vec![(u128::MAX, 128)]);
    }

    #[test]
    fn falls_back_on_many_lengths_or_prefixes_or_everything() {
        let slash24s: Vec<(u128, u128)> = (0..100u128).map(|i| (i << 9, (i << 9) + 255)).collect();
        let b = by_length(&slash24s, 32).unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[&24].len(), 100);
        assert_eq!(b[&24][1], 1 << 9);
        // 0.0.0.0/0 except 10.0.0.0/8: eight lengths.
        let holed = [(0, 0x09ff_ffff), (0x0b00_0000, u128::from(u32::MAX))];
        assert_eq!(by_length(&holed, 32), None);
        assert_eq!(by_length(&[(0, u128::from(u32::MAX))], 32), None);
        // 1..=6 splits into four prefixes of two lengths: within budget.
        assert!(by_length(&[(1, 6)], 32).is_some());
        // 1..=14 splits into six.
        assert_eq!(by_length(&[(1, 14)], 32), None);
    }

    #[test]
    fn masks() {
        assert_eq!(mask(24, 32), 0xffff_ff00);
        assert_eq!(mask(32, 32), 0xffff_ffff);
        assert_eq!(mask(0, 32), 0);
        assert_eq!(mask(64, 128), u128::MAX << 64);
        assert_eq!(mask(128, 128), u128::MAX);
    }

    /// splitmix64: a fixed-seed generator, so a failure reproduces (the agent crate has
    /// no proptest).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn wide(&mut self) -> u128 {
            (u128::from(self.next()) << 64) | u128::from(self.next())
        }
    }

    /// Disjoint, sorted, non-adjacent ranges like an `AddrSet` holds: mostly aligned
    /// blocks (real CIDRs), some with a hole cut out (`except`), some arbitrary bounds.
    fn ranges(rng: &mut Rng, bits: u32) -> Vec<(u128, u128)> {
        let max = mask(u8::try_from(bits).unwrap_or(128), bits);
        let mut v = Vec::new();
        for _ in 0..rng.next() % 8 {
            let a = rng.wide() & max;
            // Lengths cluster near the full width, as in real blocks.
            let host_bits = u32::try_from(rng.next() % u64::from(bits.min(24) + 1)).unwrap_or(0);
            let size_m1 = max.checked_shr(bits - host_bits).unwrap_or(0);
            let (lo, hi) = (a & !size_m1, (a & !size_m1) | size_m1);
            match rng.next() % 4 {
                0 => {
                    let b = a.saturating_add(u128::from(rng.next() % 5000)).min(max);
                    v.push((a, b));
                }
                1 if hi - lo >= 4 => {
                    let cut = lo + 1 + u128::from(rng.next()) % (hi - lo - 2);
                    v.push((lo, cut - 1));
                    v.push((cut + 1, hi));
                }
                _ => v.push((lo, hi)),
            }
        }
        v.sort_unstable();
        let mut out: Vec<(u128, u128)> = Vec::new();
        for (lo, hi) in v {
            match out.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => out.push((lo, hi)),
            }
        }
        out
    }

    fn check_union(rs: &[(u128, u128)], bits: u32) {
        let max = if bits == 128 {
            u128::MAX
        } else {
            (1u128 << bits) - 1
        };
        for &(lo, hi) in rs {
            let c = cover(lo, hi, bits);
            // Contiguous, aligned prefixes that tile lo..=hi exactly.
            let mut next = lo;
            let mut end = None;
            for &(net, len) in &c {
                assert_eq!(net, next);
                let host = mask(len, bits) ^ max;
                assert_eq!(net & host, 0, "unaligned {net:x}/{len}");
                assert!(net | host <= hi);
                end = Some(net | host);
                next = (net | host).wrapping_add(1);
            }
            assert_eq!(end, Some(hi));
            // Minimal: no two neighbours merge into one prefix.
            for w in c.windows(2) {
                let (a, la) = w[0];
                let (_, lb) = w[1];
                let merged = la > 0 && la == lb && a & (mask(la, bits) ^ mask(la - 1, bits)) == 0;
                assert!(!merged, "{w:x?} merge");
            }
        }
        if let Some(buckets) = by_length(rs, bits) {
            // Membership through the buckets equals membership in the ranges, checked
            // at every range's edges and just outside them.
            let member = |a: u128| {
                buckets
                    .iter()
                    .any(|(&len, nets)| nets.binary_search(&(a & mask(len, bits))).is_ok())
            };
            for &(lo, hi) in rs {
                assert!(member(lo) && member(hi));
                assert!(member(lo + (hi - lo) / 2));
                // Ranges are neither overlapping nor adjacent: the neighbours are out.
                if lo > 0 {
                    assert!(!member(lo - 1));
                }
                if hi < max {
                    assert!(!member(hi + 1));
                }
            }
            assert!(buckets.len() <= MAX_PREFIX_LENGTHS);
            assert!(!buckets.contains_key(&0));
        }
    }

    #[test]
    fn widening_picks_the_fewest_lengths_within_budget() {
        // Ten scattered /32s, one /24 and 1..=6 (/32, /31, /31, /32).
        let mut rs: Vec<(u128, u128, usize)> = (0..10u128)
            .map(|i| (1000 + 2 * i, 1000 + 2 * i, 0))
            .collect();
        rs.push((0x1_0000, 0x1_00ff, 1));
        rs.push((1, 6, 2));
        rs.sort_unstable();
        // Everything as /32s: 10 + 256 + 6.
        let one = widened(&rs, 32, 3, 272).unwrap();
        assert_eq!(one.keys().copied().collect::<Vec<_>>(), vec![32]);
        assert_eq!(one[&32].len(), 272);
        // Under that budget: /24 and /32 (the /31s widened), 10 + 1 + 6.
        let two = widened(&rs, 32, 3, 271).unwrap();
        assert_eq!(two.keys().copied().collect::<Vec<_>>(), vec![24, 32]);
        assert_eq!(two[&24], vec![(0x1_0000, 1)]);
        assert_eq!(two[&32].len(), 16);
        // Three lengths are the minimal covers: 10 + 1 + 4 prefixes.
        assert_eq!(widened(&rs, 32, 3, 15).unwrap().len(), 3);
        assert_eq!(widened(&rs, 32, 2, 15), None);
        assert_eq!(widened(&rs, 32, 3, 14), None);
        assert_eq!(
            widened(&[(0, u128::from(u32::MAX), 0)], 32, 4, 1 << 20),
            None
        );
        assert_eq!(widened::<u8>(&[], 32, 4, 0), Some(BTreeMap::new()));
    }

    #[test]
    fn widened_prefixes_hold_exactly_their_ranges_addresses() {
        let mut rng = Rng(0x71de);
        let mut found = 0;
        for case in 0..4_000 {
            let bits = if case % 2 == 0 { 32 } else { 128 };
            let rs: Vec<(u128, u128, usize)> = ranges(&mut rng, bits)
                .into_iter()
                .enumerate()
                .map(|(i, (lo, hi))| (lo, hi, i))
                .collect();
            let max_lengths = 1 + case % 4;
            let budget = 4 * rs.len() + (case % 3) * 64;
            let Some(buckets) = widened(&rs, bits, max_lengths, budget) else {
                continue;
            };
            found += 1;
            assert!(buckets.len() <= max_lengths);
            assert!(buckets.values().map(Vec::len).sum::<usize>() <= budget);
            let tag = |a: u128| -> Vec<usize> {
                buckets
                    .iter()
                    .filter_map(|(&len, nets)| {
                        let key = a & mask(len, bits);
                        nets.binary_search_by_key(&key, |&(n, _)| n)
                            .ok()
                            .map(|i| nets[i].1)
                    })
                    .collect()
            };
            let max = mask(u8::try_from(bits).unwrap_or(128), bits);
            for &(lo, hi, t) in &rs {
                for a in [lo, hi, lo + (hi - lo) / 2] {
                    assert_eq!(tag(a), vec![t], "{a:x} in {lo:x}-{hi:x}");
                }
                if lo > 0 {
                    assert!(tag(lo - 1).is_empty());
                }
                if hi < max {
                    assert!(tag(hi + 1).is_empty());
                }
            }
        }
        assert!(found > 500, "{found}");
    }

    #[test]
    fn prefixes_tile_the_ranges_exactly() {
        let mut rng = Rng(0x5eed);
        let mut bucketed = 0;
        for case in 0..20_000 {
            let bits = if case % 2 == 0 { 32 } else { 128 };
            let rs = ranges(&mut rng, bits);
            check_union(&rs, bits);
            bucketed += usize::from(by_length(&rs, bits).is_some_and(|b| !b.is_empty()));
        }
        // Both outcomes are exercised.
        assert!((1_000..19_000).contains(&bucketed), "{bucketed}");
    }
}
