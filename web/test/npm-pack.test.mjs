// The npm package: `npm pack` makes a tarball that installs into an empty folder; a script there
// imports it, lists its exports, instantiates the wasm (Node has no WebGPU: Gpu.open() must
// reject with a clear message and kind "webgpu-missing"), parses a data set, and reports a bad
// one as an Error whose cause names the file and line. TypeScript (tsc --strict) checks a usage
// example against the package's types. Needs web/pkg (scripts/build-web.sh).
// Run: cd web && node --test test/npm-pack.test.mjs

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';

const run = promisify(execFile);
const WEB = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const pkg = JSON.parse(fs.readFileSync(path.join(WEB, 'package.json'), 'utf8'));
let tmp;
let app;

before(async () => {
  assert.ok(fs.existsSync(path.join(WEB, 'pkg/qlora_webgpu.js')), 'web/pkg is missing: run scripts/build-web.sh first');
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'qlora-npm-'));
  app = path.join(tmp, 'app');
  fs.mkdirSync(app);
});

after(() => {
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
});

test('npm pack makes a tarball that installs into an empty folder and imports', { timeout: 300e3 }, async () => {
  const { stdout } = await run('npm', ['pack', '--json', '--pack-destination', tmp], { cwd: WEB });
  const [info] = JSON.parse(stdout);
  const files = info.files.map((f) => f.path).sort();
  assert.deepEqual(files, ['README.md', 'package.json', 'pkg/qlora_webgpu.d.ts', 'pkg/qlora_webgpu.js', 'pkg/qlora_webgpu_bg.wasm', 'pkg/qlora_webgpu_bg.wasm.d.ts']);
  console.log(`# ${info.filename}: ${(info.size / 1048576).toFixed(2)} MiB packed, ${(info.unpackedSize / 1048576).toFixed(2)} MiB unpacked`);

  fs.writeFileSync(path.join(app, 'package.json'), JSON.stringify({ name: 'app', private: true, type: 'module' }));
  await run('npm', ['install', '--no-audit', '--no-fund', '--offline', path.join(tmp, info.filename)], { cwd: app });

  fs.writeFileSync(path.join(app, 'check.mjs'), `
import fs from 'node:fs';
import { createRequire } from 'node:module';
import * as q from 'qlora-webgpu';
const out = { exports: Object.keys(q).sort() };
// Node has no fetch of file URLs for init(): hand the wasm bytes to initSync.
const require = createRequire(import.meta.url);
const wasmPath = new URL('./node_modules/qlora-webgpu/pkg/qlora_webgpu_bg.wasm', import.meta.url);
q.initSync({ module: fs.readFileSync(wasmPath) });
out.version = q.version();
out.webgpuAvailable = q.webgpuAvailable();
try { await q.Gpu.open(); out.gpu = 'opened?'; } catch (e) { out.gpu = { message: e.message, kind: e.kind, isError: e instanceof Error }; }
const d = q.Dataset.fromJsonl('tiny.jsonl', '{"text": "one"}\\n\\n{"text": "two"}\\n');
out.dataset = { length: d.length, format: d.format };
try {
  q.Dataset.fromJsonl('bad.jsonl', '{"text": "ok"}\\n{"text": 3}\\n');
} catch (e) {
  out.bad = { message: e.message, cause: e.cause && e.cause.message, kind: e.cause && e.cause.kind, isError: e instanceof Error };
}
console.log(JSON.stringify(out));
`);
  const r = await run(process.execPath, ['check.mjs'], { cwd: app });
  const out = JSON.parse(r.stdout.trim().split('\n').pop());
  console.log(`# exports: ${out.exports.join(', ')}`);
  for (const name of ['default', 'initSync', 'Gpu', 'Model', 'Dataset', 'Training', 'Adapter', 'webgpuAvailable', 'version']) {
    assert.ok(out.exports.includes(name), `exports ${name}`);
  }
  assert.equal(out.version, pkg.version, 'the wasm reports the package version');
  assert.equal(out.webgpuAvailable, false);
  assert.equal(out.gpu.isError, true);
  assert.equal(out.gpu.kind, 'webgpu-missing');
  assert.match(out.gpu.message, /WebGPU is not available/);
  assert.deepEqual(out.dataset, { length: 2, format: 'text' });
  assert.equal(out.bad.isError, true);
  assert.match(out.bad.message, /reading the data set bad\.jsonl/);
  assert.match(out.bad.cause, /bad\.jsonl.*line 2/);
  assert.equal(out.bad.kind, 'format');
});

test('the package types check a usage example (tsc --strict)', { timeout: 300e3 }, async () => {
  const tsc = path.join(WEB, 'node_modules/typescript/bin/tsc');
  assert.ok(fs.existsSync(tsc), 'typescript is a devDependency: run npm ci in web/');
  fs.writeFileSync(path.join(app, 'usage.ts'), `
import init, { Gpu, Model, Dataset, Training, Adapter, type StepReport, type AdapterFiles, type TrainOptions } from 'qlora-webgpu';

export async function fineTune(files: Record<string, Uint8Array>, jsonl: string): Promise<AdapterFiles> {
  await init();
  const gpu = await Gpu.open();
  const name: string = gpu.info.name;
  const model = Model.fromHuggingFace(gpu, files, { quant: 'nf4', maxPositions: 512, name });
  const data = Dataset.fromJsonl('train.jsonl', jsonl);
  const options: TrainOptions = { rank: 8, alpha: 16, steps: 10, lr: 1e-3, batchSize: 2, maxLen: 256 };
  const run = new Training(model, data, options);
  const reports: StepReport[] = await run.train(undefined, (r: StepReport) => r.loss < 100);
  const last: number = reports[reports.length - 1].loss;
  const answer = await run.generate('Hello?', { maxNewTokens: 8 }, (t: string) => console.log(t, last));
  console.log(answer.text, answer.stopReason, model.info.vocab, run.stepCount, run.dataStats.trainExamples);
  const files2 = await run.exportAdapter();
  const again = Adapter.load(model, files2.adapterConfig, files2.adapterModel);
  await again.generate({ messages: [{ role: 'user', content: 'Hi' }] });
  return files2;
}
`);
  fs.writeFileSync(path.join(app, 'tsconfig.json'), JSON.stringify({
    compilerOptions: { strict: true, noEmit: true, target: 'es2022', module: 'nodenext', moduleResolution: 'nodenext', lib: ['esnext', 'dom'], skipLibCheck: false },
    files: ['usage.ts'],
  }));
  try {
    await run(process.execPath, [tsc, '-p', app], { cwd: app });
  } catch (e) {
    assert.fail(`tsc found type errors:\n${e.stdout}${e.stderr}`);
  }
});
