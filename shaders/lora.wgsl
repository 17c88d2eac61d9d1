// LoRA branch dropout with a seeded mask (PEFT applies nn.Dropout to the input of lora_A only):
//   keep[i]  = uniform(seed, i) >= p,   uniform(seed, i) = hash(i ^ hash(seed)) / 2^32
//   lora_dropout_forward:  out[i]   = keep[i] ? inp[i] * scale : 0        scale = 1 / (1 - p)
//   lora_dropout_backward: dinp[i] += keep[i] ? dout[i] * scale : 0       (accumulated: the LoRA
//                          branch's input gradient is added to the base path's dx = dy · W0)
// The mask is recomputed from the seed in backward (nothing saved). The hash is the "lowbias32"
// integer mixer; src/ops/lora.rs has the same function on the CPU, so the masks are identical.
// The matmuls of the LoRA linear (x·A^T, ·B^T and their gradients) run on shaders/matmul.wgsl.
//
// Dispatch: ceil(N / WG) workgroups of WG (split over x and y past 65535).

const WG: u32 = 128u;

struct Params {
    n: u32,
    seed: u32,
    p: f32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> inp: array<f32>;          // (N) x, or dout in backward
@group(0) @binding(2) var<storage, read_write> out: array<f32>;    // (N) dropped x, or dinp (+=)

fn hash32(v: u32) -> u32 {
    var x = v;
    x = x ^ (x >> 16u);
    x = x * 0x7feb352du;
    x = x ^ (x >> 15u);
    x = x * 0x846ca68bu;
    x = x ^ (x >> 16u);
    return x;
}

fn keep(i: u32) -> bool {
    let u = f32(hash32(i ^ hash32(params.seed)) >> 8u) * (1.0 / 16777216.0);
    return u >= params.p;
}

fn flat_index(wid: vec3<u32>, lid: u32) -> u32 {
    return flat_group(wid) * WG + lid;
}

@compute @workgroup_size(WG)
fn lora_dropout_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid);
    if (i >= params.n) { return; }
    out[i] = select(0.0, inp[i] * params.scale, keep(i));
}

@compute @workgroup_size(WG)
fn lora_dropout_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid);
    if (i >= params.n) { return; }
    out[i] = out[i] + select(0.0, inp[i] * params.scale, keep(i));
}
