//! Training data (CPU only, no shader): JSONL data sets, their tokenization into examples with
//! loss masks, batches with the causal-LM shift, seeded shuffling that resumes exactly, and the
//! validation split.
//!
//! # Formats
//! One JSON object per line; blank lines are skipped; extra keys are ignored. [`Format::Auto`]
//! picks the format of a file from the keys of its first line, in this order: `"messages"`,
//! `"instruction"` + `"output"` (Alpaca), `"prompt"` + `"completion"`, `"text"`; every later
//! line must then have that format's keys.
//! - `{"text": str}`: the loss covers every token.
//! - `{"prompt": str, "completion": str}`: the text is `prompt + completion` (joined as is, so put
//!   any separator in the data); the loss covers the completion and the appended eos.
//! - `{"messages": [{"role": str, "content": str}, ...]}`: rendered with the model's chat
//!   template; the loss covers each assistant message's content and its end-of-turn token(s).
//! - `{"instruction": str, "input": str (optional), "output": str}` (Alpaca): with a chat
//!   template, a user turn `instruction + "\n\n" + input` (just `instruction` when `input` is
//!   missing or empty) and an assistant turn `output`, then as `messages` (the template may add
//!   its default system prompt, as SmolLM2's does). Without a chat template, the Alpaca prompt
//!   text ([`ALPACA_PROMPT`], [`ALPACA_PROMPT_NO_INPUT`]) as the prompt and `output` as the
//!   completion, then as prompt/completion.
//!
//! A bad line (not JSON, not an object, a missing field, a field of the wrong type, an empty
//! `text`/`completion`/`output`/`messages`) is a [`Error::Format`] naming the file and the
//! 1-based line number.
//!
//! # Tokens and labels
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
//!
//! # Batches
//! [`collate`] right-pads to the longest example of the batch and shifts labels the way
//! transformers' causal-LM loss does (`target[b, t] = labels[b, t + 1]`, -100 at the last
//! position and at padding), so the model's cross-entropy scores logits row (b, t) against
//! `target[b, t]`. With causal attention and right padding, real tokens never attend to padding.
//! [`BatchSampler`] yields batches of indices: each epoch is a permutation of the examples
//! (seeded per epoch, or in file order without shuffling), cut into consecutive batches (the
//! last one smaller when the batch size does not divide the count); its [`SamplerState`]
//! (seed, epoch, position) resumes the exact sequence.

use crate::data::chat::{ChatContext, ChatTemplate, Message};
use crate::data::tokenizer::Tokenizer;
use crate::rng::SplitMix64;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashSet;
use std::ops::Range;

/// The label of a token the loss ignores (PyTorch's `ignore_index`).
pub const IGNORE: i32 = -100;

/// Alpaca's prompt for an example with an input (Stanford Alpaca's wording), used when the model
/// has no chat template; `{instruction}` and `{input}` are replaced.
pub const ALPACA_PROMPT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
/// Alpaca's prompt for an example without input (no chat template); `{instruction}` is replaced.
pub const ALPACA_PROMPT_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

/// The format of a JSONL data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Format {
    /// Detect from the keys of the first line (see the module docs).
    Auto,
    /// `{"text"}`.
    Text,
    /// `{"prompt", "completion"}`.
    PromptCompletion,
    /// `{"messages": [{"role", "content"}]}`.
    Messages,
    /// `{"instruction", "input" (optional), "output"}`.
    Alpaca,
}

impl Format {
    /// Parses a format name: `auto`, `text`, `prompt-completion` (or `prompt_completion`,
    /// `completion`), `messages` (or `chat`), `alpaca`.
    pub fn parse(name: &str) -> Result<Format> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "auto" => Format::Auto,
            "text" => Format::Text,
            "prompt-completion" | "prompt_completion" | "completion" => Format::PromptCompletion,
            "messages" | "chat" => Format::Messages,
            "alpaca" => Format::Alpaca,
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown data format {name:?} (expected auto, text, prompt-completion, messages or alpaca)"
                )))
            }
        })
    }

    /// The name used in messages: `auto`, `text`, `prompt/completion`, `messages`, `alpaca`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Text => "text",
            Format::PromptCompletion => "prompt/completion",
            Format::Messages => "messages",
            Format::Alpaca => "alpaca",
        }
    }

    /// The format the keys of one JSON object indicate (see the module docs), if any.
    pub fn detect(obj: &serde_json::Map<String, Value>) -> Option<Format> {
        if obj.contains_key("messages") {
            Some(Format::Messages)
        } else if obj.contains_key("instruction") && obj.contains_key("output") {
            Some(Format::Alpaca)
        } else if obj.contains_key("prompt") && obj.contains_key("completion") {
            Some(Format::PromptCompletion)
        } else if obj.contains_key("text") {
            Some(Format::Text)
        } else {
            None
        }
    }
}

/// One parsed line of a data set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// `{"text"}`.
    Text(String),
    /// `{"prompt", "completion"}`.
    PromptCompletion {
        /// The prompt (may be empty).
        prompt: String,
        /// The completion (not empty).
        completion: String,
    },
    /// `{"messages"}` (at least one message).
    Messages(Vec<Message>),
    /// `{"instruction", "input", "output"}`.
    Alpaca {
        /// The instruction (not empty).
        instruction: String,
        /// The input; empty when the line has none.
        input: String,
        /// The answer (not empty).
        output: String,
    },
}

/// A parsed JSONL data set: its records and the line each came from.
#[derive(Clone, Debug)]
pub struct Dataset {
    file: String,
    format: Format,
    records: Vec<Record>,
    lines: Vec<usize>,
}

fn line_err(file: &str, line: usize, what: impl std::fmt::Display) -> Error {
    Error::format(file, format!("line {line}: {what}"))
}

/// How a JSON value is named in error messages ("a string", "an array", ...).
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads one record of a known format from a JSON object; errors say what is wrong (the caller
/// adds file and line).
fn parse_record(obj: &serde_json::Map<String, Value>, fmt: Format) -> std::result::Result<Record, String> {
    let ctx = fmt.name();
    let string = |key: &str| -> std::result::Result<String, String> {
        match obj.get(key) {
            None => Err(format!("missing field {key:?} (format {ctx})")),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(format!("field {key:?} must be a string, found {}", json_kind(v))),
        }
    };
    let nonempty = |key: &str| -> std::result::Result<String, String> {
        let s = string(key)?;
        if s.is_empty() {
            Err(format!("field {key:?} is empty"))
        } else {
            Ok(s)
        }
    };
    match fmt {
        Format::Text => Ok(Record::Text(nonempty("text")?)),
        Format::PromptCompletion => {
            Ok(Record::PromptCompletion { prompt: string("prompt")?, completion: nonempty("completion")? })
        }
        Format::Alpaca => {
            let input = match obj.get("input") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(v) => return Err(format!("field \"input\" must be a string, found {}", json_kind(v))),
            };
            Ok(Record::Alpaca { instruction: nonempty("instruction")?, input, output: nonempty("output")? })
        }
        Format::Messages => {
            let list = match obj.get("messages") {
                None => return Err(format!("missing field \"messages\" (format {ctx})")),
                Some(Value::Array(a)) => a,
                Some(v) => return Err(format!("field \"messages\" must be an array, found {}", json_kind(v))),
            };
            if list.is_empty() {
                return Err("field \"messages\" is empty".into());
            }
            let mut out = Vec::with_capacity(list.len());
            for (k, m) in list.iter().enumerate() {
                let m = match m {
                    Value::Object(m) => m,
                    v => return Err(format!("messages[{k}] must be an object, found {}", json_kind(v))),
                };
                let field = |key: &str| -> std::result::Result<String, String> {
                    match m.get(key) {
                        None => Err(format!("messages[{k}] has no {key:?}")),
                        Some(Value::String(s)) => Ok(s.clone()),
                        Some(v) => Err(format!("messages[{k}].{key} must be a string, found {}", json_kind(v))),
                    }
                };
                let role = field("role")?;
                if role.is_empty() {
                    return Err(format!("messages[{k}].role is empty"));
                }
                out.push(Message::new(role, field("content")?));
            }
            Ok(Record::Messages(out))
        }
        Format::Auto => unreachable!("the format is resolved before parsing records"),
    }
}

impl Dataset {
    /// Parses a JSONL data set (`file_name` is used in error messages). `Format::Auto` detects
    /// the format from the first non-blank line. Blank lines (only whitespace) are skipped; a
    /// file without any record is an error.
    pub fn from_jsonl(file_name: &str, bytes: &[u8], fmt: Format) -> Result<Dataset> {
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        let mut format = fmt;
        let mut detected_at = 0;
        let (mut records, mut lines) = (Vec::new(), Vec::new());
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let line = i + 1;
            let text = std::str::from_utf8(raw).map_err(|e| line_err(file_name, line, format!("not UTF-8 ({e})")))?;
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            let value: Value =
                serde_json::from_str(text).map_err(|e| line_err(file_name, line, format!("not valid JSON ({e})")))?;
            let obj = match &value {
                Value::Object(o) => o,
                v => return Err(line_err(file_name, line, format!("expected a JSON object, found {}", json_kind(v)))),
            };
            if format == Format::Auto {
                format = Format::detect(obj).ok_or_else(|| {
                    let keys: Vec<&String> = obj.keys().collect();
                    line_err(
                        file_name,
                        line,
                        format!(
                            "cannot tell the format from the keys {keys:?} (expected \"text\", \"prompt\" + \"completion\", \"messages\", or \"instruction\" + \"output\")"
                        ),
                    )
                })?;
                detected_at = line;
            }
            let rec = parse_record(obj, format).map_err(|mut e| {
                if fmt == Format::Auto && detected_at != line {
                    e.push_str(&format!("; the format was detected from line {detected_at}"));
                }
                line_err(file_name, line, e)
            })?;
            records.push(rec);
            lines.push(line);
        }
        if records.is_empty() {
            return Err(Error::format(file_name, "no examples (the file is empty or only blank lines)"));
        }
        Ok(Dataset { file: file_name.to_string(), format, records, lines })
    }

    /// Reads and parses a JSONL file (native only; the file's path names it in errors).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_jsonl_file(path: &std::path::Path, fmt: Format) -> Result<Dataset> {
        let name = path.display().to_string();
        let bytes = crate::io::files::read_regular(path)?;
        Self::from_jsonl(&name, &bytes, fmt)
    }

    /// The file name given at parsing.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The format of the file (never `Auto`).
    pub fn format(&self) -> Format {
        self.format
    }

    /// The records, in file order.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// The 1-based line of each record.
    pub fn lines(&self) -> &[usize] {
        &self.lines
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when there are no records (never, for a parsed file; possible after a split).
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn subset(&self, idx: &[usize]) -> Dataset {
        Dataset {
            file: self.file.clone(),
            format: self.format,
            records: idx.iter().map(|&i| self.records[i].clone()).collect(),
            lines: idx.iter().map(|&i| self.lines[i]).collect(),
        }
    }

    /// Splits off a validation set (see [`split_indices`]): returns (train, validation), each
    /// in file order.
    pub fn split_validation(&self, split: Split, seed: u64) -> Result<(Dataset, Dataset)> {
        let (train, val) = split_indices(self.len(), split, seed)?;
        Ok((self.subset(&train), self.subset(&val)))
    }

    /// Tokenizes every record (see the module docs); an error names the file and line.
    pub fn tokenize(&self, enc: &Encoder) -> Result<TokenizedDataset> {
        let mut examples = Vec::with_capacity(self.len());
        let mut truncated = 0;
        for (rec, &line) in self.records.iter().zip(&self.lines) {
            let (ex, cut) = enc.encode_record(rec).map_err(|e| {
                let what = match e {
                    Error::Invalid(s) => s,
                    other => other.to_string(),
                };
                line_err(&self.file, line, what)
            })?;
            truncated += cut as usize;
            examples.push(ex);
        }
        Ok(TokenizedDataset { examples, truncated })
    }
}

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
    fn encode_record(&self, rec: &Record) -> Result<(Example, bool)> {
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

/// Sizes of a tokenized data set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetStats {
    /// Number of examples.
    pub examples: usize,
    /// Tokens over all examples.
    pub tokens: usize,
    /// Tokens the loss scores ([`Example::n_counted`] summed): the sum of `n_tokens` over the
    /// batches of one epoch.
    pub counted_tokens: usize,
    /// Longest example, in tokens.
    pub max_tokens: usize,
    /// Examples cut to `max_len`.
    pub truncated: usize,
    /// Examples with no scored token (e.g. a conversation whose assistant turns were all cut
    /// off by truncation): they cost compute and teach nothing.
    pub without_loss: usize,
}

/// Tokenized examples, in the order of their records.
#[derive(Clone, Debug, Default)]
pub struct TokenizedDataset {
    examples: Vec<Example>,
    truncated: usize,
}

impl TokenizedDataset {
    /// Wraps examples made elsewhere (none counted as truncated).
    pub fn from_examples(examples: Vec<Example>) -> Self {
        TokenizedDataset { examples, truncated: 0 }
    }

    /// The examples.
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Examples, tokens, counted tokens, the longest example, how many were truncated and how
    /// many have no scored token.
    pub fn stats(&self) -> DatasetStats {
        DatasetStats {
            examples: self.examples.len(),
            tokens: self.examples.iter().map(|e| e.ids.len()).sum(),
            counted_tokens: self.examples.iter().map(Example::n_counted).sum(),
            max_tokens: self.examples.iter().map(|e| e.ids.len()).max().unwrap_or(0),
            truncated: self.truncated,
            without_loss: self.examples.iter().filter(|e| e.n_counted() == 0).count(),
        }
    }

    /// Splits off a validation set (see [`split_indices`]): (train, validation), each in the
    /// original order. The truncation count stays with neither (it describes the whole set).
    pub fn split_validation(&self, split: Split, seed: u64) -> Result<(TokenizedDataset, TokenizedDataset)> {
        let (train, val) = split_indices(self.len(), split, seed)?;
        let pick = |idx: &[usize]| TokenizedDataset::from_examples(idx.iter().map(|&i| self.examples[i].clone()).collect());
        Ok((pick(&train), pick(&val)))
    }

    /// The batch of the examples at `indices` (see [`collate`]); an index out of range is an
    /// error.
    pub fn batch(&self, indices: &[usize], pad_id: u32) -> Result<Batch> {
        let mut picked = Vec::with_capacity(indices.len());
        for &i in indices {
            picked.push(self.examples.get(i).ok_or_else(|| {
                Error::Invalid(format!("example index {i} is outside the data set of {}", self.len()))
            })?);
        }
        collate(&picked, pad_id)
    }
}

/// How much of a data set [`split_indices`] holds out for validation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Split {
    /// This fraction of the examples, rounded to the nearest count, in [0, 1).
    Fraction(f64),
    /// This many examples, fewer than the data set has.
    Count(usize),
}

/// A seeded split of `0..n` into (train, validation) index lists, each sorted: the validation
/// set is the first k indices of a seeded permutation (k from `split`). At least one example
/// stays for training. The permutation's stream differs from the data order's, so the same seed
/// can serve both.
pub fn split_indices(n: usize, split: Split, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    let k = match split {
        Split::Fraction(f) if (0.0..1.0).contains(&f) => (f * n as f64).round() as usize,
        Split::Fraction(f) => return Err(Error::Invalid(format!("validation fraction {f} is not in [0, 1)"))),
        Split::Count(k) => k,
    };
    if k >= n && k > 0 {
        return Err(Error::Invalid(format!(
            "a validation set of {k} examples leaves none of the {n} for training"
        )));
    }
    let mut perm: Vec<usize> = (0..n).collect();
    SplitMix64::stream(seed, SPLIT_STREAM).shuffle(&mut perm);
    let mut val = perm[..k].to_vec();
    let mut train = perm[k..].to_vec();
    val.sort_unstable();
    train.sort_unstable();
    Ok((train, val))
}

/// The RNG stream of the validation split (epochs use streams 0, 1, 2, ...).
const SPLIT_STREAM: u64 = u64::MAX;

/// A batch for the model: `ids` (B, T) and `targets` (B, T) row-major, targets already shifted
/// (`targets[b, t] = labels[b, t + 1]`, -100 at t = T_b − 1 and on padding).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Token ids (B*T), right-padded with the pad id.
    pub ids: Vec<u32>,
    /// Shifted targets (B*T); -100 where nothing is scored.
    pub targets: Vec<i32>,
    /// B.
    pub batch: usize,
    /// T: the longest example of the batch.
    pub seq: usize,
    /// Targets that are not -100.
    pub n_tokens: usize,
}

/// The padding id of a tokenizer: its pad, else its eos, else 0 (any id does: padded positions
/// are never attended to by real ones and never scored).
pub fn pad_id(tok: &Tokenizer) -> u32 {
    tok.pad_id().or(tok.eos_id()).unwrap_or(0)
}

/// Stacks examples into a batch: T = the longest, right padding with `pad_id`, targets
/// (B, T) = labels shifted left by one (transformers' causal-LM shift), -100 past each example's
/// last token. No examples, an empty example, or ids and labels of different lengths are errors.
pub fn collate(examples: &[&Example], pad_id: u32) -> Result<Batch> {
    if examples.is_empty() {
        return Err(Error::Invalid("a batch needs at least one example".into()));
    }
    for (b, e) in examples.iter().enumerate() {
        if e.ids.is_empty() || e.ids.len() != e.labels.len() {
            return Err(Error::Invalid(format!(
                "batch example {b} has {} ids and {} labels (need the same, at least one)",
                e.ids.len(),
                e.labels.len()
            )));
        }
    }
    let bsz = examples.len();
    let seq = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut ids = vec![pad_id; bsz * seq];
    let mut targets = vec![IGNORE; bsz * seq];
    for (b, e) in examples.iter().enumerate() {
        let row = b * seq;
        ids[row..row + e.ids.len()].copy_from_slice(&e.ids);
        targets[row..row + e.labels.len() - 1].copy_from_slice(&e.labels[1..]);
    }
    let n_tokens = targets.iter().filter(|&&t| t != IGNORE).count();
    Ok(Batch { ids, targets, batch: bsz, seq, n_tokens })
}

/// One row of sequence packing (TRL's padding-free packing): several whole examples
/// concatenated, with the row offset where each starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedRow {
    /// The examples' ids, one after the other.
    pub ids: Vec<u32>,
    /// Their labels, one after the other (unshifted, as in [`Example`]).
    pub labels: Vec<i32>,
    /// Row offset of each example's first token (ascending, the first is 0).
    pub starts: Vec<usize>,
}

/// Packs examples into rows of at most `max_len` tokens by best-fit decreasing (TRL's default
/// "bfd" strategy): longest example first, each into the fullest row it still fits, else a new
/// row; within a row the examples keep the order they were placed in. Examples are never split
/// (they are already cut to max_len by the encoder); a longer one is an error. Empty examples
/// are left out.
pub fn pack(examples: &[Example], max_len: usize) -> Result<Vec<PackedRow>> {
    let mut order: Vec<usize> = (0..examples.len()).filter(|&i| !examples[i].ids.is_empty()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].ids.len()));
    let mut rows: Vec<PackedRow> = Vec::new();
    // (space left, row index) of every row with space left.
    let mut free: std::collections::BTreeSet<(usize, usize)> = std::collections::BTreeSet::new();
    for i in order {
        let e = &examples[i];
        let n = e.ids.len();
        if n > max_len || e.labels.len() != n {
            return Err(Error::Invalid(format!(
                "example {i} has {n} ids and {} labels, not at most the packing length {max_len} of each",
                e.labels.len()
            )));
        }
        let r = match free.range((n, 0)..).next().copied() {
            Some(key) => {
                free.remove(&key);
                key.1
            }
            None => {
                rows.push(PackedRow { ids: Vec::new(), labels: Vec::new(), starts: Vec::new() });
                rows.len() - 1
            }
        };
        let row = &mut rows[r];
        row.starts.push(row.ids.len());
        row.ids.extend_from_slice(&e.ids);
        row.labels.extend_from_slice(&e.labels);
        if row.ids.len() < max_len {
            free.insert((max_len - row.ids.len(), r));
        }
    }
    Ok(rows)
}

/// A packed batch: the [`Batch`] (targets shifted within each example, -100 at each example's
/// last token, so every example counts exactly the tokens it counts unpacked) and the segment
/// starts `seg` (B*T): for each position, the row offset of its example's first token (padding
/// forms a segment of its own). Positions restart per example: position id = t − seg.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedBatch {
    /// Ids and targets (B, T), T = the longest row.
    pub batch: Batch,
    /// Segment starts (B*T).
    pub seg: Vec<u32>,
}

/// Stacks packed rows into a [`PackedBatch`] (right padding with `pad_id`).
pub fn collate_packed(rows: &[&PackedRow], pad_id: u32) -> Result<PackedBatch> {
    if rows.is_empty() || rows.iter().any(|r| r.ids.is_empty() || r.ids.len() != r.labels.len() || r.starts.first() != Some(&0)) {
        return Err(Error::Invalid("a packed batch needs at least one row, each non-empty with as many labels as ids".into()));
    }
    let bsz = rows.len();
    let seq = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    let mut ids = vec![pad_id; bsz * seq];
    let mut targets = vec![IGNORE; bsz * seq];
    let mut seg = vec![0u32; bsz * seq];
    for (b, r) in rows.iter().enumerate() {
        let row = b * seq;
        ids[row..row + r.ids.len()].copy_from_slice(&r.ids);
        let mut bounds = r.starts.clone();
        bounds.push(r.ids.len());
        for w in bounds.windows(2) {
            let (s, e) = (w[0], w[1]);
            if s >= e {
                return Err(Error::Invalid(format!("packed row {b}: example starts {:?} are not ascending", r.starts)));
            }
            targets[row + s..row + e - 1].copy_from_slice(&r.labels[s + 1..e]);
            seg[row + s..row + e].iter_mut().for_each(|x| *x = s as u32);
        }
        // Padding: a segment of its own.
        seg[row + r.ids.len()..row + seq].iter_mut().for_each(|x| *x = r.ids.len() as u32);
    }
    let n_tokens = targets.iter().filter(|&&t| t != IGNORE).count();
    Ok(PackedBatch { batch: Batch { ids, targets, batch: bsz, seq, n_tokens }, seg })
}

/// Where the data stream is: the epoch and the index of the next example (or micro-batch) in
/// that epoch's order (the order itself is derived from the run's seed and the epoch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataPosition {
    /// Epoch, from 0.
    pub epoch: u64,
    /// Next position within the epoch.
    pub index: u64,
}

/// Where a [`BatchSampler`] stands: enough to continue the exact same sequence of batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    /// The seed of the data order.
    pub seed: u64,
    /// The epoch of the next batch, from 0.
    pub epoch: u64,
    /// The position of the next batch's first example in that epoch's order.
    pub position: u64,
    /// The number of examples (checked on resume: a changed data set would silently change the
    /// order).
    pub n_examples: u64,
    /// Whether epochs are shuffled.
    pub shuffle: bool,
}

impl SamplerState {
    /// The position as the checkpoint stores it.
    pub fn data_position(&self) -> DataPosition {
        DataPosition { epoch: self.epoch, index: self.position }
    }
}

/// Yields batches of example indices forever, epoch after epoch: each epoch is a permutation of
/// `0..n` (seeded by (seed, epoch); the identity without shuffling) cut into consecutive batches
/// of `batch_size` (the epoch's last batch holds the remainder).
#[derive(Clone, Debug)]
pub struct BatchSampler {
    state: SamplerState,
    batch_size: usize,
    order: Vec<usize>,
}

impl BatchSampler {
    /// A sampler at the start of epoch 0. `n` and `batch_size` must be at least 1.
    pub fn new(n: usize, batch_size: usize, shuffle: bool, seed: u64) -> Result<Self> {
        Self::resume(SamplerState { seed, epoch: 0, position: 0, n_examples: n as u64, shuffle }, n, batch_size)
    }

    /// A sampler continuing from `state` over a data set of `n` examples; the batch size may
    /// differ from the saved run's. A state for another number of examples, or with a position
    /// past the end, is an error.
    pub fn resume(state: SamplerState, n: usize, batch_size: usize) -> Result<Self> {
        if n == 0 || batch_size == 0 {
            return Err(Error::Invalid(format!("batch sampler over {n} examples with batch size {batch_size}")));
        }
        if state.n_examples != n as u64 {
            return Err(Error::Invalid(format!(
                "the saved data position is for {} examples, the data set has {n}",
                state.n_examples
            )));
        }
        if state.position >= n as u64 {
            return Err(Error::Invalid(format!("saved data position {} is past the {n} examples", state.position)));
        }
        let order = epoch_order(n, state.shuffle, state.seed, state.epoch);
        Ok(BatchSampler { state, batch_size, order })
    }

    /// The state to save: the next call to [`BatchSampler::next_batch`] after resuming from it
    /// returns what this sampler's next call returns.
    pub fn state(&self) -> SamplerState {
        self.state
    }

    /// The batch size.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Batches per epoch: ceil(n / batch_size).
    pub fn batches_per_epoch(&self) -> usize {
        self.order.len().div_ceil(self.batch_size)
    }

    /// The next batch's example indices (and moves on, to the next epoch after its last batch).
    pub fn next_batch(&mut self) -> Vec<usize> {
        let n = self.order.len();
        let p = self.state.position as usize;
        let end = (p + self.batch_size).min(n);
        let out = self.order[p..end].to_vec();
        if end == n {
            self.state.epoch += 1;
            self.state.position = 0;
            self.order = epoch_order(n, self.state.shuffle, self.state.seed, self.state.epoch);
        } else {
            self.state.position = end as u64;
        }
        out
    }
}

/// The order of `0..n` in `epoch`: a Fisher–Yates permutation from the project's SplitMix64,
/// stream `epoch` of `seed`, or the identity without shuffling.
pub fn epoch_order(n: usize, shuffle: bool, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        SplitMix64::stream(seed, epoch).shuffle(&mut order);
    }
    order
}
