//! Maglev lookup tables (Eisenbud et al., NSDI'16, §3.4), computed here and
//! written to the `MAGLEV` map; the kernel only indexes them.
//!
//! Each endpoint gets a permutation of the table from two hashes of its
//! identity; endpoints take turns claiming their next preferred free slot.
//! Removing one endpoint moves only (about) its own share of clients.

use canary_common::MAGLEV_SIZE;

/// Builds a table of `MAGLEV_SIZE` slots over `names` (stable endpoint
/// identities, e.g. "pod/10.0.0.1:8080"). Each slot holds an index into
/// `names`. Deterministic: every agent builds the same table.
pub fn build(names: &[String]) -> Vec<u16> {
    let m = MAGLEV_SIZE as u64;
    let mut table = vec![u16::MAX; m as usize];
    if names.is_empty() {
        return vec![0; m as usize];
    }
    // Sorted so the table does not depend on the order endpoints were listed.
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by(|a, b| names[*a].cmp(&names[*b]));
    let perms: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let offset = fnv1a(names[i].as_bytes(), 0xcbf2_9ce4_8422_2325) % m;
            let skip = fnv1a(names[i].as_bytes(), 0x8422_2325_cbf2_9ce4) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; order.len()];
    let mut filled = 0u64;
    'fill: loop {
        for (turn, &endpoint) in order.iter().enumerate() {
            let (offset, skip) = perms[turn];
            let mut slot = (offset + next[turn] * skip) % m;
            while table[slot as usize] != u16::MAX {
                next[turn] += 1;
                slot = (offset + next[turn] * skip) % m;
            }
            table[slot as usize] = endpoint as u16;
            next[turn] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    table
}

fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h = seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche so that similar names spread.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("pod-{i}/10.0.0.{i}:8080")).collect()
    }

    #[test]
    fn every_slot_is_filled_and_balanced() {
        let t = build(&names(3));
        let mut counts = [0usize; 3];
        for s in &t {
            counts[*s as usize] += 1;
        }
        assert_eq!(counts.iter().sum::<usize>(), MAGLEV_SIZE as usize);
        for c in counts {
            // Maglev guarantees near-perfect balance: within one slot per turn.
            assert!((335..=346).contains(&c), "unbalanced: {counts:?}");
        }
    }

    #[test]
    fn listing_order_does_not_matter() {
        let mut n = names(4);
        let a = build(&n);
        n.reverse();
        let b = build(&n);
        // Same endpoint in every slot, whatever the index it had in the list.
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(format!("pod-{}", x), format!("pod-{}", 3 - *y as usize));
        }
    }

    #[test]
    fn removing_an_endpoint_moves_little_else() {
        let before = names(5);
        let after: Vec<String> = before[..4].to_vec();
        let (a, b) = (build(&before), build(&after));
        let moved = a.iter().zip(&b).filter(|(x, y)| **x != 4 && x != y).count();
        // Only the removed endpoint's slots must move; allow a little churn.
        assert!(
            moved < MAGLEV_SIZE as usize / 20,
            "{moved} slots of survivors moved"
        );
    }

    #[test]
    fn single_and_empty() {
        assert!(build(&names(1)).iter().all(|s| *s == 0));
        assert_eq!(build(&[]).len(), MAGLEV_SIZE as usize);
    }
}
