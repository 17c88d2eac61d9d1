// Browser test: headless Chromium (Debian's, driven by playwright-core) with WebGPU on
// SwiftShader opens the demo page from a local static server, chooses the tiny test model
// (tests/fixtures/tiny-llama/model, a Hugging Face folder) and the example data set, trains a
// few steps, checks that the loss falls, downloads the adapter through the page's links and
// compares it with the adapter the native path (examples/web_native.rs, lavapipe) trains from
// the same options: the same adapter_config.json, the same keys and shapes, values within 1e-4
// relative (per tensor ||browser - native|| / ||native||, the project's relative error), and the
// same losses within 1e-4 relative. A second test checks what a page without WebGPU shows.
//
// Needs web/pkg (scripts/build-web.sh) and Chromium (CHROMIUM, default /usr/bin/chromium).
// QLORA_SCREENSHOT=path saves a screenshot of the page after training; QLORA_WEB_STEPS sets the
// number of steps (default 6). Run: cd web && node --test test/browser.test.mjs

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { chromium } from 'playwright-core';
import { startServer, REPO_ROOT } from '../serve.mjs';
import { readSafetensors, compareAdapters } from './safetensors.mjs';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
// DESIGN.md: Chromium headless with WebGPU on a machine without a GPU.
const WEBGPU_FLAGS = [
  '--headless=new', '--no-sandbox', '--enable-unsafe-webgpu', '--enable-features=Vulkan',
  '--use-vulkan=swiftshader', '--use-webgpu-adapter=swiftshader', '--disable-gpu-sandbox',
];
const MODEL_DIR = path.join(REPO_ROOT, 'tests/fixtures/tiny-llama/model');
const MODEL_FILES = ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja'];
const STEPS = Number(process.env.QLORA_WEB_STEPS || 6);
const RTOL = 1e-4;

let server;
let browser;
let tmp;
/** What the first test leaves for the third: the downloaded adapter and the page's answers. */
let trained = null;

before(async () => {
  assert.ok(fs.existsSync(path.join(REPO_ROOT, 'web/pkg/qlora_webgpu.js')), 'web/pkg is missing: run scripts/build-web.sh first');
  assert.ok(fs.existsSync(CHROMIUM), `no Chromium at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM)`);
  server = await startServer();
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: WEBGPU_FLAGS });
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'qlora-web-'));
});

after(async () => {
  await browser?.close();
  server?.server.close();
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
});

function pageLog(page, lines) {
  page.on('console', (m) => lines.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => lines.push(`[pageerror] ${e.message}`));
  page.on('worker', (w) => w.on('console', (m) => lines.push(`[worker ${m.type()}] ${m.text()}`)));
}

/** Waits until window.demo.phase is one of `phases`; an error shown by the page fails at once. */
async function waitPhase(page, phases, timeout, lines) {
  try {
    await page.waitForFunction(
      (ps) => window.demo && (ps.includes(window.demo.phase) || window.demo.error),
      phases,
      { timeout, polling: 250 },
    );
  } catch (e) {
    throw new Error(`page did not reach ${phases} in ${timeout / 1000} s (phase ${await page.evaluate(() => window.demo?.phase)}); log:\n${lines.join('\n')}`);
  }
  const err = await page.evaluate(() => window.demo.error);
  if (err) throw new Error(`the page shows an error:\n${err.map((c) => c.message).join('\n  caused by: ')}\nlog:\n${lines.join('\n')}`);
}

const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;

test('the demo trains the tiny model in Chromium (SwiftShader) and exports the adapter the native path trains', { timeout: 20 * 60e3 }, async () => {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 }, acceptDownloads: true });
  const lines = [];
  pageLog(page, lines);
  await page.goto(`${server.url}/web/`);
  await waitPhase(page, ['ready'], 120e3, lines);
  const gpu = await page.evaluate(() => window.demo.gpu);
  console.log(`# WebGPU adapter in Chromium: ${gpu.name} (${gpu.backend}); subgroups ${gpu.subgroups}`);

  await page.setInputFiles('#model-files', MODEL_FILES.map((f) => path.join(MODEL_DIR, f)));

  // A batch whose logits (64 x 128 rows x 49,152 x 4 bytes = 1.5 GiB) exceed the adapter's largest
  // storage binding (SwiftShader: 1 GiB): a clear message before any step.
  await page.fill('#batch', '64');
  await page.fill('#max-len', '128');
  await page.click('#train');
  await page.waitForFunction(() => window.demo.error, null, { timeout: 120e3 });
  const limit = await page.evaluate(() => ({ chain: window.demo.error, text: document.getElementById('error').textContent, phase: window.demo.phase }));
  assert.equal(limit.chain.at(-1).kind, 'limit', JSON.stringify(limit.chain));
  assert.match(limit.text, /starting training\n  caused by: device limit exceeded in training: a batch of 64 examples of up to 128 tokens needs logits of 1536\.0 MiB/);
  assert.match(limit.text, /larger than what this GPU adapter allows/);
  assert.equal(limit.phase, 'ready');
  const form = { '#rank': '8', '#alpha': '16', '#steps': String(STEPS), '#lr': '0.005', '#batch': '2', '#max-len': '96', '#seed': '3' };
  for (const [sel, v] of Object.entries(form)) await page.fill(sel, v);
  await page.fill('#prompt', 'What is the capital of France?');
  await page.click('#train');
  await waitPhase(page, ['done'], 15 * 60e3, lines);

  const s = await page.evaluate(() => ({
    losses: window.demo.losses.map((p) => p.loss), stepMs: window.demo.stepMs, options: window.demo.options,
    model: window.demo.model, answers: window.demo.answers, heldOut: window.demo.heldOut, stats: window.demo.stats,
  }));
  console.log(`# browser losses: ${s.losses.map((l) => l.toFixed(4)).join(' ')}`);
  assert.equal(s.losses.length, STEPS, 'one loss per step');
  assert.ok(s.losses.every(Number.isFinite), 'finite losses');
  const late = mean(s.losses.slice(Math.floor(STEPS / 2)));
  assert.ok(late < s.losses[0] - 0.05, `the loss falls: first step ${s.losses[0]}, mean of the second half ${late}`);
  console.log(`# held-out loss (${s.stats.validationExamples} examples): ${s.heldOut.before.toFixed(4)} -> ${s.heldOut.after.toFixed(4)}`);
  assert.equal(s.stats.validationExamples, 8, '10% of the 80 examples held out');
  assert.ok(s.heldOut.after < s.heldOut.before - 0.05, 'the held-out loss falls');
  assert.ok(s.answers.before.length > 0 && s.answers.after.length > 0, 'both answers are shown');
  assert.match(await page.textContent('#step-log'), new RegExp(`^step ${STEPS}/${STEPS}  loss `), 'the step log shows the last step first');
  assert.match(await page.textContent('#held-out'), /Held-out loss \(8 examples\): [\d.]+ before training → [\d.]+ after/);

  if (process.env.QLORA_SCREENSHOT) {
    await page.screenshot({ path: process.env.QLORA_SCREENSHOT, fullPage: true });
    console.log(`# screenshot: ${process.env.QLORA_SCREENSHOT}`);
  }

  // The adapter, through the page's download links.
  const webDir = path.join(tmp, 'browser');
  fs.mkdirSync(webDir);
  for (const [id, name] of [['#download-config', 'adapter_config.json'], ['#download-model', 'adapter_model.safetensors']]) {
    const [dl] = await Promise.all([page.waitForEvent('download'), page.click(id)]);
    assert.equal(dl.suggestedFilename(), name);
    await dl.saveAs(path.join(webDir, name));
  }
  await page.close();
  trained = { dir: webDir, answers: s.answers, maxPositions: s.model.maxPositions };

  // The same run natively.
  const nativeDir = path.join(tmp, 'native');
  const modelOpts = { quant: s.model.quant, maxPositions: s.model.maxPositions, name: s.model.name };
  const { stdout } = await promisify(execFile)(
    'cargo',
    ['run', '-q', '-j1', '--example', 'web_native', '--', MODEL_DIR, path.join(REPO_ROOT, 'data/pirate.jsonl'), nativeDir,
      JSON.stringify(s.options), JSON.stringify(modelOpts)],
    { cwd: REPO_ROOT, maxBuffer: 1 << 24, timeout: 15 * 60e3 },
  );
  const native = JSON.parse(stdout.trim().split('\n').pop());
  console.log(`# native losses:  ${native.losses.map((l) => l.toFixed(4)).join(' ')} (${native.adapter})`);
  const web = mean(s.stepMs.slice(1));
  const nat = mean(native.stepMs.slice(1));
  console.log(`# step time (mean of steps 2..${STEPS}, batch 2, max length 96): Chromium/SwiftShader ${web.toFixed(0)} ms, native ${native.adapter} ${nat.toFixed(0)} ms`);
  for (const k of ['before', 'after']) {
    assert.ok(Math.abs(s.heldOut[k] - native.heldOut[k]) <= 1e-4 * native.heldOut[k], `held-out loss ${k}: browser ${s.heldOut[k]} vs native ${native.heldOut[k]}`);
  }
  for (let i = 0; i < STEPS; i++) {
    assert.ok(Math.abs(s.losses[i] - native.losses[i]) <= 1e-4 * Math.abs(native.losses[i]),
      `step ${i + 1} loss: browser ${s.losses[i]} vs native ${native.losses[i]}`);
  }

  const webCfg = JSON.parse(fs.readFileSync(path.join(webDir, 'adapter_config.json'), 'utf8'));
  const natCfg = JSON.parse(fs.readFileSync(path.join(nativeDir, 'adapter_config.json'), 'utf8'));
  assert.deepEqual(webCfg, natCfg, 'adapter_config.json is the same');
  assert.equal(webCfg.r, 8);
  assert.equal(webCfg.lora_alpha, 16);
  const cmp = compareAdapters(
    readSafetensors(fs.readFileSync(path.join(webDir, 'adapter_model.safetensors'))),
    readSafetensors(fs.readFileSync(path.join(nativeDir, 'adapter_model.safetensors'))),
    RTOL,
  );
  console.log(`# adapter: ${cmp.keys} tensors, same keys and shapes; worst relative L2 error ${cmp.worstL2.toExponential(2)} (${cmp.worstL2Key}); ` +
    `worst max|diff|/max|native| ${cmp.worstMax.toExponential(2)} (${cmp.worstMaxKey})`);
  assert.deepEqual(cmp.failures, [], `adapter values within ${RTOL} relative`);
  assert.equal(cmp.keys, 28, 'A and B of the 7 projections of both layers');
});

test('the package API in a page: Adapter.load reads the exported adapter back and answers as the demo did', { timeout: 300e3 }, async () => {
  assert.ok(trained, 'needs the adapter of the first test');
  const page = await browser.newPage();
  const lines = [];
  pageLog(page, lines);
  // Any page of the origin without the demo (whose worker would open the GPU too).
  await page.goto(`${server.url}/web/README.md`);
  const config = fs.readFileSync(path.join(trained.dir, 'adapter_config.json'), 'utf8');
  const weights = [...fs.readFileSync(path.join(trained.dir, 'adapter_model.safetensors'))];
  const r = await page.evaluate(async ({ config, weights, files, maxPositions }) => {
    const q = await import('./pkg/qlora_webgpu.js');
    await q.default();
    const gpu = await q.Gpu.open();
    const bytes = {};
    for (const f of files) bytes[f] = new Uint8Array(await (await fetch(`../tests/fixtures/tiny-llama/model/${f}`)).arrayBuffer());
    const model = q.Model.fromHuggingFace(gpu, bytes, { name: 'model', maxPositions });
    const adapter = q.Adapter.load(model, config, new Uint8Array(weights));
    const back = adapter.files();
    const same = back.adapterConfig === config && back.adapterModel.length === weights.length && back.adapterModel.every((b, i) => b === weights[i]);
    let streamed = '';
    const prompt = 'What is the capital of France?';
    const after = await adapter.generate(prompt, { maxNewTokens: 40 }, (t) => { streamed += t; });
    const before = await model.generate(prompt, { maxNewTokens: 40 });
    let bad;
    try {
      q.Adapter.load(model, config, new Uint8Array(weights.slice(0, 100)));
    } catch (e) {
      bad = { message: e.message, cause: e.cause?.message, kind: e.cause?.kind, isError: e instanceof Error };
    }
    return { same, after: after.text, streamed, stop: after.stopReason, before: before.text, rank: adapter.config.r, bad };
  }, { config, weights, files: MODEL_FILES, maxPositions: trained.maxPositions });
  await page.close();
  assert.ok(r.same, 'Adapter.files() gives back the bytes it was loaded from');
  assert.equal(r.rank, 8);
  assert.equal(r.after, trained.answers.after, 'the loaded adapter answers as the trained one did in the demo');
  assert.equal(r.streamed, r.after, 'the streamed text is the answer');
  assert.equal(r.before, trained.answers.before, 'the base model answers as in the demo');
  assert.notEqual(r.after, r.before);
  assert.equal(r.bad?.isError, true);
  assert.equal(r.bad.kind, 'format');
  assert.match(r.bad.message, /reading the adapter for model/);
  assert.match(r.bad.cause, /adapter\/adapter_model\.safetensors/);
});

test('a page without WebGPU says so', { timeout: 180e3 }, async () => {
  // The page from a host name that is not a secure context (no navigator.gpu there), then
  // Chromium with the WebGPU API but without an adapter.
  const cases = [
    { args: ['--host-resolver-rules=MAP insecure.test 127.0.0.1'], host: 'insecure.test', kind: 'webgpu-missing', text: /WebGPU is not available: this page is not a secure context/ },
    { args: ['--disable-features=WebGPU,Vulkan', '--disable-gpu'], host: '127.0.0.1', kind: 'no-adapter', text: /the browser offers no GPU adapter/ },
  ];
  for (const c of cases) {
    const b = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--headless=new', '--no-sandbox', ...c.args] });
    try {
      const page = await b.newPage();
      await page.goto(`http://${c.host}:${server.port}/web/`);
      await page.waitForFunction(() => window.demo && window.demo.phase === 'no-webgpu', null, { timeout: 60e3 });
      const text = await page.textContent('#gpu');
      assert.match(text, c.text, c.args.join(' '));
      assert.equal(await page.evaluate(() => window.demo.gpuError.at(-1).kind), c.kind);
      assert.ok(await page.isDisabled('#train'), 'Train is disabled');
    } finally {
      await b.close();
    }
  }
});
