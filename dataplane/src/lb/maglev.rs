//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): each backend
//! walks the table along its own permutation (offset, skip) and the backends
//! take turns claiming their next free slot until the table is full. Every
//! backend ends up with ≈ M/N slots, and removing one backend only moves
//! the slots it held (plus a small fraction), so ≈ (N-1)/N of flows keep
//! their backend.
//!
//! The result only depends on the *set* of backend names: the kernel hashes
//! flows onto slots, and a restarted agent recomputes exactly the same table.

/// Default table size: a prime ≥ 100 × the backends a Service usually has,
/// as the paper recommends for ≤ 1 % imbalance.
pub const DEFAULT_TABLE_SIZE: u32 = 16381;

/// Whether `n` is prime (table sizes must be, so every skip is coprime).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u64;
    while d * d <= u64::from(n) {
        if u64::from(n) % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

/// Computes the lookup table: `table[slot]` is an index into `names`.
/// `names` need not be sorted (they are ordered internally), must be unique,
/// and `size` must be prime. Returns an empty table when `names` is empty.
pub fn table<S: AsRef<[u8]>>(names: &[S], size: u32) -> Vec<u32> {
    let m = size as usize;
    if names.is_empty() || m == 0 {
        return Vec::new();
    }
    // Order by name so the table does not depend on the caller's order.
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by(|&a, &b| names[a].as_ref().cmp(names[b].as_ref()));
    // Each backend's permutation is offset, offset + skip, offset + 2·skip, …
    // (mod size); `pos` walks it with additions only.
    let size64 = u64::from(size);
    let mut pos: Vec<u32> = Vec::with_capacity(order.len());
    let mut skips: Vec<u32> = Vec::with_capacity(order.len());
    for &i in &order {
        let name = names[i].as_ref();
        // Both values are < size, so they fit u32.
        pos.push((hash(name, 0x6d61_676c_6576_3031) % size64) as u32);
        skips.push((hash(name, 0x736b_6970_2d73_6b65) % (size64 - 1).max(1) + 1) as u32);
    }
    let mut entry = vec![u32::MAX; m];
    let mut filled = 0usize;
    'fill: loop {
        for turn in 0..order.len() {
            let step = |p: u32| {
                let next = u64::from(p) + u64::from(skips[turn]);
                (if next >= size64 { next - size64 } else { next }) as u32
            };
            let mut c = pos[turn];
            while entry[c as usize] != u32::MAX {
                c = step(c);
            }
            // Proven invariant: `order` holds indexes of `names`, whose
            // length fits u32 for any table a map can hold.
            entry[c as usize] = order[turn] as u32;
            pos[turn] = step(c);
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    entry
}

/// FNV-1a, then murmur3's 64-bit finalizer for avalanche; seeded so the
/// offset and skip hashes are independent.
fn hash(data: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.42.0.{}:8080", i + 10)).collect()
    }

    #[test]
    fn primes() {
        assert!(is_prime(16381));
        assert!(is_prime(1021));
        assert!(is_prime(251));
        assert!(!is_prime(16383));
        assert!(!is_prime(1));
    }

    #[test]
    fn every_backend_gets_a_fair_share() {
        for n in [1usize, 2, 3, 7, 50] {
            let t = table(&names(n), DEFAULT_TABLE_SIZE);
            assert_eq!(t.len(), DEFAULT_TABLE_SIZE as usize);
            let mut counts = vec![0usize; n];
            for &b in &t {
                counts[b as usize] += 1;
            }
            let fair = DEFAULT_TABLE_SIZE as f64 / n as f64;
            for c in counts {
                assert!(
                    (c as f64 - fair).abs() / fair < 0.02,
                    "n={n}: {c} slots vs fair {fair}"
                );
            }
        }
    }

    #[test]
    fn order_of_input_does_not_matter() {
        let a = names(5);
        let mut b = a.clone();
        b.reverse();
        let ta: Vec<&str> = table(&a, 1021)
            .iter()
            .map(|&i| a[i as usize].as_str())
            .collect();
        let tb: Vec<&str> = table(&b, 1021)
            .iter()
            .map(|&i| b[i as usize].as_str())
            .collect();
        assert_eq!(ta, tb);
    }

    #[test]
    fn removing_a_backend_remaps_about_one_nth_of_slots() {
        for n in [3usize, 5, 10] {
            let before_names = names(n);
            let before: Vec<&str> = table(&before_names, DEFAULT_TABLE_SIZE)
                .iter()
                .map(|&i| before_names[i as usize].as_str())
                .collect();
            let removed = before_names[1].clone();
            let after_names: Vec<String> = before_names
                .iter()
                .filter(|s| **s != removed)
                .cloned()
                .collect();
            let after: Vec<&str> = table(&after_names, DEFAULT_TABLE_SIZE)
                .iter()
                .map(|&i| after_names[i as usize].as_str())
                .collect();
            let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
            let moved_frac = moved as f64 / DEFAULT_TABLE_SIZE as f64;
            let ideal = 1.0 / n as f64;
            // The removed backend's slots must move; the paper measures a
            // little extra churn, well under a few percent of the table.
            assert!(moved_frac >= ideal * 0.95, "n={n}: moved {moved_frac}");
            assert!(
                moved_frac <= ideal + 0.05,
                "n={n}: moved {moved_frac}, ideal {ideal}"
            );
            // Slots of surviving backends overwhelmingly stay put.
            let kept = before
                .iter()
                .zip(&after)
                .filter(|(b, _)| **b != removed)
                .filter(|(b, a)| b == a)
                .count();
            let survivors = before.iter().filter(|b| **b != removed).count();
            assert!(
                kept as f64 / survivors as f64 > 0.95,
                "n={n}: kept {kept}/{survivors}"
            );
        }
    }
}
