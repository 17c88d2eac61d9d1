//! The browser demo's training run, natively: the same `ModelOptions` / `TrainOptions` JSON
//! (parsed by `qlora_webgpu::web::options`, as `src/web.rs` parses them), the same session code,
//! so the adapter it writes is the one the page should export for the same model, data and
//! seed. The browser test (web/test/browser.test.mjs) runs it and compares the two adapters;
//! it also gives the native step time (lavapipe on a machine without a GPU).
//!
//! ```text
//! cargo run --example web_native -- MODEL DATA.jsonl OUT_DIR '{"rank":8,...}' ['{"quant":"nf4-dq",...}' [INIT_ADAPTER_DIR]]
//! ```
//! MODEL is a .gguf file or a Hugging Face folder. The `ModelOptions` JSON sets the base weights
//! as the page's choice does (`quant`: "f32", the default, "nf4" or "nf4-dq", QLoRA with double
//! quantization; `blocksize`; `maxPositions`; `name`). INIT_ADAPTER_DIR (adapter_config.json +
//! adapter_model.safetensors) starts the run from that adapter, as `Training.fromAdapter` does.
//! Prints one JSON line per step
//! (`{"step", "loss", "ms"}`) and a final `{"done", "losses", "stepMs", "heldOut"}` line (the
//! held-out loss before and after training, null without `validation`); writes
//! adapter_config.json and adapter_model.safetensors into OUT_DIR.

use anyhow::{bail, Context, Result};
use qlora_webgpu::data::dataset::{Dataset, Format};
use qlora_webgpu::gpu::{block_on, GpuContext};
use qlora_webgpu::io::hf::{MmapDir, ModelFiles};
use qlora_webgpu::lora::peft::read_host_adapter;
use qlora_webgpu::session::{ModelSource, TrainSession};
use qlora_webgpu::web::options;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Instant;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        bail!("usage: web_native MODEL DATA.jsonl OUT_DIR TRAIN_OPTIONS_JSON [MODEL_OPTIONS_JSON [INIT_ADAPTER_DIR]]");
    }
    let (model_path, data_path, out) = (Path::new(&args[0]), Path::new(&args[1]), Path::new(&args[2]));
    let train_opts: Value = serde_json::from_str(&args[3]).context("TrainOptions JSON")?;
    let model_opts: Value = match args.get(4) {
        Some(s) => serde_json::from_str(s).context("ModelOptions JSON")?,
        None => Value::Null,
    };
    let ctx = block_on(GpuContext::new())?;
    eprintln!("adapter: {}", ctx.info());
    let bytes;
    let dir;
    let src = if model_path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        bytes = std::fs::read(model_path).with_context(|| format!("reading {}", model_path.display()))?;
        let name = model_opts.get("name").and_then(Value::as_str).map(str::to_owned);
        ModelSource::from_gguf(&name.unwrap_or_else(|| model_path.display().to_string()), &bytes)?
    } else {
        dir = MmapDir::open(model_path)?;
        let name = model_opts.get("name").and_then(Value::as_str).unwrap_or("model").to_owned();
        ModelSource::from_hf(&name, &dir as &dyn ModelFiles)?
    };
    let (quant, max_positions, _) = options::model_options(&model_opts, &src.host.config)?;
    options::check_model_fits(&src.name, &src.host.config, quant, ctx.info(), ctx.max_binding())?;
    let model = src.upload(&ctx, quant, max_positions)?;
    let cfg = options::train_config(&train_opts)?;
    options::check_training_fits(&model.config, &cfg, ctx.info(), ctx.max_binding())?;
    let data_bytes = std::fs::read(data_path).with_context(|| format!("reading {}", data_path.display()))?;
    let name = data_path.file_name().map_or_else(|| data_path.display().to_string(), |n| n.to_string_lossy().into_owned());
    let data = Dataset::from_jsonl(&name, &data_bytes, Format::Auto)?;
    let init = match args.get(5) {
        Some(dir) => Some(read_host_adapter(Path::new(dir), &model.model.cfg)?),
        None => None,
    };
    let mut session = TrainSession::new(&ctx, &model, &data, cfg, init.as_ref())?;
    let held_out_before = block_on(session.validation_loss())?;
    let (mut losses, mut ms) = (Vec::new(), Vec::new());
    while !session.done() {
        let t0 = Instant::now();
        let s = block_on(session.step())?;
        let dt = t0.elapsed().as_secs_f64() * 1e3;
        println!("{}", json!({"step": s.step, "loss": s.loss, "ms": dt}));
        losses.push(s.loss);
        ms.push(dt);
    }
    let held_out_after = block_on(session.validation_loss())?;
    let (config, weights) = block_on(session.adapter_files(&ctx, Some(&model.name)))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("adapter_config.json"), config)?;
    std::fs::write(out.join("adapter_model.safetensors"), weights)?;
    println!(
        "{}",
        json!({"done": true, "losses": losses, "stepMs": ms, "heldOut": {"before": held_out_before, "after": held_out_after},
               "adapter": ctx.info().name, "quant": model.quant.name(), "out": out.display().to_string()})
    );
    Ok(())
}
