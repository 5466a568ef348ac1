//! Weights → cumulative bands on [0, WEIGHT_SCALE), the form the kernel
//! compares a random or hashed point against.

use canary_common::WEIGHT_SCALE;

/// Cumulative exclusive upper bounds, scaled to `WEIGHT_SCALE` (10000):
/// `[90, 10]` → `[9000, 10000]`, `[1, 1, 1]` → `[3333, 6667, 10000]`.
///
/// Each boundary is the cumulative share rounded to nearest (halves up),
/// so the last is exactly `WEIGHT_SCALE` whenever the total is positive and
/// moving weight between two neighbours moves only the boundary between
/// them. A zero weight gives an empty band (its bound equals the previous
/// one); all zero gives all zero bounds (nothing can be picked).
pub fn bands(weights: &[u32]) -> Vec<u32> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    if total == 0 {
        return vec![0; weights.len()];
    }
    let scale = u64::from(WEIGHT_SCALE);
    let mut cumulative: u64 = 0;
    weights
        .iter()
        .map(|&w| {
            cumulative += u64::from(w);
            // total ≤ 8 × u32::MAX, so cumulative × scale fits in u64.
            let bound = (cumulative * scale + total / 2) / total;
            u32::try_from(bound).unwrap_or(WEIGHT_SCALE)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_table() {
        let cases: &[(&[u32], &[u32])] = &[
            (&[90, 10], &[9000, 10000]),
            (&[95, 5], &[9500, 10000]),
            (&[50, 50], &[5000, 10000]),
            (&[100], &[10000]),
            (&[1], &[10000]),
            (&[1, 1, 1], &[3333, 6667, 10000]),
            (&[2, 1], &[6667, 10000]),
            (&[9, 1], &[9000, 10000]),
            (&[0, 100], &[0, 10000]),
            (&[100, 0], &[10000, 10000]),
            (&[50, 0, 50], &[5000, 5000, 10000]),
            (&[0, 0], &[0, 0]),
            (&[], &[]),
            // Weights need not sum to 100 (Istio ≥ 1.15).
            (&[3, 1], &[7500, 10000]),
            (&[900, 100], &[9000, 10000]),
            (
                &[1, 2, 3, 4, 5, 6, 7, 8],
                &[278, 833, 1667, 2778, 4167, 5833, 7778, 10000],
            ),
            (&[u32::MAX, u32::MAX], &[5000, 10000]),
        ];
        for (weights, want) in cases {
            assert_eq!(bands(weights), *want, "bands({weights:?})");
        }
    }

    #[test]
    fn moving_weight_moves_only_one_boundary() {
        let before = bands(&[95, 5]);
        let after = bands(&[90, 10]);
        assert_eq!(before[1], after[1]);
        let before = bands(&[80, 10, 10]);
        let after = bands(&[70, 20, 10]);
        assert_ne!(before[0], after[0]);
        assert_eq!(before[1..], after[1..]);
    }
}
