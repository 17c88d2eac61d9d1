//! Every WGSL file parses and validates with naga (so a WGSL mistake fails here with its file and
//! line, not as a device panic), stays within WebGPU's default limits, and its workgroup-size
//! constant equals the Rust constant the launches use.

use qlora_webgpu::gpu::shaders;

fn module(file: &str, src: &str) -> naga::Module {
    let m = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("{}", e.emit_to_string_with_path(src, &format!("shaders/{file}"))));
    let mut v = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::empty());
    if let Err(e) = v.validate(&m) {
        panic!("{}", e.emit_to_string_with_path(src, &format!("shaders/{file}")));
    }
    m
}

#[test]
fn every_shader_parses_and_validates() {
    for (file, src) in shaders::ALL {
        let m = module(file, src);
        for ep in &m.entry_points {
            let [x, y, z] = ep.workgroup_size;
            assert!(x * y * z <= 256, "shaders/{file}: {} uses {} invocations (> 256, WebGPU's default)", ep.name, x * y * z);
        }
    }
}

/// The `const WG` of a shader file, if it has one.
fn wg_const(file: &str, src: &str) -> Option<u32> {
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
        (shaders::NF4, ops::nf4::WG),
    ];
    for ((file, src), rust) in pairs {
        assert_eq!(wg_const(file, src), Some(*rust), "shaders/{file}: WG differs from the Rust constant");
    }
}

#[test]
fn a_wgsl_mistake_names_file_and_line() {
    let src = "fn f() -> f32 {\n  return 1.0 +;\n}\n";
    let err = std::panic::catch_unwind(|| module("broken.wgsl", src)).unwrap_err();
    let msg = err.downcast_ref::<String>().unwrap();
    assert!(msg.contains("shaders/broken.wgsl:2:"), "{msg}");
}
