//! The browser API (wasm32 only; built into the npm package in web/ by scripts/build-web.sh):
//! a thin wasm-bindgen layer over [`crate::session`], the same pipeline the command line runs.
//! `Gpu.open()` finds WebGPU, `Model.fromGguf` / `Model.fromHuggingFace` load a base model from
//! bytes, `Dataset.fromJsonl` parses a data set, `new Training(model, dataset, options)` runs
//! LoRA steps (`step()`, or `train(n, onProgress)`, which yields to the page between steps),
//! `exportAdapter()` gives PEFT's two files, `Adapter.load` reads them back, and
//! `generate(prompt, options, onText)` streams text. No shader here: the kernels are the
//! library's.
//!
//! Errors reach JavaScript as `Error` objects: `message` says what was being done, `cause`
//! holds the library's error (and its own `cause`s, down the chain), and the innermost one has a
//! `kind` ("webgpu-missing", "no-adapter", "device", "limit", "format", "invalid", "shape",
//! "busy", "callback"). The option objects are parsed by [`options`] (every target).

pub mod options;

#[cfg(target_arch = "wasm32")]
pub use api::*;

#[cfg(target_arch = "wasm32")]
mod api {
    use super::options;
    use crate::data::dataset::{Dataset as JsonlDataset, Format};
    use crate::generate::{GenerationOutput, StopReason};
    use crate::gpu::{GpuContext, GpuInfo};
    use crate::lora::peft::{host_adapter_from_bytes, host_adapter_to_bytes};
    use crate::lora::HostAdapter;
    use crate::model::llama::LoraSet;
    use crate::session::{LoadedModel, ModelSource, Prompt, StepInfo, TrainSession};
    use js_sys::{Function, Object, Reflect, Uint8Array};
    use serde_json::{json, Value};
    use std::cell::{Cell, RefCell};
    use std::collections::BTreeMap;
    use std::rc::Rc;
    use wasm_bindgen::prelude::*;
    use wasm_bindgen::JsCast;
    use wasm_bindgen_futures::{future_to_promise, JsFuture};

    /// The TypeScript types of the option and result objects (web/types.d.ts), appended to the
    /// generated .d.ts.
    #[wasm_bindgen(typescript_custom_section)]
    const TS_TYPES: &'static str = include_str!("../web/types.d.ts");

    /// Installs the panic hook once (from every entry point that reaches the library). A panic is a
    /// bug (input errors are `Error`s): the console then says where it happened, since JavaScript
    /// only sees "unreachable".
    fn hook() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            std::panic::set_hook(Box::new(|p| web_sys::console::error_1(&format!("qlora-webgpu panicked: {p}").into())));
        });
    }

    // ---- errors -------------------------------------------------------------------------------

    fn kind_of(e: &crate::Error) -> &'static str {
        use crate::Error as E;
        match e {
            E::NoAdapter { .. } => "no-adapter",
            E::Device(_) => "device",
            E::Shape { .. } => "shape",
            E::Limit { .. } => "limit",
            E::Format { .. } => "format",
            E::Invalid(_) => "invalid",
            E::DeviceLost(_) => "device-lost",
            E::OutOfMemory(_) => "out-of-memory",
        }
    }

    fn set(obj: &JsValue, key: &str, v: &JsValue) {
        // Setting a property on a fresh Error or Object cannot fail.
        let _ = Reflect::set(obj, &JsValue::from_str(key), v);
    }

    /// The message of `e` in the browser: the library's, but with the package's options and
    /// remedies where its text names the command line's (a lost device, out of memory).
    fn browser_message(e: &(dyn std::error::Error + 'static)) -> String {
        match e.downcast_ref::<crate::Error>() {
            Some(crate::Error::DeviceLost(d)) => format!(
                "the GPU device was lost ({d}); everything on it is gone. Try: train again (the package opens the GPU anew; \
                 Training.keptAdapter holds the adapter after the last completed step); if it recurs, update the GPU driver \
                 or close other tabs and programs using the GPU"
            ),
            Some(crate::Error::OutOfMemory(d)) => format!(
                "the GPU ran out of memory ({d}). Try: a smaller batchSize or maxLen, gradCheckpoint: true, a lower rank \
                 or fewer targetModules, an NF4 base (quant \"nf4-dq\"), or close other tabs and programs using the GPU"
            ),
            _ => e.to_string(),
        }
    }

    /// A JavaScript Error for `e`, its `source()` chain as nested `cause`s.
    fn error_chain(e: &(dyn std::error::Error + 'static)) -> js_sys::Error {
        let err = js_sys::Error::new(&browser_message(e));
        if let Some(src) = e.source() {
            set(&err, "cause", &error_chain(src));
        }
        err
    }

    /// `Error(context)` whose `cause` is the library's error (with `kind`).
    fn fail(context: impl AsRef<str>, e: crate::Error) -> JsValue {
        let inner = error_chain(&e);
        set(&inner, "kind", &JsValue::from_str(kind_of(&e)));
        let outer = js_sys::Error::new(context.as_ref());
        set(&outer, "cause", &inner);
        outer.into()
    }

    /// An Error of our own (no library cause) with `kind`.
    fn plain_error(kind: &str, msg: impl AsRef<str>) -> JsValue {
        let e = js_sys::Error::new(msg.as_ref());
        set(&e, "kind", &JsValue::from_str(kind));
        e.into()
    }

    fn busy(what: &str) -> JsValue {
        plain_error("busy", format!("{what}: another call on this object is still running; await it first"))
    }

    // ---- JS values ----------------------------------------------------------------------------

    /// A JSON value as a JavaScript value (objects, arrays, numbers, strings).
    fn to_js(v: &Value) -> JsValue {
        // serde_json's output is valid JSON, so JSON.parse accepts it.
        js_sys::JSON::parse(&v.to_string()).unwrap_or(JsValue::NULL)
    }

    /// A JavaScript options object as JSON (undefined and null: Null). Functions and other
    /// non-JSON values are refused by JSON.stringify's rules (dropped), which the key check then
    /// reports as missing rather than mistyped.
    fn from_js(what: &str, v: &JsValue) -> Result<Value, JsValue> {
        if v.is_undefined() || v.is_null() {
            return Ok(Value::Null);
        }
        let s = js_sys::JSON::stringify(v).map_err(|_| plain_error("invalid", format!("{what}: cannot be turned into JSON")))?;
        let s: String = s.into();
        serde_json::from_str(&s).map_err(|e| plain_error("invalid", format!("{what}: {e}")))
    }

    /// Bytes from a Uint8Array, an ArrayBuffer or a typed-array view.
    fn bytes_of(what: &str, v: &JsValue) -> Result<Vec<u8>, JsValue> {
        if let Some(a) = v.dyn_ref::<Uint8Array>() {
            return Ok(a.to_vec());
        }
        if v.is_instance_of::<js_sys::ArrayBuffer>() {
            return Ok(Uint8Array::new(v).to_vec());
        }
        if let Some(view) = v.dyn_ref::<js_sys::DataView>() {
            return Ok(Uint8Array::new_with_byte_offset_and_length(&view.buffer(), view.byte_offset() as u32, view.byte_length() as u32).to_vec());
        }
        if js_sys::ArrayBuffer::is_view(v) {
            let buf: js_sys::ArrayBuffer = Reflect::get(v, &"buffer".into())?.unchecked_into();
            let off = Reflect::get(v, &"byteOffset".into())?.as_f64().unwrap_or(0.0) as u32;
            let len = Reflect::get(v, &"byteLength".into())?.as_f64().unwrap_or(0.0) as u32;
            return Ok(Uint8Array::new_with_byte_offset_and_length(&buf, off, len).to_vec());
        }
        Err(plain_error("invalid", format!("{what}: expected a Uint8Array or an ArrayBuffer")))
    }

    /// An optional callback argument: undefined or null (none) or a function.
    fn callback(what: &str, v: JsValue) -> Result<Option<Function>, JsValue> {
        if v.is_undefined() || v.is_null() {
            return Ok(None);
        }
        v.dyn_into::<Function>().map(Some).map_err(|_| plain_error("invalid", format!("{what}: expected a function")))
    }

    fn now_ms() -> f64 {
        js_sys::Date::now()
    }

    /// Lets the page (or worker) run its event loop: a promise resolved by `setTimeout(0)`.
    async fn yield_to_event_loop() -> Result<(), JsValue> {
        let p = js_sys::Promise::new(&mut |resolve, _reject| {
            let g = js_sys::global();
            match Reflect::get(&g, &"setTimeout".into()).ok().and_then(|f| f.dyn_into::<Function>().ok()) {
                Some(st) => {
                    if st.call2(&g, &resolve, &JsValue::from(0)).is_err() {
                        let _ = resolve.call0(&JsValue::NULL);
                    }
                }
                None => {
                    let _ = resolve.call0(&JsValue::NULL);
                }
            }
        });
        JsFuture::from(p).await.map(|_| ())
    }

    // ---- WebGPU -------------------------------------------------------------------------------

    /// Why WebGPU cannot be used here, or None when `navigator.gpu` exists.
    fn webgpu_missing() -> Option<String> {
        let g = js_sys::global();
        let secure = Reflect::get(&g, &"isSecureContext".into()).ok();
        let nav = Reflect::get(&g, &"navigator".into()).ok().filter(|n| n.is_object());
        let Some(nav) = nav else {
            return Some("WebGPU is not available: there is no `navigator` here (this is not a browser page or worker). \
                         qlora-webgpu trains on WebGPU in a browser; natively, use the `qlora` command line"
                .into());
        };
        let gpu = Reflect::get(&nav, &"gpu".into()).ok().filter(|v| !v.is_undefined() && !v.is_null());
        if gpu.is_some() {
            return None;
        }
        if secure.is_some_and(|s| s.is_falsy()) {
            return Some("WebGPU is not available: this page is not a secure context. Serve it over https://, or from \
                         http://localhost or http://127.0.0.1"
                .into());
        }
        Some("WebGPU is not available in this browser (navigator.gpu is undefined). Use a browser with WebGPU: Chrome or \
              Edge 113 or later, Safari 26, Firefox 141 on Windows; on Linux, Chromium with --enable-unsafe-webgpu \
              (and --enable-features=Vulkan)"
            .into())
    }

    /// True when this browser offers WebGPU (`navigator.gpu` exists in a secure context); whether an
    /// adapter can be had is only known once `Gpu.open()` asks for one.
    #[wasm_bindgen(js_name = webgpuAvailable)]
    pub fn webgpu_available() -> bool {
        webgpu_missing().is_none()
    }

    /// The package's version (the crate's).
    #[wasm_bindgen]
    pub fn version() -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }

    /// The WebGPU device every model and run uses.
    #[wasm_bindgen]
    pub struct Gpu {
        ctx: Rc<GpuContext>,
        /// The context's info, named from `GPUAdapter.info` when wgpu gives no name (browsers).
        info: GpuInfo,
        /// "core", "compatibility" or "fallback" (see `choose_adapter`).
        kind: &'static str,
        fallback: bool,
        /// The device's maxStorageBuffersPerShaderStage (the limits wgpu requested).
        storage_buffers: u32,
    }

    fn get(obj: &JsValue, key: &str) -> JsValue {
        Reflect::get(obj, &JsValue::from_str(key)).unwrap_or(JsValue::UNDEFINED)
    }

    /// `navigator.gpu.requestAdapter(opts)`: the adapter, or None when the browser gives none.
    async fn request_adapter(gpu: &JsValue, opts: &Object) -> Option<JsValue> {
        let req: Function = get(gpu, "requestAdapter").dyn_into().ok()?;
        let p: js_sys::Promise = req.call1(gpu, opts).ok()?.dyn_into().ok()?;
        JsFuture::from(p).await.ok().filter(|a| a.is_object())
    }

    /// The browser's isFallbackAdapter (on `info` since Chrome 136, on the adapter before).
    fn is_fallback(a: &JsValue) -> bool {
        let info = get(a, "info");
        get(&info, "isFallbackAdapter").is_truthy() || get(a, "isFallbackAdapter").is_truthy()
    }

    /// The largest workgroup the kernels use (invocations, and along x): compatibility mode's
    /// limit (tests/shaders.rs checks every entry point against it).
    const KERNEL_WORKGROUP: u32 = 128;

    /// Compatibility mode's default limits (WebGPU's compatibility-mode tier, as Chromium gives a
    /// compatibility-mode device): (limit, value). The workgroup limits are those of gpuweb's
    /// compatibility-mode proposal (proposals/compatibility-mode.md, "Lower limits": 128
    /// invocations, 128 along x and y; z 64 as in core); every kernel fits them.
    const COMPAT_LIMITS: [(&str, f64); 9] = [
        ("maxStorageBufferBindingSize", 134217728.0),
        ("maxBufferSize", 268435456.0),
        ("maxStorageBuffersPerShaderStage", 8.0),
        ("maxComputeWorkgroupStorageSize", 16384.0),
        ("maxUniformBufferBindingSize", 16384.0),
        ("maxComputeInvocationsPerWorkgroup", KERNEL_WORKGROUP as f64),
        ("maxComputeWorkgroupSizeX", 128.0),
        ("maxComputeWorkgroupSizeY", 128.0),
        ("maxComputeWorkgroupSizeZ", 64.0),
    ];

    /// Makes `adapter.limits` (what wgpu reads and then requests for the device) a plain copy
    /// of the adapter's limits with compatibility mode's defaults where they are lower.
    fn hold_to_compat_limits(adapter: &JsValue) {
        let real = get(adapter, "limits");
        let copy = Object::new();
        let proto = Object::get_prototype_of(&real);
        for k in Object::get_own_property_names(&proto).iter() {
            let Some(name) = k.as_string() else { continue };
            let v = get(&real, &name);
            if v.as_f64().is_some() {
                set(&copy, &name, &v);
            }
        }
        for (k, v) in COMPAT_LIMITS {
            let have = get(&copy, k).as_f64().unwrap_or(v);
            set(&copy, k, &JsValue::from_f64(have.min(v)));
        }
        let desc = Object::new();
        set(&desc, "value", &copy);
        set(&desc, "configurable", &JsValue::TRUE);
        Object::define_property(adapter.unchecked_ref::<Object>(), &JsValue::from_str("limits"), &desc);
    }

    /// The adapter `Gpu.open` uses and its kind: a hardware adapter with core WebGPU
    /// (high-performance first), else a hardware compatibility-mode adapter
    /// (`featureLevel: "compatibility"`), else the software fallback the browser offers. With
    /// `compat_only`, only a compatibility-mode adapter (held to compatibility's limits).
    async fn choose_adapter(gpu: &JsValue, compat_only: bool) -> Option<(JsValue, &'static str)> {
        let core_opts = Object::new();
        set(&core_opts, "powerPreference", &JsValue::from_str("high-performance"));
        let compat_opts = Object::new();
        set(&compat_opts, "powerPreference", &JsValue::from_str("high-performance"));
        set(&compat_opts, "featureLevel", &JsValue::from_str("compatibility"));
        if compat_only {
            let a = request_adapter(gpu, &compat_opts).await?;
            hold_to_compat_limits(&a);
            return Some((a, "compatibility"));
        }
        let core = request_adapter(gpu, &core_opts).await;
        if let Some(a) = &core {
            if !is_fallback(a) {
                return Some((a.clone(), "core"));
            }
        }
        if let Some(a) = request_adapter(gpu, &compat_opts).await {
            // The kernels use workgroups of at most 128 invocations (compatibility mode's guarantee).
            let lim = get(&a, "limits");
            let fits = ["maxComputeInvocationsPerWorkgroup", "maxComputeWorkgroupSizeX"]
                .iter()
                .all(|k| get(&lim, k).as_f64().unwrap_or(0.0) >= KERNEL_WORKGROUP as f64);
            if !is_fallback(&a) && fits {
                // wgpu requests no "core-features-and-limits": the device is a compatibility-mode one.
                return Some((a, "compatibility"));
            }
        }
        core.map(|a| (a, "fallback"))
    }

    /// "vendor architecture" or the description of the adapter the browser hands out, from
    /// `navigator.gpu.requestAdapter()` (wgpu's browser backend leaves the name empty).
    async fn browser_adapter_name() -> Option<String> {
        let g = js_sys::global();
        let nav = Reflect::get(&g, &"navigator".into()).ok()?;
        let gpu = Reflect::get(&nav, &"gpu".into()).ok()?;
        let req: Function = Reflect::get(&gpu, &"requestAdapter".into()).ok()?.dyn_into().ok()?;
        let opts = Object::new();
        set(&opts, "powerPreference", &JsValue::from_str("high-performance"));
        let p: js_sys::Promise = req.call1(&gpu, &opts).ok()?.dyn_into().ok()?;
        let adapter = JsFuture::from(p).await.ok().filter(|a| a.is_object())?;
        let info = Reflect::get(&adapter, &"info".into()).ok().filter(JsValue::is_object)?;
        let field = |k: &str| Reflect::get(&info, &k.into()).ok().and_then(|v| v.as_string()).unwrap_or_default();
        let desc = field("description");
        let name = if desc.is_empty() { format!("{} {}", field("vendor"), field("architecture")).trim().to_owned() } else { desc };
        (!name.is_empty()).then_some(name)
    }

    const NO_BROWSER_ADAPTER: &str = "WebGPU is there, but the browser offers no GPU adapter: WebGPU may be turned off, \
        or the GPU blocklisted (chrome://gpu says why). Chromium on Linux needs --enable-unsafe-webgpu \
        --enable-features=Vulkan; without a GPU, also --use-vulkan=swiftshader --use-webgpu-adapter=swiftshader";

    /// The kernel family `ops::matmul` picks for the model's products on `ctx` (the vec4-shaped
    /// ones: a plain kernel runs only for odd shapes).
    fn matmul_path(ctx: &GpuContext) -> &'static str {
        use crate::ops::matmul::{chosen_path, Path, Trans};
        match chosen_path(ctx, Trans::NT, 4, 4, 4) {
            Path::Subgroup => "subgroup",
            // chosen_path gives Subgroup or Vec4 for a vec4-shaped product.
            _ => "vec4",
        }
    }

    #[wasm_bindgen]
    impl Gpu {
        /// Opens the GPU adapter (high-performance first) with its own limits. Rejects with kind
        /// "webgpu-missing" when the browser has no WebGPU, "no-adapter" when it offers no adapter.
        pub async fn open(#[wasm_bindgen(unchecked_optional_param_type = "GpuOptions")] options: JsValue) -> Result<Gpu, JsValue> {
            hook();
            if let Some(why) = webgpu_missing() {
                return Err(plain_error("webgpu-missing", why));
            }
            let compat_only = get(&options, "compatibility").is_truthy();
            let nav_gpu = get(&get(&js_sys::global(), "navigator"), "gpu");
            // wgpu 30's browser backend asks `navigator.gpu.requestAdapter` with a power preference
            // only (no featureLevel, no fallback check): the adapter is picked here and handed to
            // it through an own `requestAdapter` on navigator.gpu for the one call, then removed.
            let chosen = choose_adapter(&nav_gpu, compat_only).await;
            let (kind, fallback, storage_buffers) = match &chosen {
                Some((a, k)) => (*k, is_fallback(a), get(&get(a, "limits"), "maxStorageBuffersPerShaderStage").as_f64().unwrap_or(0.0) as u32),
                None => ("fallback", false, 0),
            };
            let shim = chosen.map(|(a, _)| {
                let c = Closure::<dyn FnMut(JsValue) -> JsValue>::new(move |_o: JsValue| js_sys::Promise::resolve(&a).into());
                set(&nav_gpu, "requestAdapter", c.as_ref());
                c
            });
            let opened = GpuContext::new().await;
            if shim.is_some() {
                let _ = Reflect::delete_property(nav_gpu.unchecked_ref::<Object>(), &JsValue::from_str("requestAdapter"));
            }
            drop(shim);
            let ctx = match opened {
                Ok(c) => c,
                Err(e @ crate::Error::NoAdapter { .. }) => {
                    let err = fail(NO_BROWSER_ADAPTER, e);
                    set(&err, "kind", &JsValue::from_str("no-adapter"));
                    return Err(err);
                }
                Err(e) => return Err(fail("opening the WebGPU device", e)),
            };
            let mut info = ctx.info().clone();
            if info.name.is_empty() {
                info.name = browser_adapter_name().await.unwrap_or_else(|| "WebGPU adapter".to_owned());
            }
            Ok(Gpu { ctx, info, kind, fallback, storage_buffers })
        }

        /// Lowers the largest tensor one buffer may hold to `bytes` (at most the adapter's
        /// binding limit; a larger value restores it). Models loaded afterwards shard their
        /// embedding and lm_head to fit; used by tests to run the 128 MiB limit of WebGPU's
        /// defaults and compatibility mode on any adapter.
        #[wasm_bindgen(js_name = setMaxBinding)]
        pub fn set_max_binding(&self, bytes: f64) {
            self.ctx.set_max_binding(if bytes.is_finite() && bytes > 0.0 { bytes as u64 } else { u64::MAX });
        }

        /// The adapter's name, backend, features and limits.
        #[wasm_bindgen(getter, unchecked_return_type = "GpuInfo")]
        pub fn info(&self) -> JsValue {
            let i = &self.info;
            to_js(&json!({
                "adapterKind": self.kind, "isFallbackAdapter": self.fallback,
                "maxStorageBuffersPerShaderStage": self.storage_buffers,
                "name": i.name, "backend": i.backend, "deviceType": i.device_type, "driver": i.driver,
                "shaderF16": i.shader_f16, "subgroups": i.subgroups, "timestampQuery": i.timestamp_query,
                "matmulPath": matmul_path(&self.ctx),
                "maxStorageBufferBindingSize": i.max_storage_binding, "maxBufferSize": i.max_buffer,
                "maxBinding": self.ctx.max_binding(),
                "maxComputeWorkgroupStorageSize": i.max_workgroup_storage,
                "maxComputeInvocationsPerWorkgroup": i.max_invocations,
            }))
        }
    }

    // ---- models -------------------------------------------------------------------------------

    struct ModelInner {
        ctx: Rc<GpuContext>,
        info: GpuInfo,
        m: LoadedModel,
        busy: Cell<bool>,
    }

    /// A base model on the GPU with its tokenizer and chat template.
    #[wasm_bindgen]
    pub struct Model {
        inner: Rc<ModelInner>,
    }

    fn model_name(opts: &Value, dflt: &str) -> String {
        opts.get("name").and_then(Value::as_str).unwrap_or(dflt).to_owned()
    }

    fn upload(gpu: &Gpu, src: ModelSource, opts: &Value) -> Result<Model, JsValue> {
        let name = src.name.clone();
        let (quant, max_positions, _) = options::model_options(opts, &src.host.config).map_err(|e| fail(format!("loading {name}"), e))?;
        options::check_model_fits(&name, &src.host.config, quant, &gpu.info, gpu.ctx.max_binding()).map_err(|e| fail(format!("loading {name}"), e))?;
        let m = src
            .upload(&gpu.ctx, quant, max_positions)
            .map_err(|e| fail(format!("uploading {name} to the GPU ({})", gpu.info.name), e))?;
        Ok(Model { inner: Rc::new(ModelInner { ctx: gpu.ctx.clone(), info: gpu.info.clone(), m, busy: Cell::new(false) }) })
    }

    /// `u` made absolute against this page's (or worker's) location, as the cache stores it.
    fn web_url(u: &str) -> Option<String> {
        let base = get(&get(&js_sys::global(), "location"), "href").as_string()?;
        let url_ctor: Function = get(&js_sys::global(), "URL").dyn_into().ok()?;
        let args = js_sys::Array::of2(&JsValue::from_str(u), &JsValue::from_str(&base));
        let made = Reflect::construct(&url_ctor, &args).ok()?;
        get(&made, "href").as_string()
    }

    /// The Cache API cache `Model.fromUrl` keeps downloaded models in.
    const MODEL_CACHE: &str = "qlora-webgpu-models";

    async fn await_js(p: JsValue) -> Result<JsValue, JsValue> {
        let p: js_sys::Promise = p.dyn_into().map_err(|_| plain_error("fetch", "expected a promise"))?;
        JsFuture::from(p).await
    }

    /// `method.call(obj, args...)` on a JavaScript object.
    fn call(obj: &JsValue, method: &str, args: &[&JsValue]) -> Result<JsValue, JsValue> {
        let f: Function = get(obj, method).dyn_into().map_err(|_| plain_error("fetch", format!("{method} is not a function here")))?;
        let a = js_sys::Array::new();
        for x in args {
            a.push(x);
        }
        f.apply(obj, &a)
    }

    /// The origin's model cache (`caches.open`), or None where the Cache API is missing (not a
    /// secure context, some workers).
    async fn model_cache() -> Option<JsValue> {
        let caches = get(&js_sys::global(), "caches");
        if !caches.is_object() {
            return None;
        }
        await_js(call(&caches, "open", &[&JsValue::from_str(MODEL_CACHE)]).ok()?).await.ok().filter(JsValue::is_object)
    }

    fn fetch_error(url: &str, what: impl std::fmt::Display) -> JsValue {
        plain_error("fetch", format!("downloading {}: {what}", crate::error::quote(url)))
    }

    /// Whether `signal` (an AbortSignal, or undefined) has been aborted.
    fn aborted(signal: &JsValue) -> bool {
        signal.is_object() && get(signal, "aborted").is_truthy()
    }

    fn abort_error(url: &str) -> JsValue {
        plain_error("aborted", format!("loading {}: abandoned (the AbortSignal was aborted)", crate::error::quote(url)))
    }

    /// Where [`download`] hands the bytes: (bytes, from the cache).
    type ChunkSink<'a> = dyn FnMut(&[u8], bool) -> Result<(), JsValue> + 'a;

    /// The most bytes of a downloaded chunk copied into wasm memory at once.
    const CHUNK_SLICE: usize = 1 << 20;

    /// Streams `url`'s bytes to `sink` chunk by chunk (one chunk in wasm memory at a time), from
    /// the model cache when it holds the URL, else from the network (the cache then stores its
    /// own copy of the response, teed by the browser outside wasm memory). Reports `download`
    /// progress; `signal` (an AbortSignal) abandons the download (and the cache's copy) at the
    /// next chunk. Returns (bytes, from cache).
    async fn download(
        url: &str,
        use_cache: bool,
        signal: &JsValue,
        progress: &dyn Fn(&Value),
        sink: &mut ChunkSink<'_>,
    ) -> Result<(usize, bool), JsValue> {
        let cache = if use_cache { model_cache().await } else { None };
        let key = JsValue::from_str(url);
        let mut from_cache = false;
        let mut resp = JsValue::UNDEFINED;
        if let Some(c) = &cache {
            let hit = await_js(call(c, "match", &[&key])?).await?;
            if hit.is_object() {
                resp = hit;
                from_cache = true;
            }
        }
        let mut put = None;
        if !from_cache {
            let init = Object::new();
            if signal.is_object() {
                Reflect::set(&init, &"signal".into(), signal)?;
            }
            resp = await_js(call(&js_sys::global(), "fetch", &[&key, &init]).map_err(|e| {
                let err = fetch_error(url, "fetch failed");
                set_cause(&err, &e);
                err
            })?)
            .await
            .map_err(|e| {
                if aborted(signal) {
                    return abort_error(url);
                }
                let err = fetch_error(url, "the request failed (network error, or the server does not allow this origin: CORS)");
                set_cause(&err, &e);
                err
            })?;
            if !get(&resp, "ok").is_truthy() {
                let status = get(&resp, "status").as_f64().unwrap_or(0.0);
                return Err(fetch_error(url, format!("HTTP status {status}")));
            }
            if let Some(c) = &cache {
                // The cache reads its own copy of the stream (the browser tees it, outside wasm memory).
                let copy = call(&resp, "clone", &[])?;
                put = Some(call(c, "put", &[&key, &copy])?);
            }
        }
        let total = call(&get(&resp, "headers"), "get", &[&JsValue::from_str("content-length")])
            .ok()
            .and_then(|v| v.as_string())
            .and_then(|v| v.trim().parse::<usize>().ok());
        let body = get(&resp, "body");
        let reader = call(&body, "getReader", &[]).map_err(|_| fetch_error(url, "the response has no body stream"))?;
        let report = |done: usize| {
            progress(&json!({"phase": "download", "bytesDone": done, "bytesTotal": total, "fromCache": from_cache, "tensorsDone": 0, "tensorsTotal": 0}))
        };
        report(0);
        let (mut done, mut last) = (0usize, 0usize);
        // One chunk at a time in wasm memory: this buffer is reused.
        let mut chunk_buf: Vec<u8> = Vec::new();
        loop {
            if aborted(signal) {
                let _ = call(&reader, "cancel", &[]);
                return Err(abort_error(url));
            }
            let chunk = await_js(call(&reader, "read", &[])?).await.map_err(|e| {
                if aborted(signal) {
                    return abort_error(url);
                }
                let err = fetch_error(url, "the download broke off");
                set_cause(&err, &e);
                err
            })?;
            if get(&chunk, "done").is_truthy() {
                break;
            }
            let v: Uint8Array = get(&chunk, "value").dyn_into().map_err(|_| fetch_error(url, "a chunk is not bytes"))?;
            let n = v.length() as usize;
            // A large chunk (a cached response or a local server may hand over the whole file at
            // once) is copied into wasm memory a slice at a time.
            let mut at = 0;
            while at < n {
                let end = (at + CHUNK_SLICE).min(n);
                chunk_buf.clear();
                chunk_buf
                    .try_reserve(end - at)
                    .map_err(|_| fetch_error(url, format!("a {}-byte chunk does not fit in wasm memory", end - at)))?;
                chunk_buf.resize(end - at, 0);
                v.subarray(at as u32, end as u32).copy_to(&mut chunk_buf);
                if let Err(e) = sink(&chunk_buf, from_cache) {
                    let _ = call(&reader, "cancel", &[]);
                    return Err(e);
                }
                done += end - at;
                at = end;
                if done - last >= 1 << 20 {
                    last = done;
                    report(last);
                }
            }
        }
        if let Some(n) = total {
            if n != done && !from_cache {
                return Err(fetch_error(url, format!("got {done} bytes of the {n} announced")));
            }
        }
        report(done);
        if let Some(p) = put {
            // A failed store (quota) leaves the model loaded, just not cached.
            if let Err(e) = await_js(p).await {
                web_sys::console::warn_2(&format!("qlora-webgpu: {url} was not cached").into(), &e);
            }
        }
        Ok((done, from_cache))
    }

    #[wasm_bindgen]
    impl Model {
        /// Downloads a GGUF file from `url` (a cached copy in the origin's Cache API storage is
        /// read instead when there is one, and a download is stored there) and loads it as
        /// `fromGguf` does, bit for bit. The file is streamed, never whole in wasm memory: the
        /// header is parsed from its first bytes, each tensor is dequantized as soon as its bytes
        /// are in and uploaded to the GPU right away (quantized to NF4 first for an NF4 base),
        /// its host copies dropped; wasm memory holds the header, one chunk, the tensor being
        /// received and its conversion (and an untied input embedding, which stays on the host).
        /// `onProgress` reports the bytes and, interleaved with them, the tensors as they reach
        /// the GPU; `signal` abandons the load.
        #[wasm_bindgen(js_name = fromUrl, unchecked_return_type = "Promise<Model>")]
        pub fn from_url(
            gpu: &Gpu,
            url: String,
            #[wasm_bindgen(unchecked_optional_param_type = "UrlModelOptions")] options: JsValue,
        ) -> js_sys::Promise {
            hook();
            let ctx = gpu.ctx.clone();
            let info = gpu.info.clone();
            future_to_promise(async move {
                let cb = callback("Model.fromUrl: onProgress", if options.is_object() { get(&options, "onProgress") } else { JsValue::UNDEFINED })?;
                let use_cache = !options.is_object() || get(&options, "cache") != JsValue::FALSE;
                let signal = if options.is_object() { get(&options, "signal") } else { JsValue::UNDEFINED };
                let mut opts = from_js("UrlModelOptions", &options)?;
                if let Some(m) = opts.as_object_mut() {
                    m.remove("cache");
                    m.remove("onProgress");
                    m.remove("signal");
                }
                let thrown: RefCell<Option<JsValue>> = RefCell::new(None);
                let progress = |v: &Value| {
                    if let Some(f) = &cb {
                        if thrown.borrow().is_none() {
                            if let Err(e) = f.call1(&JsValue::NULL, &to_js(v)) {
                                *thrown.borrow_mut() = Some(e);
                            }
                        }
                    }
                };
                let name = model_name(&opts, url.rsplit('/').next().filter(|s| !s.is_empty()).unwrap_or(&url));
                let name = name.split(['?', '#']).next().unwrap_or(&name).to_owned();
                // The GGUF file is loaded as it arrives: the header parsed from its first bytes, then
                // each tensor converted as soon as its bytes are in and uploaded to the GPU right
                // away (quantized first for an NF4 base), its host copies dropped.
                let mut load = crate::session::GgufUpload::new(&ctx, &name);
                let mut setup = |config: &crate::model::config::ModelConfig| -> crate::Result<(crate::session::BaseQuant, usize)> {
                    let (quant, max_positions, _) = options::model_options(&opts, config)?;
                    options::check_model_fits(&name, config, quant, &info, ctx.max_binding())?;
                    Ok((quant, max_positions))
                };
                let from_cache = Cell::new(false);
                let mut tick = |done: usize, total: usize| {
                    progress(&json!({"phase": "upload", "bytesDone": 0, "bytesTotal": null, "fromCache": from_cache.get(), "tensorsDone": done, "tensorsTotal": total}))
                };
                let failed = |(step, e): (crate::session::LoadStep, crate::Error)| match step {
                    crate::session::LoadStep::Read => fail(format!("reading the GGUF file {name}"), e),
                    crate::session::LoadStep::Setup => fail(format!("loading {name}"), e),
                    crate::session::LoadStep::Upload => fail(format!("uploading {name} to the GPU ({})", info.name), e),
                };
                let mut head: Vec<u8> = Vec::with_capacity(4);
                let mut sink = |b: &[u8], cached: bool| -> Result<(), JsValue> {
                    from_cache.set(cached);
                    if head.len() < 4 {
                        head.extend(b.iter().take(4 - head.len()));
                        if head.len() == 4 && head != b"GGUF" {
                            return Err(plain_error("format", format!("{name}: not a GGUF file (Model.fromUrl loads GGUF files; from {url})")));
                        }
                    }
                    load.push(b, &mut setup, &mut tick).map_err(failed)
                };
                let (size, _) = download(&url, use_cache, &signal, &progress, &mut sink).await?;
                if head.len() < 4 {
                    return Err(plain_error("format", format!("{name}: not a GGUF file (Model.fromUrl loads GGUF files; {size} bytes from {url})")));
                }
                let m = load.finish(&mut setup, &mut tick).map_err(failed)?;
                if let Some(e) = thrown.into_inner() {
                    let err = plain_error("callback", "Model.fromUrl: the onProgress callback threw");
                    set_cause(&err, &e);
                    return Err(err);
                }
                Ok(Model { inner: Rc::new(ModelInner { ctx, info, m, busy: Cell::new(false) }) }.into())
            })
        }

        /// The URLs of the models `fromUrl` has cached in this origin's storage.
        #[wasm_bindgen(js_name = cachedModels, unchecked_return_type = "Promise<string[]>")]
        pub fn cached_models() -> js_sys::Promise {
            future_to_promise(async move {
                let out = js_sys::Array::new();
                if let Some(c) = model_cache().await {
                    let keys: js_sys::Array = await_js(call(&c, "keys", &[])?).await?.dyn_into()?;
                    for r in keys.iter() {
                        out.push(&get(&r, "url"));
                    }
                }
                Ok(out.into())
            })
        }

        /// Forgets cached models: `url`'s, or all of them when no URL is given. Resolves to the
        /// number of cached files removed.
        #[wasm_bindgen(js_name = forgetCached, unchecked_return_type = "Promise<number>")]
        pub fn forget_cached(url: Option<String>) -> js_sys::Promise {
            future_to_promise(async move {
                let Some(c) = model_cache().await else { return Ok(JsValue::from(0)) };
                let keys: js_sys::Array = await_js(call(&c, "keys", &[])?).await?.dyn_into()?;
                let mut n = 0u32;
                for r in keys.iter() {
                    let u = get(&r, "url").as_string().unwrap_or_default();
                    let hit = match &url {
                        None => true,
                        Some(want) => &u == want || web_url(want).as_deref() == Some(u.as_str()),
                    };
                    if hit && await_js(call(&c, "delete", &[&r])?).await?.is_truthy() {
                        n += 1;
                    }
                }
                Ok(JsValue::from(n))
            })
        }

        /// Loads a GGUF file (`name` names it in messages): weights (F32, F16, BF16, Q8_0, Q4_0,
        /// Q4_1, Q4_K, Q6_K are dequantized), tokenizer and chat template from its metadata.
        #[wasm_bindgen(js_name = fromGguf)]
        pub fn from_gguf(
            gpu: &Gpu,
            name: &str,
            bytes: &[u8],
            #[wasm_bindgen(unchecked_optional_param_type = "ModelOptions")] options: JsValue,
        ) -> Result<Model, JsValue> {
            hook();
            let opts = from_js("ModelOptions", &options)?;
            let src = ModelSource::from_gguf(name, bytes).map_err(|e| fail(format!("reading the GGUF file {name}"), e))?;
            upload(gpu, src, &opts)
        }

        /// Loads a Hugging Face folder given as files, by name: config.json, model.safetensors (or
        /// model.safetensors.index.json and its shards), tokenizer.json, and tokenizer_config.json
        /// and/or chat_template.jinja. Names may carry a folder ("SmolLM2/config.json"): only the
        /// last part counts. `files` is an object or a Map of Uint8Array / ArrayBuffer.
        #[wasm_bindgen(js_name = fromHuggingFace)]
        pub fn from_hugging_face(
            gpu: &Gpu,
            #[wasm_bindgen(unchecked_param_type = "Record<string, Uint8Array | ArrayBuffer> | Map<string, Uint8Array | ArrayBuffer>")]
            files: JsValue,
            #[wasm_bindgen(unchecked_optional_param_type = "ModelOptions")] options: JsValue,
        ) -> Result<Model, JsValue> {
            hook();
            let opts = from_js("ModelOptions", &options)?;
            let entries: js_sys::Array = if files.is_instance_of::<js_sys::Map>() {
                js_sys::Array::from(&files.unchecked_ref::<js_sys::Map>().entries())
            } else if files.is_object() {
                Object::entries(files.unchecked_ref())
            } else {
                return Err(plain_error("invalid", "Model.fromHuggingFace: `files` must be an object or a Map of file name -> bytes"));
            };
            let mut map: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            for e in entries.iter() {
                let pair: js_sys::Array = e.unchecked_into();
                let full = pair.get(0).as_string().unwrap_or_default();
                let base = full.rsplit(['/', '\\']).next().unwrap_or(&full).to_owned();
                let bytes = bytes_of(&format!("file {full}"), &pair.get(1))?;
                if map.insert(base.clone(), bytes).is_some() {
                    return Err(plain_error("invalid", format!("Model.fromHuggingFace: two files are named {base}")));
                }
            }
            let name = model_name(&opts, "model");
            if !map.contains_key("config.json") {
                let got: Vec<&str> = map.keys().map(String::as_str).collect();
                return Err(plain_error(
                    "format",
                    format!(
                        "{name}: a Hugging Face folder needs config.json, a model.safetensors (or shards with \
                         model.safetensors.index.json) and tokenizer.json; given: {}",
                        if got.is_empty() { "no files".to_owned() } else { got.join(", ") }
                    ),
                ));
            }
            let src = ModelSource::from_hf(&name, &map).map_err(|e| fail(format!("reading the Hugging Face files of {name}"), e))?;
            upload(gpu, src, &opts)
        }

        /// Architecture, sizes, base precision and device memory.
        #[wasm_bindgen(getter, unchecked_return_type = "ModelInfo")]
        pub fn info(&self) -> JsValue {
            let m = &self.inner.m;
            let c = &m.model.cfg;
            let (proj, other) = m.model.weights.device_bytes();
            to_js(&json!({
                "name": m.name, "architecture": m.config.architecture.hf_name(), "layers": c.layers, "hidden": c.hidden,
                "intermediate": c.intermediate, "heads": c.heads, "kvHeads": c.kv_heads, "headDim": c.head_dim,
                "vocab": c.vocab, "tiedEmbeddings": c.tied, "quant": m.quant.name(), "maxPositions": m.max_positions,
                "chatTemplate": m.template.is_some(), "deviceBytes": {"projections": proj, "other": other},
            }))
        }

        /// Generates from `prompt` with the base model (no adapter), streaming text to
        /// `onText` as it is decoded (it returning false ends the answer there: stopReason
        /// "stopped"). Resolves to the whole answer.
        #[wasm_bindgen(unchecked_return_type = "Promise<GenerateResult>")]
        pub fn generate(
            &self,
            #[wasm_bindgen(unchecked_param_type = "Prompt")] prompt: JsValue,
            #[wasm_bindgen(unchecked_optional_param_type = "GenerateOptions")] options: JsValue,
            #[wasm_bindgen(unchecked_optional_param_type = "(text: string) => void")] on_text: JsValue,
        ) -> js_sys::Promise {
            let inner = self.inner.clone();
            future_to_promise(async move { generate(&inner, &LoraSet::default(), prompt, options, on_text).await })
        }
    }

    fn parse_prompt(m: &LoadedModel, v: &JsValue) -> Result<Prompt, JsValue> {
        let j = match v.as_string() {
            Some(text) => Value::String(text),
            None => from_js("prompt", v)?,
        };
        Prompt::from_json(&j, m.template.is_some()).map_err(|e| plain_error("invalid", format!("prompt: {e}")))
    }

    async fn generate(inner: &ModelInner, set: &LoraSet, prompt: JsValue, options: JsValue, on_text: JsValue) -> Result<JsValue, JsValue> {
        if inner.busy.replace(true) {
            return Err(busy("generate"));
        }
        let r = generate_inner(inner, set, prompt, options, on_text).await;
        inner.busy.set(false);
        r
    }

    async fn generate_inner(inner: &ModelInner, set: &LoraSet, prompt: JsValue, options: JsValue, on_text: JsValue) -> Result<JsValue, JsValue> {
        let m = &inner.m;
        let prompt = parse_prompt(m, &prompt)?;
        let cfg = options::sampling_config(&from_js("GenerateOptions", &options)?).map_err(|e| fail("generate", e))?;
        let ids = m.prompt_ids(&prompt).map_err(|e| fail("generate: the prompt", e))?;
        let cb = callback("generate: onText", on_text)?;
        let thrown: RefCell<Option<JsValue>> = RefCell::new(None);
        // onText returning false ends the generation after this token (the text so far is kept).
        let stopped = Cell::new(false);
        let t0 = now_ms();
        let out: GenerationOutput = m
            .generate_until(
                &inner.ctx,
                set,
                &ids,
                &cfg,
                |text| {
                    if let Some(f) = &cb {
                        if thrown.borrow().is_none() {
                            match f.call1(&JsValue::NULL, &JsValue::from_str(text)) {
                                Err(e) => *thrown.borrow_mut() = Some(e),
                                Ok(v) if v == JsValue::FALSE => stopped.set(true),
                                Ok(_) => {}
                            }
                        }
                    }
                },
                || stopped.get() || thrown.borrow().is_some(),
            )
            .await
            .map_err(|e| fail(format!("generating with {}", m.name), e))?;
        if let Some(e) = thrown.into_inner() {
            let err = plain_error("callback", "generate: the onText callback threw");
            set_cause(&err, &e);
            return Err(err);
        }
        let stop = match out.stop_reason {
            _ if stopped.get() => "stopped",
            StopReason::Eos(_) => "eos",
            StopReason::StopString(_) => "stop-string",
            StopReason::MaxNewTokens => "max-new-tokens",
            StopReason::ContextFull => "context-full",
        };
        Ok(to_js(&json!({"text": out.text, "tokens": out.ids, "promptTokens": ids.len(), "stopReason": stop, "ms": now_ms() - t0})))
    }

    fn set_cause(err: &JsValue, cause: &JsValue) {
        set(err, "cause", cause);
    }

    // ---- data ---------------------------------------------------------------------------------

    /// A JSONL data set: `{"messages"}`, `{"prompt", "completion"}`, `{"instruction", "input",
    /// "output"}` (Alpaca) or `{"text"}` lines.
    #[wasm_bindgen]
    pub struct Dataset {
        d: Rc<JsonlDataset>,
    }

    #[wasm_bindgen]
    impl Dataset {
        /// Parses JSONL text or bytes; `format` is "auto" (default: from the first line's keys),
        /// "messages", "prompt-completion", "alpaca" or "text". Errors name `name` and the line.
        #[wasm_bindgen(js_name = fromJsonl)]
        pub fn from_jsonl(
            name: &str,
            #[wasm_bindgen(unchecked_param_type = "string | Uint8Array | ArrayBuffer")] data: JsValue,
            format: Option<String>,
        ) -> Result<Dataset, JsValue> {
            hook();
            let bytes = match data.as_string() {
                Some(s) => s.into_bytes(),
                None => bytes_of(&format!("Dataset.fromJsonl({name})"), &data)?,
            };
            let fmt = Format::parse(format.as_deref().unwrap_or("auto")).map_err(|e| fail(format!("reading the data set {name}"), e))?;
            let d = JsonlDataset::from_jsonl(name, &bytes, fmt).map_err(|e| fail(format!("reading the data set {name}"), e))?;
            Ok(Dataset { d: Rc::new(d) })
        }

        /// Number of examples.
        #[wasm_bindgen(getter)]
        pub fn length(&self) -> usize {
            self.d.len()
        }

        /// The format in use ("messages", "prompt-completion", "alpaca" or "text").
        #[wasm_bindgen(getter)]
        pub fn format(&self) -> String {
            self.d.format().name().to_owned()
        }
    }

    // ---- adapters -----------------------------------------------------------------------------

    /// A LoRA adapter (PEFT's files) for one model: start a run from it, or generate with it.
    #[wasm_bindgen]
    #[derive(Clone)]
    pub struct Adapter {
        host: Rc<HostAdapter>,
        set: LoraSet,
        model: Rc<ModelInner>,
    }

    fn adapter_files_js(config: String, weights: Vec<u8>) -> JsValue {
        let o = Object::new();
        set(&o, "adapterConfig", &JsValue::from_str(&config));
        set(&o, "adapterModel", &Uint8Array::from(&weights[..]));
        o.into()
    }

    #[wasm_bindgen]
    impl Adapter {
        /// Reads PEFT's adapter_config.json (text) and adapter_model.safetensors (bytes) for `model`
        /// and uploads it. The tensors must be exactly the A and B of every targeted module, with
        /// the shapes the model and the config give.
        pub fn load(
            model: &Model,
            adapter_config: &str,
            #[wasm_bindgen(unchecked_param_type = "Uint8Array | ArrayBuffer")] adapter_model: JsValue,
        ) -> Result<Adapter, JsValue> {
            hook();
            let st = bytes_of("Adapter.load: adapter_model.safetensors", &adapter_model)?;
            let inner = &model.inner;
            let h = host_adapter_from_bytes(adapter_config, &st, &inner.m.model.cfg, "adapter")
                .map_err(|e| fail(format!("reading the adapter for {}", inner.m.name), e))?;
            let set = h.upload(&inner.ctx).map_err(|e| fail("uploading the adapter", e))?;
            Ok(Adapter { host: Rc::new(h), set, model: inner.clone() })
        }

        /// The adapter's adapter_config.json as an object.
        #[wasm_bindgen(getter, unchecked_return_type = "Record<string, unknown>")]
        pub fn config(&self) -> JsValue {
            let text = crate::lora::peft::config_to_json(&self.host.config);
            js_sys::JSON::parse(&text).unwrap_or(JsValue::NULL)
        }

        /// Generates with the model and this adapter (see `Model.generate`).
        #[wasm_bindgen(unchecked_return_type = "Promise<GenerateResult>")]
        pub fn generate(
            &self,
            #[wasm_bindgen(unchecked_param_type = "Prompt")] prompt: JsValue,
            #[wasm_bindgen(unchecked_optional_param_type = "GenerateOptions")] options: JsValue,
            #[wasm_bindgen(unchecked_optional_param_type = "(text: string) => void")] on_text: JsValue,
        ) -> js_sys::Promise {
            let a = self.clone();
            future_to_promise(async move { generate(&a.model, &a.set, prompt, options, on_text).await })
        }

        /// PEFT's two files of this adapter.
        #[wasm_bindgen(unchecked_return_type = "AdapterFiles")]
        pub fn files(&self) -> Result<JsValue, JsValue> {
            let (c, w) = host_adapter_to_bytes(&self.host, &self.model.m.model.cfg).map_err(|e| fail("writing the adapter files", e))?;
            Ok(adapter_files_js(c, w))
        }
    }

    // ---- several adapters on one model ---------------------------------------------------------

    /// Named adapters on one model: the base is loaded once, each adapter adds only its A and B;
    /// `use(name)` picks the one requests run with, or `generate(..., {adapter})` one request.
    #[wasm_bindgen]
    pub struct AdapterSet {
        model: Rc<ModelInner>,
        set: RefCell<crate::lora::AdapterSet>,
    }

    #[wasm_bindgen]
    impl AdapterSet {
        /// An empty set for `model` (requests run on the base until `use` picks an adapter).
        #[wasm_bindgen(constructor)]
        pub fn new(model: &Model) -> AdapterSet {
            hook();
            AdapterSet { model: model.inner.clone(), set: RefCell::new(crate::lora::AdapterSet::new()) }
        }

        /// Adds a loaded `Adapter` of the same model under `name` (shared, not copied).
        pub fn add(&self, name: &str, adapter: &Adapter) -> Result<(), JsValue> {
            if !Rc::ptr_eq(&adapter.model, &self.model) {
                return Err(plain_error("invalid", format!("AdapterSet.add({name}): the adapter was loaded for another Model object")));
            }
            self.set.borrow_mut().insert(name, adapter.host.config.clone(), adapter.set.clone()).map_err(|e| fail("AdapterSet.add", e))
        }

        /// Reads PEFT's two files (as `Adapter.load`) and adds the adapter under `name`.
        pub fn load(
            &self,
            name: &str,
            adapter_config: &str,
            #[wasm_bindgen(unchecked_param_type = "Uint8Array | ArrayBuffer")] adapter_model: JsValue,
        ) -> Result<(), JsValue> {
            let st = bytes_of("AdapterSet.load: adapter_model.safetensors", &adapter_model)?;
            let m = &self.model;
            let h = host_adapter_from_bytes(adapter_config, &st, &m.m.model.cfg, name)
                .map_err(|e| fail(format!("reading the adapter {name} for {}", m.m.name), e))?;
            self.set.borrow_mut().add(&m.ctx, &m.m.model.cfg, name, &h).map_err(|e| fail(format!("adding the adapter {name}"), e))
        }

        /// Makes `name` the adapter requests run with; null: the base model alone.
        #[wasm_bindgen(js_name = "use")]
        pub fn use_adapter(&self, name: Option<String>) -> Result<(), JsValue> {
            self.set.borrow_mut().use_adapter(name.as_deref()).map_err(|e| fail("AdapterSet.use", e))
        }

        /// Removes `name`; false when there is none. The base is in use if it was the active one.
        pub fn remove(&self, name: &str) -> bool {
            self.set.borrow_mut().remove(name)
        }

        /// The adapter in use, or null for the base model.
        #[wasm_bindgen(getter)]
        pub fn active(&self) -> Option<String> {
            self.set.borrow().active_name().map(str::to_owned)
        }

        /// The adapters' names, in the order they were added.
        #[wasm_bindgen(getter)]
        pub fn names(&self) -> Vec<String> {
            self.set.borrow().names().into_iter().map(str::to_owned).collect()
        }

        /// Bytes of all adapters' A and B on the GPU (the base is not counted: it is shared).
        #[wasm_bindgen(getter, js_name = deviceBytes)]
        pub fn device_bytes(&self) -> usize {
            self.set.borrow().device_bytes()
        }

        /// Generates (see `Model.generate`) with the adapter in use, or with `options.adapter`
        /// for this request alone (a name, or null for the base model).
        #[wasm_bindgen(unchecked_return_type = "Promise<GenerateResult>")]
        pub fn generate(
            &self,
            #[wasm_bindgen(unchecked_param_type = "Prompt")] prompt: JsValue,
            #[wasm_bindgen(unchecked_optional_param_type = "AdapterGenerateOptions")] options: JsValue,
            #[wasm_bindgen(unchecked_optional_param_type = "(text: string) => void")] on_text: JsValue,
        ) -> js_sys::Promise {
            let inner = self.model.clone();
            let picked = (|| -> Result<(LoraSet, JsValue), JsValue> {
                let mut o = from_js("AdapterGenerateOptions", &options)?;
                let set = self.set.borrow();
                let lora = match o.as_object_mut().and_then(|m| m.remove("adapter")) {
                    None => set.active().clone(),
                    Some(Value::Null) => LoraSet::default(),
                    Some(Value::String(n)) => set.get(Some(&n)).map_err(|e| fail("AdapterSet.generate", e))?.clone(),
                    Some(v) => return Err(plain_error("invalid", format!("AdapterGenerateOptions.adapter: expected a name or null, got {v}"))),
                };
                let options = if o.is_null() { JsValue::UNDEFINED } else { to_js(&o) };
                Ok((lora, options))
            })();
            future_to_promise(async move {
                let (lora, options) = picked?;
                generate(&inner, &lora, prompt, options, on_text).await
            })
        }
    }

    // ---- training -----------------------------------------------------------------------------

    struct TrainingInner {
        model: Rc<ModelInner>,
        session: RefCell<TrainSession>,
        options: Value,
        /// The adapter after the last completed step, in host memory: what is left to download
        /// when the GPU device is lost (`keptAdapter`).
        kept: RefCell<Option<(u64, HostAdapter)>>,
    }

    /// A LoRA training run of one model on one data set.
    #[wasm_bindgen]
    pub struct Training {
        inner: Rc<TrainingInner>,
    }

    fn step_js(s: &StepInfo, total: u64, ms: f64) -> JsValue {
        to_js(&json!({
            "step": s.step, "totalSteps": total, "loss": s.loss, "lr": s.lr, "gradNorm": s.grad_norm,
            "countedTokens": s.counted_tokens, "inputTokens": s.input_tokens, "epoch": s.epoch, "ms": ms,
        }))
    }

    fn new_training(model: &Model, data: &Dataset, options: &JsValue, init: Option<&HostAdapter>) -> Result<Training, JsValue> {
        hook();
        let opts = from_js("TrainOptions", options)?;
        let m = &model.inner;
        let cfg = options::train_config(&opts).map_err(|e| fail("starting training", e))?;
        options::check_training_fits(&m.m.config, &cfg, &m.info, m.ctx.max_binding()).map_err(|e| fail("starting training", e))?;
        let session = TrainSession::new(&m.ctx, &m.m, &data.d, cfg, init)
            .map_err(|e| fail(format!("starting training of {} on {}", m.m.name, data.d.file()), e))?;
        Ok(Training { inner: Rc::new(TrainingInner { model: m.clone(), session: RefCell::new(session), options: opts, kept: RefCell::new(None) }) })
    }

    async fn one_step(t: &TrainingInner) -> Result<JsValue, JsValue> {
        let mut s = t.session.try_borrow_mut().map_err(|_| busy("Training.step"))?;
        if s.done() {
            let n = s.config().steps;
            return Err(plain_error("invalid", format!("Training.step: all {n} steps are done (TrainOptions.steps)")));
        }
        let t0 = now_ms();
        let next = s.step_count() + 1;
        let ctx = &t.model.ctx;
        let info = match s.step().await {
            Ok(i) => i,
            Err(e) => return Err(fail(format!("training step {next}"), gpu_error(ctx, e).await)),
        };
        // Kept on the host after every step (A and B only: a few MB), since a lost device takes
        // the GPU copy with it.
        match s.adapter(ctx).await {
            Ok(h) => *t.kept.borrow_mut() = Some((info.step, h)),
            Err(e) => return Err(fail(format!("reading the adapter after step {next}"), gpu_error(ctx, e).await)),
        }
        Ok(step_js(&info, s.config().steps, now_ms() - t0))
    }

    /// The error a failed GPU call reports: a lost device (whose callback the browser may run
    /// a moment after the failed call) rather than the failure it caused.
    async fn gpu_error(ctx: &GpuContext, e: crate::Error) -> crate::Error {
        if matches!(e, crate::Error::DeviceLost(_)) {
            return e;
        }
        let _ = yield_to_event_loop().await;
        match ctx.check() {
            Err(lost @ crate::Error::DeviceLost(_)) => lost,
            _ => e,
        }
    }

    #[wasm_bindgen]
    impl Training {
        /// A run from a fresh adapter (initialized from `options` and its seed). The data set is
        /// tokenized for the model here; too long a batch for the GPU's limits is an error.
        #[wasm_bindgen(constructor)]
        pub fn new(
            model: &Model,
            dataset: &Dataset,
            #[wasm_bindgen(unchecked_optional_param_type = "TrainOptions")] options: JsValue,
        ) -> Result<Training, JsValue> {
            new_training(model, dataset, &options, None)
        }

        /// A run that trains `adapter` further (its own LoRA config; `options` sets the rest).
        #[wasm_bindgen(js_name = fromAdapter)]
        pub fn from_adapter(
            model: &Model,
            dataset: &Dataset,
            adapter: &Adapter,
            #[wasm_bindgen(unchecked_optional_param_type = "TrainOptions")] options: JsValue,
        ) -> Result<Training, JsValue> {
            new_training(model, dataset, &options, Some(&adapter.host))
        }

        /// One optimizer step; resolves when its loss is read back.
        #[wasm_bindgen(unchecked_return_type = "Promise<StepReport>")]
        pub fn step(&self) -> js_sys::Promise {
            let t = self.inner.clone();
            future_to_promise(async move { one_step(&t).await })
        }

        /// Steps until `steps` more are done (default: to the end of the run), yielding to the
        /// event loop between steps and calling `onProgress(report)` after each; it returning
        /// `false` stops the run early. Resolves to the reports.
        #[wasm_bindgen(unchecked_return_type = "Promise<StepReport[]>")]
        pub fn train(
            &self,
            steps: Option<u32>,
            #[wasm_bindgen(unchecked_optional_param_type = "ProgressCallback")] on_progress: JsValue,
        ) -> js_sys::Promise {
            let t = self.inner.clone();
            future_to_promise(async move {
                let cb = callback("Training.train: onProgress", on_progress)?;
                let out = js_sys::Array::new();
                let mut left = steps.map(u64::from);
                loop {
                    if left == Some(0) || t.session.try_borrow().map(|s| s.done()).unwrap_or(false) {
                        break;
                    }
                    let r = one_step(&t).await?;
                    out.push(&r);
                    left = left.map(|n| n - 1);
                    if let Some(f) = &cb {
                        let keep = f.call1(&JsValue::NULL, &r).map_err(|e| {
                            let err = plain_error("callback", "Training.train: the onProgress callback threw");
                            set_cause(&err, &e);
                            err
                        })?;
                        if keep == JsValue::FALSE {
                            break;
                        }
                    }
                    yield_to_event_loop().await?;
                }
                Ok(out.into())
            })
        }

        /// Steps taken.
        #[wasm_bindgen(getter, js_name = stepCount)]
        pub fn step_count(&self) -> f64 {
            self.inner.session.try_borrow().map(|s| s.step_count() as f64).unwrap_or(f64::NAN)
        }

        /// Steps the run was configured for.
        #[wasm_bindgen(getter, js_name = totalSteps)]
        pub fn total_steps(&self) -> f64 {
            self.inner.session.try_borrow().map(|s| s.config().steps as f64).unwrap_or(f64::NAN)
        }

        /// True once every configured step is done.
        #[wasm_bindgen(getter)]
        pub fn done(&self) -> bool {
            self.inner.session.try_borrow().map(|s| s.done()).unwrap_or(false)
        }

        /// The options the run was created with (as given).
        #[wasm_bindgen(getter, unchecked_return_type = "TrainOptions")]
        pub fn options(&self) -> JsValue {
            to_js(&self.inner.options)
        }

        /// Token counts of the whole data set for this model, and the split sizes.
        #[wasm_bindgen(getter, js_name = dataStats, unchecked_return_type = "DatasetStats & { trainExamples: number; validationExamples: number }")]
        pub fn data_stats(&self) -> Result<JsValue, JsValue> {
            let s = self.inner.session.try_borrow().map_err(|_| busy("Training.dataStats"))?;
            let d = s.data_stats();
            let (tr, va) = s.split_sizes();
            Ok(to_js(&json!({
                "examples": d.examples, "tokens": d.tokens, "countedTokens": d.counted_tokens, "maxTokens": d.max_tokens,
                "truncated": d.truncated, "withoutLoss": d.without_loss, "trainExamples": tr, "validationExamples": va,
            })))
        }

        /// The mean loss over the held-out examples (null without `validation`), calling
        /// `onProgress(done, total)` (held-out sequences) after each batch; it returning false
        /// abandons the evaluation (null).
        #[wasm_bindgen(js_name = validationLoss, unchecked_return_type = "Promise<number | null>")]
        pub fn validation_loss(
            &self,
            #[wasm_bindgen(unchecked_optional_param_type = "EvalProgressCallback")] on_progress: JsValue,
        ) -> js_sys::Promise {
            let t = self.inner.clone();
            future_to_promise(async move {
                let cb = callback("Training.validationLoss: onProgress", on_progress)?;
                let s = t.session.try_borrow().map_err(|_| busy("Training.validationLoss"))?;
                let thrown: RefCell<Option<JsValue>> = RefCell::new(None);
                let l = s
                    .validation_loss_with(|done, total| match &cb {
                        None => true,
                        Some(f) => match f.call2(&JsValue::NULL, &JsValue::from(done as u32), &JsValue::from(total as u32)) {
                            Ok(v) => v != JsValue::FALSE,
                            Err(e) => {
                                *thrown.borrow_mut() = Some(e);
                                false
                            }
                        },
                    })
                    .await
                    .map_err(|e| fail("validation loss", e))?;
                if let Some(e) = thrown.into_inner() {
                    let err = plain_error("callback", "Training.validationLoss: the onProgress callback threw");
                    set_cause(&err, &e);
                    return Err(err);
                }
                Ok(l.map_or(JsValue::NULL, JsValue::from_f64))
            })
        }

        /// The GPU memory this run is planned to need (src/train/memory.rs, as `qlora train`
        /// prints it), with the base model's bytes as loaded.
        #[wasm_bindgen(getter, js_name = memoryPlan, unchecked_return_type = "MemoryPlan")]
        pub fn memory_plan(&self) -> Result<JsValue, JsValue> {
            use crate::train::memory::{plan, RunShape};
            let s = self.inner.session.try_borrow().map_err(|_| busy("Training.memoryPlan"))?;
            let m = &self.inner.model.m;
            let cfg = s.config();
            let targets = s.lora_config().targets(&m.model.cfg).map_err(|e| fail("Training.memoryPlan", e))?;
            let adapted = targets.iter().map(|t| t.iter().filter(|&&b| b).count()).max().unwrap_or(0);
            let shape = RunShape {
                batch: cfg.batch_size,
                seq: cfg.max_len,
                rank: cfg.lora.r,
                adapted,
                nf4: match m.quant {
                    crate::session::BaseQuant::F32 => None,
                    crate::session::BaseQuant::Nf4 { double_quant, .. } => Some(double_quant),
                },
                table_bytes: 4,
                dora: cfg.lora.use_dora,
            };
            let p = plan(&m.config, &shape, cfg.grad_checkpoint);
            let (proj, other) = m.model.weights.device_bytes();
            let weights = (proj + other) as u64;
            Ok(to_js(&json!({
                "weights": weights, "lora": p.lora, "activations": p.activations, "transient": p.transient,
                "total": weights + p.lora + p.activations + p.transient, "gradCheckpoint": p.grad_checkpoint,
            })))
        }

        /// The buffer pool's figures on this run's GPU: bytes held on the device, held by live
        /// tensors, and the most held by live tensors so far.
        #[wasm_bindgen(getter, js_name = gpuMemory, unchecked_return_type = "GpuMemory")]
        pub fn gpu_memory(&self) -> JsValue {
            let p = self.inner.model.ctx.pool_stats();
            to_js(&json!({"allocated": p.allocated, "inUse": p.in_use, "peakInUse": p.peak_in_use}))
        }

        /// The adapter as it stands, as PEFT's two files (base_model_name_or_path: the model's name).
        #[wasm_bindgen(js_name = exportAdapter, unchecked_return_type = "Promise<AdapterFiles>")]
        pub fn export_adapter(&self) -> js_sys::Promise {
            let t = self.inner.clone();
            future_to_promise(async move {
                let s = t.session.try_borrow().map_err(|_| busy("Training.exportAdapter"))?;
                let (c, w) = s.adapter_files(&t.model.ctx, Some(&t.model.m.name)).await.map_err(|e| fail("exporting the adapter", e))?;
                Ok(adapter_files_js(c, w))
            })
        }

        /// The adapter after the last completed step as PEFT's two files, from host memory (so
        /// also after the GPU device was lost), with that step's number; null before the first
        /// step.
        #[wasm_bindgen(js_name = keptAdapter, unchecked_return_type = "KeptAdapterFiles | null")]
        pub fn kept_adapter(&self) -> Result<JsValue, JsValue> {
            let kept = self.inner.kept.borrow();
            let Some((step, h)) = kept.as_ref() else { return Ok(JsValue::NULL) };
            let mut h = h.clone();
            h.config.base_model_name_or_path = Some(self.inner.model.m.name.clone());
            let (c, w) = host_adapter_to_bytes(&h, &self.inner.model.m.model.cfg).map_err(|e| fail("writing the kept adapter", e))?;
            let o = adapter_files_js(c, w);
            set(&o, "step", &JsValue::from_f64(*step as f64));
            Ok(o)
        }

        /// A copy of the adapter as it stands (further steps do not change it).
        #[wasm_bindgen(unchecked_return_type = "Promise<Adapter>")]
        pub fn adapter(&self) -> js_sys::Promise {
            let t = self.inner.clone();
            future_to_promise(async move {
                let s = t.session.try_borrow().map_err(|_| busy("Training.adapter"))?;
                let mut h = s.adapter(&t.model.ctx).await.map_err(|e| fail("reading the adapter", e))?;
                h.config.base_model_name_or_path = Some(t.model.m.name.clone());
                let set = h.upload(&t.model.ctx).map_err(|e| fail("copying the adapter", e))?;
                Ok(Adapter { host: Rc::new(h), set, model: t.model.clone() }.into())
            })
        }

        /// Generates with the model and the adapter as it stands (see `Model.generate`).
        #[wasm_bindgen(unchecked_return_type = "Promise<GenerateResult>")]
        pub fn generate(
            &self,
            #[wasm_bindgen(unchecked_param_type = "Prompt")] prompt: JsValue,
            #[wasm_bindgen(unchecked_optional_param_type = "GenerateOptions")] options: JsValue,
            #[wasm_bindgen(unchecked_optional_param_type = "(text: string) => void")] on_text: JsValue,
        ) -> js_sys::Promise {
            let t = self.inner.clone();
            future_to_promise(async move {
                let set = t.session.try_borrow().map_err(|_| busy("Training.generate"))?.lora_set().clone();
                generate(&t.model, &set, prompt, options, on_text).await
            })
        }
    }
}
