// Stop in each phase of the demo page: headless Chromium (SwiftShader) runs the tiny test model
// (tests/fixtures/tiny-llama/model) and presses Stop the moment the page enters a phase (a
// setter on window.demo.phase, installed by the test, clicks the button), then checks what the
// page says and keeps: an answer cut after its current token, a held-out evaluation abandoned,
// training ended after the step that ran, the adapter of the steps done offered for download
// (none before the first step), the Stop button disabled again and Train enabled. Phases too
// short to click in are held open by the page's test hook (window.demo.testHold: 'reading',
// 'loading', 'export') until Stop arrives. First, a model download from a URL (served slowly by the test
// server: 64 KiB every 50 ms) is stopped after its first MiB: abandoned at once, nothing cached,
// the page loads from files right after.
// Run: cd web && node --test test/stop.test.mjs

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { launch, MODEL_DIR, MODEL_FILES, REPO_ROOT } from './page.mjs';
import { ggufFromHfFolder } from './gguf.mjs';

const STEPS = 3;

let server;
let browser;

before(async () => {
  ({ server, browser } = await launch());
});

after(async () => {
  await browser?.close();
  server?.server.close();
});

/** What each phase's Stop must leave: the status text, steps done, whether an adapter is offered, the answers. */
const CASES = [
  { phase: 'reading', hold: 'reading', status: /^Stopped while reading the model files: nothing was loaded\.$/, steps: 0, adapter: false, before: 'empty', after: 'empty' },
  { phase: 'loading', hold: 'loading', status: /^Stopped after loading the model \(it stays loaded\): nothing was answered or trained\.$/, steps: 0, adapter: false, before: 'empty', after: 'empty' },
  { phase: 'answer-before', status: /^Stopped while the base model answered: its answer so far is shown; nothing was trained\.$/, steps: 0, adapter: false, before: 'cut', after: 'empty' },
  { phase: 'eval-before', status: /^Stopped while measuring the held-out loss before training \(abandoned\); nothing was trained\.$/, steps: 0, adapter: false, before: 'whole', after: 'empty' },
  { phase: 'training', status: new RegExp(`^Stopped after step 1 of ${STEPS} \\(the step running then was finished\\): the adapter of the steps done is offered below; the held-out loss and the answer after training were skipped\\.$`), steps: 1, adapter: true, before: 'whole', after: 'empty' },
  { phase: 'eval-after', status: /^Stopped while measuring the held-out loss after training \(abandoned\): the trained adapter is offered below; the answer after training was skipped\.$/, steps: STEPS, adapter: true, before: 'whole', after: 'empty' },
  { phase: 'export', hold: 'export', status: new RegExp(`^Stopped while writing the adapter files: the writing was finished, so the adapter after step ${STEPS} of ${STEPS} is offered below \\(the run itself was complete\\)\\.$`), steps: STEPS, adapter: true, before: 'whole', after: 'whole' },
  { phase: 'answer-after', status: /^Stopped while the trained model answered: its answer so far is shown, the trained adapter is offered below\.$/, steps: STEPS, adapter: true, before: 'whole', after: 'cut' },
];

test('Stop in each phase of the demo keeps what is complete and says so', { timeout: 20 * 60e3 }, async () => {
  const lines = [];
  const page = await browser.newPage();
  page.on('console', (m) => lines.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => lines.push(`[pageerror] ${e.message}`));
  await page.goto(`${server.url}/web/`);
  const wait = async (phases, timeout) => {
    await page.waitForFunction((ps) => window.demo && (ps.includes(window.demo.phase) || window.demo.error), phases, { timeout, polling: 100 })
      .catch(async () => { throw new Error(`page did not reach ${phases} (status: ${await page.textContent('#status')}); log:\n${lines.join('\n')}`); });
    const err = await page.evaluate(() => window.demo.error);
    if (err) throw new Error(`the page shows an error:\n${err.map((c) => c.message).join('\n  caused by: ')}\nlog:\n${lines.join('\n')}`);
  };
  await wait(['ready'], 120e3);

  // Stop while the model downloads from a URL: the test server sends the GGUF slowly (64 KiB
  // every 50 ms, about 10 s for the tiny model) and counts what it sent.
  const gguf = ggufFromHfFolder(MODEL_DIR);
  const sent = { bytes: 0, closedEarly: false };
  const [serve] = server.server.listeners('request');
  server.server.removeAllListeners('request');
  server.server.on('request', (req, res) => {
    if (!req.url.startsWith('/slow/')) return serve(req, res);
    res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': gguf.length, 'Cache-Control': 'no-store' });
    const timer = setInterval(() => {
      const piece = gguf.subarray(sent.bytes, sent.bytes + 65536);
      sent.bytes += piece.length;
      res.write(piece);
      if (sent.bytes >= gguf.length) { clearInterval(timer); res.end(); }
    }, 50);
    res.on('close', () => { if (sent.bytes < gguf.length) sent.closedEarly = true; clearInterval(timer); });
  });
  await page.fill('#model-url', '/slow/tiny-llama.gguf');
  await page.click('#train');
  await page.waitForFunction(() => (window.demo.loadEvents || []).some((e) => e.phase === 'download' && e.bytesDone >= 1 << 20) || window.demo.error, null, { timeout: 120e3, polling: 50 });
  await page.click('#stop');
  await wait(['stopped'], 120e3);
  const dl = await page.evaluate(async () => ({
    status: document.getElementById('status').textContent, events: window.demo.loadEvents,
    cached: (await (await caches.open('qlora-webgpu-models')).keys()).length,
    stopDisabled: document.getElementById('stop').disabled, trainDisabled: document.getElementById('train').disabled,
  }));
  await new Promise((r) => setTimeout(r, 500));
  const last = dl.events.filter((e) => e.phase === 'download').at(-1);
  console.log(`# Stop while downloading: "${dl.status}" (the page saw ${last.bytesDone} of ${gguf.length} bytes; the server sent ${sent.bytes}, connection closed early: ${sent.closedEarly})`);
  assert.match(dl.status, /^Stopped while downloading the model: the download was abandoned \(nothing was loaded or cached\)\. Train loads it again\.$/);
  assert.ok(last.bytesDone < gguf.length && !dl.events.some((e) => e.phase === 'upload'), 'the download was abandoned before its end');
  assert.ok(sent.closedEarly && sent.bytes < gguf.length, 'the browser closed the connection: the download stopped');
  assert.equal(dl.cached, 0, 'nothing is cached');
  assert.ok(dl.stopDisabled && !dl.trainDisabled, 'Stop disabled, Train enabled');
  await page.fill('#model-url', '');
  // The page is ready to load again: the whole run below loads the model from files.

  await page.setInputFiles('#model-files', MODEL_FILES.map((f) => path.join(MODEL_DIR, f)));
  const form = { '#rank': '4', '#alpha': '8', '#steps': String(STEPS), '#lr': '0.005', '#batch': '2', '#max-len': '48', '#seed': '0', '#max-new': '24' };
  for (const [sel, v] of Object.entries(form)) await page.fill(sel, v);

  // A whole run first: the answers a cut one is a prefix of.
  await page.click('#train');
  await wait(['done'], 10 * 60e3);
  const whole = await page.evaluate(() => window.demo.answers);
  assert.ok(whole.before.length > 4 && whole.after.length > 4, 'the whole run answers');

  for (const c of CASES) {
    // Stop is pressed as soon as the page enters the phase.
    await page.evaluate(({ phase, hold }) => {
      let v = window.demo.phase;
      Object.defineProperty(window.demo, 'phase', {
        configurable: true,
        get: () => v,
        set: (x) => {
          v = x;
          if (x === phase && !window.demo.stopClicked) {
            window.demo.stopClicked = true;
            setTimeout(() => document.getElementById('stop').click(), 0);
          }
        },
      });
      window.demo.stopClicked = false;
      window.demo.testHold = hold;
    }, { phase: c.phase, hold: c.hold || null });
    await page.click('#train');
    // The previous run's phase is still 'stopped' or 'done': wait for this run's Stop to be pressed first.
    await page.waitForFunction(() => window.demo.stopClicked || window.demo.error, null, { timeout: 5 * 60e3, polling: 100 })
      .catch(async () => { throw new Error(`${c.phase}: the page never entered the phase (status: ${await page.textContent('#status')})`); });
    await wait(['stopped', 'done'], 10 * 60e3);
    const s = await page.evaluate(() => ({
      phase: window.demo.phase, status: document.getElementById('status').textContent, steps: window.demo.losses.length,
      answers: window.demo.answers, adapter: !!document.getElementById('download-model'), stopped: window.demo.stopClicked,
      stopDisabled: document.getElementById('stop').disabled, trainDisabled: document.getElementById('train').disabled,
      heldOut: window.demo.heldOut,
    }));
    console.log(`# Stop in ${c.phase}: "${s.status}" (steps ${s.steps}, adapter ${s.adapter}, answers ${JSON.stringify(s.answers)})`);
    assert.ok(s.stopped, `${c.phase}: the page entered the phase and Stop was clicked`);
    assert.equal(s.phase, 'stopped', `${c.phase}: the run ended as stopped`);
    assert.match(s.status, c.status);
    assert.equal(s.steps, c.steps, `${c.phase}: steps done`);
    assert.equal(s.adapter, c.adapter, `${c.phase}: an adapter is offered iff a step was done`);
    assert.ok(s.stopDisabled && !s.trainDisabled, `${c.phase}: Stop is disabled and Train enabled once nothing runs`);
    for (const which of ['before', 'after']) {
      const got = s.answers[which];
      if (c[which] === 'empty') assert.equal(got, '', `${c.phase}: no ${which} answer`);
      if (c[which] === 'whole') assert.equal(got, whole[which], `${c.phase}: the whole ${which} answer`);
      if (c[which] === 'cut') {
        assert.ok(got.length > 0 && got.length < whole[which].length, `${c.phase}: the ${which} answer is cut (${got.length} of ${whole[which].length} characters)`);
        assert.ok(whole[which].startsWith(got), `${c.phase}: the cut ${which} answer is a prefix of the whole one`);
      }
    }
    if (c.phase === 'eval-before') assert.equal(s.heldOut?.before ?? null, null, 'an abandoned evaluation shows no held-out loss');
  }
  await page.evaluate(() => { window.demo.testHold = null; });
  await page.close();
});
