// The real model in the demo page: headless Chromium (SwiftShader) fine-tunes
// SmolLM2-135M-Instruct (the 95 MB Q4_1 GGUF at $QLORA_SMOLLM2_GGUF, which scripts/test.sh
// exports; scripts/fetch-smollm2.sh fetches it) with the page's default base weights ("auto":
// QLoRA, NF4 with double quantization, for a GGUF), through the page as a user would: the file
// chosen, a JSONL data file (the first examples of data/pirate.jsonl, so that the held-out set
// is small), a short run. It asserts what the page shows at each phase (every status text the
// page showed, in order, and the status text sampled every 200 ms while it ran), the memory plan
// before training and the memory used after, that the held-out loss falls, that both answers are
// shown, and that the adapter downloaded through the page equals the one `qlora train` (the
// native command line) writes for the same options on the same GGUF: bit for bit on the same
// Vulkan driver (Chromium's SwiftShader, loaded natively through VK_ICD_FILENAMES), within
// Adam's sign-flip noise on lavapipe.
//
// Needs web/pkg (scripts/build-web.sh), Chromium (CHROMIUM, default /usr/bin/chromium; its
// vk_swiftshader_icd.json, found in /usr/lib/chromium or set SWIFTSHADER_ICD) and the GGUF. QLORA_SCREENSHOTS=1 also saves web/screenshot-training.png and web/screenshot-after.png.
// Run: cd web && node --test test/real_model.test.mjs

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { launch, REPO_ROOT, CHROMIUM } from './page.mjs';
import { readSafetensors, compareAdapters } from './safetensors.mjs';

const GGUF = process.env.QLORA_SMOLLM2_GGUF || path.join(os.homedir(), '.cache/qlora-webgpu/SmolLM2-135M-Instruct.Q4_1.gguf');
// A short run for CI: 2 steps of 2 examples of at most 48 tokens; 30 examples, 3 held out.
const EXAMPLES = 30;
const RUN = { rank: 8, alpha: 16, steps: 2, lr: 0.005, batch: 2, maxLen: 48, seed: 1, maxNew: 8 };
// Browser (Chromium's WebGPU on SwiftShader) against `qlora train` with the same options, twice,
// on the development machine (2 cores):
// - natively on the same driver (Chromium's own SwiftShader Vulkan ICD, the vec4 kernels the
//   browser uses, the browser's 128 MiB binding): the check the issue asks for, adapter within
//   1e-4 relative. Achieved: losses, held-out losses and all 420 adapter tensors bit for bit
//   (difference 0). Bounds: losses 1e-6, every tensor's relative L2 1e-5.
// - natively on lavapipe (subgroup kernels), a different Vulkan implementation: losses agree
//   (3.7e-6 with the 128-invocation kernels, 9.4e-7 with the earlier 256-invocation ones: the
//   reductions' order changed; bound 1e-5) but the adapter only to 1.1e-3 relative L2 over all
//   values (1.3e-3 before; bound 5e-3; per tensor median 6.5e-5, bound 5e-4; worst 7.4e-3,
//   layer 25's down_proj lora_A). Adam's first steps move each value by about lr times the sign
//   of its gradient whatever the gradient's size, so the few values whose gradient is rounding
//   noise (sums that cancel; 29 of 2.44 million differ by more than 1e-3, bound 1e-4 of all:
//   244) take opposite steps under the two drivers' rounding. The same lavapipe run with the vec4 kernels (QLORA_NO_SUBGROUPS=1)
//   gives the same figures, so it is the drivers, not the kernels; on one driver the page and
//   the command line agree exactly.
const SAME_DRIVER = { loss: 1e-6, tensor: 1e-5 };
const BOUNDS = { loss: 1e-5, adapterGlobal: 5e-3, adapterMedian: 5e-4, flippedFraction: 1e-4 };

let server;
let browser;
let tmp;

before(async () => {
  assert.ok(fs.existsSync(GGUF), `no SmolLM2-135M-Instruct GGUF at ${GGUF}: fetch it with \`bash scripts/fetch-smollm2.sh\` ` +
    '(prints its path; scripts/test.sh exports it as QLORA_SMOLLM2_GGUF)');
  ({ server, browser } = await launch());
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'qlora-web-real-'));
});

after(async () => {
  await browser?.close();
  server?.server.close();
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
});

const secs = (t0) => `${((Date.now() - t0) / 1000).toFixed(0)} s`;
const relDiff = (a, b) => Math.abs(a - b) / Math.abs(b);
const mib = (b) => `${(b / 1048576).toFixed(1)} MiB`;

/** `qlora train` on the same GGUF with the page's options (extra environment: `env`); resolves to its metrics log. */
async function nativeRun(dataFile, outDir, env = {}) {
  const args = ['run', '-q', '-j1', '--bin', 'qlora', '--', 'train', GGUF, '--data', dataFile, '--val-fraction', '0.1',
    '--eval-every', String(RUN.steps), '--qlora', '-r', String(RUN.rank), '--lora-alpha', String(RUN.alpha),
    '--lora-dropout', '0', '--lr', String(RUN.lr), '--lr-scheduler', 'constant', '--warmup-steps', '0', '--max-grad-norm', '1',
    '--steps', String(RUN.steps), '--batch-size', String(RUN.batch), '--max-len', String(RUN.maxLen), '--seed', String(RUN.seed),
    '--out', outDir];
  await promisify(execFile)('cargo', args, { cwd: REPO_ROOT, maxBuffer: 1 << 24, timeout: 15 * 60e3, env: { ...process.env, ...env } });
  const lines = fs.readFileSync(path.join(outDir, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
  const losses = lines.filter((l) => l.loss !== undefined).map((l) => l.loss);
  const val = lines.filter((l) => l.val_loss !== undefined).map((l) => l.val_loss);
  return { losses, heldOut: { before: val[0], after: val[val.length - 1] }, stepS: lines.filter((l) => l.step_s).map((l) => l.step_s) };
}

/** Chromium's own SwiftShader Vulkan driver (the one its WebGPU ran on here), for a native run on the same driver. */
function swiftshaderIcd() {
  const dirs = [process.env.SWIFTSHADER_ICD && path.dirname(process.env.SWIFTSHADER_ICD), path.dirname(fs.realpathSync(CHROMIUM)), '/usr/lib/chromium'];
  const icd = process.env.SWIFTSHADER_ICD || dirs.filter(Boolean).map((d) => path.join(d, 'vk_swiftshader_icd.json')).find((f) => fs.existsSync(f));
  assert.ok(icd && fs.existsSync(icd), `no vk_swiftshader_icd.json next to Chromium (${dirs.join(', ')}): set SWIFTSHADER_ICD to Chromium's SwiftShader ICD file`);
  return icd;
}

/** Browser adapter against a native one: worst loss difference and the adapter's relative L2 (all values, per tensor). */
function compareRuns(s, nat, webDir, natDir) {
  const lossErr = Math.max(...s.losses.map((l, i) => relDiff(l, nat.losses[i])), relDiff(s.heldOut.before, nat.heldOut.before), relDiff(s.heldOut.after, nat.heldOut.after));
  const cfgOf = (dir) => {
    const c = JSON.parse(fs.readFileSync(path.join(dir, 'adapter_config.json'), 'utf8'));
    delete c.base_model_name_or_path; // the page names the file, the command line its path
    return c;
  };
  assert.deepEqual(cfgOf(webDir), cfgOf(natDir), 'the same adapter_config.json (but the base model\'s name)');
  const web = readSafetensors(fs.readFileSync(path.join(webDir, 'adapter_model.safetensors')));
  const native = readSafetensors(fs.readFileSync(path.join(natDir, 'adapter_model.safetensors')));
  const cmp = compareAdapters(web, native, Infinity); // same keys and shapes (it throws otherwise), per-tensor figures
  let [num, den, flipped, values] = [0, 0, 0, 0];
  const perTensor = [];
  for (const [k, ref] of native) {
    const got = web.get(k).data;
    let [n, d] = [0, 0];
    for (let i = 0; i < ref.data.length; i++) {
      const diff = got[i] - ref.data[i];
      n += diff * diff;
      d += ref.data[i] * ref.data[i];
      if (Math.abs(diff) > 1e-3) flipped++;
    }
    values += ref.data.length;
    num += n;
    den += d;
    perTensor.push(Math.sqrt(n / d));
  }
  perTensor.sort((a, b) => a - b);
  return { lossErr, keys: cmp.keys, globalL2: Math.sqrt(num / den), median: perTensor[perTensor.length >> 1], worst: cmp.worstL2, worstKey: cmp.worstL2Key, flipped, values };
}

const describe = (c) => `worst loss relative difference ${c.lossErr.toExponential(2)}; adapter: ${c.keys} tensors, relative L2 of all ${c.globalL2.toExponential(2)}, ` +
  `per tensor median ${c.median.toExponential(2)}, worst ${c.worst.toExponential(2)} (${c.worstKey}); values differing by over 1e-3: ${c.flipped} of ${c.values}`;

test('the demo fine-tunes SmolLM2-135M-Instruct with QLoRA in Chromium, shows each phase, and exports the adapter `qlora train` writes',
  { timeout: 30 * 60e3 }, async () => {
    const t0 = Date.now();
    const lines = [];
    const page = await browser.newPage({ viewport: { width: 1280, height: 1000 }, acceptDownloads: true });
    page.on('console', (m) => lines.push(`[${m.type()}] ${m.text()}`));
    page.on('pageerror', (e) => lines.push(`[pageerror] ${e.message}`));
    page.on('worker', (w) => w.on('console', (m) => lines.push(`[worker ${m.type()}] ${m.text()}`)));
    await page.goto(`${server.url}/web/`);
    const wait = async (phases, timeout) => {
      try {
        await page.waitForFunction((ps) => window.demo && (ps.includes(window.demo.phase) || window.demo.error), phases, { timeout, polling: 200 });
      } catch (e) {
        throw new Error(`page did not reach ${phases} in ${timeout / 1000} s (status: ${await page.textContent('#status')}); log:\n${lines.join('\n')}`);
      }
      const err = await page.evaluate(() => window.demo.error);
      if (err) throw new Error(`the page shows an error:\n${err.map((c) => c.message).join('\n  caused by: ')}\nlog:\n${lines.join('\n')}`);
    };
    await wait(['ready'], 120e3);
    assert.equal(await page.inputValue('#quant'), 'auto', 'the default base weights: auto (QLoRA for a GGUF)');

    const data = path.join(tmp, 'pirate-30.jsonl');
    fs.writeFileSync(data, fs.readFileSync(path.join(REPO_ROOT, 'data/pirate.jsonl'), 'utf8').trim().split('\n').slice(0, EXAMPLES).join('\n') + '\n');
    await page.setInputFiles('#model-files', GGUF);
    await page.check('input[name=data][value=file]');
    await page.setInputFiles('#data-file', data);
    const form = { '#rank': RUN.rank, '#alpha': RUN.alpha, '#steps': RUN.steps, '#lr': RUN.lr, '#batch': RUN.batch, '#max-len': RUN.maxLen, '#seed': RUN.seed, '#max-new': RUN.maxNew };
    for (const [sel, v] of Object.entries(form)) await page.fill(sel, String(v));
    await page.fill('#prompt', 'What is the capital of France?');

    // The status text as a user sees it, sampled while the run goes on.
    const samples = [];
    let sampling = true;
    let shotTraining = false;
    const sampler = (async () => {
      while (sampling) {
        const s = await page.evaluate(() => ({ text: document.getElementById('status').textContent, phase: window.demo.phase,
          stop: !document.getElementById('stop').disabled, steps: window.demo.losses.length })).catch(() => null);
        if (s && samples[samples.length - 1]?.text !== s.text) samples.push(s);
        if (s && process.env.QLORA_SCREENSHOTS && !shotTraining && s.phase === 'training' && s.steps >= 1) {
          shotTraining = true;
          await page.screenshot({ path: path.join(REPO_ROOT, 'web/screenshot-training.png'), fullPage: true });
        }
        await new Promise((r) => setTimeout(r, 200));
      }
    })();
    const tRun = Date.now();
    await page.click('#train');
    await wait(['done', 'stopped'], 25 * 60e3);
    sampling = false;
    await sampler;
    const browserS = (Date.now() - tRun) / 1000;
    if (process.env.QLORA_SCREENSHOTS) await page.screenshot({ path: path.join(REPO_ROOT, 'web/screenshot-after.png'), fullPage: true });
    const s = await page.evaluate(() => ({
      phase: window.demo.phase, losses: window.demo.losses.map((p) => p.loss), stepMs: window.demo.stepMs, model: window.demo.model,
      answers: window.demo.answers, heldOut: window.demo.heldOut, stats: window.demo.stats, memoryPlan: window.demo.memoryPlan,
      memory: window.demo.memory, statusLog: window.demo.statusLog, runInfo: document.getElementById('run-info').textContent,
      stopDisabled: document.getElementById('stop').disabled,
    }));
    console.log(`# status texts shown, in order:\n${s.statusLog.map((t) => `#   ${t}`).join('\n')}`);
    console.log(`# status texts sampled every 200 ms: ${samples.length}; run info:\n${s.runInfo.split('\n').map((t) => `#   ${t}`).join('\n')}`);
    assert.equal(s.phase, 'done');
    assert.ok(s.stopDisabled, 'Stop is disabled once nothing runs');
    assert.equal(s.model.quant, 'nf4-dq', 'a GGUF loads as QLoRA (NF4 + double quant) by default');
    assert.equal(s.stats.validationExamples, 3, '10% of the 30 examples held out');

    // Each phase, in order, said what ran.
    const order = [
      /^Reading the model: [\d.]+ MiB of [\d.]+ MiB…$/,
      /^Loading the model onto the GPU \(NF4 base: QLoRA\)…$/,
      /^Model loaded in \d/,
      /^Base model answering… \(\d+ of at most 8 tokens\)$/,
      /^Held-out loss before training: \d of 3 examples…$/,
      /^Step 1 of 2 running/,
      /^Step 1 of 2 done: loss [\d.]+ \([\d.]+ s\); step 2 running, about .+ left$/,
      /^Step 2 of 2 done: loss [\d.]+/,
      /^Held-out loss after training: \d of 3 examples…$/,
      /^Trained model answering… \(\d+ of at most 8 tokens\)$/,
      /^Writing the adapter files…$/,
      /^Done: 2 steps, loss [\d.]+ → [\d.]+, [\d.]+ s a step\. A short run: 200 steps would take about .+ here\.$/,
    ];
    let at = 0;
    for (const re of order) {
      const i = s.statusLog.findIndex((t, k) => k >= at && re.test(t));
      assert.ok(i >= 0, `the page showed ${re} after "${s.statusLog[at - 1]}"`);
      at = i + 1;
    }
    assert.ok(!s.statusLog.some((t) => /^Training on /.test(t)), 'no "Training on …" while the base model answers');
    // What a user saw: the sampled texts include the long phases, with Stop enabled while they ran.
    for (const re of [/^Base model answering/, /^Held-out loss before training/, /^Step \d of 2/, /^Held-out loss after training/]) {
      const hit = samples.find((x) => re.test(x.text));
      assert.ok(hit, `the status showed ${re} for at least one 200 ms sample`);
      assert.ok(hit.stop, `Stop is enabled while "${hit.text}" runs`);
    }

    // Memory: the plan shown before training, what was used after.
    const m = s.model;
    const weights = m.layers * (2 * m.hidden * m.heads * m.headDim + 2 * m.hidden * m.kvHeads * m.headDim + 3 * m.hidden * m.intermediate);
    const bits = (8 * m.deviceBytes.projections) / weights;
    console.log(`# model: ${m.layers} layers, projections ${mib(m.deviceBytes.projections)} on the GPU (${bits.toFixed(2)} bits a weight), rest ${mib(m.deviceBytes.other)}`);
    assert.ok(bits > 4 && bits < 5, `NF4 projections: 4 bits a weight plus the block constants (${bits})`);
    const p = s.memoryPlan;
    console.log(`# memory: planned ${mib(p.total)} (base ${mib(p.weights)}, LoRA ${mib(p.lora)}, activations ${mib(p.activations)}, ` +
      `transient ${mib(p.transient)}); used: peak ${mib(s.memory.peakInUse)} in tensors, ${mib(s.memory.allocated)} held by the pool`);
    assert.match(s.runInfo, /GPU memory this run needs: about [\d.]+ MiB/);
    assert.match(s.runInfo, /GPU memory used: at most [\d.]+ MiB in tensors at once/);
    assert.match(s.runInfo, /Time here: [\d.]+ s a step, so 2 steps ≈ .+; a longer run of 200 steps ≈ /);
    const ratio = s.memory.peakInUse / p.total;
    console.log(`# memory: peak used / planned = ${ratio.toFixed(2)}`);
    assert.ok(ratio > 0.3 && ratio < 1.5, `the plan is within the range of what the run used (peak/plan ${ratio})`);

    // Training did something: the held-out loss falls; both answers shown.
    console.log(`# browser: losses ${s.losses.map((l) => l.toFixed(5)).join(' ')}; held-out ${s.heldOut.before.toFixed(5)} -> ${s.heldOut.after.toFixed(5)}; ` +
      `step ms ${s.stepMs.map((x) => x.toFixed(0)).join(' ')}; whole page run ${browserS.toFixed(0)} s`);
    console.log(`# answers: before ${JSON.stringify(s.answers.before)}; after ${JSON.stringify(s.answers.after)}`);
    assert.ok(s.heldOut.after < s.heldOut.before - 0.05, 'the held-out loss falls');
    assert.ok(s.answers.before.trim().length > 0 && s.answers.after.trim().length > 0, 'both answers are shown');
    assert.match(await page.textContent('#held-out'), /Held-out loss \(3 examples\): [\d.]+ before training → [\d.]+ after/);

    // The adapter, through the page's links.
    const webDir = path.join(tmp, 'browser');
    fs.mkdirSync(webDir);
    for (const [id, name] of [['#download-config', 'adapter_config.json'], ['#download-model', 'adapter_model.safetensors']]) {
      const [dl] = await Promise.all([page.waitForEvent('download'), page.click(id)]);
      assert.equal(dl.suggestedFilename(), name);
      await dl.saveAs(path.join(webDir, name));
    }
    await page.close();
    console.log(`# browser part: ${secs(t0)}`);

    // `qlora train` with the same options on the same GGUF, on Chromium's SwiftShader (the driver the page ran on; vec4
    // kernels as in the browser, the browser's 128 MiB binding) and on lavapipe (subgroup kernels).
    const runs = {};
    for (const [name, env] of [['swiftshader', { VK_ICD_FILENAMES: swiftshaderIcd(), QLORA_NO_SUBGROUPS: '1', QLORA_MAX_BINDING: '128M' }], ['lavapipe', {}]]) {
      const t1 = Date.now();
      const dir = path.join(tmp, `native-${name}`);
      const nat = await nativeRun(data, dir, env);
      console.log(`# native qlora train (${name}): ${secs(t1)}; losses ${nat.losses.map((l) => l.toFixed(5)).join(' ')}; held-out ${nat.heldOut.before.toFixed(5)} -> ` +
        `${nat.heldOut.after.toFixed(5)}; step s ${nat.stepS.map((x) => x.toFixed(1)).join(' ')}`);
      assert.equal(nat.losses.length, RUN.steps);
      runs[name] = compareRuns(s, nat, webDir, dir);
      console.log(`# browser vs native (${name}): ${describe(runs[name])}`);
    }
    const same = runs.swiftshader;
    assert.equal(same.keys, 30 * 7 * 2, 'A and B of the 7 projections of the 30 layers');
    assert.ok(same.lossErr <= SAME_DRIVER.loss, `on the same driver, step and held-out losses within ${SAME_DRIVER.loss} relative of the native run`);
    assert.ok(same.worst <= SAME_DRIVER.tensor, `on the same driver, every adapter tensor within ${SAME_DRIVER.tensor} relative of the native run's`);
    const other = runs.lavapipe;
    assert.ok(other.lossErr <= BOUNDS.loss, `on lavapipe, step and held-out losses within ${BOUNDS.loss} relative`);
    assert.ok(other.globalL2 <= BOUNDS.adapterGlobal, `on lavapipe, the adapter within ${BOUNDS.adapterGlobal} relative (L2 over all values)`);
    assert.ok(other.median <= BOUNDS.adapterMedian, `on lavapipe, the median tensor within ${BOUNDS.adapterMedian} relative`);
    assert.ok(other.flipped <= BOUNDS.flippedFraction * other.values, 'on lavapipe, few values differ by more than 1e-3');
    console.log(`# whole test: ${secs(t0)}`);
  });
