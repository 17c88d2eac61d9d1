//! Model files in, host tensors out (no shader; CPU only, no `std::fs` outside the native-only
//! helpers): safetensors (`safetensors`), Hugging Face folders (`hf`), GGUF (`gguf`). Both model
//! loaders produce a [`HostModel`]: the config plus every weight as f32 (or NF4 for
//! pre-quantized bitsandbytes projections) under its Hugging Face name and PyTorch shape, from
//! which [`HostModel::upload`] makes the decoder's [`LlamaWeights`].

pub mod bnb;
pub mod files;
pub mod gguf;
pub mod gguf_write;
pub mod half;
pub mod hf;
pub mod quantized;
pub mod safetensors;
pub mod safetensors_write;
pub mod sha256;

use crate::gpu::{GpuContext, HostRows, RowShards};
use crate::model::config::{names, ModelConfig};
use crate::ops::lora::Frozen;
use crate::ops::nf4::Nf4Weight;
use crate::model::llama::{InputEmbedding, LayerWeights, LlamaWeights, TARGETS};
use crate::quant::Nf4Tensor;
use crate::{Error, Result};

pub use gguf::{load_gguf, GgufFile, GgufModel, GgufValue, GgmlType};
pub use hf::{load_hf, ModelFiles};
#[cfg(not(target_arch = "wasm32"))]
pub use hf::{load_hf_dir, MmapDir};
pub use safetensors::SafeTensorsFile;

/// An f32 tensor on the host: row-major `data` of `shape` (PyTorch order).
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Shape, PyTorch order.
    pub shape: Vec<usize>,
    /// shape.product() values, row-major.
    pub data: Vec<f32>,
}

/// A projection weight on the host: f32, or NF4 as read from a bitsandbytes checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub enum HostWeight {
    /// Plain f32 (out, in).
    F32(HostTensor),
    /// bitsandbytes NF4 (its `shape` is (out, in)).
    Nf4(Nf4Tensor),
}

impl HostWeight {
    /// The (out, in) shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            HostWeight::F32(t) => &t.shape,
            HostWeight::Nf4(t) => &t.shape,
        }
    }
    /// Borrowed, as a [`TensorRef`].
    pub fn as_ref(&self) -> TensorRef<'_> {
        match self {
            HostWeight::F32(t) => TensorRef::F32(t),
            HostWeight::Nf4(t) => TensorRef::Nf4(t),
        }
    }
    /// The f32 tensor, None for NF4.
    pub fn as_f32(&self) -> Option<&HostTensor> {
        match self {
            HostWeight::F32(t) => Some(t),
            HostWeight::Nf4(_) => None,
        }
    }
    /// The NF4 tensor, None for f32.
    pub fn as_nf4(&self) -> Option<&Nf4Tensor> {
        match self {
            HostWeight::F32(_) => None,
            HostWeight::Nf4(t) => Some(t),
        }
    }
    /// The values as f32 (NF4 dequantized: code[q] * absmax[block], as bitsandbytes does).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            HostWeight::F32(t) => t.data.clone(),
            HostWeight::Nf4(t) => t.dequantize(),
        }
    }
}

/// One decoder layer on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostLayer {
    /// `input_layernorm.weight` (C).
    pub attn_norm: HostTensor,
    /// q, k, v, o, gate, up, down weights (out, in), in [`TARGETS`] order.
    pub proj: [HostWeight; 7],
    /// The bias (out) of each projection that has one ([`ModelConfig::proj_has_bias`]).
    pub proj_bias: [Option<HostTensor>; 7],
    /// `post_attention_layernorm.weight` (C).
    pub mlp_norm: HostTensor,
}

/// A borrowed tensor of a [`HostModel`], looked up by Hugging Face name.
#[derive(Clone, Copy, Debug)]
pub enum TensorRef<'a> {
    /// An f32 tensor.
    F32(&'a HostTensor),
    /// An NF4 projection weight.
    Nf4(&'a Nf4Tensor),
}

/// A whole model on the host, every tensor checked against its config.
#[derive(Clone, Debug, PartialEq)]
pub struct HostModel {
    /// The parsed config (from config.json, or built from GGUF metadata).
    pub config: ModelConfig,
    /// `model.embed_tokens.weight` (V, C).
    pub embed: HostTensor,
    /// The decoder layers.
    pub layers: Vec<HostLayer>,
    /// `model.norm.weight` (C).
    pub final_norm: HostTensor,
    /// `lm_head.weight` (V, C); None when tied to the embedding.
    pub lm_head: Option<HostTensor>,
    /// Tensors of the files that the model does not use (e.g. an `lm_head.weight` stored next
    /// to tied embeddings, `rotary_emb.inv_freq`), by their name in the file (Hugging Face names
    /// for folders, llama.cpp names for GGUF), sorted.
    pub unused: Vec<String>,
}

/// Where [`HostModel::build`] gets each tensor: `fetch(name, shape, projection)` returns the
/// tensor `name` (a Hugging Face name) of PyTorch shape `shape`, or an error naming the file and
/// tensor when it is missing or has another shape. Only projection weights may be NF4.
pub(crate) trait TensorSource {
    fn fetch(&mut self, name: &str, shape: &[usize], projection: bool) -> Result<HostWeight>;
    /// (the file that gives the layer count, that count's field name, the number of tensors
    /// the files hold): checked by [`HostModel::build`] before it allocates anything per layer.
    fn present(&self) -> (String, &'static str, usize);
}

/// A source whose f32 projections come back quantized to NF4 as they are read (QLoRA's load):
/// one projection is f32 on the host at a time, not the whole model (an 8B checkpoint's
/// projections take 26 GiB in f32, 3.4 GiB in NF4).
struct Quantizing<'a> {
    inner: &'a mut dyn TensorSource,
    blocksize: usize,
    double_quant: bool,
}

impl TensorSource for Quantizing<'_> {
    fn fetch(&mut self, name: &str, shape: &[usize], projection: bool) -> Result<HostWeight> {
        match self.inner.fetch(name, shape, projection)? {
            HostWeight::F32(t) if projection => {
                Ok(HostWeight::Nf4(crate::quant::nf4::quantize_nf4(&t.data, &t.shape, self.blocksize, self.double_quant)?))
            }
            w => Ok(w),
        }
    }
    fn present(&self) -> (String, &'static str, usize) {
        self.inner.present()
    }
}

impl HostModel {
    /// As [`HostModel::build`], with every f32 projection quantized to NF4 (`blocksize`,
    /// `double_quant`) as it is read when `quantize` is given: the same NF4 bits
    /// [`HostModel::upload_nf4`] would make, without the whole model in f32 on the host first.
    pub(crate) fn build_with(config: ModelConfig, src: &mut dyn TensorSource, quantize: Option<(usize, bool)>) -> Result<Self> {
        match quantize {
            None => Self::build(config, src),
            Some((blocksize, double_quant)) => Self::build(config, &mut Quantizing { inner: src, blocksize, double_quant }),
        }
    }

    /// Assembles the model from `src`, asking for every tensor of
    /// [`ModelConfig::tensor_shapes`].
    pub(crate) fn build(config: ModelConfig, src: &mut dyn TensorSource) -> Result<Self> {
        let (file, field, present) = src.present();
        config.check_sizes(&file, field, Some(present))?;
        let c = config.hidden_size;
        let plain = |src: &mut dyn TensorSource, name: &str, shape: &[usize]| -> Result<HostTensor> {
            match src.fetch(name, shape, false)? {
                HostWeight::F32(t) => Ok(t),
                HostWeight::Nf4(_) => Err(Error::Invalid(format!("tensor `{name}` cannot be NF4"))),
            }
        };
        let embed = plain(src, names::EMBED, &[config.vocab_size, c])?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let attn_norm = plain(src, &names::attn_norm(i), &[c])?;
            let mut proj = Vec::with_capacity(7);
            let mut proj_bias: [Option<HostTensor>; 7] = Default::default();
            for (m, bias) in proj_bias.iter_mut().enumerate() {
                let (o, inp) = config.proj_shape(m);
                proj.push(src.fetch(&names::proj(i, m), &[o, inp], true)?);
                if config.proj_has_bias(m) {
                    *bias = Some(plain(src, &names::proj_bias(i, m), &[o])?);
                }
            }
            let mlp_norm = plain(src, &names::mlp_norm(i), &[c])?;
            let proj: [HostWeight; 7] = proj.try_into().expect("seven projections");
            layers.push(HostLayer { attn_norm, proj, proj_bias, mlp_norm });
        }
        let final_norm = plain(src, names::FINAL_NORM, &[c])?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(plain(src, names::LM_HEAD, &[config.vocab_size, c])?)
        };
        Ok(HostModel { config, embed, layers, final_norm, lm_head, unused: Vec::new() })
    }

    /// The tensor with Hugging Face name `name` (e.g. `model.layers.0.self_attn.q_proj.weight`),
    /// None if the model has no such tensor.
    pub fn get(&self, name: &str) -> Option<TensorRef<'_>> {
        Some(match Slot::of(name)? {
            Slot::Embed => TensorRef::F32(&self.embed),
            Slot::FinalNorm => TensorRef::F32(&self.final_norm),
            Slot::LmHead => TensorRef::F32(self.lm_head.as_ref()?),
            Slot::AttnNorm(i) => TensorRef::F32(&self.layers.get(i)?.attn_norm),
            Slot::MlpNorm(i) => TensorRef::F32(&self.layers.get(i)?.mlp_norm),
            Slot::Proj(i, m) => self.layers.get(i)?.proj[m].as_ref(),
            Slot::Bias(i, m) => TensorRef::F32(self.layers.get(i)?.proj_bias[m].as_ref()?),
        })
    }

    /// The tensor `name` as f32 values (NF4 dequantized), None if absent.
    pub fn get_f32(&self, name: &str) -> Option<Vec<f32>> {
        self.get(name).map(|t| match t {
            TensorRef::F32(t) => t.data.clone(),
            TensorRef::Nf4(t) => t.dequantize(),
        })
    }

    /// Whether any projection is NF4.
    pub fn has_nf4(&self) -> bool {
        self.layers.iter().any(|l| l.proj.iter().any(|p| p.as_nf4().is_some()))
    }

    /// Uploads the weights for the decoder in their PyTorch shapes. Projections stored as NF4
    /// (a bitsandbytes checkpoint) stay NF4 on the device; projection biases (Qwen2, Llama with
    /// attention_bias / mlp_bias) are uploaded as f32.
    pub fn upload(&self, ctx: &GpuContext) -> Result<LlamaWeights> {
        self.upload_with(ctx, None, true)
    }

    /// Uploads for QLoRA: every f32 projection is quantized to NF4 first (`blocksize`, double
    /// quantization when `double_quant`), bit-exact with bitsandbytes; norms, the embedding and
    /// the lm_head stay f32 (see docs/nf4.md), and so do projection biases (bitsandbytes keeps a
    /// `Linear4bit` bias in full precision). Projections already NF4 are kept as they are.
    pub fn upload_nf4(&self, ctx: &GpuContext, blocksize: usize, double_quant: bool) -> Result<LlamaWeights> {
        self.upload_with(ctx, Some((blocksize, double_quant)), true)
    }

    /// Checks, before anything is uploaded, that every tensor that must live in one buffer fits
    /// the device's largest binding (the embedding and lm_head are sharded and need not): an
    /// `Error::Limit` naming the first tensor that does not, its bytes and the limit.
    pub fn check_fits(&self, ctx: &GpuContext, quantize: Option<(usize, bool)>) -> Result<()> {
        let projs = self.layers.iter().enumerate().flat_map(|(i, l)| l.proj.iter().enumerate().map(move |(m, p)| (i, m, p.shape(), p.as_nf4().is_some())));
        check_projections_fit(ctx, quantize, projs)
    }

    /// Uploads as [`HostModel::upload`] (`quantize` None) or [`HostModel::upload_nf4`]
    /// (`Some((blocksize, double_quant))`). The embedding and lm_head are row-sharded to fit the
    /// device's largest binding, and stored in bf16 or f16 when `tables_16bit` and every value
    /// is exact in it (a 16-bit checkpoint: lossless), else in f32.
    pub fn upload_with(&self, ctx: &GpuContext, quantize: Option<(usize, bool)>, tables_16bit: bool) -> Result<LlamaWeights> {
        self.upload_with_progress(ctx, quantize, tables_16bit, &mut |_, _| {})
    }

    /// Tensors [`HostModel::upload_with`] uploads (norms, projections and their biases, the
    /// embedding, the lm_head): the `total` of its progress reports.
    pub fn tensor_count(&self) -> usize {
        let per_layer: usize = self.layers.iter().map(|l| 2 + l.proj.len() + l.proj_bias.iter().filter(|b| b.is_some()).count()).sum();
        per_layer + 2 + usize::from(self.lm_head.is_some())
    }

    /// As [`HostModel::upload_with`], calling `progress(done, total)` after each tensor is on
    /// the device (total: [`HostModel::tensor_count`]).
    pub fn upload_with_progress(
        &self,
        ctx: &GpuContext,
        quantize: Option<(usize, bool)>,
        tables_16bit: bool,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<LlamaWeights> {
        self.check_fits(ctx, quantize)?;
        let total = self.tensor_count();
        let mut b = WeightsBuilder::new(&self.config, self.lm_head.is_some(), quantize, tables_16bit);
        let mut put = |name: String, t: TensorRef| -> Result<()> {
            b.put(ctx, &name, t)?;
            progress(b.uploaded(), total);
            Ok(())
        };
        for (i, l) in self.layers.iter().enumerate() {
            for (m, p) in l.proj.iter().enumerate() {
                put(names::proj(i, m), p.as_ref())?;
            }
            for (m, bias) in l.proj_bias.iter().enumerate() {
                if let Some(t) = bias {
                    put(names::proj_bias(i, m), TensorRef::F32(t))?;
                }
            }
            put(names::attn_norm(i), TensorRef::F32(&l.attn_norm))?;
            put(names::mlp_norm(i), TensorRef::F32(&l.mlp_norm))?;
        }
        put(names::EMBED.to_owned(), TensorRef::F32(&self.embed))?;
        put(names::FINAL_NORM.to_owned(), TensorRef::F32(&self.final_norm))?;
        if let Some(t) = &self.lm_head {
            put(names::LM_HEAD.to_owned(), TensorRef::F32(t))?;
        }
        b.finish()
    }
}

/// Checks, before anything is uploaded, that every projection (layer, module, (out, in) shape,
/// already NF4) fits the device's largest binding as it will be stored: an `Error::Limit`
/// naming the first that does not, its bytes and the limit.
pub fn check_projections_fit<'a>(
    ctx: &GpuContext,
    quantize: Option<(usize, bool)>,
    projs: impl Iterator<Item = (usize, usize, &'a [usize], bool)>,
) -> Result<()> {
    let max = ctx.max_binding();
    let check = |name: String, bytes: u64, what: &str| -> Result<()> {
        if bytes > max {
            return Err(Error::Limit {
                op: "load",
                msg: format!(
                    "tensor `{name}` needs {bytes} bytes {what}, over the device's largest storage binding of {max} bytes{}",
                    if what.contains("f32") && quantize.is_none() { " (--qlora holds projections in 4 bits)" } else { "" }
                ),
            });
        }
        Ok(())
    };
    for (i, m, shape, nf4) in projs {
        let n = shape.iter().product::<usize>() as u64;
        if !nf4 && quantize.is_none() {
            // f32 projections are row-sharded: four rows must fit (the block granularity).
            check(names::proj(i, m), 16 * shape[1] as u64, "for four rows in f32")?;
        } else {
            check(names::proj(i, m), n.div_ceil(2), "in NF4")?;
        }
    }
    Ok(())
}

/// Which weight of the decoder a Hugging Face tensor name is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Embed,
    FinalNorm,
    LmHead,
    AttnNorm(usize),
    MlpNorm(usize),
    /// (layer, projection in [`TARGETS`] order).
    Proj(usize, usize),
    Bias(usize, usize),
}

/// (layer, projection in [`TARGETS`] order) of a projection weight's Hugging Face name.
pub fn proj_index(name: &str) -> Option<(usize, usize)> {
    match Slot::of(name)? {
        Slot::Proj(i, m) => Some((i, m)),
        _ => None,
    }
}

impl Slot {
    /// The slot of `name` (e.g. `model.layers.0.self_attn.q_proj.weight`), None for a name that
    /// is no decoder weight (or a layer index not written canonically).
    fn of(name: &str) -> Option<Slot> {
        match name {
            names::EMBED => return Some(Slot::Embed),
            names::FINAL_NORM => return Some(Slot::FinalNorm),
            names::LM_HEAD => return Some(Slot::LmHead),
            _ => {}
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (idx, rest) = rest.split_once('.')?;
        let canonical = !idx.is_empty() && idx.bytes().all(|b| b.is_ascii_digit()) && (idx == "0" || !idx.starts_with('0'));
        if !canonical {
            return None;
        }
        let i = idx.parse::<usize>().ok()?;
        match rest {
            "input_layernorm.weight" => return Some(Slot::AttnNorm(i)),
            "post_attention_layernorm.weight" => return Some(Slot::MlpNorm(i)),
            _ => {}
        }
        let (module, kind) = rest.rsplit_once('.')?;
        let m = (0..TARGETS.len()).find(|&m| module == names::proj_local(m))?;
        match kind {
            "weight" => Some(Slot::Proj(i, m)),
            "bias" => Some(Slot::Bias(i, m)),
            _ => None,
        }
    }
}

#[derive(Default)]
struct PartLayer {
    attn_norm: Option<crate::gpu::Tensor>,
    proj: [Option<Frozen>; 7],
    bias: [Option<crate::gpu::Tensor>; 7],
    mlp_norm: Option<crate::gpu::Tensor>,
}

/// The decoder's weights uploaded one named tensor at a time, in any order, each as soon as it
/// is given ([`WeightsBuilder::put`]): what [`HostModel::upload_with`] uploads (it uses this),
/// for a loader that has one tensor at a time on the host (a streamed GGUF file). Projections
/// are quantized to NF4 as they are put when `quantize` is given; an untied input embedding is
/// the one weight kept in host memory.
pub struct WeightsBuilder {
    vocab: usize,
    hidden: usize,
    /// The tensors expected, by Hugging Face name, with their shapes.
    shapes: std::collections::BTreeMap<String, Vec<usize>>,
    untied: bool,
    quantize: Option<(usize, bool)>,
    tables_16bit: bool,
    embed: Option<InputEmbedding>,
    layers: Vec<PartLayer>,
    final_norm: Option<crate::gpu::Tensor>,
    lm_head: Option<RowShards>,
    uploaded: usize,
}

impl WeightsBuilder {
    /// A builder for `config`'s tensors ([`ModelConfig::tensor_shapes`], with an lm_head when
    /// `lm_head`), uploaded as [`HostModel::upload_with`] does with `quantize` and `tables_16bit`.
    pub fn new(config: &ModelConfig, lm_head: bool, quantize: Option<(usize, bool)>, tables_16bit: bool) -> Self {
        let mut shapes: std::collections::BTreeMap<String, Vec<usize>> = config.tensor_shapes().into_iter().collect();
        if lm_head {
            shapes.insert(names::LM_HEAD.to_owned(), vec![config.vocab_size, config.hidden_size]);
        } else {
            shapes.remove(names::LM_HEAD);
        }
        WeightsBuilder {
            vocab: config.vocab_size,
            hidden: config.hidden_size,
            shapes,
            untied: lm_head,
            quantize,
            tables_16bit,
            embed: None,
            layers: (0..config.num_hidden_layers).map(|_| PartLayer::default()).collect(),
            final_norm: None,
            lm_head: None,
            uploaded: 0,
        }
    }

    /// The tensors this builder expects: the `total` of a load's progress.
    pub fn tensor_count(&self) -> usize {
        self.shapes.len()
    }

    /// Tensors put so far.
    pub fn uploaded(&self) -> usize {
        self.uploaded
    }

    /// Uploads the tensor `name` (a Hugging Face name): a projection quantized to NF4 first when
    /// the builder quantizes, the embedding and lm_head row-sharded (16-bit where lossless), the
    /// untied embedding kept on the host. Errors for a name the model has not, a shape other
    /// than the config's, NF4 where f32 is needed, or a tensor given twice.
    pub fn put(&mut self, ctx: &GpuContext, name: &str, t: TensorRef) -> Result<()> {
        let expected = self.shapes.get(name).ok_or_else(|| Error::Invalid(format!("tensor `{name}` is not a weight of this model")))?;
        let shape = match t {
            TensorRef::F32(t) => &t.shape,
            TensorRef::Nf4(t) => &t.shape,
        };
        if shape != expected {
            return Err(Error::Invalid(format!("tensor `{name}`: shape {shape:?}, expected {expected:?}")));
        }
        let slot = Slot::of(name).ok_or_else(|| Error::Invalid(format!("tensor `{name}` is not a weight of this model")))?;
        let f32 = || match t {
            TensorRef::F32(t) => Ok(t),
            TensorRef::Nf4(_) => Err(Error::Invalid(format!("tensor `{name}` cannot be NF4"))),
        };
        let twice = || Error::Invalid(format!("tensor `{name}` was given twice"));
        let (v, c) = (self.vocab, self.hidden);
        let up = |t: &HostTensor| ctx.upload_f32(&t.data, &t.shape);
        fn fill<T>(dst: &mut Option<T>, make: impl FnOnce() -> Result<T>, twice: impl FnOnce() -> Error) -> Result<()> {
            if dst.is_some() {
                return Err(twice());
            }
            *dst = Some(make()?);
            Ok(())
        }
        match slot {
            Slot::Embed => {
                let t = f32()?;
                // An untied input embedding is only gathered from: it stays in host memory.
                let untied = self.untied;
                let tables_16bit = self.tables_16bit;
                fill(
                    &mut self.embed,
                    || {
                        Ok(if untied {
                            InputEmbedding::Host(std::rc::Rc::new(HostRows::new(&t.data, v, c)?))
                        } else {
                            InputEmbedding::Device(RowShards::upload_auto(ctx, &t.data, v, c, tables_16bit)?)
                        })
                    },
                    twice,
                )?
            }
            Slot::LmHead => {
                let t = f32()?;
                let tables_16bit = self.tables_16bit;
                fill(&mut self.lm_head, || RowShards::upload_auto(ctx, &t.data, v, c, tables_16bit), twice)?
            }
            Slot::FinalNorm => fill(&mut self.final_norm, || up(f32()?), twice)?,
            Slot::AttnNorm(i) => fill(&mut self.layers[i].attn_norm, || up(f32()?), twice)?,
            Slot::MlpNorm(i) => fill(&mut self.layers[i].mlp_norm, || up(f32()?), twice)?,
            Slot::Bias(i, m) => fill(&mut self.layers[i].bias[m], || up(f32()?), twice)?,
            Slot::Proj(i, m) => {
                let quantize = self.quantize;
                let make = || -> Result<Frozen> {
                    Ok(match (t, quantize) {
                        (TensorRef::F32(t), None) => Frozen::upload_f32(ctx, &t.data, t.shape[0], t.shape[1])?,
                        (TensorRef::F32(t), Some((bs, dq))) => {
                            Frozen::Nf4(Nf4Weight::upload(ctx, &crate::quant::nf4::quantize_nf4(&t.data, &t.shape, bs, dq)?)?)
                        }
                        (TensorRef::Nf4(t), _) => Frozen::Nf4(Nf4Weight::upload(ctx, t)?),
                    })
                };
                fill(&mut self.layers[i].proj[m], make, twice)?
            }
        }
        self.uploaded += 1;
        Ok(())
    }

    /// The weights, once every tensor is put; an error naming the first one missing.
    pub fn finish(self) -> Result<LlamaWeights> {
        if self.uploaded != self.shapes.len() {
            let given = |n: &str| match Slot::of(n) {
                Some(Slot::Embed) => self.embed.is_some(),
                Some(Slot::FinalNorm) => self.final_norm.is_some(),
                Some(Slot::LmHead) => self.lm_head.is_some(),
                Some(Slot::AttnNorm(i)) => self.layers[i].attn_norm.is_some(),
                Some(Slot::MlpNorm(i)) => self.layers[i].mlp_norm.is_some(),
                Some(Slot::Proj(i, m)) => self.layers[i].proj[m].is_some(),
                Some(Slot::Bias(i, m)) => self.layers[i].bias[m].is_some(),
                None => false,
            };
            let missing = self.shapes.keys().find(|n| !given(n)).cloned().unwrap_or_default();
            return Err(Error::Invalid(format!("tensor `{missing}` was never given ({} of {} uploaded)", self.uploaded, self.shapes.len())));
        }
        let missing = || Error::Invalid("a weight was never given".into());
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in self.layers {
            let proj: Vec<Frozen> = l.proj.into_iter().collect::<Option<_>>().ok_or_else(missing)?;
            layers.push(LayerWeights {
                attn_norm: l.attn_norm.ok_or_else(missing)?,
                proj: proj.try_into().map_err(|_| Error::Invalid("seven projections".into()))?,
                bias: l.bias,
                mlp_norm: l.mlp_norm.ok_or_else(missing)?,
            });
        }
        Ok(LlamaWeights { embed: self.embed.ok_or_else(missing)?, layers, final_norm: self.final_norm.ok_or_else(missing)?, lm_head: self.lm_head })
    }
}
