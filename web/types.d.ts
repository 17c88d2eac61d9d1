// The TypeScript types of the npm package's option and result objects: wasm-bindgen appends
// this file to the generated qlora_webgpu.d.ts (src/web.rs, typescript_custom_section).
/** How `Gpu.open` picks the adapter. */
export interface GpuOptions {
  /** Ask only for a compatibility-mode adapter (`featureLevel: "compatibility"`) and hold the
   *  device to compatibility mode's default limits (128 MiB binding, 256 MiB buffer, 8 storage
   *  buffers per stage, 16 KiB workgroup storage, 128 invocations a workgroup: 128 along x
   *  and y, 64 along z). To try what a compatibility-mode GPU allows on any GPU. */
  compatibility?: boolean;
}
/** What the GPU adapter is and can do (`Gpu.info`). */
export interface GpuInfo {
  /** Which adapter `Gpu.open` got: "core" (a hardware adapter with core WebGPU),
   *  "compatibility" (a hardware adapter in compatibility mode: OpenGL ES / ANGLE class GPUs,
   *  lower limits), or "fallback" (a software adapter: slow; no hardware adapter was offered). */
  adapterKind: "core" | "compatibility" | "fallback";
  /** The browser's isFallbackAdapter for the adapter in use. */
  isFallbackAdapter: boolean;
  /** The device's storage buffers per shader stage (a kernel binds at most 8 here). */
  maxStorageBuffersPerShaderStage: number;
  name: string; backend: string; deviceType: string; driver: string;
  shaderF16: boolean; subgroups: boolean; timestampQuery: boolean;
  /** The kernels the matrix products take: "subgroup" when the device has subgroups (`subgroups`), else "vec4". */
  matmulPath: "subgroup" | "vec4";
  /** Largest storage-buffer binding, bytes. Larger embeddings and lm_heads are stored as
   *  several buffers (row shards); other tensors must fit. */
  maxStorageBufferBindingSize: number; maxBufferSize: number;
  /** The largest tensor one buffer holds here: the binding limit, or less after
   *  `Gpu.setMaxBinding` (to try compatibility-mode or mobile limits on a bigger GPU). */
  maxBinding: number;
  maxComputeWorkgroupStorageSize: number; maxComputeInvocationsPerWorkgroup: number;
}
/** How a base model is loaded. */
export interface ModelOptions {
  /** Base projections: "f32" (LoRA, default), "nf4" or "nf4-dq" (QLoRA, NF4 with double quantization). */
  quant?: "f32" | "nf4" | "nf4-dq";
  /** NF4 block size (default 64). */
  blocksize?: number;
  /** Positions to prepare (a training example, or a prompt plus its answer, must fit); default
   *  the model's max_position_embeddings, at most 2048. */
  maxPositions?: number;
  /** The model's name in messages and in the adapter's base_model_name_or_path. */
  name?: string;
}
/** What `Model.info` reports. */
export interface ModelInfo {
  name: string; architecture: string; layers: number; hidden: number; intermediate: number;
  heads: number; kvHeads: number; headDim: number; vocab: number; tiedEmbeddings: boolean;
  quant: "f32" | "nf4" | "nf4-dq"; maxPositions: number; chatTemplate: boolean;
  /** Bytes on the device: the projections, and the rest (embedding, norms, lm_head). */
  deviceBytes: { projections: number; other: number };
}
/** A training run's settings; every field is optional (defaults: r 16, alpha 16, the seven
 *  projections, dropout 0, AdamW lr 2e-4, cosine schedule after 3% warmup, grad-norm clip 1.0,
 *  batch 4, max length 512, 100 steps, seed 0). */
export interface TrainOptions {
  rank?: number; alpha?: number; dropout?: number;
  /** "all-linear" (default), module names ["q_proj", "v_proj"], or a regular expression. */
  targetModules?: "all-linear" | string[] | string;
  useRslora?: boolean; layersToTransform?: number[];
  /** DoRA (PEFT's use_dora): a trained magnitude per output feature besides A and B. */
  useDora?: boolean;
  steps?: number; batchSize?: number; gradAccum?: number; maxLen?: number; lr?: number;
  schedule?: "constant" | "linear" | "cosine"; warmupSteps?: number; weightDecay?: number;
  beta1?: number; beta2?: number; eps?: number;
  /** Clip the global gradient norm (0: no clipping). */
  maxGradNorm?: number;
  seed?: number; shuffle?: boolean; trainOnPrompt?: boolean; appendEos?: boolean; gradCheckpoint?: boolean;
  /** Sequence packing (TRL's padding-free packing): examples packed into rows of maxLen. */
  packing?: boolean;
  /** Held-out examples: a fraction in (0, 1) or a count (0: none). */
  validation?: number;
}
/** What one optimizer step did. */
export interface StepReport {
  step: number; totalSteps: number; loss: number; lr: number; gradNorm: number | null;
  countedTokens: number; inputTokens: number; epoch: number;
  /** Wall time of the step, milliseconds (the GPU work included: the loss is read back). */
  ms: number;
}
/** The GPU memory a run is planned to need (`Training.memoryPlan`), bytes: the base model as
 *  loaded, LoRA with its gradients and AdamW moments, the activations kept for backward and
 *  the transient buffers of one layer's backward and the output layer (an estimate). */
export interface MemoryPlan {
  weights: number; lora: number; activations: number; transient: number; total: number;
  /** Whether the plan recomputes each layer in backward (the `gradCheckpoint` option). */
  gradCheckpoint: boolean;
}
/** The buffer pool's figures (`Training.gpuMemory`), bytes: held on the device, held by live
 *  tensors now, and the most ever held by live tensors on this GPU. */
export interface GpuMemory { allocated: number; inUse: number; peakInUse: number }
/** Called by `Training.validationLoss` after each batch; return false to abandon it. */
export type EvalProgressCallback = (done: number, total: number) => boolean | void;
/** Called after each step of `Training.train`; return false to stop after this step. */
export type ProgressCallback = (report: StepReport) => boolean | void;
/** PEFT's two adapter files. */
export interface AdapterFiles {
  /** adapter_config.json */
  adapterConfig: string;
  /** adapter_model.safetensors */
  adapterModel: Uint8Array;
}
/** A chat message for the model's chat template. */
export interface ChatMessage { role: string; content: string }
/** A string (one user turn through the chat template, or raw text when the model has none),
 *  chat messages, or raw text. */
export type Prompt = string | ChatMessage[] | { messages: ChatMessage[] } | { text: string };
/** Sampling settings (default: greedy, 128 new tokens, stop at the model's eos). */
export interface GenerateOptions {
  maxNewTokens?: number; temperature?: number; topK?: number; topP?: number; seed?: number;
  stop?: string[]; skipSpecialTokens?: boolean;
}
/** `AdapterSet.generate`'s options: sampling, and the adapter for this request alone (a
 *  name, or null for the base model; absent: the one `use` picked). */
export interface AdapterGenerateOptions extends GenerateOptions { adapter?: string | null }
export interface GenerateResult {
  text: string; tokens: number[]; promptTokens: number;
  stopReason: "eos" | "stop-string" | "max-new-tokens" | "context-full" | "stopped"; ms: number;
}
/** A data set's token counts for one model. */
export interface DatasetStats {
  examples: number; tokens: number; countedTokens: number; maxTokens: number; truncated: number; withoutLoss: number;
}
/** The error kinds the library's errors carry (on the innermost `cause`). "device-lost": the
 *  GPU device is gone (driver reset, GPU process crash, `GPUDevice.destroy`): open a new `Gpu`
 *  and load the model again; `Training.keptAdapter()` still has the last completed step's
 *  adapter. "fetch": `Model.fromUrl` could not download the file; "aborted": its `signal` abandoned the load. */
export type ErrorKind = "webgpu-missing" | "no-adapter" | "device" | "device-lost" | "out-of-memory" | "limit" | "format" | "invalid" | "shape" | "busy" | "callback" | "fetch" | "aborted";
/** `Model.fromUrl`'s options: the model options, progress, caching. */
export interface UrlModelOptions extends ModelOptions {
  /** Called as the download and the upload go: bytes, then tensors. */
  onProgress?: (p: LoadProgress) => void;
  /** Read from and store into the origin's Cache API storage (default true). */
  cache?: boolean;
  /** Abandons the load when aborted (the download stops, nothing is cached; the promise
   *  rejects with an error of kind "aborted"). */
  signal?: AbortSignal;
}
/** A `Model.fromUrl` progress report. */
export interface LoadProgress {
  phase: "download" | "upload";
  /** Bytes read so far (from the network, or from the cache when `fromCache`). */
  bytesDone: number;
  /** The file's size when known (Content-Length), else null. */
  bytesTotal: number | null;
  fromCache: boolean;
  /** Tensors on the GPU so far, of `tensorsTotal` (phase "upload"). */
  tensorsDone: number; tensorsTotal: number;
}
/** An adapter kept in host memory after a completed step. */
export interface KeptAdapterFiles extends AdapterFiles { step: number }
