//! The bounded fuzzing driver shared by the fuzz harnesses (`probes/tests/fuzz_datapath.rs`,
//! `agent/tests/fuzz_manifest.rs`, `ipvs/tests/fuzz_decode.rs`; each includes this file with
//! `#[path]`): a seeded PRNG, byte mutations, and a time-bounded loop that counts executions.
//!
//! No coverage guidance (stable Rust has no libFuzzer runtime, and none exists for BPF code):
//! inputs are generated from the structure each harness knows, and mutated. Environment:
//! - `FUZZ_SECONDS`: how long each target runs (default: the harness's, a few seconds so that a
//!   plain `cargo test` stays quick; `scripts/test` sets it);
//! - `FUZZ_SEED`: the seed (decimal or 0x-hex) to reproduce a run; printed at the start and in
//!   every failure. A pure target (the manifest parser, the netlink decoder) replays exactly: the
//!   failing execution's number is printed too. The datapath's runs also depend on the kernel's
//!   random port choices, so its failures print the packet itself.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// splitmix64: small, fast, and every seed (0 included) gives a full-period sequence.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    pub fn u16(&mut self) -> u16 {
        (self.next_u64() >> 48) as u16
    }

    pub fn u8(&mut self) -> u8 {
        (self.next_u64() >> 56) as u8
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
}

/// Values that tend to sit on boundaries (lengths, offsets, flags).
const INTERESTING: &[u8] = &[
    0, 1, 2, 4, 5, 6, 8, 0x0f, 0x10, 0x20, 0x3f, 0x40, 0x7f, 0x80, 0xfe, 0xff,
];

/// Applies 1 to 4 random byte-level mutations to `data`, keeping it at most `max_len` bytes:
/// bit flips, random or boundary bytes, 16-bit boundary words, deletions, insertions,
/// truncation, duplicated chunks, and splices from `donor` (another input, when given).
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, max_len: usize, donor: Option<&[u8]>) {
    let ops = rng.range(1, 4);
    for _ in 0..ops {
        let len = data.len();
        match rng.below(10) {
            0 | 1 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            2 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.u8();
            }
            3 if len > 0 => {
                let i = rng.below(len);
                data[i] = *rng.pick(INTERESTING);
            }
            4 if len > 1 => {
                let i = rng.below(len - 1);
                let v: u16 = *rng.pick(&[
                    0,
                    1,
                    0x7fff,
                    0x8000,
                    0xffff,
                    len as u16,
                    (len as u16).wrapping_add(1),
                ]);
                data[i..i + 2].copy_from_slice(&v.to_be_bytes());
            }
            5 if len > 0 => {
                let at = rng.below(len);
                let n = rng.range(1, (len - at).min(16));
                data.drain(at..at + n);
            }
            6 => {
                let at = rng.below(len + 1);
                let n = rng.range(1, 16);
                let bytes = rng.bytes(n);
                data.splice(at..at, bytes);
            }
            7 if len > 0 => {
                let keep = rng.below(len);
                data.truncate(keep);
            }
            8 if len > 0 => {
                let from = rng.below(len);
                let n = rng.range(1, (len - from).min(32));
                let chunk = data[from..from + n].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, chunk);
            }
            _ => {
                if let Some(d) = donor.filter(|d| !d.is_empty()) {
                    let from = rng.below(d.len());
                    let n = rng.range(1, (d.len() - from).min(64));
                    let at = rng.below(len + 1);
                    let end = (at + n).min(len);
                    data.splice(at..end, d[from..from + n].iter().copied());
                }
            }
        }
        data.truncate(max_len);
    }
}

/// `FUZZ_SEED`, else a fresh seed from the clock and the process id.
pub fn seed_from_env() -> u64 {
    if let Ok(text) = std::env::var("FUZZ_SEED") {
        let text = text.trim();
        let parsed = match text.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => text.parse(),
        };
        return parsed.unwrap_or_else(|_| panic!("FUZZ_SEED {text:?} is not a number"));
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// `FUZZ_SECONDS` (a float), else `default`.
pub fn duration_from_env(default: f64) -> Duration {
    let secs = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(default);
    Duration::from_secs_f64(secs.max(0.0))
}

/// What one bounded run did.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub executions: u64,
    pub elapsed: Duration,
    pub seed: u64,
}

/// Longest one execution may take before the run is declared hung (a generous bound: the
/// slowest execution of any target is milliseconds).
pub const HANG_LIMIT: Duration = Duration::from_secs(20);

/// Runs `one(rng, execution_number)` repeatedly for `FUZZ_SECONDS` (default `default_secs`)
/// and prints `fuzz TARGET: N executions in T s (seed S)`, the line `scripts/test` reports.
/// A watchdog aborts the process, naming the seed and the execution, when one execution takes
/// longer than [`HANG_LIMIT`]. `one` panics on a failed check (after printing its input).
pub fn run(target: &str, default_secs: f64, mut one: impl FnMut(&mut Rng, u64)) -> Report {
    let seed = seed_from_env();
    let limit = duration_from_env(default_secs);
    println!(
        "fuzz {target}: seed {seed:#x} for {:.1} s (FUZZ_SEED={seed:#x} reproduces)",
        limit.as_secs_f64()
    );
    let mut rng = Rng::new(seed);
    let counter = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let counter = Arc::clone(&counter);
        let done = Arc::clone(&done);
        let target = target.to_owned();
        std::thread::spawn(move || {
            let mut last = (counter.load(Ordering::Relaxed), Instant::now());
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let now = counter.load(Ordering::Relaxed);
                if now != last.0 {
                    last = (now, Instant::now());
                } else if last.1.elapsed() > HANG_LIMIT {
                    eprintln!(
                        "fuzz {target}: execution {now} has run for more than {} s: hang \
                         (FUZZ_SEED={seed:#x} replays it)",
                        HANG_LIMIT.as_secs()
                    );
                    std::process::abort();
                }
            }
        })
    };
    let start = Instant::now();
    let mut executions = 0u64;
    while start.elapsed() < limit || executions == 0 {
        one(&mut rng, executions);
        executions += 1;
        counter.store(executions, Ordering::Relaxed);
    }
    let elapsed = start.elapsed();
    done.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    println!(
        "fuzz {target}: {executions} executions in {:.1} s (seed {seed:#x})",
        elapsed.as_secs_f64()
    );
    Report {
        executions,
        elapsed,
        seed,
    }
}

/// Printable form of an input for a failure message: UTF-8 text escaped, else hex.
pub fn show(input: &[u8]) -> String {
    match std::str::from_utf8(input) {
        Ok(text) => format!("{text:?}"),
        Err(_) => hex(input),
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
