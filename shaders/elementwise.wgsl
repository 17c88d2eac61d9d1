// Elementwise kernels: residual add (the tape also uses it to accumulate gradients) and scale.
//
//   add_forward:  out[i] = a[i] + b[i]            (N)   out written (=)
//   scale:        out[i] = alpha * a[i]           (N)   out written (=)
//
// Dispatch: ceil(N / 256) workgroups of 256 invocations, split over x and y when above 65535
// (flat workgroup index = wid.x + wid.y * 65535).

const WG: u32 = 256u;

struct Params {
    n: u32,
    alpha: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;       // (N)
@group(0) @binding(2) var<storage, read> b: array<f32>;       // (N)
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // (N)

fn flat_index(wid: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * 65535u) * WG + lid;
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
