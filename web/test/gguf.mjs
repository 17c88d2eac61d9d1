// Writes a GGUF file (version 3, little-endian) of a small Llama-family Hugging Face folder, as
// llama.cpp's convert_hf_to_gguf.py lays it out, for the browser test's `Model.fromGguf` check:
// BF16 tensors copied bit for bit from model.safetensors under llama.cpp's names (attn_q and
// attn_k rows permuted as convert_hf_to_gguf's `permute` does, no output.weight when the
// embeddings are tied), the llama.* hyperparameters from config.json, and the byte-level BPE
// tokenizer from tokenizer.json (tokens by id, merges as "a b", special added tokens as control
// tokens) with the chat template of chat_template.jinja. Written here, not by the library (which
// only reads GGUF), so the reader is checked against an independent writer.

import fs from 'node:fs';
import path from 'node:path';

const ALIGNMENT = 32;
const GGML_BF16 = 30;
const T = { u32: 4, i32: 5, f32: 6, bool: 7, str: 8, arr: 9 };

class Writer {
  constructor() { this.parts = []; this.len = 0; }
  push(b) { this.parts.push(b); this.len += b.length; }
  u32(v) { const b = Buffer.alloc(4); b.writeUInt32LE(v); this.push(b); }
  i32(v) { const b = Buffer.alloc(4); b.writeInt32LE(v); this.push(b); }
  u64(v) { const b = Buffer.alloc(8); b.writeBigUInt64LE(BigInt(v)); this.push(b); }
  f32(v) { const b = Buffer.alloc(4); b.writeFloatLE(v); this.push(b); }
  str(s) { const b = Buffer.from(s, 'utf8'); this.u64(b.length); this.push(b); }
  /** A typed value: [type, value] with type a key of T; arrays are ['arr', elemType, values]. */
  value(type, v, elem) {
    switch (type) {
      case 'u32': return this.u32(v);
      case 'i32': return this.i32(v);
      case 'f32': return this.f32(v);
      case 'bool': return this.push(Buffer.from([v ? 1 : 0]));
      case 'str': return this.str(v);
      case 'arr':
        this.u32(T[elem]);
        this.u64(v.length);
        for (const x of v) this.value(elem, x);
        return undefined;
      default: throw new Error(`gguf: unknown type ${type}`);
    }
  }
  kv(key, type, v, elem) { this.str(key); this.u32(T[type]); this.value(type, v, elem); }
  pad() { const n = (ALIGNMENT - (this.len % ALIGNMENT)) % ALIGNMENT; if (n) this.push(Buffer.alloc(n)); }
  bytes() { return Buffer.concat(this.parts); }
}

/** The raw tensors of a safetensors file: Map name -> {dtype, shape, bytes}. */
function readRawSafetensors(buf) {
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8'));
  const out = new Map();
  for (const [name, t] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const [a, b] = t.data_offsets;
    out.set(name, { dtype: t.dtype, shape: t.shape, bytes: buf.subarray(8 + n + a, 8 + n + b) });
  }
  return out;
}

/**
 * convert_hf_to_gguf's permute for a (rows, cols) row-major tensor (as bytes):
 * w.reshape(heads, 2, rows / heads / 2, cols).swapaxes(1, 2), so GGUF row h*hd + 2j + s holds
 * Hugging Face row h*hd + s*half + j.
 */
function permuteRows(bytes, rows, heads) {
  const rowBytes = bytes.length / rows;
  const hd = rows / heads;
  const half = hd / 2;
  const out = Buffer.alloc(bytes.length);
  for (let h = 0; h < heads; h++) {
    for (let j = 0; j < half; j++) {
      for (let s = 0; s < 2; s++) {
        const dst = h * hd + 2 * j + s;
        const src = h * hd + s * half + j;
        bytes.copy(out, dst * rowBytes, src * rowBytes, (src + 1) * rowBytes);
      }
    }
  }
  return out;
}

const PROJ = {
  'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k', 'self_attn.v_proj': 'attn_v', 'self_attn.o_proj': 'attn_output',
  'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up', 'mlp.down_proj': 'ffn_down',
  input_layernorm: 'attn_norm', post_attention_layernorm: 'ffn_norm',
};

function ggufName(hf) {
  if (hf === 'model.embed_tokens.weight') return 'token_embd.weight';
  if (hf === 'model.norm.weight') return 'output_norm.weight';
  if (hf === 'lm_head.weight') return 'output.weight';
  const m = /^model\.layers\.(\d+)\.(.+)\.weight$/.exec(hf);
  if (!m || !PROJ[m[2]]) throw new Error(`gguf: no llama.cpp name for ${hf}`);
  return `blk.${m[1]}.${PROJ[m[2]]}.weight`;
}

/** The GGUF bytes of the Hugging Face folder `dir` (BF16 safetensors, byte-level BPE tokenizer). */
export function ggufFromHfFolder(dir) {
  const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'));
  const tok = JSON.parse(fs.readFileSync(path.join(dir, 'tokenizer.json'), 'utf8'));
  const template = fs.readFileSync(path.join(dir, 'chat_template.jinja'), 'utf8');
  const tensors = readRawSafetensors(fs.readFileSync(path.join(dir, 'model.safetensors')));
  const headDim = cfg.head_dim ?? cfg.hidden_size / cfg.num_attention_heads;

  const vocab = tok.model.vocab;
  const tokens = new Array(cfg.vocab_size);
  for (const [s, id] of Object.entries(vocab)) tokens[id] = s;
  const types = new Array(cfg.vocab_size).fill(1);
  for (const a of tok.added_tokens) {
    tokens[a.id] = a.content;
    if (a.special) types[a.id] = 3;
  }
  if (tokens.some((t) => t === undefined)) throw new Error('gguf: the vocabulary has holes');
  const merges = tok.model.merges.map((m) => (Array.isArray(m) ? m.join(' ') : m));

  const names = [...tensors.keys()].filter((n) => !(cfg.tie_word_embeddings && n === 'lm_head.weight')).sort();
  const kvs = [
    ['general.architecture', 'str', 'llama'],
    ['general.name', 'str', 'tiny-llama'],
    ['general.alignment', 'u32', ALIGNMENT],
    ['llama.block_count', 'u32', cfg.num_hidden_layers],
    ['llama.context_length', 'u32', cfg.max_position_embeddings],
    ['llama.embedding_length', 'u32', cfg.hidden_size],
    ['llama.feed_forward_length', 'u32', cfg.intermediate_size],
    ['llama.attention.head_count', 'u32', cfg.num_attention_heads],
    ['llama.attention.head_count_kv', 'u32', cfg.num_key_value_heads],
    ['llama.attention.key_length', 'u32', headDim],
    ['llama.attention.value_length', 'u32', headDim],
    ['llama.rope.dimension_count', 'u32', headDim],
    ['llama.rope.freq_base', 'f32', cfg.rope_parameters?.rope_theta ?? cfg.rope_theta],
    ['llama.attention.layer_norm_rms_epsilon', 'f32', cfg.rms_norm_eps],
    ['llama.vocab_size', 'u32', cfg.vocab_size],
    ['tokenizer.ggml.model', 'str', 'gpt2'],
    ['tokenizer.ggml.pre', 'str', 'smollm'],
    ['tokenizer.ggml.tokens', 'arr', tokens, 'str'],
    ['tokenizer.ggml.token_type', 'arr', types, 'i32'],
    ['tokenizer.ggml.merges', 'arr', merges, 'str'],
    ['tokenizer.ggml.bos_token_id', 'u32', cfg.bos_token_id],
    ['tokenizer.ggml.eos_token_id', 'u32', cfg.eos_token_id],
    ['tokenizer.ggml.unknown_token_id', 'u32', 0],
    ['tokenizer.ggml.padding_token_id', 'u32', cfg.pad_token_id],
    ['tokenizer.ggml.add_bos_token', 'bool', false],
    ['tokenizer.chat_template', 'str', template],
  ];
  const entries = names.map((hf) => {
    const t = tensors.get(hf);
    if (t.dtype !== 'BF16') throw new Error(`gguf: ${hf} is ${t.dtype}; this writer copies BF16 tensors`);
    let bytes = t.bytes;
    if (hf.endsWith('self_attn.q_proj.weight')) bytes = permuteRows(bytes, t.shape[0], cfg.num_attention_heads);
    if (hf.endsWith('self_attn.k_proj.weight')) bytes = permuteRows(bytes, t.shape[0], cfg.num_key_value_heads);
    return { name: ggufName(hf), shape: t.shape, bytes };
  });
  return writeBf16Gguf(kvs, entries);
}

/** The GGUF file of metadata `kvs` ([key, type, value, elemType]) and BF16 tensors `entries`
 * ({name, shape (PyTorch order), bytes}). */
function writeBf16Gguf(kvs, entries) {
  const w = new Writer();
  w.push(Buffer.from('GGUF', 'latin1'));
  w.u32(3);
  w.u64(entries.length);
  w.u64(kvs.length);
  for (const [k, t, v, e] of kvs) w.kv(k, t, v, e);

  const datas = [];
  let offset = 0;
  for (const { name, shape, bytes } of entries) {
    w.str(name);
    w.u32(shape.length);
    for (const d of [...shape].reverse()) w.u64(d); // ggml order: the row length first
    w.u32(GGML_BF16);
    w.u64(offset);
    datas.push(bytes);
    offset += Math.ceil(bytes.length / ALIGNMENT) * ALIGNMENT;
  }
  w.pad();
  for (const b of datas) {
    w.push(b);
    w.pad();
  }
  return w.bytes();
}

/** A projection-heavy Llama GGUF (random BF16 weights, `layers` layers of hidden x inter MLPs, a
 * 64-token byte-level vocabulary over lowercase letters), for measuring what a load holds:
 * its projections take 4 x `projections` bytes in f32 (returned with the bytes). */
export function wideGguf({ layers = 3, hidden = 512, inter = 1536, heads = 8, kvHeads = 4, seed = 7 } = {}) {
  const headDim = hidden / heads;
  const tokens = ['<s>', '</s>', '<unk>', 'Ġ', ...'abcdefghijklmnopqrstuvwxyz'];
  while (tokens.length < 64) tokens.push(`x${tokens.length}`);
  const kvs = [
    ['general.architecture', 'str', 'llama'],
    ['llama.block_count', 'u32', layers],
    ['llama.context_length', 'u32', 512],
    ['llama.embedding_length', 'u32', hidden],
    ['llama.feed_forward_length', 'u32', inter],
    ['llama.attention.head_count', 'u32', heads],
    ['llama.attention.head_count_kv', 'u32', kvHeads],
    ['llama.rope.freq_base', 'f32', 10000],
    ['llama.attention.layer_norm_rms_epsilon', 'f32', 1e-5],
    ['tokenizer.ggml.model', 'str', 'gpt2'],
    ['tokenizer.ggml.pre', 'str', 'smollm'],
    ['tokenizer.ggml.tokens', 'arr', tokens, 'str'],
    ['tokenizer.ggml.token_type', 'arr', tokens.map((_, i) => (i < 3 ? 3 : 1)), 'i32'],
    ['tokenizer.ggml.merges', 'arr', [], 'str'],
    ['tokenizer.ggml.bos_token_id', 'u32', 0],
    ['tokenizer.ggml.eos_token_id', 'u32', 1],
  ];
  let state = seed >>> 0 || 1;
  const bf16 = (n, scale) => {
    const b = Buffer.alloc(2 * n);
    const f = new Float32Array(1);
    const u = new Uint32Array(f.buffer);
    for (let i = 0; i < n; i++) {
      state ^= state << 13; state >>>= 0;
      state ^= state >>> 17;
      state ^= state << 5; state >>>= 0;
      f[0] = scale * (state / 2 ** 32 * 2 - 1);
      b.writeUInt16LE(u[0] >>> 16, 2 * i);
    }
    return b;
  };
  const entries = [{ name: 'token_embd.weight', shape: [tokens.length, hidden], bytes: bf16(tokens.length * hidden, 1) }];
  const q = heads * headDim;
  const kv = kvHeads * headDim;
  let projections = 0;
  for (let i = 0; i < layers; i++) {
    entries.push({ name: `blk.${i}.attn_norm.weight`, shape: [hidden], bytes: bf16(hidden, 1) });
    for (const [n, shape] of [['attn_q', [q, hidden]], ['attn_k', [kv, hidden]], ['attn_v', [kv, hidden]], ['attn_output', [hidden, q]],
      ['ffn_gate', [inter, hidden]], ['ffn_up', [inter, hidden]], ['ffn_down', [hidden, inter]]]) {
      entries.push({ name: `blk.${i}.${n}.weight`, shape, bytes: bf16(shape[0] * shape[1], 0.05) });
      projections += shape[0] * shape[1];
    }
    entries.push({ name: `blk.${i}.ffn_norm.weight`, shape: [hidden], bytes: bf16(hidden, 1) });
  }
  entries.push({ name: 'output_norm.weight', shape: [hidden], bytes: bf16(hidden, 1) });
  return { bytes: writeBf16Gguf(kvs, entries), projections, largest: Math.max(inter * hidden, q * hidden) };
}
