// DoRA (weight-decomposed LoRA), as PEFT's DoraLinearLayer (peft/tuners/lora/dora.py): each
// output row j of the adapted weight is rescaled by mag[j] / norm[j] with
//   norm[j] = || W0[j, :] + s * (B A)[j, :] ||_2        (detached: no gradient flows through it)
// W0 (N, K) frozen, A (R, K), B (N, R), mag (N) trainable. The matmuls of the layer run on
// shaders/matmul.wgsl; these kernels do the per-row / per-column parts:
//
//   dora_weight_norm:  norm[row0 + i] = sqrt(sum_k (w0[i, k] + s * sum_t b[row0 + i, t] a[t, k])^2)
//                      for the rows i = 0 .. rows of the block w0 (rows, K) (an f32 W0 whole, or
//                      one dequantized row chunk of an NF4 W0 at rows row0 ..); writes norm (=).
//                      One workgroup per row (split over x and y past 65535), a tree reduction.
//   dora_scale:        out[i, c] = (accumulate ? out[i, c] : 0) + (mag[c] / norm[c] - offset) * z[i, c]
//                      z, out (rows, N) flat (n = rows * N elements). Forward: y = (m/n) * z
//                      (offset 0); dropout's base correction (m/n - 1) * (xd W0^T) (offset 1,
//                      accumulated). Backward: dz = g * m/n, and g * (m/n - 1). Writes out (= or +=).
//                      ceil(n / WG) workgroups of WG (split over x and y past 65535).
//   dora_magnitude_grad: dmag[c] = sum_i g[i, c] * z[i, c] / norm[c]  (z the unscaled output
//                      xd W0^T + s (xd A^T) B^T saved by the forward); writes dmag (=).
//                      Workgroups of 64 columns x WG / 64 row lanes, a fixed-order reduction over the
//                      lanes (no float atomics: deterministic); ceil(N / 64) workgroups.

const WG: u32 = 128u;
const COLS: u32 = 64u;   // columns per dora_magnitude_grad workgroup
const LANES: u32 = WG / COLS;   // row lanes per dora_magnitude_grad workgroup

// One parameter block for the three entry points (fields unused by an entry are 0).
struct Params {
    rows: u32,       // norm: rows of this block of W0;  magnitude_grad: rows of g / z
    k: u32,          // norm: in_features K
    r: u32,          // norm: rank R
    row0: u32,       // norm: the block's first row in W0 / B / norm
    s: f32,          // norm: the LoRA scale
    n: u32,          // scale: elements of z / out (rows * N)
    cols: u32,       // scale, magnitude_grad: N
    accumulate: u32, // scale: 1 out += ..., 0 out = ...
    offset: f32,     // scale: subtracted from mag / norm
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// Bindings by entry point:
//   dora_weight_norm:    in0 = w0 (rows, K) block, in1 = a (R, K), in2 = b (N, R), out = norm (N)
//   dora_scale:          in0 = mag (N), in1 = norm (N), in2 = z (rows, N), out = out (rows, N)
//   dora_magnitude_grad: in0 = g (rows, N), in1 = z (rows, N), in2 = norm (N), out = dmag (N)
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> in0: array<f32>;
@group(0) @binding(2) var<storage, read> in1: array<f32>;
@group(0) @binding(3) var<storage, read> in2: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

var<workgroup> partial: array<f32, WG>;   // dora_magnitude_grad's lanes; the row reduction is `workgroup_sum` (shaders/common.wgsl)

@compute @workgroup_size(WG)
fn dora_weight_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid);
    if (i >= params.rows) { return; }
    let row = params.row0 + i;
    var ss = 0.0;
    for (var c = lid; c < params.k; c = c + WG) {
        var d = 0.0;
        for (var t = 0u; t < params.r; t = t + 1u) {
            d = d + in2[row * params.r + t] * in1[t * params.k + c];
        }
        let v = in0[i * params.k + c] + params.s * d;
        ss = ss + v * v;
    }
    let total = workgroup_sum(lid, ss);
    if (lid == 0u) {
        out[row] = sqrt(total);
    }
}

@compute @workgroup_size(WG)
fn dora_scale(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid) * WG + lid;
    if (i >= params.n) { return; }
    let c = i % params.cols;
    let f = in0[c] / in1[c] - params.offset;
    var acc = 0.0;
    if (params.accumulate != 0u) {
        acc = out[i];
    }
    out[i] = acc + f * in2[i];
}

@compute @workgroup_size(WG)
fn dora_magnitude_grad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let col0 = flat_group(wid) * COLS;
    let c = col0 + lid % COLS;
    let lane = lid / COLS;
    var acc = 0.0;
    if (c < params.cols) {
        for (var i = lane; i < params.rows; i = i + LANES) {
            acc = acc + in0[i * params.cols + c] * in1[i * params.cols + c];
        }
    }
    partial[lid] = acc;
    workgroupBarrier();
    if (lane == 0u && c < params.cols) {
        var total = partial[lid];
        for (var l = 1u; l < LANES; l = l + 1u) {
            total = total + partial[l * COLS + lid];
        }
        out[c] = total / in2[c];
    }
}
