//! swiglu (stub: being written).

use crate::gpu::{GpuContext, Tensor};
use crate::Result;

pub(crate) struct Saved {}

impl Saved {
    pub(crate) fn backward(self, _ctx: &GpuContext, _g: &Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        unimplemented!()
    }
}
