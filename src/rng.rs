//! The project's seeded random numbers: SplitMix64, one u64 of state (stored exactly in
//! checkpoints), with independent streams per seed. Used for LoRA initialization (lora/), data
//! order (data/), dropout seeds and the bench's random weights; at the bottom of the module
//! layers, so every layer may use it.

/// SplitMix64 (Steele, Lea and Flood 2014): a 64-bit state advanced by the golden-ratio constant
/// and mixed by two xor-shift-multiply rounds. Small, fast, and its whole state is one u64, so a
/// checkpoint stores it exactly. Used for LoRA initialization, data order and dropout seeds;
/// it does not reproduce torch's RNG (PEFT's initial values are not reproducible bit for bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitMix64 {
    /// The state; `next_u64` adds 0x9E3779B97F4A7C15 and returns a mix of the new state.
    pub state: u64,
}

/// The SplitMix64 output function: a bijective mix of 64 bits.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix64 {
    /// A generator whose state is `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// An independent stream `stream` of `seed`: state = mix64(seed ^ mix64(stream + 1)), so
    /// the streams of one seed do not overlap in any practical length and adding a stream
    /// (e.g. one more LoRA module) does not shift the others.
    pub fn stream(seed: u64, stream: u64) -> Self {
        SplitMix64 { state: mix64(seed ^ mix64(stream.wrapping_add(1))) }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }

    /// The next 32 random bits (the high half of `next_u64`).
    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi): lo + (hi − lo)·u.
    pub fn uniform_in(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Standard normal by Box–Muller (one draw per call; u1 in (0, 1] so the log is finite).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Uniform integer in [0, n) (n ≥ 1), by Lemire's multiply-shift (bias below 2^-32 for the
    /// sizes a data set has).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n.max(1) as u128) >> 64) as u64
    }

    /// Fisher–Yates shuffle of `v` (used for the data order of an epoch).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}
