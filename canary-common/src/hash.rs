//! The client hash used for sticky (consistentHash) choices.
//!
//! The kernel computes it at `connect()`; the agent and the tests compute it
//! to explain and predict where a client lands. One definition, so the two
//! can never drift apart.

use crate::maps::{MAGLEV_SIZE, WEIGHT_SCALE};

/// murmur3's 32-bit finaliser: cheap, branch-free, and every input bit
/// affects every output bit, which is all a bucket choice needs.
#[inline(always)]
pub const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Hash of a client identity: an address as four network-order words (an
/// IPv4 address uses word 0 and zeros), or a network namespace cookie split
/// into words 0 and 1.
#[inline(always)]
pub const fn source_hash(words: &[u32; 4]) -> u32 {
    let mut h: u32 = 0x9747_b28c;
    h = fmix32(h ^ words[0]);
    h = fmix32(h ^ words[1]);
    h = fmix32(h ^ words[2]);
    h = fmix32(h ^ words[3]);
    h
}

/// Where a client hash falls on the cumulative weight scale [0, 10000).
/// The subset whose band contains this point serves the client.
#[inline(always)]
pub const fn subset_point(hash: u32) -> u32 {
    hash % WEIGHT_SCALE
}

/// The Maglev table slot of a client hash. Re-mixed so that the endpoint
/// choice is independent of the subset band the client fell into.
///
/// Multiply-shift range reduction (Lemire) rather than `%`: the verifier
/// cannot bound a modulo, but it does bound `(x * M) >> 32` below M, so the
/// table index is provably in range.
#[inline(always)]
pub const fn maglev_slot(hash: u32) -> u32 {
    ((fmix32(hash ^ 0x5bd1_e995) as u64 * MAGLEV_SIZE as u64) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_spread_over_the_scale() {
        // 10 000 consecutive IPv4 addresses must cover all ten 10% bands
        // roughly evenly, or sticky splits would be biased.
        let mut bands = [0u32; 10];
        for i in 0..10_000u32 {
            let addr = [
                u32::from_be_bytes([10, 0, (i >> 8) as u8, i as u8]).to_be(),
                0,
                0,
                0,
            ];
            bands[(subset_point(source_hash(&addr)) / 1000) as usize] += 1;
        }
        for count in bands {
            assert!((850..=1150).contains(&count), "uneven bands: {bands:?}");
        }
    }

    #[test]
    fn maglev_slot_is_in_range() {
        for i in 0..1000u32 {
            assert!(maglev_slot(fmix32(i)) < MAGLEV_SIZE);
        }
    }
}
