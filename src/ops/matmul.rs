//! Matrix multiplication (shaders/matmul.wgsl): batched f32 GEMM in the three layouts training
//! needs (X W^T, G W, G^T X) with no materialised transpose, alpha scaling and beta accumulation;
//! the linear layer y = x W^T on the tape.
//!
//! Kernel choice ([`Path`], [`chosen_path`]): where the dimensions the vec4 loads run along are
//! multiples of 4 (`vec4_applies`), the subgroup kernels of shaders/matmul_subgroup.wgsl when the
//! device has subgroups (`GpuInfo::subgroups`), else the register-blocked vec4 kernels of
//! shaders/matmul.wgsl; otherwise the plain strided kernel, which is also the tests' oracle
//! (`matmul_plain_into`). Setting the environment variable `QLORA_NO_SUBGROUPS=1` (any value
//! but empty or `0`) turns the subgroup kernels off for debugging: the vec4 kernels run instead.
//! [`matmul_into_path`] forces one path (tests, benchmarks).

use crate::autograd::{Op, Tape, Var};
use crate::gpu::{groups_for, shaders, DType, GpuContext, Kernel, Tensor};
use crate::{Error, Result};

const NT_VEC4: Kernel = shaders::kernel(shaders::MATMUL, "matmul_nt_vec4", &["a4", "b4", "c"]);
const NN_VEC4: Kernel = shaders::kernel(shaders::MATMUL, "matmul_nn_vec4", &["a4", "b4", "c"]);
const TN_VEC4: Kernel = shaders::kernel(shaders::MATMUL, "matmul_tn_vec4", &["a4", "b4", "c"]);
const STRIDED: Kernel = shaders::kernel(shaders::MATMUL, "matmul_strided", &["a", "b", "c"]);
const NT_SUBGROUP: Kernel = shaders::kernel(shaders::MATMUL_SUBGROUP, "matmul_nt_subgroup", &["a4", "b4", "c"]);
const NN_SUBGROUP: Kernel = shaders::kernel(shaders::MATMUL_SUBGROUP, "matmul_nn_subgroup", &["a4", "b4", "c"]);
const TN_SUBGROUP: Kernel = shaders::kernel(shaders::MATMUL_SUBGROUP, "matmul_tn_subgroup", &["a4", "b4", "c"]);
/// Every kernel this op launches (tests/shaders.rs checks their bindings against the WGSL).
pub(crate) const KERNELS: &[Kernel] = &[NT_VEC4, NN_VEC4, TN_VEC4, STRIDED, NT_SUBGROUP, NN_SUBGROUP, TN_SUBGROUP];

/// Workgroup side of shaders/matmul.wgsl (`WG` there): every entry point runs WG x WG invocations.
pub const WG: u32 = 8;
/// Rows of C per invocation in the vec4 kernels (`BM` in shaders/matmul.wgsl).
pub const BM: u32 = 16;
/// Columns of C per invocation in the vec4 kernels (`BN` in shaders/matmul.wgsl).
pub const BN: u32 = 16;

/// Invocations per workgroup of shaders/matmul_subgroup.wgsl (`WG` there), all in x.
pub const SG_WG: u32 = 64;
/// Rows of C per invocation in the subgroup kernels (`BM` in shaders/matmul_subgroup.wgsl).
pub const SG_BM: u32 = 32;
/// Columns of C per invocation in the subgroup kernels (`BN` in shaders/matmul_subgroup.wgsl).
pub const SG_BN: u32 = 8;

/// Environment variable that turns the subgroup kernels off (`QLORA_NO_SUBGROUPS=1`).
pub const NO_SUBGROUPS_ENV: &str = "QLORA_NO_SUBGROUPS";

/// Which kernel family computes a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// What [`matmul_into`] picks ([`chosen_path`]).
    Auto,
    /// The plain strided kernel: any shape (the oracle).
    Plain,
    /// The register-blocked vec4 kernels of shaders/matmul.wgsl (`vec4_applies` must hold).
    Vec4,
    /// The subgroup kernels of shaders/matmul_subgroup.wgsl (`vec4_applies` must hold and the
    /// device must have subgroups).
    Subgroup,
    /// The subgroup kernels with every lane loading its own rows of A (`own_loads` there): the
    /// branch they take on a subgroup without lanes 0..7 (size 4), which a device of larger
    /// subgroups never takes by itself; for tests.
    SubgroupOwnLoads,
}

/// Which operand is read transposed. C (M, N) = op(A, B):
/// `NT`: A (M, K), B (N, K), C = A B^T; `NN`: A (M, K), B (K, N), C = A B;
/// `TN`: A (K, M), B (K, N), C = A^T B.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trans {
    /// C = A B^T (forward of a linear layer, x W^T).
    NT,
    /// C = A B (input gradient of a linear layer, g W).
    NN,
    /// C = A^T B (weight gradient of a linear layer, g^T x).
    TN,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    // `own_loads` in shaders/matmul_subgroup.wgsl (Path::SubgroupOwnLoads); padding elsewhere.
    own_loads: u32,
    a_batch: u32,
    b_batch: u32,
    c_batch: u32,
    _pad1: u32,
    a_sm: u32,
    a_sk: u32,
    b_sk: u32,
    b_sn: u32,
    alpha: f32,
    beta: f32,
    _pad2: u32,
    _pad3: u32,
}

/// Sizes of one product: batch count, M, N, K and the batch strides (elements, 0 = broadcast).
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    a_batch: usize,
    b_batch: usize,
}

/// Splits an operand shape into (batch or None for rank 2, rows, cols).
fn split(op: &'static str, what: &str, s: &[usize]) -> Result<(Option<usize>, usize, usize)> {
    match *s {
        [r, c] => Ok((None, r, c)),
        [b, r, c] => Ok((Some(b), r, c)),
        _ => Err(Error::shape(op, format!("{what} must have rank 2 or 3, got shape {s:?}"))),
    }
}

/// Checks the operand shapes of `op(a, b)` and returns the sizes and the output shape.
fn dims(a: &[usize], b: &[usize], trans: Trans) -> Result<(Dims, Vec<usize>)> {
    const OP: &str = "matmul";
    let (ab, ar, ac) = split(OP, "a", a)?;
    let (bb, br, bc) = split(OP, "b", b)?;
    let (m, ka) = match trans {
        Trans::NT | Trans::NN => (ar, ac),
        Trans::TN => (ac, ar),
    };
    let (n, kb) = match trans {
        Trans::NT => (br, bc),
        Trans::NN | Trans::TN => (bc, br),
    };
    if ka != kb {
        return Err(Error::shape(
            OP,
            format!("{trans:?}: a {a:?} and b {b:?} disagree on the inner dimension ({ka} vs {kb})"),
        ));
    }
    let batch = match (ab, bb) {
        (Some(x), Some(y)) if x != y => {
            return Err(Error::shape(OP, format!("batch sizes differ: a {a:?}, b {b:?}")));
        }
        (Some(x), _) | (None, Some(x)) => Some(x),
        (None, None) => None,
    };
    let d = Dims {
        batch: batch.unwrap_or(1),
        m,
        n,
        k: ka,
        a_batch: if ab.is_some() { ar * ac } else { 0 },
        b_batch: if bb.is_some() { br * bc } else { 0 },
    };
    let out = match batch {
        Some(x) => vec![x, m, n],
        None => vec![m, n],
    };
    Ok((d, out))
}

/// Whether the vec4 kernel of `trans` applies to an (M, N, K) product: the dimensions its vec4
/// loads run along are multiples of 4 (NT: K; NN: K and N; TN: M and N).
pub fn vec4_applies(trans: Trans, m: usize, n: usize, k: usize) -> bool {
    match trans {
        Trans::NT => k.is_multiple_of(4),
        Trans::NN => k.is_multiple_of(4) && n.is_multiple_of(4),
        Trans::TN => m.is_multiple_of(4) && n.is_multiple_of(4),
    }
}

/// Whether `QLORA_NO_SUBGROUPS` is set to something other than empty or `0`.
fn subgroups_disabled() -> bool {
    std::env::var_os(NO_SUBGROUPS_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// The path [`matmul_into`] takes for an (M, N, K) product of `trans` on `ctx` (never `Auto`):
/// `Subgroup` when `vec4_applies`, the device has subgroups and `QLORA_NO_SUBGROUPS` is not set;
/// `Vec4` when `vec4_applies` otherwise; else `Plain`.
pub fn chosen_path(ctx: &GpuContext, trans: Trans, m: usize, n: usize, k: usize) -> Path {
    if !vec4_applies(trans, m, n, k) {
        Path::Plain
    } else if ctx.info().subgroups && !subgroups_disabled() {
        Path::Subgroup
    } else {
        Path::Vec4
    }
}

fn to_u32(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Limit { op: "matmul", msg: format!("{what} = {v} exceeds u32 indexing") })
}

#[allow(clippy::too_many_arguments)]
fn launch(
    ctx: &GpuContext,
    a: &Tensor,
    b: &Tensor,
    trans: Trans,
    alpha: f32,
    beta: f32,
    out: &Tensor,
    path: Path,
) -> Result<()> {
    let (d, out_shape) = dims(a.shape(), b.shape(), trans)?;
    if out.shape() != out_shape.as_slice() {
        return Err(Error::shape(
            "matmul",
            format!(
                "{trans:?}: out has shape {:?}, the product of a {:?} and b {:?} is {out_shape:?}",
                out.shape(),
                a.shape(),
                b.shape()
            ),
        ));
    }
    if beta != 0.0 && beta != 1.0 {
        return Err(Error::Invalid(format!("matmul: beta must be 0 or 1, got {beta}")));
    }
    for (t, what) in [(a, "a"), (b, "b"), (out, "out")] {
        if t.dtype() != DType::F32 {
            return Err(Error::shape("matmul", format!("{what} must be f32, got {:?}", t.dtype())));
        }
    }
    if out.same_buffer(a) || out.same_buffer(b) {
        return Err(Error::Invalid("matmul: out must not share a buffer with a or b".into()));
    }
    match path {
        Path::Auto | Path::Plain => {}
        Path::Vec4 | Path::Subgroup | Path::SubgroupOwnLoads if !vec4_applies(trans, d.m, d.n, d.k) => {
            return Err(Error::Invalid(format!(
                "matmul: path {path:?} needs the vec4 conditions, which {trans:?} {}x{}x{} (M x N x K) does not meet",
                d.m, d.n, d.k
            )));
        }
        Path::Subgroup | Path::SubgroupOwnLoads if !ctx.info().subgroups => {
            return Err(Error::Invalid(format!(
                "matmul: path {path:?} needs the subgroups feature, which {} does not offer",
                ctx.info().name
            )));
        }
        Path::Vec4 | Path::Subgroup | Path::SubgroupOwnLoads => {}
    }
    if d.m == 0 || d.n == 0 || d.batch == 0 {
        return Ok(());
    }
    if d.k == 0 {
        // An empty sum: C = beta * C, i.e. zeros when beta is 0 and unchanged when beta is 1.
        if beta == 0.0 {
            let z = ctx.zeros(out.shape(), DType::F32)?;
            ctx.copy(&z, out)?;
        }
        return Ok(());
    }
    // Element strides of the logical A (M, K) and B (K, N) for the plain kernel.
    let (a_sm, a_sk) = match trans {
        Trans::NT | Trans::NN => (d.k, 1),
        Trans::TN => (1, d.m),
    };
    let (b_sk, b_sn) = match trans {
        Trans::NT => (1, d.k),
        Trans::NN | Trans::TN => (d.n, 1),
    };
    to_u32("elements", a.numel().max(b.numel()).max(out.numel()))?;
    let p = Params {
        m: d.m as u32,
        n: d.n as u32,
        k: d.k as u32,
        own_loads: u32::from(path == Path::SubgroupOwnLoads),
        a_batch: d.a_batch as u32,
        b_batch: d.b_batch as u32,
        c_batch: (d.m * d.n) as u32,
        _pad1: 0,
        a_sm: a_sm as u32,
        a_sk: a_sk as u32,
        b_sk: b_sk as u32,
        b_sn: b_sn as u32,
        alpha,
        beta,
        _pad2: 0,
        _pad3: 0,
    };
    let batch = to_u32("batch", d.batch)?;
    let path = match path {
        Path::Auto => chosen_path(ctx, trans, d.m, d.n, d.k),
        p => p,
    };
    match path {
        Path::Plain | Path::Auto => {
            let groups = [groups_for(d.n, WG as usize), groups_for(d.m, WG as usize), batch];
            ctx.dispatch(&STRIDED, &p, &[a, b, out], groups)
        }
        Path::Vec4 => {
            let kernel = match trans {
                Trans::NT => &NT_VEC4,
                Trans::NN => &NN_VEC4,
                Trans::TN => &TN_VEC4,
            };
            let groups = [
                groups_for(d.n, (WG * BN) as usize),
                groups_for(d.m, (WG * BM) as usize),
                batch,
            ];
            ctx.dispatch(kernel, &p, &[a, b, out], groups)
        }
        Path::Subgroup | Path::SubgroupOwnLoads => {
            let kernel = match trans {
                Trans::NT => &NT_SUBGROUP,
                Trans::NN => &NN_SUBGROUP,
                Trans::TN => &TN_SUBGROUP,
            };
            let groups = [groups_for(d.n, (SG_WG * SG_BN) as usize), groups_for(d.m, SG_BM as usize), batch];
            ctx.dispatch(kernel, &p, &[a, b, out], groups)
        }
    }
}

/// out = alpha * op(a, b) + beta * out, op by `trans` (see [`Trans`]); a and b have rank 2 or 3
/// (batch first; a rank-2 operand broadcasts over the other's batch); out (…, M, N) has the
/// product's shape; beta is 0 (out is overwritten, never read) or 1 (accumulate).
pub fn matmul_into(
    ctx: &GpuContext,
    a: &Tensor,
    b: &Tensor,
    trans: Trans,
    alpha: f32,
    beta: f32,
    out: &Tensor,
) -> Result<()> {
    launch(ctx, a, b, trans, alpha, beta, out, Path::Auto)
}

/// As [`matmul_into`] through the kernel family `path`: `Auto` as `matmul_into`; `Plain` any
/// shape; `Vec4`, `Subgroup` and `SubgroupOwnLoads` return `Error::Invalid` where `vec4_applies`
/// fails, the subgroup ones also where the device has no subgroups (never a silent fallback: tests and benchmarks use it
/// to run one path for sure). `QLORA_NO_SUBGROUPS` affects `Auto` only.
#[allow(clippy::too_many_arguments)]
pub fn matmul_into_path(
    ctx: &GpuContext,
    a: &Tensor,
    b: &Tensor,
    trans: Trans,
    alpha: f32,
    beta: f32,
    out: &Tensor,
    path: Path,
) -> Result<()> {
    launch(ctx, a, b, trans, alpha, beta, out, path)
}

/// As [`matmul_into`], always with the plain strided kernel (one invocation per element): the
/// oracle the tests hold the fast vec4 kernels against.
pub fn matmul_plain_into(
    ctx: &GpuContext,
    a: &Tensor,
    b: &Tensor,
    trans: Trans,
    alpha: f32,
    beta: f32,
    out: &Tensor,
) -> Result<()> {
    launch(ctx, a, b, trans, alpha, beta, out, Path::Plain)
}

/// C = alpha * op(a, b) in a new tensor of shape (…, M, N) (see [`matmul_into`]).
pub fn matmul(ctx: &GpuContext, a: &Tensor, b: &Tensor, trans: Trans, alpha: f32) -> Result<Tensor> {
    let (_, shape) = dims(a.shape(), b.shape(), trans)?;
    let out = ctx.empty(&shape, DType::F32)?;
    matmul_into(ctx, a, b, trans, alpha, 0.0, &out)?;
    Ok(out)
}

/// y (M, N) = x (M, K) · W^T for a weight W (N, K) held (or produced) in row blocks: `block(i)`
/// gives rows `ranges[i]` of W in f32 (a shard, or a dequantized chunk), whose product with x is
/// the column block `ranges[i]` of y. Each block's product is the same dot products as one
/// product with all of W, so y is bit-identical whatever the blocking.
pub fn x_wt_row_blocks(
    ctx: &GpuContext,
    x: &Tensor,
    n: usize,
    ranges: &[std::ops::Range<usize>],
    mut block: impl FnMut(usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let m = x.shape()[0];
    let y = ctx.empty(&[m, n], DType::F32)?;
    for (i, r) in ranges.iter().enumerate() {
        let yc = matmul(ctx, x, &block(i)?, Trans::NT, 1.0)?;
        crate::ops::elementwise::put_cols(ctx, &yc, &y, r.start)?;
    }
    Ok(y)
}

/// dx (M, K) = dy (M, N) · W for W (N, K) in row blocks (see [`x_wt_row_blocks`]): the sum over
/// blocks of dy[:, block] · W[block, :] (accumulated in block order: within f32 rounding of
/// one product, not bit-identical to it).
pub fn g_w_row_blocks(
    ctx: &GpuContext,
    dy: &Tensor,
    ranges: &[std::ops::Range<usize>],
    mut block: impl FnMut(usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut dx: Option<Tensor> = None;
    for (i, r) in ranges.iter().enumerate() {
        let wc = block(i)?;
        let dyc = crate::ops::elementwise::take_cols(ctx, dy, r.start, r.len())?;
        match &dx {
            None => dx = Some(matmul(ctx, &dyc, &wc, Trans::NN, 1.0)?),
            Some(acc) => matmul_into(ctx, &dyc, &wc, Trans::NN, 1.0, 1.0, acc)?,
        }
    }
    dx.ok_or_else(|| Error::shape("g_w_row_blocks", "no row blocks".to_string()))
}

/// Folds every leading dimension of `t` (…, C) into rows: (rows, C).
fn rows_2d(op: &'static str, what: &str, t: &Tensor) -> Result<Tensor> {
    if t.shape().is_empty() {
        return Err(Error::shape(op, format!("{what} must have rank >= 1, got a scalar")));
    }
    let (r, c) = crate::ops::rows_cols(t.shape());
    Ok(t.reshape(&[r, c]))
}

fn check_w(op: &'static str, w: &Tensor) -> Result<(usize, usize)> {
    match *w.shape() {
        [n, k] => Ok((n, k)),
        _ => Err(Error::shape(op, format!("w must be (N, K), got shape {:?}", w.shape()))),
    }
}

/// y (…, N) = x (…, K) · w^T, w (N, K): the linear-layer forward (NT), all leading dims as rows.
pub fn x_wt(ctx: &GpuContext, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, k) = check_w("x_wt", w)?;
    let x2 = rows_2d("x_wt", "x", x)?;
    if x2.shape()[1] != k {
        return Err(Error::shape("x_wt", format!("x {:?} against w {:?}: last dims differ", x.shape(), w.shape())));
    }
    let y = matmul(ctx, &x2, w, Trans::NT, 1.0)?;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    Ok(y.reshape(&shape))
}

/// dx (…, K) = g (…, N) · w, w (N, K): the linear layer's input gradient (NN).
pub fn g_w(ctx: &GpuContext, g: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, k) = check_w("g_w", w)?;
    let g2 = rows_2d("g_w", "g", g)?;
    if g2.shape()[1] != n {
        return Err(Error::shape("g_w", format!("g {:?} against w {:?}: g's last dim must be N", g.shape(), w.shape())));
    }
    let dx = matmul(ctx, &g2, w, Trans::NN, 1.0)?;
    let mut shape = g.shape().to_vec();
    *shape.last_mut().unwrap() = k;
    Ok(dx.reshape(&shape))
}

/// dW (N, K) = g^T · x summed over all rows, g (…, N), x (…, K) with the same row count (product
/// of the leading dims): the linear layer's weight gradient (TN).
pub fn gt_x(ctx: &GpuContext, g: &Tensor, x: &Tensor) -> Result<Tensor> {
    let g2 = rows_2d("gt_x", "g", g)?;
    let x2 = rows_2d("gt_x", "x", x)?;
    if g2.shape()[0] != x2.shape()[0] {
        return Err(Error::shape("gt_x", format!("g {:?} and x {:?} have different row counts", g.shape(), x.shape())));
    }
    matmul(ctx, &g2, &x2, Trans::TN, 1.0)
}

/// What the linear layer's backward needs: x only when W needs a gradient, W only when x does.
pub(crate) struct Saved {
    x: Option<Tensor>,
    w: Option<Tensor>,
}

impl Saved {
    /// dx = g · W (when needs[0]), dW = g^T · x (when needs[1]); fresh tensors.
    pub(crate) fn backward(self, ctx: &GpuContext, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let dx = match (needs[0], &self.w) {
            (true, Some(w)) => Some(g_w(ctx, g, w)?),
            _ => None,
        };
        let dw = match (needs[1], &self.x) {
            (true, Some(x)) => Some(gt_x(ctx, g, x)?),
            _ => None,
        };
        Ok(vec![dx, dw])
    }
}

/// Linear layer on the tape: y (…, N) = x (…, K) · W^T, W (N, K). Records a node only when x or
/// W needs a gradient; backward: dx = g · W, dW = g^T · x (summed over all rows).
pub fn linear(tape: &mut Tape, ctx: &GpuContext, x: &Var, w: &Var) -> Result<Var> {
    let y = x_wt(ctx, x.value(), w.value())?;
    Ok(tape.record(y, &[x, w], || {
        Op::Matmul(Saved {
            x: w.requires_grad().then(|| x.value().clone()),
            w: x.requires_grad().then(|| w.value().clone()),
        })
    }))
}

/// Floating-point operations of an (M, N, K) product: 2 M N K (one multiply and one add each).
pub fn flops(m: usize, n: usize, k: usize) -> f64 {
    2.0 * m as f64 * n as f64 * k as f64
}

/// f64 reference, row-major slices.
pub mod cpu {
    use super::Trans;

    /// C (M, N) = op(a, b): NT a (M, K), b (N, K); NN a (M, K), b (K, N); TN a (K, M), b (K, N).
    pub fn matmul(a: &[f64], b: &[f64], m: usize, n: usize, k: usize, trans: Trans) -> Vec<f64> {
        assert_eq!(a.len(), m * k, "a");
        assert_eq!(b.len(), n * k, "b");
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    let x = match trans {
                        Trans::NT | Trans::NN => a[i * k + p],
                        Trans::TN => a[p * m + i],
                    };
                    let y = match trans {
                        Trans::NT => b[j * k + p],
                        Trans::NN | Trans::TN => b[p * n + j],
                    };
                    s += x * y;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    /// Linear forward: y (R, N) = x (R, K) · w^T, w (N, K).
    pub fn linear(x: &[f64], w: &[f64], rows: usize, n: usize, k: usize) -> Vec<f64> {
        matmul(x, w, rows, n, k, Trans::NT)
    }

    /// Linear backward from dy (R, N): (dx (R, K) = dy · w, dw (N, K) = dy^T · x).
    pub fn linear_backward(dy: &[f64], x: &[f64], w: &[f64], rows: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
        let dx = matmul(dy, w, rows, k, n, Trans::NN);
        let dw = matmul(dy, x, n, k, rows, Trans::TN);
        (dx, dw)
    }
}
