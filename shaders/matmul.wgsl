// Matrix multiplication, f32, batched, without materialised transposes:
//   C[z] (M, N) = alpha * op(A[z], B[z]) + beta * C[z]          beta is 0 or 1
//   NT: A (M, K), B (N, K):  C[m,n] = sum_k A[m,k] * B[n,k]     forward          y  = x W^T
//   NN: A (M, K), B (K, N):  C[m,n] = sum_k A[m,k] * B[k,n]     input gradient   dx = g W
//   TN: A (K, M), B (K, N):  C[m,n] = sum_k A[k,m] * B[k,n]     weight gradient  dW = g^T x
// Batch z = workgroup_id.z; operand X of batch z starts at element z * params.x_batch, so a batch
// stride of 0 broadcasts that operand over the batch. C is written (=) when beta is 0 (its old
// contents are never read, NaN included) and accumulated (+=) when beta is 1. Nothing is saved for
// backward here: src/ops/matmul.rs keeps the operands the gradients need.
//
// matmul_nt_vec4, matmul_nn_vec4, matmul_tn_vec4: one invocation computes a BM x BN = 16 x 16
// block of C in registers, as 4 x 4 accumulators of type mat4x4 (c<i><j> holds rows 4i..4i+3 and
// columns 4j..4j+3 of the block; column j' of the matrix is a column of C). A workgroup is WG x WG
// invocations, a tile of WG*BM rows and WG*BN columns. Dispatch
// (ceil(N / (WG*BN)), ceil(M / (WG*BM)), batch). Operands are read as vec4 along their contiguous
// dimension, which must be a multiple of 4 (NT: K; NN: K and N; TN: M and N; the batch strides
// then are too); four such loads make one mat4x4 factor. Loads past the M or N edge read a
// clamped, valid row or column (no branch in the inner loop); stores are guarded. TN steps K by 4
// and reads rows past K as zeros, so its K is free.
// Why this shape: on lavapipe (Mesa's CPU Vulkan driver) every storage load becomes a loop over
// the SIMD lanes with a bounds check per component, so throughput follows the loaded components
// per multiply-add: a 16 x 16 block does 8 multiply-adds per loaded float (8 x 8: 4), and a vec4
// load shares the per-lane loop over four components. Measured there (NT 1024^3, GFLOP per CPU
// second, one driver thread): plain kernel 0.4, 4 x 4 block 4.7, 8 x 8 8, 16 x 8 9.5, 16 x 16
// 10.5-11, 16 x 32 and 32 x 16 the same within noise at 2-4x the pipeline compile time (16 x 16
// compiles in about 5 CPU seconds per entry point, once: Mesa caches it on disk); workgroup side 4:
// 7, 16: 10; staging A in workgroup memory: 7 (it moves the same per-lane loads there and adds
// barriers). The loads are still about 70% of the time.
//
// matmul_strided: the plain kernel, one invocation per element of C, any shape and any
// transposes through element strides; dispatch (ceil(N / WG), ceil(M / WG), batch). Used when the
// vec4 conditions do not hold, and as the test oracle of the vec4 kernels.

// Workgroup side: WG x WG invocations in every entry point.
const WG: u32 = 8u;
// Register block of the vec4 kernels: rows (BM) x columns (BN) of C per invocation. The kernel
// bodies are written out for 16 x 16 (4 x 4 mat4x4 accumulators).
const BM: u32 = 16u;
const BN: u32 = 16u;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    _pad0: u32,
    // Batch strides in elements (0 broadcasts).
    a_batch: u32,
    b_batch: u32,
    c_batch: u32,
    _pad1: u32,
    // Element strides of the plain kernel: A[m,k] at a_sm*m + a_sk*k, B[k,n] at b_sk*k + b_sn*n.
    a_sm: u32,
    a_sk: u32,
    b_sk: u32,
    b_sn: u32,
    alpha: f32,
    beta: f32,
    _pad2: u32,
    _pad3: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;                // NT, NN: (M, K); TN: (K, M)
@group(0) @binding(2) var<storage, read> b: array<f32>;                // NT: (N, K); NN, TN: (K, N)
@group(0) @binding(3) var<storage, read> a4: array<vec4<f32>>;         // as `a`, four elements a load
@group(0) @binding(4) var<storage, read> b4: array<vec4<f32>>;         // as `b`, four elements a load
@group(0) @binding(5) var<storage, read_write> c: array<f32>;          // (M, N)

// C[row, col] = alpha * v + beta * C[row, col], when (row, col) lies inside C.
fn store(z: u32, row: u32, col: u32, v: f32) {
    if (row < params.m && col < params.n) {
        let i = z * params.c_batch + row * params.n + col;
        var r = params.alpha * v;
        if (params.beta != 0.0) {
            r = r + params.beta * c[i];
        }
        c[i] = r;
    }
}

// The four vec4 at a4[i.x], a4[i.y], a4[i.z], a4[i.w] as the columns of a matrix.
fn cols_a(i: vec4<u32>) -> mat4x4<f32> {
    return mat4x4(a4[i.x], a4[i.y], a4[i.z], a4[i.w]);
}

fn cols_b(i: vec4<u32>) -> mat4x4<f32> {
    return mat4x4(b4[i.x], b4[i.y], b4[i.z], b4[i.w]);
}

// As cols_a / cols_b, with column q zero where live[q] is false (rows past K in TN).
fn cols_a_live(i: vec4<u32>, live: vec4<bool>) -> mat4x4<f32> {
    let z = vec4(0.0);
    return mat4x4(
        select(z, a4[i.x], live.x),
        select(z, a4[i.y], live.y),
        select(z, a4[i.z], live.z),
        select(z, a4[i.w], live.w),
    );
}

fn cols_b_live(i: vec4<u32>, live: vec4<bool>) -> mat4x4<f32> {
    let z = vec4(0.0);
    return mat4x4(
        select(z, b4[i.x], live.x),
        select(z, b4[i.y], live.y),
        select(z, b4[i.z], live.z),
        select(z, b4[i.w], live.w),
    );
}

// c + x * w, each product accumulated straight into c in k order (one fma per multiply-add):
// column j of the result is c[j] + sum_q x[q] * w[j][q].
fn mac(c: mat4x4<f32>, x: mat4x4<f32>, w: mat4x4<f32>) -> mat4x4<f32> {
    return mat4x4(
        fma(x[3], vec4(w[0].w), fma(x[2], vec4(w[0].z), fma(x[1], vec4(w[0].y), fma(x[0], vec4(w[0].x), c[0])))),
        fma(x[3], vec4(w[1].w), fma(x[2], vec4(w[1].z), fma(x[1], vec4(w[1].y), fma(x[0], vec4(w[1].x), c[1])))),
        fma(x[3], vec4(w[2].w), fma(x[2], vec4(w[2].z), fma(x[1], vec4(w[2].y), fma(x[0], vec4(w[2].x), c[2])))),
        fma(x[3], vec4(w[3].w), fma(x[2], vec4(w[3].z), fma(x[1], vec4(w[3].y), fma(x[0], vec4(w[3].x), c[3])))),
    );
}

// Stores the 4 x 4 block c (c[j][i] = C[row + i, col + j]) through `store`.
fn store4x4(z: u32, row: u32, col: u32, c: mat4x4<f32>) {
    for (var j = 0u; j < 4u; j++) {
        for (var i = 0u; i < 4u; i++) {
            store(z, row + i, col + j, c[j][i]);
        }
    }
}

// Stores the 16 x 16 block of accumulators at (m0, n0).
fn store16x16(z: u32, m0: u32, n0: u32, c: array<mat4x4<f32>, 16>) {
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            store4x4(z, m0 + 4u * i, n0 + 4u * j, c[4u * i + j]);
        }
    }
}

@compute @workgroup_size(WG, WG)
fn matmul_nt_vec4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let m0 = (wid.y * WG + lid.y) * BM;
    let n0 = (wid.x * WG + lid.x) * BN;
    if (m0 >= params.m || n0 >= params.n) { return; }
    let z = wid.z;
    let kv = params.k / 4u;
    let q = vec4(0u, 1u, 2u, 3u);
    // Starts (in vec4) of rows m0+4i .. m0+4i+3 of A and n0+4j .. n0+4j+3 of B, clamped.
    let abase = z * (params.a_batch / 4u);
    let bbase = z * (params.b_batch / 4u);
    let ra0 = abase + min(m0 + q, vec4(params.m - 1u)) * kv;
    let ra1 = abase + min(m0 + 4u + q, vec4(params.m - 1u)) * kv;
    let ra2 = abase + min(m0 + 8u + q, vec4(params.m - 1u)) * kv;
    let ra3 = abase + min(m0 + 12u + q, vec4(params.m - 1u)) * kv;
    let rb0 = bbase + min(n0 + q, vec4(params.n - 1u)) * kv;
    let rb1 = bbase + min(n0 + 4u + q, vec4(params.n - 1u)) * kv;
    let rb2 = bbase + min(n0 + 8u + q, vec4(params.n - 1u)) * kv;
    let rb3 = bbase + min(n0 + 12u + q, vec4(params.n - 1u)) * kv;
    var c00 = mat4x4<f32>(); var c01 = mat4x4<f32>(); var c02 = mat4x4<f32>(); var c03 = mat4x4<f32>();
    var c10 = mat4x4<f32>(); var c11 = mat4x4<f32>(); var c12 = mat4x4<f32>(); var c13 = mat4x4<f32>();
    var c20 = mat4x4<f32>(); var c21 = mat4x4<f32>(); var c22 = mat4x4<f32>(); var c23 = mat4x4<f32>();
    var c30 = mat4x4<f32>(); var c31 = mat4x4<f32>(); var c32 = mat4x4<f32>(); var c33 = mat4x4<f32>();
    for (var kk = 0u; kk < kv; kk++) {
        // x<i>[kq][r] = A[m0+4i+r, 4kk+kq] (4 rows x 4 k), w<j>[c][kq] = B[n0+4j+c, 4kk+kq] (4 k x 4 columns).
        let x0 = transpose(cols_a(ra0 + kk));
        let x1 = transpose(cols_a(ra1 + kk));
        let x2 = transpose(cols_a(ra2 + kk));
        let x3 = transpose(cols_a(ra3 + kk));
        let w0 = cols_b(rb0 + kk);
        let w1 = cols_b(rb1 + kk);
        let w2 = cols_b(rb2 + kk);
        let w3 = cols_b(rb3 + kk);
        c00 = mac(c00, x0, w0); c01 = mac(c01, x0, w1); c02 = mac(c02, x0, w2); c03 = mac(c03, x0, w3);
        c10 = mac(c10, x1, w0); c11 = mac(c11, x1, w1); c12 = mac(c12, x1, w2); c13 = mac(c13, x1, w3);
        c20 = mac(c20, x2, w0); c21 = mac(c21, x2, w1); c22 = mac(c22, x2, w2); c23 = mac(c23, x2, w3);
        c30 = mac(c30, x3, w0); c31 = mac(c31, x3, w1); c32 = mac(c32, x3, w2); c33 = mac(c33, x3, w3);
    }
    store16x16(z, m0, n0, array(c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33));
}

@compute @workgroup_size(WG, WG)
fn matmul_nn_vec4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let m0 = (wid.y * WG + lid.y) * BM;
    let n0 = (wid.x * WG + lid.x) * BN;
    if (m0 >= params.m || n0 >= params.n) { return; }
    let z = wid.z;
    let kv = params.k / 4u;
    let nv = params.n / 4u;
    let q = vec4(0u, 1u, 2u, 3u);
    // Starts (in vec4) of rows m0+4i .. m0+4i+3 of A; columns n0+4j .. n0+4j+3 of B are the
    // vec4 at cb<j> of each row, clamped.
    let abase = z * (params.a_batch / 4u);
    let bbase = z * (params.b_batch / 4u);
    let ra0 = abase + min(m0 + q, vec4(params.m - 1u)) * kv;
    let ra1 = abase + min(m0 + 4u + q, vec4(params.m - 1u)) * kv;
    let ra2 = abase + min(m0 + 8u + q, vec4(params.m - 1u)) * kv;
    let ra3 = abase + min(m0 + 12u + q, vec4(params.m - 1u)) * kv;
    let cb0 = bbase + min(n0 / 4u, nv - 1u);
    let cb1 = bbase + min(n0 / 4u + 1u, nv - 1u);
    let cb2 = bbase + min(n0 / 4u + 2u, nv - 1u);
    let cb3 = bbase + min(n0 / 4u + 3u, nv - 1u);
    var c00 = mat4x4<f32>(); var c01 = mat4x4<f32>(); var c02 = mat4x4<f32>(); var c03 = mat4x4<f32>();
    var c10 = mat4x4<f32>(); var c11 = mat4x4<f32>(); var c12 = mat4x4<f32>(); var c13 = mat4x4<f32>();
    var c20 = mat4x4<f32>(); var c21 = mat4x4<f32>(); var c22 = mat4x4<f32>(); var c23 = mat4x4<f32>();
    var c30 = mat4x4<f32>(); var c31 = mat4x4<f32>(); var c32 = mat4x4<f32>(); var c33 = mat4x4<f32>();
    for (var kk = 0u; kk < kv; kk++) {
        // Rows 4kk .. 4kk+3 of B, in vec4.
        let rk = (4u * kk + q) * nv;
        let x0 = transpose(cols_a(ra0 + kk));
        let x1 = transpose(cols_a(ra1 + kk));
        let x2 = transpose(cols_a(ra2 + kk));
        let x3 = transpose(cols_a(ra3 + kk));
        let w0 = transpose(cols_b(cb0 + rk));
        let w1 = transpose(cols_b(cb1 + rk));
        let w2 = transpose(cols_b(cb2 + rk));
        let w3 = transpose(cols_b(cb3 + rk));
        c00 = mac(c00, x0, w0); c01 = mac(c01, x0, w1); c02 = mac(c02, x0, w2); c03 = mac(c03, x0, w3);
        c10 = mac(c10, x1, w0); c11 = mac(c11, x1, w1); c12 = mac(c12, x1, w2); c13 = mac(c13, x1, w3);
        c20 = mac(c20, x2, w0); c21 = mac(c21, x2, w1); c22 = mac(c22, x2, w2); c23 = mac(c23, x2, w3);
        c30 = mac(c30, x3, w0); c31 = mac(c31, x3, w1); c32 = mac(c32, x3, w2); c33 = mac(c33, x3, w3);
    }
    store16x16(z, m0, n0, array(c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33));
}

@compute @workgroup_size(WG, WG)
fn matmul_tn_vec4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let m0 = (wid.y * WG + lid.y) * BM;
    let n0 = (wid.x * WG + lid.x) * BN;
    if (m0 >= params.m || n0 >= params.n) { return; }
    let z = wid.z;
    let mv = params.m / 4u;
    let nv = params.n / 4u;
    let q = vec4(0u, 1u, 2u, 3u);
    // Columns m0+4i .. m0+4i+3 of A and n0+4j .. n0+4j+3 of B: the vec4 at ca<i> / cb<j> of
    // each row, clamped.
    let abase = z * (params.a_batch / 4u);
    let bbase = z * (params.b_batch / 4u);
    let ca0 = abase + min(m0 / 4u, mv - 1u);
    let ca1 = abase + min(m0 / 4u + 1u, mv - 1u);
    let ca2 = abase + min(m0 / 4u + 2u, mv - 1u);
    let ca3 = abase + min(m0 / 4u + 3u, mv - 1u);
    let cb0 = bbase + min(n0 / 4u, nv - 1u);
    let cb1 = bbase + min(n0 / 4u + 1u, nv - 1u);
    let cb2 = bbase + min(n0 / 4u + 2u, nv - 1u);
    let cb3 = bbase + min(n0 / 4u + 3u, nv - 1u);
    var c00 = mat4x4<f32>(); var c01 = mat4x4<f32>(); var c02 = mat4x4<f32>(); var c03 = mat4x4<f32>();
    var c10 = mat4x4<f32>(); var c11 = mat4x4<f32>(); var c12 = mat4x4<f32>(); var c13 = mat4x4<f32>();
    var c20 = mat4x4<f32>(); var c21 = mat4x4<f32>(); var c22 = mat4x4<f32>(); var c23 = mat4x4<f32>();
    var c30 = mat4x4<f32>(); var c31 = mat4x4<f32>(); var c32 = mat4x4<f32>(); var c33 = mat4x4<f32>();
    for (var k0 = 0u; k0 < params.k; k0 += 4u) {
        // Rows k0 .. k0+3 of A and B (clamped; those past K read as zeros).
        let live = k0 + q < vec4(params.k);
        let rk = min(k0 + q, vec4(params.k - 1u));
        let ka = rk * mv;
        let kb = rk * nv;
        let x0 = cols_a_live(ca0 + ka, live);
        let x1 = cols_a_live(ca1 + ka, live);
        let x2 = cols_a_live(ca2 + ka, live);
        let x3 = cols_a_live(ca3 + ka, live);
        let w0 = transpose(cols_b_live(cb0 + kb, live));
        let w1 = transpose(cols_b_live(cb1 + kb, live));
        let w2 = transpose(cols_b_live(cb2 + kb, live));
        let w3 = transpose(cols_b_live(cb3 + kb, live));
        c00 = mac(c00, x0, w0); c01 = mac(c01, x0, w1); c02 = mac(c02, x0, w2); c03 = mac(c03, x0, w3);
        c10 = mac(c10, x1, w0); c11 = mac(c11, x1, w1); c12 = mac(c12, x1, w2); c13 = mac(c13, x1, w3);
        c20 = mac(c20, x2, w0); c21 = mac(c21, x2, w1); c22 = mac(c22, x2, w2); c23 = mac(c23, x2, w3);
        c30 = mac(c30, x3, w0); c31 = mac(c31, x3, w1); c32 = mac(c32, x3, w2); c33 = mac(c33, x3, w3);
    }
    store16x16(z, m0, n0, array(c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33));
}

@compute @workgroup_size(WG, WG)
fn matmul_strided(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row = gid.y;
    let col = gid.x;
    if (row >= params.m || col >= params.n) { return; }
    let z = gid.z;
    var ia = z * params.a_batch + row * params.a_sm;
    var ib = z * params.b_batch + col * params.b_sn;
    var acc = 0.0;
    for (var k = 0u; k < params.k; k++) {
        acc = fma(a[ia], b[ib], acc);
        ia += params.a_sk;
        ib += params.b_sk;
    }
    store(z, row, col, acc);
}
