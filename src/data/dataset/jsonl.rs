//! JSONL data sets: the formats, parsed and checked line by line.
//!
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

use crate::data::chat::Message;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use super::*;

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
