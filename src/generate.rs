//! Text generation, decoupled from the model (CPU only, no shader): a seeded sampler (greedy,
//! temperature, top-k, top-p) and a generation loop that calls a `step` closure for logits,
//! streams complete text as it is produced, and stops on eos ids, stop strings or a token budget.

use crate::data::tokenizer::{IncrementalDecoder, Tokenizer};
use crate::{Error, Result};

/// The most tokens one generation may ask for (beyond any model's context; keeps arithmetic on
/// it from overflowing).
pub const MAX_NEW_TOKENS: usize = 1 << 24;

/// Sampling and stopping settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 means greedy (argmax, the lowest id on ties).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (ties broken by the lower id); 0 disables.
    pub top_k: usize,
    /// Nucleus: keep the smallest most-likely set whose probability is >= `top_p` (at least one
    /// token), after top-k; 1.0 disables. In (0, 1].
    pub top_p: f32,
    /// Seed of the sampler's random number generator.
    pub seed: u64,
    /// Most tokens to generate (the eos token, when produced, counts).
    pub max_new_tokens: usize,
    /// Generation stops when the text contains one of these; the text is cut before it.
    pub stop_strings: Vec<String>,
    /// Generation stops after any of these ids; their text is not added.
    pub eos_ids: Vec<u32>,
    /// Leave special tokens out of the text (eos ids never appear in it).
    pub skip_special_tokens: bool,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            max_new_tokens: 128,
            stop_strings: Vec::new(),
            eos_ids: Vec::new(),
            skip_special_tokens: true,
        }
    }
}

impl SamplingConfig {
    /// Checks the ranges: temperature finite and >= 0, top_p in (0, 1], no empty stop string.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Invalid(format!(
                "temperature must be finite and >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Invalid(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        if self.max_new_tokens > MAX_NEW_TOKENS {
            return Err(Error::Invalid(format!("max_new_tokens {} must be at most {MAX_NEW_TOKENS}", self.max_new_tokens)));
        }
        if self.stop_strings.iter().any(String::is_empty) {
            return Err(Error::Invalid("stop strings must not be empty".into()));
        }
        Ok(())
    }
}

/// PCG-XSH-RR 64/32 (O'Neill, 2014): a 64-bit linear congruential state
/// `s <- s * 6364136223846793005 + inc` (inc odd), output = the top bits xorshifted and rotated
/// by the state's top 5 bits. Small, fast, the same on every target (no OS randomness).
#[derive(Debug, Clone)]
pub struct Pcg32 {
    state: u64,
    inc: u64,
}

impl Pcg32 {
    const MUL: u64 = 6364136223846793005;
    /// Stream selector used by [`Pcg32::new`] (any odd increment works).
    const STREAM: u64 = 0xda3e_39cb_94b9_5bdb;

    /// A generator seeded with `seed` (the reference seeding: state 0, step, add seed, step).
    pub fn new(seed: u64) -> Self {
        let mut r = Self { state: 0, inc: (Self::STREAM << 1) | 1 };
        r.next_u32();
        r.state = r.state.wrapping_add(seed);
        r.next_u32();
        r
    }

    /// Next 32 uniform bits.
    pub fn next_u32(&mut self) -> u32 {
        let old = self.state;
        self.state = old.wrapping_mul(Self::MUL).wrapping_add(self.inc);
        let xorshifted = (((old >> 18) ^ old) >> 27) as u32;
        let rot = (old >> 59) as u32;
        xorshifted.rotate_right(rot)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        let hi = (self.next_u32() as u64) << 21;
        let lo = (self.next_u32() >> 11) as u64;
        (hi | lo) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Picks the next token from logits: greedy when temperature is 0, otherwise softmax at the
/// temperature over the top-k, then top-p set, drawn with a seeded [`Pcg32`].
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    rng: Pcg32,
}

impl Sampler {
    /// A sampler with the config's temperature, top_k, top_p and seed.
    pub fn new(cfg: &SamplingConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            temperature: cfg.temperature,
            top_k: cfg.top_k,
            top_p: cfg.top_p,
            rng: Pcg32::new(cfg.seed),
        })
    }

    /// The next id for `logits` [V]. NaN logits or an empty vector are errors, and so is an
    /// infinite largest logit when sampling (T > 0).
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let dist = self.distribution(logits)?;
        let u = self.rng.next_f64();
        let mut acc = 0.0;
        for &(id, p) in &dist {
            acc += p;
            if u < acc {
                return Ok(id);
            }
        }
        Ok(dist[dist.len() - 1].0) // u within rounding of 1
    }

    /// The distribution sampled from, as (id, probability) most likely first, renormalized over
    /// the kept set: p_i = exp((l_i - max) / T) / sum over the kept ids (f64), kept = top-k by
    /// logit (lower id first on ties), then the shortest prefix whose cumulative probability
    /// (before renormalizing) is >= top_p. Greedy (T = 0) gives the argmax with probability 1.
    pub fn distribution(&self, logits: &[f32]) -> Result<Vec<(u32, f64)>> {
        if self.temperature == 0.0 {
            return Ok(vec![(argmax(logits)?, 1.0)]);
        }
        check_logits(logits)?;
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        // Descending logit, ascending id on ties (the sort is stable).
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        if self.top_k > 0 && self.top_k < order.len() {
            order.truncate(self.top_k);
        }
        let t = self.temperature as f64;
        let max = logits[order[0] as usize] as f64;
        if !max.is_finite() {
            return Err(Error::Invalid(format!("sampling: the largest logit is {max}")));
        }
        let w: Vec<f64> = order.iter().map(|&i| ((logits[i as usize] as f64 - max) / t).exp()).collect();
        let z: f64 = w.iter().sum();
        let mut kept = order.len();
        if self.top_p < 1.0 {
            let p = self.top_p as f64;
            let mut acc = 0.0;
            for (k, wi) in w.iter().enumerate() {
                acc += wi / z;
                if acc >= p {
                    kept = k + 1;
                    break;
                }
            }
        }
        let zk: f64 = w[..kept].iter().sum();
        Ok(order[..kept].iter().zip(&w[..kept]).map(|(&i, &wi)| (i, wi / zk)).collect())
    }
}

fn check_logits(logits: &[f32]) -> Result<()> {
    if logits.is_empty() {
        return Err(Error::Invalid("sampling: empty logits".into()));
    }
    if let Some(i) = logits.iter().position(|x| x.is_nan()) {
        return Err(Error::Invalid(format!("sampling: logit {i} is NaN")));
    }
    Ok(())
}

/// The index of the largest logit (the first on ties). NaN or empty logits are errors.
pub fn argmax(logits: &[f32]) -> Result<u32> {
    check_logits(logits)?;
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    Ok(best as u32)
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// An eos id was produced (it is the last of `ids`, its text not in `text`).
    Eos(u32),
    /// The text reached this stop string (cut before it; the token completing it is in `ids`).
    StopString(String),
    /// `max_new_tokens` were produced.
    MaxNewTokens,
    /// The sequence reached the end of the model's context (`max_position_embeddings`, or the
    /// positions the model was loaded for) before `max_new_tokens`.
    ContextFull,
}

/// The result of [`generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOutput {
    /// The new ids (the prompt not included).
    pub ids: Vec<u32>,
    /// Their text (without eos, cut at a stop string); equal to what `on_text` received.
    pub text: String,
    /// Why it stopped.
    pub stop_reason: StopReason,
}

/// Generates after `prompt_ids`. `step(new_ids, pos)` feeds `new_ids` at positions
/// `pos..pos+len` to the model (which keeps its KV cache) and returns the logits [V] of the last
/// one: first the whole prompt at 0, then each sampled token. Each sampled id is checked
/// against eos ids, decoded incrementally, and the text checked for stop strings; `on_text`
/// receives text as soon as it is complete UTF-8 and cannot be the start of a stop string (text
/// that might be is held back until it is decided). Stops on an eos id, a stop string (text cut
/// before it) or after `max_new_tokens`. An empty prompt is an error. (The same loop as
/// [`Generation`], for a synchronous `step`.)
pub fn generate(
    prompt_ids: &[u32],
    mut step: impl FnMut(&[u32], usize) -> Result<Vec<f32>>,
    tok: &Tokenizer,
    cfg: &SamplingConfig,
    mut on_text: impl FnMut(&str),
) -> Result<GenerationOutput> {
    let mut g = Generation::new(prompt_ids, tok, cfg)?;
    while let Some((ids, pos)) = g.next_input() {
        let logits = step(&ids, pos)?;
        g.push_logits(&logits, &mut on_text)?;
    }
    g.finish()
}

/// The generation loop of [`generate`] turned inside out, for callers whose model step is
/// asynchronous (the browser): `next_input()` says what to feed the model (ids and their first
/// position), `push_logits` takes the logits [V] of the last of them, samples, streams text
/// and decides whether to stop; `finish()` gives the output.
pub struct Generation<'a> {
    sampler: Sampler,
    stream: TextStream<'a>,
    cfg: &'a SamplingConfig,
    prompt: Vec<u32>,
    ids: Vec<u32>,
    pos: usize,
    stop: Option<StopReason>,
    /// Ids the tokenizer can decode: 0 .. tok_vocab.
    tok_vocab: usize,
}

impl<'a> Generation<'a> {
    /// A generation after `prompt_ids` (not empty); checks `cfg`.
    pub fn new(prompt_ids: &[u32], tok: &'a Tokenizer, cfg: &'a SamplingConfig) -> Result<Self> {
        let sampler = Sampler::new(cfg)?;
        if prompt_ids.is_empty() {
            return Err(Error::Invalid("generate: the prompt is empty".into()));
        }
        let stop = (cfg.max_new_tokens == 0).then_some(StopReason::MaxNewTokens);
        Ok(Generation { sampler, stream: TextStream::new(cfg, tok), cfg, prompt: prompt_ids.to_vec(), ids: Vec::new(), pos: 0, stop, tok_vocab: tok.vocab_size() })
    }

    /// The ids to feed next and the position of the first (the prompt at 0, then each new
    /// token), or None once generation has stopped.
    pub fn next_input(&self) -> Option<(Vec<u32>, usize)> {
        if self.stop.is_some() {
            return None;
        }
        match self.ids.last() {
            None => Some((self.prompt.clone(), 0)),
            Some(&id) => Some((vec![id], self.pos)),
        }
    }

    /// Takes the logits [V] of the last fed position: samples the next id, streams its text to
    /// `on_text`, and returns true when generation has stopped. Only ids the tokenizer can decode
    /// are sampled: a model whose vocabulary has more rows than its tokenizer has ids (padding
    /// rows, as Qwen2.5's 151,936 rows for 151,665 ids) never emits one it cannot spell.
    pub fn push_logits(&mut self, logits: &[f32], on_text: &mut impl FnMut(&str)) -> Result<bool> {
        if self.stop.is_some() {
            return Err(Error::Invalid("generate: logits pushed after generation stopped".into()));
        }
        self.pos = self.prompt.len() + self.ids.len();
        let id = self.sampler.sample(&logits[..logits.len().min(self.tok_vocab.max(1))])?;
        self.ids.push(id);
        if self.cfg.eos_ids.contains(&id) {
            self.stop = Some(StopReason::Eos(id));
        } else if let Some(s) = self.stream.push(id, on_text)? {
            self.stop = Some(StopReason::StopString(s));
        } else if self.ids.len() >= self.cfg.max_new_tokens {
            self.stop = Some(StopReason::MaxNewTokens);
        }
        if self.stop.is_some() && !matches!(self.stop, Some(StopReason::StopString(_))) {
            self.stream.finish(on_text)?;
        }
        Ok(self.stop.is_some())
    }

    /// The ids generated so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Ends a generation that has not stopped by itself (the caller's stop): streams the text
    /// held back so far and gives the output, its stop reason `MaxNewTokens` (as if the limit
    /// were the tokens generated). A generation that stopped by itself is finished as is.
    pub fn end_early(mut self, on_text: &mut impl FnMut(&str)) -> Result<GenerationOutput> {
        if self.stop.is_none() {
            self.stop = Some(StopReason::MaxNewTokens);
            self.stream.finish(on_text)?;
        }
        self.finish()
    }

    /// The output; an error if generation has not stopped yet.
    pub fn finish(self) -> Result<GenerationOutput> {
        let stop_reason = self.stop.ok_or_else(|| Error::Invalid("generate: finish() before generation stopped".into()))?;
        Ok(GenerationOutput { ids: self.ids, text: self.stream.text, stop_reason })
    }
}

/// Incremental text with stop-string detection and hold-back for streaming.
struct TextStream<'a> {
    tok: &'a Tokenizer,
    decoder: IncrementalDecoder,
    stops: &'a [String],
    /// All text so far (cut at the stop string once one is found).
    text: String,
    /// Bytes of `text` already given to `on_text`.
    emitted: usize,
}

impl<'a> TextStream<'a> {
    fn new(cfg: &'a SamplingConfig, tok: &'a Tokenizer) -> Self {
        Self {
            tok,
            decoder: tok.incremental_decoder(cfg.skip_special_tokens),
            stops: &cfg.stop_strings,
            text: String::new(),
            emitted: 0,
        }
    }

    /// Adds one id; returns the stop string if the text now contains one.
    fn push(&mut self, id: u32, on_text: &mut impl FnMut(&str)) -> Result<Option<String>> {
        let Some(piece) = self.decoder.step(self.tok, id)? else { return Ok(None) };
        Ok(self.add_text(&piece, on_text))
    }

    fn add_text(&mut self, piece: &str, on_text: &mut impl FnMut(&str)) -> Option<String> {
        let old_len = self.text.len();
        self.text.push_str(piece);
        // A match not seen before ends after old_len, so it starts at most len(stop) - 1 earlier.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = old_len.saturating_sub(longest.saturating_sub(1));
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|p| (from + p, s)))
            .min_by_key(|&(p, _)| p);
        if let Some((p, s)) = hit {
            let s = s.clone();
            self.text.truncate(p);
            self.emit_to(p, on_text);
            return Some(s);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let bytes = self.text.as_bytes();
        let mut hold = 0;
        for s in self.stops {
            for k in (1..s.len()).rev() {
                if k <= hold {
                    break;
                }
                if bytes.len() >= k && bytes[bytes.len() - k..] == s.as_bytes()[..k] {
                    hold = k;
                    break;
                }
            }
        }
        let mut upto = self.text.len() - hold;
        while !self.text.is_char_boundary(upto) {
            upto -= 1;
        }
        self.emit_to(upto, on_text);
        None
    }

    fn emit_to(&mut self, upto: usize, on_text: &mut impl FnMut(&str)) {
        if upto > self.emitted {
            on_text(&self.text[self.emitted..upto]);
            self.emitted = upto;
        }
    }

    /// End of generation (eos or budget): flushes the decoder and emits what was held back.
    fn finish(&mut self, on_text: &mut impl FnMut(&str)) -> Result<()> {
        if let Some(piece) = self.decoder.flush(self.tok)? {
            if self.add_text(&piece, on_text).is_some() {
                return Ok(());
            }
        }
        let end = self.text.len();
        self.emit_to(end, on_text);
        Ok(())
    }
}
