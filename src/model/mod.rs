//! Llama-family decoder built from the ops on the tape (`llama`), with LoRA adapters on any of
//! the seven projections.

pub mod arch;
pub mod config;
pub mod llama;
