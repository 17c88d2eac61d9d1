//! ggml's tensor types dequantized to f32 on the CPU.
//!
//! Block layouts of the supported tensor types (llama.cpp's reference dequantizers; `d`, `m`,
//! `dmin` are IEEE f16; elements of a block are consecutive in the row):
//! - F32, F16, BF16: one value per element.
//! - Q8_0 (32 elements, 34 bytes): d, i8 qs[32]; y[j] = qs[j] * d.
//! - Q4_0 (32 elements, 18 bytes): d, u8 qs[16]; y[j] = ((qs[j] & 15) - 8) * d and
//!   y[j + 16] = ((qs[j] >> 4) - 8) * d for j < 16 (low nibbles hold elements 0..15, high
//!   nibbles 16..31).
//! - Q4_1 (32 elements, 20 bytes): d, m, u8 qs[16]; y[j] = (qs[j] & 15) * d + m,
//!   y[j + 16] = (qs[j] >> 4) * d + m.
//! - Q4_K (256 elements, 144 bytes): d, dmin, u8 scales[12], u8 qs[128]. Eight sub-blocks of 32
//!   with 6-bit scale sc[k] and min mn[k]: for k < 4 sc = scales[k] & 63, mn = scales[k+4] & 63;
//!   for k >= 4 sc = (scales[k+4] & 15) | (scales[k-4] >> 6) << 4,
//!   mn = (scales[k+4] >> 4) | (scales[k] >> 6) << 4. Sub-block 2c (c < 4) takes the low nibbles
//!   of qs[32c..32c+32], sub-block 2c+1 their high nibbles: y = (d * sc) * q - dmin * mn.
//! - Q6_K (256 elements, 210 bytes): u8 ql[128], u8 qh[64], i8 scales[16], d. Element e:
//!   h = e / 128, r = e % 128, low 4 bits = (ql[64h + r % 64] >> 4 * (r / 64)) & 15, high 2 bits =
//!   (qh[32h + r % 32] >> 2 * (r / 32)) & 3, q = (low | high << 4) - 32;
//!   y = (d * scales[e / 16]) * q.
//!
//! The products are evaluated in f32 in exactly these orders (no fused multiply-add), so the
//! values equal those of the gguf Python package's numpy dequantizers bit for bit.

use super::file::GgmlType;
use crate::io::half::{bf16_to_f32, f16_to_f32};

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// `data` of type `ty` dequantized to f32 following the block layouts in the module docs;
/// None when the type is not supported or `data` is not a whole number of blocks.
pub fn dequantize(ty: GgmlType, data: &[u8]) -> Option<Vec<f32>> {
    let (block, bytes) = ty.block_layout()?;
    if !ty.is_supported() || !data.len().is_multiple_of(bytes) {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() / bytes * block);
    let blocks = data.chunks_exact(bytes);
    match ty {
        GgmlType::F32 => out.extend(blocks.map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        GgmlType::F16 => out.extend(blocks.map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))),
        GgmlType::BF16 => out.extend(blocks.map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]])))),
        GgmlType::Q8_0 => {
            for b in blocks {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        GgmlType::Q4_0 => {
            for b in blocks {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| f32::from((q & 15) as i8 - 8) * d));
                out.extend(qs.iter().map(|&q| f32::from((q >> 4) as i8 - 8) * d));
            }
        }
        GgmlType::Q4_1 => {
            for b in blocks {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| f32::from(q & 15) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
        }
        GgmlType::Q4_K => {
            for b in blocks {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let sc = &b[4..16];
                let qs = &b[16..144];
                for k in 0..8 {
                    let (s, mn) = if k < 4 {
                        (sc[k] & 63, sc[k + 4] & 63)
                    } else {
                        ((sc[k + 4] & 15) | ((sc[k - 4] >> 6) << 4), (sc[k + 4] >> 4) | ((sc[k] >> 6) << 4))
                    };
                    let scale = d * f32::from(s);
                    let min = dmin * f32::from(mn);
                    let chunk = &qs[32 * (k / 2)..32 * (k / 2) + 32];
                    let shift = 4 * (k % 2);
                    out.extend(chunk.iter().map(|&q| scale * f32::from((q >> shift) & 15) - min));
                }
            }
        }
        GgmlType::Q6_K => {
            for b in blocks {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                for e in 0..256 {
                    let (h, r) = (e / 128, e % 128);
                    let lo = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 15;
                    let hi = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
                    let q = (lo | (hi << 4)) as i8 - 32;
                    out.push(d * f32::from(sc[e / 16] as i8) * f32::from(q));
                }
            }
        }
        _ => return None,
    }
    Some(out)
}
