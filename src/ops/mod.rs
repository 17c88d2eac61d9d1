//! The ops a Llama decoder needs. Each file holds one op family: the launches of its WGSL kernels
//! (forward and backward), the function that runs it on the tape, its `Saved` state with the
//! backward rule, and a `cpu` module with the f64 reference used by the tests.

pub mod attention;
pub mod cross_entropy;
pub mod dora;
pub mod elementwise;
pub mod embedding;
pub mod head;
pub mod lora;
pub mod matmul;
pub mod nf4;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;
pub mod adamw;

use crate::gpu::Kernel;
use crate::{Error, Result};

/// Every kernel the ops launch, for the test that checks each kernel's binding names against the
/// storage variables its WGSL entry point uses (tests/shaders.rs).
pub fn kernels() -> Vec<Kernel> {
    [adamw::KERNELS, attention::KERNELS, cross_entropy::KERNELS, dora::KERNELS, elementwise::KERNELS, embedding::KERNELS, lora::KERNELS, matmul::KERNELS, nf4::KERNELS, rmsnorm::KERNELS, rope::KERNELS, swiglu::KERNELS].concat()
}

/// Checks that `shape` has rank `rank` and returns it, or a shape error naming `op` and `what`.
pub(crate) fn expect_rank<'a>(op: &'static str, what: &str, shape: &'a [usize], rank: usize) -> Result<&'a [usize]> {
    if shape.len() != rank {
        return Err(Error::shape(op, format!("{what} must have rank {rank}, got shape {shape:?}")));
    }
    Ok(shape)
}

/// Splits a shape into (rows, last dimension): every leading dimension folds into rows.
pub(crate) fn rows_cols(shape: &[usize]) -> (usize, usize) {
    let c = *shape.last().unwrap_or(&1);
    let n = if c == 0 { 0 } else { shape.iter().product::<usize>() / c };
    (n, c)
}
