// Cross-entropy over the vocabulary, as transformers' causal-LM loss (labels already shifted, so
// row n is scored against target[n]; target -100 = ignored):
//   lse[n]      = log(sum_v exp(logits[n, v]))
//   row_loss[n] = lse[n] - logits[n, target[n]]       (0 for ignored rows)
//   loss        = sum_n row_loss[n] / count            count = rows with target != -100
//                                                      (count 0: loss 0)
// Backward (dloss = dL/dloss, a (1) tensor on the device):
//   dlogits[n, v] = (exp(logits[n, v] - lse[n]) - (v == target[n])) * dloss / count
//                   (0 for ignored rows, and everywhere when count is 0)
// Targets were checked on the host (each -100 or in [0, V)) before any dispatch.
//
// ce_forward:  one workgroup per row (N workgroups split over x and y past 65535; flat workgroup
//              index = wid.x + wid.y * 65535). A safe logsumexp in one read of the row: each
//              invocation keeps a running (max m, sum s of exp(x - m)), rescaling s when m grows;
//              the pairs are merged in a tree. Writes lse (=, saved for backward) and row_loss (=).
// ce_sum:      one workgroup; each invocation sums rows lid, lid + WG, ... in order, then a tree:
//              a fixed order, so the loss is the same bit for bit run to run. Writes loss (=).
// ce_backward: one invocation per element of dlogits (N * V), ceil(N*V / WG) workgroups split
//              over x and y; writes dlogits (=).
//
// The chunked output layer (src/ops/head.rs) never holds logits (N, V) at once: for the Nc rows
// whose target counts it computes logits chunk by chunk over the vocabulary (columns v0 .. v0 +
// Vc, params.v = Vc) and keeps a running (max, sum) per row, merged as the tree above merges lanes:
//   m' = max(m, mc);  s' = s * exp(m - m') + sc * exp(mc - m')
// so with one chunk the result is bit for bit ce_forward's.
// ce_chunk_forward:  one workgroup per row of the chunk (Nc rows, targets compacted: none is
//                    -100); the first chunk (v0 = 0) writes run_m, run_s (=), later ones merge
//                    (+=); the chunk holding the row's target writes tgt_logit (=).
// ce_chunk_finish:   one invocation per row: lse[i] = run_m + log(run_s) (=, saved for
//                    backward); row_loss[rows[i]] = lse[i] - tgt_logit[i] (=, into the (N) row
//                    losses of the whole batch, zero elsewhere, so ce_sum adds them in its order).
// ce_chunk_backward: one invocation per element of a recomputed or saved chunk (Nc, Vc), in
//                    place: chunk = (exp(chunk - lse[row]) - (v0 + col == target)) * dloss / count.

const WG: u32 = 128u;
const IGNORE: i32 = -100;
// Start of the running max: finite, so exp(M0 - M0) stays defined when a lane saw no element.
const M0: f32 = -3.0e38;

struct Params {
    n_rows: u32,
    v: u32,        // vocabulary size; chunk width Vc for the ce_chunk_* kernels
    count: f32,    // rows whose target is not -100
    v0: u32,       // ce_chunk_*: first vocabulary column of the chunk
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;         // (N, V)
@group(0) @binding(2) var<storage, read> targets: array<i32>;        // (N)
@group(0) @binding(3) var<storage, read> dloss: array<f32>;          // (1)
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;      // (N) forward writes, backward reads
@group(0) @binding(5) var<storage, read_write> row_loss: array<f32>; // (N) forward writes, ce_sum reads
@group(0) @binding(6) var<storage, read_write> out: array<f32>;      // (1) loss / (N, V) dlogits / chunk in place
@group(0) @binding(7) var<storage, read_write> run_m: array<f32>;    // (Nc) running max
@group(0) @binding(8) var<storage, read_write> run_s: array<f32>;    // (Nc) running sum of exp(x - run_m)
@group(0) @binding(9) var<storage, read_write> tgt_logit: array<f32>; // (Nc) logit of the target
@group(0) @binding(10) var<storage, read> rows: array<u32>;          // (Nc) batch row of each counted row

var<workgroup> red_m: array<f32, WG>;
var<workgroup> red_s: array<f32, WG>;

// A safe logsumexp's parts of logits[base .. base + params.v] in one read: each invocation keeps a
// running (max m, sum s of exp(x - m)), rescaling s when m grows; the pairs are merged in a tree.
// Leaves the row's (m, s) in red_m[0], red_s[0]. Every invocation of the workgroup calls it.
fn row_max_sumexp(base: u32, lid: u32) {
    var m = M0;
    var s = 0.0;
    for (var j = lid; j < params.v; j = j + WG) {
        let x = logits[base + j];
        if (x > m) {
            s = s * exp(m - x) + 1.0;
            m = x;
        } else {
            s = s + exp(x - m);
        }
    }
    red_m[lid] = m;
    red_s[lid] = s;
    workgroupBarrier();
    var stride = WG / 2u;
    loop {
        if (stride == 0u) { break; }
        if (lid < stride) {
            let m1 = red_m[lid];
            let m2 = red_m[lid + stride];
            let mm = max(m1, m2);
            red_s[lid] = red_s[lid] * exp(m1 - mm) + red_s[lid + stride] * exp(m2 - mm);
            red_m[lid] = mm;
        }
        workgroupBarrier();
        stride = stride / 2u;
    }
}

@compute @workgroup_size(WG)
fn ce_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid);
    if (row >= params.n_rows) { return; }
    let base = row * params.v;
    row_max_sumexp(base, lid);
    if (lid == 0u) {
        let l = red_m[0] + log(red_s[0]);
        lse[row] = l;
        let t = targets[row];
        if (t == IGNORE) {
            row_loss[row] = 0.0;
        } else {
            row_loss[row] = l - logits[base + u32(t)];
        }
    }
}

@compute @workgroup_size(WG)
fn ce_sum(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var r = lid; r < params.n_rows; r = r + WG) {
        acc = acc + row_loss[r];
    }
    red_s[lid] = acc;
    workgroupBarrier();
    var stride = WG / 2u;
    loop {
        if (stride == 0u) { break; }
        if (lid < stride) {
            red_s[lid] = red_s[lid] + red_s[lid + stride];
        }
        workgroupBarrier();
        stride = stride / 2u;
    }
    if (lid == 0u) {
        if (params.count > 0.0) {
            out[0] = red_s[0] / params.count;
        } else {
            out[0] = 0.0;
        }
    }
}

@compute @workgroup_size(WG)
fn ce_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid) * WG + lid;
    if (i >= params.n_rows * params.v) { return; }
    let row = i / params.v;
    let col = i - row * params.v;
    let t = targets[row];
    if (t == IGNORE || params.count == 0.0) {
        out[i] = 0.0;
        return;
    }
    let scale = dloss[0] / params.count;
    var p = exp(logits[i] - lse[row]);
    if (u32(t) == col) {
        p = p - 1.0;
    }
    out[i] = p * scale;
}

@compute @workgroup_size(WG)
fn ce_chunk_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid);
    if (row >= params.n_rows) { return; }
    let base = row * params.v;
    row_max_sumexp(base, lid);
    if (lid == 0u) {
        let t = u32(targets[row]);
        let inside = t >= params.v0 && t - params.v0 < params.v;
        if (params.v0 == 0u) {
            run_m[row] = red_m[0];
            run_s[row] = red_s[0];
            tgt_logit[row] = select(0.0, logits[base + t - params.v0], inside);
        } else {
            let m1 = run_m[row];
            let m2 = red_m[0];
            let mm = max(m1, m2);
            run_s[row] = run_s[row] * exp(m1 - mm) + red_s[0] * exp(m2 - mm);
            run_m[row] = mm;
            if (inside) {
                tgt_logit[row] = logits[base + t - params.v0];
            }
        }
    }
}

@compute @workgroup_size(WG)
fn ce_chunk_finish(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid) * WG + lid;
    if (i >= params.n_rows) { return; }
    let l = run_m[i] + log(run_s[i]);
    lse[i] = l;
    row_loss[rows[i]] = l - tgt_logit[i];
}

@compute @workgroup_size(WG)
fn ce_chunk_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid) * WG + lid;
    if (i >= params.n_rows * params.v) { return; }
    let row = i / params.v;
    let col = i - row * params.v;
    let scale = dloss[0] / params.count;
    var p = exp(out[i] - lse[row]);
    if (u32(targets[row]) == params.v0 + col) {
        p = p - 1.0;
    }
    out[i] = p * scale;
}
