//! The element types the kernels take and give (ids of any numpy integer dtype, `i64`/`i32`
//! outputs) and the choice of a kernel's implementation, shared by hashing, gathers and tables.

/// Which implementation runs the per-head reduction; `Auto` picks the fastest the CPU supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Auto,
    Scalar,
}

/// An integer id element the kernels accept (numpy's signed and unsigned integer dtypes).
pub trait IdElem: Copy + Send + Sync {
    /// The value as `u64` bits: sign-extended for signed types, so negatives land above any vocab.
    fn bits(self) -> u64;
    /// The exact value, for error messages.
    fn wide(self) -> i128;
}

macro_rules! id_elem {
    (signed: $($t:ty),*; unsigned: $($u:ty),*) => {
        $(impl IdElem for $t {
            #[inline(always)]
            fn bits(self) -> u64 { self as i64 as u64 }
            fn wide(self) -> i128 { self as i128 }
        })*
        $(impl IdElem for $u {
            #[inline(always)]
            fn bits(self) -> u64 { self as u64 }
            fn wide(self) -> i128 { self as i128 }
        })*
    };
}
id_elem!(signed: i8, i16, i32, i64; unsigned: u8, u16, u32, u64);

/// An output element: `i64` always fits, `i32` when the largest id written does.
pub trait OutElem: Copy + Send + Sync + Default + 'static {
    const MAX: u64;
    const IS_I32: bool;
    fn from_u64(v: u64) -> Self;
}

macro_rules! out_elem {
    ($($t:ty => $is_i32:expr),*) => {
        $(impl OutElem for $t {
            const MAX: u64 = <$t>::MAX as u64;
            const IS_I32: bool = $is_i32;
            #[inline(always)]
            fn from_u64(v: u64) -> Self {
                v as $t
            }
        })*
    };
}
out_elem!(i64 => false, i32 => true);
