//! The layout of a table's bytes: how many a shape needs, and whether two ranges share any.

use crate::dtype::{DType, FP8_BLOCK};
use crate::error::{EngramError, Result};

/// Whether byte ranges `[a, a + a_len)` and `[b, b + b_len)` share a byte (pointers are only
/// compared, never read).
pub fn ranges_overlap(a: *const u8, a_len: usize, b: *const u8, b_len: usize) -> bool {
    let (a, b) = (a as usize, b as usize);
    a_len > 0 && b_len > 0 && a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

/// Bytes of a table's values and of its scales, or why the shape is refused: a zero `dim`, an
/// FP8 `dim` that is not a multiple of the block, or a size beyond `isize::MAX` in total.
pub fn table_bytes(dtype: DType, rows: usize, dim: usize) -> Result<(usize, usize)> {
    if dim == 0 {
        return Err(EngramError::Invalid("dim must be at least 1".into()));
    }
    if dtype == DType::F8E4M3 && !dim.is_multiple_of(FP8_BLOCK) {
        return Err(EngramError::Invalid(format!(
            "an FP8 table needs dim to be a multiple of {FP8_BLOCK} (one UE8M0 scale byte per \
             block of {FP8_BLOCK} values), got dim={dim}: pad the rows or use another dtype"
        )));
    }
    let scale_per_row = if dtype == DType::F8E4M3 {
        dim / FP8_BLOCK
    } else {
        0
    };
    let values = rows
        .checked_mul(dim)
        .and_then(|n| n.checked_mul(dtype.size()));
    let scales = rows.checked_mul(scale_per_row);
    match (values, scales) {
        (Some(v), Some(s)) if v.checked_add(s).is_some_and(|n| n <= isize::MAX as usize) => {
            Ok((v, s))
        }
        _ => Err(EngramError::Invalid(format!(
            "a {rows} x {dim} {} table is too large: its values{} exceed the largest possible \
             allocation or file (isize::MAX = {} bytes); use fewer rows or a smaller dim",
            dtype.name(),
            if scale_per_row > 0 { " and scales" } else { "" },
            isize::MAX
        ))),
    }
}
