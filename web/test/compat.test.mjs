// Adapter choice and WebGPU compatibility mode in a page (headless Chromium, SwiftShader).
// Gpu.open() asks for a core hardware adapter, then a compatibility-mode one, and takes the
// software adapter only when neither is hardware (SwiftShader is Chromium's fallback adapter:
// the kind is "fallback"). Gpu.open({compatibility: true}) takes a compatibility-mode adapter
// and holds the device to compatibility mode's default limits (128 MiB binding, 256 MiB buffer,
// 8 storage buffers per stage, 16 KiB workgroup storage, 128 invocations a workgroup: 128 along
// x and y, 64 along z; the device asked for and the device got are both checked, and the device
// refuses a 256-invocation kernel); the tiny model trains there with the adapter of the native
// run of the same options (QLORA_MAX_BINDING=128M and QLORA_COMPAT_LIMITS=1 there: wgpu holds
// the native device to the same limits, tests/compat_limits.rs).
// Run: cd web && node --test test/compat.test.mjs

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { launch, apiPage, writeAdapter, nativeRun, compareWithNative, secs } from './page.mjs';

// Browser (SwiftShader, vec4 kernels) against native (lavapipe, subgroup kernels): as in
// browser.test.mjs (f32 base: losses 9e-8 achieved there, bound 5e-7; adapters 1.4e-6, bound 1e-5).
const BOUND = { loss: 5e-7, adapter: 1e-5 };
let env;
let tmp;
before(async () => { env = await launch(); tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'qlora-compat-')); });
after(async () => { await env?.close(); if (tmp) fs.rmSync(tmp, { recursive: true, force: true }); });

test('Gpu.open: core hardware adapter first, then compatibility mode, then the software fallback', { timeout: 180e3 }, async () => {
  const lines = [];
  const page = await apiPage(env.browser, env.server, lines);
  const r = await page.evaluate(async () => {
    const asked = [];
    const orig = GPU.prototype.requestAdapter;
    GPU.prototype.requestAdapter = function (o) { asked.push(JSON.stringify(o ?? {})); return orig.call(this, o); };
    const gpu = await window.q.Gpu.open();
    GPU.prototype.requestAdapter = orig;
    return { asked, info: gpu.info, own: Object.prototype.hasOwnProperty.call(navigator.gpu, 'requestAdapter') };
  });
  await page.close();
  console.log(`# Gpu.open asked ${r.asked.join(', ')}; got ${r.info.adapterKind} (${r.info.name}), ${r.info.maxStorageBuffersPerShaderStage} storage buffers per stage`);
  assert.deepEqual(r.asked.slice(0, 2), ['{"powerPreference":"high-performance"}', '{"powerPreference":"high-performance","featureLevel":"compatibility"}']);
  assert.equal(r.info.adapterKind, 'fallback', 'SwiftShader is a software adapter');
  assert.equal(r.info.isFallbackAdapter, true);
  assert.equal(r.own, false, 'navigator.gpu.requestAdapter is the browser\'s again');
});

test('Gpu.open({compatibility: true}): compatibility-mode limits, and the tiny model trains as natively', { timeout: 900e3 }, async () => {
  const t0 = Date.now();
  const opts = { rank: 4, alpha: 8, steps: 2, lr: 0.005, batchSize: 2, maxLen: 64, seed: 12, schedule: 'constant', warmupSteps: 0, maxGradNorm: 1, dropout: 0 };
  const modelOpts = { maxPositions: 128, name: 'model' };
  const lines = [];
  const page = await apiPage(env.browser, env.server, lines);
  const r = await page.evaluate(async ({ opts, modelOpts }) => {
    const { q } = window;
    // The device wgpu asks for (requiredLimits) and the one it gets (device.limits).
    const keys = ['maxComputeInvocationsPerWorkgroup', 'maxComputeWorkgroupSizeX', 'maxComputeWorkgroupSizeY', 'maxComputeWorkgroupSizeZ'];
    const devices = [];
    const orig = GPUAdapter.prototype.requestDevice;
    GPUAdapter.prototype.requestDevice = async function (d) {
      const device = await orig.call(this, d);
      devices.push({ device, asked: Object.fromEntries(keys.map((k) => [k, d?.requiredLimits?.[k]])), got: Object.fromEntries(keys.map((k) => [k, device.limits[k]])), features: [...device.features] });
      return device;
    };
    const gpu = await q.Gpu.open({ compatibility: true });
    GPUAdapter.prototype.requestDevice = orig;
    // A kernel of core's 256 invocations on that device: a validation error when the device is
    // held to 128; one of 128 is accepted.
    const pipelineError = async (device, size) => {
      device.pushErrorScope('validation');
      const module = device.createShaderModule({ code: `@compute @workgroup_size(${size}) fn k() {}` });
      device.createComputePipeline({ layout: 'auto', compute: { module, entryPoint: 'k' } });
      const e = await device.popErrorScope();
      return e ? e.message : null;
    };
    const dev = devices[devices.length - 1];
    const err256 = dev ? await pipelineError(dev.device, 256) : 'no device seen';
    const err128 = dev ? await pipelineError(dev.device, 128) : 'no device seen';
    const model = q.Model.fromHuggingFace(gpu, window.hfFiles, modelOpts);
    const data = q.Dataset.fromJsonl('pirate.jsonl', window.pirate);
    const run = new q.Training(model, data, opts);
    const reports = await run.train();
    const files = await run.exportAdapter();
    return {
      info: gpu.info, losses: reports.map((x) => x.loss), files: { adapterConfig: files.adapterConfig, adapterModel: [...files.adapterModel] },
      nDevices: devices.length, asked: dev?.asked, got: dev?.got, features: dev?.features, err256, err128,
    };
  }, { opts, modelOpts });
  await page.close();
  const i = r.info;
  console.log(`# device: asked ${JSON.stringify(r.asked)}, got ${JSON.stringify(r.got)}; features ${r.features?.join(' ')}; ` +
    `a 256-invocation kernel: ${r.err256 ?? 'accepted'}`);
  const compatWorkgroup = { maxComputeInvocationsPerWorkgroup: 128, maxComputeWorkgroupSizeX: 128, maxComputeWorkgroupSizeY: 128, maxComputeWorkgroupSizeZ: 64 };
  assert.equal(r.nDevices, 1, 'Gpu.open requests one device');
  assert.deepEqual(r.asked, compatWorkgroup, 'wgpu asks for compatibility mode\'s workgroup limits');
  assert.deepEqual(r.got, compatWorkgroup, 'the device has compatibility mode\'s workgroup limits');
  assert.equal(i.maxComputeInvocationsPerWorkgroup, 128);
  assert.ok(r.err256, 'the device refuses a 256-invocation kernel');
  assert.equal(r.err128, null, 'a 128-invocation kernel is accepted');
  console.log(`# compatibility mode: ${i.adapterKind}, binding ${i.maxStorageBufferBindingSize}, buffer ${i.maxBufferSize}, ` +
    `${i.maxStorageBuffersPerShaderStage} storage buffers per stage, workgroup storage ${i.maxComputeWorkgroupStorageSize}, ` +
    `${i.maxComputeInvocationsPerWorkgroup} invocations; browser run ${secs(t0)}`);
  assert.equal(i.adapterKind, 'compatibility');
  assert.equal(i.maxStorageBufferBindingSize, 128 << 20);
  assert.equal(i.maxBinding, 128 << 20);
  assert.equal(i.maxBufferSize, 256 << 20);
  assert.equal(i.maxStorageBuffersPerShaderStage, 8);
  assert.equal(i.maxComputeWorkgroupStorageSize, 16384);
  const webDir = path.join(tmp, 'browser-compat');
  writeAdapter(webDir, r.files);
  const native = await nativeRun(opts, modelOpts, path.join(tmp, 'native-compat'), { QLORA_MAX_BINDING: '128M', QLORA_COMPAT_LIMITS: '1' });
  compareWithNative('compatibility limits (f32 base)', { losses: r.losses, dir: webDir }, native, BOUND);
});
