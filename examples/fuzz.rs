//! A structure-aware mutation fuzzer for every parser of the crate, on the stable toolchain (no
//! cargo-fuzz / AFL instrumentation): seeds are small valid inputs built here (a miniature
//! model as config.json + safetensors and as GGUF, a BPE tokenizer, a chat template, JSONL
//! data, a TOML run config, a PEFT adapter, a bitsandbytes 4-bit file, a checkpoint); each
//! execution stacks 1-6 mutations (bit flips, interesting bytes, u32/u64 header fields set to
//! boundary values, numbers in text replaced by boundary values, chunk insert/delete/duplicate,
//! splices of JSON tokens, truncation) and runs the parser in-process under `catch_unwind`.
//!
//! Failures: a panic, an allocation larger than 64 MiB + 64x the input (the global allocator
//! below refuses it and the process aborts after saving the input), or an execution over 10 s
//! (a watchdog saves the input and aborts). Every such input is written to
//! `tests/fixtures/fuzz/<parser>/` (replayed by `cargo test --test fuzz_corpus`).
//!
//! `cargo run --release --example fuzz -- [PARSER|all] [SECONDS] [SEED]` (scripts/fuzz.sh runs
//! a campaign); prints executions, errors (clean rejections), oks and the slowest execution per
//! parser. `--replay FILE PARSER` runs one input.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[path = "../tests/common/gguf.rs"]
mod gguf;


// ---------------------------------------------------------------------------------------------
// Allocation guard.

/// The largest single allocation allowed for the current input (0: no limit).
static ALLOC_LIMIT: AtomicUsize = AtomicUsize::new(0);
/// The largest allocation seen during the current parser's executions.
static ALLOC_MAX: AtomicUsize = AtomicUsize::new(0);

struct Guard;

unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let limit = ALLOC_LIMIT.load(Ordering::Relaxed);
        if limit != 0 && l.size() > limit {
            // Allocation beyond the input's plausible size: save the input, then abort (the
            // runtime aborts on the null pointer).
            save_current("alloc");
            return std::ptr::null_mut();
        }
        ALLOC_MAX.fetch_max(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let limit = ALLOC_LIMIT.load(Ordering::Relaxed);
        if limit != 0 && new > limit {
            save_current("alloc");
            return std::ptr::null_mut();
        }
        ALLOC_MAX.fetch_max(new, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Guard = Guard;

/// The input being executed, written raw (no allocation) to a pre-opened file when the
/// allocator or the watchdog gives up.
static PENDING: Mutex<Option<std::fs::File>> = Mutex::new(None);
static CUR_PTR: AtomicUsize = AtomicUsize::new(0);
static CUR_LEN: AtomicUsize = AtomicUsize::new(0);

fn save_current(why: &str) {
    ALLOC_LIMIT.store(0, Ordering::Relaxed);
    let (ptr, len) = (CUR_PTR.load(Ordering::SeqCst), CUR_LEN.load(Ordering::SeqCst));
    if let Ok(g) = PENDING.try_lock() {
        if let (Some(f), true) = (g.as_ref(), ptr != 0) {
            // SAFETY: ptr/len describe the input slice, alive for the whole execution.
            let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
            let mut f: &std::fs::File = f;
            let _ = f.write_all(bytes);
            let _ = f.sync_all();
        }
    }
    let _ = std::io::stderr().write_all(b"\nfuzz: ");
    let _ = std::io::stderr().write_all(why.as_bytes());
    let _ = std::io::stderr().write_all(b" failure; input saved to the pending crash file\n");
}

// ---------------------------------------------------------------------------------------------
// Random numbers and mutation.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        qlora_webgpu::rng::mix64(self.0)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
}

const NUMBERS: [&str; 16] = [
    "0", "-1", "1", "2", "65535", "2147483648", "4294967296", "1099511627776", "4611686018427387904",
    "9223372036854775807", "18446744073709551615", "1e308", "-1e308", "NaN", "1.5", "99999999999999999999999",
];
const U64S: [u64; 10] = [0, 1, 2, 0x7f, 0xff, 1 << 31, 1 << 32, 1 << 40, 1 << 62, u64::MAX];
const TOKENS: [&str; 12] = ["{", "}", "[", "]", "\"", ",", ":", "null", "true", "\\u0000", "{%", "%}"];

fn mutate(rng: &mut Rng, seed: &[u8], text: bool) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(6) {
        let n = b.len();
        match rng.below(if text { 11 } else { 9 }) {
            0 if n > 0 => {
                let i = rng.below(n);
                b[i] ^= 1 << rng.below(8);
            }
            1 if n > 0 => {
                let i = rng.below(n);
                b[i] = [0u8, 0xff, 0x7f, 0x80, b'9', b'"', b'{'][rng.below(7)];
            }
            2 if n >= 8 => {
                // A header-sized field: u32 or u64 at an offset in the first 4 KiB.
                let i = rng.below(n.min(4096) - 7);
                let v = U64S[rng.below(U64S.len())];
                if rng.below(2) == 0 {
                    b[i..i + 4].copy_from_slice(&(v as u32).to_le_bytes());
                } else {
                    b[i..i + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
            3 if n > 0 => {
                let i = rng.below(n);
                let len = rng.below((n - i).min(64)) + 1;
                b.drain(i..i + len);
            }
            4 if n > 0 => {
                let i = rng.below(n);
                let len = rng.below((n - i).min(64)) + 1;
                let chunk = b[i..i + len].to_vec();
                let at = rng.below(n + 1);
                b.splice(at..at, chunk);
            }
            5 if n > 0 => b.truncate(rng.below(n)),
            6 => {
                let at = rng.below(n + 1);
                let junk: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                b.splice(at..at, junk);
            }
            7 if n > 0 => {
                // Copy a chunk over another place.
                let i = rng.below(n);
                let j = rng.below(n);
                let len = rng.below((n - i.max(j)).min(32)) + 1;
                let chunk = b[i..i + len].to_vec();
                b[j..j + len].copy_from_slice(&chunk);
            }
            8 if n > 0 => {
                // Repeat a chunk many times (long values).
                let i = rng.below(n);
                let len = rng.below((n - i).min(16)) + 1;
                let chunk = b[i..i + len].repeat(1 + rng.below(2000));
                b.splice(i..i, chunk);
            }
            9 => {
                // Replace a number in the text by a boundary value.
                let starts: Vec<usize> = (0..n).filter(|&i| b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_digit())).collect();
                if !starts.is_empty() {
                    let s = starts[rng.below(starts.len())];
                    let mut e = s;
                    while e < n && (b[e].is_ascii_digit() || b[e] == b'.' || b[e] == b'e' || b[e] == b'-') {
                        e += 1;
                    }
                    b.splice(s..e, NUMBERS[rng.below(NUMBERS.len())].bytes());
                }
            }
            10 => {
                let at = rng.below(n + 1);
                b.splice(at..at, TOKENS[rng.below(TOKENS.len())].bytes());
            }
            _ => {}
        }
    }
    b
}

#[path = "../tests/support/fuzz_targets.rs"]
mod fuzz_targets;
use fuzz_targets::{targets, Target};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz")
}

/// The corpus file for a failing input of `parser` (seed slot `which`).
fn crash_path(parser: &str, which: usize, input: &[u8], kind: &str) -> PathBuf {
    let h = qlora_webgpu::io::sha256::hex(&qlora_webgpu::io::sha256::sha256(input));
    corpus_dir().join(parser).join(format!("{kind}-s{which}-{}.bin", &h[..16]))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--replay") {
        let (file, parser) = (&args[1], &args[2]);
        let which: usize = Path::new(file).file_name().and_then(|n| n.to_str()).and_then(|n| n.split("-s").nth(1)).and_then(|s| s.split('-').next()).and_then(|s| s.parse().ok()).unwrap_or(0);
        let t = targets().into_iter().find(|t| t.name == parser).expect("a parser name");
        let b = std::fs::read(file).unwrap();
        println!("{} -> {}", file, (t.run)(&b, which));
        return;
    }
    let which_parser = args.first().cloned().unwrap_or_else(|| "all".into());
    let seconds: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10.0);
    let seed: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    // An input that aborts the process is left in `<tmp>/qlora-fuzz-pending.<parser>`.
    let pending = std::env::temp_dir().join("qlora-fuzz-pending.x");

    // Watchdog: an execution over 10 s saves the input and aborts.
    static EXEC_START: AtomicU64 = AtomicU64::new(0);
    let t_origin = Instant::now();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        let s = EXEC_START.load(Ordering::Relaxed);
        if s != 0 && t_origin.elapsed().as_millis() as u64 - s > 10_000 {
            save_current("hang (>10 s)");
            std::process::abort();
        }
    });
    std::panic::set_hook(Box::new(|_| {}));

    let mut total = 0u64;
    let mut failures = 0u64;
    let targets = targets();
    let chosen: Vec<&Target> = targets.iter().filter(|t| which_parser == "all" || t.name == which_parser).collect();
    assert!(!chosen.is_empty(), "unknown parser {which_parser}");
    println!("{:<14} {:>10} {:>10} {:>8} {:>9} {:>12} {:>8}", "parser", "execs", "rejected", "accepted", "panics", "max alloc", "slowest");
    for t in chosen {
        // Each seed must be accepted, or the campaign would only exercise error paths.
        for (i, s) in t.seeds.iter().enumerate() {
            if !(t.run)(s, i) {
                eprintln!("{}: seed {i} is not accepted", t.name);
                std::process::exit(2);
            }
        }
        let mut rng = Rng(seed ^ qlora_webgpu::rng::mix64(t.name.len() as u64 * 977 + t.name.as_bytes()[0] as u64));
        let (mut n, mut ok, mut panics) = (0u64, 0u64, 0u64);
        let mut slowest = Duration::ZERO;
        ALLOC_MAX.store(0, Ordering::Relaxed);
        // Where an aborting input goes (scripts/fuzz.sh moves it into the corpus).
        *PENDING.lock().unwrap() = Some(std::fs::File::create(pending.with_extension(t.name)).unwrap());
        let t0 = Instant::now();
        while t0.elapsed().as_secs_f64() < seconds {
            let which = rng.below(t.seeds.len());
            let text = t.text && rng.below(4) != 0;
            let input = mutate(&mut rng, &t.seeds[which], text);
            CUR_PTR.store(input.as_ptr() as usize, Ordering::SeqCst);
            CUR_LEN.store(input.len(), Ordering::SeqCst);
            ALLOC_LIMIT.store((64 << 20) + 64 * input.len(), Ordering::Relaxed);
            let ts = Instant::now();
            EXEC_START.store(t_origin.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| (t.run)(&input, which)));
            EXEC_START.store(0, Ordering::Relaxed);
            ALLOC_LIMIT.store(0, Ordering::Relaxed);
            slowest = slowest.max(ts.elapsed());
            CUR_PTR.store(0, Ordering::SeqCst);
            n += 1;
            match r {
                Ok(true) => ok += 1,
                Ok(false) => {}
                Err(_) => {
                    panics += 1;
                    let p = crash_path(t.name, which, &input, "panic");
                    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                    std::fs::write(&p, &input).unwrap();
                    eprintln!("{}: panic, input saved to {}", t.name, p.display());
                }
            }
        }
        let _ = std::fs::remove_file(pending.with_extension(t.name));
        total += n;
        failures += panics;
        println!(
            "{:<14} {:>10} {:>10} {:>8} {:>9} {:>10.1}MiB {:>6.0}ms",
            t.name,
            n,
            n - ok,
            ok,
            panics,
            ALLOC_MAX.load(Ordering::Relaxed) as f64 / 1048576.0,
            slowest.as_secs_f64() * 1e3
        );
        let _ = std::io::stdout().flush();
    }
    println!("total {total} executions, {failures} panics (aborts and hangs would have stopped the run)");
    if failures > 0 {
        std::process::exit(1);
    }
}
