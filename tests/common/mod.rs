//! Shared test helpers: the GPU context (a test that needs one fails loudly without an adapter),
//! a seeded RNG, tolerance checks and the central finite-difference check.
#![allow(dead_code)]

use qlora_webgpu::gpu::{block_on, GpuContext, Tensor};
use std::rc::Rc;

thread_local! {
    // Never dropped: wgpu's own thread-locals may be gone when this one's destructor would run.
    static GPU: std::mem::ManuallyDrop<Rc<GpuContext>> = match block_on(GpuContext::new()) {
        Ok(ctx) => {
            eprintln!("GPU: {}", ctx.info());
            std::mem::ManuallyDrop::new(ctx)
        }
        Err(e) => panic!("this test needs a GPU adapter and none was found: {e}"),
    };
}

/// The GPU context of this test thread; panics (fails the test) when there is no adapter.
pub fn gpu() -> Rc<GpuContext> {
    GPU.with(|g| Rc::clone(g))
}

/// Reads an f32 tensor back.
pub fn read(ctx: &GpuContext, t: &Tensor) -> Vec<f32> {
    block_on(ctx.read_f32(t)).expect("readback")
}

/// Uploads f64 data as f32.
pub fn up(ctx: &GpuContext, x: &[f64], shape: &[usize]) -> Tensor {
    let v: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    ctx.upload_f32(&v, shape).expect("upload")
}

/// f64 values of f32 data (what the GPU actually got).
pub fn f32_round(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| v as f32 as f64).collect()
}

/// A small seeded generator (splitmix64), so every test input is reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    /// n normals times `scale`, rounded to f32 so CPU and GPU see the same inputs.
    pub fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| (self.normal() * scale) as f32 as f64).collect()
    }
    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }
}

/// Asserts |got - want| <= atol + rtol * |want| elementwise, naming the first failure.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        let lim = atol + rtol * w.abs();
        assert!(err.is_finite() || (g as f64) == w, "{what}[{i}]: got {g}, want {w}");
        if err / lim > worst.1 {
            worst = (i, err / lim);
        }
        assert!(err <= lim, "{what}[{i}]: got {g}, want {w} (|err| {err:.3e} > {lim:.3e})");
    }
    let _ = worst;
}

/// Relative error ||got - want|| / ||want|| (L2).
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Central finite-difference check of an f64 backward: with L(x) = sum(dout * f(x)), the
/// analytic gradient `dx` must equal (L(x + h e_i) - L(x - h e_i)) / 2h for every i.
pub fn gradcheck(what: &str, f: &dyn Fn(&[f64]) -> Vec<f64>, x: &[f64], dout: &[f64], dx: &[f64]) {
    let h = 1e-6;
    let loss = |x: &[f64]| -> f64 { f(x).iter().zip(dout).map(|(a, b)| a * b).sum() };
    let mut xp = x.to_vec();
    for i in 0..x.len() {
        let orig = xp[i];
        xp[i] = orig + h;
        let lp = loss(&xp);
        xp[i] = orig - h;
        let lm = loss(&xp);
        xp[i] = orig;
        let fd = (lp - lm) / (2.0 * h);
        let tol = 1e-6 * (1.0 + fd.abs().max(dx[i].abs())) * 10.0;
        assert!((fd - dx[i]).abs() <= tol, "{what}: d/dx[{i}]: finite difference {fd}, analytic {}", dx[i]);
    }
}

/// Tensors of a reference safetensors file as f64 (ints converted), with shapes.
pub fn load_safetensors(path: &std::path::Path) -> std::collections::HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = std::collections::HashMap::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let v: Vec<f64> = match view.dtype() {
            safetensors::Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
            safetensors::Dtype::I64 => d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
            safetensors::Dtype::U8 => d.iter().map(|&b| b as f64).collect(),
            other => panic!("{name}: unexpected dtype {other:?}"),
        };
        out.insert(name.to_string(), (view.shape().to_vec(), v));
    }
    out
}

/// Lowers the device's binding limit (`GpuContext::set_max_binding`) and restores the adapter's
/// when dropped: the context is shared by the thread's tests.
#[allow(dead_code)]
pub struct Lowered<'a>(&'a GpuContext);

#[allow(dead_code)]
impl<'a> Lowered<'a> {
    /// Lowers the limit to `bytes`.
    pub fn new(ctx: &'a GpuContext, bytes: u64) -> Self {
        ctx.set_max_binding(bytes);
        Lowered(ctx)
    }
}

impl Drop for Lowered<'_> {
    fn drop(&mut self) {
        self.0.set_max_binding(u64::MAX);
    }
}

/// Bytes of a file under tests/fixtures/tiny-llama (panics naming the path when absent).
pub fn tiny_llama_fixture(rel: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama").join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The tiny reference Llama's architecture (tests/fixtures/tiny-llama/manifest.json,
/// model_config): 2 layers, hidden 64, intermediate 160, 4 heads / 2 kv heads of 16, SmolLM2's
/// 49,152-token vocabulary, tied embeddings.
pub fn tiny_llama_config() -> qlora_webgpu::model::llama::LlamaConfig {
    qlora_webgpu::model::llama::LlamaConfig {
        hidden: 64,
        intermediate: 160,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        vocab: 49152,
        rms_eps: 1e-5,
        rope_theta: 10000.0,
        tied: true,
        sliding_window: None,
    }
}

/// Little-endian f32 values of raw tensor bytes.
pub fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// A small random Llama (2 layers, hidden 32, intermediate 48, 4 heads / 2 kv heads of 8,
/// vocabulary 64, tied) with f32 weights drawn from `seed` (projections scaled by `proj_scale`,
/// embeddings by 0.5, unit norms), RoPE tables for 32 positions.
pub fn small_random_model(ctx: &Rc<GpuContext>, seed: u64, proj_scale: f64) -> Rc<qlora_webgpu::train::trainer::Model> {
    use qlora_webgpu::gpu::RowShards;
    use qlora_webgpu::model::llama::{InputEmbedding, LayerWeights, LlamaConfig, LlamaWeights};
    let c = LlamaConfig {
        hidden: 32,
        intermediate: 48,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        vocab: 64,
        rms_eps: 1e-5,
        rope_theta: 10000.0,
        tied: true,
        sliding_window: None,
    };
    let mut rng = Rng::new(seed);
    let mut up2 = |n: usize, shape: &[usize], s: f64| up(ctx, &rng.vec(n, s), shape);
    let ones = |ctx: &GpuContext| ctx.upload_f32(&vec![1.0; c.hidden], &[c.hidden]).unwrap();
    let layers = (0..c.layers)
        .map(|_| LayerWeights {
            attn_norm: ones(ctx),
            proj: std::array::from_fn(|m| {
                let (o, i) = c.proj_shape(m);
                qlora_webgpu::ops::lora::Frozen::F32(up2(o * i, &[o, i], proj_scale))
            }),
            bias: Default::default(),
            mlp_norm: ones(ctx),
        })
        .collect();
    let embed = InputEmbedding::Device(RowShards::from_tensor(up2(c.vocab * c.hidden, &[c.vocab, c.hidden], 0.5)));
    let w = LlamaWeights { embed, layers, final_norm: ones(ctx), lm_head: None };
    Rc::new(qlora_webgpu::train::trainer::Model::new(ctx, c, w, None, 32).unwrap())
}
