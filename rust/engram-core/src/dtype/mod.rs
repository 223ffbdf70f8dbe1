//! Element types of host tables and their exact conversions to and from f32.
//!
//! Every conversion matches PyTorch's CPU semantics bit for bit: widening is exact; narrowing to
//! bfloat16/float16 rounds to nearest-even; FP8 E4M3 values dequantize as
//! `float(e4m3) * float(ue8m0)` in f32 (SPEC section 5).

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;

use crate::error::{EngramError, Result};

/// Storage type of a table's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// FP8 E4M3 (`torch.float8_e4m3fn`) with one UE8M0 scale byte per block of 32 values.
    F8E4M3,
}

/// FP8 values per UE8M0 scale byte.
pub const FP8_BLOCK: usize = 32;

impl DType {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F8E4M3 => 1,
        }
    }

    /// The user-facing name ("float32", "float16", "bfloat16", "float8_e4m3").
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F8E4M3 => "float8_e4m3",
        }
    }

    /// The safetensors dtype string.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
        }
    }

    /// Every table dtype, in the order of the registry.
    pub const ALL: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::F8E4M3];

    /// Every spelling a caller may use (lower case; the name first), besides the safetensors
    /// name: the one list the Python dtype rules are built from.
    pub fn spellings(self) -> &'static [&'static str] {
        match self {
            DType::F32 => &["float32", "f32", "fp32", "float"],
            DType::F16 => &["float16", "f16", "fp16", "half"],
            DType::BF16 => &["bfloat16", "bf16"],
            DType::F8E4M3 => &["float8_e4m3", "float8_e4m3fn", "fp8", "e4m3", "f8_e4m3"],
        }
    }

    /// The numpy dtype that holds the values (bfloat16 and FP8 as their raw bits).
    pub fn numpy_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "uint16",
            DType::F8E4M3 => "uint8",
        }
    }

    /// The torch dtype of the values (`torch.<name>`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F8E4M3 => "float8_e4m3fn",
        }
    }

    /// Parses any spelling (case-insensitive) or the safetensors name.
    pub fn parse(name: &str) -> Result<Self> {
        let lower = name.to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|d| d.safetensors_name() == name || d.spellings().contains(&lower.as_str()))
            .ok_or_else(|| {
                EngramError::Invalid(format!(
                    "unsupported table dtype {name:?}: use float32, float16, bfloat16 or \
                     float8_e4m3 (with UE8M0 scales)"
                ))
            })
    }

    /// Whether gathers can write this type as output (FP8 is storage only).
    pub fn is_output(self) -> bool {
        self != DType::F8E4M3
    }
}

/// bfloat16 bits -> f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 -> bfloat16 bits, round to nearest even; NaN becomes the quiet NaN with the same sign
/// (what `torch.Tensor.to(torch.bfloat16)` does).
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let rounding = 0x7FFF + ((bits >> 16) & 1);
    ((bits + rounding) >> 16) as u16
}

/// IEEE half bits -> f32 (exact, subnormals included; NaNs quietened).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1F) as u32;
    let man = (h & 0x3FF) as u32;
    match exp {
        0 => {
            // Subnormal (or zero): man * 2**-24, exact in f32.
            let v = man as f32 * f32::from_bits(0x3380_0000);
            if sign != 0 {
                -v
            } else {
                v
            }
        }
        // NaNs come out quiet, as the F16C conversion (and so torch) makes them.
        0x1F if man != 0 => f32::from_bits(sign | 0x7FC0_0000 | (man << 13)),
        0x1F => f32::from_bits(sign | 0x7F80_0000),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
    }
}

/// f32 -> IEEE half bits, round to nearest even, overflow to infinity, NaN kept quiet.
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let abs = bits & 0x7FFF_FFFF;
    if abs > 0x7F80_0000 {
        return sign | 0x7E00 | ((abs >> 13) & 0x3FF) as u16;
    }
    if abs >= 0x4780_0000 {
        // >= 65536 (including inf): rounds to infinity.
        return sign | 0x7C00;
    }
    if abs >= 0x3880_0000 {
        // Normal half: rebias the exponent, round the 13 dropped bits to nearest even.
        let v = abs - 0x3800_0000;
        let rounded = v + 0x0FFF + ((v >> 13) & 1);
        return sign | (rounded >> 13) as u16;
    }
    // Subnormal half (or zero): value / 2**-24, rounded to nearest even by the f32 unit.
    let scaled = f32::from_bits(abs) * 16_777_216.0; // exact: times 2**24
    let int = scaled as u32;
    let frac = scaled - int as f32;
    let rounded = if frac > 0.5 || (frac == 0.5 && int & 1 == 1) {
        int + 1
    } else {
        int
    };
    sign | rounded as u16
}

/// FP8 E4M3 (fn) byte -> f32 (exact): no infinities, `S.1111.111` is NaN.
#[inline(always)]
pub fn e4m3_to_f32(b: u8) -> f32 {
    let mag = (b & 0x7F) as u32;
    let v = if mag == 0x7F {
        f32::NAN
    } else {
        // Exponent and mantissa bits placed in an f32 and rescaled by 2**120 (exact, subnormal
        // codes included): (1 + m/8) * 2**(e - 7), or m/8 * 2**-6 for e == 0.
        f32::from_bits(mag << 20) * f32::from_bits(0x7B80_0000)
    };
    if b & 0x80 != 0 {
        -v
    } else {
        v
    }
}

/// One FP8 value times its block scale. A NaN code stays that NaN (sign included) whatever the
/// scale, so the result does not depend on which operand of the product the compiler puts first.
#[inline(always)]
pub fn dequant(v: u8, scale: f32) -> f32 {
    let x = e4m3_to_f32(v);
    if x.is_nan() {
        x
    } else {
        x * scale
    }
}

/// UE8M0 scale byte -> f32: `2**(s - 127)`, 0xFF is NaN (torch's `float8_e8m0fnu`).
#[inline(always)]
pub fn ue8m0_to_f32(s: u8) -> f32 {
    match s {
        0xFF => f32::NAN,
        0 => f32::from_bits(0x0040_0000),
        _ => f32::from_bits((s as u32) << 23),
    }
}

/// f32 -> FP8 E4M3 (fn) byte: round to nearest even, saturating at +-448, NaN to 0x7F.
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    if x.is_nan() {
        return 0x7F | sign;
    }
    let a = x.abs();
    if a >= 464.0 {
        // 464 is halfway between 448 and 480 (the NaN code): saturate instead.
        return sign | 0x7E;
    }
    // The value's binade 2**e (subnormal E4M3 codes share the grid of e = -6): 3 mantissa bits
    // give a step of 2**(e - 3); dividing by a power of two is exact.
    let e = (((a.to_bits() >> 23) & 0xFF) as i32 - 127).max(-6);
    let step = f32::from_bits(((e - 3 + 127) as u32) << 23);
    let q = a / step;
    let mut n = q.floor();
    let frac = q - n;
    if frac > 0.5 || (frac == 0.5 && (n as u32) & 1 == 1) {
        n += 1.0;
    }
    // n * step, re-encoded: n in [8, 16] for normals (16 moves up a binade), [0, 8] below.
    let n = n as u32;
    let code = if e == -6 && n < 8 {
        n // subnormal: n/8 * 2**-6
    } else if n == 16 {
        ((e + 8) as u32) << 3
    } else {
        (((e + 7) as u32) << 3) | (n - 8)
    };
    sign | code.min(0x7E) as u8
}

/// UE8M0 scale byte for a block whose largest magnitude is `amax`: the smallest power of two
/// that brings the block within E4M3's range (448), as DeepSeek's FP8 checkpoints do.
pub fn ue8m0_for(amax: f32) -> u8 {
    if amax.is_nan() || amax <= 0.0 || amax.is_infinite() {
        return 127;
    }
    let e = (amax / 448.0).log2().ceil() as i32;
    (e + 127).clamp(1, 254) as u8
}

/// Converts `src` (packed values of `dtype`, with `scales` for FP8) to f32.
pub fn row_to_f32(dtype: DType, src: &[u8], scales: &[u8], dst: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        DType::BF16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        DType::F8E4M3 => {
            let blocks = dst.chunks_mut(FP8_BLOCK).zip(src.chunks(FP8_BLOCK));
            for ((block, vals), &s) in blocks.zip(scales) {
                let scale = ue8m0_to_f32(s);
                for (d, &v) in block.iter_mut().zip(vals) {
                    *d = dequant(v, scale);
                }
            }
        }
    }
}

/// Writes f32 values as `dtype` (not FP8) into `dst` bytes.
pub fn f32_to_row(dtype: DType, src: &[f32], dst: &mut [u8]) {
    match dtype {
        DType::F32 => {
            for (c, &v) in dst.chunks_exact_mut(4).zip(src) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 => {
            for (c, &v) in dst.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&f32_to_f16(v).to_le_bytes());
            }
        }
        DType::BF16 => {
            for (c, &v) in dst.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&f32_to_bf16(v).to_le_bytes());
            }
        }
        DType::F8E4M3 => unreachable!("FP8 rows are written with their scales by quantize_row"),
    }
}

/// Quantizes rows of `dim` f32 values (`src`, row after row) into E4M3 `codes` (one per value)
/// and UE8M0 `scales` (one per block of 32); `dim` must be a multiple of the block.
pub fn quantize_rows(src: &[f32], dim: usize, codes: &mut [u8], scales: &mut [u8]) -> Result<()> {
    if !dim.is_multiple_of(FP8_BLOCK) {
        return Err(EngramError::Invalid(format!(
            "FP8 rows need dim to be a multiple of 32, got {dim}"
        )));
    }
    if codes.len() != src.len() || scales.len() != src.len() / FP8_BLOCK {
        return Err(EngramError::Invalid(format!(
            "quantize_rows: {} values need {} code bytes and {} scale bytes, got {} and {}",
            src.len(),
            src.len(),
            src.len() / FP8_BLOCK,
            codes.len(),
            scales.len()
        )));
    }
    let per_row = dim / FP8_BLOCK;
    for ((v, c), s) in src
        .chunks(dim.max(1))
        .zip(codes.chunks_mut(dim.max(1)))
        .zip(scales.chunks_mut(per_row.max(1)))
    {
        quantize_row(v, c, s);
    }
    Ok(())
}

/// Quantizes f32 values to E4M3 bytes with one UE8M0 scale per block of 32.
pub fn quantize_row(src: &[f32], dst: &mut [u8], scales: &mut [u8]) {
    for ((vals, out), s) in src
        .chunks(FP8_BLOCK)
        .zip(dst.chunks_mut(FP8_BLOCK))
        .zip(scales)
    {
        let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
        *s = ue8m0_for(amax);
        let inv = 1.0 / ue8m0_to_f32(*s);
        for (o, &v) in out.iter_mut().zip(vals) {
            *o = f32_to_e4m3(v * inv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_decodes_known_codes() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert!(e4m3_to_f32(0x80).is_sign_negative());
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6)); // smallest normal
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0xFE), -448.0);
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
    }

    #[test]
    fn e4m3_round_trips_every_code() {
        for b in 0..=255u8 {
            if b & 0x7F == 0x7F {
                continue;
            }
            assert_eq!(f32_to_e4m3(e4m3_to_f32(b)), b, "code {b:#x}");
        }
        assert_eq!(f32_to_e4m3(1e9), 0x7E);
        assert_eq!(f32_to_e4m3(-1e9), 0xFE);
        // 1 + 1/16 is halfway between 1 and 1.125: ties to the even code (1.0).
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.1875), 0x3A);
    }

    #[test]
    fn ue8m0_scales() {
        assert_eq!(ue8m0_to_f32(127), 1.0);
        assert_eq!(ue8m0_to_f32(254), 2f32.powi(127));
        assert_eq!(ue8m0_to_f32(0), 2f32.powi(-127));
        assert!(ue8m0_to_f32(255).is_nan());
        assert_eq!(ue8m0_for(448.0), 127);
        assert_eq!(ue8m0_for(449.0), 128);
        assert_eq!(ue8m0_for(1.0), 119);
    }

    #[test]
    fn half_conversions_round_trip_and_round_to_even() {
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h);
            if f.is_nan() {
                assert!(f32_to_f16(f) & 0x7C00 == 0x7C00 && f32_to_f16(f) & 0x3FF != 0);
            } else {
                assert_eq!(f32_to_f16(f), h, "half {h:#x}");
            }
            let b = bf16_to_f32(h);
            if !b.is_nan() {
                assert_eq!(f32_to_bf16(b), h);
            }
        }
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F80_8000)), 0x3F80); // tie to even
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F81_8000)), 0x3F82);
        assert_eq!(f32_to_f16(65520.0), 0x7C00);
        assert_eq!(f32_to_f16(65519.0), 0x7BFF);
    }
}
