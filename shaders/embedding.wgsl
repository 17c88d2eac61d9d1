// Token embedding lookup (Hugging Face's nn.Embedding in LlamaModel.embed_tokens):
//   out[n, c] = table[ids[n], c]
// Backward (dout = dL/dout), a scatter-add of rows by id, done without atomics and in a fixed
// order: the host groups the token positions by id into a CSR (the ids are known on the host when
// the batch is built):
//   uniq (U)        the distinct ids, ascending
//   offsets (U + 1) positions of uniq[u] are pos[offsets[u] .. offsets[u + 1]], ascending
//   pos (N)         token positions grouped by id
//   dtable[uniq[u], c] = sum over k in offsets[u]..offsets[u+1] of dout[pos[k], c]
// Rows of ids that do not occur stay zero: dtable is cleared before the dispatch.
// Ids were checked against V on the host before any dispatch.
//
// Sharded and 16-bit tables: a table larger than one storage binding is stored as row shards
// (src/gpu/shards.rs), one dispatch per shard; a shard holds ids row0 .. row0 + v, and positions
// whose id lies outside it are left for the other shards' dispatches. A bf16 or f16 table (two
// values per u32 word, the element with the even index in the low half) is widened to f32 here:
//   bf16: bitcast<f32>(bits << 16)          f16: half_to_f32 (integer operations, exact)
// A Q8 table (a GGUF Q8_0 embedding, repacked: src/gpu/tensor.rs) holds signed 8-bit codes, four
// a word, then one f32 scale per 32 values from word `scales` on: f32(q) * scale, exact.
//
// embedding_forward:  one invocation per output element (N * C); ceil(N*C / WG) workgroups split
//                     over x and y past 65535 (flat workgroup index = wid.x + wid.y * 65535);
//                     writes out (=). Backward needs only the ids (kept on the host).
// embedding_forward16: as embedding_forward from a 16-bit or Q8 table (table16, kind 1 = bf16,
//                     2 = f16, 3 = Q8).
// embedding_widen16:  out (n, C) = f32 of rows row0 .. row0 + n of a 16-bit table (the lm_head
//                     chunk the output layer's f32 matmuls read); one invocation per element.
// embedding_backward: one workgroup per distinct id (U workgroups, split the same way), its
//                     invocations striding over the C columns; writes dtable rows of occurring
//                     ids (=), the others are zero from the clear.

const WG: u32 = 128u;

struct Params {
    n: u32,        // tokens (forward) / distinct ids U (backward) / rows to widen
    c: u32,        // embedding width C
    v: u32,        // rows of this table or shard
    row0: u32,     // first id this shard holds (forward); first row to widen (widen16)
    kind: u32,     // compact tables: 1 = bf16, 2 = f16, 3 = Q8
    scales: u32,   // Q8: word index of the first scale in table16
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> table: array<f32>;          // (V, C)
@group(0) @binding(2) var<storage, read> ids: array<u32>;            // (N) forward / uniq (U) backward
@group(0) @binding(3) var<storage, read> offsets: array<u32>;        // (U + 1)
@group(0) @binding(4) var<storage, read> pos: array<u32>;            // (N)
@group(0) @binding(5) var<storage, read> dout: array<f32>;           // (N, C)
@group(0) @binding(6) var<storage, read_write> out: array<f32>;      // (N, C) out / (V, C) dtable
@group(0) @binding(7) var<storage, read> table16: array<u32>;        // (V, C) 16-bit, 2 a word

// Element e of the 16-bit or Q8 table as f32.
fn load16(e: u32) -> f32 {
    if (params.kind == 3u) {
        let byte = (table16[e >> 2u] >> ((e & 3u) * 8u)) & 0xffu;
        let q = bitcast<i32>(byte << 24u) >> 24u;
        return f32(q) * bitcast<f32>(table16[params.scales + (e >> 5u)]);
    }
    let word = table16[e >> 1u];
    let bits = select(word & 0xffffu, word >> 16u, (e & 1u) == 1u);
    if (params.kind == 1u) {
        return bitcast<f32>(bits << 16u);
    }
    return half_to_f32(bits);
}

// IEEE half bits (low 16) as f32, exactly, with integer operations only (unpack2x16float needs a
// capability some backends lack).
fn half_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0u) {
        // zero or subnormal: m * 2^-24 (exact in f32)
        let v = f32(m) * 5.9604644775390625e-8;
        return bitcast<f32>(bitcast<u32>(v) | sign);
    }
    if (e == 31u) {
        return bitcast<f32>(sign | 0x7f800000u | (m << 13u));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

@compute @workgroup_size(WG)
fn embedding_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid) * WG + lid;
    if (i >= params.n * params.c) { return; }
    let row = i / params.c;
    let col = i - row * params.c;
    let id = ids[row];
    if (id < params.row0 || id - params.row0 >= params.v) { return; }
    out[i] = table[(id - params.row0) * params.c + col];
}

@compute @workgroup_size(WG)
fn embedding_forward16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid) * WG + lid;
    if (i >= params.n * params.c) { return; }
    let row = i / params.c;
    let col = i - row * params.c;
    let id = ids[row];
    if (id < params.row0 || id - params.row0 >= params.v) { return; }
    out[i] = load16((id - params.row0) * params.c + col);
}

@compute @workgroup_size(WG)
fn embedding_widen16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid) * WG + lid;
    if (i >= params.n * params.c) { return; }
    out[i] = load16(params.row0 * params.c + i);
}

@compute @workgroup_size(WG)
fn embedding_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let u = flat_group(wid);
    if (u >= params.n) { return; }
    let id = ids[u];
    if (id >= params.v) { return; }
    let start = offsets[u];
    let end = offsets[u + 1u];
    for (var col = lid; col < params.c; col = col + WG) {
        var acc = 0.0;
        for (var k = start; k < end; k = k + 1u) {
            acc = acc + dout[pos[k] * params.c + col];
        }
        out[id * params.c + col] = acc;
    }
}
