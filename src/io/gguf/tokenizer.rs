//! A GGUF model's tokenizer metadata (tokenizer.ggml.*, tokenizer.chat_template), read into
//! [`GgufTokenizer`] and built into the library's tokenizer.

use super::llama::GgufModel;
use crate::{Error, Result};

/// The tokenizer.ggml.* metadata of a GGUF model, for building a tokenizer.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTokenizer {
    /// `tokenizer.ggml.model` ("gpt2" for byte-level BPE, "llama" for SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre` (the pre-tokenizer, e.g. "smollm").
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type` (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    /// 6 byte), empty when absent.
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.scores`, empty when absent.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.merges` ("a b" pairs, by rank), empty when absent.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

impl GgufTokenizer {
    /// The tokenizer these fields describe (byte-level BPE rebuilt as the equivalent
    /// tokenizer.json, see `data::tokenizer`).
    pub fn build(&self) -> Result<crate::data::tokenizer::Tokenizer> {
        crate::data::tokenizer::Tokenizer::from_gguf(&crate::data::tokenizer::GgufTokenizerSpec {
            model: self.model.clone(),
            pre: self.pre.clone(),
            tokens: self.tokens.clone(),
            token_types: self.token_types.clone(),
            merges: self.merges.clone(),
            bos: self.bos,
            eos: self.eos,
            unk: self.unk,
            pad: self.pad,
            add_bos: self.add_bos.unwrap_or(false),
        })
    }
}

impl GgufModel {
    /// The tokenizer metadata; `file` names the file in errors (a key of the wrong type).
    pub fn tokenizer(&self, file: &str) -> Result<GgufTokenizer> {
        let bad = |k: &str, what: &str| Error::format(file, format!("metadata `{k}`: expected {what}"));
        let string = |k: &str| -> Result<Option<String>> {
            self.get(k)
                .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| bad(k, "a string")))
                .transpose()
        };
        let strings = |k: &str| -> Result<Vec<String>> {
            match self.get(k) {
                None => Ok(Vec::new()),
                Some(v) => v
                    .as_array()
                    .and_then(|a| a.iter().map(|x| x.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| bad(k, "an array of strings")),
            }
        };
        let id = |k: &str| -> Result<Option<u32>> {
            self.get(k)
                .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| bad(k, "a token id")))
                .transpose()
        };
        let flag = |k: &str| -> Result<Option<bool>> {
            self.get(k).map(|v| v.as_bool().ok_or_else(|| bad(k, "a bool"))).transpose()
        };
        let token_types = match self.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_i64().and_then(|t| i32::try_from(t).ok())).collect::<Option<Vec<_>>>())
                .ok_or_else(|| bad("tokenizer.ggml.token_type", "an array of integers"))?,
        };
        let scores = match self.get("tokenizer.ggml.scores") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_f64().map(|f| f as f32)).collect::<Option<Vec<_>>>())
                .ok_or_else(|| bad("tokenizer.ggml.scores", "an array of numbers"))?,
        };
        Ok(GgufTokenizer {
            model: string("tokenizer.ggml.model")?.ok_or_else(|| Error::format(file, "missing metadata `tokenizer.ggml.model`"))?,
            pre: string("tokenizer.ggml.pre")?,
            tokens: strings("tokenizer.ggml.tokens")?,
            token_types,
            scores,
            merges: strings("tokenizer.ggml.merges")?,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            add_bos: flag("tokenizer.ggml.add_bos_token")?,
            add_eos: flag("tokenizer.ggml.add_eos_token")?,
            chat_template: string("tokenizer.chat_template")?,
        })
    }
}
