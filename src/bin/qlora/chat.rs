//! `qlora chat`: an interactive chat in the terminal under the model's chat template, with any
//! number of adapters on one loaded base (lora::AdapterSet) and slash commands. Answers stream
//! to standard output (one line break after each); everything else goes to standard error, so
//! the answers alone can be piped on.

use crate::common::{self, QuantArgs, SamplingArgs};
use anyhow::{bail, Result};
use clap::Args;
use qlora_webgpu::data::chat::Message;
use qlora_webgpu::gpu::{block_on, GpuContext};
use qlora_webgpu::lora::AdapterSet;
use qlora_webgpu::session::{LoadedModel, Prompt};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct ChatArgs {
    /// The base model: a .gguf file or a Hugging Face folder (with a chat template).
    model: PathBuf,
    /// A PEFT adapter folder, as DIR (named after the folder) or NAME=DIR; repeat for several.
    /// The first is in use at the start; `/adapter NAME` switches (`/adapter base`: none).
    #[arg(long)]
    adapter: Vec<String>,
    /// The system message (`/system TEXT` changes it).
    #[arg(long)]
    system: Option<String>,
    /// Tokens of context (the conversation plus the answer); the earliest turns are dropped to
    /// stay within it [default: the positions the model is loaded for, at least 2048 where the
    /// model allows].
    #[arg(long)]
    ctx_len: Option<usize>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    quant: QuantArgs,
}

const HELP: &str = "commands: /adapter [NAME|base] (switch; alone: list), /system [TEXT] (set; alone: clear), /reset (forget the conversation), /exit";

/// (name, folder) of an --adapter value.
fn adapter_spec(s: &str) -> Result<(String, PathBuf)> {
    if let Some((n, d)) = s.split_once('=') {
        if n.is_empty() || d.is_empty() {
            bail!("--adapter {s:?}: expected DIR or NAME=DIR");
        }
        return Ok((n.to_owned(), PathBuf::from(d)));
    }
    let p = Path::new(s.trim_end_matches('/'));
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).filter(|n| !n.is_empty());
    match name {
        Some(n) => Ok((n, p.to_path_buf())),
        None => bail!("--adapter {s:?}: give NAME=DIR"),
    }
}

/// The conversation: the system message and the user / assistant turns since the last /reset.
struct Conversation {
    system: Option<String>,
    turns: Vec<Message>,
}

impl Conversation {
    fn messages(&self, user: &str) -> Vec<Message> {
        let mut m: Vec<Message> = self.system.iter().map(|s| Message::new("system", s.as_str())).collect();
        m.extend(self.turns.iter().cloned());
        m.push(Message::new("user", user));
        m
    }

    /// The prompt ids for `user` after the history, dropping the earliest exchanges until the
    /// prompt plus `reserve` new tokens fit `ctx_len`: (ids, exchanges dropped).
    fn fit(&mut self, model: &LoadedModel, user: &str, reserve: usize, ctx_len: usize) -> Result<(Vec<u32>, usize)> {
        let mut dropped = 0;
        loop {
            let ids = model.prompt_ids(&Prompt::Chat(self.messages(user)))?;
            if ids.len() + reserve <= ctx_len {
                return Ok((ids, dropped));
            }
            if self.turns.is_empty() {
                bail!("this message is {} tokens with the system message; with {reserve} new tokens that exceeds the context of {ctx_len} (--ctx-len, --max-new-tokens)", ids.len());
            }
            self.turns.drain(..self.turns.len().min(2));
            dropped += 1;
        }
    }
}

pub fn run(a: ChatArgs) -> Result<()> {
    let cfg = a.sampling.config()?;
    let ctx = block_on(GpuContext::new())?;
    let model = common::load_model(&ctx, &a.model, a.quant.quant()?, a.ctx_len.unwrap_or(0).max(cfg.max_new_tokens + 1))?;
    if model.template.is_none() {
        bail!("{}: the model has no chat template (use `qlora generate --raw`)", model.name);
    }
    let ctx_len = a.ctx_len.unwrap_or(model.max_positions).min(model.max_positions);
    if cfg.max_new_tokens >= ctx_len {
        bail!("--max-new-tokens {} leaves no room for a prompt in the context of {ctx_len} tokens", cfg.max_new_tokens);
    }
    let mut adapters = AdapterSet::new();
    for s in &a.adapter {
        let (name, dir) = adapter_spec(s)?;
        if name == "base" {
            bail!("--adapter {s:?}: \"base\" names the model without an adapter; give NAME=DIR");
        }
        let h = common::open_adapter(&dir, &model)?;
        adapters.add(&ctx, &model.model.cfg, &name, &h)?;
    }
    if let Some(first) = adapters.names().first().map(|n| n.to_string()) {
        adapters.use_adapter(Some(&first))?;
    }
    let mut conv = Conversation { system: a.system.clone(), turns: Vec::new() };
    let using = |s: &AdapterSet| s.active_name().map_or("the base model".to_owned(), |n| format!("adapter {n}"));
    eprintln!(
        "chat with {} ({}; adapters: {}), context {ctx_len} tokens. {HELP}",
        model.name,
        using(&adapters),
        if adapters.is_empty() { "none".to_owned() } else { adapters.names().join(", ") }
    );
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let interactive = std::io::IsTerminal::is_terminal(&stdin);
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        if let Some(cmd) = text.strip_prefix('/') {
            let (name, arg) = cmd.split_once(char::is_whitespace).map_or((cmd, ""), |(n, r)| (n, r.trim()));
            match name {
                "exit" | "quit" => break,
                "reset" => {
                    conv.turns.clear();
                    eprintln!("[conversation cleared]");
                }
                "system" => {
                    conv.system = (!arg.is_empty()).then(|| arg.to_owned());
                    eprintln!("[system message {}]", if arg.is_empty() { "cleared" } else { "set" });
                }
                "adapter" if arg.is_empty() => eprintln!("[{}; loaded: base, {}]", using(&adapters), adapters.names().join(", ")),
                "adapter" => {
                    let pick = if arg == "base" || arg == "none" { None } else { Some(arg) };
                    match adapters.use_adapter(pick) {
                        Ok(()) => eprintln!("[now answering with {}]", using(&adapters)),
                        Err(e) => eprintln!("[{e}]"),
                    }
                }
                "help" => eprintln!("[{HELP}]"),
                _ => eprintln!("[unknown command /{name}; {HELP}]"),
            }
            continue;
        }
        let (ids, dropped) = match conv.fit(&model, text, cfg.max_new_tokens, ctx_len) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("[{e:#}]");
                continue;
            }
        };
        if dropped > 0 {
            eprintln!("[dropped the {dropped} earliest exchange(s) to stay within {ctx_len} tokens]");
        }
        let g = block_on(model.generate(&ctx, adapters.active(), &ids, &cfg, |t| {
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        }))?;
        writeln!(out)?;
        out.flush()?;
        eprintln!("[{} prompt tokens, {} new, {}, stop: {:?}]", ids.len(), g.ids.len(), using(&adapters), g.stop_reason);
        conv.turns.push(Message::new("user", text));
        conv.turns.push(Message::new("assistant", g.text));
    }
    Ok(())
}
