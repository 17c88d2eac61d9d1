// Shared pieces of the browser tests that open pages of their own (from_url, compat, stop,
// device_loss, adapter_set, real_model): Chromium with WebGPU on SwiftShader, the demo's static server, a page with the
// package loaded, the native run of the same options (examples/web_native.rs) and the
// comparison of two adapters.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { chromium } from 'playwright-core';
import { startServer, REPO_ROOT } from '../serve.mjs';
import { readSafetensors, compareAdapters } from './safetensors.mjs';

export { REPO_ROOT };
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
// DESIGN.md: Chromium headless with WebGPU on a machine without a GPU.
export const WEBGPU_FLAGS = [
  '--headless=new', '--no-sandbox', '--enable-unsafe-webgpu', '--enable-features=Vulkan',
  '--use-vulkan=swiftshader', '--use-webgpu-adapter=swiftshader', '--disable-gpu-sandbox',
];
export const MODEL_DIR = path.join(REPO_ROOT, 'tests/fixtures/tiny-llama/model');
export const MODEL_FILES = ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja'];
export const DATA = path.join(REPO_ROOT, 'data/pirate.jsonl');

/** The static server and Chromium: { server, browser, close() }. */
export async function launch() {
  assert.ok(fs.existsSync(path.join(REPO_ROOT, 'web/pkg/qlora_webgpu.js')), 'web/pkg is missing: run scripts/build-web.sh first');
  assert.ok(fs.existsSync(CHROMIUM), `no Chromium at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM)`);
  const server = await startServer();
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: WEBGPU_FLAGS });
  return { server, browser, close: async () => { await browser.close(); server.server.close(); } };
}

export function pageLog(page, lines) {
  page.on('console', (m) => lines.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => lines.push(`[pageerror] ${e.message}`));
  page.on('worker', (w) => w.on('console', (m) => lines.push(`[worker ${m.type()}] ${m.text()}`)));
}

/**
 * A page of the server's origin without the demo, with the package loaded as window.q, the tiny
 * model's Hugging Face files as window.hfFiles and the example data as window.pirate. The GPU
 * is not opened (`gpuOptions` undefined) or opened as window.gpu with those options.
 */
export async function apiPage(browser, server, lines, gpuOptions) {
  const page = await browser.newPage();
  pageLog(page, lines);
  await page.goto(`${server.url}/web/README.md`);
  await page.evaluate(async ({ files, gpuOptions }) => {
    window.q = await import('./pkg/qlora_webgpu.js');
    window.wasm = await window.q.default();
    if (gpuOptions !== undefined) window.gpu = await window.q.Gpu.open(gpuOptions);
    window.hfFiles = {};
    for (const f of files) window.hfFiles[f] = new Uint8Array(await (await fetch(`../tests/fixtures/tiny-llama/model/${f}`)).arrayBuffer());
    window.pirate = await (await fetch('../data/pirate.jsonl')).text();
  }, { files: MODEL_FILES, gpuOptions: gpuOptions ?? null });
  return page;
}

/** Writes an adapter's two files ({adapterConfig, adapterModel: number[] | Uint8Array}) into `dir`. */
export function writeAdapter(dir, files) {
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'adapter_config.json'), files.adapterConfig);
  fs.writeFileSync(path.join(dir, 'adapter_model.safetensors'), Buffer.from(files.adapterModel));
}

/**
 * examples/web_native.rs: the same run natively (lavapipe), with extra environment `env`, from
 * the adapter in `initDir` when given. Resolves to its final JSON line.
 */
export async function nativeRun(trainOpts, modelOpts, outDir, env = {}, initDir = undefined) {
  const args = ['run', '-q', '-j1', '--example', 'web_native', '--', MODEL_DIR, DATA, outDir, JSON.stringify(trainOpts), JSON.stringify(modelOpts)];
  if (initDir) args.push(initDir);
  const { stdout } = await promisify(execFile)('cargo', args, { cwd: REPO_ROOT, maxBuffer: 1 << 24, timeout: 15 * 60e3, env: { ...process.env, ...env } });
  return JSON.parse(stdout.trim().split('\n').pop());
}

/**
 * A browser run against the native one: each step's loss within `bound.loss` relative, the same
 * adapter_config.json, each tensor within `bound.adapter` (relative L2), A and B (and DoRA's
 * magnitude) of every target module of the tiny model's 2 layers. Prints the figures.
 */
export function compareWithNative(label, web, native, bound) {
  assert.equal(web.losses.length, native.losses.length, `${label}: the same number of steps`);
  const lossErr = web.losses.map((l, i) => Math.abs(l - native.losses[i]) / Math.abs(native.losses[i]));
  const webCfg = JSON.parse(fs.readFileSync(path.join(web.dir, 'adapter_config.json'), 'utf8'));
  const natCfg = JSON.parse(fs.readFileSync(path.join(native.out, 'adapter_config.json'), 'utf8'));
  assert.deepEqual(webCfg, natCfg, `${label}: adapter_config.json is the same`);
  const cmp = compareAdapters(
    readSafetensors(fs.readFileSync(path.join(web.dir, 'adapter_model.safetensors'))),
    readSafetensors(fs.readFileSync(path.join(native.out, 'adapter_model.safetensors'))),
    bound.adapter,
  );
  console.log(`# ${label}: browser losses ${web.losses.map((l) => l.toFixed(5)).join(' ')}; native ${native.losses.map((l) => l.toFixed(5)).join(' ')} ` +
    `(${native.adapter}, ${native.quant}); worst loss relative difference ${Math.max(...lossErr).toExponential(2)} (bound ${bound.loss}); adapter ${cmp.keys} tensors, ` +
    `worst relative L2 ${cmp.worstL2.toExponential(2)} (${cmp.worstL2Key}; bound ${bound.adapter}); worst max|diff|/max|native| ${cmp.worstMax.toExponential(2)} (${cmp.worstMaxKey})`);
  lossErr.forEach((e, i) => assert.ok(e <= bound.loss, `${label}: step ${i + 1} loss: browser ${web.losses[i]} vs native ${native.losses[i]}`));
  assert.deepEqual(cmp.failures, [], `${label}: adapter values within ${bound.adapter} relative`);
  const modules = Array.isArray(webCfg.target_modules) ? webCfg.target_modules.length : 7;
  assert.equal(cmp.keys, 2 * modules * (webCfg.use_dora ? 3 : 2), `${label}: A and B (and DoRA magnitudes) of the target modules of both layers`);
  return webCfg;
}

export const secs = (t0) => `${((Date.now() - t0) / 1000).toFixed(0)} s`;
