//! The `qlora` command line (native only). Today: `qlora gpu` reports the adapter wgpu selects.
//! Training, generation, evaluation and merging subcommands come with the model and training
//! layers (see README.md).

use qlora_webgpu::gpu::{block_on, GpuContext};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("gpu") => match block_on(GpuContext::new()) {
            Ok(ctx) => println!("{}", ctx.info()),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        },
        Some("--version") | Some("-V") => println!("qlora {}", env!("CARGO_PKG_VERSION")),
        _ => {
            eprintln!("usage: qlora gpu        report the GPU adapter, its limits and optional features");
            eprintln!("       qlora --version");
            std::process::exit(2);
        }
    }
}
