//! 16-bit floats on the CPU: IEEE binary16 (f16) and bfloat16 (bf16) to f32 (exact) and f32 to
//! either (round to nearest, ties to even). The one home of these conversions for readers
//! (safetensors, GGUF, PEFT adapters) and writers (merged models, GGUF export). The GPU side
//! widens in WGSL (shaders/embedding.wgsl); gpu/shards.rs picks the storage type.

/// The f32 value of IEEE half-precision bits `h` (exact, subnormals, infinities and NaN kept).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match exp {
        0 => {
            // zero or subnormal: man * 2^-24 (exact in f32)
            let v = man as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        31 => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// The f32 value of bfloat16 bits `b` (the top half of an f32).
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// f32 -> bf16 bits, rounding to nearest with ties to even; NaN stays a (quiet) NaN of the same
/// sign, overflow rounds to ±inf as IEEE rounding does.
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x0040;
    }
    let lsb = (b >> 16) & 1;
    (b.wrapping_add(0x7FFF + lsb) >> 16) as u16
}

/// f32 -> f16 bits, rounding to nearest with ties to even (subnormals included); beyond the f16
/// range (|x| ≥ 65520) the result is ±inf, NaN stays a quiet NaN of the same sign.
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xFF) as i32;
    let man = b & 0x7F_FFFF;
    if exp == 0xFF {
        return sign | 0x7C00 | if man != 0 { 0x200 } else { 0 };
    }
    if exp == 0 {
        return sign; // f32 subnormals are far below half the smallest f16 subnormal.
    }
    let e = exp - 127 + 15;
    if e >= 0x1F {
        return sign | 0x7C00;
    }
    // The value is M · 2^(exp−127−23) with M the 24-bit significand; in units of the f16 result's
    // last place it is M >> shift, rounded on the bits shifted out.
    let (m, shift, base) = if e >= 1 {
        (man, 13u32, (e as u32) << 10)
    } else {
        (man | 0x80_0000, (14 - e) as u32, 0)
    };
    if shift > 24 {
        return sign;
    }
    let q = m >> shift;
    let rem = m & ((1 << shift) - 1);
    let half = 1 << (shift - 1);
    let mut h = base + q;
    if rem > half || (rem == half && (q & 1) == 1) {
        h += 1; // a carry into the exponent is the correct next value (up to inf)
    }
    sign | h as u16
}
