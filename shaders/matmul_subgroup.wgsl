enable subgroups;
// Every subgroup builtin below runs in control flow that is uniform across its subgroup (the only
// branches before them are subgroup-uniform: a subgroupAll exit and a ballot test), but WGSL's
// uniformity analysis works per workgroup and would reject them; Tint applies it, naga does not.
diagnostic(off, subgroup_uniformity);

// Matrix multiplication, f32, batched, with the A operand shared across a subgroup: the same
// products and the same Params as shaders/matmul.wgsl (read its header for the semantics):
//   C[z] (M, N) = alpha * op(A[z], B[z]) + beta * C[z]          beta is 0 or 1
//   NT: A (M, K), B (N, K):  C[m,n] = sum_k A[m,k] * B[n,k]     forward          y  = x W^T
//   NN: A (M, K), B (K, N):  C[m,n] = sum_k A[m,k] * B[k,n]     input gradient   dx = g W
//   TN: A (K, M), B (K, N):  C[m,n] = sum_k A[k,m] * B[k,n]     weight gradient  dW = g^T x
// Batch z = workgroup_id.z; operand X of batch z starts at element z * params.x_batch (0
// broadcasts it). C is written (=) when beta is 0 (never read) and accumulated (+=) when beta is
// 1. Nothing is saved for backward. Vec4 conditions as in matmul.wgsl (NT: K % 4 == 0; NN: K and
// N; TN: M and N); TN reads rows past K as zeros, so its K is free.
//
// matmul_nt_subgroup, matmul_nn_subgroup, matmul_tn_subgroup: one invocation computes a
// BM x BN = 32 x 8 block of C in registers, as 8 x 2 mat4x4 accumulators (c<i><j>: rows 4i..4i+3,
// columns 4j..4j+3 of the block). A workgroup is WG = 64 invocations in a row: all of them work
// on the same BM rows (columns (wid.x * WG + local_invocation_index) * BN ...), so every
// subgroup, whatever its size and whichever invocations it holds, needs the same 32 x 4 slice of
// A at each step of K. Subgroup lanes 0..7 load it, four vec4 each (lane l: the vec4 of rows
// l, l+8, l+16, l+24; TN: the columns 4l..4l+3 of each of the 4 rows of K), and
// subgroupBroadcast (lane indices are constants, as WGSL requires) hands them to every lane;
// each lane loads its own 8 columns of B. Dispatch (ceil(N / (WG*BN)), ceil(M / BM), batch).
// Correct for any subgroup size and layout: sharing needs only lanes 0..7 present in the
// subgroup (a ballot checks it once: true in every subgroup of size >= 8 that the workgroup
// fills); otherwise (size 4, or a partial subgroup without them) the lane runs a second copy of
// the K loop that loads its own 32 rows of A (params.own_loads forces that copy, for tests).
// The choice is made once, outside the loop: lavapipe runs both sides of every branch under a
// mask, and a branch inside the loop cost a third of the speed. A subgroup whose lanes all lie
// past the M or N edge returns at once (uniformly); within a subgroup, loads past the edges read
// a clamped, valid row or column and stores are guarded, as in matmul.wgsl. Accumulation order
// (fma in k order) is the vec4 kernels'.
// Why: on lavapipe every storage load is a loop over the SIMD lanes (see matmul.wgsl), so the
// cost follows the load instructions per multiply-add. Per step of 4 in K a lane issues 4 A
// loads (shared) + 8 B loads for 1024 multiply-adds, where the 16 x 16 vec4 kernel issues
// 16 + 16; broadcasts with constant lane indices compile to register extracts there (removing
// them changed nothing measurable). The block is tall (32 x 8) because only A is shared:
// 32/8 + 8 = 12 loads a step, where 16 x 16 would be 16/8 + 16 = 18. Measured on lavapipe
// (Mesa 22.3, 8-lane subgroups, 2 shared cores; best of 6 interleaved runs): 1.56x the vec4
// kernel at 1024^3 NT, 1.44x NN, 1.34x TN, 1.4x on 1536 x 576 x 512. The rest of the time is
// the fma chains, the accumulators' masked stores and spills, which sharing does not touch.
// Not measured on a hardware GPU, where loads coalesce and this sharing may not pay.

// Invocations per workgroup (one row of WG lanes, x only).
const WG: u32 = 64u;
// Register block: rows (BM) x columns (BN) of C per invocation; the bodies are written out for
// 32 x 8 (8 x 2 mat4x4 accumulators) and 8 loader lanes.
const BM: u32 = 32u;
const BN: u32 = 8u;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    // Test switch (matmul.wgsl's _pad0, 0 there): nonzero takes the own-loads branch, which a
    // device takes by itself only where the loaders are missing (subgroup size 4), so the tests
    // can run it where that never happens. A uniform, not an override: no second pipeline.
    own_loads: u32,
    // Batch strides in elements (0 broadcasts).
    a_batch: u32,
    b_batch: u32,
    c_batch: u32,
    _pad1: u32,
    // Element strides of matmul.wgsl's plain kernel; unused here.
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
@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;         // NT, NN: (M, K); TN: (K, M), four elements a load
@group(0) @binding(2) var<storage, read> b4: array<vec4<f32>>;         // NT: (N, K); NN, TN: (K, N), four elements a load
@group(0) @binding(3) var<storage, read_write> c: array<f32>;          // (M, N)

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

// Stores the 4 x 4 block c (c[j][i] = C[row + i, col + j]) through `store`.
fn store4x4(z: u32, row: u32, col: u32, c: mat4x4<f32>) {
    for (var j = 0u; j < 4u; j++) {
        for (var i = 0u; i < 4u; i++) {
            store(z, row + i, col + j, c[j][i]);
        }
    }
}

// The 32 x 8 block of accumulators of one invocation: c<i><j> holds rows 4i..4i+3 and columns
// 4j..4j+3 of the block (c<i><j>[j'][i'] = C[m0 + 4i + i', n0 + 4j + j']).
struct Acc {
    c00: mat4x4<f32>, c01: mat4x4<f32>, c10: mat4x4<f32>, c11: mat4x4<f32>,
    c20: mat4x4<f32>, c21: mat4x4<f32>, c30: mat4x4<f32>, c31: mat4x4<f32>,
    c40: mat4x4<f32>, c41: mat4x4<f32>, c50: mat4x4<f32>, c51: mat4x4<f32>,
    c60: mat4x4<f32>, c61: mat4x4<f32>, c70: mat4x4<f32>, c71: mat4x4<f32>,
}

// Stores the block at (m0, n0).
fn store_acc(z: u32, m0: u32, n0: u32, acc: Acc) {
    let c = array(acc.c00, acc.c01, acc.c10, acc.c11, acc.c20, acc.c21, acc.c30, acc.c31,
                  acc.c40, acc.c41, acc.c50, acc.c51, acc.c60, acc.c61, acc.c70, acc.c71);
    for (var i = 0u; i < 8u; i++) {
        for (var j = 0u; j < 2u; j++) {
            store4x4(z, m0 + 4u * i, n0 + 4u * j, c[2u * i + j]);
        }
    }
}

// Whether subgroup lanes 0..7 (the loaders) are all here, so the shared loads are complete.
// Subgroup-uniform (every lane gets the same ballot).
fn loaders_present() -> bool {
    return (subgroupBallot(true).x & 0xffu) == 0xffu;
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

// Lanes 0..3 (lo) or 4..7 (hi) of v, as the rows of a matrix: column q holds component q of
// each lane's v. NT/NN: four consecutive rows of A over 4 values of k, i.e. one x factor.
fn rows_lo(v: vec4<f32>) -> mat4x4<f32> {
    return transpose(mat4x4(subgroupBroadcast(v, 0u), subgroupBroadcast(v, 1u), subgroupBroadcast(v, 2u), subgroupBroadcast(v, 3u)));
}

fn rows_hi(v: vec4<f32>) -> mat4x4<f32> {
    return transpose(mat4x4(subgroupBroadcast(v, 4u), subgroupBroadcast(v, 5u), subgroupBroadcast(v, 6u), subgroupBroadcast(v, 7u)));
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

// One step of 4 in k over the whole block: x<i> as in mac for rows 4i..4i+3 (x<i>[kq][r] =
// A[m0+4i+r, k+kq]), w<j> for columns 4j..4j+3 (w<j>[c][kq] = B-side value of column n0+4j+c).
fn mac32x8(a: Acc, x0: mat4x4<f32>, x1: mat4x4<f32>, x2: mat4x4<f32>, x3: mat4x4<f32>, x4: mat4x4<f32>,
           x5: mat4x4<f32>, x6: mat4x4<f32>, x7: mat4x4<f32>, w0: mat4x4<f32>, w1: mat4x4<f32>) -> Acc {
    return Acc(
        mac(a.c00, x0, w0), mac(a.c01, x0, w1), mac(a.c10, x1, w0), mac(a.c11, x1, w1),
        mac(a.c20, x2, w0), mac(a.c21, x2, w1), mac(a.c30, x3, w0), mac(a.c31, x3, w1),
        mac(a.c40, x4, w0), mac(a.c41, x4, w1), mac(a.c50, x5, w0), mac(a.c51, x5, w1),
        mac(a.c60, x6, w0), mac(a.c61, x6, w1), mac(a.c70, x7, w0), mac(a.c71, x7, w1),
    );
}

@compute @workgroup_size(WG)
fn matmul_nt_subgroup(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let m0 = wid.y * BM;
    let n0 = (wid.x * WG + li) * BN;
    if (subgroupAll(m0 >= params.m || n0 >= params.n)) { return; }
    let share = loaders_present() && params.own_loads == 0u;
    let z = wid.z;
    let kv = params.k / 4u;
    let q = vec4(0u, 1u, 2u, 3u);
    let last = vec4(params.m - 1u);
    let abase = z * (params.a_batch / 4u);
    let bbase = z * (params.b_batch / 4u);
    // Rows n0+4j .. n0+4j+3 of B (vec4 starts, clamped).
    let rb0 = bbase + min(n0 + q, vec4(params.n - 1u)) * kv;
    let rb1 = bbase + min(n0 + 4u + q, vec4(params.n - 1u)) * kv;
    var acc = Acc();
    // One loop or the other: the branch is subgroup-uniform, and outside the loop because
    // lavapipe runs both sides of every branch under a mask.
    if (share) {
        // This lane's rows of A: m0 + lane%8 + 8t, t = 0..3.
        let rl = abase + min(m0 + lane % 8u + 8u * q, last) * kv;
        for (var kk = 0u; kk < kv; kk++) {
            let l = rl + kk;
            let v0 = a4[l.x];
            let v1 = a4[l.y];
            let v2 = a4[l.z];
            let v3 = a4[l.w];
            acc = mac32x8(acc, rows_lo(v0), rows_hi(v0), rows_lo(v1), rows_hi(v1),
                          rows_lo(v2), rows_hi(v2), rows_lo(v3), rows_hi(v3),
                          cols_b(rb0 + kk), cols_b(rb1 + kk));
        }
    } else {
        // Rows m0+4i .. m0+4i+3 of A.
        let ra0 = abase + min(m0 + q, last) * kv;
        let ra1 = abase + min(m0 + 4u + q, last) * kv;
        let ra2 = abase + min(m0 + 8u + q, last) * kv;
        let ra3 = abase + min(m0 + 12u + q, last) * kv;
        let ra4 = abase + min(m0 + 16u + q, last) * kv;
        let ra5 = abase + min(m0 + 20u + q, last) * kv;
        let ra6 = abase + min(m0 + 24u + q, last) * kv;
        let ra7 = abase + min(m0 + 28u + q, last) * kv;
        for (var kk = 0u; kk < kv; kk++) {
            acc = mac32x8(acc, transpose(cols_a(ra0 + kk)), transpose(cols_a(ra1 + kk)),
                          transpose(cols_a(ra2 + kk)), transpose(cols_a(ra3 + kk)),
                          transpose(cols_a(ra4 + kk)), transpose(cols_a(ra5 + kk)),
                          transpose(cols_a(ra6 + kk)), transpose(cols_a(ra7 + kk)),
                          cols_b(rb0 + kk), cols_b(rb1 + kk));
        }
    }
    store_acc(z, m0, n0, acc);
}

@compute @workgroup_size(WG)
fn matmul_nn_subgroup(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let m0 = wid.y * BM;
    let n0 = (wid.x * WG + li) * BN;
    if (subgroupAll(m0 >= params.m || n0 >= params.n)) { return; }
    let share = loaders_present() && params.own_loads == 0u;
    let z = wid.z;
    let kv = params.k / 4u;
    let nv = params.n / 4u;
    let q = vec4(0u, 1u, 2u, 3u);
    let last = vec4(params.m - 1u);
    let abase = z * (params.a_batch / 4u);
    let bbase = z * (params.b_batch / 4u);
    // Columns n0 .. n0+3 and n0+4 .. n0+7 of B: the vec4 at cb<j> of each row, clamped.
    let cb0 = bbase + min(n0 / 4u, nv - 1u);
    let cb1 = bbase + min(n0 / 4u + 1u, nv - 1u);
    var acc = Acc();
    // A as in matmul_nt_subgroup; rows 4kk .. 4kk+3 of B at rk (in vec4).
    if (share) {
        let rl = abase + min(m0 + lane % 8u + 8u * q, last) * kv;
        for (var kk = 0u; kk < kv; kk++) {
            let l = rl + kk;
            let v0 = a4[l.x];
            let v1 = a4[l.y];
            let v2 = a4[l.z];
            let v3 = a4[l.w];
            let rk = (4u * kk + q) * nv;
            acc = mac32x8(acc, rows_lo(v0), rows_hi(v0), rows_lo(v1), rows_hi(v1),
                          rows_lo(v2), rows_hi(v2), rows_lo(v3), rows_hi(v3),
                          transpose(cols_b(cb0 + rk)), transpose(cols_b(cb1 + rk)));
        }
    } else {
        let ra0 = abase + min(m0 + q, last) * kv;
        let ra1 = abase + min(m0 + 4u + q, last) * kv;
        let ra2 = abase + min(m0 + 8u + q, last) * kv;
        let ra3 = abase + min(m0 + 12u + q, last) * kv;
        let ra4 = abase + min(m0 + 16u + q, last) * kv;
        let ra5 = abase + min(m0 + 20u + q, last) * kv;
        let ra6 = abase + min(m0 + 24u + q, last) * kv;
        let ra7 = abase + min(m0 + 28u + q, last) * kv;
        for (var kk = 0u; kk < kv; kk++) {
            let rk = (4u * kk + q) * nv;
            acc = mac32x8(acc, transpose(cols_a(ra0 + kk)), transpose(cols_a(ra1 + kk)),
                          transpose(cols_a(ra2 + kk)), transpose(cols_a(ra3 + kk)),
                          transpose(cols_a(ra4 + kk)), transpose(cols_a(ra5 + kk)),
                          transpose(cols_a(ra6 + kk)), transpose(cols_a(ra7 + kk)),
                          transpose(cols_b(cb0 + rk)), transpose(cols_b(cb1 + rk)));
        }
    }
    store_acc(z, m0, n0, acc);
}

// The x factor of rows 4i..4i+3 from the four k-rows of A held by lane i: column kq is lane
// i's v<kq> (A[k0+kq, m0+4i .. m0+4i+3]).
fn cols_of_lane0(v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>) -> mat4x4<f32> {
    return mat4x4(subgroupBroadcast(v0, 0u), subgroupBroadcast(v1, 0u), subgroupBroadcast(v2, 0u), subgroupBroadcast(v3, 0u));
}
fn cols_of_lane1(v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>) -> mat4x4<f32> {
    return mat4x4(subgroupBroadcast(v0, 1u), subgroupBroadcast(v1, 1u), subgroupBroadcast(v2, 1u), subgroupBroadcast(v3, 1u));
}
fn cols_of_lane2(v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>) -> mat4x4<f32> {
    return mat4x4(subgroupBroadcast(v0, 2u), subgroupBroadcast(v1, 2u), subgroupBroadcast(v2, 2u), subgroupBroadcast(v3, 2u));
}
fn cols_of_lane3(v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>) -> mat4x4<f32> {
    return mat4x4(subgroupBroadcast(v0, 3u), subgroupBroadcast(v1, 3u), subgroupBroadcast(v2, 3u), subgroupBroadcast(v3, 3u));
}
fn cols_of_lane4(v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>) -> mat4x4<f32> {
    return mat4x4(subgroupBroadcast(v0, 4u), subgroupBroadcast(v1, 4u), subgroupBroadcast(v2, 4u), subgroupBroadcast(v3, 4u));
}
fn cols_of_lane5(v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>) -> mat4x4<f32> {
    return mat4x4(subgroupBroadcast(v0, 5u), subgroupBroadcast(v1, 5u), subgroupBroadcast(v2, 5u), subgroupBroadcast(v3, 5u));
}
fn cols_of_lane6(v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>) -> mat4x4<f32> {
    return mat4x4(subgroupBroadcast(v0, 6u), subgroupBroadcast(v1, 6u), subgroupBroadcast(v2, 6u), subgroupBroadcast(v3, 6u));
}
fn cols_of_lane7(v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>) -> mat4x4<f32> {
    return mat4x4(subgroupBroadcast(v0, 7u), subgroupBroadcast(v1, 7u), subgroupBroadcast(v2, 7u), subgroupBroadcast(v3, 7u));
}

@compute @workgroup_size(WG)
fn matmul_tn_subgroup(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let m0 = wid.y * BM;
    let n0 = (wid.x * WG + li) * BN;
    if (subgroupAll(m0 >= params.m || n0 >= params.n)) { return; }
    let share = loaders_present() && params.own_loads == 0u;
    let z = wid.z;
    let mv = params.m / 4u;
    let nv = params.n / 4u;
    let q = vec4(0u, 1u, 2u, 3u);
    let abase = z * (params.a_batch / 4u);
    let bbase = z * (params.b_batch / 4u);
    let cb0 = bbase + min(n0 / 4u, nv - 1u);
    let cb1 = bbase + min(n0 / 4u + 1u, nv - 1u);
    var acc = Acc();
    // Each step takes rows k0 .. k0+3 of A and B (clamped; those past K read as zeros).
    if (share) {
        // This lane's columns of A: m0 + 4 * (lane%8) .. +3 (a vec4 in each row).
        let cl = abase + min(m0 / 4u + lane % 8u, mv - 1u);
        for (var k0 = 0u; k0 < params.k; k0 += 4u) {
            let live = k0 + q < vec4(params.k);
            let rk = min(k0 + q, vec4(params.k - 1u));
            let v = cols_a_live(cl + rk * mv, live);
            let kb = rk * nv;
            acc = mac32x8(acc, cols_of_lane0(v[0], v[1], v[2], v[3]), cols_of_lane1(v[0], v[1], v[2], v[3]),
                          cols_of_lane2(v[0], v[1], v[2], v[3]), cols_of_lane3(v[0], v[1], v[2], v[3]),
                          cols_of_lane4(v[0], v[1], v[2], v[3]), cols_of_lane5(v[0], v[1], v[2], v[3]),
                          cols_of_lane6(v[0], v[1], v[2], v[3]), cols_of_lane7(v[0], v[1], v[2], v[3]),
                          transpose(cols_b_live(cb0 + kb, live)), transpose(cols_b_live(cb1 + kb, live)));
        }
    } else {
        // Columns m0+4i .. m0+4i+3 of A.
        let ca0 = abase + min(m0 / 4u, mv - 1u);
        let ca1 = abase + min(m0 / 4u + 1u, mv - 1u);
        let ca2 = abase + min(m0 / 4u + 2u, mv - 1u);
        let ca3 = abase + min(m0 / 4u + 3u, mv - 1u);
        let ca4 = abase + min(m0 / 4u + 4u, mv - 1u);
        let ca5 = abase + min(m0 / 4u + 5u, mv - 1u);
        let ca6 = abase + min(m0 / 4u + 6u, mv - 1u);
        let ca7 = abase + min(m0 / 4u + 7u, mv - 1u);
        for (var k0 = 0u; k0 < params.k; k0 += 4u) {
            let live = k0 + q < vec4(params.k);
            let rk = min(k0 + q, vec4(params.k - 1u));
            let ka = rk * mv;
            let kb = rk * nv;
            acc = mac32x8(acc, cols_a_live(ca0 + ka, live), cols_a_live(ca1 + ka, live),
                          cols_a_live(ca2 + ka, live), cols_a_live(ca3 + ka, live),
                          cols_a_live(ca4 + ka, live), cols_a_live(ca5 + ka, live),
                          cols_a_live(ca6 + ka, live), cols_a_live(ca7 + ka, live),
                          transpose(cols_b_live(cb0 + kb, live)), transpose(cols_b_live(cb1 + kb, live)));
        }
    }
    store_acc(z, m0, n0, acc);
}
