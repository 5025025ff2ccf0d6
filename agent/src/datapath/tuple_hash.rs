//! A keyed hash for the sweeper's maps of [`probes::maps::Tuple`]s, which a full read of `conns`
//! looks every entry up in ([`super::sweep::ExpiredRecords`]): the key's 40 bytes (one write,
//! `impl Hash for Tuple`) as five 64-bit words, each folded into the state by a 128-bit multiply
//! with a key drawn per map (foldhash's construction), about 35 instructions a key where std's
//! SipHash-1-3 takes some 200. The keys are random per map, so the tuples a client chooses cannot
//! be made to collide on purpose without knowing them.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// Builds [`TupleHasher`]s with this map's random keys.
#[derive(Debug, Clone, Copy)]
pub struct TupleHashing {
    seed: u64,
    multiplier: u64,
}

impl Default for TupleHashing {
    /// Keys from std's per-process random source (the keys `RandomState` draws).
    fn default() -> Self {
        let random = RandomState::new();
        TupleHashing {
            seed: random.hash_one(0u64),
            // Odd, so that no word's bits are lost in the low half of the product.
            multiplier: random.hash_one(1u64) | 1,
        }
    }
}

impl BuildHasher for TupleHashing {
    type Hasher = TupleHasher;

    fn build_hasher(&self) -> TupleHasher {
        TupleHasher {
            state: self.seed,
            multiplier: self.multiplier,
        }
    }
}

/// The hash state of one key.
#[derive(Debug, Clone, Copy)]
pub struct TupleHasher {
    state: u64,
    multiplier: u64,
}

/// The two halves of the 128-bit product, XORed.
fn folded_multiply(x: u64, y: u64) -> u64 {
    let product = u128::from(x) * u128::from(y);
    (product as u64) ^ ((product >> 64) as u64)
}

impl Hasher for TupleHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            self.state = folded_multiply(self.state ^ u64::from_ne_bytes(w), self.multiplier);
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.state = folded_multiply(self.state ^ u64::from_ne_bytes(w), self.multiplier);
        }
        self.state ^= bytes.len() as u64;
    }

    /// The state through murmur3's finalizer, so that every bit of it reaches the low bits a
    /// table indexes by and the top ones it tags slots with.
    fn finish(&self) -> u64 {
        let mut h = self.state;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use probes::maps::{L4Proto, Tuple};
    use std::collections::HashSet;
    use std::net::{IpAddr, Ipv4Addr};

    fn tuple(sport: u16) -> Tuple {
        Tuple::new(
            IpAddr::V4(Ipv4Addr::new(10, 0, 1, 2)),
            sport,
            IpAddr::V4(Ipv4Addr::new(10, 244, 2, 2)),
            8080,
            L4Proto::Tcp,
        )
    }

    #[test]
    fn equal_tuples_hash_alike_and_a_port_apart_differ() {
        let h = TupleHashing::default();
        assert_eq!(h.hash_one(tuple(40_000)), h.hash_one(tuple(40_000)));
        // Every client port of a 64k range to one backend: no two share a hash, and both the
        // low bits a table indexes by and the top seven it tags slots with spread them about
        // evenly (64 a bucket of 1,024 on average, 512 a tag of 128).
        let hashes: Vec<u64> = (0..=u16::MAX).map(|p| h.hash_one(tuple(p))).collect();
        assert_eq!(hashes.iter().collect::<HashSet<_>>().len(), hashes.len());
        let spread = |name: &str, slots: usize, slot: fn(u64) -> usize| {
            let mut counts = vec![0u32; slots];
            for &x in &hashes {
                counts[slot(x)] += 1;
            }
            let mean = (hashes.len() / slots) as u32;
            let min = counts.iter().min().copied().unwrap_or(0);
            let max = counts.iter().max().copied().unwrap_or(0);
            assert!(
                min > mean / 2 && max < mean * 2,
                "{name}: {min}..{max} a slot, {mean} on average"
            );
        };
        spread("buckets", 1024, |x| (x & 1023) as usize);
        spread("tags", 128, |x| (x >> 57) as usize);
    }

    #[test]
    fn the_keys_differ_per_map() {
        let (a, b) = (TupleHashing::default(), TupleHashing::default());
        assert_ne!(a.hash_one(tuple(1)), b.hash_one(tuple(1)));
    }
}
