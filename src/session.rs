//! The pipeline that the command line (`src/bin/qlora.rs`) and the browser API (`src/web.rs`)
//! share, so that both run the same code: a base model with its tokenizer and chat template from
//! a GGUF file or Hugging Face files ([`ModelSource`]), uploaded with an f32 or NF4 base
//! ([`LoadedModel`]); a training run over a JSONL data set ([`TrainSession`]: tokenize, hold out
//! a validation split, batch, step, evaluate, adapter out, checkpoint); prompts and streamed
//! generation on a KV cache. Files come in as bytes and everything that touches the GPU is
//! async, so the same code runs natively and in wasm.

use crate::data::chat::{ChatContext, ChatTemplate, Message};
use crate::data::dataset::{self, Batch, BatchSampler, Dataset, DatasetStats, EncodeOptions, Encoder, SamplerState, Split, TokenizedDataset};
use crate::data::tokenizer::Tokenizer;
use crate::generate::{Generation, GenerationOutput, SamplingConfig};
use crate::gpu::GpuContext;
use crate::io::hf::ModelFiles;
use crate::io::HostModel;
use crate::lora::{init_lora_set, LoraConfig};
use crate::lora::HostAdapter;
use crate::model::config::ModelConfig;
use crate::model::llama::{self, KvCache, LoraSet};
use crate::ops::adamw::AdamW;
use crate::train::checkpoint::Checkpoint;
use crate::train::trainer::{Model, TrainOpts, Trainer};
use crate::train::{Schedule, ScheduleKind, TrainState};
use crate::{Error, Result};
use std::rc::Rc;

/// How the frozen base projections are held on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseQuant {
    /// f32 (plain LoRA).
    F32,
    /// 4-bit NormalFloat, bit-exact with bitsandbytes (QLoRA); norms stay f32, the embedding
    /// and lm_head stay in the checkpoint's precision (bf16 / f16 kept as is, else f32).
    Nf4 {
        /// Elements per absmax block (bitsandbytes' default 64).
        blocksize: usize,
        /// Double quantization of the block scales.
        double_quant: bool,
    },
}

impl BaseQuant {
    /// QLoRA's defaults: NF4, block 64, double quantization (the QLoRA paper's setup).
    pub const QLORA: BaseQuant = BaseQuant::Nf4 { blocksize: 64, double_quant: true };

    /// "f32", "nf4" or "nf4-dq".
    pub fn name(self) -> &'static str {
        match self {
            BaseQuant::F32 => "f32",
            BaseQuant::Nf4 { double_quant: false, .. } => "nf4",
            BaseQuant::Nf4 { double_quant: true, .. } => "nf4-dq",
        }
    }
}

/// Where a model came from, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// A GGUF file.
    Gguf,
    /// A Hugging Face folder (config.json, safetensors, tokenizer.json).
    HfFolder,
}

/// A base model on the host with what is needed to talk to it: tokenizer, chat template and
/// the variables the template sees.
pub struct ModelSource {
    /// The file or folder name (for messages and metadata).
    pub name: String,
    /// GGUF or Hugging Face folder.
    pub kind: SourceKind,
    /// The weights, checked against the config.
    pub host: HostModel,
    /// The tokenizer (tokenizer.json, or rebuilt from GGUF metadata).
    pub tokenizer: Tokenizer,
    /// The chat template, if the model has one.
    pub template: Option<ChatTemplate>,
    /// What the template sees besides the messages (bos/eos/unk/pad tokens).
    pub chat_ctx: ChatContext,
    /// config.json as given (Hugging Face folders), kept for merged output folders.
    pub config_json: Option<Vec<u8>>,
    /// Files of the folder that a merged model folder carries over unchanged (tokenizer files,
    /// generation_config.json, chat_template.jinja), as (name, bytes).
    pub side_files: Vec<(String, Vec<u8>)>,
}

/// Files of a Hugging Face folder that travel with a merged model.
pub const SIDE_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
];

impl ModelSource {
    /// A GGUF file's model, tokenizer and chat template; `name` names the file in errors.
    pub fn from_gguf(name: &str, bytes: &[u8]) -> Result<Self> {
        Self::from_gguf_with(name, bytes, None)
    }

    /// As [`ModelSource::from_gguf`], the projections quantized to NF4 (blocksize, double
    /// quantization) as they are read when `quantize` is given.
    pub fn from_gguf_with(name: &str, bytes: &[u8], quantize: Option<(usize, bool)>) -> Result<Self> {
        Self::from_gguf_model(name, crate::io::gguf::load_gguf_with(name, bytes, quantize)?)
    }

    /// A GGUF model already read (by [`crate::io::gguf::load_gguf_with`] or a
    /// [`crate::io::gguf::GgufStream`]) with its tokenizer and chat template.
    pub fn from_gguf_model(name: &str, g: crate::io::gguf::GgufModel) -> Result<Self> {
        let (tokenizer, template, chat_ctx) = gguf_talk(name, g.tokenizer(name)?)?;
        Ok(ModelSource { name: name.to_owned(), kind: SourceKind::Gguf, host: g.model, tokenizer, template, chat_ctx, config_json: None, side_files: Vec::new() })
    }

    /// A Hugging Face folder given as files: config.json, model.safetensors (or an index and its
    /// shards), tokenizer.json (required), tokenizer_config.json (special tokens, chat
    /// template) and chat_template.jinja (preferred over tokenizer_config's template, as
    /// transformers 5 does). `name` names the folder in messages.
    pub fn from_hf(name: &str, files: &dyn ModelFiles) -> Result<Self> {
        Self::from_hf_with(name, files, None)
    }

    /// As [`ModelSource::from_hf`], the projections quantized to NF4 (blocksize, double
    /// quantization) as they are read when `quantize` is given.
    pub fn from_hf_with(name: &str, files: &dyn ModelFiles, quantize: Option<(usize, bool)>) -> Result<Self> {
        let host = crate::io::hf::load_hf_with(files, quantize)?;
        let tok_json = files.file("tokenizer.json").ok_or_else(|| {
            Error::format(files.display("tokenizer.json"), "file not found in the model folder (training and generation need the tokenizer)")
        })?;
        let tok_cfg = files.file("tokenizer_config.json");
        // The tokenizer's errors name the bare file: name it in its folder.
        let in_folder = |e: Error| match e {
            Error::Format { file, what } if file == "tokenizer.json" || file == "tokenizer_config.json" => {
                Error::Format { file: files.display(&file), what }
            }
            e => e,
        };
        let tokenizer = Tokenizer::from_hf_files(tok_json, tok_cfg).map_err(in_folder)?;
        let template = if let Some(j) = files.file("chat_template.jinja") {
            Some(ChatTemplate::from_jinja_bytes(j).map_err(|e| Error::format(files.display("chat_template.jinja"), e.to_string()))?)
        } else if let Some(c) = tok_cfg {
            ChatTemplate::from_tokenizer_config(c).map_err(|e| Error::format(files.display("tokenizer_config.json"), e.to_string()))?
        } else {
            None
        };
        let chat_ctx = match tok_cfg {
            Some(c) => ChatContext::from_tokenizer_config(c).map_err(in_folder)?,
            None => ChatContext::from_tokenizer(&tokenizer),
        };
        let side_files = SIDE_FILES.iter().filter_map(|&f| files.file(f).map(|b| (f.to_owned(), b.to_vec()))).collect();
        let config_json = files.file("config.json").map(<[u8]>::to_vec);
        Ok(ModelSource { name: name.to_owned(), kind: SourceKind::HfFolder, host, tokenizer, template, chat_ctx, config_json, side_files })
    }

    /// Uploads the base (projections as `quant` says) and builds the RoPE tables for
    /// `max_positions` positions; the host weights are dropped.
    pub fn upload(self, ctx: &Rc<GpuContext>, quant: BaseQuant, max_positions: usize) -> Result<LoadedModel> {
        self.upload_with_progress(ctx, quant, max_positions, &mut |_, _| {})
    }

    /// As [`ModelSource::upload`], calling `progress(tensors done, tensors total)` after each
    /// tensor is on the device.
    pub fn upload_with_progress(
        self,
        ctx: &Rc<GpuContext>,
        quant: BaseQuant,
        max_positions: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<LoadedModel> {
        let cfg = self.host.config.to_llama();
        let quantize = quant_params(quant);
        let weights = self.host.upload_with_progress(ctx, quantize, true, progress)?;
        let model = Model::new(ctx, cfg, weights, self.host.config.effective_rope_scaling().as_ref(), max_positions)?;
        Ok(LoadedModel {
            name: self.name,
            config: self.host.config,
            model: Rc::new(model),
            tokenizer: self.tokenizer,
            template: self.template,
            chat_ctx: self.chat_ctx,
            quant,
            max_positions,
        })
    }
}

/// The tokenizer, chat template and template variables of a GGUF file's metadata.
fn gguf_talk(name: &str, gt: crate::data::tokenizer::GgufTokenizer) -> Result<(Tokenizer, Option<ChatTemplate>, ChatContext)> {
    let tokenizer = gt.build().map_err(|e| Error::format(name, format!("tokenizer from tokenizer.ggml.* metadata: {e}")))?;
    let template = match gt.chat_template.as_deref() {
        Some(src) => Some(ChatTemplate::new(src).map_err(|e| Error::format(name, format!("tokenizer.chat_template: {e}")))?),
        None => None,
    };
    let chat_ctx = ChatContext::from_tokenizer(&tokenizer);
    Ok((tokenizer, template, chat_ctx))
}

/// Which part of a [`GgufUpload`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadStep {
    /// Reading the file (its header, a tensor's data, the tokenizer metadata).
    Read,
    /// The caller's `setup` refused the model (options, limits).
    Setup,
    /// Uploading a tensor to the device (or building the model from the weights).
    Upload,
}

/// A GGUF file loaded onto the GPU as its bytes arrive (a download), tensor by tensor: the
/// header is parsed from the first bytes ([`crate::io::gguf::GgufStream`]), then each tensor
/// is converted as soon as its bytes are in and uploaded right away
/// ([`crate::io::WeightsBuilder`]: projections quantized to NF4 then, for an NF4 base), and its
/// host copies dropped. Held on the host at any time: the header, the bytes of the tensor being
/// received and that one tensor's conversion, plus what the model keeps on the host (an untied
/// input embedding). The model is the one [`ModelSource::from_gguf`] then
/// [`ModelSource::upload`] make from the same bytes, bit for bit.
pub struct GgufUpload {
    name: String,
    ctx: Rc<GpuContext>,
    stream: crate::io::gguf::GgufStream,
    /// Once the header is in: the weights being uploaded, the base, the positions.
    build: Option<(crate::io::WeightsBuilder, BaseQuant, usize)>,
}

impl GgufUpload {
    /// A load of the GGUF file `name` (its name in errors and in the model) onto `ctx`.
    pub fn new(ctx: &Rc<GpuContext>, name: &str) -> Self {
        GgufUpload { name: name.to_owned(), ctx: ctx.clone(), stream: crate::io::gguf::GgufStream::new(name), build: None }
    }

    /// Tensors (uploaded, to upload); (0, 0) before the header is in.
    pub fn tensors_done(&self) -> (usize, usize) {
        self.build.as_ref().map_or((0, 0), |(b, _, _)| (b.uploaded(), b.tensor_count()))
    }

    /// The next bytes of the file. When the header is in, `setup(config)` says how to hold the
    /// base and how many positions to cover (or refuses), once, before any tensor is uploaded;
    /// `progress(done, total)` is called after each tensor is on the device.
    pub fn push(
        &mut self,
        chunk: &[u8],
        setup: &mut dyn FnMut(&ModelConfig) -> Result<(BaseQuant, usize)>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> std::result::Result<(), (LoadStep, Error)> {
        let GgufUpload { ctx, stream, build, .. } = self;
        let mut step = LoadStep::Read;
        let mut sink = |c: &ModelConfig, name: &str, t: crate::io::HostTensor| put_streamed(ctx, build, &mut step, setup, progress, c, name, t);
        let r = stream.push_to(chunk, &mut sink);
        r.map_err(|e| (step, e))
    }

    /// The end of the file: the model on the device (`setup` and `progress` as for
    /// [`GgufUpload::push`], for the last tensors if they are empty).
    pub fn finish(
        self,
        setup: &mut dyn FnMut(&ModelConfig) -> Result<(BaseQuant, usize)>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> std::result::Result<LoadedModel, (LoadStep, Error)> {
        let GgufUpload { name, ctx, stream, mut build } = self;
        let mut step = LoadStep::Read;
        let mut sink = |c: &ModelConfig, n: &str, t: crate::io::HostTensor| put_streamed(&ctx, &mut build, &mut step, setup, progress, c, n, t);
        let g = stream.finish_to(&mut sink).map_err(|e| (step, e))?;
        let read = |e| (LoadStep::Read, e);
        let (tokenizer, template, chat_ctx) = gguf_talk(&name, g.tokenizer(&name).map_err(read)?).map_err(read)?;
        let Some((b, quant, max_positions)) = build else {
            // A model without tensors cannot pass the config's checks; kept as an error.
            return Err(read(Error::format(&name, "no tensor was read")));
        };
        let up = |e| (LoadStep::Upload, e);
        let weights = b.finish().map_err(up)?;
        let model = Model::new(&ctx, g.config.to_llama(), weights, g.config.effective_rope_scaling().as_ref(), max_positions).map_err(up)?;
        Ok(LoadedModel { name, config: g.config, model: Rc::new(model), tokenizer, template, chat_ctx, quant, max_positions })
    }
}

/// One converted tensor of a [`GgufUpload`] onto the device: the builder made at the first one
/// (`setup` asked, the projections checked to fit), then the tensor put; `step` says what failed.
#[allow(clippy::too_many_arguments)]
fn put_streamed(
    ctx: &Rc<GpuContext>,
    build: &mut Option<(crate::io::WeightsBuilder, BaseQuant, usize)>,
    step: &mut LoadStep,
    setup: &mut dyn FnMut(&ModelConfig) -> Result<(BaseQuant, usize)>,
    progress: &mut dyn FnMut(usize, usize),
    config: &ModelConfig,
    name: &str,
    t: crate::io::HostTensor,
) -> Result<()> {
    if build.is_none() {
        *step = LoadStep::Setup;
        let (quant, max_positions) = setup(config)?;
        let quantize = quant_params(quant);
        let shapes = config.tensor_shapes();
        let projs = shapes.iter().filter_map(|(n, s)| crate::io::proj_index(n).map(|(i, m)| (i, m, s.as_slice(), false)));
        *step = LoadStep::Upload;
        crate::io::check_projections_fit(ctx, quantize, projs)?;
        *build = Some((crate::io::WeightsBuilder::new(config, !config.tie_word_embeddings, quantize, true), quant, max_positions));
    }
    *step = LoadStep::Upload;
    let (b, _, _) = build.as_mut().expect("made above");
    b.put(ctx, name, crate::io::TensorRef::F32(&t))?;
    drop(t);
    progress(b.uploaded(), b.tensor_count());
    *step = LoadStep::Read;
    Ok(())
}

/// `quantize` of the loaders and uploads for `quant`.
fn quant_params(quant: BaseQuant) -> Option<(usize, bool)> {
    match quant {
        BaseQuant::F32 => None,
        BaseQuant::Nf4 { blocksize, double_quant } => Some((blocksize, double_quant)),
    }
}

/// What to generate from: chat messages rendered with the model's chat template (with the
/// assistant prompt appended), or raw text tokenized with the tokenizer's special tokens.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// Messages for the chat template.
    Chat(Vec<Message>),
    /// Raw text.
    Raw(String),
}

impl Prompt {
    /// A prompt as JSON gives it (the browser package's `prompt` argument, a line of
    /// `qlora train --prompts`): a string (one user message when `chat_template`, else raw
    /// text), an array of `{role, content}` messages or `{"messages": [...]}`, or
    /// `{"text": ...}` / `{"prompt": ...}` (raw text). The error says what was expected.
    pub fn from_json(v: &serde_json::Value, chat_template: bool) -> std::result::Result<Prompt, String> {
        use serde_json::Value;
        let messages = |a: &Value| -> std::result::Result<Vec<Message>, String> {
            serde_json::from_value::<Vec<Message>>(a.clone()).map_err(|e| format!("messages must be [{{role, content}}, ...] of strings ({e})"))
        };
        let raw = |o: &serde_json::Map<String, Value>| ["prompt", "text"].iter().find_map(|k| o.get(*k).and_then(Value::as_str).map(str::to_owned));
        match v {
            Value::String(s) if chat_template => Ok(Prompt::Chat(vec![Message::new("user", s)])),
            Value::String(s) => Ok(Prompt::Raw(s.clone())),
            Value::Array(_) => Ok(Prompt::Chat(messages(v)?)),
            Value::Object(o) if o.contains_key("messages") => Ok(Prompt::Chat(messages(&o["messages"])?)),
            Value::Object(o) if raw(o).is_some() => Ok(Prompt::Raw(raw(o).unwrap_or_default())),
            _ => Err("expected a string, chat messages, {\"messages\": [...]}, {\"text\": ...} or {\"prompt\": ...}".into()),
        }
    }
}

/// A base model on the device with its tokenizer and chat template.
pub struct LoadedModel {
    /// The file or folder it came from.
    pub name: String,
    /// The parsed config.
    pub config: ModelConfig,
    /// The decoder and its frozen weights.
    pub model: Rc<Model>,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template, if any.
    pub template: Option<ChatTemplate>,
    /// What the template sees besides the messages.
    pub chat_ctx: ChatContext,
    /// How the base projections are held.
    pub quant: BaseQuant,
    /// Positions the RoPE tables cover (prompt + generated tokens, or a training example, must
    /// fit).
    pub max_positions: usize,
}

impl LoadedModel {
    /// The positions a sequence (prompt plus generated tokens, or a training example) may take:
    /// the positions the model was loaded for, at most the model's `max_position_embeddings`.
    pub fn context_len(&self) -> usize {
        self.config.max_position_embeddings.map_or(self.max_positions, |m| m.min(self.max_positions))
    }

    fn context_note(&self) -> String {
        match self.config.max_position_embeddings {
            Some(m) if m <= self.max_positions => format!(" (max_position_embeddings {m})"),
            _ => " (as loaded)".to_owned(),
        }
    }

    /// The ids that end generation: the tokenizer's eos and config.json's eos ids.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.tokenizer.eos_id().into_iter().collect();
        for &i in &self.config.eos_token_ids {
            if !ids.contains(&i) {
                ids.push(i);
            }
        }
        ids
    }

    /// The token ids of a prompt: chat messages through the chat template (with the generation
    /// prompt; the rendered text is tokenized without adding special tokens, as transformers'
    /// `apply_chat_template` does), or raw text with the tokenizer's special tokens.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Chat(messages) => {
                let t = self.template.as_ref().ok_or_else(|| {
                    Error::Invalid(format!("{}: the model has no chat template; give a raw prompt instead", self.name))
                })?;
                let text = t.render(messages, true, &self.chat_ctx)?;
                self.tokenizer.encode(&text, false)
            }
            Prompt::Raw(text) => self.tokenizer.encode(text, true),
        }
    }

    /// A data set encoder for this model (its tokenizer, chat template and template variables).
    pub fn encoder(&self, opts: EncodeOptions) -> Result<Encoder<'_>> {
        Ok(Encoder::new(&self.tokenizer, self.template.as_ref(), opts)?.with_chat_context(self.chat_ctx.clone()))
    }

    /// Generates after `prompt_ids` with adapter `lora` (an empty set for the base model) on a
    /// fresh KV cache, streaming text to `on_text`. eos ids default to [`LoadedModel::eos_ids`]
    /// when `cfg.eos_ids` is empty. The prompt plus `max_new_tokens` must fit `max_positions`.
    pub async fn generate(
        &self,
        ctx: &Rc<GpuContext>,
        lora: &LoraSet,
        prompt_ids: &[u32],
        cfg: &SamplingConfig,
        on_text: impl FnMut(&str),
    ) -> Result<GenerationOutput> {
        self.generate_until(ctx, lora, prompt_ids, cfg, on_text, || false).await
    }

    /// [`LoadedModel::generate`] that ends early (keeping the text so far) once `stop()` says so;
    /// it is asked after each token.
    pub async fn generate_until(
        &self,
        ctx: &Rc<GpuContext>,
        lora: &LoraSet,
        prompt_ids: &[u32],
        cfg: &SamplingConfig,
        mut on_text: impl FnMut(&str),
        mut stop: impl FnMut() -> bool,
    ) -> Result<GenerationOutput> {
        let mut cfg = cfg.clone();
        if cfg.eos_ids.is_empty() {
            cfg.eos_ids = self.eos_ids();
        }
        let context = self.context_len();
        if prompt_ids.len() >= context {
            return Err(Error::Invalid(format!(
                "the prompt is {} tokens, which leaves no room in the model's context of {context} positions{}: shorten the prompt",
                prompt_ids.len(),
                self.context_note()
            )));
        }
        // Generation stops at the end of the context, with its own stop reason.
        let room = context - prompt_ids.len();
        let capped = cfg.max_new_tokens > room;
        cfg.max_new_tokens = cfg.max_new_tokens.min(room);
        let need = prompt_ids.len() + cfg.max_new_tokens;
        let m = &self.model;
        // DoRA: A and B are fixed while generating, so each module's row norms are computed once.
        let cached;
        let lora = if lora.is_dora() {
            let mut l = lora.clone();
            l.cache_dora_norms(ctx, &m.weights)?;
            cached = l;
            &cached
        } else {
            lora
        };
        let mut cache = KvCache::new(ctx, &m.cfg, need.max(1))?;
        let mut g = Generation::new(prompt_ids, &self.tokenizer, &cfg)?;
        let v = m.cfg.vocab;
        while let Some((ids, _pos)) = g.next_input() {
            // A long prompt goes in chunks, so that no attention tensor outgrows a binding.
            let mut logits = None;
            let mut start = 0;
            while start < ids.len() {
                let n = prefill_chunk(ctx.max_binding(), m.cfg.heads, cache.len(), ids.len() - start);
                logits = Some(llama::forward_cached(ctx, &m.cfg, &m.weights, lora, &ids[start..start + n], &mut cache, &m.rope)?);
                start += n;
            }
            let last = ctx.read_f32(&logits.expect("at least one id")).await?;
            g.push_logits(&last[..v], &mut on_text)?;
            if g.next_input().is_some() && stop() {
                return g.end_early(&mut on_text);
            }
        }
        let mut out = g.finish()?;
        if capped && out.stop_reason == crate::generate::StopReason::MaxNewTokens {
            out.stop_reason = crate::generate::StopReason::ContextFull;
        }
        Ok(out)
    }
}

/// How many of `left` prompt ids to feed at position `pos` in one pass: at most 512, and few
/// enough that the attention scores (heads x n x (pos + n) f32) stay within half of `max_binding`.
fn prefill_chunk(max_binding: u64, heads: usize, pos: usize, left: usize) -> usize {
    let fits = |n: usize| (heads as u64) * (n as u64) * ((pos + n) as u64) * 4 <= max_binding / 2;
    let mut n = left.min(512);
    while n > 1 && !fits(n) {
        n /= 2;
    }
    n.max(1)
}

/// The largest values the training settings may take (far beyond any real run; they keep
/// arithmetic on them from overflowing and a typo from allocating without end).
pub mod bounds {
    /// Optimizer steps.
    pub const MAX_STEPS: u64 = crate::train::checkpoint::MAX_STEPS;
    /// Examples per micro-batch, and micro-batches per step.
    pub const MAX_BATCH: usize = 65_536;
    /// Tokens per example.
    pub const MAX_LEN: usize = 1 << 20;
    /// |lora_alpha|.
    pub const MAX_ALPHA: f64 = 1e6;
    /// LoRA rank.
    pub const MAX_RANK: usize = 65_536;
}

/// A training run's settings. [`TrainConfig::default`] follows established practice for
/// LoRA / QLoRA fine-tuning (the QLoRA paper, Unsloth's and mlx-lm's defaults): r 16, alpha 16,
/// all seven projections, dropout 0, AdamW lr 2e-4 without weight decay, a cosine schedule after
/// a linear warmup over 3% of the steps, gradients clipped to norm 1.0, batch 4.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// The adapter (ignored when training starts from an existing adapter, whose own config
    /// is used).
    pub lora: LoraConfig,
    /// Optimizer steps.
    pub steps: u64,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (one mean over all their counted tokens).
    pub grad_accum: usize,
    /// Longest example in tokens (longer ones are cut).
    pub max_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Schedule after the warmup.
    pub schedule: ScheduleKind,
    /// Linear warmup steps; None: 3% of `steps`, rounded up.
    pub warmup_steps: Option<u64>,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW's (beta1, beta2).
    pub betas: (f64, f64),
    /// AdamW's eps.
    pub eps: f64,
    /// Clip the global gradient norm to this (None: no clipping).
    pub max_grad_norm: Option<f32>,
    /// Seed of the adapter init, dropout masks, the validation split and the data order.
    pub seed: u64,
    /// Shuffle the data every epoch (off: the file's order, epoch after epoch).
    pub shuffle: bool,
    /// Count the loss on prompts and user turns too.
    pub train_on_prompt: bool,
    /// Append eos to text / prompt-completion examples.
    pub append_eos: bool,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations.
    pub grad_checkpoint: bool,
    /// Examples held out for validation (None: no validation).
    pub validation: Option<Split>,
    /// Sequence packing (TRL's padding-free packing): training examples are packed into rows of
    /// max_len tokens (best-fit decreasing), position ids restart per example and attention
    /// stays within each example; a batch is then `batch_size` packed rows. Validation stays
    /// one example per row (the same loss either way).
    pub packing: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        let mut lora = LoraConfig::new(16, 16.0);
        lora.lora_dropout = 0.0;
        TrainConfig {
            lora,
            steps: 100,
            batch_size: 4,
            grad_accum: 1,
            max_len: 512,
            lr: 2e-4,
            schedule: ScheduleKind::Cosine,
            warmup_steps: None,
            weight_decay: 0.0,
            betas: (0.9, 0.999),
            eps: 1e-8,
            max_grad_norm: Some(1.0),
            seed: 0,
            shuffle: true,
            train_on_prompt: false,
            append_eos: true,
            grad_checkpoint: false,
            validation: None,
            packing: false,
        }
    }
}

impl TrainConfig {
    /// Warmup steps (the explicit count, else ⌈0.03 · steps⌉).
    pub fn warmup(&self) -> u64 {
        self.warmup_steps.unwrap_or_else(|| Schedule::warmup_from_ratio(0.03, self.steps))
    }

    /// Checks the ranges that need no model.
    pub fn validate(&self) -> Result<()> {
        self.lora.validate()?;
        let bad = |what: String| Err(Error::Invalid(what));
        if self.steps == 0 || self.steps > bounds::MAX_STEPS {
            return bad(format!("steps {} must be in 1..={}", self.steps, bounds::MAX_STEPS));
        }
        if self.batch_size > bounds::MAX_BATCH || self.grad_accum > bounds::MAX_BATCH {
            return bad(format!(
                "batch size {} and gradient accumulation {} must each be at most {}",
                self.batch_size,
                self.grad_accum,
                bounds::MAX_BATCH
            ));
        }
        if self.max_len > bounds::MAX_LEN {
            return bad(format!("max_len {} must be at most {}", self.max_len, bounds::MAX_LEN));
        }
        if !(self.lora.lora_alpha > 0.0 && self.lora.lora_alpha <= bounds::MAX_ALPHA) {
            return bad(format!("lora_alpha {} must be in (0, {}]", self.lora.lora_alpha, bounds::MAX_ALPHA));
        }
        if self.lora.r > bounds::MAX_RANK {
            return bad(format!("the LoRA rank {} must be at most {}", self.lora.r, bounds::MAX_RANK));
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad(format!("batch size {} and gradient accumulation {} must be at least 1", self.batch_size, self.grad_accum));
        }
        if self.max_len < 2 {
            return bad(format!("max_len {} must be at least 2", self.max_len));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("learning rate {} must be positive", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("weight decay {} must be >= 0", self.weight_decay));
        }
        if self.warmup() > self.steps {
            return bad(format!("warmup of {} steps is longer than the run of {}", self.warmup(), self.steps));
        }
        if let Some(n) = self.max_grad_norm {
            if !(n.is_finite() && n > 0.0) {
                return bad(format!("max_grad_norm {n} must be positive"));
            }
        }
        Ok(())
    }

    /// How the run encodes its examples (max_len, train_on_prompt, append_eos); evaluation
    /// with these scores the same tokens training does.
    pub fn encode_options(&self) -> EncodeOptions {
        EncodeOptions { max_len: self.max_len, train_on_prompt: self.train_on_prompt, append_eos: self.append_eos }
    }

    fn opts(&self) -> TrainOpts {
        TrainOpts {
            adamw: AdamW { lr: self.lr, beta1: self.betas.0, beta2: self.betas.1, eps: self.eps, weight_decay: self.weight_decay },
            grad_checkpoint: self.grad_checkpoint,
            start: TrainState::start(self.seed, Schedule::new(self.schedule, self.lr, self.warmup(), self.steps), self.max_grad_norm),
        }
    }
}

/// What one step of a [`TrainSession`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepInfo {
    /// The step just taken, from 1.
    pub step: u64,
    /// Its loss (mean over its counted tokens).
    pub loss: f64,
    /// The learning rate it used.
    pub lr: f64,
    /// The gradient norm before clipping (None without clipping).
    pub grad_norm: Option<f32>,
    /// Tokens the loss counted.
    pub counted_tokens: usize,
    /// Tokens fed to the model (padding included).
    pub input_tokens: usize,
    /// The epoch the next batch comes from (from 0).
    pub epoch: u64,
}

/// A training run over a tokenized data set: the trainer, the batch order and the validation
/// batches.
pub struct TrainSession {
    trainer: Trainer,
    train: TokenizedDataset,
    /// The training examples packed into rows (with `cfg.packing`); the sampler then draws rows.
    packed: Option<Vec<dataset::PackedRow>>,
    val: Vec<Batch>,
    sampler: BatchSampler,
    pad: u32,
    cfg: TrainConfig,
    stats: DatasetStats,
    val_examples: usize,
}

impl TrainSession {
    /// Tokenizes `data` for `model`, holds out the validation split, and starts a run from
    /// `init` (an existing adapter, trained further with its own config) or from a fresh
    /// adapter initialized from `cfg.lora` and `cfg.seed`. Examples longer than the model's
    /// positions, a data set with no counted token, and an adapter that does not fit the model
    /// are errors.
    pub fn new(ctx: &Rc<GpuContext>, model: &LoadedModel, data: &Dataset, cfg: TrainConfig, init: Option<&HostAdapter>) -> Result<Self> {
        cfg.validate()?;
        let lcfg = &model.model.cfg;
        let (lora_cfg, set) = match init {
            Some(h) => {
                h.check(lcfg)?;
                (h.config.clone(), h.upload(ctx)?)
            }
            None => {
                cfg.lora.targets(lcfg)?;
                let mut set = init_lora_set(ctx, lcfg, &cfg.lora, cfg.seed)?;
                // DoRA: the magnitudes start at ||W0 + s·B·A||_row of the base weights.
                crate::lora::init_dora_magnitudes(ctx, &cfg.lora, &mut set, &model.model.weights)?;
                (cfg.lora.clone(), set)
            }
        };
        let trainer = Trainer::new(ctx.clone(), model.model.clone(), lora_cfg, set, cfg.opts());
        Self::with_trainer(model, data, cfg, trainer, None)
    }

    /// Continues the run saved in `ck` (adapter, optimizer, step, RNG and data position) over
    /// the same data set and settings; `cfg.steps` may be larger than the saved run's (the
    /// schedule then spans the new length).
    pub fn resume(ctx: &Rc<GpuContext>, model: &LoadedModel, data: &Dataset, cfg: TrainConfig, ck: &Checkpoint) -> Result<Self> {
        cfg.validate()?;
        // What the checkpoint holds must be what this run would compute with: a setting that
        // differs (e.g. an edited trainer_state.json) is refused, naming it.
        let o = cfg.opts();
        let (hp, s) = (&ck.optimizer.hp, &ck.state);
        let mut diff = Vec::new();
        let mut cmp = |what: &str, saved: String, now: String| {
            if saved != now {
                diff.push(format!("{what}: {} in the checkpoint, {} now", crate::error::quote(&saved), crate::error::quote(&now)));
            }
        };
        let bits = |x: f64| format!("{x:e} (bits {:016x})", x.to_bits());
        cmp("lr", bits(hp.lr), bits(o.adamw.lr));
        cmp("beta1", bits(hp.beta1), bits(o.adamw.beta1));
        cmp("beta2", bits(hp.beta2), bits(o.adamw.beta2));
        cmp("eps", bits(hp.eps), bits(o.adamw.eps));
        cmp("weight_decay", bits(hp.weight_decay), bits(o.adamw.weight_decay));
        cmp("schedule", s.schedule.kind.name().to_owned(), o.start.schedule.kind.name().to_owned());
        cmp("max_grad_norm", format!("{:?}", s.max_grad_norm.map(f32::to_bits)), format!("{:?}", o.start.max_grad_norm.map(f32::to_bits)));
        if s.step > cfg.steps {
            diff.push(format!("step {} is past the run's {} steps", s.step, cfg.steps));
        }
        if s.schedule.total_steps > cfg.steps {
            diff.push(format!("the schedule's total_steps {} is past the run's {} steps", s.schedule.total_steps, cfg.steps));
        }
        if !diff.is_empty() {
            return Err(Error::Invalid(format!(
                "the checkpoint ({}) does not belong to this run: {}",
                crate::train::checkpoint::STATE_FILE,
                diff.join("; ")
            )));
        }
        let mut trainer = Trainer::resume(ctx.clone(), model.model.clone(), ck, cfg.grad_checkpoint)?;
        // The same schedule unless the run was extended (more steps): then it spans the new end.
        trainer.state.schedule = cfg.opts().start.schedule;
        let pos = ck.state.data;
        Self::with_trainer(model, data, cfg, trainer, Some(pos))
    }

    fn with_trainer(
        model: &LoadedModel,
        data: &Dataset,
        cfg: TrainConfig,
        trainer: Trainer,
        resume_at: Option<crate::train::DataPosition>,
    ) -> Result<Self> {
        if cfg.max_len > model.context_len() {
            return Err(Error::Invalid(format!(
                "max_len {} exceeds the model's context of {} positions{}",
                cfg.max_len,
                model.context_len(),
                model.context_note()
            )));
        }
        let enc = model.encoder(cfg.encode_options())?;
        let all = data.tokenize(&enc)?;
        let stats = all.stats();
        if stats.counted_tokens == 0 {
            return Err(Error::format(data.file(), "no example has a token the loss counts (check the format and --train-on-prompt)"));
        }
        let (train, val) = match cfg.validation {
            Some(split) => all.split_validation(split, cfg.seed)?,
            None => (all, TokenizedDataset::from_examples(Vec::new())),
        };
        let pad = dataset::pad_id(&model.tokenizer);
        let packed = if cfg.packing { Some(dataset::pack(train.examples(), cfg.max_len)?) } else { None };
        // What the sampler draws: examples, or packed rows.
        let n_items = packed.as_ref().map_or(train.len(), Vec::len);
        let val_examples = val.len();
        let val = val.batches_in_order(cfg.batch_size, pad)?;
        if let Some(p) = resume_at {
            // The data position follows from the step: step x grad_accum batches, each epoch
            // ceil(n / batch) of them (the last one shorter).
            let per_epoch = n_items.div_ceil(cfg.batch_size).max(1) as u64;
            let batches = trainer.state.step.saturating_mul(cfg.grad_accum as u64);
            let want = (batches / per_epoch, (batches % per_epoch) * cfg.batch_size as u64);
            if (p.epoch, p.index) != want {
                return Err(Error::format(
                    data.file(),
                    format!(
                        "the checkpoint's {}: data position epoch {} index {} does not follow from step {} (expected epoch {} index {} for {} examples in batches of {} x {})",
                        crate::train::checkpoint::STATE_FILE, p.epoch, p.index, trainer.state.step, want.0, want.1, n_items, cfg.batch_size, cfg.grad_accum
                    ),
                ));
            }
        }
        let sampler = match resume_at {
            None => BatchSampler::new(n_items, cfg.batch_size, cfg.shuffle, cfg.seed)?,
            Some(p) => BatchSampler::resume(
                SamplerState { seed: cfg.seed, at: p, n_examples: n_items as u64, shuffle: cfg.shuffle },
                n_items,
                cfg.batch_size,
            )
            .map_err(|e| Error::format(data.file(), format!("the checkpoint's {}: {e}", crate::train::checkpoint::STATE_FILE)))?,
        };
        Ok(TrainSession { trainer, train, packed, val, sampler, pad, cfg, stats, val_examples })
    }

    /// The settings.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Statistics of the whole tokenized data set (before the validation split).
    pub fn data_stats(&self) -> DatasetStats {
        self.stats
    }

    /// (training examples, validation examples).
    pub fn split_sizes(&self) -> (usize, usize) {
        (self.train.len(), self.val_examples)
    }

    /// Packed rows the training examples make (with `packing`), else None.
    pub fn packed_rows(&self) -> Option<usize> {
        self.packed.as_ref().map(Vec::len)
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.trainer.state.step
    }

    /// True once `cfg.steps` steps are done.
    pub fn done(&self) -> bool {
        self.trainer.state.step >= self.cfg.steps
    }

    /// The adapter's config.
    pub fn lora_config(&self) -> &LoraConfig {
        &self.trainer.lora_cfg
    }

    /// The adapter's parameters on the device (for generation with the adapter).
    pub fn lora_set(&self) -> &LoraSet {
        &self.trainer.set
    }

    /// One optimizer step over the next `grad_accum` batches.
    pub async fn step(&mut self) -> Result<StepInfo> {
        let mut micro = Vec::with_capacity(self.cfg.grad_accum);
        let mut input_tokens = 0;
        for _ in 0..self.cfg.grad_accum {
            let idx = self.sampler.next_batch();
            let b = match &self.packed {
                Some(rows) => dataset::collate_packed(&idx.iter().map(|&i| &rows[i]).collect::<Vec<_>>(), self.pad)?,
                None => self.train.batch(&idx, self.pad)?,
            };
            input_tokens += b.ids.len();
            micro.push(b);
        }
        let counted_tokens = micro.iter().map(Batch::n_tokens).sum();
        let pos = self.sampler.state().data_position();
        let r = self.trainer.step(&micro, pos).await?;
        Ok(StepInfo {
            step: self.trainer.state.step,
            loss: r.loss,
            lr: r.lr,
            grad_norm: r.grad_norm,
            counted_tokens,
            input_tokens,
            epoch: pos.epoch,
        })
    }

    /// The validation loss (mean over the counted tokens of the held-out examples), None when
    /// nothing is held out.
    pub async fn validation_loss(&self) -> Result<Option<f64>> {
        if self.val.is_empty() {
            return Ok(None);
        }
        self.trainer.eval_loss(&self.val).await.map(Some)
    }

    /// [`TrainSession::validation_loss`] calling `progress(held-out sequences done, in all)`
    /// after each batch; it returning false abandons the evaluation (None).
    pub async fn validation_loss_with(&self, progress: impl FnMut(usize, usize) -> bool) -> Result<Option<f64>> {
        if self.val.is_empty() {
            return Ok(None);
        }
        self.trainer.eval_loss_with(&self.val, progress).await
    }

    /// The adapter as it stands, on the host.
    pub async fn adapter(&self, ctx: &GpuContext) -> Result<HostAdapter> {
        HostAdapter::download(ctx, &self.trainer.lora_cfg, &self.trainer.set).await
    }

    /// The adapter as PEFT's two files: (adapter_config.json text, adapter_model.safetensors
    /// bytes).
    pub async fn adapter_files(&self, ctx: &GpuContext, base_model_name: Option<&str>) -> Result<(String, Vec<u8>)> {
        let mut h = self.adapter(ctx).await?;
        if let Some(n) = base_model_name {
            h.config.base_model_name_or_path = Some(n.to_owned());
        }
        crate::lora::peft::host_adapter_to_bytes(&h, &self.trainer.model().cfg)
    }

    /// The run's state as a checkpoint (adapter, optimizer moments, step, RNG, data position).
    pub async fn checkpoint(&self) -> Result<Checkpoint> {
        self.trainer.checkpoint().await
    }
}

/// A data set tokenized once for evaluation (with a training run's encoding options) and cut
/// into batches in file order.
pub struct EvalSet {
    batches: Vec<Batch>,
    examples: usize,
    counted: usize,
    truncated: usize,
}

impl EvalSet {
    /// Tokenizes `data` with `opts` (the run's max_len, train_on_prompt and append_eos) and
    /// batches it `batch_size` examples at a time. A set with no counted token is an error.
    pub fn new(model: &LoadedModel, data: &Dataset, opts: EncodeOptions, batch_size: usize) -> Result<Self> {
        let enc = model.encoder(opts)?;
        let t = data.tokenize(&enc)?;
        let stats = t.stats();
        let pad = dataset::pad_id(&model.tokenizer);
        let batches = t.batches_in_order(batch_size, pad)?;
        let counted = batches.iter().map(Batch::n_tokens).sum();
        if counted == 0 {
            return Err(Error::format(data.file(), "no example has a token the loss counts (check the format and --train-on-prompt)"));
        }
        Ok(EvalSet { batches, examples: t.len(), counted, truncated: stats.truncated })
    }

    /// Examples in the set.
    pub fn examples(&self) -> usize {
        self.examples
    }

    /// Tokens the loss counts.
    pub fn counted_tokens(&self) -> usize {
        self.counted
    }

    /// Examples cut to max_len.
    pub fn truncated(&self) -> usize {
        self.truncated
    }

    /// Mean loss over the counted tokens of every batch together (one mean, as transformers'
    /// loss over one batch holding all of them) under `lora` (no dropout).
    pub async fn loss(&self, ctx: &Rc<GpuContext>, model: &LoadedModel, lora: &LoraSet) -> Result<f64> {
        crate::train::trainer::eval_loss(ctx, &model.model, lora, &self.batches).await
    }
}

/// Mean loss of `data` under `lora` (no dropout), encoded with `opts` as a training run with
/// those options encodes it: (loss, counted tokens).
pub async fn evaluate(
    ctx: &Rc<GpuContext>,
    model: &LoadedModel,
    lora: &LoraSet,
    data: &Dataset,
    opts: EncodeOptions,
    batch_size: usize,
) -> Result<(f64, usize)> {
    let set = EvalSet::new(model, data, opts, batch_size)?;
    Ok((set.loss(ctx, model, lora).await?, set.counted_tokens()))
}
