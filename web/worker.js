// The demo's Web Worker: owns the GPU, the model and the training run, so the page stays
// responsive. Messages in: {type: 'init'}, {type: 'load', files, quant, maxPositions},
// {type: 'train', dataset, options, prompt, maxNewTokens, initAdapter}, {type: 'stop'}.
// Messages out: 'gpu', 'model', 'stats', 'step', 'answer', 'adapter', 'done', 'error' (with the
// error's cause chain as plain data, since an Error's `cause` may not survive postMessage).

import init, { Gpu, Model, Dataset, Training, Adapter, version } from './pkg/qlora_webgpu.js';

let gpu = null;
let model = null;
let modelKey = null;
let stopRequested = false;
/** The training run in flight (for the adapter kept on the host when the GPU is lost). */
let running = null;

/** An Error and its `cause`s as [{message, kind}] (outermost first). */
function chain(e) {
  const out = [];
  for (let c = e, i = 0; c != null && i < 16; c = c.cause, i++) {
    out.push({ message: c && c.message !== undefined ? String(c.message) : String(c), kind: c && c.kind });
  }
  return out;
}

function fail(stage, e) {
  postMessage({ type: 'error', stage, chain: chain(e) });
}

async function answer(which, prompt, maxNewTokens, gen) {
  let text = '';
  const r = await gen(prompt, { maxNewTokens }, (piece) => {
    text += piece;
    postMessage({ type: 'answer', which, text, final: false });
  });
  postMessage({ type: 'answer', which, text: r.text, final: true, ms: r.ms, tokens: r.tokens.length });
}

async function handle(msg) {
  switch (msg.type) {
    case 'init': {
      await init();
      try {
        gpu = await Gpu.open();
        postMessage({ type: 'gpu', info: gpu.info, version: version() });
      } catch (e) {
        postMessage({ type: 'gpu', error: chain(e) });
      }
      return;
    }
    case 'load': {
      const key = JSON.stringify([msg.url || msg.files.map((f) => [f.name, f.bytes.byteLength]), msg.quant, msg.maxPositions]);
      if (model && key === modelKey) {
        postMessage({ type: 'model', info: model.info, cached: true });
        return;
      }
      if (model) { model.free(); model = null; }
      const opts = { quant: msg.quant, maxPositions: msg.maxPositions };
      const gguf = msg.files.find((f) => f.name.toLowerCase().endsWith('.gguf'));
      if (msg.url) {
        model = await Model.fromUrl(gpu, msg.url, { ...opts, onProgress: (p) => postMessage({ type: 'load-progress', progress: p }) });
      } else if (gguf) {
        model = Model.fromGguf(gpu, gguf.name, new Uint8Array(gguf.bytes), opts);
      } else {
        const files = {};
        for (const f of msg.files) files[f.name] = new Uint8Array(f.bytes);
        const cfg = msg.files.find((f) => f.name.endsWith('config.json') && f.name !== 'tokenizer_config.json');
        model = Model.fromHuggingFace(gpu, files, { ...opts, name: msg.name || (cfg ? 'model' : 'model') });
      }
      modelKey = key;
      postMessage({ type: 'model', info: model.info });
      return;
    }
    case 'train': {
      stopRequested = false;
      const data = Dataset.fromJsonl(msg.dataset.name, new Uint8Array(msg.dataset.bytes));
      let init = null;
      if (msg.initAdapter) init = Adapter.load(model, msg.initAdapter.config, new Uint8Array(msg.initAdapter.model));
      // The run first: bad options, or a batch beyond the GPU's limits, fail before any GPU work.
      const training = init ? Training.fromAdapter(model, data, init, msg.options) : new Training(model, data, msg.options);
      running = training;
      postMessage({ type: 'stats', stats: training.dataStats, format: data.format, options: training.options });
      await answer('before', msg.prompt, msg.maxNewTokens, init ? (...a) => init.generate(...a) : (...a) => model.generate(...a));
      const heldOut = { before: await training.validationLoss(), after: null };
      postMessage({ type: 'validation', heldOut });
      const t0 = performance.now();
      await training.train(undefined, (r) => {
        postMessage({ type: 'step', report: r });
        return !stopRequested;
      });
      const trainMs = performance.now() - t0;
      heldOut.after = await training.validationLoss();
      postMessage({ type: 'validation', heldOut });
      await answer('after', msg.prompt, msg.maxNewTokens, (...a) => training.generate(...a));
      const files = await training.exportAdapter();
      postMessage({ type: 'adapter', config: files.adapterConfig, model: files.adapterModel }, [files.adapterModel.buffer]);
      postMessage({ type: 'done', steps: training.stepCount, trainMs });
      training.free();
      data.free();
      if (init) init.free();
      return;
    }
    case 'forget': {
      const n = await Model.forgetCached();
      postMessage({ type: 'forgotten', count: n, left: await Model.cachedModels() });
      return;
    }
    default:
      throw new Error(`worker: unknown message ${msg.type}`);
  }
}

function isDeviceLost(e) {
  return chain(e).some((c) => c.kind === 'device-lost');
}

/**
 * The GPU device is gone: offers the adapter of the last completed step (kept on the host by the
 * package), reports the loss, and opens the GPU again so that Train starts over without a reload.
 */
async function afterDeviceLoss(stage, e) {
  const kept = running ? running.keptAdapter() : null;
  if (kept) postMessage({ type: 'adapter', config: kept.adapterConfig, model: kept.adapterModel, keptStep: kept.step }, [kept.adapterModel.buffer]);
  postMessage({ type: 'error', stage, chain: chain(e), lost: { keptStep: kept ? kept.step : null } });
  running = null;
  model = null;
  modelKey = null;
  gpu = null;
  try {
    gpu = await Gpu.open();
    postMessage({ type: 'gpu', info: gpu.info, version: version(), reopened: true });
  } catch (e2) {
    postMessage({ type: 'gpu', error: chain(e2) });
  }
}

// Messages are handled one at a time (a load waits for the previous train to finish), except
// 'stop', which must reach a running training loop: it sets the flag the progress callback reads.
let queue = Promise.resolve();
onmessage = (ev) => {
  const msg = ev.data;
  if (msg.type === 'stop') {
    stopRequested = true;
    return;
  }
  queue = queue.then(() => handle(msg)).catch((e) => (isDeviceLost(e) ? afterDeviceLoss(msg.type, e) : fail(msg.type, e)));
};
