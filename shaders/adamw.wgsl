// AdamW as torch.optim.AdamW (single-tensor path, amsgrad off), one step t >= 1, in place:
//   param  = param * decay                              decay = 1 - lr * wd (decoupled, before the update)
//   m      = m + w1 * (g - m)                           w1 = 1 - beta1; torch: exp_avg.lerp_(grad, 1 - beta1),
//                                                       i.e. m = beta1 m + (1 - beta1) g
//   v      = v * beta2 + (w2 * g) * g                   w2 = 1 - beta2; torch: exp_avg_sq.mul_(beta2)
//                                                       .addcmul_(grad, grad, value=1 - beta2)
//   denom  = sqrt(v) / bc2_sqrt + eps                   bc2_sqrt = sqrt(1 - beta2^t)
//   param  = param + neg_step * m / denom               neg_step = -lr / (1 - beta1^t)
// The scalars are computed on the host in f64 (torch computes them as Python floats) and arrive
// here as f32, which is what torch does when a float32 tensor op takes a Python scalar.
//
// adamw_step: one invocation per element (n); ceil(n / WG) workgroups split over x and y past
//             65535 (flat workgroup index = wid.x + wid.y * 65535). Reads grad; updates param, m
//             and v in place (read, then written =). Nothing is saved (no backward).
//
// Global gradient norm and clipping, as torch.nn.utils.clip_grad_norm_ (no atomics, the same
// reduction order every run, so the norm is deterministic):
//   norm = sqrt(sum over tensors t, elements i of x_t[i]^2)
//   coef = max_norm / (norm + 1e-6);  if coef < 1: x_t[i] = x_t[i] * coef   (else unchanged)
// sumsq_partial: pass 1 for one tensor x (n): workgroup g sums the squares of its CHUNK = WG * PER
//             elements (each invocation PER of them, strided by WG, then a tree in workgroup
//             memory) and writes partials[offset + g] (=). ceil(n / CHUNK) workgroups split over
//             x and y past 65535; groups past the end write nothing.
// sumsq_final: pass 2, one workgroup: norm[0] = sqrt(sum of partials[0..n)) (=), each invocation
//             summing a strided slice, then a tree.
// clip_scale:  one invocation per element of x (n), same geometry as adamw_step: reads norm[0]
//             and max_norm, multiplies x in place when coef < 1.
// These entry points use `rparams` (binding 0, like `params` of adamw_step: an entry point binds
// only the variables it uses) and bindings 5 to 8.

const WG: u32 = 128u;
// Elements each invocation of sumsq_partial squares (mirrored by adamw::PER in Rust).
const PER: u32 = 8u;

struct Params {
    n: u32,
    decay: f32,
    w1: f32,
    beta2: f32,
    w2: f32,
    neg_step: f32,
    bc2_sqrt: f32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> grad: array<f32>;          // (n)
@group(0) @binding(2) var<storage, read_write> param: array<f32>;   // (n) updated in place
@group(0) @binding(3) var<storage, read_write> m: array<f32>;       // (n) first moment, in place
@group(0) @binding(4) var<storage, read_write> v: array<f32>;       // (n) second moment, in place

@compute @workgroup_size(WG)
fn adamw_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid) * WG + lid;
    if (i >= params.n) { return; }
    let g = grad[i];
    let p = param[i] * params.decay;
    let mi = m[i] + params.w1 * (g - m[i]);
    let vi = v[i] * params.beta2 + (params.w2 * g) * g;
    let denom = sqrt(vi) / params.bc2_sqrt + params.eps;
    m[i] = mi;
    v[i] = vi;
    param[i] = p + params.neg_step * mi / denom;
}

struct ReduceParams {
    n: u32,
    offset: u32,
    max_norm: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> rparams: ReduceParams;
@group(0) @binding(5) var<storage, read> x: array<f32>;                // (n) one gradient tensor
@group(0) @binding(6) var<storage, read_write> partials: array<f32>;   // (P) one per pass-1 workgroup
@group(0) @binding(7) var<storage, read_write> norm: array<f32>;       // (1) the global norm
@group(0) @binding(8) var<storage, read_write> y: array<f32>;          // (n) scaled in place

// The workgroup reduction is `workgroup_sum` (shaders/common.wgsl).

@compute @workgroup_size(WG)
fn sumsq_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = flat_group(wid);
    let base = g * WG * PER;
    var s = 0.0;
    for (var k = 0u; k < PER; k = k + 1u) {
        let i = base + k * WG + lid;
        if (i < rparams.n) {
            let v = x[i];
            s = s + v * v;
        }
    }
    let total = workgroup_sum(lid, s);
    if (lid == 0u && base < rparams.n) {
        partials[rparams.offset + g] = total;
    }
}

@compute @workgroup_size(WG)
fn sumsq_final(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    for (var i = lid; i < rparams.n; i = i + WG) {
        s = s + partials[i];
    }
    let total = workgroup_sum(lid, s);
    if (lid == 0u) {
        norm[0] = sqrt(total);
    }
}

@compute @workgroup_size(WG)
fn clip_scale(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid) * WG + lid;
    if (i >= rparams.n) { return; }
    let coef = rparams.max_norm / (norm[0] + 1e-6);
    if (coef < 1.0) {
        y[i] = y[i] * coef;
    }
}
