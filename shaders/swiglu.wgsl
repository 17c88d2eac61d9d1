// SwiGLU, the activation of the Llama MLP: act_fn(gate_proj(x)) * up_proj(x) with act_fn = SiLU.
//   sigma(g)   = 1 / (1 + exp(-g))
//   silu(g)    = g * sigma(g)
//   out[i]     = silu(gate[i]) * up[i]
// Backward (dout = dL/dout):
//   dgate[i]   = dout[i] * up[i] * sigma(g) * (1 + g * (1 - sigma(g)))     (g = gate[i])
//   dup[i]     = dout[i] * silu(g)
// sigma is evaluated as 1/(1 + e^-g) for g >= 0 and e^g/(1 + e^g) for g < 0, so the exponent is
// never positive and nothing overflows for large |g| (sigma -> 0 or 1 exactly, silu -> 0 or g).
//
// All tensors are (..., I), flattened to NE = numel elements.
// swiglu_forward:  one invocation per element; ceil(NE / WG) workgroups split over x and y past
//                  65535 (flat workgroup index = wid.x + wid.y * 65535); writes out (=).
//                  Backward needs gate and up (the inputs), nothing else is saved.
// swiglu_backward: same geometry; writes dgate (=) and dup (=) in one pass.

const WG: u32 = 128u;

struct Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> gate: array<f32>;          // (NE)
@group(0) @binding(2) var<storage, read> up: array<f32>;            // (NE)
@group(0) @binding(3) var<storage, read> dout: array<f32>;          // (NE)
@group(0) @binding(4) var<storage, read_write> out: array<f32>;     // (NE) out (forward) / dgate (backward)
@group(0) @binding(5) var<storage, read_write> dup: array<f32>;     // (NE)

fn flat_index(wid: vec3<u32>, lid: u32) -> u32 {
    return flat_group(wid) * WG + lid;
}

fn sigmoid(g: f32) -> f32 {
    if (g >= 0.0) {
        return 1.0 / (1.0 + exp(-g));
    }
    let e = exp(g);
    return e / (1.0 + e);
}

@compute @workgroup_size(WG)
fn swiglu_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid);
    if (i >= params.n) { return; }
    let g = gate[i];
    out[i] = g * sigmoid(g) * up[i];
}

@compute @workgroup_size(WG)
fn swiglu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid);
    if (i >= params.n) { return; }
    let g = gate[i];
    let s = sigmoid(g);
    let d = dout[i];
    out[i] = d * up[i] * s * (1.0 + g * (1.0 - s));
    dup[i] = d * (g * s);
}
