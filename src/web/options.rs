//! The browser API's option objects (JSON, camelCase keys, as `web/pkg/qlora_webgpu.d.ts`
//! declares them: `ModelOptions`, `TrainOptions`, `GenerateOptions`) turned into the library's
//! settings, and the checks that a model and a run fit the GPU adapter's limits. Compiled on
//! every target (no shader, no wasm-bindgen), so that a native program given the same JSON runs
//! the same settings as the page (`examples/web_native.rs`, which the browser test compares
//! with).
//!
//! Every option is optional (absent or null: the library's default); an unknown key or a value
//! of the wrong type or range is an error naming the option.

use crate::data::dataset::Split;
use crate::generate::SamplingConfig;
use crate::gpu::GpuInfo;
use crate::lora::config::TargetModules;
use crate::model::config::ModelConfig;
use crate::session::{BaseQuant, TrainConfig};
use crate::train::ScheduleKind;
use crate::{Error, Result};
use serde_json::{Map, Value};

/// Positions prepared when `ModelOptions.maxPositions` is not given: the model's
/// `max_position_embeddings`, at most this.
pub const DEFAULT_MAX_POSITIONS: usize = 2048;

/// The keys of `TrainOptions`.
pub const TRAIN_KEYS: [&str; 24] = [
    "rank", "alpha", "dropout", "targetModules", "useRslora", "useDora", "layersToTransform", "steps", "batchSize", "gradAccum",
    "maxLen", "lr", "schedule", "warmupSteps", "weightDecay", "beta1", "beta2", "eps", "maxGradNorm", "seed", "shuffle",
    "trainOnPrompt", "appendEos", "gradCheckpoint",
];
/// Keys of `TrainOptions` besides [`TRAIN_KEYS`]: `validation` (a fraction in (0, 1) or a count).
const TRAIN_EXTRA_KEYS: [&str; 2] = ["validation", "packing"];
/// The keys of `ModelOptions`.
pub const MODEL_KEYS: [&str; 4] = ["quant", "maxPositions", "blocksize", "name"];
/// The keys of `GenerateOptions`.
pub const GENERATE_KEYS: [&str; 7] = ["maxNewTokens", "temperature", "topK", "topP", "seed", "stop", "skipSpecialTokens"];

fn bad(what: &str, msg: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{what}: {msg}"))
}

/// The object's fields, checked against `keys` (null or absent: empty).
fn object<'a>(v: &'a Value, what: &str, keys: &[&str]) -> Result<Option<&'a Map<String, Value>>> {
    match v {
        Value::Null => Ok(None),
        Value::Object(m) => {
            if let Some(k) = m.keys().find(|k| !keys.contains(&k.as_str())) {
                return Err(bad(what, format!("unknown option `{k}` (known: {})", keys.join(", "))));
            }
            Ok(Some(m))
        }
        other => Err(bad(what, format!("expected an object, got {}", crate::data::dataset::json_kind(other)))),
    }
}


/// One object's options, read with the option named in errors (`what.key`).
struct Opts<'a> {
    what: &'a str,
    m: Option<&'a Map<String, Value>>,
}

impl<'a> Opts<'a> {
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.m.and_then(|m| m.get(k)).filter(|v| !v.is_null())
    }
    fn name(&self, k: &str) -> String {
        format!("{}.{k}", self.what)
    }
    fn f64(&self, k: &str) -> Result<Option<f64>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_f64().filter(|x| x.is_finite()).map(Some).ok_or_else(|| bad(&self.name(k), "not a finite number")),
            Some(v) => Err(bad(&self.name(k), format!("expected a number, got {}", crate::data::dataset::json_kind(v)))),
        }
    }
    /// A non-negative integer (a JS number with no fraction, at most 2^53).
    fn uint(&self, k: &str) -> Result<Option<u64>> {
        match self.f64(k)? {
            None => Ok(None),
            Some(x) if x >= 0.0 && x.fract() == 0.0 && x <= 9007199254740992.0 => Ok(Some(x as u64)),
            Some(x) => Err(bad(&self.name(k), format!("expected a non-negative integer, got {x}"))),
        }
    }
    fn usize(&self, k: &str) -> Result<Option<usize>> {
        self.uint(k)?.map(|x| usize::try_from(x).map_err(|_| bad(&self.name(k), format!("{x} is too large")))).transpose()
    }
    fn bool(&self, k: &str) -> Result<Option<bool>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(bad(&self.name(k), format!("expected true or false, got {}", crate::data::dataset::json_kind(v)))),
        }
    }
    fn str(&self, k: &str) -> Result<Option<&'a str>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(bad(&self.name(k), format!("expected a string, got {}", crate::data::dataset::json_kind(v)))),
        }
    }
    fn strings(&self, k: &str) -> Result<Option<Vec<String>>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| v.as_str().map(str::to_owned).ok_or_else(|| bad(&format!("{}[{i}]", self.name(k)), "expected a string")))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(bad(&self.name(k), format!("expected an array of strings, got {}", crate::data::dataset::json_kind(v)))),
        }
    }
}

/// `TrainOptions` (JSON) as a [`TrainConfig`]: each given option replaces the default of
/// [`TrainConfig::default`]; `rank`/`alpha`/`dropout`/`targetModules`/`useRslora`/`useDora`/
/// `layersToTransform` set the LoRA config ("all-linear", a list of module names, or a string
/// that is a regular expression, as PEFT reads `target_modules`); `maxGradNorm: 0` turns
/// clipping off; `validation` below 1 is a fraction of the examples, from 1 on a count.
/// The result is validated ([`TrainConfig::validate`]).
pub fn train_config(v: &Value) -> Result<TrainConfig> {
    let what = "TrainOptions";
    let mut keys: Vec<&str> = TRAIN_KEYS.to_vec();
    keys.extend(TRAIN_EXTRA_KEYS);
    let o = Opts { what, m: object(v, what, &keys)? };
    let mut c = TrainConfig::default();
    if let Some(r) = o.usize("rank")? {
        c.lora.r = r;
    }
    if let Some(a) = o.f64("alpha")? {
        c.lora.lora_alpha = a;
    }
    if let Some(d) = o.f64("dropout")? {
        c.lora.lora_dropout = d;
    }
    if let Some(t) = o.get("targetModules") {
        c.lora.target_modules = match t {
            Value::String(s) if s == "all-linear" => TargetModules::AllLinear,
            Value::String(s) => TargetModules::Regex(s.clone()),
            Value::Array(_) => TargetModules::Names(o.strings("targetModules")?.unwrap_or_default()),
            v => return Err(bad(&o.name("targetModules"), format!("expected \"all-linear\", a list of names or a regex, got {}", crate::data::dataset::json_kind(v)))),
        };
    }
    if let Some(b) = o.bool("useRslora")? {
        c.lora.use_rslora = b;
    }
    if let Some(b) = o.bool("useDora")? {
        c.lora.use_dora = b;
    }
    if let Some(Value::Array(a)) = o.get("layersToTransform") {
        let mut layers = Vec::with_capacity(a.len());
        for (i, x) in a.iter().enumerate() {
            let n = x.as_u64().ok_or_else(|| bad(&format!("{what}.layersToTransform[{i}]"), "expected a layer index"))?;
            layers.push(n as usize);
        }
        c.lora.layers_to_transform = Some(layers);
    } else if let Some(v) = o.get("layersToTransform") {
        return Err(bad(&o.name("layersToTransform"), format!("expected an array of layer indices, got {}", crate::data::dataset::json_kind(v))));
    }
    if let Some(s) = o.uint("steps")? {
        c.steps = s;
    }
    if let Some(b) = o.usize("batchSize")? {
        c.batch_size = b;
    }
    if let Some(g) = o.usize("gradAccum")? {
        c.grad_accum = g;
    }
    if let Some(m) = o.usize("maxLen")? {
        c.max_len = m;
    }
    if let Some(lr) = o.f64("lr")? {
        c.lr = lr;
    }
    if let Some(s) = o.str("schedule")? {
        c.schedule = ScheduleKind::parse(s).map_err(|e| bad(&o.name("schedule"), e))?;
    }
    if let Some(w) = o.uint("warmupSteps")? {
        c.warmup_steps = Some(w);
    }
    if let Some(w) = o.f64("weightDecay")? {
        c.weight_decay = w;
    }
    if let Some(b) = o.f64("beta1")? {
        c.betas.0 = b;
    }
    if let Some(b) = o.f64("beta2")? {
        c.betas.1 = b;
    }
    for (k, b) in [("beta1", c.betas.0), ("beta2", c.betas.1)] {
        if !(0.0..1.0).contains(&b) {
            return Err(bad(&o.name(k), format!("{b} is not in [0, 1)")));
        }
    }
    if let Some(e) = o.f64("eps")? {
        if e <= 0.0 {
            return Err(bad(&o.name("eps"), format!("{e} must be positive")));
        }
        c.eps = e;
    }
    if let Some(n) = o.f64("maxGradNorm")? {
        c.max_grad_norm = if n == 0.0 { None } else { Some(n as f32) };
    }
    if let Some(s) = o.uint("seed")? {
        c.seed = s;
    }
    if let Some(b) = o.bool("shuffle")? {
        c.shuffle = b;
    }
    if let Some(b) = o.bool("trainOnPrompt")? {
        c.train_on_prompt = b;
    }
    if let Some(b) = o.bool("appendEos")? {
        c.append_eos = b;
    }
    if let Some(b) = o.bool("gradCheckpoint")? {
        c.grad_checkpoint = b;
    }
    if let Some(b) = o.bool("packing")? {
        c.packing = b;
    }
    if let Some(x) = o.f64("validation")? {
        c.validation = if x == 0.0 {
            None
        } else if x > 0.0 && x < 1.0 {
            Some(Split::Fraction(x))
        } else if x >= 1.0 && x.fract() == 0.0 {
            Some(Split::Count(x as usize))
        } else {
            return Err(bad(&o.name("validation"), format!("{x} is neither a fraction in (0, 1) nor a whole count")));
        };
    }
    c.validate().map_err(|e| bad(what, e))?;
    Ok(c)
}

/// `ModelOptions` (JSON): (base precision, positions to prepare, name). `quant` is "f32"
/// (default), "nf4" or "nf4-dq" (block `blocksize`, default 64); `maxPositions` defaults to the
/// model's `max_position_embeddings` capped at [`DEFAULT_MAX_POSITIONS`].
pub fn model_options(v: &Value, config: &ModelConfig) -> Result<(BaseQuant, usize, Option<String>)> {
    let what = "ModelOptions";
    let o = Opts { what, m: object(v, what, &MODEL_KEYS)? };
    let blocksize = o.usize("blocksize")?.unwrap_or(64);
    let quant = match o.str("quant")?.unwrap_or("f32") {
        "f32" => BaseQuant::F32,
        "nf4" => BaseQuant::Nf4 { blocksize, double_quant: false },
        "nf4-dq" => BaseQuant::Nf4 { blocksize, double_quant: true },
        other => return Err(bad(&o.name("quant"), format!("`{other}` is not one of f32, nf4, nf4-dq"))),
    };
    if quant == BaseQuant::F32 && o.get("blocksize").is_some() {
        return Err(bad(&o.name("blocksize"), "applies to the NF4 bases only (quant \"nf4\" or \"nf4-dq\")"));
    }
    let max_positions = match o.usize("maxPositions")? {
        Some(0) => return Err(bad(&o.name("maxPositions"), "must be at least 1")),
        Some(n) => n,
        None => config.max_position_embeddings.unwrap_or(DEFAULT_MAX_POSITIONS).min(DEFAULT_MAX_POSITIONS),
    };
    Ok((quant, max_positions, o.str("name")?.map(str::to_owned)))
}

/// `GenerateOptions` (JSON) as a [`SamplingConfig`] (default: greedy, 128 new tokens, the
/// model's eos ids).
pub fn sampling_config(v: &Value) -> Result<SamplingConfig> {
    let what = "GenerateOptions";
    let o = Opts { what, m: object(v, what, &GENERATE_KEYS)? };
    let mut c = SamplingConfig::default();
    if let Some(n) = o.usize("maxNewTokens")? {
        c.max_new_tokens = n;
    }
    if let Some(t) = o.f64("temperature")? {
        c.temperature = t as f32;
    }
    if let Some(k) = o.usize("topK")? {
        c.top_k = k;
    }
    if let Some(p) = o.f64("topP")? {
        c.top_p = p as f32;
    }
    if let Some(s) = o.uint("seed")? {
        c.seed = s;
    }
    if let Some(s) = o.strings("stop")? {
        c.stop_strings = s;
    }
    if let Some(b) = o.bool("skipSpecialTokens")? {
        c.skip_special_tokens = b;
    }
    c.validate().map_err(|e| bad(what, e))?;
    Ok(c)
}

fn mib(bytes: u64) -> String {
    if bytes < 100 << 10 {
        return format!("{:.1} KiB", bytes as f64 / 1024.0);
    }
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

/// Checks that the buffers a model needs whole fit `limit`, the device's largest binding
/// (`GpuContext::max_binding`): its largest projection, in f32 or, for QLoRA, as packed NF4 codes
/// (the embedding and lm_head are stored as row shards and need not fit). The message names the
/// tensor, its size and the limit, and says what would fit.
pub fn check_model_fits(name: &str, config: &ModelConfig, quant: BaseQuant, info: &GpuInfo, limit: u64) -> Result<()> {
    let c = config.to_llama();
    let (o, i) = (0..7).map(|m| c.proj_shape(m)).max_by_key(|&(o, i)| o * i).unwrap_or((0, 0));
    let (bytes, how) = match quant {
        // f32 projections are stored in row blocks of a multiple of 4 rows (`Frozen::F32Rows`).
        BaseQuant::F32 => ((4 * i * 4) as u64, "for its smallest row block (4 rows) in f32"),
        BaseQuant::Nf4 { .. } => ((o * i).div_ceil(2) as u64, "in NF4"),
    };
    if bytes > limit {
        return Err(Error::Limit {
            op: "load model",
            msg: format!(
                "{name} does not fit this GPU adapter ({}): its largest projection ({o} x {i}) takes {} {how}, and the                  largest storage buffer it may bind is {} (maxStorageBufferBindingSize {}, maxBufferSize {}){}",
                info.name,
                mib(bytes),
                mib(limit),
                info.max_storage_binding,
                info.max_buffer,
                if quant == BaseQuant::F32 { "; QLoRA (quant \"nf4-dq\") holds projections in 4 bits" } else { "" }
            ),
        });
    }
    Ok(())
}

/// Checks that one sequence's largest unchunked activation fits `limit`: max_len rows of the
/// wider of the hidden size and the query width, in f32 (`LlamaConfig::activation_width`: the
/// MLP's intermediate tensors run in row chunks, the output layer never holds all logits, and a
/// batch whose activations exceed one binding runs as several micro-batches of whole sequences:
/// `Batch::split_to_fit`). The message says which length would fit.
pub fn check_training_fits(config: &ModelConfig, cfg: &TrainConfig, info: &GpuInfo, limit: u64) -> Result<()> {
    let c = config.to_llama();
    let width = c.activation_width() as u64;
    let bytes = cfg.max_len as u64 * width * 4;
    if bytes > limit {
        return Err(Error::Limit {
            op: "training",
            msg: format!(
                "a sequence of up to {} tokens needs activations of {} ({} rows x {} x 4 bytes), more than this GPU adapter's \
                 largest storage buffer binding, {} ({}); use max length <= {}",
                cfg.max_len,
                mib(bytes),
                cfg.max_len,
                width,
                mib(limit),
                info.name,
                limit / (width * 4),
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn train_options_map_onto_the_config() {
        let c = train_config(&json!({"rank": 4, "alpha": 8, "steps": 6, "lr": 0.002, "batchSize": 2, "maxLen": 64,
            "seed": 7, "schedule": "constant", "maxGradNorm": 0, "targetModules": ["q_proj", "v_proj"], "validation": 0.25}))
        .unwrap();
        assert_eq!((c.lora.r, c.lora.lora_alpha, c.steps, c.lr, c.batch_size, c.max_len, c.seed), (4, 8.0, 6, 0.002, 2, 64, 7));
        assert_eq!(c.schedule, ScheduleKind::Constant);
        assert_eq!(c.max_grad_norm, None);
        assert_eq!(c.lora.target_modules, TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]));
        assert_eq!(c.validation, Some(Split::Fraction(0.25)));
        assert_eq!(train_config(&Value::Null).unwrap(), TrainConfig::default());
    }

    #[test]
    fn bad_train_options_name_the_option() {
        let e = train_config(&json!({"ranks": 4})).unwrap_err().to_string();
        assert!(e.contains("unknown option `ranks`") && e.contains("rank,"), "{e}");
        let e = train_config(&json!({"steps": 2.5})).unwrap_err().to_string();
        assert!(e.contains("TrainOptions.steps") && e.contains("non-negative integer"), "{e}");
        let e = train_config(&json!({"lr": "fast"})).unwrap_err().to_string();
        assert!(e.contains("TrainOptions.lr: expected a number, got a string"), "{e}");
        let e = train_config(&json!({"steps": 0})).unwrap_err().to_string();
        assert!(e.contains("steps 0 must be in 1..=100000000"), "{e}");
        let e = train_config(&json!([1])).unwrap_err().to_string();
        assert!(e.contains("expected an object, got an array"), "{e}");
    }

    #[test]
    fn generate_options() {
        let c = sampling_config(&json!({"maxNewTokens": 5, "temperature": 0.7, "topK": 3, "stop": ["\n"]})).unwrap();
        assert_eq!((c.max_new_tokens, c.temperature, c.top_k, c.stop_strings.clone()), (5, 0.7, 3, vec!["\n".to_string()]));
        assert!(sampling_config(&json!({"topP": 0})).unwrap_err().to_string().contains("top_p"));
    }

    fn info(binding_mib: u64) -> GpuInfo {
        GpuInfo {
            name: "test adapter".into(),
            backend: "BrowserWebGpu".into(),
            device_type: "Cpu".into(),
            driver: String::new(),
            shader_f16: false,
            subgroups: false,
            timestamp_query: false,
            max_storage_binding: binding_mib << 20,
            max_buffer: 256 << 20,
            max_workgroup_storage: 16384,
            max_invocations: 256,
            max_workgroups_per_dim: 65535,
        }
    }

    fn smollm2_like() -> ModelConfig {
        let cfg = json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
            "tie_word_embeddings": true, "max_position_embeddings": 8192});
        ModelConfig::from_json("config.json", cfg.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn limits_are_checked_with_a_clear_message() {
        let cfg = smollm2_like();
        let limit = |i: &GpuInfo| i.max_storage_binding.min(i.max_buffer);
        // SmolLM2-135M's embedding (108 MiB in f32) is sharded, and so are f32 projections (in
        // blocks of 4 rows or more); its largest projection is 1536 x 576: 3.4 MiB in f32, 0.4 MiB
        // in NF4, which must fit one binding.
        check_model_fits("SmolLM2", &cfg, BaseQuant::F32, &info(64), limit(&info(64))).unwrap();
        check_model_fits("SmolLM2", &cfg, BaseQuant::F32, &info(2), 2 << 20).unwrap();
        check_model_fits("SmolLM2", &cfg, BaseQuant::QLORA, &info(2), 2 << 20).unwrap();
        // 4 rows of down_proj's 1536 inputs in f32: 24 KiB.
        let e = check_model_fits("SmolLM2", &cfg, BaseQuant::F32, &info(2), 16 << 10).unwrap_err().to_string();
        assert!(e.contains("SmolLM2 does not fit this GPU adapter (test adapter)") && e.contains("24.0 KiB for its smallest row block") && e.contains("nf4-dq"), "{e}");
        let e = check_model_fits("SmolLM2", &cfg, BaseQuant::QLORA, &info(2), 256 << 10).unwrap_err().to_string();
        assert!(e.contains("0.4 MiB in NF4"), "{e}");
        let (q, n, _) = model_options(&Value::Null, &cfg).unwrap();
        assert_eq!((q, n), (BaseQuant::F32, DEFAULT_MAX_POSITIONS));
        let mut t = TrainConfig::default();
        // 64 x 512 rows x 1536 x 4 = 192 MiB of MLP activations: run as micro-batches; one
        // sequence of 32768 tokens (192 MiB of MLP activations) runs its MLP in row chunks and
        // needs 72 MiB of hidden-width rows (576 x 4 bytes each); 65536 tokens need 144 MiB.
        t.batch_size = 64;
        t.max_len = 512;
        check_training_fits(&cfg, &t, &info(128), 128 << 20).unwrap();
        t.max_len = 32768;
        check_training_fits(&cfg, &t, &info(128), 128 << 20).unwrap();
        t.max_len = 65536;
        let e = check_training_fits(&cfg, &t, &info(128), 128 << 20).unwrap_err().to_string();
        assert!(e.contains("144.0 MiB") && e.contains("max length <= 58254"), "{e}");
    }

}
