// Outside CI (docs/checks.md): the wasm memory Model.fromUrl (streamed) and Model.fromGguf (the
// whole file copied in) grow by when loading SmolLM2-135M-Instruct's Q4_1 GGUF (f32 and nf4-dq
// bases), each in a fresh page. Run: cd web && QLORA_SMOLLM2_GGUF=/path/to.gguf node test/memory_smollm2.mjs
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { launch, apiPage, REPO_ROOT } from './page.mjs';

const FILE = process.env.QLORA_SMOLLM2_GGUF;
assert.ok(FILE && fs.existsSync(FILE), 'set QLORA_SMOLLM2_GGUF to the GGUF file (bash scripts/fetch-smollm2.sh)');
// Served by the test server from target/ (ignored by git).
const link = path.join(REPO_ROOT, 'target/web-test/smollm2.gguf');
fs.mkdirSync(path.dirname(link), { recursive: true });
fs.rmSync(link, { force: true });
fs.symlinkSync(path.resolve(FILE), link);
const env = await launch();
const lines = [];
const out = {};
for (const [how, quant] of [['url', 'f32'], ['gguf', 'f32'], ['url', 'nf4-dq'], ['gguf', 'nf4-dq']]) {
  const page = await apiPage(env.browser, env.server, lines, {});

  out[`${how} ${quant}`] = await page.evaluate(async ([how, quant]) => {
    const t0 = performance.now();
    let growth;
    if (how === 'url') {
      const mem0 = window.wasm.memory.buffer.byteLength;
      const m = await window.q.Model.fromUrl(window.gpu, '/target/web-test/smollm2.gguf', { cache: false, maxPositions: 256, quant });
      growth = window.wasm.memory.buffer.byteLength - mem0;
      m.free();
    } else {
      const bytes = new Uint8Array(await (await fetch('/target/web-test/smollm2.gguf')).arrayBuffer());
      const mem0 = window.wasm.memory.buffer.byteLength;
      const m = window.q.Model.fromGguf(window.gpu, 'smollm2.gguf', bytes, { maxPositions: 256, quant });
      growth = window.wasm.memory.buffer.byteLength - mem0;
      m.free();
    }
    return { growth, ms: performance.now() - t0 };
  }, [how, quant]);
  await page.close();
}
await env.close();
fs.rmSync(link, { force: true });
const mib = (b) => (b / 1048576).toFixed(1);
const size = fs.statSync(FILE).size;
for (const quant of ['f32', 'nf4-dq']) {
  const [u, g] = [out[`url ${quant}`], out[`gguf ${quant}`]];
  console.log(`SmolLM2 Q4_1 (${mib(size)} MiB), ${quant}: wasm memory growth fromUrl ${mib(u.growth)} MiB (${(u.ms / 1000).toFixed(1)} s), ` +
    `fromGguf ${mib(g.growth)} MiB (${(g.ms / 1000).toFixed(1)} s); fromUrl / fromGguf ${(u.growth / g.growth).toFixed(2)}`);
}
