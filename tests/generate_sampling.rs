//! Sampling and the generation loop, driven by a fake `step` (a fixed table of logits) and the
//! fixture tokenizer: greedy, seeding, top-k, top-p, temperature, eos and stop strings, streaming.

use qlora_webgpu::data::Tokenizer;
use qlora_webgpu::generate::{
    argmax, generate, GenerationOutput, Pcg32, Sampler, SamplingConfig, StopReason,
};
use qlora_webgpu::Result;
use std::sync::OnceLock;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn tok() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let read = |f: &str| std::fs::read(format!("{FIXTURES}/tiny-llama/model/{f}")).unwrap();
        Tokenizer::from_hf_files(&read("tokenizer.json"), Some(&read("tokenizer_config.json"))).unwrap()
    })
}

fn cfg(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingConfig {
    SamplingConfig { temperature, top_k, top_p, seed, ..Default::default() }
}

/// Logits whose softmax (T = 1) is `probs`.
fn logits_of(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|p| p.ln() as f32).collect()
}

fn random_logits(rng: &mut Pcg32, n: usize) -> Vec<f32> {
    (0..n).map(|_| (rng.next_f64() * 8.0 - 4.0) as f32).collect()
}

#[test]
fn greedy_picks_the_argmax() {
    let mut s = Sampler::new(&cfg(0.0, 0, 1.0, 1)).unwrap();
    assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]).unwrap(), 1);
    // Ties: the lowest id, as torch.argmax.
    assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]).unwrap(), 1);
    assert_eq!(s.sample(&[f32::NEG_INFINITY, -5.0]).unwrap(), 1);
    let mut rng = Pcg32::new(9);
    for n in [1, 2, 17, 1000] {
        let l = random_logits(&mut rng, n);
        let want = (0..n).fold(0, |b, i| if l[i] > l[b] { i } else { b }) as u32;
        assert_eq!(s.sample(&l).unwrap(), want);
        assert_eq!(argmax(&l).unwrap(), want);
    }
    assert!(s.sample(&[]).is_err());
    assert!(s.sample(&[0.0, f32::NAN]).is_err());
}

#[test]
fn same_seed_same_samples() {
    let mut rng = Pcg32::new(3);
    let tables: Vec<Vec<f32>> = (0..300).map(|_| random_logits(&mut rng, 50)).collect();
    let run = |seed: u64| -> Vec<u32> {
        let mut s = Sampler::new(&cfg(1.0, 20, 0.95, seed)).unwrap();
        tables.iter().map(|l| s.sample(l).unwrap()).collect()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
    // The generator itself: the output of the PCG32 reference algorithm (O'Neill's pcg-c-basic,
    // pcg32_srandom_r(initstate = seed, initseq = 0xda3e39cb94b95bdb) then pcg32_random_r),
    // computed independently by this Python snippet, which also reproduces pcg32-demo's
    // published first outputs for (42, 54):
    //   M = (1 << 64) - 1
    //   def pcg32(initstate, initseq):
    //       state, inc = 0, ((initseq << 1) | 1) & M
    //       def step():
    //           nonlocal state
    //           old = state
    //           state = (old * 6364136223846793005 + inc) & M
    //           x = (((old >> 18) ^ old) >> 27) & 0xFFFFFFFF
    //           r = old >> 59
    //           return ((x >> r) | (x << ((-r) & 31))) & 0xFFFFFFFF
    //       step(); state = (state + initstate) & M; step()
    //       return step
    //   g = pcg32(42, 54)  # a15c02b7 7b47f409 ba1d3330 83d2f293 bfa4784b cbed606e (pcg32-demo)
    //   g = pcg32(42, 0xDA3E39CB94B95BDB)
    //   print([f"{g():#010x}" for _ in range(8)])
    //   print([((g() << 21) | (g() >> 11)) / 2**53 for _ in range(4)])  # next_f64: 53 bits
    let mut a = Pcg32::new(42);
    let xs: Vec<u32> = (0..8).map(|_| a.next_u32()).collect();
    assert_eq!(
        xs,
        [0x713066ea, 0x3c7a0d56, 0xf424216a, 0x25c89145, 0x43e7ef3e, 0x90cff60c, 0x52320591, 0x53dfbcb8],
        "PCG32 seed 42 differs from the reference algorithm"
    );
    let fs: Vec<f64> = (0..4).map(|_| a.next_f64()).collect();
    assert_eq!(fs, [0.45017614880225454, 0.27301324463907506, 0.26942842997901995, 0.4516264266965214]);
    let u: Vec<f64> = (0..10000).map(|_| a.next_f64()).collect();
    assert!(u.iter().all(|&x| (0.0..1.0).contains(&x)));
    let mean = u.iter().sum::<f64>() / u.len() as f64;
    assert!((mean - 0.5).abs() < 0.01, "{mean}");
}

#[test]
fn top_k_one_equals_greedy() {
    let mut rng = Pcg32::new(5);
    let mut greedy = Sampler::new(&cfg(0.0, 0, 1.0, 0)).unwrap();
    for seed in 0..20 {
        let mut s = Sampler::new(&cfg(1.3, 1, 1.0, seed)).unwrap();
        for _ in 0..20 {
            let mut l = random_logits(&mut rng, 64);
            l[17] = l[5].max(l[17]); // possible ties
            l[5] = l[17];
            assert_eq!(s.sample(&l).unwrap(), greedy.sample(&l).unwrap());
        }
    }
}

#[test]
fn top_k_keeps_the_k_largest() {
    let l = [0.5f32, 2.0, -1.0, 3.0, 2.0, 0.0];
    let s = Sampler::new(&cfg(1.0, 3, 1.0, 0)).unwrap();
    let d = s.distribution(&l).unwrap();
    let ids: Vec<u32> = d.iter().map(|x| x.0).collect();
    assert_eq!(ids, vec![3, 1, 4]); // tie at 2.0: lower id first
    let z: f64 = [3.0f64, 2.0, 2.0].iter().map(|x| x.exp()).sum();
    for (&(_, p), x) in d.iter().zip([3.0f64, 2.0, 2.0]) {
        assert!((p - x.exp() / z).abs() < 1e-12);
    }
}

#[test]
fn top_p_keeps_the_smallest_sufficient_set() {
    // ids 0..5 with probabilities (shuffled): id 3 = 0.5, id 0 = 0.25, id 4 = 0.15, id 1 = 0.06,
    // id 2 = 0.04.
    let probs = [0.25, 0.06, 0.04, 0.5, 0.15];
    let l = logits_of(&probs);
    let kept =
        |p: f32| -> Vec<(u32, f64)> { Sampler::new(&cfg(1.0, 0, p, 0)).unwrap().distribution(&l).unwrap() };
    let ids = |d: &[(u32, f64)]| d.iter().map(|x| x.0).collect::<Vec<_>>();
    assert_eq!(ids(&kept(0.3)), vec![3]); // 0.5 >= 0.3 already
    assert_eq!(ids(&kept(0.7)), vec![3, 0]); // 0.75
    assert_eq!(ids(&kept(0.85)), vec![3, 0, 4]); // 0.9
    assert_eq!(ids(&kept(0.93)), vec![3, 0, 4, 1]); // 0.96
    assert_eq!(ids(&kept(0.99)), vec![3, 0, 4, 1, 2]);
    assert_eq!(ids(&kept(1.0)), vec![3, 0, 4, 1, 2]);
    assert_eq!(ids(&kept(1e-6)), vec![3]); // at least one token
                                           // Renormalized over the kept set.
    let d = kept(0.85);
    for (&(id, p), z) in d.iter().zip([0.9; 3]) {
        assert!((p - probs[id as usize] / z).abs() < 1e-6, "{id} {p}");
    }
    // Sampling never leaves the set.
    let mut s = Sampler::new(&cfg(1.0, 0, 0.7, 11)).unwrap();
    for _ in 0..2000 {
        assert!(matches!(s.sample(&l).unwrap(), 0 | 3));
    }
    // top-k before top-p: k = 2 keeps {3, 0}; p = 0.7 of the renormalized (2/3, 1/3) keeps {3, 0}
    // since 2/3 < 0.7.
    let d = Sampler::new(&cfg(1.0, 2, 0.7, 0)).unwrap().distribution(&l).unwrap();
    assert_eq!(ids(&d), vec![3, 0]);
    let d = Sampler::new(&cfg(1.0, 2, 0.6, 0)).unwrap().distribution(&l).unwrap();
    assert_eq!(ids(&d), vec![3]);
}

#[test]
fn temperature_sharpens_and_flattens() {
    let probs = [0.1, 0.2, 0.3, 0.4];
    let l = logits_of(&probs);
    let dist = |t: f32| -> Vec<f64> {
        let mut d = Sampler::new(&cfg(t, 0, 1.0, 0)).unwrap().distribution(&l).unwrap();
        d.sort_by_key(|x| x.0);
        d.into_iter().map(|x| x.1).collect()
    };
    // p_T(i) = p_i^(1/T) / sum_j p_j^(1/T).
    for t in [0.25f32, 0.5, 1.0, 2.0, 10.0] {
        let w: Vec<f64> = probs.iter().map(|p: &f64| p.powf(1.0 / t as f64)).collect();
        let z: f64 = w.iter().sum();
        for (a, b) in dist(t).iter().zip(&w) {
            assert!((a - b / z).abs() < 1e-6, "T={t}");
        }
    }
    assert!(dist(0.5)[3] > dist(1.0)[3] && dist(1.0)[3] > dist(2.0)[3]);
    // Empirical frequencies follow the distribution (20000 draws, 4 sigma ~ 0.014).
    let mut s = Sampler::new(&cfg(0.5, 0, 1.0, 2024)).unwrap();
    let mut counts = [0usize; 4];
    for _ in 0..20000 {
        counts[s.sample(&l).unwrap() as usize] += 1;
    }
    for (c, p) in counts.iter().zip(dist(0.5)) {
        assert!((*c as f64 / 20000.0 - p).abs() < 0.015, "{counts:?}");
    }
}

#[test]
fn config_is_validated() {
    assert!(Sampler::new(&cfg(-1.0, 0, 1.0, 0)).is_err());
    assert!(Sampler::new(&cfg(f32::NAN, 0, 1.0, 0)).is_err());
    assert!(Sampler::new(&cfg(1.0, 0, 0.0, 0)).is_err());
    assert!(Sampler::new(&cfg(1.0, 0, 1.5, 0)).is_err());
    let mut s = Sampler::new(&cfg(1.0, 0, 1.0, 0)).unwrap();
    assert!(s.sample(&[f32::NEG_INFINITY; 3]).is_err());
    assert!(s.sample(&[0.0, f32::INFINITY]).is_err());
    assert!(s.sample(&[0.0, f32::NAN]).is_err());
    assert_eq!(s.sample(&[f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY]).unwrap(), 1);
    let mut c = cfg(0.0, 0, 1.0, 0);
    c.stop_strings = vec![String::new()];
    assert!(Sampler::new(&c).is_err());
}

/// A fake model: returns the logits that make `script[i]` the argmax after the i-th call and
/// checks that it is fed the prompt first, then each sampled token at the next position.
struct Script {
    prompt: Vec<u32>,
    script: Vec<u32>,
    vocab: usize,
    calls: usize,
}

impl Script {
    fn new(prompt: &[u32], script: Vec<u32>) -> Self {
        Self { prompt: prompt.to_vec(), script, vocab: tok().vocab_size(), calls: 0 }
    }

    fn step(&mut self, new_ids: &[u32], pos: usize) -> Result<Vec<f32>> {
        if self.calls == 0 {
            assert_eq!((new_ids, pos), (&self.prompt[..], 0));
        } else {
            assert_eq!(new_ids, &[self.script[self.calls - 1]]);
            assert_eq!(pos, self.prompt.len() + self.calls - 1);
        }
        let mut l = vec![0.0f32; self.vocab];
        let target = *self.script.get(self.calls).expect("step called past the script");
        l[target as usize] = 10.0;
        self.calls += 1;
        Ok(l)
    }
}

fn run(script_text_ids: Vec<u32>, c: &SamplingConfig) -> (GenerationOutput, Vec<String>, usize) {
    let prompt = [1u32, 4093, 198];
    let mut fake = Script::new(&prompt, script_text_ids);
    let mut pieces = Vec::new();
    let out =
        generate(&prompt, |ids, pos| fake.step(ids, pos), tok(), c, |s| pieces.push(s.to_string())).unwrap();
    assert_eq!(pieces.concat(), out.text, "streamed pieces must concatenate to the text");
    assert!(pieces.iter().all(|p| !p.is_empty()));
    (out, pieces, fake.calls)
}

#[test]
fn stops_on_eos_without_its_text() {
    let body = tok().encode("The capital of France is Paris.", false).unwrap();
    let mut script = body.clone();
    script.extend([2, 198, 1]); // <|im_end|> then more that must not be generated
    let mut c = cfg(0.0, 0, 1.0, 0);
    c.eos_ids = vec![2];
    c.max_new_tokens = 50;
    let (out, _, calls) = run(script, &c);
    assert_eq!(out.stop_reason, StopReason::Eos(2));
    assert_eq!(out.text, "The capital of France is Paris.");
    let mut want = body.clone();
    want.push(2);
    assert_eq!(out.ids, want);
    assert_eq!(calls, body.len() + 1); // the prompt, then every token but the eos
                                       // Without eos ids, special tokens are skipped from the text (skip_special_tokens) or kept.
    c.eos_ids.clear();
    c.max_new_tokens = body.len() + 3;
    let (out, _, _) = run([body.clone(), vec![2, 198, 1]].concat(), &c);
    assert_eq!(out.stop_reason, StopReason::MaxNewTokens);
    assert_eq!(out.text, "The capital of France is Paris.\n");
    c.skip_special_tokens = false;
    let (out, _, _) = run([body.clone(), vec![2, 198, 1]].concat(), &c);
    assert_eq!(out.text, "The capital of France is Paris.<|im_end|>\n<|im_start|>");
}

#[test]
fn stops_at_max_new_tokens() {
    let script = tok().encode("one two three four five six", false).unwrap();
    let mut c = cfg(0.0, 0, 1.0, 0);
    c.max_new_tokens = 3;
    let (out, _, calls) = run(script.clone(), &c);
    assert_eq!(out.stop_reason, StopReason::MaxNewTokens);
    assert_eq!(out.ids, script[..3]);
    assert_eq!(out.text, tok().decode(&script[..3], true).unwrap());
    assert_eq!(calls, 3); // no step after the last token
    c.max_new_tokens = 0;
    let (out, pieces, calls) = run(script, &c);
    assert_eq!((out.ids.len(), out.text.as_str(), pieces.len(), calls), (0, "", 0, 0));
}

#[test]
fn stop_string_cuts_the_text_and_is_never_streamed() {
    let text = "Line one\nUsers are fine.\nUser: what now?";
    let script = tok().encode(text, false).unwrap();
    let mut c = cfg(0.0, 0, 1.0, 0);
    c.stop_strings = vec!["\nUser:".into(), "never".into()];
    c.max_new_tokens = 100;
    let (out, pieces, _) = run(script.clone(), &c);
    assert_eq!(out.stop_reason, StopReason::StopString("\nUser:".into()));
    assert_eq!(out.text, "Line one\nUsers are fine.");
    assert!(pieces.iter().all(|p| !p.contains('?')));
    // The ids end with the token that completed the stop string.
    let n = out.ids.len();
    assert_eq!(out.ids[..], script[..n]);
    assert!(tok().decode(&out.ids, true).unwrap().ends_with("\nUser:"));
    assert!(!tok().decode(&out.ids[..n - 1], true).unwrap().contains("\nUser:"));
    // A stop string inside one token's text, and the earliest of two stop strings wins.
    c.stop_strings = vec!["fine".into(), "one".into()];
    let (out, _, _) = run(script.clone(), &c);
    assert_eq!(out.text, "Line ");
    assert_eq!(out.stop_reason, StopReason::StopString("one".into()));
    // No stop string reached: everything streamed.
    c.stop_strings = vec!["\nUser:!".into()];
    c.max_new_tokens = script.len();
    let (out, _, _) = run(script, &c);
    assert_eq!(out.text, text);
    assert_eq!(out.stop_reason, StopReason::MaxNewTokens);
}

#[test]
fn streaming_pieces_are_complete_utf8_and_concatenate() {
    let text = "Crabs 🦀 and rockets 🚀: naïve café, 日本語! 👩‍👩‍👧‍👦 done.";
    let script = tok().encode(text, false).unwrap();
    let mut c = cfg(0.0, 0, 1.0, 0);
    c.max_new_tokens = script.len();
    let (out, pieces, _) = run(script.clone(), &c);
    assert_eq!(out.text, text);
    assert!(pieces.len() > 5 && pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    // With a stop string that is a multi-byte prefix-sharing string.
    c.stop_strings = vec!["日本語?".into(), "🚀:".into()];
    let (out, _, _) = run(script, &c);
    assert_eq!(out.text, "Crabs 🦀 and rockets ");
}

#[test]
fn sampled_generation_is_reproducible() {
    // A fake model with a spread-out distribution: the same seed gives the same ids and text.
    let vocab = 300;
    let gen = |seed: u64| {
        let mut c = cfg(0.8, 40, 0.9, seed);
        c.max_new_tokens = 30;
        let mut rng = Pcg32::new(77);
        let mut pieces = String::new();
        let out = generate(
            &[1],
            |_, _| Ok((0..vocab).map(|_| (rng.next_f64() * 4.0) as f32).collect()),
            tok(),
            &c,
            |s| pieces.push_str(s),
        )
        .unwrap();
        assert_eq!(pieces, out.text);
        out
    };
    assert_eq!(gen(1), gen(1));
    assert_ne!(gen(1).ids, gen(2).ids);
    assert!(generate(&[], |_, _| Ok(vec![0.0]), tok(), &cfg(0.0, 0, 1.0, 0), |_| {}).is_err());
}

#[test]
fn ids_beyond_the_tokenizer_are_never_sampled() {
    // A model with more vocabulary rows than its tokenizer has ids (padding rows): the largest
    // logit sits on a row the tokenizer cannot decode; greedy takes the best decodable id.
    let tok = tok();
    let v = tok.vocab_size();
    let cfg = SamplingConfig { max_new_tokens: 1, ..SamplingConfig::default() };
    let out = generate(
        &[1],
        |_, _| {
            let mut l = vec![0.0f32; v + 8];
            l[v + 3] = 9.0; // a padding row
            l[42] = 5.0;
            Ok(l)
        },
        tok,
        &cfg,
        |_| {},
    )
    .unwrap();
    assert_eq!(out.ids, vec![42]);
}
