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

const WG: u32 = 256u;
const IGNORE: i32 = -100;
// Start of the running max: finite, so exp(M0 - M0) stays defined when a lane saw no element.
const M0: f32 = -3.0e38;

struct Params {
    n_rows: u32,
    v: u32,
    count: f32,    // rows whose target is not -100
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;         // (N, V)
@group(0) @binding(2) var<storage, read> targets: array<i32>;        // (N)
@group(0) @binding(3) var<storage, read> dloss: array<f32>;          // (1)
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;      // (N) forward writes, backward reads
@group(0) @binding(5) var<storage, read_write> row_loss: array<f32>; // (N) forward writes, ce_sum reads
@group(0) @binding(6) var<storage, read_write> out: array<f32>;      // (1) loss / (N, V) dlogits

var<workgroup> red_m: array<f32, WG>;
var<workgroup> red_s: array<f32, WG>;

@compute @workgroup_size(WG)
fn ce_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * 65535u;
    if (row >= params.n_rows) { return; }
    let base = row * params.v;
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
    let i = (wid.x + wid.y * 65535u) * WG + lid;
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
