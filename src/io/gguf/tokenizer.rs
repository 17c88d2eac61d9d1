//! A GGUF model's tokenizer metadata (tokenizer.ggml.*, tokenizer.chat_template), read into
//! `data::tokenizer::GgufTokenizer`, which builds the library's tokenizer.

use std::collections::BTreeMap;

use super::file::GgufValue;
use super::llama::GgufModel;
use super::stream::StreamedGguf;
use crate::data::tokenizer::GgufTokenizer;
use crate::{Error, Result};

impl GgufModel {
    /// The tokenizer metadata; `file` names the file in errors (a key of the wrong type).
    pub fn tokenizer(&self, file: &str) -> Result<GgufTokenizer> {
        tokenizer_of(&self.metadata, file)
    }
}

impl StreamedGguf {
    /// The tokenizer metadata, as [`GgufModel::tokenizer`].
    pub fn tokenizer(&self, file: &str) -> Result<GgufTokenizer> {
        tokenizer_of(&self.metadata, file)
    }
}

fn tokenizer_of(metadata: &BTreeMap<String, GgufValue>, file: &str) -> Result<GgufTokenizer> {
    let bad = |k: &str, what: &str| Error::format(file, format!("metadata `{k}`: expected {what}"));
    let string = |k: &str| -> Result<Option<String>> {
        metadata.get(k)
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| bad(k, "a string")))
            .transpose()
    };
    let strings = |k: &str| -> Result<Vec<String>> {
        match metadata.get(k) {
            None => Ok(Vec::new()),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>())
                .ok_or_else(|| bad(k, "an array of strings")),
        }
    };
    let id = |k: &str| -> Result<Option<u32>> {
        metadata.get(k)
            .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| bad(k, "a token id")))
            .transpose()
    };
    let flag = |k: &str| -> Result<Option<bool>> {
        metadata.get(k).map(|v| v.as_bool().ok_or_else(|| bad(k, "a bool"))).transpose()
    };
    let token_types = match metadata.get("tokenizer.ggml.token_type") {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_i64().and_then(|t| i32::try_from(t).ok())).collect::<Option<Vec<_>>>())
            .ok_or_else(|| bad("tokenizer.ggml.token_type", "an array of integers"))?,
    };
    let scores = match metadata.get("tokenizer.ggml.scores") {
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
