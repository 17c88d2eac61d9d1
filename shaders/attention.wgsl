// Causal self-attention with grouped-query heads (Llama; transformers' eager attention with
// repeat_kv), one query row per workgroup, keys streamed in chunks of WG with an online softmax.
//
// Shapes: q (B, Tq, NH, HS); k, v (B, Tk, NKV, HS); out (B, Tq, NH, HS): the layout of the
// projections, so q/k/v are the q/k/v_proj outputs viewed (B, T, heads, HS) and out reshapes
// to the o_proj input (B*T, NH*HS) for free. Query head h reads kv head g = h / (NH / NKV).
// Query row t sits at position q_pos0 + t and attends keys j = 0..=q_pos0+t (causal mask);
// training uses Tq = Tk = T, q_pos0 = 0; a KV-cache step uses the cached keys (Tk >= q_pos0+Tq).
//
//   S[t, j] = scale * q[t] . k[j]  (scale = 1/sqrt(HS)),  P = softmax_j(S) over j <= q_pos0 + t
//   out[t]  = sum_j P[t, j] v[j]
//   lse[t]  = m + log(l): m the running row max, l = sum_j exp(S[t, j] - m) (online softmax:
//             per chunk the max is updated and the running sum and output are rescaled by
//             exp(m_old - m_new), so every exp has a non-positive argument).
// Saved for backward: lse (B, NH, Tq) only; backward recomputes P[t, j] = exp(S[t, j] - lse[t]).
// Backward (dout = dL/dout):
//   delta[t] = sum_d dout[t, d] out[t, d]            (= sum_j dP[t, j] P[t, j])
//   dP[t, j] = dout[t] . v[j],   dS[t, j] = P[t, j] (dP[t, j] - delta[t])
//   dq[t]    = scale * sum_j dS[t, j] k[j]
//   dk[j]    = scale * sum over the query heads h of j's group, sum_t dS_h[t, j] q_h[t]
//   dv[j]    = sum over the group's heads h, sum_t P_h[t, j] dout_h[t]
//
// attention_forward:      one workgroup per query row (b, h, t), flat index (b*NH + h)*Tq + t
//                         (split over x/y past 65535); writes out (=) and lse (=).
// attention_backward_dq:  one workgroup per query row (b, h, t) (Tq = Tk = T); writes dq (=)
//                         and delta (=, read by the next kernel).
// attention_backward_dkv: one workgroup per key row (b, g, j), flat index (b*NKV + g)*Tk + j;
//                         loops over the group's query heads and the queries t that see j;
//                         writes dk (=) and dv (=). No atomics: every output element is summed
//                         by one workgroup in a fixed order, so results are deterministic.
// Inside a workgroup: lane lid takes key (or query) c0 + lid of the chunk for the dot products;
// for the weighted sums over the chunk, lane lid owns element d = lid % HS of the slice
// lid / HS (WG / HS slices share the chunk), and the slices are added in order at the end.
// Workgroup memory: (2 * MAX_HS + 3 * WG) f32 = 5 KiB, independent of T (any T works).

const WG: u32 = 256u;
const MAX_HS: u32 = 256u;
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
@group(0) @binding(7) var<storage, read_write> delta: array<f32>;   // (B, NH, Tq) backward_dq writes, backward_dkv reads
@group(0) @binding(8) var<storage, read_write> dq: array<f32>;      // (B, Tq, NH, HS)
@group(0) @binding(9) var<storage, read_write> dk: array<f32>;      // (B, Tk, NKV, HS)
@group(0) @binding(10) var<storage, read_write> dv: array<f32>;     // (B, Tk, NKV, HS)

var<workgroup> row_a: array<f32, MAX_HS>;   // the q row (forward, dq) or the k row (dkv)
var<workgroup> row_b: array<f32, MAX_HS>;   // the dout row (dq) or the v row (dkv)
var<workgroup> chunk_a: array<f32, WG>;     // P (forward, dkv) or dS (dq) of the chunk; slice sums
var<workgroup> chunk_b: array<f32, WG>;     // dS of the chunk (dkv); slice sums
var<workgroup> red: array<f32, WG>;         // tree reductions

fn reduce_sum(lid: u32, x: f32) -> f32 {
    red[lid] = x;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            red[lid] = red[lid] + red[lid + stride];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

fn reduce_max(lid: u32, x: f32) -> f32 {
    red[lid] = x;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            red[lid] = max(red[lid], red[lid + stride]);
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

// Offset of row (b, t, head) of a (B, T, heads, HS) tensor.
fn row_offset(b: u32, t: u32, n_t: u32, head: u32, heads: u32) -> u32 {
    return ((b * n_t + t) * heads + head) * params.hs;
}

@compute @workgroup_size(WG)
fn attention_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let flat = wid.x + wid.y * 65535u;
    if (flat >= params.b * params.nh * params.tq) { return; }
    let hs = params.hs;
    let t = flat % params.tq;
    let h = (flat / params.tq) % params.nh;
    let b = flat / (params.tq * params.nh);
    let g = h / (params.nh / params.nkv);
    let qo = row_offset(b, t, params.tq, h, params.nh);
    for (var d = lid; d < hs; d = d + WG) {
        row_a[d] = q[qo + d];
    }
    workgroupBarrier();
    let n_keys = params.q_pos0 + t + 1u;
    let nsl = WG / hs;
    let d = lid % hs;
    let sl = lid / hs;
    var m = NEG_BIG;
    var l = 0.0;
    var acc = 0.0;
    for (var c0 = 0u; c0 < n_keys; c0 = c0 + WG) {
        let j = c0 + lid;
        var s = NEG_BIG;
        if (j < n_keys) {
            let ko = row_offset(b, j, params.tk, g, params.nkv);
            var dot = 0.0;
            for (var e = 0u; e < hs; e = e + 1u) {
                dot = dot + row_a[e] * k[ko + e];
            }
            s = dot * params.scale;
        }
        let m_new = max(m, reduce_max(lid, s));
        var p = 0.0;
        if (j < n_keys) {
            p = exp(s - m_new);
        }
        chunk_a[lid] = p;
        // reduce_sum's barriers also publish chunk_a to the workgroup.
        let csum = reduce_sum(lid, p);
        let alpha = exp(m - m_new);
        l = l * alpha + csum;
        m = m_new;
        let n_c = min(WG, n_keys - c0);
        var part = 0.0;
        if (sl < nsl) {
            for (var c = sl; c < n_c; c = c + nsl) {
                part = part + chunk_a[c] * v[row_offset(b, c0 + c, params.tk, g, params.nkv) + d];
            }
        }
        acc = acc * alpha + part;
        workgroupBarrier();
    }
    chunk_a[lid] = select(0.0, acc, sl < nsl);
    workgroupBarrier();
    if (lid < hs) {
        var o = 0.0;
        for (var s2 = 0u; s2 < nsl; s2 = s2 + 1u) {
            o = o + chunk_a[s2 * hs + lid];
        }
        out[qo + lid] = o / l;
    }
    if (lid == 0u) {
        lse[flat] = m + log(l);
    }
}

@compute @workgroup_size(WG)
fn attention_backward_dq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let flat = wid.x + wid.y * 65535u;
    if (flat >= params.b * params.nh * params.tq) { return; }
    let hs = params.hs;
    let t = flat % params.tq;
    let h = (flat / params.tq) % params.nh;
    let b = flat / (params.tq * params.nh);
    let g = h / (params.nh / params.nkv);
    let qo = row_offset(b, t, params.tq, h, params.nh);
    var dd = 0.0;
    for (var e = lid; e < hs; e = e + WG) {
        row_a[e] = q[qo + e];
        row_b[e] = dout[qo + e];
        dd = dd + dout[qo + e] * out[qo + e];
    }
    // reduce_sum's barriers also publish row_a and row_b.
    let dl = reduce_sum(lid, dd);
    if (lid == 0u) {
        delta[flat] = dl;
    }
    let lse_t = lse[flat];
    let n_keys = params.q_pos0 + t + 1u;
    let nsl = WG / hs;
    let d = lid % hs;
    let sl = lid / hs;
    var acc = 0.0;
    for (var c0 = 0u; c0 < n_keys; c0 = c0 + WG) {
        let j = c0 + lid;
        var ds = 0.0;
        if (j < n_keys) {
            let ko = row_offset(b, j, params.tk, g, params.nkv);
            var sdot = 0.0;
            var pdot = 0.0;
            for (var e = 0u; e < hs; e = e + 1u) {
                sdot = sdot + row_a[e] * k[ko + e];
                pdot = pdot + row_b[e] * v[ko + e];
            }
            let p = exp(sdot * params.scale - lse_t);
            ds = p * (pdot - dl);
        }
        chunk_a[lid] = ds;
        workgroupBarrier();
        let n_c = min(WG, n_keys - c0);
        if (sl < nsl) {
            for (var c = sl; c < n_c; c = c + nsl) {
                acc = acc + chunk_a[c] * k[row_offset(b, c0 + c, params.tk, g, params.nkv) + d];
            }
        }
        workgroupBarrier();
    }
    chunk_a[lid] = select(0.0, acc, sl < nsl);
    workgroupBarrier();
    if (lid < hs) {
        var total = 0.0;
        for (var s2 = 0u; s2 < nsl; s2 = s2 + 1u) {
            total = total + chunk_a[s2 * hs + lid];
        }
        dq[qo + lid] = params.scale * total;
    }
}

@compute @workgroup_size(WG)
fn attention_backward_dkv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let flat = wid.x + wid.y * 65535u;
    if (flat >= params.b * params.nkv * params.tk) { return; }
    let hs = params.hs;
    let j = flat % params.tk;
    let g = (flat / params.tk) % params.nkv;
    let b = flat / (params.tk * params.nkv);
    let rep = params.nh / params.nkv;
    let ko = row_offset(b, j, params.tk, g, params.nkv);
    for (var e = lid; e < hs; e = e + WG) {
        row_a[e] = k[ko + e];
        row_b[e] = v[ko + e];
    }
    workgroupBarrier();
    // Query t sees key j when q_pos0 + t >= j.
    let t0 = max(j, params.q_pos0) - params.q_pos0;
    let nsl = WG / hs;
    let d = lid % hs;
    let sl = lid / hs;
    var acck = 0.0;
    var accv = 0.0;
    for (var r = 0u; r < rep; r = r + 1u) {
        let h = g * rep + r;
        for (var c0 = t0; c0 < params.tq; c0 = c0 + WG) {
            let t = c0 + lid;
            var p = 0.0;
            var ds = 0.0;
            if (t < params.tq) {
                let qo = row_offset(b, t, params.tq, h, params.nh);
                var sdot = 0.0;
                var pdot = 0.0;
                for (var e = 0u; e < hs; e = e + 1u) {
                    sdot = sdot + q[qo + e] * row_a[e];
                    pdot = pdot + dout[qo + e] * row_b[e];
                }
                let st = (b * params.nh + h) * params.tq + t;
                p = exp(sdot * params.scale - lse[st]);
                ds = p * (pdot - delta[st]);
            }
            chunk_a[lid] = p;
            chunk_b[lid] = ds;
            workgroupBarrier();
            let n_c = min(WG, params.tq - c0);
            if (sl < nsl) {
                for (var c = sl; c < n_c; c = c + nsl) {
                    let qo = row_offset(b, c0 + c, params.tq, h, params.nh) + d;
                    accv = accv + chunk_a[c] * dout[qo];
                    acck = acck + chunk_b[c] * q[qo];
                }
            }
            workgroupBarrier();
        }
    }
    chunk_a[lid] = select(0.0, acck, sl < nsl);
    chunk_b[lid] = select(0.0, accv, sl < nsl);
    workgroupBarrier();
    if (lid < hs) {
        var tk = 0.0;
        var tv = 0.0;
        for (var s2 = 0u; s2 < nsl; s2 = s2 + 1u) {
            tk = tk + chunk_a[s2 * hs + lid];
            tv = tv + chunk_b[s2 * hs + lid];
        }
        dk[ko + lid] = params.scale * tk;
        dv[ko + lid] = tv;
    }
}
