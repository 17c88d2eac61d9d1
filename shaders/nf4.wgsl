// NF4 (bitsandbytes layout) on the device: dequantization, and the frozen NF4 linear layer
// y = x · W^T with its input gradient dx = dy · W, W decoded inside the matmul (fused).
//
// Weight W (N, K) = (out, in), n = N*K elements flattened row-major. `packed` holds bitsandbytes'
// byte stream (two codes a byte, element 2i in the high nibble of byte i) four bytes a u32 word,
// little-endian, so word e holds elements 8e .. 8e+7:
//   element 8e + 2j = (packed[e] >> (8j + 4)) & 15,   element 8e + 2j + 1 = (packed[e] >> 8j) & 15.
// Blocks run over the flat index (they may span rows): element i has scale absmax[i / blocksize].
// Block sizes are powers of two >= 32, so the eight elements of a word share one block.
//   W[i] = NF4[q[i]] * absmax[i / blocksize]                      (one f32 multiply, as the CPU)
// `stats` holds u32 words: the scales, then from word params.tables_at the code tables as f32
// bits: NF4 (16 words, src/quant/nf4.rs NF4_CODE) and, for double quantization, DYN (256 words,
// the 8-bit dynamic map, dynamic_map() there).
//   plain (params.dq == 0):  stats[b] = bits of the f32 absmax of block b            (nblocks)
//   double quantization:     8-bit codes of the blocks, four a word little-endian     (ceil(nblocks/4))
//                            then from word params.nested_at the f32 bits of nested_absmax
//     absmax[b] = DYN[code8[b]] * nested_absmax[b >> nested_shift] + offset
//   an f32 multiply, then an f32 add, as the CPU. The product is multiplied by params.one (1.0,
//   unknown to the compiler) before the add: if a backend contracts the add into a fused
//   multiply-add, only that exact `p * 1` can fuse, so the result stays round(round(a*b) + c).
// The tables live in the buffer rather than in WGSL `const` arrays: naga's SPIR-V backend stores
// a whole const array into a temporary at every access with a runtime index, which made the
// kernels 5 to 20 times slower on lavapipe.
//
// nf4_dequantize: out (N, K) = W, one invocation per word (eight elements); workgroups of WG*WG,
//   dispatch groups_2d(ceil(words / (WG*WG))); out written (=) as vec4s (past n: the padding of
//   the last vec4, inside the binding).
// nf4_linear_forward: y (M, N) = x (M, K) · W^T, no dequantized copy of W. One invocation
//   computes a BM x BN block of y (BM rows of x, BN rows of W) in registers, reading x as vec4
//   and W a word (eight elements along K) at a time, decoded in registers; workgroup WG x WG;
//   dispatch (ceil(N / (WG*BN)), ceil(M / (WG*BM)), 1). Needs K % 8 == 0 (every row of W starts
//   a word). y written (=). Each element of W is decoded ceil(M / BM) times.
// nf4_linear_backward_input: dx (M, K) = dy (M, N) · W, the same scheme. One invocation computes
//   BM rows x 8 columns of dx (one word of each row of W), reading dy as vec4 along N; workgroup
//   WG x WG; dispatch (ceil(K / (WG*8)), ceil(M / (WG*BM)), 1). Needs K % 8 == 0 and N % 4 == 0.
//   dx written (=). W is frozen: no weight gradient, and nothing is saved but the weight itself.
// nf4_linear_forward_rows: the same y for M <= MAX_ROWS (decode steps, one token at a time):
//   one invocation per row n of W decodes that row once, a word at a time, and accumulates all
//   M rows of y; workgroup WG*WG along n, dispatch groups_2d(ceil(N / (WG*WG))). Needs K % 8 == 0.
//   y written (=). (The blocked kernel above computes BM rows per invocation, so at M = 1 it
//   did eight times the work.)
// Rows past the M or N edge read a clamped, valid row (no branch in the inner loops); stores are
// guarded.

// Workgroup side: WG x WG invocations (nf4_dequantize: WG*WG in one dimension).
const WG: u32 = 8u;
// Register block of the fused kernels: rows of x (dy) per invocation, and rows of W (forward).
const BM: u32 = 8u;
const BN: u32 = 8u;
// Most rows of x the row kernel takes.
const MAX_ROWS: u32 = 8u;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    // Element count N*K of W.
    numel: u32,
    // log2(blocksize).
    block_shift: u32,
    // 1 when the scales are double-quantized.
    dq: u32,
    // log2(nested_blocksize), and the word where nested_absmax starts in `stats` (dq only).
    nested_shift: u32,
    nested_at: u32,
    // Double-quantization offset (dq only).
    offset: f32,
    // Always 1.0 (see the header).
    one: f32,
    // Word of `stats` where the NF4 table starts (the dynamic map follows it).
    tables_at: u32,
    // nf4_dequantize: first word of `packed` to decode (rows r0.. of W with r0*K % 8 == 0, for
    // a weight whose f32 copy exceeds one storage binding); numel is then the chunk's count.
    word0: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> packed: array<u32>;            // (ceil(N*K / 8)) words
@group(0) @binding(2) var<storage, read> stats: array<u32>;             // scales, tables (see above)
@group(0) @binding(3) var<storage, read> x4: array<vec4<f32>>;          // forward x (M, K); backward dy (M, N)
@group(0) @binding(4) var<storage, read_write> out: array<f32>;         // forward y (M, N); backward dx (M, K)
@group(0) @binding(5) var<storage, read_write> out4: array<vec4<f32>>;  // dequantize: W (N, K)

// Nibble shifts of elements 8e .. 8e+3 and 8e+4 .. 8e+7 within word e.
const LO_SHIFTS = vec4<u32>(4u, 0u, 12u, 8u);
const HI_SHIFTS = vec4<u32>(20u, 16u, 28u, 24u);

fn table(i: u32) -> f32 {
    return bitcast<f32>(stats[params.tables_at + i]);
}

// The f32 absmax of block b.
fn block_scale(b: u32) -> f32 {
    if (params.dq == 0u) {
        return bitcast<f32>(stats[b]);
    }
    let code = (stats[b >> 2u] >> ((b & 3u) * 8u)) & 0xffu;
    let nested = bitcast<f32>(stats[params.nested_at + (b >> params.nested_shift)]);
    let p = table(16u + code) * nested;
    return p * params.one + params.offset;
}

// Four elements of a word (the nibbles at `shifts`), scaled: NF4[q] * scale.
fn decode4(word: u32, shifts: vec4<u32>, scale: f32) -> vec4<f32> {
    let q = (vec4<u32>(word) >> shifts) & vec4<u32>(15u);
    return vec4<f32>(table(q.x), table(q.y), table(q.z), table(q.w)) * scale;
}

@compute @workgroup_size(WG * WG)
fn nf4_dequantize(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let e = flat_group(wid) * (WG * WG) + lid;
    if (e * 8u >= params.numel) { return; }
    let word = packed[params.word0 + e];
    let s = block_scale(((params.word0 + e) * 8u) >> params.block_shift);
    out4[2u * e] = decode4(word, LO_SHIFTS, s);
    if (e * 8u + 4u < params.numel) {
        out4[2u * e + 1u] = decode4(word, HI_SHIFTS, s);
    }
}

@compute @workgroup_size(WG * WG)
fn nf4_linear_forward_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n = flat_group(wid) * (WG * WG) + lid;
    if (n >= params.n) { return; }
    let kv = params.k / 4u;
    let kw = params.k / 8u;
    let m = min(params.m, MAX_ROWS);
    var acc: array<f32, MAX_ROWS>;
    for (var c = 0u; c < kw; c++) {
        let e = n * kw + c;
        let word = packed[e];
        let s = block_scale((e * 8u) >> params.block_shift);
        let wl = decode4(word, LO_SHIFTS, s);
        let wh = decode4(word, HI_SHIFTS, s);
        for (var i = 0u; i < m; i++) {
            acc[i] = acc[i] + dot(x4[i * kv + 2u * c], wl) + dot(x4[i * kv + 2u * c + 1u], wh);
        }
    }
    for (var i = 0u; i < m; i++) {
        out[i * params.n + n] = acc[i];
    }
}

@compute @workgroup_size(WG, WG)
fn nf4_linear_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let m0 = (wid.y * WG + lid.y) * BM;
    let n0 = (wid.x * WG + lid.x) * BN;
    if (m0 >= params.m || n0 >= params.n) { return; }
    let kv = params.k / 4u;
    let kw = params.k / 8u;
    // Start of each row, in vec4s of x and in words of W (rows past the edge clamped to the last).
    var xr: array<u32, BM>;
    for (var i = 0u; i < BM; i++) {
        xr[i] = min(m0 + i, params.m - 1u) * kv;
    }
    var wr: array<u32, BN>;
    for (var j = 0u; j < BN; j++) {
        wr[j] = min(n0 + j, params.n - 1u) * kw;
    }
    var acc: array<f32, BM * BN>;
    for (var c = 0u; c < kw; c++) {
        var xl: array<vec4<f32>, BM>;
        var xh: array<vec4<f32>, BM>;
        for (var i = 0u; i < BM; i++) {
            xl[i] = x4[xr[i] + 2u * c];
            xh[i] = x4[xr[i] + 2u * c + 1u];
        }
        for (var j = 0u; j < BN; j++) {
            let e = wr[j] + c;
            let word = packed[e];
            let s = block_scale((e * 8u) >> params.block_shift);
            let wl = decode4(word, LO_SHIFTS, s);
            let wh = decode4(word, HI_SHIFTS, s);
            for (var i = 0u; i < BM; i++) {
                let p = xl[i];
                let q = xh[i];
                var a = acc[i * BN + j];
                a = fma(p.x, wl.x, a);
                a = fma(p.y, wl.y, a);
                a = fma(p.z, wl.z, a);
                a = fma(p.w, wl.w, a);
                a = fma(q.x, wh.x, a);
                a = fma(q.y, wh.y, a);
                a = fma(q.z, wh.z, a);
                acc[i * BN + j] = fma(q.w, wh.w, a);
            }
        }
    }
    for (var i = 0u; i < BM; i++) {
        for (var j = 0u; j < BN; j++) {
            if (m0 + i < params.m && n0 + j < params.n) {
                out[(m0 + i) * params.n + n0 + j] = acc[i * BN + j];
            }
        }
    }
}

@compute @workgroup_size(WG, WG)
fn nf4_linear_backward_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let m0 = (wid.y * WG + lid.y) * BM;
    let c0 = wid.x * WG + lid.x;   // word column: dx columns 8*c0 .. 8*c0+7
    let kw = params.k / 8u;
    if (m0 >= params.m || c0 >= kw) { return; }
    let nv = params.n / 4u;
    var dr: array<u32, BM>;
    for (var i = 0u; i < BM; i++) {
        dr[i] = min(m0 + i, params.m - 1u) * nv;
    }
    var lo: array<vec4<f32>, BM>;
    var hi: array<vec4<f32>, BM>;
    for (var t = 0u; t < nv; t++) {
        // Rows 4t .. 4t+3 of W at this word column, decoded.
        var wl: array<vec4<f32>, 4>;
        var wh: array<vec4<f32>, 4>;
        for (var q = 0u; q < 4u; q++) {
            let e = (4u * t + q) * kw + c0;
            let word = packed[e];
            let s = block_scale((e * 8u) >> params.block_shift);
            wl[q] = decode4(word, LO_SHIFTS, s);
            wh[q] = decode4(word, HI_SHIFTS, s);
        }
        for (var i = 0u; i < BM; i++) {
            let g = x4[dr[i] + t];
            lo[i] = fma(vec4(g.w), wl[3], fma(vec4(g.z), wl[2], fma(vec4(g.y), wl[1], fma(vec4(g.x), wl[0], lo[i]))));
            hi[i] = fma(vec4(g.w), wh[3], fma(vec4(g.z), wh[2], fma(vec4(g.y), wh[1], fma(vec4(g.x), wh[0], hi[i]))));
        }
    }
    for (var i = 0u; i < BM; i++) {
        if (m0 + i < params.m) {
            let base = (m0 + i) * params.k + 8u * c0;
            let a = lo[i];
            let b = hi[i];
            out[base] = a.x;
            out[base + 1u] = a.y;
            out[base + 2u] = a.z;
            out[base + 3u] = a.w;
            out[base + 4u] = b.x;
            out[base + 5u] = b.y;
            out[base + 6u] = b.z;
            out[base + 7u] = b.w;
        }
    }
}
