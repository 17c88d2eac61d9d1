//! The library's one error type: every failure that input or the device can cause is a variant
//! here, with the file, tensor or op named. Panics are kept for broken internal invariants only.

/// Errors of the qlora-webgpu library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable GPU adapter: says which backends were tried and how to get a driver.
    #[error("no GPU adapter found (backends tried: {backends}). {hint}")]
    NoAdapter { backends: String, hint: String },
    /// The device could not be created or reported an error.
    #[error("GPU device error: {0}")]
    Device(String),
    /// Operands whose shapes do not fit the op.
    #[error("shape error in {op}: {msg}")]
    Shape { op: &'static str, msg: String },
    /// A size beyond what the device allows (a binding or buffer too large, too many workgroups).
    #[error("device limit exceeded in {op}: {msg}")]
    Limit { op: &'static str, msg: String },
    /// A file whose content does not follow its format: names the file, the tensor or entry, and
    /// what was expected.
    #[error("{file}: {what}")]
    Format { file: String, what: String },
    /// An argument outside its valid range.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The GPU device was lost (driver reset or crash, GPU removed, browser tab backgrounded, or
    /// `destroy`ed): everything on it is gone and no further GPU work is possible on it.
    #[error("the GPU device was lost ({0}); everything on it is gone and nothing more was written. Try: start again on a new device (a training run continues from its last checkpoint with --resume); if it recurs, update the GPU driver or close other programs using the GPU")]
    DeviceLost(String),
    /// A device allocation failed: the GPU's memory, or the budget set for it, is exhausted.
    #[error("the GPU ran out of memory ({0}). Try: a smaller batch size (--batch-size) or maximum length (--max-len), gradient checkpointing (--grad-checkpoint), a lower LoRA rank or fewer target modules, or close other programs using the GPU")]
    OutOfMemory(String),
}

/// Result alias of the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A shape error for `op`.
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape { op, msg: msg.into() }
    }
    /// A format error for `file`.
    pub fn format(file: impl Into<String>, what: impl Into<String>) -> Self {
        Error::Format { file: file.into(), what: what.into() }
    }
}

/// At most this many characters of a bad value are quoted in a message.
pub const QUOTE_MAX: usize = 200;

/// `s` for a message: as is when at most [`QUOTE_MAX`] characters, else its first
/// [`QUOTE_MAX`] characters followed by "… (N characters)", so that an error never echoes a
/// huge value in full.
pub fn quote(s: &str) -> String {
    let n = s.chars().count();
    if n <= QUOTE_MAX {
        return s.to_owned();
    }
    let head: String = s.chars().take(QUOTE_MAX).collect();
    format!("{head}… ({n} characters)")
}
