//! Examples encoded: tokens and the labels that say which tokens the loss counts.
//!
//! Each example is one string tokenized at once (so the tokens are those the tokenizer gives the
//! whole text, as transformers' and TRL's trainers tokenize), with byte offsets; a token is
//! counted (label = its id) when its bytes overlap a counted span of the text, otherwise its
//! label is -100. A token that straddles a span boundary (a prompt ending in the middle of a
//! word) is counted.
//! - text and prompt/completion: tokenized with `add_special_tokens = true`, so the tokenizer's
//!   post-processor adds the bos it wants (Llama 2/3 add one; SmolLM2 adds none); then, when
//!   [`EncodeOptions::append_eos`] is on (the default) and the text does not already end in it,
//!   the eos id is appended and counted, so the model learns to stop.
//! - chat: tokenized with `add_special_tokens = false`, because templates write their own bos
//!   (as transformers' `apply_chat_template` does). The assistant spans are found by rendering
//!   prefixes of the conversation: for assistant message i, `G` = render(messages[..i],
//!   add_generation_prompt = true) and `Q` = render(messages[..=i]); the span starts at the end
//!   of `G` (or, when `G` is not a prefix of `Q`, where the content is found in `Q` after the
//!   common prefix) and runs over the content, then over what the template writes after it up to
//!   and including its last special token (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3,
//!   `</s>`; the newline after `<|im_end|>` is not counted); when that suffix has no special
//!   token, the whole suffix is counted. No eos is appended: the template's end of turn is what
//!   the model learns to stop on.
//!   Limits: each `Q` must be a prefix of the full render (templates that rewrite earlier turns
//!   once later ones exist, such as those dropping past reasoning, are refused with an error;
//!   `train_on_prompt` still works with them); a template that changes the content (trims it)
//!   is handled when the trimmed content appears verbatim; a conversation without an assistant
//!   message is an error unless `train_on_prompt`.
//! - [`EncodeOptions::train_on_prompt`] counts every token of every format.
//! - Truncation: an example longer than [`EncodeOptions::max_len`] keeps its first `max_len`
//!   tokens (so a truncated example loses its final eos / end of turn).

use crate::data::chat::{ChatContext, ChatTemplate, Message};
use crate::data::tokenizer::Tokenizer;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::ops::Range;
use super::*;

/// The label of a token the loss ignores (PyTorch's `ignore_index`).
pub const IGNORE: i32 = -100;

/// How [`Encoder`] turns records into examples.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodeOptions {
    /// Longest example in tokens; longer ones keep their first `max_len` tokens. At least 2.
    pub max_len: usize,
    /// Count the loss on every token (prompts, user and system turns included), not only on
    /// completions and assistant turns. Default false.
    pub train_on_prompt: bool,
    /// Append the tokenizer's eos to text and prompt/completion examples (and Alpaca without a
    /// chat template) unless the text already ends with it. Default true.
    pub append_eos: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions { max_len: 2048, train_on_prompt: false, append_eos: true }
    }
}

/// One tokenized example: `ids` (T) and `labels` (T), label = id where the loss counts, -100
/// elsewhere. Labels are not shifted (as transformers' `labels`); [`collate`] shifts them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// Token ids (T).
    pub ids: Vec<u32>,
    /// Labels (T): the id, or -100.
    pub labels: Vec<i32>,
}

impl Example {
    /// Number of tokens the loss scores: labels != -100 at positions >= 1 (the first token is
    /// never predicted).
    pub fn n_counted(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE).count()
    }
}

/// What [`Encoder`] tokenizes: one text, whether the tokenizer adds its special tokens, and the
/// byte spans the loss covers (`None`: all of it).
struct Layout {
    text: String,
    add_special_tokens: bool,
    counted: Option<Vec<Range<usize>>>,
    append_eos: bool,
}

/// Tokenizes records: the tokenizer, the chat template (if the model has one), the variables
/// the template sees, and the options.
#[derive(Clone, Debug)]
pub struct Encoder<'a> {
    tokenizer: &'a Tokenizer,
    template: Option<&'a ChatTemplate>,
    chat_ctx: ChatContext,
    opts: EncodeOptions,
    special: HashSet<u32>,
}

impl<'a> Encoder<'a> {
    /// An encoder; the template sees bos/eos/unk/pad from the tokenizer
    /// ([`ChatContext::from_tokenizer`]). `max_len` < 2 is an error.
    pub fn new(tokenizer: &'a Tokenizer, template: Option<&'a ChatTemplate>, opts: EncodeOptions) -> Result<Self> {
        if opts.max_len < 2 {
            return Err(Error::Invalid(format!("max_len {} must be at least 2", opts.max_len)));
        }
        let mut special: HashSet<u32> =
            tokenizer.inner().get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(&id, _)| id).collect();
        special.extend(tokenizer.eos_id());
        Ok(Encoder { tokenizer, template, chat_ctx: ChatContext::from_tokenizer(tokenizer), opts, special })
    }

    /// Replaces the variables the chat template sees (e.g. from tokenizer_config.json).
    pub fn with_chat_context(mut self, ctx: ChatContext) -> Self {
        self.chat_ctx = ctx;
        self
    }

    /// The options.
    pub fn options(&self) -> EncodeOptions {
        self.opts
    }

    /// Tokenizes one record into an example (see the module docs).
    pub fn encode(&self, rec: &Record) -> Result<Example> {
        self.encode_record(rec).map(|(ex, _)| ex)
    }

    /// The example and whether it was truncated.
    pub(super) fn encode_record(&self, rec: &Record) -> Result<(Example, bool)> {
        let layout = self.layout(rec)?;
        let enc = self
            .tokenizer
            .inner()
            .encode(layout.text.as_str(), layout.add_special_tokens)
            .map_err(|e| Error::Invalid(format!("tokenizer: encode: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        let mut labels: Vec<i32> = match &layout.counted {
            None => ids.iter().map(|&id| id as i32).collect(),
            Some(spans) => ids
                .iter()
                .zip(enc.get_offsets())
                .map(|(&id, &(s, e))| if spans.iter().any(|r| e > r.start && s < r.end) { id as i32 } else { IGNORE })
                .collect(),
        };
        if layout.append_eos {
            let eos = self.tokenizer.eos_id().ok_or_else(|| {
                Error::Invalid("the tokenizer has no eos token to append (turn append_eos off)".into())
            })?;
            if ids.last() != Some(&eos) {
                ids.push(eos);
                labels.push(eos as i32);
            } else if let Some(l) = labels.last_mut() {
                *l = eos as i32;
            }
        }
        if ids.is_empty() {
            return Err(Error::Invalid("the example has no tokens".into()));
        }
        let cut = ids.len() > self.opts.max_len;
        ids.truncate(self.opts.max_len);
        labels.truncate(self.opts.max_len);
        Ok((Example { ids, labels }, cut))
    }

    fn layout(&self, rec: &Record) -> Result<Layout> {
        let eos = self.opts.append_eos;
        Ok(match rec {
            Record::Text(t) => Layout { text: t.clone(), add_special_tokens: true, counted: None, append_eos: eos },
            Record::PromptCompletion { prompt, completion } => self.prompt_completion(prompt, completion),
            Record::Alpaca { instruction, input, output } => match self.template {
                Some(_) => {
                    let user = if input.is_empty() { instruction.clone() } else { format!("{instruction}\n\n{input}") };
                    self.chat(&[Message::new("user", user), Message::new("assistant", output.clone())])?
                }
                None => {
                    let vars = [("{instruction}", instruction.as_str()), ("{input}", input.as_str())];
                    let prompt = fill(if input.is_empty() { ALPACA_PROMPT_NO_INPUT } else { ALPACA_PROMPT }, &vars);
                    self.prompt_completion(&prompt, output)
                }
            },
            Record::Messages(m) => self.chat(m)?,
        })
    }

    fn prompt_completion(&self, prompt: &str, completion: &str) -> Layout {
        let text = format!("{prompt}{completion}");
        let completion_span = prompt.len()..text.len();
        let counted = (!self.opts.train_on_prompt).then(|| vec![completion_span]);
        Layout { text, add_special_tokens: true, counted, append_eos: self.opts.append_eos }
    }

    fn chat(&self, messages: &[Message]) -> Result<Layout> {
        let tmpl = self.template.ok_or_else(|| {
            Error::Invalid("chat messages need a chat template, and the model has none".into())
        })?;
        let render = |m: &[Message], gen: bool| tmpl.render(m, gen, &self.chat_ctx);
        let text = render(messages, false)?;
        if self.opts.train_on_prompt {
            return Ok(Layout { text, add_special_tokens: false, counted: None, append_eos: false });
        }
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let q = render(&messages[..=i], false)?;
            if !text.starts_with(&q) {
                return Err(Error::Invalid(format!(
                    "the chat template renders messages[..={i}] differently inside the whole conversation, so the assistant turns cannot be located (set train_on_prompt to train on everything)"
                )));
            }
            spans.push(self.assistant_span(&q, &m.content, i, |gen| if i == 0 { Ok(String::new()) } else { render(&messages[..i], gen) })?);
        }
        if spans.is_empty() {
            return Err(Error::Invalid(
                "the conversation has no assistant message, so nothing would be trained (set train_on_prompt to train on everything)".into(),
            ));
        }
        Ok(Layout { text, add_special_tokens: false, counted: Some(spans), append_eos: false })
    }

    /// The byte span of assistant message `i` (content `content`) in `q`, the render of the
    /// conversation up to and including it; `before(gen)` renders the messages before it.
    fn assistant_span(
        &self,
        q: &str,
        content: &str,
        i: usize,
        before: impl Fn(bool) -> Result<String>,
    ) -> Result<Range<usize>> {
        let lost = || {
            Error::Invalid(format!("cannot locate assistant message {i} in the rendered chat template"))
        };
        let gen = before(true)?;
        let start = if i > 0 && q.starts_with(&gen) {
            gen.len()
        } else {
            let prev = if i == 0 { String::new() } else { before(false)? };
            let base = common_prefix(q, &prev);
            let needle = content.trim();
            if needle.is_empty() {
                base
            } else {
                base + q[base..].find(needle).ok_or_else(lost)?
            }
        };
        // Where the content ends: verbatim, else trimmed, else unknown (search the whole rest).
        let rest = &q[start..];
        let content_end = if rest.starts_with(content) {
            start + content.len()
        } else if let Some(p) = (!content.trim().is_empty()).then(|| rest.find(content.trim())).flatten() {
            start + p + content.trim().len()
        } else {
            start
        };
        // The end of turn: up to and including the last special token after the content.
        let suffix = &q[content_end..];
        let enc = self
            .tokenizer
            .inner()
            .encode(suffix, false)
            .map_err(|e| Error::Invalid(format!("tokenizer: encode: {e}")))?;
        let last_special = enc
            .get_ids()
            .iter()
            .zip(enc.get_offsets())
            .filter(|(id, _)| self.special.contains(id))
            .map(|(_, &(_, e))| e)
            .max();
        let end = match last_special {
            Some(e) => content_end + e,
            None => q.len(),
        };
        Ok(start..end)
    }
}

/// `template` with each placeholder replaced by its value in one left-to-right pass (so a value
/// that contains a placeholder's text is left as it is).
fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some((pos, key, value)) =
        vars.iter().filter_map(|&(k, v)| rest.find(k).map(|p| (p, k, v))).min_by_key(|&(p, _, _)| p)
    {
        out.push_str(&rest[..pos]);
        out.push_str(value);
        rest = &rest[pos + key.len()..];
    }
    out.push_str(rest);
    out
}

fn common_prefix(a: &str, b: &str) -> usize {
    let n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    // Back up to a char boundary of both.
    (0..=n).rev().find(|&k| a.is_char_boundary(k) && b.is_char_boundary(k)).unwrap_or(0)
}
