//! AdamW (stub: being written).
