//! Every WGSL file parses and validates with naga (so a WGSL mistake fails here with its file and
//! line, not as a device panic), keeps its workgroups within WebGPU compatibility mode's limits
//! (128 invocations; 128, 128, 64 per dimension), and its workgroup-size
//! constant equals the Rust constant the launches use. Files are validated with empty naga
//! capabilities (core WebGPU), except those in `shaders::NEEDS_SUBGROUPS`, which get exactly the
//! subgroup capability and operations they use (and must fail without them).

use naga::valid::{Capabilities, ShaderStages, SubgroupOperationSet, ValidationFlags, Validator};
use qlora_webgpu::gpu::shaders;

/// What a `NEEDS_SUBGROUPS` file may use: subgroup builtins (`Capabilities::SUBGROUP`), in compute
/// only, with votes (subgroupAll) and ballots (subgroupBallot, subgroupBroadcast); no shuffles,
/// no arithmetic, no subgroup barriers. A kernel that needs more extends this list on purpose.
fn subgroup_validator() -> Validator {
    let mut v = Validator::new(ValidationFlags::all(), Capabilities::SUBGROUP);
    v.subgroup_stages(ShaderStages::COMPUTE);
    v.subgroup_operations(SubgroupOperationSet::VOTE | SubgroupOperationSet::BALLOT);
    v
}

/// Parses the file as wgpu's native backend gets it (`shaders::for_target`: without a leading
/// `enable subgroups;`, which naga 30 does not implement).
fn parse(file: &str, src: &'static str) -> naga::Module {
    let src = shaders::for_target(src);
    naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("{}", e.emit_to_string_with_path(src, &format!("shaders/{file}"))))
}

fn module(file: &str, src: &'static str) -> naga::Module {
    let m = parse(file, src);
    let mut v = if shaders::NEEDS_SUBGROUPS.contains(&file) {
        subgroup_validator()
    } else {
        Validator::new(ValidationFlags::all(), Capabilities::empty())
    };
    if let Err(e) = v.validate(&m) {
        panic!("{}", e.emit_to_string_with_path(src, &format!("shaders/{file}")));
    }
    m
}

#[test]
fn every_shader_parses_and_validates() {
    for (file, src) in shaders::ALL {
        module(file, src);
    }
}

/// WebGPU compatibility mode's compute limits (gpuweb proposals/compatibility-mode.md, "Lower
/// limits"): maxComputeInvocationsPerWorkgroup 128 and maxComputeWorkgroupSizeX/Y 128 (core:
/// 256); maxComputeWorkgroupSizeZ 64 (as core). src/web.rs holds a compatibility-mode device
/// to these, so a kernel over them fails there.
const COMPAT_INVOCATIONS: u32 = 128;
const COMPAT_SIZE: [u32; 3] = [128, 128, 64];

/// The entry points of `m` whose workgroup (naga's evaluated `workgroup_size`) is over
/// compatibility mode's limits, as "name: x x y x z".
fn over_compat_limits(m: &naga::Module) -> Vec<String> {
    m.entry_points
        .iter()
        .filter(|ep| ep.stage == naga::ShaderStage::Compute)
        .filter(|ep| {
            let s = ep.workgroup_size;
            s.iter().map(|&d| d as u64).product::<u64>() > COMPAT_INVOCATIONS as u64
                || s.iter().zip(COMPAT_SIZE).any(|(&d, max)| d > max)
        })
        .map(|ep| format!("{}: {} x {} x {}", ep.name, ep.workgroup_size[0], ep.workgroup_size[1], ep.workgroup_size[2]))
        .collect()
}

#[test]
fn every_kernel_fits_compatibility_mode_workgroup_limits() {
    for (file, src) in shaders::ALL {
        let m = module(file, src);
        let over = over_compat_limits(&m);
        assert!(
            over.is_empty(),
            "shaders/{file}: workgroups over compatibility mode's {COMPAT_INVOCATIONS} invocations / {COMPAT_SIZE:?}: {over:?}"
        );
    }
    // The check catches what it exists for: 256-invocation kernels (core's default), and 65 along
    // z (within 128 invocations, over the per-dimension limit); 128 along x and 64 along z pass.
    let wg = |size: &str| naga::front::wgsl::parse_str(&format!("@compute @workgroup_size({size})\nfn k() {{}}\n")).unwrap();
    assert_eq!(over_compat_limits(&wg("256")), ["k: 256 x 1 x 1"]);
    assert_eq!(over_compat_limits(&wg("16, 16")), ["k: 16 x 16 x 1"]);
    assert_eq!(over_compat_limits(&wg("256, 1, 1")).len(), 1);
    assert!(over_compat_limits(&wg("128")).is_empty());
    assert!(over_compat_limits(&wg("8, 8")).is_empty());
    assert!(over_compat_limits(&wg("1, 2, 64")).is_empty());
    assert_eq!(over_compat_limits(&wg("1, 1, 65")).len(), 1);
}

/// The `const WG` of a shader file, if it has one.
fn wg_const(file: &str, src: &'static str) -> Option<u32> {
    let m = module(file, src);
    for (_, c) in m.constants.iter() {
        if c.name.as_deref() == Some("WG") {
            if let naga::Expression::Literal(naga::Literal::U32(v)) = m.global_expressions[c.init] {
                return Some(v);
            }
        }
    }
    None
}

#[test]
fn workgroup_size_constants_match_rust() {
    use qlora_webgpu::ops;
    let pairs: &[((&str, &str), u32)] = &[
        (shaders::ELEMENTWISE, ops::elementwise::WG),
        (shaders::RMSNORM, ops::rmsnorm::WG),
        (shaders::SWIGLU, ops::swiglu::WG),
        (shaders::EMBEDDING, ops::embedding::WG),
        (shaders::CROSS_ENTROPY, ops::cross_entropy::WG),
        (shaders::ADAMW, ops::adamw::WG),
        (shaders::ROPE, ops::rope::WG),
        (shaders::ATTENTION, ops::attention::WG),
        (shaders::MATMUL, ops::matmul::WG),
        (shaders::MATMUL_SUBGROUP, ops::matmul::SG_WG),
        (shaders::NF4, ops::nf4::WG),
        (shaders::DORA, ops::dora::WG),
    ];
    for ((file, src), rust) in pairs {
        assert_eq!(wg_const(file, src), Some(*rust), "shaders/{file}: WG differs from the Rust constant");
    }
}

#[test]
fn subgroup_files_need_the_subgroup_capability() {
    // Each NEEDS_SUBGROUPS file is in ALL, starts with `enable subgroups;`, and fails with empty
    // capabilities (so the split above is real); no other file enables subgroups.
    for file in shaders::NEEDS_SUBGROUPS {
        let (_, src) = shaders::ALL.iter().find(|(f, _)| f == file).unwrap_or_else(|| panic!("{file} not in ALL"));
        assert!(src.starts_with(shaders::ENABLE_SUBGROUPS), "shaders/{file} must start with `enable subgroups;`");
        let m = parse(file, src);
        let plain = Validator::new(ValidationFlags::all(), Capabilities::empty()).validate(&m);
        assert!(plain.is_err(), "shaders/{file} validates without subgroups: drop it from NEEDS_SUBGROUPS");
    }
    for (file, src) in shaders::ALL {
        if !shaders::NEEDS_SUBGROUPS.contains(file) {
            assert!(!src.contains("enable subgroups"), "shaders/{file} enables subgroups but is not in NEEDS_SUBGROUPS");
        }
    }
}

#[test]
fn naga_still_rejects_enable_subgroups() {
    // shaders::for_target cuts `enable subgroups;` off natively because naga 30 rejects it. When
    // this fails (a naga that implements the extension), drop that workaround.
    let src = "enable subgroups;\n@compute @workgroup_size(64)\nfn f(@builtin(subgroup_size) s: u32) {}\n";
    assert!(naga::front::wgsl::parse_str(src).is_err());
    assert!(naga::front::wgsl::parse_str(shaders::for_target(src)).is_ok());
}

#[test]
fn a_wgsl_mistake_names_file_and_line() {
    let src = "fn f() -> f32 {\n  return 1.0 +;\n}\n";
    let err = std::panic::catch_unwind(|| module("broken.wgsl", src)).unwrap_err();
    let msg = err.downcast_ref::<String>().unwrap();
    assert!(msg.contains("shaders/broken.wgsl:2:"), "{msg}");
}

/// The module of `file` (by name in `shaders::ALL`) and naga's analysis of it.
fn module_info(file: &str) -> (naga::Module, naga::valid::ModuleInfo) {
    let (f, src) = shaders::ALL.iter().find(|(f, _)| *f == file).unwrap_or_else(|| panic!("{file} is not in shaders::ALL"));
    let m = parse(f, src);
    let mut v = if shaders::NEEDS_SUBGROUPS.contains(f) {
        subgroup_validator()
    } else {
        Validator::new(ValidationFlags::all(), Capabilities::empty())
    };
    let info = v.validate(&m).unwrap_or_else(|e| panic!("{}", e.emit_to_string_with_path(src, &format!("shaders/{f}"))));
    (m, info)
}

/// Every kernel the ops launch names exactly the storage variables its entry point uses (so a
/// binding list that misses a buffer, names one the entry point does not read or write, or
/// names a variable of another kernel fails here, not as a validation error on some device),
/// and each name is declared once.
#[test]
fn every_kernel_binds_the_storage_its_entry_point_uses() {
    let kernels = qlora_webgpu::ops::kernels();
    for k in &kernels {
        let (m, info) = module_info(k.file);
        let (i, _) = m
            .entry_points
            .iter()
            .enumerate()
            .find(|(_, e)| e.name == k.entry)
            .unwrap_or_else(|| panic!("shaders/{}: no entry point {}", k.file, k.entry));
        let ep = info.get_entry_point(i);
        let mut used: Vec<String> = m
            .global_variables
            .iter()
            .filter(|(h, g)| matches!(g.space, naga::AddressSpace::Storage { .. }) && !ep[*h].is_empty())
            .map(|(_, g)| g.name.clone().expect("named"))
            .collect();
        used.sort();
        let mut declared: Vec<String> = k.bindings.iter().map(|s| s.to_string()).collect();
        declared.sort();
        let before = declared.len();
        declared.dedup();
        assert_eq!(before, declared.len(), "kernel {} names a binding twice: {:?}", k.entry, k.bindings);
        assert_eq!(declared, used, "kernel {} ({}): declared bindings vs the storage its entry point uses", k.entry, k.file);
    }
    // Every kernel declared under src/ is in the list (a kernel missing from its module's KERNELS
    // would not be checked).
    let mut declared_in_src = 0;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ops");
    for e in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        declared_in_src += text.matches("shaders::kernel(").count();
    }
    assert_eq!(kernels.len(), declared_in_src, "kernels in ops::kernels() vs `shaders::kernel(` declarations in src/ops");
}

/// The binding numbers the runtime reads from the WGSL text (`shaders::binding_number`, which
/// turns a kernel's names into numbers) equal naga's, for every variable of every file.
#[test]
fn binding_numbers_read_from_the_text_equal_naga() {
    let mut n = 0;
    for (file, src) in shaders::ALL {
        let (m, _) = module_info(file);
        for (_, g) in m.global_variables.iter() {
            let (Some(name), Some(b)) = (&g.name, &g.binding) else { continue };
            assert_eq!(shaders::binding_number(shaders::for_target(src), name), Some(b.binding), "shaders/{file}: `{name}`");
            n += 1;
        }
        assert_eq!(shaders::binding_number(src, "no_such_variable"), None);
    }
    assert!(n > 80, "only {n} bindings found");
}

/// WebGPU compatibility mode's limits a kernel must meet (the defaults a compatibility-mode
/// device gets: Chromium 141 gives `featureLevel: "compatibility"` devices 8 storage buffers per
/// shader stage, as core's default, and 128 invocations a workgroup, core's 256 halved).
const COMPAT_STORAGE_BUFFERS_PER_STAGE: usize = 8;

/// Storage buffers each compute entry point binds (wgpu derives each pipeline's layout from the
/// bindings its entry point uses, so that is what counts against the device limit), from naga's
/// per-entry-point global uses.
fn storage_buffers_per_entry_point() -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for (file, _) in shaders::ALL {
        let (m, info) = module_info(file);
        for (i, ep) in m.entry_points.iter().enumerate() {
            let fi = info.get_entry_point(i);
            let n = m
                .global_variables
                .iter()
                .filter(|(h, g)| matches!(g.space, naga::AddressSpace::Storage { .. }) && !fi[*h].is_empty())
                .count();
            out.push((format!("shaders/{file}: {}", ep.name), n));
        }
    }
    out
}

#[test]
fn every_kernel_fits_compatibility_modes_storage_buffer_limit() {
    let counts = storage_buffers_per_entry_point();
    assert!(counts.len() > 40, "found only {} entry points", counts.len());
    let (worst, n) = counts.iter().max_by_key(|(_, n)| *n).expect("entry points");
    println!("{} compute entry points; the most storage buffers: {n} ({worst})", counts.len());
    let over: Vec<_> = counts.iter().filter(|(_, n)| *n > COMPAT_STORAGE_BUFFERS_PER_STAGE).collect();
    assert!(over.is_empty(), "over compatibility mode's {COMPAT_STORAGE_BUFFERS_PER_STAGE} storage buffers per stage: {over:?}");
}
