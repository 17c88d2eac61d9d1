//! Tokenizer tests: the fixture tokenizer.json (SmolLM2's, as transformers extracts it from the
//! GGUF) against ids saved by transformers (tests/fixtures/tokenizer_ref.json), round trips,
//! incremental decoding, and the GGUF-metadata path built from the same vocabulary and merges.

use qlora_webgpu::data::{GgufTokenizer, SpecialTokenIds, Tokenizer};
use serde_json::Value;
use std::sync::OnceLock;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{rel}")).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn tokenizer_json() -> &'static Value {
    static J: OnceLock<Value> = OnceLock::new();
    J.get_or_init(|| serde_json::from_slice(&read("tiny-llama/model/tokenizer.json")).unwrap())
}

fn hf() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        Tokenizer::from_hf_files(
            &read("tiny-llama/model/tokenizer.json"),
            Some(&read("tiny-llama/model/tokenizer_config.json")),
        )
        .unwrap()
    })
}

fn reference() -> &'static Value {
    static R: OnceLock<Value> = OnceLock::new();
    R.get_or_init(|| serde_json::from_slice(&read("tokenizer_ref.json")).unwrap())
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The GGUF metadata of the fixture tokenizer, as a GGUF carries it: tokens by id, merges as
/// "a b" strings, type 3 for the special added tokens, 1 for the rest.
fn gguf_spec(pre: &str) -> GgufTokenizer {
    let j = tokenizer_json();
    let vocab = j["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let mut token_types = vec![1; tokens.len()];
    for a in j["added_tokens"].as_array().unwrap() {
        assert!(a["special"].as_bool().unwrap());
        token_types[a["id"].as_u64().unwrap() as usize] = 3;
    }
    let merges = j["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap()))
        .collect();
    GgufTokenizer {
        model: "gpt2".into(),
        pre: Some(pre.into()),
        tokens,
        token_types,
        merges,
        bos: Some(1),
        eos: Some(2),
        unk: Some(0),
        pad: Some(2),
        add_bos: Some(false),
        ..Default::default()
    }
}

fn gguf() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::from_gguf(&gguf_spec("smollm")).unwrap())
}

const ASSORTED: &[&str] = &[
    "",
    " ",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\nmore",
    "Digits: 0 1 12 123 1234 12345 3.14159 -42 1e-5 2024-06-01",
    "unicode: naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어, עברית, العربية",
    "emoji: 🦀🚀 👩‍👩‍👧‍👦 🇫🇷 ✅ ❤️",
    "code: fn main() { println!(\"{}\", x >> 2); } // ok?",
    "contractions: I'm, you're, it's, we'll, they'd, don't",
    "<|im_start|>user\nHi<|im_end|>\n",
    "mixed<|endoftext|>special<repo_name>tokens",
    "\u{0}\u{1}\u{7f} control bytes",
];

#[test]
fn encodes_dev_texts_to_reference_ids() {
    let tok = hf();
    for case in reference()["dev"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids_prefix"]);
        let got = tok.encode(text, false).unwrap();
        if case["truncated"].as_bool().unwrap() {
            assert!(got.len() >= want.len(), "{text:?}: {} ids < {}", got.len(), want.len());
            assert_eq!(&got[..want.len()], &want[..], "{text:?}");
        } else {
            assert_eq!(got, want, "{text:?}");
        }
    }
}

#[test]
fn encodes_chat_prompt_and_paragraph_to_reference_ids() {
    let tok = hf();
    let r = reference();
    let chat = tok.encode(r["chat"]["templated_text"].as_str().unwrap(), false).unwrap();
    assert_eq!(chat, ids(&r["chat"]["prompt_ids"]));
    assert!(!r["paragraph"]["add_special_tokens"].as_bool().unwrap());
    let para = tok.encode(r["paragraph"]["text"].as_str().unwrap(), false).unwrap();
    assert_eq!(para, ids(&r["paragraph"]["ids"]));
    assert_eq!(para.len(), 190);
}

#[test]
fn special_ids_and_vocab() {
    let tok = hf();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.special_ids(), SpecialTokenIds { bos: Some(1), eos: Some(2), unk: Some(0), pad: Some(2) });
    let r = &reference()["special_tokens"];
    for k in ["bos", "eos", "pad", "unk"] {
        let name = r[k][0].as_str().unwrap();
        let id = r[k][1].as_u64().unwrap() as u32;
        assert_eq!(tok.token_to_id(name), Some(id));
        assert_eq!(tok.id_to_token(id).as_deref(), Some(name));
    }
    assert_eq!(tok.id_to_token(260).as_deref(), Some("Ġthe"));
    assert_eq!(tok.token_to_id("Ġthe"), Some(260));
    assert_eq!(tok.id_to_token(49152), None);
    // This tokenizer adds nothing for add_special_tokens (transformers' GGUF config: no bos).
    assert_eq!(tok.encode("Hi", true).unwrap(), tok.encode("Hi", false).unwrap());
    assert!(tok.decode(&[49152], false).is_err());
}

#[test]
fn decode_inverts_encode() {
    let tok = hf();
    for text in ASSORTED.iter().copied().chain([reference()["paragraph"]["text"].as_str().unwrap()]) {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "{ids:?}");
    }
    // Special tokens are single ids, dropped by skip_special.
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi");
}

#[test]
fn incremental_decoding_matches_full_decode() {
    let tok = hf();
    for text in ASSORTED {
        for skip in [false, true] {
            let ids = tok.encode(text, false).unwrap();
            let mut dec = tok.incremental_decoder(skip);
            let mut pieces = Vec::new();
            for &id in &ids {
                if let Some(p) = dec.step(tok, id).unwrap() {
                    assert!(!p.is_empty() && !p.ends_with('\u{FFFD}'), "{p:?}");
                    pieces.push(p);
                }
            }
            if let Some(p) = dec.flush(tok).unwrap() {
                pieces.push(p);
            }
            assert_eq!(pieces.concat(), tok.decode(&ids, skip).unwrap(), "{text:?}");
        }
    }
}

#[test]
fn incremental_decoding_waits_for_complete_characters() {
    let tok = hf();
    // "🦀" is four bytes; fed as single byte tokens it must come out whole, once.
    let byte_ids: Vec<u32> = "🦀"
        .bytes()
        .map(|b| {
            let ch = byte_level_char(b);
            tok.token_to_id(&ch.to_string()).unwrap()
        })
        .collect();
    let mut dec = tok.incremental_decoder(false);
    let outs: Vec<Option<String>> = byte_ids.iter().map(|&id| dec.step(tok, id).unwrap()).collect();
    assert_eq!(outs, vec![None, None, None, Some("🦀".to_string())]);
    assert_eq!(dec.flush(tok).unwrap(), None);
    // An unfinished character at the end comes out of flush as U+FFFD.
    let mut dec = tok.incremental_decoder(false);
    assert_eq!(dec.step(tok, byte_ids[0]).unwrap(), None);
    assert_eq!(dec.flush(tok).unwrap().as_deref(), Some("\u{FFFD}"));
}

/// GPT-2's byte -> printable character map (bytes that are printable Latin-1 map to themselves,
/// the others to U+0100 upwards in order).
fn byte_level_char(b: u8) -> char {
    let printable =
        |x: u8| (b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || (0xAE..=0xFF).contains(&x);
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

#[test]
fn gguf_spec_builds_the_same_tokenizer_json() {
    // transformers saved this tokenizer.json from the SmolLM2 GGUF; our conversion of the same
    // metadata must give the same document.
    let built = Tokenizer::gguf_tokenizer_json(&gguf_spec("smollm")).unwrap();
    let want = tokenizer_json();
    for key in [
        "version",
        "truncation",
        "padding",
        "added_tokens",
        "normalizer",
        "pre_tokenizer",
        "post_processor",
        "decoder",
    ] {
        assert_eq!(built[key], want[key], "{key}");
    }
    for key in want["model"].as_object().unwrap().keys() {
        assert_eq!(built["model"][key], want["model"][key], "model.{key}");
    }
    assert_eq!(&built, want);
}

#[test]
fn gguf_spec_encodes_like_tokenizer_json() {
    let (a, b) = (hf(), gguf());
    assert_eq!(b.vocab_size(), a.vocab_size());
    assert_eq!(b.special_ids(), a.special_ids());
    let r = reference();
    let mut texts: Vec<&str> = ASSORTED.to_vec();
    texts.push(r["chat"]["templated_text"].as_str().unwrap());
    texts.push(r["paragraph"]["text"].as_str().unwrap());
    for c in r["dev"].as_array().unwrap() {
        texts.push(c["text"].as_str().unwrap());
    }
    for t in texts {
        let ia = a.encode(t, false).unwrap();
        assert_eq!(b.encode(t, false).unwrap(), ia, "{t:?}");
        assert_eq!(b.encode(t, true).unwrap(), a.encode(t, true).unwrap(), "{t:?}");
        assert_eq!(b.decode(&ia, false).unwrap(), a.decode(&ia, false).unwrap());
        assert_eq!(b.decode(&ia, true).unwrap(), a.decode(&ia, true).unwrap());
    }
    assert_eq!(
        b.encode(r["chat"]["templated_text"].as_str().unwrap(), false).unwrap(),
        ids(&r["chat"]["prompt_ids"])
    );
}

#[test]
fn gguf_add_bos_prepends_bos() {
    let mut spec = gguf_spec("smollm");
    spec.add_bos = Some(true);
    let tok = Tokenizer::from_gguf(&spec).unwrap();
    let plain = tok.encode("Hello", false).unwrap();
    let with = tok.encode("Hello", true).unwrap();
    assert_eq!(with[0], 1);
    assert_eq!(&with[1..], &plain[..]);
}

#[test]
fn gguf_llama_bpe_splits_digits_in_threes() {
    // Same vocabulary, Llama 3's pre-tokenizer: "12345" is split as "123" + "45", and a
    // letter run keeps a leading non-letter.
    let tok = Tokenizer::from_gguf(&gguf_spec("llama-bpe")).unwrap();
    let smol = hf();
    let want: Vec<u32> = [smol.encode("123", false).unwrap(), smol.encode("45", false).unwrap()].concat();
    assert_eq!(tok.encode("12345", false).unwrap(), want);
    let text = "Hello world, it's 2024!";
    assert_eq!(tok.decode(&tok.encode(text, false).unwrap(), false).unwrap(), text);
    let r = reference();
    let t = r["chat"]["templated_text"].as_str().unwrap();
    assert_eq!(tok.decode(&tok.encode(t, false).unwrap(), false).unwrap(), t);
}

#[test]
fn gguf_spec_errors() {
    let mut s = gguf_spec("smollm");
    s.model = "llama".into();
    assert!(Tokenizer::from_gguf(&s).is_err());
    let mut s = gguf_spec("unknown-pre");
    assert!(Tokenizer::from_gguf(&s).is_err());
    s.pre = Some("smollm".into());
    s.merges[5] = "nospace".into();
    assert!(Tokenizer::from_gguf(&s).is_err());
    let mut s = gguf_spec("smollm");
    s.token_types.pop();
    assert!(Tokenizer::from_gguf(&s).is_err());
    let mut s = gguf_spec("smollm");
    s.eos = Some(49152);
    assert!(Tokenizer::from_gguf(&s).is_err());
}
