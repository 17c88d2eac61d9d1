//! The WGSL sources, one file per kernel family, compiled into the library with `include_str!`.
//! Each is followed by shaders/common.wgsl, the helpers the files share (`flat_group`,
//! `workgroup_sum`): appended after the file's own text, so the line numbers of an error in a file
//! are that file's.
//! `ALL` lists every file so the naga test validates each one; `NEEDS_SUBGROUPS` names those that
//! use the optional `subgroups` feature (validated with naga's subgroup capabilities, and only
//! dispatched on a device created with it).

macro_rules! shader {
    ($name:ident, $file:literal) => {
        #[doc = concat!("shaders/", $file, ", followed by shaders/common.wgsl")]
        pub const $name: (&str, &str) = ($file, concat!(include_str!(concat!("../../shaders/", $file)), "\n", include_str!("../../shaders/common.wgsl")));
    };
}

/// shaders/common.wgsl alone (what a shader file read at run time, e.g. by examples/attn_timing.rs,
/// must be followed by).
pub const COMMON: &str = include_str!("../../shaders/common.wgsl");

shader!(MATMUL, "matmul.wgsl");
shader!(MATMUL_SUBGROUP, "matmul_subgroup.wgsl");
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
shader!(DORA, "dora.wgsl");

/// Every shader file: (file name, source).
pub const ALL: &[(&str, &str)] = &[
    MATMUL, MATMUL_SUBGROUP, NF4, LORA, RMSNORM, ROPE, ATTENTION, SWIGLU, EMBEDDING, CROSS_ENTROPY, ADAMW, ELEMENTWISE, DORA,
];

/// File names (in `ALL`) that start with `enable subgroups;` ([`ENABLE_SUBGROUPS`]).
pub const NEEDS_SUBGROUPS: &[&str] = &[MATMUL_SUBGROUP.0];

/// The directive a `NEEDS_SUBGROUPS` file starts with.
pub const ENABLE_SUBGROUPS: &str = "enable subgroups;";

/// The text of a shader file as this target's WGSL compiler takes it. In the browser (wasm32) the
/// file itself: the browser requires `enable subgroups;` before subgroup builtins. Natively, naga
/// 30 rejects that directive as not yet implemented (gfx-rs/wgpu#5555) while it accepts the
/// builtins without it (the device feature gates them), so a leading `enable subgroups;` is cut
/// off; the rest of its line stays, so naga's line numbers still match the file.
pub const fn for_target(src: &'static str) -> &'static str {
    if cfg!(target_arch = "wasm32") {
        return src;
    }
    let (s, d) = (src.as_bytes(), ENABLE_SUBGROUPS.as_bytes());
    if s.len() < d.len() {
        return src;
    }
    let mut i = 0;
    while i < d.len() {
        if s[i] != d[i] {
            return src;
        }
        i += 1;
    }
    src.split_at(d.len()).1
}

/// The kernel `entry` of shader file `file` (one of the constants above), its source as
/// [`for_target`] gives it, binding the storage variables named `bindings` (in the order a
/// dispatch passes its tensors).
pub const fn kernel(file: (&'static str, &'static str), entry: &'static str, bindings: &'static [&'static str]) -> super::Kernel {
    super::Kernel { file: file.0, source: for_target(file.1), entry, bindings }
}

/// The binding number of the `var` named `name` in WGSL `source`: the N of a declaration
/// `@group(0) @binding(N) var<...> name: ...` (how every file under shaders/ declares its
/// resources; tests/shaders.rs checks this reading against naga's for every file).
pub fn binding_number(source: &str, name: &str) -> Option<u32> {
    source.lines().find_map(|line| {
        let rest = line.trim_start().strip_prefix("@group(0)")?.trim_start().strip_prefix("@binding(")?;
        let (n, rest) = rest.split_once(')')?;
        let rest = rest.trim_start().strip_prefix("var")?;
        let rest = match rest.trim_start().strip_prefix('<') {
            Some(r) => r.split_once('>')?.1,
            None => rest,
        };
        let (var, _) = rest.split_once(':')?;
        (var.trim() == name).then(|| n.trim().parse().ok()).flatten()
    })
}
