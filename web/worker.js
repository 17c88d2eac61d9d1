// The demo's Web Worker: owns the GPU, the model and the training run, so the page stays
// responsive. Messages in: {type: 'init'}, {type: 'load', files, quant, maxPositions},
// {type: 'train', dataset, options, prompt, maxNewTokens, initAdapter}, {type: 'stop'}.
// Messages out: 'gpu', 'model', 'phase' (what runs now), 'stats' (with the memory plan),
// 'answer' (streamed), 'eval-progress', 'validation', 'step', 'adapter', 'done' (with what a Stop
// kept, and the GPU memory used), 'error' (with the error's cause chain as plain data, since an
// Error's `cause` may not survive postMessage). Stop ends the phase that runs: an answer after
// the current token, a held-out evaluation at once (abandoned), training after the current step,
// a download from a URL at once (abandoned: nothing loaded or cached), a load from files when it
// is done (it stays loaded); the adapter of the steps done is exported, and a Stop while it is
// written lets the writing finish (the adapter is offered) and says so.
// `testHold` (tests only, sent with 'load' and 'train'): 'loading' or 'export' holds that phase
// open until a Stop arrives (at most a minute), so that a test can press Stop in it whatever the
// machine's speed (a load from files then goes on: it is one synchronous call).

import init, { Gpu, Model, Dataset, Training, Adapter, version } from './pkg/qlora_webgpu.js';

let gpu = null;
let model = null;
let modelKey = null;
let stopRequested = false;
/** The URL download in flight (Stop aborts it). */
let loadAbort = null;
/** A Stop abandoned the load: the 'train' message queued behind it does nothing. */
let loadAbandoned = false;
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

/** Streams an answer to the page; Stop ends it after the current token (the text so far kept). */
async function answer(which, prompt, maxNewTokens, gen) {
  let text = '';
  let tokens = 0;
  const r = await gen(prompt, { maxNewTokens }, (piece) => {
    text += piece;
    tokens++;
    postMessage({ type: 'answer', which, text, final: false, pieces: tokens, maxNewTokens });
    return !stopRequested;
  });
  postMessage({ type: 'answer', which, text: r.text, final: true, ms: r.ms, tokens: r.tokens.length, stopped: r.stopReason === 'stopped' });
  return r;
}

function phase(name, text) {
  postMessage({ type: 'phase', phase: name, text });
}

/** Lets the messages sent meanwhile (a Stop) arrive: a load runs synchronously. */
const tick = () => new Promise((r) => setTimeout(r, 0));

/** Tests only: holds the phase `name` open until Stop is pressed (at most a minute). */
async function testHold(hold, name) {
  if (hold !== name) return;
  for (const t0 = Date.now(); !stopRequested && Date.now() - t0 < 60e3;) await new Promise((r) => setTimeout(r, 20));
}

async function heldOutLoss(training, which) {
  return training.validationLoss((done, total) => {
    postMessage({ type: 'eval-progress', which, done, total });
    return !stopRequested;
  });
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
      stopRequested = false;
      loadAbandoned = false;
      await testHold(msg.testHold, 'loading');
      const key = JSON.stringify([msg.url || msg.files.map((f) => [f.name, f.bytes.byteLength]), msg.quant, msg.maxPositions]);
      if (model && key === modelKey) {
        postMessage({ type: 'model', info: model.info, cached: true });
        return;
      }
      if (model) { model.free(); model = null; }
      phase('loading', `Loading the model onto the GPU (${msg.quant === 'f32' ? 'f32 base' : 'quantizing the projections to NF4'})…`);
      const opts = { quant: msg.quant, maxPositions: msg.maxPositions };
      const gguf = msg.files.find((f) => f.name.toLowerCase().endsWith('.gguf'));
      const t0 = performance.now();
      if (msg.url) {
        loadAbort = new AbortController();
        try {
          model = await Model.fromUrl(gpu, msg.url, { ...opts, signal: loadAbort.signal, onProgress: (p) => postMessage({ type: 'load-progress', progress: p }) });
        } catch (e) {
          if (!chain(e).some((c) => c.kind === 'aborted')) throw e;
          loadAbandoned = true;
          modelKey = null;
          postMessage({ type: 'done', steps: 0, stopped: 'Stopped while downloading the model: the download was abandoned (nothing was loaded or cached). Train loads it again.' });
          return;
        } finally {
          loadAbort = null;
        }
      } else if (gguf) {
        model = Model.fromGguf(gpu, gguf.name, new Uint8Array(gguf.bytes), opts);
      } else {
        const files = {};
        for (const f of msg.files) files[f.name] = new Uint8Array(f.bytes);
        model = Model.fromHuggingFace(gpu, files, { ...opts, name: 'model' });
      }
      modelKey = key;
      postMessage({ type: 'model', info: model.info, ms: performance.now() - t0 });
      return;
    }
    case 'train': {
      if (loadAbandoned) {
        loadAbandoned = false;
        return;
      }
      // A Stop sent while the model loaded (synchronously) arrives here.
      await tick();
      if (stopRequested) {
        postMessage({ type: 'done', steps: 0, stopped: 'Stopped after loading the model (it stays loaded): nothing was answered or trained.' });
        return;
      }
      const data = Dataset.fromJsonl(msg.dataset.name, new Uint8Array(msg.dataset.bytes));
      let init = null;
      if (msg.initAdapter) init = Adapter.load(model, msg.initAdapter.config, new Uint8Array(msg.initAdapter.model));
      // The run first: bad options, or a batch beyond the GPU's limits, fail before any GPU work.
      const training = init ? Training.fromAdapter(model, data, init, msg.options) : new Training(model, data, msg.options);
      running = training;
      const free = () => { running = null; training.free(); data.free(); if (init) init.free(); };
      postMessage({ type: 'stats', stats: training.dataStats, format: data.format, options: training.options, memoryPlan: training.memoryPlan });
      const end = async (stopped) => {
        let adapter = false;
        if (training.stepCount > 0) {
          const stoppedBefore = stopRequested;
          phase('export', 'Writing the adapter files…');
          await testHold(msg.testHold, 'export');
          const files = await training.exportAdapter();
          postMessage({ type: 'adapter', config: files.adapterConfig, model: files.adapterModel }, [files.adapterModel.buffer]);
          adapter = true;
          // A Stop while the files were written: they are finished (a few host-side copies; the
          // trained adapter is what the run is for), and the page says so.
          if (stopRequested && !stoppedBefore) {
            stopped = `Stopped while writing the adapter files: the writing was finished, so the adapter after step ${training.stepCount} ` +
              `of ${training.totalSteps} is offered below (the run itself was complete).`;
          }
        }
        postMessage({ type: 'done', steps: training.stepCount, totalSteps: training.totalSteps, trainMs, stopped, adapter, memory: training.gpuMemory });
        free();
      };
      let trainMs = null;
      phase('answer-before', 'Base model answering…');
      await answer('before', msg.prompt, msg.maxNewTokens, init ? (...a) => init.generate(...a) : (...a) => model.generate(...a));
      if (stopRequested) return end('Stopped while the base model answered: its answer so far is shown; nothing was trained.');
      const heldOut = { before: null, after: null };
      if (training.dataStats.validationExamples > 0) {
        phase('eval-before', 'Held-out loss before training…');
        heldOut.before = await heldOutLoss(training, 'before');
        if (stopRequested) return end('Stopped while measuring the held-out loss before training (abandoned); nothing was trained.');
        postMessage({ type: 'validation', heldOut });
      }
      phase('training', `Step 1 of ${training.totalSteps} running (the first step also prepares the GPU kernels)…`);
      const t0 = performance.now();
      await training.train(undefined, (r) => {
        postMessage({ type: 'step', report: r });
        return !stopRequested;
      });
      trainMs = performance.now() - t0;
      if (stopRequested) {
        return end(`Stopped after step ${training.stepCount} of ${training.totalSteps} (the step running then was finished): ` +
          'the adapter of the steps done is offered below; the held-out loss and the answer after training were skipped.');
      }
      if (heldOut.before != null) {
        phase('eval-after', 'Held-out loss after training…');
        const after = await heldOutLoss(training, 'after');
        if (stopRequested) return end('Stopped while measuring the held-out loss after training (abandoned): the trained adapter is offered below; the answer after training was skipped.');
        heldOut.after = after;
        postMessage({ type: 'validation', heldOut });
      }
      phase('answer-after', 'Trained model answering…');
      await answer('after', msg.prompt, msg.maxNewTokens, (...a) => training.generate(...a));
      return end(stopRequested ? 'Stopped while the trained model answered: its answer so far is shown, the trained adapter is offered below.' : null);
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
    if (loadAbort) loadAbort.abort();
    return;
  }
  queue = queue.then(() => handle(msg)).catch((e) => (isDeviceLost(e) ? afterDeviceLoss(msg.type, e) : fail(msg.type, e)));
};
