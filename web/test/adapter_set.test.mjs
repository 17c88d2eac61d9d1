// Browser test of the npm package's AdapterSet (several adapters on one loaded base), as
// tests/adapter_set.rs checks it natively: in headless Chromium (WebGPU on SwiftShader) a page
// loads the tiny model (tests/fixtures/tiny-llama/model) once, adds two PEFT adapters (A: PEFT's
// trained dev adapter, adapter_final; B: its initial one, adapter_init, both A and B random) and
// answers base -> A -> B -> base with `use(name)`, then once more choosing per call
// (`generate(..., {adapter})`). Every answer (greedy token ids of a raw prompt and of a chat
// prompt) must equal, id for id, the answer of a fresh Model load with only that adapter
// (`Adapter.generate`, or `Model.generate` for the base), and the three answers must differ
// (else the comparison shows nothing). The set's deviceBytes is the adapters' A and B bytes, and
// the base's device bytes do not change when adapters are added (the base is shared, not copied).
//
// Needs web/pkg (scripts/build-web.sh) and Chromium (CHROMIUM, default /usr/bin/chromium).
// Run: cd web && node --test test/adapter_set.test.mjs

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { apiPage, launch, REPO_ROOT } from './page.mjs';
import { readSafetensors } from './safetensors.mjs';

const DEV = path.join(REPO_ROOT, 'tests/fixtures/tiny-llama/dev');
const ADAPTERS = { A: 'adapter_final', B: 'adapter_init' };
const PROMPTS = [{ text: 'The quick brown fox' }, 'What is the capital of France?'];
const NEW_TOKENS = 8;

let server;
let browser;

before(async () => {
  ({ server, browser } = await launch());
});

after(async () => {
  await browser?.close();
  server?.server.close();
});

function adapterFiles(dir) {
  return {
    config: fs.readFileSync(path.join(DEV, dir, 'adapter_config.json'), 'utf8'),
    weights: [...fs.readFileSync(path.join(DEV, dir, 'adapter_model.safetensors'))],
  };
}

test('AdapterSet in a page: base -> A -> B -> base answers equal each one loaded alone; memory grows by the adapters only', { timeout: 600e3 }, async () => {
  const files = Object.fromEntries(Object.entries(ADAPTERS).map(([k, d]) => [k, adapterFiles(d)]));
  const lines = [];
  const page = await apiPage(browser, server, lines, {});
  let r;
  try {
    r = await page.evaluate(async ({ files, prompts, n }) => {
      const { q, gpu } = window;
      const opts = { maxNewTokens: n, stop: [] };
      const answer = async (gen) => {
        const out = [];
        for (const p of prompts) out.push((await gen(p)).tokens);
        return out;
      };
      // Each alone: a fresh load of the base, with only that adapter.
      const alone = {};
      {
        const m = q.Model.fromHuggingFace(gpu, window.hfFiles, { maxPositions: 64 });
        alone.base = await answer((p) => m.generate(p, opts));
        m.free();
      }
      for (const name of ['A', 'B']) {
        const m = q.Model.fromHuggingFace(gpu, window.hfFiles, { maxPositions: 64 });
        const a = q.Adapter.load(m, files[name].config, new Uint8Array(files[name].weights));
        alone[name] = await answer((p) => a.generate(p, opts));
        a.free();
        m.free();
      }
      // One base, two adapters.
      const model = q.Model.fromHuggingFace(gpu, window.hfFiles, { maxPositions: 64 });
      const baseBytes = model.info.deviceBytes;
      const set = new q.AdapterSet(model);
      set.load('A', files.A.config, new Uint8Array(files.A.weights));
      const b = q.Adapter.load(model, files.B.config, new Uint8Array(files.B.weights));
      set.add('B', b);
      const baseBytesAfter = model.info.deviceBytes;
      const seq = [];
      for (const name of [null, 'A', 'B', null]) {
        set.use(name);
        seq.push({ name: name ?? 'base', active: set.active, tokens: await answer((p) => set.generate(p, opts)) });
      }
      // Per call, while 'A' is in use.
      set.use('A');
      const perCall = [];
      for (const name of ['B', null, 'A']) {
        perCall.push({ name: name ?? 'base', tokens: await answer((p) => set.generate(p, { ...opts, adapter: name })), active: set.active });
      }
      let unknown;
      try {
        set.use('C');
      } catch (e) {
        unknown = { message: e.message, cause: e.cause?.message };
      }
      return { alone, seq, perCall, names: set.names, deviceBytes: set.deviceBytes, baseBytes, baseBytesAfter, unknown };
    }, { files, prompts: PROMPTS, n: NEW_TOKENS });
  } catch (e) {
    throw new Error(`${e.message}\nlog:\n${lines.join('\n')}`);
  } finally {
    await page.close();
  }
  const show = (t) => t.map((ids) => `[${ids.join(' ')}]`).join(' ');
  for (const k of ['base', 'A', 'B']) console.log(`# alone ${k}: ${show(r.alone[k])}`);
  // The three answers differ, so that equal answers below say which weights ran.
  assert.notDeepEqual(r.alone.A, r.alone.base, 'adapter A changes the answers');
  assert.notDeepEqual(r.alone.B, r.alone.base, 'adapter B changes the answers');
  assert.notDeepEqual(r.alone.A, r.alone.B, 'adapters A and B answer differently');
  for (const s of r.seq) {
    assert.equal(s.active, s.name === 'base' ? undefined : s.name, 'active names the adapter in use');
    assert.deepEqual(s.tokens, r.alone[s.name], `use(${s.name}): the answers of ${s.name} loaded alone`);
  }
  for (const s of r.perCall) {
    assert.equal(s.active, 'A', 'a per-call adapter does not change the one in use');
    assert.deepEqual(s.tokens, r.alone[s.name], `generate(..., {adapter: ${s.name}}): the answers of ${s.name} loaded alone`);
  }
  assert.deepEqual(r.names, ['A', 'B']);
  // Memory: the adapters' A and B (f32) only; the base's bytes unchanged.
  const abBytes = Object.values(files).reduce((sum, f) => {
    let n = 0;
    for (const t of readSafetensors(new Uint8Array(f.weights)).values()) n += t.data.length * 4;
    return sum + n;
  }, 0);
  console.log(`# AdapterSet.deviceBytes ${r.deviceBytes} (A and B of both adapters: ${abBytes}); base ${JSON.stringify(r.baseBytes)}`);
  assert.equal(r.deviceBytes, abBytes, 'the set holds the adapters\' A and B, nothing else');
  assert.deepEqual(r.baseBytesAfter, r.baseBytes, 'adding adapters does not copy the base');
  assert.ok(r.unknown, 'use() of an unknown name fails');
  assert.match(`${r.unknown.message} ${r.unknown.cause}`, /C/);
});
