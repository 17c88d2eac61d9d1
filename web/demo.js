// The demo page's main thread: the form, the loss chart, the answers and the downloads. The
// model and the training run live in worker.js. `window.demo` exposes the page's state (the
// browser test reads it): gpu, model, options, losses, stepMs, answers, adapter, error.

import { drawLossChart } from './chart.js';

const $ = (id) => document.getElementById(id);
const state = (window.demo = {
  phase: 'starting', gpu: null, model: null, options: null, stats: null,
  losses: [], stepMs: [], heldOut: null, answers: { before: '', after: '' }, adapter: null, error: null, trainMs: null,
});

const worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
let urls = [];

function setPhase(phase, text) {
  state.phase = phase;
  $('status').textContent = text;
  $('train').disabled = phase === 'training' || phase === 'loading' || !state.gpu;
  $('stop').disabled = phase !== 'training';
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
    case 'load-progress':
      (state.loadEvents ||= []).push(m.progress);
      showLoadProgress(m.progress);
      break;
    case 'forgotten':
      $('cache-status').textContent = `Forgot ${m.count} cached model file${m.count === 1 ? '' : 's'}.`;
      state.forgotten = m;
      break;
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
    case 'model': {
      state.model = m.info;
      const i = m.info;
      $('status').textContent = `Model ${i.name}: ${i.architecture}, ${i.layers} layers, hidden ${i.hidden}, vocabulary ${i.vocab}, ` +
        `${i.quant} base (${fmtBytes(i.deviceBytes.projections + i.deviceBytes.other)} on the GPU).`;
      break;
    }
    case 'stats':
      state.stats = m.stats;
      state.options = m.options;
      setPhase('training', `Training on ${m.stats.trainExamples} examples (${m.format}), ${m.stats.countedTokens} counted tokens…`);
      renderChart();
      break;
    case 'step': {
      const r = m.report;
      state.losses.push({ step: r.step, loss: r.loss });
      state.stepMs.push(r.ms);
      $('step-log').insertAdjacentText('afterbegin', `step ${r.step}/${r.totalSteps}  loss ${r.loss.toFixed(4)}  lr ${r.lr.toExponential(2)}  ${r.ms.toFixed(0)} ms\n`);
      $('status').textContent = `Step ${r.step} of ${r.totalSteps}: loss ${r.loss.toFixed(4)} (${r.ms.toFixed(0)} ms a step)`;
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
      if (m.which === 'before' && m.final) $('status').textContent = 'Base model answered; training…';
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
      const ms = state.stepMs.slice(1);
      const mean = ms.length ? ms.reduce((a, b) => a + b, 0) / ms.length : state.stepMs[0] || 0;
      const first = state.losses[0]?.loss;
      const last = state.losses[state.losses.length - 1]?.loss;
      setPhase('done', `Done: ${m.steps} steps, loss ${first?.toFixed(3)} → ${last?.toFixed(3)}, ${mean.toFixed(0)} ms a step.`);
      break;
    }
    case 'error':
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

async function readFiles(list) {
  return Promise.all([...list].map(async (f) => ({ name: f.name, bytes: await f.arrayBuffer() })));
}

async function startTraining() {
  clearError();
  const files = $('model-files').files;
  const modelUrl = $('model-url').value.trim();
  if (!files.length && !modelUrl) throw new Error('Choose a model first: a .gguf file, or config.json + model.safetensors + tokenizer.json (+ tokenizer_config.json).');
  const steps = num('steps');
  const maxLen = num('max-len');
  const maxNewTokens = 40;
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
  state.answers = { before: '', after: '' };
  state.adapter = null;
  state.lost = null;
  state.heldOut = null;
  state.options = options;
  renderHeldOut();
  $('step-log').textContent = '';
  $('before').textContent = '';
  $('after').textContent = '';
  renderChart();
  setPhase('loading', 'Loading the model…');
  const modelFiles = files.length ? await readFiles(files) : [];
  worker.postMessage({ type: 'load', files: modelFiles, url: files.length ? null : modelUrl, quant: $('quant').value, maxPositions: Math.max(maxLen, 256) + maxNewTokens },
    modelFiles.map((f) => f.bytes));
  worker.postMessage({ type: 'train', dataset, options, prompt: $('prompt').value, maxNewTokens, initAdapter });
  state.phase = 'training';
  $('status').textContent = 'Loading the model and asking the base model…';
}

$('train').addEventListener('click', () => {
  startTraining().catch((e) => {
    showError([{ message: e.message }]);
    setPhase(state.gpu ? 'ready' : 'no-webgpu', '');
  });
});
$('stop').addEventListener('click', () => worker.postMessage({ type: 'stop' }));
$('forget-cache').addEventListener('click', () => worker.postMessage({ type: 'forget' }));
window.addEventListener('resize', renderChart);

renderChart();
setPhase('starting', 'Starting…');
worker.postMessage({ type: 'init' });
