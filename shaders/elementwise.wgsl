// Elementwise kernels: residual add (the tape also uses it to accumulate gradients), scale, and
// the bias of a linear layer broadcast over its rows.
//
//   add_forward:       out[i] = a[i] + b[i]             a, b, out (N)            out written (=)
//   scale:             out[i] = alpha * a[i]            a, out (N)               out written (=)
//   add_bias_forward:  out[r, c] = a[r, c] + b[c]       a, out (N = R*C), b (C)  out written (=)
//   put_cols:          out[r, c0 + j] = a[r, j]         a (R, cols), out (R, ld), N = R*cols:
//                      a column block of a wider matrix (chunked products)  out written (=)
//   take_cols:         out[r, j] = a[r, c0 + j]         a (R, ld), out (R, cols), N = R*cols
//
// add_bias_forward has no backward kernel: a bias here is frozen (dinp = dout, nothing saved),
// and the projection biases it serves never train under LoRA.
//
// Dispatch: ceil(N / WG) workgroups of WG invocations, split over x and y when above 65535
// (flat workgroup index = wid.x + wid.y * 65535).

const WG: u32 = 128u;

struct Params {
    n: u32,
    alpha: f32,
    cols: u32,   // C of add_bias_forward; the block's width for put_cols / take_cols
    ld: u32,     // put_cols / take_cols: row length of the wide matrix
    c0: u32,     // put_cols / take_cols: the block's first column in the wide matrix
    _pad1: u32,
    _pad2: u32,
    _pad3: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;       // (N)
@group(0) @binding(2) var<storage, read> b: array<f32>;       // (N); (C) for add_bias_forward
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // (N)

fn flat_index(wid: vec3<u32>, lid: u32) -> u32 {
    return flat_group(wid) * WG + lid;
}

@compute @workgroup_size(WG)
fn add_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid);
    if (i < params.n) {
        out[i] = a[i] + b[i];
    }
}

@compute @workgroup_size(WG)
fn scale(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid);
    if (i < params.n) {
        out[i] = params.alpha * a[i];
    }
}

@compute @workgroup_size(WG)
fn add_bias_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid);
    if (i < params.n) {
        out[i] = a[i] + b[i % params.cols];
    }
}

@compute @workgroup_size(WG)
fn put_cols(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid);
    if (i < params.n) {
        let r = i / params.cols;
        out[r * params.ld + params.c0 + (i - r * params.cols)] = a[i];
    }
}

@compute @workgroup_size(WG)
fn take_cols(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid);
    if (i < params.n) {
        let r = i / params.cols;
        out[i] = a[r * params.ld + params.c0 + (i - r * params.cols)];
    }
}
