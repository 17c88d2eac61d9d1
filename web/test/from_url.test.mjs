// Model.fromUrl in a page (headless Chromium, WebGPU on SwiftShader): the tiny model's GGUF
// (written by test/gguf.mjs) served at a URL of the test server's origin, every request to it
// counted. The first load downloads it (progress: bytes and, as they arrive, the tensors
// uploaded to the GPU one by one), the second reads the origin's cache (no request reaches the
// network), both give the model `fromGguf` gives for the same bytes (the same held-out loss,
// greedy tokens and info, bit for bit), with an f32 and an NF4 + double-quant base;
// `forgetCached` empties the cache and the next load downloads again. A projection-heavy model
// shows that fromUrl holds one tensor at a time in wasm memory, not the f32 weights.
// Run: cd web && node --test test/from_url.test.mjs

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { launch, apiPage, pageLog, MODEL_DIR, REPO_ROOT, secs } from './page.mjs';
import { ggufFromHfFolder, wideGguf } from './gguf.mjs';

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
    // QLoRA's base: each projection quantized to NF4 (+ double quant) as it reaches the GPU.
    const nf4 = { ...opts, quant: 'nf4-dq' };
    out.nf4 = { loss: [], tokens: [], info: [] };
    const nf4Url = await load(nf4);
    out.nf4.events = nf4Url.events;
    for (const m of [nf4Url.model, q.Model.fromGguf(gpu, 'tiny-llama.gguf', bytes, nf4)]) {
      out.nf4.loss.push(await new q.Training(m, data, run).validationLoss());
      out.nf4.tokens.push((await m.generate('What is the capital of France?', { maxNewTokens: 12 })).tokens);
      out.nf4.info.push(m.info);
      m.free();
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
  // The tiny model's weights as the whole-file path holds them on the host: f32, 2 layers of 7
  // projections (64x64 q, o; 32x64 k, v; 3 of 160x64) and 2 norms, the embedding, the final norm.
  const hostF32 = 4 * (2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 160 * 64 + 2 * 64) + 49152 * 64 + 64);
  const mib = (b) => `${(b / 1048576).toFixed(1)} MiB`;
  console.log(`# wasm memory growth: fromUrl ${mib(r.memGrowth)}, fromGguf ${mib(ggufGrowth)} (file ${mib(size)}, host f32 weights ${mib(hostF32)}); ` +
    `fromGguf - fromUrl = ${mib(ggufGrowth - r.memGrowth)} = ${((ggufGrowth - r.memGrowth) / size).toFixed(2)} x the file`);
  // fromUrl streams the file (never whole in wasm memory) and uploads each tensor as it is
  // converted (the f32 weights never all on the host): its peak is below fromGguf's (which holds
  // the whole file next to the f32 weights) by the file and most of the weights. Measured
  // (SwiftShader, Chromium 156): fromUrl 40.9 MiB, fromGguf 61.1 MiB, file 7.9 MiB, f32 weights
  // 12.3 MiB: the difference is 2.57 x the file. Bound: at least 1.75 x the file (1.47 x below
  // achieved); a fromUrl that kept the f32 weights until the upload (as before: 56.1 vs 63.9 MiB,
  // 1.00 x) or held the whole file breaks it. The rest, the same in both (the metadata and
  // tokenizer, the embedding's conversion, the allocator's slack), is not asserted.
  assert.ok(ggufGrowth - r.memGrowth >= 1.75 * size,
    `fromUrl's wasm memory growth ${r.memGrowth} is not below fromGguf's ${ggufGrowth} by 1.75 x the file (${size} bytes)`);

  console.log(`# GGUF ${size} bytes; first load: ${r.first.events.length} progress events, requests ${r.first.requests}; ` +
    `second: ${r.second.events.length} events, requests ${r.second.requests}; held-out loss ${r.loss.join(' / ')}; ${secs(t0)}`);
  assert.equal(r.first.requests, 1, 'the first load downloads once');
  // Progress: download events with growing bytes up to the file's size (Content-Length known)
  // and, interleaved with them, one upload event per tensor as it reaches the GPU: the first
  // event is a download's, every tensor is on the GPU before the download's last event.
  const check = (events, fromCache) => {
    const dl = events.filter((e) => e.phase === 'download');
    const up = events.filter((e) => e.phase === 'upload');
    assert.ok(dl.length >= 2 && up.length >= 2, JSON.stringify(events.slice(0, 3)));
    assert.equal(events[0].phase, 'download', 'bytes first');
    assert.ok(events.findLastIndex((e) => e.phase === 'upload') < events.findLastIndex((e) => e.phase === 'download'),
      'the tensors reach the GPU while the file arrives');
    assert.ok(events.every((e) => e.fromCache === fromCache));
    assert.ok(dl.every((e, i) => e.bytesTotal === size && (i === 0 || e.bytesDone >= dl[i - 1].bytesDone)));
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
  check(r.nf4.events, true);
  assert.equal(r.nf4.info[0].quant, 'nf4-dq');
  assert.deepEqual(r.nf4.info[0], r.nf4.info[1], 'fromUrl with an nf4-dq base gives the model fromGguf gives');
  assert.equal(r.nf4.loss[0], r.nf4.loss[1], 'nf4-dq: the same held-out loss, bit for bit');
  assert.deepEqual(r.nf4.tokens[0], r.nf4.tokens[1], 'nf4-dq: the same greedy tokens');
  assert.notEqual(r.nf4.loss[0], r.loss[2], 'the nf4-dq base is not the f32 one');
  assert.equal(r.forgot, 1);
  assert.deepEqual(r.cachedAfterForget, []);
  assert.equal(r.third.fromCache, false, 'after forgetCached the model is downloaded again');
  assert.equal(r.third.requests, 3, 'the explicit fetch for fromGguf, then the download after forgetting');
  assert.equal(r.bad?.kind, 'fetch', JSON.stringify(r.bad));
  assert.match(r.bad.message, /downloading \/models\/missing\.gguf: HTTP status 404/);
});

// Peak wasm memory (the growth of WebAssembly.Memory's buffer: it never shrinks) of one load of
// `bytes`, in a fresh page: `how` 'url' (streamed from the test server, not cached) or 'gguf'
// (the bytes copied into wasm memory whole).
async function growthInFreshPage(bytes, how, quant) {
  const page = await apiPage(env.browser, env.server, [], {});
  await page.route('**/models/wide.gguf', (route) => route.fulfill({ body: bytes, contentType: 'application/octet-stream' }));
  const growth = await page.evaluate(async ([how, quant]) => {
    const opts = { maxPositions: 64, quant };
    let mem0;
    let m;
    if (how === 'url') {
      mem0 = window.wasm.memory.buffer.byteLength;
      m = await window.q.Model.fromUrl(window.gpu, '/models/wide.gguf', { ...opts, cache: false });
    } else {
      const b = new Uint8Array(await (await fetch('/models/wide.gguf', { cache: 'no-store' })).arrayBuffer());
      mem0 = window.wasm.memory.buffer.byteLength;
      m = window.q.Model.fromGguf(window.gpu, 'wide.gguf', b, opts);
    }
    const g = window.wasm.memory.buffer.byteLength - mem0;
    m.free();
    return g;
  }, [how, quant]);
  await page.close();
  return growth;
}

test('Model.fromUrl holds one tensor at a time in wasm memory, not the f32 weights', { timeout: 600e3 }, async () => {
  const t0 = Date.now();
  const { bytes, projections, largest } = wideGguf();
  const mib = (b) => `${(b / 1048576).toFixed(1)} MiB`;
  const g = {};
  for (const quant of ['f32', 'nf4-dq']) {
    g[quant] = { url: await growthInFreshPage(bytes, 'url', quant), gguf: await growthInFreshPage(bytes, 'gguf', quant) };
    console.log(`# wide model (file ${mib(bytes.length)}, f32 projections ${mib(4 * projections)}, largest ${mib(4 * largest)} in f32), ${quant}: ` +
      `wasm memory growth fromUrl ${mib(g[quant].url)}, fromGguf ${mib(g[quant].gguf)} (${(g[quant].url / g[quant].gguf).toFixed(2)} of it); ${secs(t0)}`);
  }
  // Measured (SwiftShader, Chromium 156; file 18.1 MiB, f32 projections 36.0 MiB, largest 3 MiB
  // in f32): fromUrl 10.5 MiB (f32 base) and 7.4 MiB (nf4-dq), fromGguf 60.1 and 56.4 MiB: 0.17
  // and 0.13 of it. Bounds: below 1/4 of fromGguf's growth, and below half the f32 projections
  // (18 MiB, 1.7 and 2.4 x achieved); a load that kept the f32 projections on the host until the
  // end (as fromUrl did before: 44.6 MiB here) breaks both.
  for (const quant of ['f32', 'nf4-dq']) {
    assert.ok(g[quant].url < 0.25 * g[quant].gguf, `${quant}: fromUrl's growth ${g[quant].url} is not below 1/4 of fromGguf's ${g[quant].gguf}`);
    assert.ok(g[quant].url < 0.5 * 4 * projections, `${quant}: fromUrl's growth ${g[quant].url} is not below half the f32 projections ${4 * projections}`);
  }
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
