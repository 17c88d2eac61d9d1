//! qlora-webgpu: LoRA and QLoRA fine-tuning of Llama-family models on WebGPU.
//!
//! Layers (see docs/ARCHITECTURE.md; tests/layers.rs checks them): `gpu` (the only module that calls wgpu), `autograd` (the reverse-mode
//! tape), `ops` (each op: WGSL launches, tape rule, f64 CPU reference), `quant` (NF4).

pub mod autograd;
pub mod data;
pub mod error;
pub mod generate;
pub mod gpu;
pub mod io;
pub mod lora;
pub mod model;
pub mod ops;
pub mod quant;
pub mod rng;
pub mod session;
pub mod train;
pub mod web;

pub use error::{Error, Result};
