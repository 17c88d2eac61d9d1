// Causal self-attention with grouped-query heads (Llama; transformers' eager attention with
// repeat_kv), flash-attention style: one invocation per query row (per key row for dk/dv), WG
// rows of one (batch, head) per workgroup, the other side streamed through workgroup memory in
// tiles, the softmax kept online in each invocation's registers.
//
// Shapes: q (B, Tq, NH, HS); k, v (B, Tk, NKV, HS); out (B, Tq, NH, HS): the layout of the
// projections, so q/k/v are the q/k/v_proj outputs viewed (B, T, heads, HS) and out reshapes
// to the o_proj input (B*T, NH*HS) for free. Query head h reads kv head g = h / (NH / NKV).
// Query row t sits at position q_pos0 + t and attends keys j = seg[b, t]..=q_pos0+t (causal mask,
// and with sequence packing the row's example boundary: seg[b, t] is the first key of query t's
// example, non-decreasing along t; all zero without packing, which gives the same bits as a
// kernel without seg); training uses Tq = Tk = T, q_pos0 = 0; a KV-cache step uses the cached
// keys (Tk >= q_pos0+Tq) and seg all zero.
//
//   S[t, j] = scale * q[t] . k[j]  (scale = 1/sqrt(HS)),  P = softmax_j(S) over j <= q_pos0 + t
//   out[t]  = sum_j P[t, j] v[j]
//   lse[t]  = m + log(l): m the running row max, l = sum_j exp(S[t, j] - m) (online softmax:
//             per tile the max is updated once and l and the output accumulator are rescaled by
//             exp(m_old - m_new), so every exp has a non-positive argument).
// Saved for backward: lse (B, NH, Tq) only; backward recomputes P[t, j] = exp(S[t, j] - lse[t]).
// Backward (dout = dL/dout):
//   delta[t] = sum_d dout[t, d] out[t, d]            (= sum_j dP[t, j] P[t, j])
//   dP[t, j] = dout[t] . v[j],   dS[t, j] = P[t, j] (dP[t, j] - delta[t])
//   dq[t]    = scale * sum_j dS[t, j] k[j]
//   dk[j]    = scale * sum over the query heads h of j's group, sum_t dS_h[t, j] q_h[t]
//   dv[j]    = sum over the group's heads h, sum_t P_h[t, j] dout_h[t]
//
// Dispatch geometry (flat workgroup index = wid.x + wid.y * 65535, split over x/y past 65535):
// attention_forward:      workgroup (b, h, blk) = flat index (b*NH + h)*ceil(Tq/WG) + blk;
//                         invocation lid takes query row t = blk*WG + lid. Writes out (=), lse (=).
// attention_decode:       the forward for Tq small (a KV-cache decode step): one workgroup per
//                         query row (b, h, t), flat index (b*NH + h)*Tq + t. Writes out, lse (=).
// attention_backward_delta: one invocation per (b, h, t), flat index (wid.x + wid.y*65535)*WG +
//                         lid over B*NH*Tq; writes delta (=), read by the next two kernels,
//                         and a copy of lse after it (delta is (2, B, NH, Tq)): dkv reads both
//                         from one binding, so it binds 8 storage buffers (WebGPU's default
//                         limit per stage, also compatibility mode's), not 9.
// attention_backward_dq:  as attention_forward (Tq = Tk = T); writes dq (=).
// attention_backward_dkv: workgroup (b, g, blk) = flat index (b*NKV + g)*ceil(Tk/WG) + blk;
//                         invocation lid takes key row j = blk*WG + lid and loops over the
//                         group's query heads and the queries t that see j. Writes dk (=), dv (=).
// No atomics: every output element is summed by one invocation in a fixed order, so results
// are deterministic run to run.
//
// Tiles: a workgroup walks the other side in tiles of TR = tile_rows(ceil(HS/4)) rows (multiple
// of 4; 16 for HS 64), loaded cooperatively into tile_a/tile_b as vec4 (zero past HS and in the
// rows that round a short last tile up to 4), between two barriers. Forward and dq walk the
// keys 0..q_pos0 + (last row of the block), dkv the queries from the first that sees the
// block's first key; keys a row does not see are masked per invocation (their p and dS are
// exactly 0), and a tile past an invocation's last key costs it nothing. Per tile, an
// invocation handles blocks of 4 rows: 4 dot products sharing each vec4 of its own row, then
// the tile's max, one rescale of the accumulator, and the accumulation. Private per invocation:
// its own row(s) and accumulators, array<vec4<f32>, MAX_HS4> each (loops run to ceil(HS/4)).
// Why this shape (measured on lavapipe, Mesa's CPU Vulkan): there a workgroup runs as SIMD-8
// loops over its invocations, every storage or workgroup load is a loop over the 8 lanes, and a
// barrier switches between the loops; so the cost follows the loads per multiply-add and the
// barriers. The former kernels (one workgroup of 256 per query row, two 8-step tree reductions
// per chunk of keys) were 10 to 13 times slower in the forward and 5 to 9 times in the backward
// for SmolLM2-135M's heads at B 1 to 4, T 128 and 256; see examples/attn_timing.rs.
//
// attention_decode gives the same bits as attention_forward for its row: the same tiles, blocks
// of 4 keys and order of every sum; lanes 0..WG/(TR/4)*(TR/4) compute the scores of one block of
// 4 keys each (several tiles at a time, into tile_a), then lane i < ceil(HS/4) owns output
// elements 4i..4i+3 and runs the row's online softmax over those tiles in order. The launcher
// picks it up to ops::attention::DECODE_MAX_TQ query rows (there it is faster than one busy
// invocation per workgroup), so a KV-cache step equals the full forward's row bit for bit.
//
// Workgroup memory: 2 * TILE4 vec4 + 2 * MAX_TILE f32 + MAX_TILE u32 = 8.75 KiB, independent of T.

const WG: u32 = 64u;
const MAX_HS: u32 = 256u;
const MAX_HS4: u32 = MAX_HS / 4u;
// vec4 slots of each of the two row tiles; a tile holds TILE4 / ceil(HS / 4) rows, at most MAX_TILE.
const TILE4: u32 = 256u;
const MAX_TILE: u32 = 64u;
// Start of the running max; exp(NEG_BIG - m) is 0 for any finite score m.
const NEG_BIG: f32 = -3.0e38;

struct Params {
    b: u32,        // B
    tq: u32,       // query rows Tq
    tk: u32,       // key rows Tk
    nh: u32,       // query heads NH
    nkv: u32,      // key/value heads NKV (NH % NKV == 0)
    hs: u32,       // head size HS <= MAX_HS
    q_pos0: u32,   // position of query row 0
    scale: f32,    // 1 / sqrt(HS)
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;             // (B, Tq, NH, HS)
@group(0) @binding(2) var<storage, read> k: array<f32>;             // (B, Tk, NKV, HS)
@group(0) @binding(3) var<storage, read> v: array<f32>;             // (B, Tk, NKV, HS)
@group(0) @binding(4) var<storage, read> dout: array<f32>;          // (B, Tq, NH, HS)
@group(0) @binding(5) var<storage, read_write> out: array<f32>;     // (B, Tq, NH, HS) forward writes, backward_dq reads
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;     // (B, NH, Tq) forward writes, backward reads
@group(0) @binding(7) var<storage, read_write> delta: array<f32>;   // (2, B, NH, Tq): delta, then lse; backward_delta writes, backward_dq and _dkv read
@group(0) @binding(8) var<storage, read_write> dq: array<f32>;      // (B, Tq, NH, HS)
@group(0) @binding(9) var<storage, read_write> dk: array<f32>;      // (B, Tk, NKV, HS)
@group(0) @binding(10) var<storage, read_write> dv: array<f32>;     // (B, Tk, NKV, HS)
@group(0) @binding(11) var<storage, read> seg: array<u32>;           // (B, Tq) first key of each query row's example

var<workgroup> tile_a: array<vec4<f32>, TILE4>;   // k rows (forward, dq) or q rows (dkv)
var<workgroup> tile_b: array<vec4<f32>, TILE4>;   // v rows (forward, dq) or dout rows (dkv)
var<workgroup> tile_lse: array<f32, MAX_TILE>;    // dkv: lse of the tile's query rows
var<workgroup> tile_delta: array<f32, MAX_TILE>;  // dkv: delta of the tile's query rows
var<workgroup> tile_seg: array<u32, MAX_TILE>;    // dkv: first key of the tile's query rows' examples

// Offset of row (b, t, head) of a (B, T, heads, HS) tensor.
fn row_offset(b: u32, t: u32, n_t: u32, head: u32, heads: u32) -> u32 {
    return ((b * n_t + t) * heads + head) * params.hs;
}

// Rows a tile holds for this head size.
fn tile_rows(hs4: u32) -> u32 {
    return min(TILE4 / hs4, MAX_TILE) & ~3u;
}

// Elements e..e+3 (e < HS, a multiple of 4) of the row at offset o, zero past HS (no branch:
// the loads past HS re-read the row's last element).
fn q4_at(o: u32, e: u32) -> vec4<f32> {
    let last = params.hs - 1u;
    let x = vec4<f32>(q[o + e], q[o + min(e + 1u, last)], q[o + min(e + 2u, last)], q[o + min(e + 3u, last)]);
    return select(vec4<f32>(0.0), x, vec4<u32>(e, e + 1u, e + 2u, e + 3u) <= vec4<u32>(last));
}

fn k4_at(o: u32, e: u32) -> vec4<f32> {
    let last = params.hs - 1u;
    let x = vec4<f32>(k[o + e], k[o + min(e + 1u, last)], k[o + min(e + 2u, last)], k[o + min(e + 3u, last)]);
    return select(vec4<f32>(0.0), x, vec4<u32>(e, e + 1u, e + 2u, e + 3u) <= vec4<u32>(last));
}

fn v4_at(o: u32, e: u32) -> vec4<f32> {
    let last = params.hs - 1u;
    let x = vec4<f32>(v[o + e], v[o + min(e + 1u, last)], v[o + min(e + 2u, last)], v[o + min(e + 3u, last)]);
    return select(vec4<f32>(0.0), x, vec4<u32>(e, e + 1u, e + 2u, e + 3u) <= vec4<u32>(last));
}

fn dout4_at(o: u32, e: u32) -> vec4<f32> {
    let last = params.hs - 1u;
    let x = vec4<f32>(dout[o + e], dout[o + min(e + 1u, last)], dout[o + min(e + 2u, last)], dout[o + min(e + 3u, last)]);
    return select(vec4<f32>(0.0), x, vec4<u32>(e, e + 1u, e + 2u, e + 3u) <= vec4<u32>(last));
}

fn out4_at(o: u32, e: u32) -> vec4<f32> {
    let last = params.hs - 1u;
    let x = vec4<f32>(out[o + e], out[o + min(e + 1u, last)], out[o + min(e + 2u, last)], out[o + min(e + 3u, last)]);
    return select(vec4<f32>(0.0), x, vec4<u32>(e, e + 1u, e + 2u, e + 3u) <= vec4<u32>(last));
}

// Loads key rows j0..j0+n of kv head g into tile_a and the value rows into tile_b.
fn load_kv_tile(lid: u32, b: u32, g: u32, j0: u32, n: u32, hs4: u32) {
    for (var i = lid; i < n * hs4; i = i + WG) {
        let r = i / hs4;
        let e = (i % hs4) * 4u;
        let o = row_offset(b, j0 + r, params.tk, g, params.nkv);
        tile_a[i] = k4_at(o, e);
        tile_b[i] = v4_at(o, e);
    }
    // Rows n..n rounded up to 4 are zero: blocks of 4 rows read them with weight 0.
    for (var i = n * hs4 + lid; i < ((n + 3u) & ~3u) * hs4; i = i + WG) {
        tile_a[i] = vec4<f32>(0.0);
        tile_b[i] = vec4<f32>(0.0);
    }
}

@compute @workgroup_size(WG)
fn attention_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let flat = flat_group(wid);
    let nblk = (params.tq + WG - 1u) / WG;
    if (flat >= params.b * params.nh * nblk) { return; }
    let hs = params.hs;
    let hs4 = (hs + 3u) / 4u;
    let blk = flat % nblk;
    let h = (flat / nblk) % params.nh;
    let b = flat / (nblk * params.nh);
    let g = h / (params.nh / params.nkv);
    let t = blk * WG + lid;
    let live = t < params.tq;
    // Keys j_begin..n_keys are seen by some row of the block, keys first..=limit by this row.
    let n_keys = params.q_pos0 + min(blk * WG + WG, params.tq);
    let limit = params.q_pos0 + t;
    let first = seg[b * params.tq + min(t, params.tq - 1u)];
    let j_begin = seg[b * params.tq + blk * WG];
    let qo = row_offset(b, min(t, params.tq - 1u), params.tq, h, params.nh);
    var qr: array<vec4<f32>, MAX_HS4>;
    var acc: array<vec4<f32>, MAX_HS4>;
    var sc: array<vec4<f32>, MAX_TILE / 4u>;
    for (var e4 = 0u; e4 < hs4; e4 = e4 + 1u) {
        qr[e4] = q4_at(qo, e4 * 4u) * params.scale;
    }
    let tr = tile_rows(hs4);
    var m = NEG_BIG;
    var l = 0.0;
    for (var j0 = j_begin; j0 < n_keys; j0 = j0 + tr) {
        let n = min(tr, n_keys - j0);
        workgroupBarrier();
        load_kv_tile(lid, b, g, j0, n, hs4);
        workgroupBarrier();
        // This row's keys in the tile: lo..nj (none when its example starts past the tile).
        var nj = 0u;
        if (live && limit >= j0) {
            nj = min(n, limit + 1u - j0);
        }
        let lo = max(first, j0) - j0;
        if (lo >= nj) {
            nj = 0u;
        }
        let lo4 = lo & ~3u;
        var mt = NEG_BIG;
        for (var jj = lo4; jj < nj; jj = jj + 4u) {
            let b0 = jj * hs4;
            let b1 = b0 + hs4;
            let b2 = b1 + hs4;
            let b3 = b2 + hs4;
            var s = vec4<f32>(0.0);
            for (var e4 = 0u; e4 < hs4; e4 = e4 + 1u) {
                let x = qr[e4];
                s = s + vec4<f32>(dot(x, tile_a[b0 + e4]), dot(x, tile_a[b1 + e4]), dot(x, tile_a[b2 + e4]), dot(x, tile_a[b3 + e4]));
            }
            let jv = vec4<u32>(jj, jj + 1u, jj + 2u, jj + 3u);
            s = select(vec4<f32>(NEG_BIG), s, (jv >= vec4<u32>(lo)) & (jv < vec4<u32>(nj)));
            sc[jj / 4u] = s;
            mt = max(mt, max(max(s.x, s.y), max(s.z, s.w)));
        }
        if (nj > 0u) {
            let m_new = max(m, mt);
            let alpha = exp(m - m_new);
            l = l * alpha;
            for (var e4 = 0u; e4 < hs4; e4 = e4 + 1u) {
                acc[e4] = acc[e4] * alpha;
            }
            for (var jj = lo4; jj < nj; jj = jj + 4u) {
                let p = exp(sc[jj / 4u] - vec4<f32>(m_new));
                l = l + p.x + p.y + p.z + p.w;
                let b0 = jj * hs4;
                let b1 = b0 + hs4;
                let b2 = b1 + hs4;
                let b3 = b2 + hs4;
                for (var e4 = 0u; e4 < hs4; e4 = e4 + 1u) {
                    acc[e4] = acc[e4] + p.x * tile_b[b0 + e4] + p.y * tile_b[b1 + e4] + p.z * tile_b[b2 + e4] + p.w * tile_b[b3 + e4];
                }
            }
            m = m_new;
        }
    }
    if (live) {
        let inv = 1.0 / l;
        for (var e = 0u; e < hs; e = e + 1u) {
            out[qo + e] = acc[e / 4u][e % 4u] * inv;
        }
        lse[(b * params.nh + h) * params.tq + t] = m + log(l);
    }
}

// One query row per workgroup (for Tq small: a KV-cache decode step). Bit for bit the
// arithmetic of attention_forward for that row: the same tiles of tile_rows keys, blocks of 4
// keys, and the same order of every sum; only the work is spread over the lanes.
@compute @workgroup_size(WG)
fn attention_decode(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let flat = flat_group(wid);
    if (flat >= params.b * params.nh * params.tq) { return; }
    let hs = params.hs;
    let hs4 = (hs + 3u) / 4u;
    let t = flat % params.tq;
    let h = (flat / params.tq) % params.nh;
    let b = flat / (params.tq * params.nh);
    let g = h / (params.nh / params.nkv);
    let n_keys = params.q_pos0 + t + 1u;
    let qo = row_offset(b, t, params.tq, h, params.nh);
    let tr = tile_rows(hs4);
    let bpt = tr / 4u;
    // Scores of `tiles` tiles are computed at once, one block of 4 keys per lane.
    let tiles = WG / bpt;
    // The scaled q row in tile_b; block scores in tile_a.
    for (var e4 = lid; e4 < hs4; e4 = e4 + WG) {
        tile_b[e4] = q4_at(qo, e4 * 4u) * params.scale;
    }
    var m = NEG_BIG;
    var l = 0.0;
    var acc = vec4<f32>(0.0);
    for (var p0 = 0u; p0 < n_keys; p0 = p0 + tiles * tr) {
        workgroupBarrier();
        if (lid < tiles * bpt) {
            let j = p0 + (lid / bpt) * tr + (lid % bpt) * 4u;
            // Keys past the row's last are masked below; their loads re-read the last.
            let o0 = row_offset(b, min(j, n_keys - 1u), params.tk, g, params.nkv);
            let o1 = row_offset(b, min(j + 1u, n_keys - 1u), params.tk, g, params.nkv);
            let o2 = row_offset(b, min(j + 2u, n_keys - 1u), params.tk, g, params.nkv);
            let o3 = row_offset(b, min(j + 3u, n_keys - 1u), params.tk, g, params.nkv);
            var s = vec4<f32>(0.0);
            for (var e4 = 0u; e4 < hs4; e4 = e4 + 1u) {
                let x = tile_b[e4];
                let e = e4 * 4u;
                s = s + vec4<f32>(dot(x, k4_at(o0, e)), dot(x, k4_at(o1, e)), dot(x, k4_at(o2, e)), dot(x, k4_at(o3, e)));
            }
            tile_a[lid] = select(vec4<f32>(NEG_BIG), s, vec4<u32>(j, j + 1u, j + 2u, j + 3u) < vec4<u32>(n_keys));
        }
        workgroupBarrier();
        // Lane lid < hs4 owns elements 4 lid..4 lid+3 of the output and keeps its own m and l.
        for (var ti = 0u; ti < tiles && lid < hs4; ti = ti + 1u) {
            let j0 = p0 + ti * tr;
            if (j0 >= n_keys) { break; }
            let nj = min(tr, n_keys - j0);
            var mt = NEG_BIG;
            for (var jj = 0u; jj < nj; jj = jj + 4u) {
                let s = tile_a[ti * bpt + jj / 4u];
                mt = max(mt, max(max(s.x, s.y), max(s.z, s.w)));
            }
            let m_new = max(m, mt);
            let alpha = exp(m - m_new);
            l = l * alpha;
            acc = acc * alpha;
            let e = lid * 4u;
            for (var jj = 0u; jj < nj; jj = jj + 4u) {
                let p = exp(tile_a[ti * bpt + jj / 4u] - vec4<f32>(m_new));
                l = l + p.x + p.y + p.z + p.w;
                // Keys past the row's last have p = 0 and re-read the last key's v (finite).
                let j = j0 + jj;
                let v0 = v4_at(row_offset(b, j, params.tk, g, params.nkv), e);
                let v1 = v4_at(row_offset(b, min(j + 1u, n_keys - 1u), params.tk, g, params.nkv), e);
                let v2 = v4_at(row_offset(b, min(j + 2u, n_keys - 1u), params.tk, g, params.nkv), e);
                let v3 = v4_at(row_offset(b, min(j + 3u, n_keys - 1u), params.tk, g, params.nkv), e);
                acc = acc + p.x * v0 + p.y * v1 + p.z * v2 + p.w * v3;
            }
            m = m_new;
        }
    }
    if (lid < hs4) {
        let inv = 1.0 / l;
        for (var c = 0u; c < 4u && lid * 4u + c < hs; c = c + 1u) {
            out[qo + lid * 4u + c] = acc[c] * inv;
        }
    }
    if (lid == 0u) {
        lse[(b * params.nh + h) * params.tq + t] = m + log(l);
    }
}

@compute @workgroup_size(WG)
fn attention_backward_dq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let flat = flat_group(wid);
    let nblk = (params.tq + WG - 1u) / WG;
    if (flat >= params.b * params.nh * nblk) { return; }
    let hs = params.hs;
    let hs4 = (hs + 3u) / 4u;
    let blk = flat % nblk;
    let h = (flat / nblk) % params.nh;
    let b = flat / (nblk * params.nh);
    let g = h / (params.nh / params.nkv);
    let t = blk * WG + lid;
    let live = t < params.tq;
    let n_keys = params.q_pos0 + min(blk * WG + WG, params.tq);
    let limit = params.q_pos0 + t;
    let first = seg[b * params.tq + min(t, params.tq - 1u)];
    let j_begin = seg[b * params.tq + blk * WG];
    let qo = row_offset(b, min(t, params.tq - 1u), params.tq, h, params.nh);
    let st = (b * params.nh + h) * params.tq + min(t, params.tq - 1u);
    var qr: array<vec4<f32>, MAX_HS4>;
    var dor: array<vec4<f32>, MAX_HS4>;
    var acc: array<vec4<f32>, MAX_HS4>;
    for (var e4 = 0u; e4 < hs4; e4 = e4 + 1u) {
        qr[e4] = q4_at(qo, e4 * 4u) * params.scale;
        dor[e4] = dout4_at(qo, e4 * 4u);
    }
    let dl = delta[st];
    let lse_t = lse[st];
    let tr = tile_rows(hs4);
    for (var j0 = j_begin; j0 < n_keys; j0 = j0 + tr) {
        let n = min(tr, n_keys - j0);
        workgroupBarrier();
        load_kv_tile(lid, b, g, j0, n, hs4);
        workgroupBarrier();
        var nj = 0u;
        if (live && limit >= j0) {
            nj = min(n, limit + 1u - j0);
        }
        let lo = max(first, j0) - j0;
        if (lo >= nj) {
            nj = 0u;
        }
        for (var jj = lo & ~3u; jj < nj; jj = jj + 4u) {
            let b0 = jj * hs4;
            let b1 = b0 + hs4;
            let b2 = b1 + hs4;
            let b3 = b2 + hs4;
            var s = vec4<f32>(0.0);
            var dp = vec4<f32>(0.0);
            for (var e4 = 0u; e4 < hs4; e4 = e4 + 1u) {
                let x = qr[e4];
                let y = dor[e4];
                s = s + vec4<f32>(dot(x, tile_a[b0 + e4]), dot(x, tile_a[b1 + e4]), dot(x, tile_a[b2 + e4]), dot(x, tile_a[b3 + e4]));
                dp = dp + vec4<f32>(dot(y, tile_b[b0 + e4]), dot(y, tile_b[b1 + e4]), dot(y, tile_b[b2 + e4]), dot(y, tile_b[b3 + e4]));
            }
            // Keys past this row's last or before its example (exp may overflow there) get dS = 0.
            let jv = vec4<u32>(jj, jj + 1u, jj + 2u, jj + 3u);
            let ds = select(vec4<f32>(0.0), exp(s - vec4<f32>(lse_t)) * (dp - vec4<f32>(dl)), (jv >= vec4<u32>(lo)) & (jv < vec4<u32>(nj)));
            for (var e4 = 0u; e4 < hs4; e4 = e4 + 1u) {
                acc[e4] = acc[e4] + ds.x * tile_a[b0 + e4] + ds.y * tile_a[b1 + e4] + ds.z * tile_a[b2 + e4] + ds.w * tile_a[b3 + e4];
            }
        }
    }
    if (live) {
        for (var e = 0u; e < hs; e = e + 1u) {
            dq[qo + e] = params.scale * acc[e / 4u][e % 4u];
        }
    }
}

@compute @workgroup_size(WG)
fn attention_backward_delta(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid) * WG + lid;
    if (i >= params.b * params.nh * params.tq) { return; }
    let t = i % params.tq;
    let h = (i / params.tq) % params.nh;
    let b = i / (params.tq * params.nh);
    let qo = row_offset(b, t, params.tq, h, params.nh);
    let hs4 = (params.hs + 3u) / 4u;
    var dl = 0.0;
    for (var e4 = 0u; e4 < hs4; e4 = e4 + 1u) {
        dl = dl + dot(dout4_at(qo, e4 * 4u), out4_at(qo, e4 * 4u));
    }
    delta[i] = dl;
    delta[params.b * params.nh * params.tq + i] = lse[i];
}

@compute @workgroup_size(WG)
fn attention_backward_dkv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let flat = flat_group(wid);
    let nblk = (params.tk + WG - 1u) / WG;
    if (flat >= params.b * params.nkv * nblk) { return; }
    let hs = params.hs;
    let hs4 = (hs + 3u) / 4u;
    let blk = flat % nblk;
    let g = (flat / nblk) % params.nkv;
    let b = flat / (nblk * params.nkv);
    let rep = params.nh / params.nkv;
    let j = blk * WG + lid;
    let live = j < params.tk;
    let ko = row_offset(b, min(j, params.tk - 1u), params.tk, g, params.nkv);
    var kr: array<vec4<f32>, MAX_HS4>;
    var vr: array<vec4<f32>, MAX_HS4>;
    var acck: array<vec4<f32>, MAX_HS4>;
    var accv: array<vec4<f32>, MAX_HS4>;
    for (var e4 = 0u; e4 < hs4; e4 = e4 + 1u) {
        kr[e4] = k4_at(ko, e4 * 4u) * params.scale;
        vr[e4] = v4_at(ko, e4 * 4u);
    }
    let tr = tile_rows(hs4);
    // Query t sees key j when q_pos0 + t >= j: the block's first key blk * WG is seen from t_first.
    let t_first = max(blk * WG, params.q_pos0) - params.q_pos0;
    for (var r = 0u; r < rep; r = r + 1u) {
        let h = g * rep + r;
        for (var t0 = t_first; t0 < params.tq; t0 = t0 + tr) {
            let n = min(tr, params.tq - t0);
            workgroupBarrier();
            for (var i = lid; i < n * hs4; i = i + WG) {
                let o = row_offset(b, t0 + i / hs4, params.tq, h, params.nh);
                let e = (i % hs4) * 4u;
                tile_a[i] = q4_at(o, e);
                tile_b[i] = dout4_at(o, e);
            }
            for (var i = n * hs4 + lid; i < ((n + 3u) & ~3u) * hs4; i = i + WG) {
                tile_a[i] = vec4<f32>(0.0);
                tile_b[i] = vec4<f32>(0.0);
            }
            for (var i = lid; i < ((n + 3u) & ~3u); i = i + WG) {
                let st = (b * params.nh + h) * params.tq + min(t0 + i, params.tq - 1u);
                tile_lse[i] = delta[params.b * params.nh * params.tq + st];
                tile_delta[i] = delta[st];
                tile_seg[i] = seg[b * params.tq + min(t0 + i, params.tq - 1u)];
            }
            workgroupBarrier();
            // This key's queries in the tile: i0..n.
            var i0 = n;
            if (live) {
                i0 = min(n, max(j, params.q_pos0 + t0) - (params.q_pos0 + t0));
            }
            for (var ii = i0 & ~3u; ii < n; ii = ii + 4u) {
                let b0 = ii * hs4;
                let b1 = b0 + hs4;
                let b2 = b1 + hs4;
                let b3 = b2 + hs4;
                var s = vec4<f32>(0.0);
                var dp = vec4<f32>(0.0);
                for (var e4 = 0u; e4 < hs4; e4 = e4 + 1u) {
                    let x = kr[e4];
                    let y = vr[e4];
                    s = s + vec4<f32>(dot(tile_a[b0 + e4], x), dot(tile_a[b1 + e4], x), dot(tile_a[b2 + e4], x), dot(tile_a[b3 + e4], x));
                    dp = dp + vec4<f32>(dot(tile_b[b0 + e4], y), dot(tile_b[b1 + e4], y), dot(tile_b[b2 + e4], y), dot(tile_b[b3 + e4], y));
                }
                let lse4 = vec4<f32>(tile_lse[ii], tile_lse[ii + 1u], tile_lse[ii + 2u], tile_lse[ii + 3u]);
                let delta4 = vec4<f32>(tile_delta[ii], tile_delta[ii + 1u], tile_delta[ii + 2u], tile_delta[ii + 3u]);
                let iv = vec4<u32>(ii, ii + 1u, ii + 2u, ii + 3u);
                let seg4 = vec4<u32>(tile_seg[ii], tile_seg[ii + 1u], tile_seg[ii + 2u], tile_seg[ii + 3u]);
                let seen = (iv >= vec4<u32>(i0)) & (iv < vec4<u32>(n)) & (seg4 <= vec4<u32>(j));
                let p = select(vec4<f32>(0.0), exp(s - lse4), seen);
                let ds = select(vec4<f32>(0.0), p * (dp - delta4), seen);
                for (var e4 = 0u; e4 < hs4; e4 = e4 + 1u) {
                    accv[e4] = accv[e4] + p.x * tile_b[b0 + e4] + p.y * tile_b[b1 + e4] + p.z * tile_b[b2 + e4] + p.w * tile_b[b3 + e4];
                    acck[e4] = acck[e4] + ds.x * tile_a[b0 + e4] + ds.y * tile_a[b1 + e4] + ds.z * tile_a[b2 + e4] + ds.w * tile_a[b3 + e4];
                }
            }
        }
    }
    if (live) {
        for (var e = 0u; e < hs; e = e + 1u) {
            dk[ko + e] = params.scale * acck[e / 4u][e % 4u];
            dv[ko + e] = accv[e / 4u][e % 4u];
        }
    }
}
