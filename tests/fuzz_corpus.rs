//! Replays every input the fuzzer (examples/fuzz.rs, scripts/fuzz.sh) ever found failing, kept
//! in tests/fixtures/fuzz/<parser>/, plus each parser's seeds: each must now run to a result
//! (accepted or refused with an error) without a panic. Cheap: a few hundred small inputs.

#[path = "common/gguf.rs"]
mod gguf;
#[path = "support/fuzz_targets.rs"]
mod fuzz_targets;

#[test]
fn fuzz_corpus_replays_without_panics() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz");
    let mut n = 0;
    for t in fuzz_targets::targets() {
        for (i, s) in t.seeds.iter().enumerate() {
            assert!((t.run)(s, i), "{}: seed {i} is refused", t.name);
        }
        let dir = root.join(t.name);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap().to_owned();
            // <kind>-s<seed slot>-<hash>.bin
            let which: usize = name.split("-s").nth(1).and_then(|s| s.split('-').next()).and_then(|s| s.parse().ok()).unwrap_or(0);
            let bytes = std::fs::read(&p).unwrap();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (t.run)(&bytes, which)));
            assert!(r.is_ok(), "{}: {} panics", t.name, p.display());
            n += 1;
        }
    }
    eprintln!("{n} corpus inputs replayed");
}
