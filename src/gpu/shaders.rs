//! The WGSL sources, one file per kernel family, compiled into the library with `include_str!`.
//! `ALL` lists every file so the naga test validates each one.

macro_rules! shader {
    ($name:ident, $file:literal) => {
        #[doc = concat!("shaders/", $file)]
        pub const $name: (&str, &str) = ($file, include_str!(concat!("../../shaders/", $file)));
    };
}

shader!(MATMUL, "matmul.wgsl");
shader!(NF4, "nf4.wgsl");
shader!(LORA, "lora.wgsl");
shader!(RMSNORM, "rmsnorm.wgsl");
shader!(ROPE, "rope.wgsl");
shader!(ATTENTION, "attention.wgsl");
shader!(SWIGLU, "swiglu.wgsl");
shader!(EMBEDDING, "embedding.wgsl");
shader!(CROSS_ENTROPY, "cross_entropy.wgsl");
shader!(ADAMW, "adamw.wgsl");
shader!(ELEMENTWISE, "elementwise.wgsl");

/// Every shader file: (file name, source).
pub const ALL: &[(&str, &str)] = &[
    MATMUL, NF4, LORA, RMSNORM, ROPE, ATTENTION, SWIGLU, EMBEDDING, CROSS_ENTROPY, ADAMW, ELEMENTWISE,
];

/// The kernel `entry` of shader file `file` (one of the constants above).
pub const fn kernel(file: (&'static str, &'static str), entry: &'static str) -> super::Kernel {
    super::Kernel { file: file.0, source: file.1, entry }
}
