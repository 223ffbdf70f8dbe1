//! The row engine: the SIMD level, prefetches, and the update of each unique row with its
//! state rows.

use super::*;

/// Prefetches `len` bytes at `p`.
#[inline(always)]
pub(super) fn prefetch(p: *const u8, len: usize) {
    let mut off = 0;
    while off < len {
        prefetch_line(p.wrapping_add(off));
        off += 64;
    }
    if len > 0 {
        prefetch_line(p.wrapping_add(len - 1));
    }
}

/// The instruction sets the update loop is compiled for (picked once per step; every variant
/// computes the same IEEE float32 operations in the same order, so results do not depend on it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Simd {
    Avx512,
    Avx2,
    Baseline,
}

impl Simd {
    pub(super) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::cpu::avx512() {
                return Simd::Avx512;
            }
            if crate::cpu::avx2() {
                return Simd::Avx2;
            }
        }
        Simd::Baseline
    }
}

/// One thread's scratch rows and the tables it updates.
pub(super) struct RowWork<'a> {
    pub(super) table: &'a HostTable,
    pub(super) state: &'a [&'a HostTable],
    pub(super) grads: &'a [f32],
    pub(super) consts: Consts,
    /// The gradient multipliers (see [`coalesce`]).
    pub(super) inv: f32,
    pub(super) clip: f32,
    /// Where each unique row's values and scales are (a tiered table's hot buffer or
    /// write-back store), by unique row; `None`: at the table's own row addresses.
    pub(super) places: Option<&'a [(usize, usize)]>,
    /// The table's rows are float32 at 4-byte aligned addresses: updated in place, as `[f32]`.
    pub(super) direct: bool,
    /// The same for every state table.
    pub(super) direct_state: bool,
    pub(super) g: Vec<f32>,
    pub(super) w: Vec<f32>,
    pub(super) m: Vec<f32>,
    pub(super) v: Vec<f32>,
}

/// Whether a table's rows are float32 at 4-byte aligned addresses (every row is, then: a row is
/// `dim * 4` bytes).
pub(super) fn f32_aligned(t: &HostTable) -> bool {
    // SAFETY: `row_ptr(0)` only offsets by 0; the address is inspected, not read.
    let base = unsafe { t.row_ptr(0) };
    t.dtype == DType::F32 && base.cast::<f32>().is_aligned()
}

impl<'a> RowWork<'a> {
    pub(super) fn new(
        table: &'a HostTable,
        state: &'a [&'a HostTable],
        grads: &'a [f32],
        consts: Consts,
        inv: f32,
        clip: f32,
        places: Option<&'a [(usize, usize)]>,
    ) -> Self {
        let dim = table.dim;
        let state_dim = if matches!(consts, Consts::Adam { .. }) {
            dim
        } else {
            1
        };
        Self {
            table,
            state,
            grads,
            consts,
            inv,
            clip,
            places,
            direct: places.is_none() && f32_aligned(table),
            direct_state: state.iter().all(|s| f32_aligned(s)),
            g: vec![0.0; dim],
            w: vec![0.0; dim],
            m: vec![0.0; state_dim],
            v: vec![0.0; state_dim],
        }
    }

    /// Updates unique rows `range`, prefetching `ahead` rows in advance, with the code compiled
    /// for `simd`.
    ///
    /// # Safety
    /// As [`RowWork::update`], for every row of `range`; `simd` is available on this CPU.
    pub(super) unsafe fn run(
        &mut self,
        simd: Simd,
        groups: &Groups,
        range: Range<usize>,
        ahead: usize,
    ) {
        match simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the caller's contract; AVX-512 F is there (`Simd::detect`).
            Simd::Avx512 => unsafe { self.run_avx512(groups, range, ahead) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the caller's contract; AVX2 is there (`Simd::detect`).
            Simd::Avx2 => unsafe { self.run_avx2(groups, range, ahead) },
            // SAFETY: the caller's contract.
            _ => unsafe { self.run_body(groups, range, ahead) },
        }
    }

    /// [`RowWork::run_body`] compiled for AVX-512 F.
    ///
    /// # Safety
    /// As [`RowWork::update`] for every row of `range`; the CPU has AVX-512 F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run_avx512(&mut self, groups: &Groups, range: Range<usize>, ahead: usize) {
        // SAFETY: the caller's contract.
        unsafe { self.run_body(groups, range, ahead) }
    }

    /// [`RowWork::run_body`] compiled for AVX2.
    ///
    /// # Safety
    /// As [`RowWork::update`] for every row of `range`; the CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn run_avx2(&mut self, groups: &Groups, range: Range<usize>, ahead: usize) {
        // SAFETY: the caller's contract.
        unsafe { self.run_body(groups, range, ahead) }
    }

    /// The loop over unique rows `range`, each row's data prefetched `ahead` rows before.
    ///
    /// # Safety
    /// As [`RowWork::update`], for every row of `range`.
    #[inline(always)]
    pub(super) unsafe fn run_body(&mut self, groups: &Groups, range: Range<usize>, ahead: usize) {
        let (lo, hi) = (range.start, range.end);
        for j in lo..(lo + ahead).min(hi) {
            self.prefetch(groups, j);
        }
        for j in lo..hi {
            if j + ahead < hi {
                self.prefetch(groups, j + ahead);
            }
            // SAFETY: the caller's contract.
            unsafe { self.update(groups, j) };
        }
    }

    /// Prefetches unique row `j`'s first gradient row, table row (and scales) and state rows.
    #[inline(always)]
    pub(super) fn prefetch(&self, groups: &Groups, j: usize) {
        let dim = self.table.dim;
        let r = groups.row(j);
        let first = groups.order[groups.starts[j] as usize] as usize;
        prefetch(
            self.grads.as_ptr().wrapping_add(first * dim).cast(),
            dim * 4,
        );
        let (rb, sb) = (self.table.row_bytes(), self.table.scale_bytes());
        let (values, scales) = self.place(j, r);
        prefetch(values, rb);
        if sb > 0 {
            prefetch_line(scales);
        }
        for s in self.state {
            // SAFETY: as above, an address only.
            let p = unsafe { s.row_ptr(0) };
            prefetch(p.wrapping_add(r * s.row_bytes()), s.row_bytes());
        }
    }

    /// The addresses of unique row `j`'s (table row `r`'s) values and scales; computed only
    /// (wrapping), dereferenced by callers that hold [`RowWork::update`]'s contract.
    #[inline(always)]
    pub(super) fn place(&self, j: usize, r: usize) -> (*const u8, *const u8) {
        match self.places {
            Some(p) => (p[j].0 as *const u8, p[j].1 as *const u8),
            None => {
                // SAFETY: `row_ptr(0)`/`scale_ptr(0)` offset by 0; the rest wraps.
                let (v, s) = unsafe { (self.table.row_ptr(0), self.table.scale_ptr(0)) };
                let (rb, sb) = (self.table.row_bytes(), self.table.scale_bytes());
                (v.wrapping_add(r * rb), s.wrapping_add(r * sb))
            }
        }
    }

    /// Sums unique row `j`'s gradient rows, updates the row and its state rows, writes them back.
    /// Float32 rows at aligned addresses are updated in place; others go through scratch rows
    /// (converted from and to the table's dtype; FP8 rows re-quantized with new block scales).
    ///
    /// # Safety
    /// `groups.row(j) < table.rows` (and the states' rows), its positions index rows of
    /// `grads`, and no other thread reads or writes this row of the table or of the states
    /// during the call; the table and the states are writable; `places`, when given, holds
    /// for unique row `j` the addresses of its row's bytes, writable and exclusive likewise.
    #[inline(always)]
    pub(super) unsafe fn update(&mut self, groups: &Groups, j: usize) {
        let dim = self.table.dim;
        let r = groups.row(j);
        let grads = self.grads;
        let (vp, sp) = self.place(j, r);
        let RowWork {
            table: t,
            state,
            consts,
            inv,
            clip,
            direct,
            direct_state,
            g: g_buf,
            w: w_buf,
            m: m_buf,
            v: v_buf,
            ..
        } = self;
        // The gradient: the row itself when the id appears once (and nothing scales it), else
        // the sum in position order, scaled (each gradient value is read once here).
        let g: &[f32] = coalesce(groups, grads, dim, j, g_buf, *inv, *clip);
        let (rb, sb) = (t.row_bytes(), t.scale_bytes());
        // SAFETY: `r < rows` (the caller's contract), so the row's value bytes (and, for FP8,
        // its scale bytes) lie inside the table (or at its place), which is writable; no other
        // thread touches them during the call, so these are the only references to them.
        let (values, scales) = unsafe {
            (
                std::slice::from_raw_parts_mut(vp.cast_mut(), rb),
                if sb > 0 {
                    std::slice::from_raw_parts_mut(sp.cast_mut(), sb)
                } else {
                    &mut [][..]
                },
            )
        };
        let w: &mut [f32] = if *direct {
            // SAFETY: the row's bytes (above), float32 at an aligned address (`direct`).
            unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<f32>(), dim) }
        } else {
            dtype::row_to_f32(t.dtype, values, scales, w_buf);
            w_buf
        };
        match *consts {
            Consts::Sgd { lr } => sgd(w, g, lr),
            Consts::Adagrad { lr, eps, dim } => {
                // SAFETY: the caller's contract (row `r` of the states is this thread's only).
                let (acc, back) = unsafe { state_row(state[0], r, *direct_state, m_buf) };
                acc[0] = adagrad(w, g, acc[0], lr, eps, dim);
                if let Some(bytes) = back {
                    dtype::f32_to_row(DType::F32, acc, bytes);
                }
            }
            Consts::Adam {
                omb1,
                omb2,
                eps,
                neg_step_size,
            } => {
                // SAFETY: the caller's contract (row `r` of the states is this thread's only);
                // the two state tables do not overlap (checked).
                let (m, m_back) = unsafe { state_row(state[0], r, *direct_state, m_buf) };
                // SAFETY: as above.
                let (v, v_back) = unsafe { state_row(state[1], r, *direct_state, v_buf) };
                adam(w, m, v, g, omb1, omb2, eps, neg_step_size);
                if let Some(bytes) = m_back {
                    dtype::f32_to_row(DType::F32, m, bytes);
                }
                if let Some(bytes) = v_back {
                    dtype::f32_to_row(DType::F32, v, bytes);
                }
            }
        }
        if !*direct {
            if t.dtype == DType::F8E4M3 {
                dtype::quantize_row(w, values, scales);
            } else {
                dtype::f32_to_row(t.dtype, w, values);
            }
        }
    }
}

/// Row `r` of state table `s` as float32 values: the row itself when `direct` (float32 at an
/// aligned address), else `buf` holding a copy, returned with the row's bytes to write it back
/// into.
///
/// # Safety
/// `r < s.rows`, `s` is writable, `direct` only if its rows are float32 at aligned addresses,
/// and nothing else reads or writes the row while the returned slices live.
#[inline(always)]
pub(super) unsafe fn state_row<'b>(
    s: &HostTable,
    r: usize,
    direct: bool,
    buf: &'b mut [f32],
) -> (&'b mut [f32], Option<&'b mut [u8]>) {
    // SAFETY: the caller's contract: inside the state table, writable, used by this caller only.
    let bytes = unsafe { std::slice::from_raw_parts_mut(s.row_ptr(r).cast_mut(), s.row_bytes()) };
    if direct {
        // SAFETY: float32 values at an aligned address (the caller's contract).
        let row =
            unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<f32>(), s.dim) };
        (row, None)
    } else {
        dtype::row_to_f32(DType::F32, bytes, &[], buf);
        (buf, Some(bytes))
    }
}
