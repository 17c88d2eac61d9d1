//! `Tensor`: a handle to a device buffer from the pool with a shape (PyTorch order, row-major,
//! last dimension contiguous). Cloning shares the buffer; the buffer returns to the pool when the
//! last handle drops.

use super::pool::PooledBuffer;
use std::rc::Rc;

/// Element type of a device tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// 32-bit float, the compute type everywhere.
    F32,
    /// 32-bit unsigned: token ids, packed NF4 codes, packed u8 statistics.
    U32,
    /// 32-bit signed: labels with ignore index -100.
    I32,
    /// bfloat16 storage (two per 32-bit word, the first element in the low half): read by the
    /// kernels that take 16-bit tables and widened to f32 there (`bits << 16`).
    BF16,
    /// IEEE half storage (two per word, low half first), widened exactly with integer operations.
    F16,
    /// 8-bit blocks (a GGUF Q8_0 table, repacked): value = q * d for a signed 8-bit code q and one
    /// f32 scale d per 32 consecutive values. A tensor of n values (n a multiple of 32) holds the
    /// n codes (four a word, the first in the low byte) followed by the n / 32 scales: 9 bits a
    /// value. Widened exactly in the kernels that take 16-bit tables.
    Q8,
}

impl DType {
    /// Bytes per element (of the codes alone for Q8; see [`DType::bytes`]).
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::Q8 => 1,
        }
    }

    /// Bytes of `n` elements (Q8: the codes and their scales).
    pub fn bytes(self, n: usize) -> usize {
        match self {
            DType::Q8 => n + n.div_ceil(Q8_BLOCK) * 4,
            _ => n * self.size(),
        }
    }
}

/// Values per scale in [`DType::Q8`] storage (GGUF's Q8_0 block).
pub const Q8_BLOCK: usize = 32;

/// A device tensor.
#[derive(Clone)]
pub struct Tensor {
    buf: Rc<PooledBuffer>,
    shape: Vec<usize>,
    dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?})", self.shape, self.dtype)
    }
}

impl Tensor {
    pub(crate) fn new(buf: PooledBuffer, shape: Vec<usize>, dtype: DType) -> Self {
        Tensor { buf: Rc::new(buf), shape, dtype }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the data (not of the pooled buffer, which may be larger).
    pub fn byte_len(&self) -> usize {
        self.dtype.bytes(self.numel())
    }

    /// The same buffer seen with another shape of the same element count (a free reshape).
    pub fn reshape(&self, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        assert_eq!(n, self.numel(), "reshape {:?} -> {shape:?}", self.shape);
        Tensor { buf: self.buf.clone(), shape: shape.to_vec(), dtype: self.dtype }
    }

    /// True when both handles share one buffer.
    pub fn same_buffer(&self, other: &Tensor) -> bool {
        Rc::ptr_eq(&self.buf, &other.buf)
    }

    pub(crate) fn buffer(&self) -> &wgpu::Buffer {
        self.buf.buffer.as_ref().expect("live pooled buffer")
    }

    /// Size to bind: the data rounded up to 16 bytes (so `array<vec4<f32>>` views fit), at least
    /// 16, never past the pooled buffer's end (its class is a multiple of 16).
    pub(crate) fn binding_size(&self) -> u64 {
        ((self.byte_len() as u64).div_ceil(16) * 16).clamp(16, self.buf.class)
    }
}
