// RMSNorm as in Hugging Face's LlamaRMSNorm (computed in f32):
//   rstd[n]   = 1 / sqrt(mean_c(inp[n,c]^2) + eps)
//   out[n,c]  = weight[c] * inp[n,c] * rstd[n]
// Backward (dout = dL/dout):
//   dinp[n,c] = rstd[n] * weight[c] * dout[n,c]
//               - inp[n,c] * rstd[n]^3 / C * sum_j(weight[j] * dout[n,j] * inp[n,j])
//   dweight[c] = sum_n dout[n,c] * inp[n,c] * rstd[n]
//
// rmsnorm_forward:         one workgroup per row n (N rows, split over x/y past 65535);
//                          writes out (=) and rstd (=, saved for backward).
// rmsnorm_backward_input:  one workgroup per row; writes dinp (=).
// rmsnorm_backward_weight: one invocation per column c, looping over rows (no float atomics,
//                          deterministic); writes dweight (=). Skipped when the norm is frozen.

const WG: u32 = 128u;

struct Params {
    n_rows: u32,
    c: u32,
    eps: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> inp: array<f32>;           // (N, C)
@group(0) @binding(2) var<storage, read> weight: array<f32>;        // (C)
@group(0) @binding(3) var<storage, read> dout: array<f32>;          // (N, C)
@group(0) @binding(4) var<storage, read_write> rstd: array<f32>;    // (N)  forward writes, backward reads
@group(0) @binding(5) var<storage, read_write> out: array<f32>;     // (N, C) out / dinp / dweight

// The workgroup reduction is `workgroup_sum` (shaders/common.wgsl).

@compute @workgroup_size(WG)
fn rmsnorm_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid);
    if (row >= params.n_rows) { return; }
    let base = row * params.c;
    var ss = 0.0;
    for (var c = lid; c < params.c; c = c + WG) {
        let x = inp[base + c];
        ss = ss + x * x;
    }
    let total = workgroup_sum(lid, ss);
    let r = inverseSqrt(total / f32(params.c) + params.eps);
    if (lid == 0u) {
        rstd[row] = r;
    }
    for (var c = lid; c < params.c; c = c + WG) {
        out[base + c] = weight[c] * (inp[base + c] * r);
    }
}

@compute @workgroup_size(WG)
fn rmsnorm_backward_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid);
    if (row >= params.n_rows) { return; }
    let base = row * params.c;
    let r = rstd[row];
    var dot = 0.0;
    for (var c = lid; c < params.c; c = c + WG) {
        dot = dot + weight[c] * dout[base + c] * inp[base + c];
    }
    let total = workgroup_sum(lid, dot);
    let k = r * r * r * total / f32(params.c);
    for (var c = lid; c < params.c; c = c + WG) {
        out[base + c] = r * weight[c] * dout[base + c] - inp[base + c] * k;
    }
}

@compute @workgroup_size(WG)
fn rmsnorm_backward_weight(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if (c >= params.c) { return; }
    var acc = 0.0;
    for (var n = 0u; n < params.n_rows; n = n + 1u) {
        acc = acc + dout[n * params.c + c] * inp[n * params.c + c] * rstd[n];
    }
    out[c] = acc;
}
