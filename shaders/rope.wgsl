// Rotary position embedding in Hugging Face's rotate-half layout (LlamaRotaryEmbedding +
// apply_rotary_pos_emb: out = x * cos + rotate_half(x) * sin, where the angle of element i and of
// element i + half is the same). For every row (b, t, h) of HS = 2 * half values and i < half,
// with c = cos[row0 + t, i] and s = sin[row0 + t, i]:
//   out[i]        = x[i] * c - x[i + half] * s
//   out[i + half] = x[i + half] * c + x[i] * s
// Backward (the transpose of a rotation is the rotation by the negative angle):
//   dx[i]        = dout[i] * c + dout[i + half] * s
//   dx[i + half] = dout[i + half] * c - dout[i] * s
// The tables are computed on the CPU (src/ops/rope.rs) exactly as transformers does in f32 and
// uploaded once; row0 lets one table of many positions serve a window of them (KV cache).
//
// Shapes: inp (x or dout) and out (out or dx): (B, T, H, HS); cos, sin: (R, half), R >= row0 + T.
// rope_forward, rope_backward: one invocation per (b, t, h, i < half) pair, N = B*T*H*half;
//   flat index = (wid.x + wid.y * 65535) * WG + lid, dispatched as groups_2d(ceil(N / WG)).
//   Both write out (=). Nothing is saved for backward but the tables.

const WG: u32 = 128u;

struct Params {
    n_pairs: u32,  // B * T * H * half
    t: u32,        // T
    h: u32,        // H
    half: u32,     // HS / 2
    row0: u32,     // first table row used (row of t = 0)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> inp: array<f32>;         // (B, T, H, HS) x or dout
@group(0) @binding(2) var<storage, read> cos_t: array<f32>;       // (R, half)
@group(0) @binding(3) var<storage, read> sin_t: array<f32>;       // (R, half)
@group(0) @binding(4) var<storage, read_write> out: array<f32>;   // (B, T, H, HS) out or dx

// Rotates pair p by the table angle times `sign` (+1 forward, -1 backward).
fn rotate(p: u32, sign: f32) {
    let half = params.half;
    let i = p % half;
    let row = p / half;                   // flat (b, t, h)
    let t = (row / params.h) % params.t;
    let tab = (params.row0 + t) * half + i;
    let c = cos_t[tab];
    let s = sign * sin_t[tab];
    let base = row * 2u * half + i;
    let x1 = inp[base];
    let x2 = inp[base + half];
    out[base] = x1 * c - x2 * s;
    out[base + half] = x2 * c + x1 * s;
}

@compute @workgroup_size(WG)
fn rope_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let p = flat_group(wid) * WG + lid;
    if (p >= params.n_pairs) { return; }
    rotate(p, 1.0);
}

@compute @workgroup_size(WG)
fn rope_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let p = flat_group(wid) * WG + lid;
    if (p >= params.n_pairs) { return; }
    rotate(p, -1.0);
}
