// The demo page's main thread: the form, the loss chart, the answers and the downloads. The
// model and the training run live in worker.js. `window.demo` exposes the page's state (the
// browser test reads it): gpu, model, options, losses, stepMs, answers, adapter, error,
// memoryPlan (bytes the run is planned to need), memory (what it used), stopped (what a Stop
// kept), statusLog (every status text shown, in order). Tests only: `testHold` set to 'reading',
// 'loading' or 'export' holds that phase open until Stop is pressed (at most a minute), so that a test can
// press Stop in a phase that is otherwise too short to click in.

import { drawLossChart } from './chart.js';

const $ = (id) => document.getElementById(id);
const state = (window.demo = {
  phase: 'starting', gpu: null, model: null, options: null, stats: null,
  losses: [], stepMs: [], heldOut: null, answers: { before: '', after: '' }, adapter: null, error: null, trainMs: null,
  memoryPlan: null, memory: null, stopped: null, stopAsked: false, statusLog: [],
});
// The phases in which something runs (Stop is enabled in each).
const RUNNING = ['reading', 'loading', 'answer-before', 'eval-before', 'training', 'eval-after', 'answer-after', 'export'];
// A longer run the page estimates the time of, from the measured step time.
const LONG_RUN = 200;

const worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
let urls = [];

function setStatus(text) {
  $('status').textContent = text;
  const log = state.statusLog;
  if (log[log.length - 1] !== text) log.push(text);
}

function setPhase(phase, text) {
  state.phase = phase;
  const stopping = state.stopAsked && RUNNING.includes(phase) && !text.endsWith(' (stopping…)');
  setStatus(text + (stopping ? ' (stopping…)' : ''));
  const running = RUNNING.includes(phase);
  $('train').disabled = running || !state.gpu;
  $('stop').disabled = !running || state.stopAsked;
}

/** "1 min 20 s" / "45 s" / "2 h 5 min". */
function fmtTime(ms) {
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min${s % 60 ? ` ${s % 60} s` : ''}`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

/** The time a step takes here: the mean of the steps after the first (which also prepares the kernels), else the first. */
function stepTime() {
  const later = state.stepMs.slice(1);
  return later.length ? later.reduce((a, b) => a + b, 0) / later.length : state.stepMs[0];
}

function renderRunInfo() {
  const lines = [];
  const m = state.model;
  if (m) {
    lines.push(`Model ${m.name}: ${m.architecture}, ${m.layers} layers, hidden ${m.hidden}, vocabulary ${m.vocab}, ` +
      `${m.quant === 'f32' ? 'f32 base (LoRA)' : `${m.quant === 'nf4-dq' ? 'NF4 + double quant' : 'NF4'} base (QLoRA)`}, ` +
      `${fmtBytes(m.deviceBytes.projections + m.deviceBytes.other)} on the GPU.`);
  }
  const p = state.memoryPlan;
  if (p) {
    lines.push(`GPU memory this run needs: about ${fmtBytes(p.total)} (base ${fmtBytes(p.weights)}, adapter with gradients and AdamW ` +
      `${fmtBytes(p.lora)}, activations ${fmtBytes(p.activations)}, one layer's backward and the output layer ${fmtBytes(p.transient)}; planned).`);
  }
  if (state.memory) {
    lines.push(`GPU memory used: at most ${fmtBytes(state.memory.peakInUse)} in tensors at once; ${fmtBytes(state.memory.allocated)} held by the buffer pool.`);
  }
  if (state.stepMs.length && state.options) {
    const t = stepTime();
    const n = state.options.steps;
    lines.push(`Time here: ${(t / 1000).toFixed(1)} s a step, so ${n} steps ≈ ${fmtTime(n * t)}; a longer run of ${LONG_RUN} steps ≈ ${fmtTime(LONG_RUN * t)}.`);
  }
  $('run-info').textContent = lines.join('\n');
}

function describeChain(chain) {
  return chain.map((c, i) => (i ? '  caused by: ' : '') + c.message).join('\n');
}

function showError(chain) {
  state.error = chain;
  const last = chain[chain.length - 1] || {};
  let hint = '';
  if (last.kind === 'limit') {
    hint = '\n\nThis model (or this batch) is larger than what this GPU adapter allows in one buffer. Try a smaller model, ' +
      'a smaller batch size or max length, or a browser/GPU with higher WebGPU limits.';
  } else if (last.kind === 'webgpu-missing' || last.kind === 'no-adapter') {
    hint = '\n\nThis demo needs WebGPU.';
  }
  $('error').textContent = describeChain(chain) + hint;
  $('error').classList.remove('hidden');
}

function clearError() {
  state.error = null;
  $('error').classList.add('hidden');
  $('error').textContent = '';
}

function renderChart() {
  drawLossChart($('chart'), state.losses, state.options ? state.options.steps : 1);
}

function renderHeldOut() {
  const h = state.heldOut;
  if (!h || h.before == null) {
    $('held-out').textContent = '';
    return;
  }
  $('held-out').textContent = `Held-out loss (${state.stats.validationExamples} examples): ${h.before.toFixed(4)} before training` +
    (h.after == null ? '' : ` → ${h.after.toFixed(4)} after`);
}

function fmtBytes(n) {
  return n >= 1 << 20 ? `${(n / 1048576).toFixed(1)} MiB` : `${(n / 1024).toFixed(1)} KiB`;
}

/** What the adapter `Gpu.open` got is and limits. */
function adapterKindText(i) {
  const what = {
    core: 'Hardware adapter with core WebGPU.',
    compatibility: 'Hardware adapter in WebGPU compatibility mode (OpenGL ES class): no core adapter was offered.',
    fallback: 'Software adapter (no hardware adapter was offered): slow.',
  }[i.adapterKind] || '';
  return `${what} Limits: ${fmtBytes(i.maxBinding)} a tensor, ${i.maxStorageBuffersPerShaderStage} storage buffers per kernel, ` +
    `${i.maxComputeInvocationsPerWorkgroup} threads a workgroup.`;
}

function showLoadProgress(p) {
  state.loadProgress = p;
  const src = p.fromCache ? 'from the cache' : 'downloading';
  $('status').textContent = p.phase === 'download'
    ? `Model ${src}: ${fmtBytes(p.bytesDone)}${p.bytesTotal ? ` of ${fmtBytes(p.bytesTotal)}` : ''}…`
    : `Model to the GPU: tensor ${p.tensorsDone} of ${p.tensorsTotal}…`;
}

worker.onmessage = (ev) => {
  const m = ev.data;
  switch (m.type) {
    case 'gpu':
      if (m.error) {
        state.gpu = null;
        state.gpuError = m.error;
        $('gpu').classList.add('bad');
        $('gpu').textContent = describeChain(m.error) +
          '\n\nThis demo needs WebGPU: Chrome or Edge 113+, or Chromium with --enable-unsafe-webgpu.';
        setPhase('no-webgpu', 'WebGPU is not available, so nothing can be trained here.');
      } else {
        state.gpu = m.info;
        const i = m.info;
        $('gpu').textContent = `${i.name || 'WebGPU adapter'} (${i.backend}${i.subgroups ? ', subgroups' : ''}${i.shaderF16 ? ', f16' : ''}; ${i.matmulPath} matmul kernels); ` +
          `largest buffer binding ${fmtBytes(i.maxStorageBufferBindingSize)}. qlora-webgpu ${m.version}`;
        $('gpu').textContent += `\n${adapterKindText(i)}`;
        setPhase('ready', m.reopened ? 'The GPU is open again: Train starts over (the model is loaded anew).' : 'Choose a model, then Train.');
      }
      break;
    case 'load-progress':
      (state.loadEvents ||= []).push(m.progress);
      showLoadProgress(m.progress);
      break;
    case 'forgotten':
      $('cache-status').textContent = `Forgot ${m.count} cached model file${m.count === 1 ? '' : 's'}.`;
      state.forgotten = m;
      break;
    case 'model': {
      state.model = m.info;
      renderRunInfo();
      setPhase('loading', m.cached ? 'The model is already loaded.' : `Model loaded${m.ms ? ` in ${fmtTime(m.ms)}` : ''}.`);
      break;
    }
    case 'phase':
      setPhase(m.phase, m.text);
      break;
    case 'eval-progress':
      setPhase(state.phase, `Held-out loss ${m.which} training: ${m.done} of ${m.total} examples…`);
      break;
    case 'stats':
      state.stats = m.stats;
      state.options = m.options;
      state.memoryPlan = m.memoryPlan;
      renderRunInfo();
      renderChart();
      break;
    case 'step': {
      const r = m.report;
      state.losses.push({ step: r.step, loss: r.loss });
      state.stepMs.push(r.ms);
      $('step-log').insertAdjacentText('afterbegin', `step ${r.step}/${r.totalSteps}  loss ${r.loss.toFixed(4)}  lr ${r.lr.toExponential(2)}  ${r.ms.toFixed(0)} ms\n`);
      renderRunInfo();
      const left = r.totalSteps - r.step;
      const next = left > 0 && !state.stopAsked ? `; step ${r.step + 1} running, about ${fmtTime(left * stepTime())} left` : '';
      setPhase('training', `Step ${r.step} of ${r.totalSteps} done: loss ${r.loss.toFixed(4)} (${(r.ms / 1000).toFixed(1)} s)${next}`);
      renderChart();
      break;
    }
    case 'validation':
      state.heldOut = m.heldOut;
      renderHeldOut();
      break;
    case 'answer':
      state.answers[m.which] = m.text;
      if (m.final && !m.text.trim()) {
        $(m.which).innerHTML = '<span class="empty">(no visible text: only whitespace or special tokens)</span>';
      } else {
        $(m.which).textContent = m.text + (m.final ? '' : ' ▍');
      }
      if (!m.final) {
        setPhase(state.phase, `${m.which === 'before' ? 'Base model' : 'Trained model'} answering… (${m.pieces} of at most ${m.maxNewTokens} tokens)`);
      }
      break;
    case 'adapter': {
      state.adapter = { config: m.config, model: m.model, keptStep: m.keptStep ?? null };
      for (const u of urls) URL.revokeObjectURL(u);
      urls = [
        URL.createObjectURL(new Blob([m.config], { type: 'application/json' })),
        URL.createObjectURL(new Blob([m.model], { type: 'application/octet-stream' })),
      ];
      $('downloads').innerHTML = '';
      const names = ['adapter_config.json', 'adapter_model.safetensors'];
      names.forEach((n, k) => {
        const a = document.createElement('a');
        a.href = urls[k];
        a.download = n;
        a.id = `download-${k ? 'model' : 'config'}`;
        a.textContent = `⬇ ${n} (${fmtBytes(k ? m.model.byteLength : m.config.length)})`;
        $('downloads').append(a);
      });
      const hint = document.createElement('p');
      hint.className = 'hint';
      hint.textContent = 'Put both files in one folder: PEFT loads it with PeftModel.from_pretrained(base, folder).';
      $('downloads').append(hint);
      break;
    }
    case 'done': {
      state.trainMs = m.trainMs;
      state.memory = m.memory || null;
      state.stopped = m.stopped || null;
      state.stopAsked = false;
      renderRunInfo();
      if (m.stopped) {
        setPhase('stopped', m.stopped);
        break;
      }
      const first = state.losses[0]?.loss;
      const last = state.losses[state.losses.length - 1]?.loss;
      const t = stepTime() || 0;
      setPhase('done', `Done: ${m.steps} steps, loss ${first?.toFixed(3)} → ${last?.toFixed(3)}, ${(t / 1000).toFixed(1)} s a step. ` +
        `A short run: ${LONG_RUN} steps would take about ${fmtTime(LONG_RUN * t)} here.`);
      break;
    }
    case 'error':
      state.stopAsked = false;
      showError(m.chain);
      if (m.lost) {
        state.lost = m.lost;
        $('error').textContent += `\n\nThe GPU was lost (a driver reset, a crashed GPU process, or the browser took the GPU back). ` +
          (m.lost.keptStep ? `The adapter after step ${m.lost.keptStep} is kept: download it below. ` : 'No step had finished, so there is no adapter to keep. ') +
          'Press Train to start again: the GPU is opened anew and the model loaded again (no page reload needed).';
      }
      setPhase(state.gpu ? 'ready' : 'no-webgpu', `Failed while handling "${m.stage}".`);
      break;
  }
};
worker.onerror = (e) => {
  showError([{ message: `the worker failed: ${e.message || e}` }]);
  setPhase('error', 'The worker stopped.');
};

$('init-adapter-on').addEventListener('change', () => $('init-adapter').classList.toggle('hidden', !$('init-adapter-on').checked));
document.querySelectorAll('input[name=data]').forEach((r) => r.addEventListener('change', () => {}));
$('data-file').addEventListener('change', () => { document.querySelector('input[name=data][value=file]').checked = true; });

function num(id, int = true) {
  const v = Number($(id).value);
  if (!Number.isFinite(v) || (int && !Number.isInteger(v))) throw new Error(`${$(id).labels?.[0]?.textContent || id}: not a valid number`);
  return v;
}

/** Reads the chosen files, showing the bytes read; null when Stop was pressed meanwhile. */
async function readFiles(list) {
  const files = [...list];
  const total = files.reduce((a, f) => a + f.size, 0);
  let done = 0;
  let shown = 0;
  const out = [];
  for (const f of files) {
    const bytes = new Uint8Array(f.size);
    let at = 0;
    const reader = f.stream().getReader();
    for (;;) {
      const { done: end, value } = await reader.read();
      if (end) break;
      bytes.set(value, at);
      at += value.length;
      done += value.length;
      if (state.testHold === 'reading') {
        for (const t0 = Date.now(); !state.stopAsked && Date.now() - t0 < 60e3;) await new Promise((r) => setTimeout(r, 20));
      }
      if (state.stopAsked) {
        await reader.cancel();
        return null;
      }
      if (done - shown > (1 << 20) || done === total) {
        shown = done;
        setPhase('reading', `Reading the model: ${fmtBytes(done)} of ${fmtBytes(total)}…`);
      }
    }
    out.push({ name: f.name, bytes: bytes.buffer });
  }
  return out;
}

/** The base weights: the form's choice, or for "auto" QLoRA (NF4 + double quant) for a GGUF file
 *  (nearly always 4- to 8-bit already: an f32 base would take 4 to 8 times its size) and for
 *  weights over AUTO_QLORA_BYTES, and f32 (plain LoRA) for small Hugging Face models. */
const AUTO_QLORA_BYTES = 256 << 20;
function chooseQuant(files, url) {
  const v = $('quant').value;
  if (v !== 'auto') return v;
  if (url) return 'nf4-dq'; // a model from a URL is a GGUF file
  const list = [...files];
  if (list.some((f) => f.name.toLowerCase().endsWith('.gguf'))) return 'nf4-dq';
  const weights = list.filter((f) => f.name.endsWith('.safetensors')).reduce((a, f) => a + f.size, 0);
  return weights > AUTO_QLORA_BYTES ? 'nf4-dq' : 'f32';
}

async function startTraining() {
  clearError();
  const files = $('model-files').files;
  const modelUrl = $('model-url').value.trim();
  if (!files.length && !modelUrl) throw new Error('Choose a model first: a .gguf file, or config.json + model.safetensors + tokenizer.json (+ tokenizer_config.json).');
  const steps = num('steps');
  const maxLen = num('max-len');
  const maxNewTokens = num('max-new');
  const options = {
    rank: num('rank'), alpha: num('alpha', false), steps, lr: num('lr', false), batchSize: num('batch'), maxLen,
    seed: num('seed'), schedule: 'constant', warmupSteps: 0, maxGradNorm: 1.0, dropout: 0,
    validation: $('held-out-on').checked ? 0.1 : 0,
  };
  let dataset;
  if (document.querySelector('input[name=data]:checked').value === 'file') {
    const f = $('data-file').files[0];
    if (!f) throw new Error('Choose a JSONL file, or the example data set.');
    dataset = { name: f.name, bytes: await f.arrayBuffer() };
  } else {
    const res = await fetch(new URL('../data/pirate.jsonl', import.meta.url));
    if (!res.ok) throw new Error(`could not fetch the example data set (${res.status}); serve the repository root (README: node web/serve.mjs)`);
    dataset = { name: 'pirate.jsonl', bytes: await res.arrayBuffer() };
  }
  let initAdapter = null;
  if ($('init-adapter-on').checked) {
    const fs = [...$('init-adapter').files];
    const c = fs.find((f) => f.name.endsWith('.json'));
    const w = fs.find((f) => f.name.endsWith('.safetensors'));
    if (!c || !w) throw new Error('Starting from an adapter needs adapter_config.json and adapter_model.safetensors.');
    initAdapter = { config: await c.text(), model: await w.arrayBuffer() };
  }
  state.losses = [];
  state.stepMs = [];
  state.memoryPlan = null;
  state.memory = null;
  state.stopped = null;
  state.stopAsked = false;
  state.model = null;
  state.statusLog = [];
  state.answers = { before: '', after: '' };
  state.adapter = null;
  state.lost = null;
  state.heldOut = null;
  state.options = options;
  renderHeldOut();
  $('step-log').textContent = '';
  $('downloads').innerHTML = '<span class="hint">The adapter appears here once a step is done.</span>';
  $('before').textContent = '';
  $('after').textContent = '';
  renderChart();
  renderRunInfo();
  setPhase('reading', 'Reading the model…');
  const modelFiles = files.length ? await readFiles(files) : [];
  if (!modelFiles) {
    state.stopAsked = false;
    setPhase('stopped', 'Stopped while reading the model files: nothing was loaded.');
    return;
  }
  const quant = chooseQuant(files, files.length ? null : modelUrl);
  worker.postMessage({ type: 'load', files: modelFiles, url: files.length ? null : modelUrl, quant, maxPositions: Math.max(maxLen, 256) + maxNewTokens, testHold: state.testHold || null },
    modelFiles.map((f) => f.bytes));
  worker.postMessage({ type: 'train', dataset, options, prompt: $('prompt').value, maxNewTokens, initAdapter, testHold: state.testHold || null });
  setPhase('loading', `Loading the model onto the GPU (${quant === 'f32' ? 'f32 base' : 'NF4 base: QLoRA'})…`);
}

$('train').addEventListener('click', () => {
  startTraining().catch((e) => {
    showError([{ message: e.message }]);
    setPhase(state.gpu ? 'ready' : 'no-webgpu', '');
  });
});
$('stop').addEventListener('click', () => {
  state.stopAsked = true;
  worker.postMessage({ type: 'stop' });
  setPhase(state.phase, $('status').textContent);
});
$('forget-cache').addEventListener('click', () => worker.postMessage({ type: 'forget' }));
window.addEventListener('resize', renderChart);

renderChart();
setPhase('starting', 'Starting…');
worker.postMessage({ type: 'init' });
