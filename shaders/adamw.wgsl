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

const WG: u32 = 256u;

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
    let i = (wid.x + wid.y * 65535u) * WG + lid;
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
