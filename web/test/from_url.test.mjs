// Model.fromUrl in a page (headless Chromium, WebGPU on SwiftShader): the tiny model's GGUF
// (written by test/gguf.mjs) served at a URL of the test server's origin, every request to it
// counted. The first load downloads it (progress: bytes, then tensors), the second reads the
// origin's cache (no request reaches the network), both give the model `fromGguf` gives for
// the same bytes (the same held-out loss and greedy tokens, bit for bit); `forgetCached` empties
// the cache and the next load downloads again. Run: cd web && node --test test/from_url.test.mjs

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { launch, apiPage, pageLog, MODEL_DIR, REPO_ROOT, secs } from './page.mjs';
import { ggufFromHfFolder } from './gguf.mjs';

let env;
before(async () => { env = await launch(); });
after(async () => { await env?.close(); });

test('Model.fromUrl: streamed download with progress, cached in the origin, forgotten on request', { timeout: 600e3 }, async () => {
  const t0 = Date.now();
  const gguf = ggufFromHfFolder(MODEL_DIR);
  const lines = [];
  const page = await apiPage(env.browser, env.server, lines, {});
  const net = { requests: 0, bytes: 0 };
  await page.route('**/models/tiny-llama.gguf', (route) => {
    net.requests++;
    net.bytes += gguf.length;
    return route.fulfill({ body: gguf, contentType: 'application/octet-stream' });
  });
  await page.exposeFunction('netRequests', () => net.requests);
  const r = await page.evaluate(async () => {
    const { q, gpu } = window;
    const url = '/models/tiny-llama.gguf';
    const opts = { maxPositions: 256 };
    const out = { forgotBefore: await q.Model.forgetCached() };
    const load = async (o = opts) => {
      const events = [];
      const model = await q.Model.fromUrl(gpu, url, { ...o, onProgress: (p) => events.push(p) });
      return { model, events, requests: await window.netRequests() };
    };
    const mem0 = window.wasm.memory.buffer.byteLength;
    const first = await load();
    out.memGrowth = window.wasm.memory.buffer.byteLength - mem0;
    out.cachedAfterFirst = await q.Model.cachedModels();
    const second = await load();
    const bytes = new Uint8Array(await (await fetch(url, { cache: 'no-store' })).arrayBuffer());
    const direct = q.Model.fromGguf(gpu, 'tiny-llama.gguf', bytes, opts);
    const data = q.Dataset.fromJsonl('pirate.jsonl', window.pirate);
    const run = { rank: 4, steps: 1, batchSize: 2, maxLen: 64, seed: 1, validation: 0.1 };
    out.loss = [];
    out.tokens = [];
    out.info = [];
    for (const m of [first.model, second.model, direct]) {
      out.loss.push(await new q.Training(m, data, run).validationLoss());
      out.tokens.push((await m.generate('What is the capital of France?', { maxNewTokens: 12 })).tokens);
      out.info.push(m.info);
    }
    out.first = { events: first.events, requests: first.requests };
    out.second = { events: second.events, requests: second.requests };
    out.forgot = await q.Model.forgetCached(url);
    out.cachedAfterForget = await q.Model.cachedModels();
    const third = await load();
    out.third = { fromCache: third.events[0].fromCache, requests: third.requests };
    let bad;
    try { await q.Model.fromUrl(gpu, '/models/missing.gguf', { cache: false }); } catch (e) { bad = { message: e.message, kind: e.kind }; }
    out.bad = bad;
    await q.Model.forgetCached();
    return out;
  });
  await page.close();
  // The same file through fromGguf in a fresh page (wasm memory never shrinks, so each load's
  // peak is its growth from a fresh instance): the bytes are copied into wasm memory whole.
  const page2 = await apiPage(env.browser, env.server, lines, {});
  await page2.route('**/models/tiny-llama.gguf', (route) => route.fulfill({ body: gguf, contentType: 'application/octet-stream' }));
  const ggufGrowth = await page2.evaluate(async () => {
    const bytes = new Uint8Array(await (await fetch('/models/tiny-llama.gguf', { cache: 'no-store' })).arrayBuffer());
    const mem0 = window.wasm.memory.buffer.byteLength;
    window.q.Model.fromGguf(window.gpu, 'tiny-llama.gguf', bytes, { maxPositions: 256 });
    return window.wasm.memory.buffer.byteLength - mem0;
  });
  await page2.close();
  const size = gguf.length;
  // The tiny model's weights as the host holds them while parsing: f32, 2 layers of 7
  // projections (64x64 q, o; 32x64 k, v; 3 of 160x64) and 2 norms, the embedding, the final norm.
  const hostF32 = 4 * (2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 160 * 64 + 2 * 64) + 49152 * 64 + 64);
  const mib = (b) => `${(b / 1048576).toFixed(1)} MiB`;
  console.log(`# wasm memory growth: fromUrl ${mib(r.memGrowth)}, fromGguf ${mib(ggufGrowth)} (file ${mib(size)}, host f32 weights ${mib(hostF32)}); ` +
    `fromGguf - fromUrl = ${mib(ggufGrowth - r.memGrowth)} = ${((ggufGrowth - r.memGrowth) / size).toFixed(2)} x the file`);
  // fromUrl streams the file (never whole in wasm memory): its peak is below fromGguf's (which
  // holds the whole file next to the f32 weights) by at least 3/4 of the file. Measured
  // (SwiftShader, Chromium 156): fromUrl 56.1 MiB, fromGguf 63.9 MiB, file 7.9 MiB: the
  // difference is 1.00 x the file. The rest, the same in both (the f32 weights, the metadata and
  // tokenizer, the upload's copies, the allocator's slack), is not asserted. A load that held the
  // whole file in wasm memory would have about fromGguf's peak (not measured here).
  assert.ok(ggufGrowth - r.memGrowth >= 0.75 * size,
    `fromUrl's wasm memory growth ${r.memGrowth} is not below fromGguf's ${ggufGrowth} by 3/4 of the file (${size} bytes)`);

  console.log(`# GGUF ${size} bytes; first load: ${r.first.events.length} progress events, requests ${r.first.requests}; ` +
    `second: ${r.second.events.length} events, requests ${r.second.requests}; held-out loss ${r.loss.join(' / ')}; ${secs(t0)}`);
  assert.equal(r.first.requests, 1, 'the first load downloads once');
  // Progress: download events with growing bytes up to the file's size (Content-Length known),
  // then upload events counting tensors up to all of them.
  const check = (events, fromCache) => {
    const dl = events.filter((e) => e.phase === 'download');
    const up = events.filter((e) => e.phase === 'upload');
    assert.ok(dl.length >= 2 && up.length >= 2, JSON.stringify(events.slice(0, 3)));
    assert.equal(events.findIndex((e) => e.phase === 'upload'), dl.length, 'bytes first, then tensors');
    assert.ok(dl.every((e, i) => e.fromCache === fromCache && e.bytesTotal === size && (i === 0 || e.bytesDone >= dl[i - 1].bytesDone)));
    assert.equal(dl.at(-1).bytesDone, size);
    const total = up[0].tensorsTotal;
    // 2 layers x (7 projections + 2 norms) + the tied embedding + the final norm.
    assert.equal(total, 2 * 9 + 2);
    assert.deepEqual(up.map((e) => e.tensorsDone), [...Array(total).keys()].map((i) => i + 1), 'one event a tensor');
  };
  check(r.first.events, false);
  assert.equal(r.cachedAfterFirst.length, 1);
  assert.match(r.cachedAfterFirst[0], /\/models\/tiny-llama\.gguf$/);
  check(r.second.events, true);
  assert.equal(r.second.requests, 1, 'the second load reads the cache: no request reaches the network');
  assert.deepEqual(r.info[0], r.info[2], 'fromUrl gives the model fromGguf gives for the same bytes');
  assert.deepEqual(r.info[1], r.info[2]);
  assert.equal(r.loss[0], r.loss[2], 'the same held-out loss, bit for bit');
  assert.equal(r.loss[1], r.loss[2]);
  assert.deepEqual(r.tokens[0], r.tokens[2], 'the same greedy tokens');
  assert.deepEqual(r.tokens[1], r.tokens[2]);
  assert.equal(r.forgot, 1);
  assert.deepEqual(r.cachedAfterForget, []);
  assert.equal(r.third.fromCache, false, 'after forgetCached the model is downloaded again');
  assert.equal(r.third.requests, 3, 'the explicit fetch for fromGguf, then the download after forgetting');
  assert.equal(r.bad?.kind, 'fetch', JSON.stringify(r.bad));
  assert.match(r.bad.message, /downloading \/models\/missing\.gguf: HTTP status 404/);
});

test('the demo page loads a model from a URL, then from the cache, and forgets it', { timeout: 900e3 }, async () => {
  const t0 = Date.now();
  const gguf = ggufFromHfFolder(MODEL_DIR);
  const lines = [];
  // The GGUF served by the test server from target/ (ignored by git); requests counted there.
  const rel = 'target/web-test/tiny-llama.gguf';
  fs.mkdirSync(path.join(REPO_ROOT, path.dirname(rel)), { recursive: true });
  fs.writeFileSync(path.join(REPO_ROOT, rel), gguf);
  const url = `/${rel}`;
  let requests = 0;
  const count = (req) => { if (req.url === url) requests++; };
  env.server.server.on('request', count);
  const context = await env.browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  pageLog(page, lines);
  await page.goto(`${env.server.url}/web/`);
  const wait = async (fn, what, timeout = 600e3) => {
    try {
      await page.waitForFunction(`(${fn})() || !!(window.demo && window.demo.error)`, null, { timeout, polling: 250 });
    } catch {
      throw new Error(`${what}: not in ${timeout / 1000} s (phase ${await page.evaluate(() => window.demo?.phase)}); log:\n${lines.join('\n')}`);
    }
    const err = await page.evaluate(() => window.demo.error);
    if (err) throw new Error(`the page shows an error: ${JSON.stringify(err)}\nlog:\n${lines.join('\n')}`);
  };
  await wait(() => window.demo && window.demo.phase === 'ready', 'the GPU');
  await page.fill('#model-url', url);
  for (const [sel, v] of Object.entries({ '#rank': '2', '#steps': '1', '#batch': '1', '#max-len': '96' })) await page.fill(sel, v);
  await page.uncheck('#held-out-on');
  await page.click('#train');
  await wait(() => window.demo.phase === 'done', 'the first run');
  const first = await page.evaluate(() => ({ events: window.demo.loadEvents, model: window.demo.model }));
  assert.equal(requests, 1);
  assert.equal(first.model.name, 'tiny-llama.gguf');
  assert.ok(first.events.some((e) => e.phase === 'download' && !e.fromCache && e.bytesDone === gguf.length));
  assert.ok(first.events.some((e) => e.phase === 'upload' && e.tensorsDone === e.tensorsTotal));
  // A new page of the same origin (the worker's model is gone): the model comes from the cache.
  await page.reload();
  await wait(() => window.demo && window.demo.phase === 'ready', 'the GPU after the reload');
  await page.fill('#model-url', url);
  for (const [sel, v] of Object.entries({ '#rank': '2', '#steps': '1', '#batch': '1', '#max-len': '96' })) await page.fill(sel, v);
  await page.uncheck('#held-out-on');
  await page.click('#train');
  await wait(() => window.demo.phase === 'done', 'the run from the cache');
  const second = await page.evaluate(() => window.demo.loadEvents);
  assert.equal(requests, 1, 'the cached model needs no request');
  assert.ok(second.every((e) => e.fromCache));
  await page.click('#forget-cache');
  await wait(() => window.demo.forgotten, 'forgetting');
  assert.equal(await page.textContent('#cache-status'), 'Forgot 1 cached model file.');
  assert.deepEqual(await page.evaluate(async () => (await caches.open('qlora-webgpu-models')).keys().then((k) => k.length)), 0);
  await context.close();
  env.server.server.off('request', count);
  fs.rmSync(path.join(REPO_ROOT, rel));
  console.log(`# demo page from a URL, cached, forgotten: ${secs(t0)}`);
});
