//! Fused sparse row-wise optimizers: one step updates, in place, the rows of a host table that a
//! batch of lookups touched.
//!
//! A step takes the looked-up ids and one gradient row per lookup. The `(id, position)` pairs are
//! sorted once (a stable LSD radix sort on the ids, so equal ids keep their positions' order),
//! the gradient rows of equal ids are summed in float32 in that order (so the result does not
//! depend on the thread count), and the unique rows are then updated in one parallel pass: each
//! row is read into float32, updated with its optimizer state (float32 tables beside the table),
//! and written back, rounded to nearest-even for float16/bfloat16 tables, or re-quantized with
//! new UE8M0 block scales for FP8 tables. No two threads touch one row, and nothing table-sized
//! is allocated: memory is O(lookups).
//!
//! The arithmetic is torch's, in float32 and in its order (the hyperparameters are f64, like
//! Python floats, rounded to float32 where torch rounds them):
//! - [`Optimizer::Sgd`] does `w -= lr * g`.
//! - [`Optimizer::RowwiseAdagrad`] does `acc += mean(g * g)` (one accumulator per row), then
//!   `w -= lr * g / (sqrt(acc) + eps)`.
//! - [`Optimizer::Adam`] is `torch.optim.SparseAdam` (`sparse_adam` in
//!   `torch/optim/_functional.py`) on the coalesced gradient of the same rows.

use crate::cpu::prefetch_line;
use crate::dtype::{self, DType};
use crate::error::{EngramError, Result};
use crate::table::{ranges_overlap, HostTable, Lease};
use rayon::prelude::*;
use std::ops::Range;

mod grads;
mod groups;
mod kinds;
mod rows;
mod torch;

use grads::*;
use groups::*;
pub use kinds::{Optimizer, OptimizerKind, StateTable, StepOptions, StepOutcome};
use rows::*;
use torch::*;

/// Applies one step of `opt` to the rows `ids` of `table`: `grads` holds one float32 gradient
/// row (`dim` values) per id; rows looked up several times get the sum of their gradient rows
/// (summed in float32 in position order). `state` holds the optimizer's float32 state tables
/// (SGD none, row-wise Adagrad one of `[rows, 1]`, Adam two of `[rows, dim]`: `exp_avg`,
/// `exp_avg_sq`), updated in place with the table; `step` is Adam's step count after
/// incrementing it (1 at the first step; ignored by the others). Returns the number of unique
/// rows updated.
///
/// Everything is checked before any row is written: the hyperparameters, the table and the
/// states writable, the states' count, dtype and shape, no state sharing memory with the table
/// or another state, `grads` sharing memory with none of them, `grads.len() == ids.len() * dim`,
/// every id in `[0, rows)`. Each id is read exactly once (into a copy that is checked and the
/// only thing rows are addressed from) and each gradient value once, so memory that another
/// thread writes meanwhile (an array a Python thread owns) can change the values the step uses,
/// never which memory it touches.
pub fn sparse_step(
    table: &mut HostTable,
    ids: &[i64],
    grads: &[f32],
    opt: &Optimizer,
    state: &mut [&mut HostTable],
    step: u64,
) -> Result<usize> {
    match sparse_step_with(
        table,
        ids,
        grads,
        opt,
        state,
        step,
        &StepOptions::default(),
        false,
        None,
    )? {
        StepOutcome::Updated { rows, .. } => Ok(rows),
        StepOutcome::NonFinite { .. } => unreachable!("finiteness is checked only when asked"),
    }
}

/// [`sparse_step`] with the checks of `opts`: non-finite gradients refused before anything is
/// written (`check_finite`), a gradient multiplier (`grad_scale`) and clipping by global norm
/// (`max_grad_norm`), all inside the fused step.
///
/// How: with `check_finite` alone, one parallel streaming pass over `grads` (the largest
/// magnitude, in integer lanes: a NaN or infinity cannot hide from it) runs before the update;
/// when it proves that no sum of gradient rows (times `grad_scale`) can overflow, which holds
/// unless gradients approach `f32::MAX / lookups`, that is the whole check. Otherwise, and
/// whenever clipping is asked for, a first pass over the unique rows sums each row's gradient
/// exactly as the update does (same values, same order) and checks it and its squares (f64,
/// summed in a fixed order: the norm does not depend on the thread count). A step refused for
/// a non-finite gradient writes no row of the table or of the states.
///
/// The gradients are read by the check and again by the update: an array that another thread
/// writes during the call can still bring a non-finite value in (the memory touched stays
/// the same, see [`sparse_step`]).
#[allow(clippy::too_many_arguments)]
pub fn sparse_step_checked(
    table: &mut HostTable,
    ids: &[i64],
    grads: &[f32],
    opt: &Optimizer,
    state: &mut [&mut HostTable],
    step: u64,
    opts: &StepOptions,
) -> Result<StepOutcome> {
    sparse_step_with(table, ids, grads, opt, state, step, opts, false, None)
}

/// Refuses state tables that are the table they train or each other: the step writes each
/// once (and would deadlock on a table locked twice).
pub fn check_state_tables(opt: &Optimizer, table: &Lease, states: &[Lease]) -> Result<()> {
    for (i, s) in states.iter().enumerate() {
        if s.same_table(table) {
            return Err(EngramError::Invalid(format!(
                "{}: state table {i} is the table it trains: pass separate state tables",
                opt.name()
            )));
        }
        if let Some(k) = states[..i].iter().position(|o| o.same_table(s)) {
            return Err(EngramError::Invalid(format!(
                "{}: state tables {k} and {i} are the same table: pass separate state tables",
                opt.name()
            )));
        }
    }
    Ok(())
}

/// [`sparse_step_checked`] on shared tables: the state tables are checked apart from the table
/// and each other, and all are write-locked for the step in one fixed order (the tables'
/// addresses), so that steps over the same tables from other threads cannot deadlock with it.
pub fn sparse_step_leased(
    table: &Lease,
    ids: &[i64],
    grads: &[f32],
    opt: &Optimizer,
    states: &[Lease],
    step: u64,
    opts: &StepOptions,
) -> Result<StepOutcome> {
    check_state_tables(opt, table, states)?;
    let all: Vec<&Lease> = std::iter::once(table).chain(states).collect();
    let mut guards = Lease::write_all(&all);
    let mut tables = guards.iter_mut().map(|g| &mut **g);
    let t = tables.next().expect("the table's guard");
    let mut st: Vec<&mut HostTable> = tables.collect();
    sparse_step_checked(t, ids, grads, opt, &mut st, step, opts)
}

/// [`sparse_step_checked`], with `comparison_sort` forcing the fallback sort and `simd` the code
/// path (tests).
#[allow(clippy::too_many_arguments)]
fn sparse_step_with(
    table: &mut HostTable,
    ids: &[i64],
    grads: &[f32],
    opt: &Optimizer,
    state: &mut [&mut HostTable],
    step: u64,
    opts: &StepOptions,
    comparison_sort: bool,
    simd: Option<Simd>,
) -> Result<StepOutcome> {
    opt.validate(step)?;
    validate_options(opt, opts)?;
    check_tables(table, opt, state)?;
    let dim = table.dim;
    if ids.len().checked_mul(dim) != Some(grads.len()) {
        return Err(EngramError::Invalid(format!(
            "{}: grads must hold one row of {dim} float32 values per id ([{}, {dim}] = {} \
             values), got {} values",
            opt.name(),
            ids.len(),
            ids.len() as u128 * dim as u128,
            grads.len()
        )));
    }
    let (gp, glen) = (grads.as_ptr().cast::<u8>(), std::mem::size_of_val(grads));
    if table.overlaps(gp, glen) || state.iter().any(|s| s.overlaps(gp, glen)) {
        return Err(EngramError::Invalid(format!(
            "{}: grads share memory with the table or a state table, which the step writes: \
             pass a separate gradient array",
            opt.name()
        )));
    }
    if ids.is_empty() {
        return Ok(StepOutcome::Updated {
            rows: 0,
            grad_norm: None,
        });
    }
    let simd = simd.unwrap_or_else(Simd::detect);
    let inv = opts.grad_scale as f32;
    // The checks, before any row is written. The streaming pass over the gradients runs on the
    // other threads while this one sorts the ids (a sequential radix sort).
    let mut exact = opts.max_grad_norm.is_some();
    let (groups, top) = if opts.check_finite && !exact {
        let (groups, top) = rayon::join(
            || Groups::new(ids, table.rows, comparison_sort),
            || max_abs_bits(grads, simd),
        );
        (groups?, Some(top))
    } else {
        (Groups::new(ids, table.rows, comparison_sort)?, None)
    };
    if let Some(top) = top {
        if top >= F32_INF_BITS {
            let bad = grads
                .iter()
                .position(|x| !x.is_finite())
                .expect("a non-finite value (found by the pass)");
            let position = bad / dim;
            return Ok(StepOutcome::NonFinite {
                position,
                row: ids[position] as usize,
                value: grads[bad],
            });
        }
        exact = !sums_cannot_overflow(f32::from_bits(top), ids.len(), inv);
    }
    let mut grad_norm = None;
    let mut clip = 1.0f32;
    if exact {
        let (sq, bad) = coalesced_squares(&groups, grads, dim, inv, simd);
        if let Some((j, value)) = bad {
            if opts.check_finite {
                let position = groups.positions(j)[0] as usize;
                let position = groups
                    .positions(j)
                    .iter()
                    .map(|&p| p as usize)
                    .find(|&p| grads[p * dim..][..dim].iter().any(|x| !x.is_finite()))
                    .unwrap_or(position);
                return Ok(StepOutcome::NonFinite {
                    position,
                    row: groups.row(j),
                    value,
                });
            }
        }
        let norm = sq.sqrt();
        if let Some(max) = opts.max_grad_norm {
            grad_norm = Some(norm);
            // torch.nn.utils.clip_grad_norm_: max_norm / (total_norm + 1e-6), clamped to 1.
            let coef = max / (norm + 1e-6);
            if coef < 1.0 {
                clip = coef as f32;
            }
        }
    }
    // A tiered table: first the write-back of a store over its budget (a failure there is the
    // step's, before any row changes), then the places of the rows (cold ones read in).
    let places = match table.tiered_mut() {
        Some(tiered) => {
            if tiered.over_budget() {
                tiered.flush()?;
            }
            Some(tiered.prepare_step((0..groups.len()).map(|j| groups.row(j) as u64))?)
        }
        None => None,
    };
    let consts = Consts::new(opt, step, dim);
    let t: &HostTable = table;
    let st: Vec<&HostTable> = state.iter().map(|s| &**s).collect();
    let unique = groups.len();
    // Lines each updated row misses on: its table row (and scales), its state rows and its
    // first gradient row.
    let lines = t.row_bytes().div_ceil(64)
        + usize::from(t.scale_bytes() > 0)
        + (dim * 4).div_ceil(64)
        + st.iter().map(|s| s.row_bytes().div_ceil(64)).sum::<usize>();
    let ahead = (LINES_IN_FLIGHT / lines.max(1)).clamp(2, MAX_AHEAD);
    // The unique rows in increasing order (neighbouring rows share page-table lines and DRAM
    // pages), split into pieces, each piece on one thread.
    (0..unique.div_ceil(PIECE))
        .into_par_iter()
        .for_each(|piece| {
            let (lo, hi) = (piece * PIECE, ((piece + 1) * PIECE).min(unique));
            let mut rows = RowWork::new(t, &st, grads, consts, inv, clip, places.as_deref());
            // SAFETY: `groups` holds each row once, every row below `t.rows` (checked when it
            // was built) and every position below `ids.len()` (so its gradient row is inside
            // `grads`, whose length was checked); the pieces split the unique rows, so no other
            // thread touches these rows of the table or of the states. The table and the states
            // are writable (checked), and the caller's `&mut` borrows of them exclude every
            // other access while the step runs; a tiered table's `places` are its rows' bytes
            // (hot buffer or write-back store, one place per unique row), held by it under the
            // same borrow. `simd` is what this CPU has.
            unsafe { rows.run(simd, &groups, lo..hi, ahead) };
        });
    Ok(StepOutcome::Updated {
        rows: unique,
        grad_norm,
    })
}

/// Unique rows per unit of parallel work.
const PIECE: usize = 4096;
/// Cache lines a thread keeps in flight through prefetches.
const LINES_IN_FLIGHT: usize = 64;
/// The largest prefetch distance, in unique rows.
const MAX_AHEAD: usize = 16;

/// Checks the table and the state tables before anything is read or written.
fn check_tables(table: &HostTable, opt: &Optimizer, state: &[&mut HostTable]) -> Result<()> {
    for s in state {
        s.refuse_tiered(&format!("{}'s state", opt.name()))?;
    }
    if !table.writable() {
        return Err(EngramError::ReadOnly(format!(
            "{}: this {} table was opened read-only: open it writable (and a writable \
             file or array) to train it",
            opt.name(),
            table.mode.name()
        )));
    }
    let layout = opt.kind().state_tables();
    if state.len() != layout.len() {
        let names: Vec<String> = layout
            .iter()
            .map(|t| match t.width {
                Some(w) => format!("{} float32 [rows, {w}]", t.name),
                None => format!("{} float32 [rows, dim]", t.name),
            })
            .collect();
        return Err(EngramError::Invalid(format!(
            "{} needs {} state table{}{}, got {}",
            opt.name(),
            layout.len(),
            if layout.len() == 1 { "" } else { "s" },
            if names.is_empty() {
                String::new()
            } else {
                format!(" ({})", names.join(", "))
            },
            state.len()
        )));
    }
    let span = |t: &HostTable| {
        // SAFETY: `row_ptr(0)` only offsets by 0; the pointer is compared, never read.
        (unsafe { t.row_ptr(0) }, t.rows * t.row_bytes())
    };
    for (i, (s, t)) in state.iter().zip(layout).enumerate() {
        let cols = t.width.unwrap_or(table.dim);
        if s.dtype != DType::F32 || s.rows != table.rows || s.dim != cols {
            return Err(EngramError::Invalid(format!(
                "{}: state table {i} is {} [{}, {}], expected float32 [{}, {cols}] ({})",
                opt.name(),
                s.dtype.name(),
                s.rows,
                s.dim,
                table.rows,
                t.name
            )));
        }
        if !s.writable() {
            return Err(EngramError::ReadOnly(format!(
                "{}: state table {i} was opened read-only: open it writable to train \
                 with it",
                opt.name()
            )));
        }
        let (p, len) = span(s);
        if table.overlaps(p, len) {
            return Err(EngramError::Invalid(format!(
                "{}: state table {i} shares memory with the table it trains: pass separate \
                 state tables",
                opt.name()
            )));
        }
        for (k, other) in state[..i].iter().enumerate() {
            let (q, qlen) = span(other);
            if ranges_overlap(p, len, q, qlen) {
                return Err(EngramError::Invalid(format!(
                    "{}: state tables {k} and {i} share memory: pass separate state tables",
                    opt.name()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
