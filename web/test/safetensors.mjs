// A minimal safetensors reader for the tests (F32 tensors): an 8-byte little-endian header
// length, a JSON header {name: {dtype, shape, data_offsets}} (plus __metadata__), then the data.

/** Parses `bytes` (Uint8Array / Buffer): Map name -> {dtype, shape, data: Float32Array}. */
export function readSafetensors(bytes) {
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (buf.length < 8) throw new Error(`safetensors: ${buf.length} bytes, shorter than the 8-byte header length`);
  const n = Number(buf.readBigUInt64LE(0));
  if (8 + n > buf.length) throw new Error(`safetensors: header of ${n} bytes runs past the end (${buf.length} bytes)`);
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8'));
  const base = 8 + n;
  const out = new Map();
  for (const [name, t] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const [a, b] = t.data_offsets;
    if (t.dtype !== 'F32') throw new Error(`safetensors: ${name} is ${t.dtype}; this reader takes F32 only`);
    const count = t.shape.reduce((x, y) => x * y, 1);
    if (b - a !== count * 4 || base + b > buf.length) throw new Error(`safetensors: ${name}: offsets ${a}..${b} do not fit shape ${t.shape}`);
    const copy = new Uint8Array(buf.subarray(base + a, base + b));
    out.set(name, { dtype: t.dtype, shape: t.shape, data: new Float32Array(copy.buffer) });
  }
  return out;
}

/**
 * Compares two adapters tensor by tensor: the same keys and shapes (else throws), and per tensor
 * the relative error ||a - b|| / ||b|| (L2, b the reference: the project's definition, as in
 * tests/common::rel_err) and, for information, max |a - b| / max |b|. Returns
 * {keys, worstL2, worstL2Key, worstMax, worstMaxKey, failures} (failures: tensors over `rtol`
 * in the L2 sense).
 */
export function compareAdapters(got, ref, rtol) {
  const gk = [...got.keys()].sort();
  const rk = [...ref.keys()].sort();
  if (JSON.stringify(gk) !== JSON.stringify(rk)) {
    const missing = rk.filter((k) => !got.has(k));
    const extra = gk.filter((k) => !ref.has(k));
    throw new Error(`adapter keys differ: missing ${JSON.stringify(missing)}, unexpected ${JSON.stringify(extra)}`);
  }
  const r = { keys: rk.length, worstL2: 0, worstL2Key: null, worstMax: 0, worstMaxKey: null, failures: [] };
  for (const k of rk) {
    const a = got.get(k);
    const b = ref.get(k);
    if (JSON.stringify(a.shape) !== JSON.stringify(b.shape)) throw new Error(`${k}: shape ${a.shape} vs ${b.shape}`);
    let num = 0, den = 0, maxDiff = 0, maxRef = 0;
    for (let i = 0; i < b.data.length; i++) {
      const d = a.data[i] - b.data[i];
      num += d * d;
      den += b.data[i] * b.data[i];
      maxDiff = Math.max(maxDiff, Math.abs(d));
      maxRef = Math.max(maxRef, Math.abs(b.data[i]));
    }
    const l2 = den > 0 ? Math.sqrt(num / den) : Math.sqrt(num);
    const mx = maxRef > 0 ? maxDiff / maxRef : maxDiff;
    if (!(l2 <= rtol)) r.failures.push(`${k}: relative L2 error ${l2.toExponential(3)} (max |diff| ${maxDiff.toExponential(3)}, max |ref| ${maxRef.toExponential(3)})`);
    if (!(l2 <= r.worstL2)) { r.worstL2 = l2; r.worstL2Key = k; }
    if (!(mx <= r.worstMax)) { r.worstMax = mx; r.worstMaxKey = k; }
  }
  return r;
}
