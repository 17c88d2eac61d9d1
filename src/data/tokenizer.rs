//! Tokenizer over the `tokenizers` crate (no shader): loaded from tokenizer.json bytes, or built
//! from GGUF tokenizer metadata by writing the equivalent tokenizer.json and loading that with
//! the same crate, so both paths tokenize identically. Also an incremental decoder for streaming.
//!
//! The GGUF path follows what transformers' GGUF converter builds for `tokenizer.ggml.model =
//! "gpt2"` (byte-level BPE): the vocabulary is `tokens` by index, the merges are the `"a b"`
//! strings in rank order, control tokens (type 3) become special added tokens, the pre-tokenizer
//! is byte-level with GPT-2's split regex and no prefix space, the decoder is byte-level. For the
//! SmolLM2 GGUF (`pre = "smollm"`) this gives a tokenizer.json equal to the one transformers saves
//! (checked in tests/tokenizer.rs).

use crate::{Error, Result};
use serde_json::{json, Map, Value};

/// Ids of the special tokens a model uses (each may be absent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialTokenIds {
    /// Beginning of sequence.
    pub bos: Option<u32>,
    /// End of sequence (end of turn for chat models).
    pub eos: Option<u32>,
    /// Unknown token.
    pub unk: Option<u32>,
    /// Padding.
    pub pad: Option<u32>,
}

/// The tokenizer metadata of a GGUF file, as plain values (`io::gguf`'s reader fills it from
/// `tokenizer.ggml.*` and `tokenizer.chat_template`); [`GgufTokenizer::build`] makes the
/// tokenizer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufTokenizer {
    /// `tokenizer.ggml.model`; only `"gpt2"` (byte-level BPE) is supported.
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer's name (`"smollm"`, `"gpt2"`, `"default"`,
    /// `"llama-bpe"`); `None` is read as `"default"`.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: token strings by id (byte-level encoded, `Ġ` for a space).
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type` by id: 1 normal, 2 unknown, 3 control, 4 user-defined,
    /// 5 unused, 6 byte. Empty means all normal.
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.scores`, empty when absent (SentencePiece models; not used by BPE).
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.merges`: `"left right"` strings in merge-rank order.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`: `encode(text, true)` prepends bos (absent: false).
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

impl GgufTokenizer {
    /// The tokenizer these fields describe (byte-level BPE rebuilt as the equivalent
    /// tokenizer.json): [`Tokenizer::from_gguf`].
    pub fn build(&self) -> Result<Tokenizer> {
        Tokenizer::from_gguf(self)
    }
}

/// GPT-2's split regex, as the `tokenizers` ByteLevel pre-tokenizer applies it with
/// `use_regex = true` (recorded here for documentation; the crate carries its own copy).
pub const GPT2_SPLIT_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Llama 3's split regex (`pre = "llama-bpe"`): digits in groups of at most three.
pub const LLAMA3_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const GGUF_FILE: &str = "GGUF tokenizer metadata";

/// A text tokenizer: encode text to ids and decode ids to text, plus the model's special ids.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokenIds,
    /// Number of ids (cached: the crate recounts its whole vocabulary on every call).
    vocab_size: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

fn tok_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("tokenizer: {what}: {e}"))
}

/// The `content` of a special-token entry of tokenizer_config.json: a plain string or an
/// AddedToken object `{"content": ...}`.
fn token_content(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads a tokenizer.json (the `tokenizers` crate's format). Special ids are not part of that
    /// file: they are left empty (see [`Tokenizer::from_hf_files`] and
    /// [`Tokenizer::with_special_ids`]).
    pub fn from_json_bytes(tokenizer_json: &[u8]) -> Result<Self> {
        // The tokenizers crate panics on some malformed files (an `expect` in its decoder
        // deserialization, found by fuzzing): turn that into an error (native; on wasm a panic
        // aborts, as everywhere there).
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(tokenizer_json))
            .map_err(|p| {
                let why = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                Error::format("tokenizer.json", format!("malformed (the tokenizers library failed: {})", crate::error::quote(&why)))
            })?;
        let inner = parsed.map_err(|e| Error::format("tokenizer.json", crate::error::quote(&e.to_string())))?;
        Ok(Self::wrap(inner, SpecialTokenIds::default()))
    }

    fn wrap(inner: tokenizers::Tokenizer, special: SpecialTokenIds) -> Self {
        let added_end = inner.get_added_tokens_decoder().keys().map(|&id| id as usize + 1).max().unwrap_or(0);
        let vocab_size = inner.get_vocab_size(false).max(added_end);
        Self { inner, special, vocab_size }
    }

    /// Loads tokenizer.json and takes the special tokens (`bos_token`, `eos_token`, `unk_token`,
    /// `pad_token`, each a string or `{"content": ...}`) from tokenizer_config.json when given.
    /// A named token missing from the vocabulary is an error.
    pub fn from_hf_files(tokenizer_json: &[u8], tokenizer_config: Option<&[u8]>) -> Result<Self> {
        let mut tok = Self::from_json_bytes(tokenizer_json)?;
        if let Some(cfg) = tokenizer_config {
            let cfg: Value = serde_json::from_slice(cfg)
                .map_err(|e| Error::format("tokenizer_config.json", e.to_string()))?;
            let id_of = |key: &str| -> Result<Option<u32>> {
                let given = cfg.get(key).filter(|v| !v.is_null());
                if let Some(v) = given.filter(|v| token_content(v).is_none()) {
                    return Err(Error::format(
                        "tokenizer_config.json",
                        format!(
                            "field `{key}`: {} is not a token (a string or {{\"content\": \"...\"}})",
                            crate::error::quote(&v.to_string())
                        ),
                    ));
                }
                match given.and_then(token_content) {
                    None => Ok(None),
                    Some(s) => tok.token_to_id(s).map(Some).ok_or_else(|| {
                        Error::format(
                            "tokenizer_config.json",
                            format!("{key} {s:?} is not in the tokenizer's vocabulary"),
                        )
                    }),
                }
            };
            tok.special = SpecialTokenIds {
                bos: id_of("bos_token")?,
                eos: id_of("eos_token")?,
                unk: id_of("unk_token")?,
                pad: id_of("pad_token")?,
            };
        }
        Ok(tok)
    }

    /// Builds the tokenizer a GGUF file describes (see [`Tokenizer::gguf_tokenizer_json`]).
    pub fn from_gguf(spec: &GgufTokenizer) -> Result<Self> {
        let json = Self::gguf_tokenizer_json(spec)?;
        let bytes = serde_json::to_vec(&json).map_err(|e| Error::format(GGUF_FILE, e.to_string()))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::format(GGUF_FILE, format!("building the tokenizer: {e}")))?;
        let special = SpecialTokenIds { bos: spec.bos, eos: spec.eos, unk: spec.unk, pad: spec.pad };
        Ok(Self::wrap(inner, special))
    }

    /// The tokenizer.json equivalent to GGUF tokenizer metadata: model BPE (vocab = tokens by
    /// id, merges as `[left, right]` pairs split at the first space after the first byte, as
    /// llama.cpp splits them), `added_tokens` for control (type 3) and unknown-type (2) tokens
    /// and for the bos/eos/unk/pad tokens (special, not normalized), user-defined tokens (type 4)
    /// as non-special added tokens (matched whole in text and kept when decoding, as llama.cpp
    /// treats them), the pre-tokenizer named by `pre`, a byte-level decoder, and a post-processor
    /// that prepends bos when `add_bos`.
    ///
    /// `pre`: `"smollm"`, `"gpt2"`, `"default"` or none: byte-level with GPT-2's regex, no prefix
    /// space (what transformers builds for every `gpt2` GGUF; llama.cpp additionally splits
    /// single digits for `"smollm"`, transformers does not, and we follow transformers);
    /// `"llama-bpe"`: Llama 3's split regex, then byte-level without regex (Llama 3's own
    /// tokenizer.json). Other names are an error.
    pub fn gguf_tokenizer_json(spec: &GgufTokenizer) -> Result<Value> {
        if spec.model != "gpt2" {
            return Err(Error::format(
                GGUF_FILE,
                format!(
                    "tokenizer.ggml.model {:?} is not supported (only \"gpt2\", byte-level BPE)",
                    spec.model
                ),
            ));
        }
        let n = spec.tokens.len();
        if n == 0 {
            return Err(Error::format(GGUF_FILE, "tokenizer.ggml.tokens is empty"));
        }
        if !spec.token_types.is_empty() && spec.token_types.len() != n {
            return Err(Error::format(
                GGUF_FILE,
                format!("tokenizer.ggml.token_type has {} entries for {n} tokens", spec.token_types.len()),
            ));
        }
        for (name, id) in [("bos", spec.bos), ("eos", spec.eos), ("unk", spec.unk), ("pad", spec.pad)] {
            if let Some(id) = id {
                if id as usize >= n {
                    return Err(Error::format(
                        GGUF_FILE,
                        format!("{name} token id {id} is outside the vocabulary of {n}"),
                    ));
                }
            }
        }

        // Vocabulary: a later duplicate string wins, as in transformers' `{word: i}`.
        let mut vocab = Map::with_capacity(n);
        for (i, t) in spec.tokens.iter().enumerate() {
            vocab.insert(t.clone(), json!(i));
        }
        let mut merges = Vec::with_capacity(spec.merges.len());
        for (rank, m) in spec.merges.iter().enumerate() {
            let split = m.char_indices().skip(1).find(|&(_, c)| c == ' ').map(|(i, _)| i);
            match split {
                Some(i) if i + 1 < m.len() => merges.push(json!([&m[..i], &m[i + 1..]])),
                _ => {
                    return Err(Error::format(
                        GGUF_FILE,
                        format!("tokenizer.ggml.merges[{rank}] = {m:?} is not \"left right\""),
                    ))
                }
            }
        }

        let special_id = |i: usize| [spec.bos, spec.eos, spec.unk, spec.pad].contains(&Some(i as u32));
        let mut added = Vec::new();
        for (i, t) in spec.tokens.iter().enumerate() {
            let ty = spec.token_types.get(i).copied().unwrap_or(1);
            let special = ty == 2 || ty == 3 || special_id(i);
            if special || ty == 4 {
                added.push(json!({
                    "id": i, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": special,
                }));
            }
        }

        let pre = spec.pre.as_deref().unwrap_or("default");
        let pre_tokenizer = match pre {
            "smollm" | "gpt2" | "default" => json!({
                "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true,
            }),
            "llama-bpe" | "llama3" => json!({
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT_REGEX},
                     "behavior": "Isolated", "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                     "use_regex": false},
                ],
            }),
            other => {
                return Err(Error::format(
                    GGUF_FILE,
                    format!(
                        "tokenizer.ggml.pre {other:?} is not supported (known: smollm, gpt2, \
                         default, llama-bpe)"
                    ),
                ))
            }
        };

        let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
        let post_processor = match (spec.add_bos.unwrap_or(false), spec.bos) {
            (true, Some(bos)) => {
                let bos_s = &spec.tokens[bos as usize];
                let bos_t = |type_id: u32| json!({"SpecialToken": {"id": bos_s, "type_id": type_id}});
                json!({
                    "type": "TemplateProcessing",
                    "single": [bos_t(0), seq("A", 0)],
                    "pair": [bos_t(0), seq("A", 0), seq("B", 1)],
                    "special_tokens": {bos_s.as_str(): {"id": bos_s, "ids": [bos], "tokens": [bos_s]}},
                })
            }
            (true, None) => {
                return Err(Error::format(
                    GGUF_FILE,
                    "tokenizer.ggml.add_bos_token is true but there is no bos_token_id",
                ))
            }
            (false, _) => json!({
                "type": "TemplateProcessing",
                "single": [seq("A", 0)],
                "pair": [seq("A", 0), seq("B", 1)],
                "special_tokens": {},
            }),
        };

        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": false, "vocab": vocab, "merges": merges,
            },
        }))
    }

    /// Replaces the special ids (for a tokenizer.json loaded without its config).
    pub fn with_special_ids(mut self, special: SpecialTokenIds) -> Self {
        self.special = special;
        self
    }

    /// Text -> ids. `add_special_tokens` applies the tokenizer's post-processor (for example a
    /// leading bos); special tokens written in the text (`<|im_start|>`) are always matched whole.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, add_special_tokens).map_err(|e| tok_err("encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids -> text; `skip_special` drops special tokens. Byte sequences that are not complete
    /// UTF-8 come out as U+FFFD. An id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.check_ids(ids)?;
        self.inner.decode(ids, skip_special).map_err(|e| tok_err("decode", e))
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let n = self.vocab_size();
        match ids.iter().find(|&&id| id as usize >= n) {
            Some(id) => {
                Err(Error::Invalid(format!("tokenizer: token id {id} is outside the vocabulary of {n}")))
            }
            None => Ok(()),
        }
    }

    /// A decoder that turns ids fed one at a time into text pieces (see [`IncrementalDecoder`]).
    pub fn incremental_decoder(&self, skip_special: bool) -> IncrementalDecoder {
        IncrementalDecoder::new(skip_special)
    }

    /// The id of a token string (vocabulary or added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id (byte-level encoded for BPE vocabularies: `Ġ` for a space).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids, added tokens included (one past the largest id).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The special ids (bos, eos, unk, pad).
    pub fn special_ids(&self) -> SpecialTokenIds {
        self.special
    }

    /// Beginning-of-sequence id.
    pub fn bos_id(&self) -> Option<u32> {
        self.special.bos
    }

    /// End-of-sequence id.
    pub fn eos_id(&self) -> Option<u32> {
        self.special.eos
    }

    /// Unknown-token id.
    pub fn unk_id(&self) -> Option<u32> {
        self.special.unk
    }

    /// Padding id.
    pub fn pad_id(&self) -> Option<u32> {
        self.special.pad
    }

    /// The token string of a special id, if set (for chat templates' `bos_token`/`eos_token`).
    pub fn special_token(&self, id: Option<u32>) -> Option<String> {
        id.and_then(|i| self.id_to_token(i))
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Streaming decoder: feed ids one at a time, get text as soon as it is complete UTF-8.
///
/// It keeps a short window of ids: `prefix` = ids already turned into text and kept as context,
/// the rest not yet printed. Each step decodes the window; when that text is longer than the
/// prefix's text and does not end in U+FFFD (an unfinished multi-byte character), the new part
/// is returned and the window moves on. The pieces concatenate to `decode(all ids)`.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Ids `[0, read)` of the window are printed; `[0, read)` decode to `prefix_text`.
    read: usize,
    prefix_text: String,
    skip_special: bool,
}

impl IncrementalDecoder {
    /// A fresh decoder; `skip_special` drops special tokens from the text.
    pub fn new(skip_special: bool) -> Self {
        Self { ids: Vec::new(), read: 0, prefix_text: String::new(), skip_special }
    }

    /// Feeds one id; returns the newly completed text, if any.
    pub fn step(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        tok.check_ids(&[id])?;
        self.ids.push(id);
        let text = tok.decode(&self.ids, self.skip_special)?;
        if text.len() > self.prefix_text.len() && !text.ends_with('\u{FFFD}') {
            let piece = self.take_new(&text)?;
            // Keep the last printed ids as the new prefix (context for decoders that look at
            // neighbours); byte-level decoding needs none, so the window stays short.
            self.ids.drain(..self.read);
            self.read = self.ids.len();
            self.prefix_text = tok.decode(&self.ids, self.skip_special)?;
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Returns whatever is held back (an unfinished character decodes to U+FFFD) and resets.
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<Option<String>> {
        let text = tok.decode(&self.ids, self.skip_special)?;
        let piece = if text.len() > self.prefix_text.len() { Some(self.take_new(&text)?) } else { None };
        self.ids.clear();
        self.read = 0;
        self.prefix_text.clear();
        Ok(piece)
    }

    fn take_new(&self, text: &str) -> Result<String> {
        match text.strip_prefix(self.prefix_text.as_str()) {
            Some(rest) => Ok(rest.to_string()),
            None => Err(Error::Invalid(format!(
                "incremental decoding: the text of the window {:?} does not extend the text {:?} \
                 already printed",
                text, self.prefix_text
            ))),
        }
    }
}
