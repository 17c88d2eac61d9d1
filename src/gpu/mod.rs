//! The GPU runtime: adapter and device selection, the kernel (pipeline) cache, the buffer pool,
//! batched command recording and async readback. This is the only module that calls wgpu, so a
//! wgpu upgrade touches these files alone.
//!
//! Recording model: every `dispatch` is appended to one pending command encoder; the encoder is
//! submitted when a readback, an upload or `flush` needs it (or after `MAX_PENDING` dispatches).
//! Uniform parameters live in an arena buffer (one 256-byte slot per dispatch) written just before
//! each submit, so recording a dispatch allocates no buffer.

mod pool;
pub mod shaders;
mod shards;
mod tensor;

pub use pool::PoolStats;
pub use shards::{lossless_16bit, lossless_compact, round_f16, HostRows, RowShards};
pub use tensor::{DType, Tensor, Q8_BLOCK};

use crate::{Error, Result};
use pool::BufferPool;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

/// Bytes of one uniform-parameter slot (WebGPU's minimum uniform offset alignment is at most 256).
const PARAM_SLOT: u64 = 256;
/// Slots in the parameter arena: the pending encoder is submitted when they run out.
const PARAM_SLOTS: u64 = 512;
/// Dispatches recorded before the pending encoder is submitted regardless.
const MAX_PENDING: usize = 512;

/// What the selected adapter is and can do; printed by `qlora bench` and the tests.
#[derive(Clone, Debug)]
pub struct GpuInfo {
    /// Adapter name as the driver reports it (e.g. "llvmpipe (LLVM 15.0.6, 256 bits)").
    pub name: String,
    /// Backend in use: Vulkan, Metal, Dx12, Gl or BrowserWebGpu.
    pub backend: String,
    /// Device type: DiscreteGpu, IntegratedGpu, Cpu, ...
    pub device_type: String,
    /// Driver name and version string.
    pub driver: String,
    /// The adapter offers `shader-f16` (half-precision arithmetic in shaders).
    pub shader_f16: bool,
    /// The adapter offers subgroup operations.
    pub subgroups: bool,
    /// The adapter offers timestamp queries.
    pub timestamp_query: bool,
    /// Largest storage-buffer binding, bytes (requested as the adapter's own limit).
    pub max_storage_binding: u64,
    /// Largest buffer, bytes.
    pub max_buffer: u64,
    /// Workgroup memory per workgroup, bytes.
    pub max_workgroup_storage: u32,
    /// Most invocations in one workgroup.
    pub max_invocations: u32,
    /// Most workgroups per dispatch dimension.
    pub max_workgroups_per_dim: u32,
}

impl std::fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, {}, driver {}); shader-f16: {}, subgroups: {}, timestamp queries: {}; \
             max storage binding {} MiB, max buffer {} MiB, workgroup memory {} KiB",
            self.name,
            self.backend,
            self.device_type,
            self.driver,
            yes(self.shader_f16),
            yes(self.subgroups),
            yes(self.timestamp_query),
            self.max_storage_binding >> 20,
            self.max_buffer >> 20,
            self.max_workgroup_storage >> 10
        )
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// A compute kernel: one entry point of one WGSL file and the storage buffers it binds, by the
/// names of their `var` declarations in the WGSL (binding 0 is always the `params` uniform). A
/// dispatch passes one tensor per name, in this order; the binding numbers come from the WGSL
/// itself ([`shaders::binding_number`]), and tests/shaders.rs checks every kernel's names against
/// the storage variables naga says its entry point uses.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    /// File name under shaders/, for error messages and the cache key.
    pub file: &'static str,
    /// The file's WGSL source (`include_str!`).
    pub source: &'static str,
    /// Entry point name.
    pub entry: &'static str,
    /// The storage variables the entry point binds, in the order a dispatch passes tensors.
    pub bindings: &'static [&'static str],
}

struct Pending {
    encoder: wgpu::CommandEncoder,
    dispatches: usize,
    params: Vec<u8>,
}

/// The GPU: device, queue, caches and the pending command encoder. Single-threaded by design
/// (WebGPU objects are not `Send` in browsers); share it with `Rc`.
pub struct GpuContext {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: GpuInfo,
    limits: wgpu::Limits,
    modules: RefCell<HashMap<&'static str, Rc<wgpu::ShaderModule>>>,
    /// Per kernel (file:entry): the pipeline and the binding number of each of its names.
    pipelines: RefCell<HashMap<String, (Rc<wgpu::ComputePipeline>, Rc<[u32]>)>>,
    pool: Rc<RefCell<BufferPool>>,
    param_arena: wgpu::Buffer,
    pending: RefCell<Option<Pending>>,
    /// Per-kernel (calls, seconds) when profiling is on ([`GpuContext::set_profiling`]).
    profile: RefCell<Option<HashMap<&'static str, (u64, f64)>>>,
    /// The largest tensor one buffer may hold, bytes: the adapter's storage-binding and buffer
    /// limits, or less when lowered ([`GpuContext::set_max_binding`], `QLORA_MAX_BINDING`).
    max_binding: Cell<u64>,
    /// True when `max_binding` was lowered below the adapter's limit.
    binding_forced: Cell<bool>,
    /// A lower limit for f32 projection weights only ([`GpuContext::set_projection_shard_limit`]).
    projection_limit: Cell<Option<u64>>,
    /// A lower limit for the MLP's row chunks only ([`GpuContext::set_activation_chunk_limit`]).
    activation_limit: Cell<Option<u64>>,
    /// GPU timing from timestamp queries written at each compute pass's start and end
    /// ([`GpuContext::set_gpu_timing`]); native only.
    timing: RefCell<Option<Timing>>,
    /// Faults the device reported (device lost, out of memory, other errors), recorded by its
    /// callbacks and turned into errors at the next allocation, dispatch, submit or readback.
    faults: Arc<Mutex<Faults>>,
    /// A budget for the pool's device memory, bytes ([`GpuContext::set_memory_budget`]).
    memory_budget: Cell<Option<u64>>,
    /// Test hook: the device is destroyed when this many more dispatches have been recorded
    /// ([`GpuContext::lose_device_after`]).
    lose_after: Cell<Option<u64>>,
}

/// What the device's callbacks reported; the first of each kind is kept.
#[derive(Default)]
struct Faults {
    lost: Option<String>,
    out_of_memory: Option<String>,
    other: Option<String>,
}

impl Faults {
    /// The error to report: a lost device first (later errors follow from it), then memory.
    fn error(&self) -> Option<Error> {
        if let Some(m) = &self.lost {
            Some(Error::DeviceLost(m.clone()))
        } else if let Some(m) = &self.out_of_memory {
            Some(Error::OutOfMemory(m.clone()))
        } else {
            self.other.as_ref().map(|m| Error::Device(m.clone()))
        }
    }
}

/// Kernel times measured on the GPU: every dispatch of the pending encoder writes two timestamps
/// (its pass's start and end) into `query_set`; `flush` resolves them, reads them back and adds
/// each pass's duration to its entry point's total.
struct Timing {
    query_set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    readback: wgpu::Buffer,
    /// Entry point of each timed dispatch in the pending encoder, in order.
    names: Vec<&'static str>,
    /// Per entry point: (calls, GPU seconds).
    totals: HashMap<&'static str, (u64, f64)>,
    /// Sum of all passes' GPU time, seconds.
    busy: f64,
}

/// A GPU-time profile ([`GpuContext::gpu_timing_report`]).
#[derive(Clone, Debug, Default)]
pub struct GpuTimes {
    /// (entry point, calls, GPU seconds), most time first.
    pub kernels: Vec<(&'static str, u64, f64)>,
    /// GPU seconds of all compute passes together.
    pub busy: f64,
}

/// Environment variable that lowers the largest tensor one buffer holds below the adapter's limit
/// (bytes, or with a K, M or G suffix for KiB, MiB, GiB: `QLORA_MAX_BINDING=1M`), so that tests
/// and users can exercise the sharded paths (row-sharded embedding and lm_head, chunked output
/// layer) on any adapter.
pub const MAX_BINDING_ENV: &str = "QLORA_MAX_BINDING";

/// Environment variable that caps the device memory the buffer pool may allocate (bytes, or with
/// a K, M or G suffix): an allocation past it fails as out of memory, as on a smaller GPU.
pub const MEMORY_BUDGET_ENV: &str = "QLORA_GPU_MEMORY_BUDGET";

/// Test hook (native): destroy the device after this many dispatches, as a driver reset would.
pub const LOSE_DEVICE_ENV: &str = "QLORA_TEST_LOSE_DEVICE_AFTER";

/// Environment variable (native): `QLORA_COMPAT_LIMITS=1` requests [`compat_limits`] of the
/// adapter's limits, so that wgpu validates every buffer and pipeline against WebGPU
/// compatibility mode's limits, as a browser's compatibility-mode device (src/web.rs,
/// `Gpu.open({compatibility: true})`) does.
pub const COMPAT_LIMITS_ENV: &str = "QLORA_COMPAT_LIMITS";

/// `l` lowered, where higher, to WebGPU compatibility mode's defaults (the values src/web.rs
/// `COMPAT_LIMITS` holds a browser device to; workgroups from gpuweb's compatibility-mode
/// proposal, "Lower limits"): 128 MiB storage binding, 256 MiB buffer, 8 storage buffers per
/// stage, 16 KiB workgroup memory and uniform binding, 128 invocations a workgroup, 128 along x
/// and y, 64 along z.
pub fn compat_limits(mut l: wgpu::Limits) -> wgpu::Limits {
    l.max_storage_buffer_binding_size = l.max_storage_buffer_binding_size.min(128 << 20);
    l.max_buffer_size = l.max_buffer_size.min(256 << 20);
    l.max_storage_buffers_per_shader_stage = l.max_storage_buffers_per_shader_stage.min(8);
    l.max_compute_workgroup_storage_size = l.max_compute_workgroup_storage_size.min(16384);
    l.max_uniform_buffer_binding_size = l.max_uniform_buffer_binding_size.min(16384);
    l.max_compute_invocations_per_workgroup = l.max_compute_invocations_per_workgroup.min(128);
    l.max_compute_workgroup_size_x = l.max_compute_workgroup_size_x.min(128);
    l.max_compute_workgroup_size_y = l.max_compute_workgroup_size_y.min(128);
    l.max_compute_workgroup_size_z = l.max_compute_workgroup_size_z.min(64);
    l
}

/// Parses a byte count with an optional K/M/G (binary) suffix.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1u64 << 20),
        (i, 'G' | 'g') => (&s[..i], 1u64 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mul)
}

fn backend_list(b: wgpu::Backends) -> String {
    let mut v = Vec::new();
    for (flag, name) in [
        (wgpu::Backends::VULKAN, "Vulkan"),
        (wgpu::Backends::METAL, "Metal"),
        (wgpu::Backends::DX12, "DX12"),
        (wgpu::Backends::GL, "OpenGL/GLES"),
        (wgpu::Backends::BROWSER_WEBGPU, "browser WebGPU"),
    ] {
        if b.contains(flag) {
            v.push(name);
        }
    }
    v.join(", ")
}

const NO_ADAPTER_HINT: &str = "Install a GPU driver with Vulkan, Metal or DX12 support. On Linux \
without a GPU, Mesa's software Vulkan driver lavapipe works: `apt-get install mesa-vulkan-drivers` \
(Debian/Ubuntu). In a browser, use one with WebGPU enabled (Chrome/Edge 113+, or Chromium with \
--enable-unsafe-webgpu). The WGPU_BACKEND environment variable restricts the backends tried.";

impl GpuContext {
    /// Opens the best adapter (high-performance first), requests the adapter's own limits and
    /// the optional features it has (shader-f16, subgroups, timestamp queries).
    pub async fn new() -> Result<Rc<Self>> {
        let desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        let backends = desc.backends & wgpu::Instance::enabled_backend_features();
        let instance = wgpu::Instance::new(desc);
        let adapter = match instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                force_fallback_adapter: false,
                compatible_surface: None,
                apply_limit_buckets: false,
            })
            .await
        {
            Ok(a) => a,
            Err(e) => {
                return Err(Error::NoAdapter {
                    backends: backend_list(backends),
                    hint: format!("({e}) {NO_ADAPTER_HINT}"),
                })
            }
        };
        let ainfo = adapter.get_info();
        let feats = adapter.features();
        let wanted =
            wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
        let required_features = feats & wanted;
        let mut limits = adapter.limits();
        if !cfg!(target_arch = "wasm32") && std::env::var(COMPAT_LIMITS_ENV).is_ok_and(|v| v.trim() == "1") {
            limits = compat_limits(limits);
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("qlora-webgpu"),
                required_features,
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::Device(format!("request_device on {}: {e}", ainfo.name)))?;
        let info = GpuInfo {
            name: ainfo.name.clone(),
            backend: format!("{:?}", ainfo.backend),
            device_type: format!("{:?}", ainfo.device_type),
            driver: format!("{} {}", ainfo.driver, ainfo.driver_info).trim().to_string(),
            shader_f16: feats.contains(wgpu::Features::SHADER_F16),
            subgroups: feats.contains(wgpu::Features::SUBGROUP),
            timestamp_query: feats.contains(wgpu::Features::TIMESTAMP_QUERY),
            max_storage_binding: limits.max_storage_buffer_binding_size as u64,
            max_buffer: limits.max_buffer_size,
            max_workgroup_storage: limits.max_compute_workgroup_storage_size,
            max_invocations: limits.max_compute_invocations_per_workgroup,
            max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
        };
        let param_arena = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("param arena"),
            size: PARAM_SLOT * PARAM_SLOTS,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let adapter_max = (limits.max_storage_buffer_binding_size as u64).min(limits.max_buffer_size);
        let forced = if cfg!(target_arch = "wasm32") { None } else { std::env::var(MAX_BINDING_ENV).ok() };
        let forced = match forced {
            Some(v) => Some(parse_bytes(&v).filter(|&b| b >= 1024).ok_or_else(|| {
                Error::Invalid(format!("{MAX_BINDING_ENV}={v:?}: expected a byte count of at least 1K (e.g. 4M)"))
            })?),
            None => None,
        };
        let env = |name: &str| if cfg!(target_arch = "wasm32") { None } else { std::env::var(name).ok() };
        let memory_budget = match env(MEMORY_BUDGET_ENV) {
            Some(v) => Some(parse_bytes(&v).ok_or_else(|| {
                Error::Invalid(format!("{MEMORY_BUDGET_ENV}={}: expected a byte count (e.g. 512M)", crate::error::quote(&v)))
            })?),
            None => None,
        };
        let lose_after = match env(LOSE_DEVICE_ENV) {
            Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
                Error::Invalid(format!("{LOSE_DEVICE_ENV}={}: expected a dispatch count", crate::error::quote(&v)))
            })?),
            None => None,
        };
        let faults = Arc::new(Mutex::new(Faults::default()));
        {
            let f = faults.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
                let slot = match e {
                    wgpu::Error::OutOfMemory { .. } => &mut f.out_of_memory,
                    _ => &mut f.other,
                };
                if slot.is_none() {
                    *slot = Some(crate::error::quote(&e.to_string()));
                }
            }));
            let f = faults.clone();
            device.set_device_lost_callback(move |reason, msg| {
                let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
                if f.lost.is_none() {
                    let why = match reason {
                        wgpu::DeviceLostReason::Destroyed => "destroyed".to_string(),
                        r => format!("{r:?}"),
                    };
                    let msg = msg.trim();
                    f.lost = Some(if msg.is_empty() { why } else { format!("{why}: {}", crate::error::quote(msg)) });
                }
            });
        }
        Ok(Rc::new(GpuContext {
            max_binding: Cell::new(forced.map_or(adapter_max, |f| f.min(adapter_max))),
            binding_forced: Cell::new(forced.is_some_and(|f| f < adapter_max)),
            projection_limit: Cell::new(None),
            activation_limit: Cell::new(None),
            timing: RefCell::new(None),
            device,
            queue,
            info,
            limits,
            modules: RefCell::new(HashMap::new()),
            pipelines: RefCell::new(HashMap::new()),
            pool: Rc::new(RefCell::new(BufferPool::default())),
            param_arena,
            pending: RefCell::new(None),
            profile: RefCell::new(None),
            faults,
            memory_budget: Cell::new(memory_budget),
            lose_after: Cell::new(lose_after),
        }))
    }

    /// The fault the device reported, if any, as an error: the device lost
    /// ([`Error::DeviceLost`]), out of memory ([`Error::OutOfMemory`]) or another device error.
    /// Checked by every allocation, dispatch and readback, so a step fails at its next GPU call.
    pub fn check(&self) -> Result<()> {
        match self.faults.lock().unwrap_or_else(|p| p.into_inner()).error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Caps the device memory the buffer pool may hold, bytes (`None`: the device's own memory
    /// is the limit); also set by `QLORA_GPU_MEMORY_BUDGET`. An allocation past it fails with
    /// [`Error::OutOfMemory`] as it would on a GPU with that much memory; buffers already held
    /// stay.
    pub fn set_memory_budget(&self, bytes: Option<u64>) {
        self.memory_budget.set(bytes);
    }

    /// Destroys the device now, as a driver reset or a lost browser GPU would: every later GPU
    /// call of this context fails with [`Error::DeviceLost`]. For tests of fault handling.
    pub fn destroy_device(&self) {
        self.device.destroy();
        // Natively the lost callback runs from a poll; make sure it has run.
        #[cfg(not(target_arch = "wasm32"))]
        let _ = self.device.poll(wgpu::PollType::Poll);
        let mut f = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        if f.lost.is_none() {
            f.lost = Some("destroyed".into());
        }
    }

    /// Test hook: destroys the device once `dispatches` more dispatches have been recorded (mid
    /// step when the count falls inside one); also set by `QLORA_TEST_LOSE_DEVICE_AFTER`.
    pub fn lose_device_after(&self, dispatches: Option<u64>) {
        self.lose_after.set(dispatches);
    }

    /// What the adapter is and offers.
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// Buffer-pool figures: bytes allocated on the device, in use now, and the peak in use.
    pub fn pool_stats(&self) -> PoolStats {
        self.pool.borrow().stats()
    }

    /// Frees the pool's idle buffers (those no tensor holds).
    pub fn trim_pool(&self) {
        self.flush();
        self.pool.borrow_mut().trim();
    }

    /// The largest tensor one buffer may hold, bytes (see [`GpuContext::set_max_binding`]).
    pub fn max_binding(&self) -> u64 {
        self.max_binding.get()
    }

    /// Lowers (or restores, up to the adapter's limit) the largest tensor one buffer may hold:
    /// tensors larger than this are stored as row shards ([`RowShards`]) where the library
    /// supports it, and refused elsewhere. Used by tests to run the sharded paths on small models.
    pub fn set_max_binding(&self, bytes: u64) {
        let adapter_max = (self.limits.max_storage_buffer_binding_size as u64).min(self.limits.max_buffer_size);
        self.max_binding.set(bytes.clamp(16, adapter_max));
        self.binding_forced.set(bytes < adapter_max);
    }

    /// The largest block of an f32 projection weight, bytes: the largest binding, or less where
    /// [`GpuContext::set_projection_shard_limit`] lowered it.
    pub fn projection_shard_limit(&self) -> u64 {
        self.projection_limit.get().map_or(self.max_binding(), |p| p.min(self.max_binding()))
    }

    /// Lowers the block size of f32 projection weights alone (None restores the largest
    /// binding), so tests can shard every projection of a tiny model while its activations,
    /// which are never sharded, keep one buffer each.
    pub fn set_projection_shard_limit(&self, bytes: Option<u64>) {
        self.projection_limit.set(bytes.map(|b| b.max(16)));
    }

    /// The largest chunk of a wide activation, bytes (the MLP's (rows, intermediate) tensors,
    /// which a decoder layer computes a block of rows at a time when one sequence's would not
    /// fit): the largest binding, or less where [`GpuContext::set_activation_chunk_limit`]
    /// lowered it.
    pub fn activation_chunk_limit(&self) -> u64 {
        self.activation_limit.get().map_or(self.max_binding(), |p| p.min(self.max_binding()))
    }

    /// Lowers the chunk size of the MLP's activations alone (None restores the largest
    /// binding), so tests can run the chunked MLP on a tiny model with everything else as it is.
    pub fn set_activation_chunk_limit(&self, bytes: Option<u64>) {
        self.activation_limit.set(bytes.map(|b| b.max(16)));
    }

    pub(crate) fn check_binding(&self, op: &'static str, bytes: u64) -> Result<()> {
        if bytes > self.max_binding.get() {
            let why = if self.binding_forced.get() { format!(", lowered by {MAX_BINDING_ENV} or set_max_binding") } else { String::new() };
            return Err(Error::Limit {
                op,
                msg: format!(
                    "a tensor of {bytes} bytes exceeds the device's largest storage binding ({} bytes{why})",
                    self.max_binding.get()
                ),
            });
        }
        Ok(())
    }

    /// A tensor of `shape` with unspecified contents (a recycled buffer from the pool).
    pub fn empty(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let bytes = dtype.bytes(n) as u64;
        self.check_binding("alloc", bytes)?;
        self.check()?;
        if let Some(budget) = self.memory_budget.get() {
            if !self.pool.borrow().can_serve(bytes, budget) {
                let s = self.pool.borrow().stats();
                return Err(Error::OutOfMemory(format!(
                    "a buffer of {bytes} bytes does not fit: {} bytes of the budget of {budget} bytes ({MEMORY_BUDGET_ENV}) are allocated, {} in use",
                    s.allocated, s.in_use
                )));
            }
        }
        let buf = BufferPool::get(&self.pool, &self.device, bytes);
        Ok(Tensor::new(buf, shape.to_vec(), dtype))
    }

    /// A tensor of `shape` filled with zeros (a clear command on the pending encoder).
    pub fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = self.empty(shape, dtype)?;
        self.with_encoder(|enc| enc.clear_buffer(t.buffer(), 0, None));
        Ok(t)
    }

    /// Uploads f32 data as a tensor of `shape`.
    pub fn upload_f32(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        self.upload_bytes(bytemuck::cast_slice(data), shape, DType::F32)
    }

    /// Uploads u32 data as a tensor of `shape` (token ids, packed codes).
    pub fn upload_u32(&self, data: &[u32], shape: &[usize]) -> Result<Tensor> {
        self.upload_bytes(bytemuck::cast_slice(data), shape, DType::U32)
    }

    /// Uploads raw bytes as a tensor; the byte count must equal the shape's element count times
    /// the dtype size.
    pub fn upload_bytes(&self, bytes: &[u8], shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if bytes.len() != dtype.bytes(n) {
            return Err(Error::shape(
                "upload",
                format!("{} bytes for shape {shape:?} of {dtype:?}", bytes.len()),
            ));
        }
        let t = self.empty(shape, dtype)?;
        // queue.write_buffer runs before the next submit: submit what is pending first, or a
        // recycled buffer could be overwritten before earlier recorded dispatches read it.
        self.flush();
        if bytes.len() % 4 == 0 {
            if !bytes.is_empty() {
                self.queue.write_buffer(t.buffer(), 0, bytes);
            }
        } else {
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().div_ceil(4) * 4, 0);
            self.queue.write_buffer(t.buffer(), 0, &padded);
        }
        Ok(t)
    }

    /// Copies `src` into `dst` (same byte size) on the pending encoder.
    pub fn copy(&self, src: &Tensor, dst: &Tensor) -> Result<()> {
        if src.byte_len() != dst.byte_len() {
            return Err(Error::shape("copy", format!("{:?} -> {:?}", src.shape(), dst.shape())));
        }
        if src.byte_len() > 0 {
            self.with_encoder(|enc| {
                enc.copy_buffer_to_buffer(src.buffer(), 0, dst.buffer(), 0, src.byte_len() as u64)
            });
        }
        Ok(())
    }

    /// Copies `elems` elements from `src` at element `src_at` into `dst` at element `dst_at`
    /// (a KV-cache append). Offsets and sizes must keep 4-byte alignment (all dtypes are 4 bytes).
    pub fn copy_region(&self, src: &Tensor, src_at: usize, dst: &Tensor, dst_at: usize, elems: usize) -> Result<()> {
        if src_at + elems > src.numel() || dst_at + elems > dst.numel() {
            return Err(Error::shape(
                "copy_region",
                format!("{elems} elements from {src_at} of {:?} to {dst_at} of {:?}", src.shape(), dst.shape()),
            ));
        }
        let sz = src.dtype().size() as u64;
        if (src_at as u64 * sz) % 4 != 0 || (dst_at as u64 * sz) % 4 != 0 || (elems as u64 * sz) % 4 != 0 {
            return Err(Error::shape("copy_region", format!("{elems} elements at {src_at} -> {dst_at}: not 4-byte aligned")));
        }
        if elems > 0 {
            self.with_encoder(|enc| {
                enc.copy_buffer_to_buffer(src.buffer(), src_at as u64 * sz, dst.buffer(), dst_at as u64 * sz, elems as u64 * sz)
            });
        }
        Ok(())
    }

    /// A new tensor holding a copy of `src`.
    pub fn duplicate(&self, src: &Tensor) -> Result<Tensor> {
        let t = self.empty(src.shape(), src.dtype())?;
        self.copy(src, &t)?;
        Ok(t)
    }

    fn with_encoder<R>(&self, f: impl FnOnce(&mut wgpu::CommandEncoder) -> R) -> R {
        let mut pending = self.pending.borrow_mut();
        let p = pending.get_or_insert_with(|| Pending {
            encoder: self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("qlora") }),
            dispatches: 0,
            params: Vec::new(),
        });
        f(&mut p.encoder)
    }

    /// Submits everything recorded so far.
    pub fn flush(&self) {
        let Some(mut p) = self.pending.borrow_mut().take() else { return };
        if !p.params.is_empty() {
            self.queue.write_buffer(&self.param_arena, 0, &p.params);
        }
        let timed = self.timing.borrow().as_ref().map_or(0, |t| t.names.len()) as u32;
        if timed > 0 {
            let t = self.timing.borrow();
            let t = t.as_ref().expect("timing on");
            p.encoder.resolve_query_set(&t.query_set, 0..2 * timed, &t.resolve, 0);
            p.encoder.copy_buffer_to_buffer(&t.resolve, 0, &t.readback, 0, 16 * timed as u64);
        }
        self.queue.submit(Some(p.encoder.finish()));
        if timed > 0 {
            self.collect_timing(timed);
        }
    }

    /// Reads back the timestamps of the `n` timed passes just submitted and adds them up.
    fn collect_timing(&self, n: u32) {
        let mut guard = self.timing.borrow_mut();
        let Some(t) = guard.as_mut() else { return };
        let names = std::mem::take(&mut t.names);
        #[cfg(not(target_arch = "wasm32"))]
        {
            let slice = t.readback.slice(..16 * n as u64);
            slice.map_async(wgpu::MapMode::Read, |_| {});
            if self.device.poll(wgpu::PollType::wait_indefinitely()).is_err() {
                return;
            }
            let period = self.queue.get_timestamp_period() as f64 * 1e-9;
            if let Ok(view) = t.readback.get_mapped_range(..16 * n as u64) {
                let ticks: &[u64] = bytemuck::cast_slice(&view);
                for (i, name) in names.iter().enumerate() {
                    let dt = ticks[2 * i + 1].saturating_sub(ticks[2 * i]) as f64 * period;
                    let e = t.totals.entry(name).or_insert((0, 0.0));
                    e.0 += 1;
                    e.1 += dt;
                    t.busy += dt;
                }
            }
            t.readback.unmap();
        }
        #[cfg(target_arch = "wasm32")]
        let _ = (names, n);
    }

    /// Turns GPU timing on or off (native, on adapters with timestamp queries; returns whether it
    /// is on): each compute pass writes a timestamp at its start and end, read back at every
    /// submit, so kernels run as batched as usual and their GPU time is measured, not the launch
    /// latency a wait per dispatch would add. Turning it on clears the totals.
    pub fn set_gpu_timing(&self, on: bool) -> bool {
        self.flush();
        if !on || !self.info.timestamp_query || cfg!(target_arch = "wasm32") {
            *self.timing.borrow_mut() = None;
            return false;
        }
        let count = 2 * MAX_PENDING as u32;
        let query_set = self.device.create_query_set(&wgpu::QuerySetDescriptor { label: Some("pass timestamps"), ty: wgpu::QueryType::Timestamp, count });
        let mk = |label, usage| self.device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size: 8 * count as u64, usage, mapped_at_creation: false });
        let resolve = mk("timestamps", wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC);
        let readback = mk("timestamps readback", wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
        *self.timing.borrow_mut() = Some(Timing { query_set, resolve, readback, names: Vec::new(), totals: HashMap::new(), busy: 0.0 });
        true
    }

    /// The GPU times so far (empty when timing is off); flushes what is pending first.
    pub fn gpu_timing_report(&self) -> GpuTimes {
        self.flush();
        let t = self.timing.borrow();
        let Some(t) = t.as_ref() else { return GpuTimes::default() };
        let mut kernels: Vec<_> = t.totals.iter().map(|(k, &(n, s))| (*k, n, s)).collect();
        kernels.sort_by(|a, b| b.2.total_cmp(&a.2));
        GpuTimes { kernels, busy: t.busy }
    }

    /// The pipeline of `k` and the binding number of each of its `bindings` names (an error
    /// naming the kernel when a name is not a binding of its file).
    fn pipeline(&self, k: &Kernel) -> Result<(Rc<wgpu::ComputePipeline>, Rc<[u32]>)> {
        let key = format!("{}:{}", k.file, k.entry);
        if let Some(p) = self.pipelines.borrow().get(&key) {
            return Ok(p.clone());
        }
        let numbers: Rc<[u32]> = k
            .bindings
            .iter()
            .map(|name| {
                shaders::binding_number(k.source, name).ok_or_else(|| {
                    Error::Invalid(format!("kernel {} ({}): no binding named `{name}` in the file", k.entry, k.file))
                })
            })
            .collect::<Result<Vec<u32>>>()?
            .into();
        let module = self
            .modules
            .borrow_mut()
            .entry(k.file)
            .or_insert_with(|| {
                Rc::new(self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(k.file),
                    source: wgpu::ShaderSource::Wgsl(k.source.into()),
                }))
            })
            .clone();
        let pipeline = Rc::new(self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(k.entry),
            layout: None,
            module: &module,
            entry_point: Some(k.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &[],
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        }));
        self.pipelines.borrow_mut().insert(key, (pipeline.clone(), numbers.clone()));
        Ok((pipeline, numbers))
    }

    /// Records one dispatch of `kernel`: binding 0 is `params` (a uniform); `tensors` are bound
    /// to the kernel's `bindings`, one per name in that order (the layout is derived from the
    /// entry point). `groups` is the workgroup count (x, y, z).
    pub fn dispatch<P: bytemuck::Pod>(&self, kernel: &Kernel, params: &P, tensors: &[&Tensor], groups: [u32; 3]) -> Result<()> {
        if tensors.len() != kernel.bindings.len() {
            return Err(Error::Invalid(format!(
                "kernel {}: {} tensors for its {} bindings ({})",
                kernel.entry,
                tensors.len(),
                kernel.bindings.len(),
                kernel.bindings.join(", ")
            )));
        }
        let max = self.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > max) {
            return Err(Error::Limit {
                op: kernel.entry,
                msg: format!("dispatch of {groups:?} workgroups; the device allows {max} per dimension"),
            });
        }
        if groups.contains(&0) {
            return Ok(());
        }
        if let Some(n) = self.lose_after.get() {
            if n == 0 {
                self.lose_after.set(None);
                self.destroy_device();
            } else {
                self.lose_after.set(Some(n - 1));
            }
        }
        self.check()?;
        let bytes = bytemuck::bytes_of(params);
        assert!(bytes.len() as u64 <= PARAM_SLOT, "params of {} exceed a slot", kernel.entry);
        let (pipeline, numbers) = self.pipeline(kernel)?;
        let slot = {
            let full = self
                .pending
                .borrow()
                .as_ref()
                .is_some_and(|p| p.params.len() as u64 >= PARAM_SLOT * PARAM_SLOTS || p.dispatches >= MAX_PENDING);
            if full {
                self.flush();
            }
            self.with_encoder(|_| ());
            let mut pending = self.pending.borrow_mut();
            let p = pending.as_mut().unwrap();
            let offset = p.params.len() as u64;
            p.params.extend_from_slice(bytes);
            p.params.resize((offset + PARAM_SLOT) as usize, 0);
            p.dispatches += 1;
            offset
        };
        let layout = pipeline.get_bind_group_layout(0);
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &self.param_arena,
                offset: slot,
                size: wgpu::BufferSize::new(bytes.len().div_ceil(16) as u64 * 16),
            }),
        }];
        for (b, t) in numbers.iter().zip(tensors) {
            entries.push(wgpu::BindGroupEntry {
                binding: *b,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: t.buffer(),
                    offset: 0,
                    size: wgpu::BufferSize::new(t.binding_size()),
                }),
            });
        }
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel.entry),
            layout: &layout,
            entries: &entries,
        });
        let timing = self.timing.borrow();
        let ts = timing.as_ref().map(|t| {
            let i = t.names.len() as u32;
            wgpu::ComputePassTimestampWrites { query_set: &t.query_set, beginning_of_pass_write_index: Some(2 * i), end_of_pass_write_index: Some(2 * i + 1) }
        });
        self.with_encoder(|enc| {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(kernel.entry),
                timestamp_writes: ts,
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        });
        drop(timing);
        if let Some(t) = self.timing.borrow_mut().as_mut() {
            t.names.push(kernel.entry);
        }
        #[cfg(not(target_arch = "wasm32"))]
        if self.profile.borrow().is_some() {
            let t0 = std::time::Instant::now();
            self.flush();
            self.poll_wait()?;
            let dt = t0.elapsed().as_secs_f64();
            if let Some(p) = self.profile.borrow_mut().as_mut() {
                let e = p.entry(kernel.entry).or_insert((0, 0.0));
                e.0 += 1;
                e.1 += dt;
            }
        }
        Ok(())
    }

    /// Turns per-kernel profiling on or off (native only): when on, every dispatch is submitted
    /// and waited for on its own, and its wall time added to its entry point's total (slower
    /// overall, but it shows where the time goes). Turning it on clears the totals.
    pub fn set_profiling(&self, on: bool) {
        self.flush();
        *self.profile.borrow_mut() = on.then(HashMap::new);
    }

    /// The profile so far: (entry point, calls, seconds), most time first.
    pub fn profile_report(&self) -> Vec<(&'static str, u64, f64)> {
        let mut v: Vec<_> = self.profile.borrow().iter().flatten().map(|(k, &(n, t))| (*k, n, t)).collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    }

    /// Waits until the device has finished everything submitted (native: blocks in poll; in the
    /// browser the returned future resolves when the queue is done).
    pub async fn sync(&self) -> Result<()> {
        self.flush();
        let (tx, rx) = futures_channel::oneshot::channel();
        self.queue.on_submitted_work_done(move || {
            let _ = tx.send(());
        });
        self.poll_wait()?;
        rx.await.map_err(|_| Error::DeviceLost("while waiting for the queue".into()))?;
        self.check()
    }

    fn poll_wait(&self) -> Result<()> {
        self.check()?;
        #[cfg(not(target_arch = "wasm32"))]
        if let Err(e) = self.device.poll(wgpu::PollType::wait_indefinitely()) {
            self.check()?;
            return Err(Error::Device(format!("poll: {e}")));
        }
        self.check()
    }

    /// Reads a tensor back as raw bytes (exactly `t.byte_len()` of them).
    pub async fn read_bytes(&self, t: &Tensor) -> Result<Vec<u8>> {
        self.check()?;
        let len = t.byte_len() as u64;
        if len == 0 {
            return Ok(Vec::new());
        }
        let padded = len.div_ceil(4) * 4;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: padded,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.with_encoder(|enc| enc.copy_buffer_to_buffer(t.buffer(), 0, &staging, 0, padded));
        self.flush();
        let (tx, rx) = futures_channel::oneshot::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.poll_wait()?;
        let mapped = rx.await.map_err(|_| Error::DeviceLost("during a readback".into()))?;
        self.check()?;
        mapped.map_err(|e| Error::Device(format!("readback map failed: {e}")))?;
        let out = {
            let view = staging
                .get_mapped_range(..)
                .map_err(|e| Error::Device(format!("readback view: {e:?}")))?;
            view[..len as usize].to_vec()
        };
        staging.unmap();
        Ok(out)
    }

    /// Reads an f32 tensor back to the host.
    pub async fn read_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        let b = self.read_bytes(t).await?;
        Ok(bytemuck::pod_collect_to_vec(&b))
    }

    /// Reads a u32 tensor back to the host.
    pub async fn read_u32(&self, t: &Tensor) -> Result<Vec<u32>> {
        let b = self.read_bytes(t).await?;
        Ok(bytemuck::pod_collect_to_vec(&b))
    }
}

/// Workgroup count for `n` items at `per_group` items a workgroup.
pub fn groups_for(n: usize, per_group: usize) -> u32 {
    n.div_ceil(per_group) as u32
}

/// Splits a large 1-D workgroup count over x and y so that neither exceeds 65535 (WebGPU's
/// default per-dimension limit). Kernels recover the flat index as `wid.x + wid.y * 65535`.
pub fn groups_2d(n: u32) -> [u32; 3] {
    if n <= 65535 {
        [n, 1, 1]
    } else {
        [65535, n.div_ceil(65535), 1]
    }
}

/// Runs a future to completion on the native side (pollster); the wasm shell awaits instead.
#[cfg(not(target_arch = "wasm32"))]
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    pollster::block_on(f)
}
