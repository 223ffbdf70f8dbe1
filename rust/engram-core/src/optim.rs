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

/// A sparse row-wise optimizer and its hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// `w -= lr * g`; no state.
    Sgd { lr: f64 },
    /// One float32 accumulator per row (a state table of `[rows, 1]`):
    /// `acc += mean(g * g)`, `w -= lr * g / (sqrt(acc) + eps)`.
    RowwiseAdagrad { lr: f64, eps: f64 },
    /// `torch.optim.SparseAdam`: state tables `exp_avg` and `exp_avg_sq`, float32
    /// `[rows, dim]` each.
    Adam {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
    },
}

/// The optimizer kinds, by the names the boundary uses (`"sgd"`, `"rowwise_adagrad"`,
/// `"adam"`): one registry for the core, the binding and the Python classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKind {
    Sgd,
    RowwiseAdagrad,
    Adam,
}

/// One state table of an optimizer: its name (the file suffix `<table>.<kind>-<name>`) and its
/// width (`None`: the table's dim). Every state table is float32 with the table's row count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateTable {
    pub name: &'static str,
    pub width: Option<usize>,
}

impl OptimizerKind {
    pub const ALL: [OptimizerKind; 3] = [
        OptimizerKind::Sgd,
        OptimizerKind::RowwiseAdagrad,
        OptimizerKind::Adam,
    ];

    /// The kind named `name`, or an error listing the names.
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| {
                EngramError::Invalid(format!(
                    "unknown optimizer kind {name:?}: use \"sgd\", \"rowwise_adagrad\" or \"adam\""
                ))
            })
    }

    /// The kind's name at the boundary (and in state file names).
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::RowwiseAdagrad => "rowwise_adagrad",
            OptimizerKind::Adam => "adam",
        }
    }

    /// The name of the optimizer's class (used in messages).
    pub fn class_name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "SparseSGD",
            OptimizerKind::RowwiseAdagrad => "SparseRowwiseAdagrad",
            OptimizerKind::Adam => "SparseAdam",
        }
    }

    /// The state tables a step needs, in the order [`sparse_step`] takes them.
    pub fn state_tables(self) -> &'static [StateTable] {
        match self {
            OptimizerKind::Sgd => &[],
            OptimizerKind::RowwiseAdagrad => &[StateTable {
                name: "acc",
                width: Some(1),
            }],
            OptimizerKind::Adam => &[
                StateTable {
                    name: "exp_avg",
                    width: None,
                },
                StateTable {
                    name: "exp_avg_sq",
                    width: None,
                },
            ],
        }
    }

    /// The hyperparameters the kind uses (the others are ignored by [`Optimizer::new`]).
    pub fn hyperparameters(self) -> &'static [&'static str] {
        match self {
            OptimizerKind::Sgd => &["lr"],
            OptimizerKind::RowwiseAdagrad => &["lr", "eps"],
            OptimizerKind::Adam => &["lr", "betas", "eps"],
        }
    }
}

/// A float as Python writes it in messages (`nan`, `inf`, `0.001`).
fn py_float(v: f64) -> String {
    if v.is_nan() {
        "nan".into()
    } else {
        format!("{v}")
    }
}

impl Optimizer {
    /// The optimizer of `kind` with these hyperparameters, checked (the one check: the Python
    /// classes call it when made, and every step calls it again). `eps` and `betas` are ignored
    /// by the kinds that have none.
    pub fn new(kind: OptimizerKind, lr: f64, eps: f64, betas: (f64, f64)) -> Result<Self> {
        let opt = match kind {
            OptimizerKind::Sgd => Optimizer::Sgd { lr },
            OptimizerKind::RowwiseAdagrad => Optimizer::RowwiseAdagrad { lr, eps },
            OptimizerKind::Adam => Optimizer::Adam {
                lr,
                beta1: betas.0,
                beta2: betas.1,
                eps,
            },
        };
        opt.check()?;
        Ok(opt)
    }

    /// The optimizer's kind.
    pub fn kind(&self) -> OptimizerKind {
        match self {
            Optimizer::Sgd { .. } => OptimizerKind::Sgd,
            Optimizer::RowwiseAdagrad { .. } => OptimizerKind::RowwiseAdagrad,
            Optimizer::Adam { .. } => OptimizerKind::Adam,
        }
    }

    /// The name used in messages.
    pub fn name(&self) -> &'static str {
        self.kind().class_name()
    }

    /// Refuses hyperparameters torch refuses (and non-finite ones), with the same words
    /// whoever calls: `SparseAdam: eps must be a finite number above 0, got 0`.
    pub fn check(&self) -> Result<()> {
        let bad = |field: &str, value: f64, rule: &str| {
            Err(EngramError::Invalid(format!(
                "{}: {field} must be {rule}, got {}",
                self.name(),
                py_float(value)
            )))
        };
        let (lr, eps) = match *self {
            Optimizer::Sgd { lr } => (lr, 0.0),
            Optimizer::RowwiseAdagrad { lr, eps } => (lr, eps),
            Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                for (field, b) in [("betas[0]", beta1), ("betas[1]", beta2)] {
                    if !(0.0..1.0).contains(&b) {
                        return bad(field, b, "in [0, 1)");
                    }
                }
                // torch.optim.SparseAdam refuses eps <= 0 (a zero denominator for untouched
                // moments).
                if !(eps > 0.0 && eps.is_finite()) {
                    return bad("eps", eps, "a finite number above 0");
                }
                (lr, eps)
            }
        };
        if !(lr >= 0.0 && lr.is_finite()) {
            return bad("lr", lr, "a finite number >= 0");
        }
        if !(eps >= 0.0 && eps.is_finite()) {
            return bad("eps", eps, "a finite number >= 0");
        }
        Ok(())
    }

    /// [`Optimizer::check`], and Adam's step count (1 at the first step).
    fn validate(&self, step: u64) -> Result<()> {
        self.check()?;
        if matches!(self, Optimizer::Adam { .. }) && step == 0 {
            return Err(EngramError::Invalid(
                "SparseAdam: step = 0 is invalid: pass the step count after incrementing it (1 \
                 at the first step)"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// The per-element constants of one step, rounded to float32 where torch rounds them.
#[derive(Clone, Copy)]
enum Consts {
    Sgd {
        lr: f32,
    },
    Adagrad {
        lr: f32,
        eps: f32,
        dim: f32,
    },
    Adam {
        /// `1 - beta1` (computed in f64, as Python does, then rounded).
        omb1: f32,
        omb2: f32,
        eps: f32,
        /// `-(lr * sqrt(1 - beta2**step) / (1 - beta1**step))`.
        neg_step_size: f32,
    },
}

impl Consts {
    fn new(opt: &Optimizer, step: u64, dim: usize) -> Self {
        match *opt {
            Optimizer::Sgd { lr } => Consts::Sgd { lr: lr as f32 },
            Optimizer::RowwiseAdagrad { lr, eps } => Consts::Adagrad {
                lr: lr as f32,
                eps: eps as f32,
                dim: dim as f32,
            },
            Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                // As torch/optim/_functional.py computes them, in Python floats.
                let bias_correction1 = 1.0 - beta1.powf(step as f64);
                let bias_correction2 = 1.0 - beta2.powf(step as f64);
                let step_size = lr * bias_correction2.sqrt() / bias_correction1;
                Consts::Adam {
                    omb1: (1.0 - beta1) as f32,
                    omb2: (1.0 - beta2) as f32,
                    eps: eps as f32,
                    neg_step_size: (-step_size) as f32,
                }
            }
        }
    }
}

/// What a step does besides the update: see [`sparse_step_checked`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOptions {
    /// Write nothing, and return [`StepOutcome::NonFinite`], when the gradient of a touched row
    /// (the sum of its gradient rows, times `grad_scale`) holds a NaN or an infinity.
    pub check_finite: bool,
    /// Multiplies every summed gradient row before the update (a loss scaler's `1 / scale`,
    /// rounded to float32 as `torch.amp.GradScaler` rounds it); 1 for none.
    pub grad_scale: f64,
    /// Clips the summed (and scaled) gradient of the touched rows to this global L2 norm, as
    /// `torch.nn.utils.clip_grad_norm_` does: every row times `max / (norm + 1e-6)` when that
    /// is below 1.
    pub max_grad_norm: Option<f64>,
}

impl Default for StepOptions {
    fn default() -> Self {
        Self {
            check_finite: false,
            grad_scale: 1.0,
            max_grad_norm: None,
        }
    }
}

/// What [`sparse_step_checked`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepOutcome {
    /// `rows` unique rows were updated; `grad_norm` is the global L2 norm of the summed, scaled
    /// gradient before clipping (computed only when clipping was asked for).
    Updated { rows: usize, grad_norm: Option<f64> },
    /// Nothing was written: the gradient of table row `row` is not finite (`value`; `position`
    /// is a lookup of that row whose gradient row holds it, or its first lookup when only the
    /// sum overflows).
    NonFinite {
        position: usize,
        row: usize,
        value: f32,
    },
}

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
            let mut rows = RowWork::new(t, &st, grads, consts, inv, clip);
            // SAFETY: `groups` holds each row once, every row below `t.rows` (checked when it
            // was built) and every position below `ids.len()` (so its gradient row is inside
            // `grads`, whose length was checked); the pieces split the unique rows, so no other
            // thread touches these rows of the table or of the states. The table and the states
            // are writable (checked), and the caller's `&mut` borrows of them exclude every
            // other access while the step runs. `simd` is what this CPU has.
            unsafe { rows.run(simd, &groups, lo..hi, ahead) };
        });
    Ok(StepOutcome::Updated {
        rows: unique,
        grad_norm,
    })
}

/// The bits of `f32::INFINITY`: an `|x|` bit pattern at or above it is an infinity or a NaN.
const F32_INF_BITS: u32 = 0x7f80_0000;

/// Refuses a gradient multiplier or a clipping norm that is not a finite number above 0.
fn validate_options(opt: &Optimizer, opts: &StepOptions) -> Result<()> {
    let g = opts.grad_scale;
    if !(g > 0.0 && g.is_finite() && (g as f32).is_finite() && g as f32 > 0.0) {
        return Err(EngramError::Invalid(format!(
            "{}: grad_scale = {g} is invalid: it must be a finite number above 0 (in float32)",
            opt.name()
        )));
    }
    if let Some(m) = opts.max_grad_norm {
        if !(m > 0.0 && m.is_finite()) {
            return Err(EngramError::Invalid(format!(
                "{}: max_grad_norm = {m} is invalid: it must be a finite number above 0 (or \
                 None for no clipping)",
                opt.name()
            )));
        }
    }
    Ok(())
}

/// The largest `|x|` of `grads` as bits (sign cleared): a NaN or an infinity gives
/// [`F32_INF_BITS`] or more. Integer lanes, so a NaN cannot be skipped by a float `max`.
fn max_abs_bits(grads: &[f32], simd: Simd) -> u32 {
    grads
        .par_chunks(1 << 16)
        .map(|c| match simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 F is there (`Simd::detect`, or a test that checked it).
            Simd::Avx512 => unsafe { max_abs_bits_avx512(c) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 is there (as above).
            Simd::Avx2 => unsafe { max_abs_bits_avx2(c) },
            _ => max_abs_bits_body(c),
        })
        .max()
        .unwrap_or(0)
}

/// [`max_abs_bits_body`] compiled for AVX-512 F.
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_abs_bits_avx512(c: &[f32]) -> u32 {
    max_abs_bits_body(c)
}

/// [`max_abs_bits_body`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn max_abs_bits_avx2(c: &[f32]) -> u32 {
    max_abs_bits_body(c)
}

/// The largest `|x|` bit pattern of `c`, in 16 integer lanes.
#[inline(always)]
fn max_abs_bits_body(c: &[f32]) -> u32 {
    let mut lanes = [0u32; 16];
    let mut chunks = c.chunks_exact(16);
    for ch in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(ch) {
            *l = (*l).max(x.to_bits() & 0x7fff_ffff);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(0u32, |m, &x| m.max(x.to_bits() & 0x7fff_ffff));
    lanes.iter().fold(tail, |m, &l| m.max(l))
}

/// Whether every sum of up to `n` gradient values of magnitude at most `top` (summed in
/// float32, then multiplied by `inv`) is certainly finite: `|fl(sum)| <= n top (1 + u)^n`
/// (`u = 2^-24`), bounded by `n top e^(n u)`, with a factor 2 to spare.
fn sums_cannot_overflow(top: f32, n: usize, inv: f32) -> bool {
    let n = n as f64;
    let bound = top as f64 * n * ((n + 1.0) * (-24f64).exp2()).exp() * (inv as f64).max(1.0);
    bound < f32::MAX as f64 / 2.0
}

/// The sum of squares (f64) of every unique row's gradient, summed over its lookups as the
/// update sums it and multiplied by `inv` when that is not 1, with the first unique row (and
/// value) that is not finite. Rows are summed in order within a piece and the pieces in order:
/// the result does not depend on the thread count.
fn coalesced_squares(
    groups: &Groups,
    grads: &[f32],
    dim: usize,
    inv: f32,
    simd: Simd,
) -> (f64, Option<(usize, f32)>) {
    let unique = groups.len();
    let parts: Vec<(f64, Option<(usize, f32)>)> = (0..unique.div_ceil(PIECE))
        .into_par_iter()
        .map(|piece| {
            let (lo, hi) = (piece * PIECE, ((piece + 1) * PIECE).min(unique));
            match simd {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512 F is there (`Simd::detect`, or a test that checked it).
                Simd::Avx512 => unsafe { squares_avx512(groups, grads, dim, inv, lo..hi) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX2 is there (as above).
                Simd::Avx2 => unsafe { squares_avx2(groups, grads, dim, inv, lo..hi) },
                _ => squares_body(groups, grads, dim, inv, lo..hi),
            }
        })
        .collect();
    let mut total = 0f64;
    let mut bad = None;
    for (sq, b) in parts {
        total += sq;
        bad = bad.or(b);
    }
    (total, bad)
}

/// [`squares_body`] compiled for AVX-512 F.
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn squares_avx512(
    groups: &Groups,
    grads: &[f32],
    dim: usize,
    inv: f32,
    range: Range<usize>,
) -> (f64, Option<(usize, f32)>) {
    squares_body(groups, grads, dim, inv, range)
}

/// [`squares_body`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn squares_avx2(
    groups: &Groups,
    grads: &[f32],
    dim: usize,
    inv: f32,
    range: Range<usize>,
) -> (f64, Option<(usize, f32)>) {
    squares_body(groups, grads, dim, inv, range)
}

/// [`coalesced_squares`] over unique rows `range`.
#[inline(always)]
fn squares_body(
    groups: &Groups,
    grads: &[f32],
    dim: usize,
    inv: f32,
    range: Range<usize>,
) -> (f64, Option<(usize, f32)>) {
    let mut buf = vec![0f32; dim];
    let mut total = 0f64;
    let mut bad = None;
    for j in range {
        let g = coalesce(groups, grads, dim, j, &mut buf, inv, 1.0);
        let mut sq = 0f64;
        for &x in g {
            sq += x as f64 * x as f64;
        }
        if !sq.is_finite() && bad.is_none() {
            let value = g
                .iter()
                .copied()
                .find(|x| !x.is_finite())
                .unwrap_or(f32::NAN);
            bad = Some((j, value));
        }
        total += sq;
    }
    (total, bad)
}

/// Unique row `j`'s gradient: its only gradient row as it is when it appears once and
/// `inv == clip == 1`, else in `buf`: the sum of its gradient rows in position order, times
/// `inv`, then times `clip` (each multiplication only when it is not 1). The update and the
/// checks take gradients from here, so they see the same values.
#[inline(always)]
fn coalesce<'g>(
    groups: &Groups,
    grads: &'g [f32],
    dim: usize,
    j: usize,
    buf: &'g mut [f32],
    inv: f32,
    clip: f32,
) -> &'g [f32] {
    let positions = groups.positions(j);
    let first = &grads[positions[0] as usize * dim..][..dim];
    if positions.len() == 1 && inv == 1.0 && clip == 1.0 {
        return first;
    }
    buf.copy_from_slice(first);
    for &p in &positions[1..] {
        let row = &grads[p as usize * dim..][..dim];
        for (a, &b) in buf.iter_mut().zip(row) {
            *a += b;
        }
    }
    if inv != 1.0 {
        for a in buf.iter_mut() {
            *a *= inv;
        }
    }
    if clip != 1.0 {
        for a in buf.iter_mut() {
            *a *= clip;
        }
    }
    buf
}

/// Unique rows per unit of parallel work.
const PIECE: usize = 4096;
/// Cache lines a thread keeps in flight through prefetches.
const LINES_IN_FLIGHT: usize = 64;
/// The largest prefetch distance, in unique rows.
const MAX_AHEAD: usize = 16;

/// Checks the table and the state tables before anything is read or written.
fn check_tables(table: &HostTable, opt: &Optimizer, state: &[&mut HostTable]) -> Result<()> {
    if !table.writable() {
        return Err(EngramError::ReadOnly(format!(
            "{}: this {} table was opened read-only: open it with writable=True (and a writable \
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
                "{}: state table {i} was opened read-only: open it with writable=True to train \
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

/// The lookups grouped by row: `order` holds the positions sorted by (row, position), `starts`
/// where each row's run begins in `order` (and `order.len()` at the end), `rows` each run's row
/// (increasing).
struct Groups {
    order: Vec<u32>,
    starts: Vec<u32>,
    rows: Vec<u64>,
}

impl Groups {
    /// Reads each id once (the caller's memory is read exactly once per position), checks it
    /// against `rows` and groups the positions by id.
    fn new(ids: &[i64], rows: usize, comparison_sort: bool) -> Result<Self> {
        let n = ids.len();
        if n >= u32::MAX as usize {
            return Err(EngramError::Invalid(format!(
                "a sparse step takes fewer than {} lookups, got {n}: split the batch",
                u32::MAX
            )));
        }
        let oom = |what: &str| EngramError::OutOfMemory {
            bytes: n * 8,
            what: format!("{what} of a sparse step's ids"),
            hint: "take fewer lookups per step".into(),
        };
        // Each id read once, then checked and used from this copy only.
        let mut checked: Vec<u64> = Vec::new();
        checked.try_reserve_exact(n).map_err(|_| oom("a copy"))?;
        checked.extend(ids.iter().map(|&id| id as u64));
        let top = checked
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |m, &k| m.max(k)))
            .max()
            .unwrap_or(0);
        if top >= rows as u64 {
            let index = checked.iter().position(|&k| k >= rows as u64).unwrap_or(0);
            return Err(EngramError::IndexOutOfRange {
                value: checked[index] as i64 as i128,
                index,
                rows,
            });
        }
        let pos_bits = bits(n.saturating_sub(1) as u64);
        let id_bits = bits(rows.saturating_sub(1) as u64);
        let (order, sorted): (Vec<u32>, Vec<u64>) = if !comparison_sort && pos_bits + id_bits <= 64
        {
            // `(id << pos_bits) | position`, sorted stably by id: equal ids stay in position
            // order.
            let mut keys: Vec<u64> = Vec::new();
            let mut tmp: Vec<u64> = Vec::new();
            keys.try_reserve_exact(n).map_err(|_| oom("the sort"))?;
            tmp.try_reserve_exact(n).map_err(|_| oom("the sort"))?;
            keys.extend(
                checked
                    .iter()
                    .enumerate()
                    .map(|(i, &id)| (id << pos_bits) | i as u64),
            );
            tmp.resize(n, 0);
            radix_sort(&mut keys, &mut tmp, pos_bits, id_bits);
            let mask = (1u64 << pos_bits) - 1;
            (
                keys.iter().map(|&k| (k & mask) as u32).collect(),
                keys.iter().map(|&k| k >> pos_bits).collect(),
            )
        } else {
            let mut pairs: Vec<(u64, u32)> = checked
                .iter()
                .enumerate()
                .map(|(i, &id)| (id, i as u32))
                .collect();
            pairs.par_sort_unstable();
            (
                pairs.iter().map(|&(_, p)| p).collect(),
                pairs.iter().map(|&(id, _)| id).collect(),
            )
        };
        drop(checked);
        let mut starts = Vec::new();
        let mut rows_of = Vec::new();
        for (i, &id) in sorted.iter().enumerate() {
            if i == 0 || id != sorted[i - 1] {
                starts.push(i as u32);
                rows_of.push(id);
            }
        }
        starts.push(n as u32);
        Ok(Self {
            order,
            starts,
            rows: rows_of,
        })
    }

    /// The number of unique rows.
    fn len(&self) -> usize {
        self.starts.len() - 1
    }

    /// The positions of unique row `j`'s lookups, in increasing order (never empty).
    fn positions(&self, j: usize) -> &[u32] {
        &self.order[self.starts[j] as usize..self.starts[j + 1] as usize]
    }

    /// Unique row `j`'s table row.
    fn row(&self, j: usize) -> usize {
        self.rows[j] as usize
    }
}

/// Bits needed to hold `x` (0 for 0).
fn bits(x: u64) -> u32 {
    64 - x.leading_zeros()
}

/// Sorts `keys` stably by their bits `[shift, shift + id_bits)` (an LSD radix sort, one histogram
/// pass for all digits); `tmp` has the length of `keys`.
fn radix_sort(keys: &mut Vec<u64>, tmp: &mut Vec<u64>, shift: u32, id_bits: u32) {
    if id_bits == 0 {
        return;
    }
    let passes = id_bits.div_ceil(11);
    let digit = id_bits.div_ceil(passes);
    let buckets = 1usize << digit;
    let mask = (buckets - 1) as u64;
    let mut hist = vec![0usize; buckets * passes as usize];
    for &k in keys.iter() {
        for p in 0..passes {
            let d = ((k >> (shift + p * digit)) & mask) as usize;
            hist[p as usize * buckets + d] += 1;
        }
    }
    for p in 0..passes {
        let h = &mut hist[p as usize * buckets..][..buckets];
        if h.contains(&keys.len()) {
            continue; // every key has the same digit: nothing moves
        }
        let mut sum = 0;
        for c in h.iter_mut() {
            let here = *c;
            *c = sum;
            sum += here;
        }
        let s = shift + p * digit;
        for &k in keys.iter() {
            let d = ((k >> s) & mask) as usize;
            tmp[h[d]] = k;
            h[d] += 1;
        }
        std::mem::swap(keys, tmp);
    }
}

/// Prefetches `len` bytes at `p`.
#[inline(always)]
fn prefetch(p: *const u8, len: usize) {
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
enum Simd {
    Avx512,
    Avx2,
    Baseline,
}

impl Simd {
    fn detect() -> Self {
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
struct RowWork<'a> {
    table: &'a HostTable,
    state: &'a [&'a HostTable],
    grads: &'a [f32],
    consts: Consts,
    /// The gradient multipliers (see [`coalesce`]).
    inv: f32,
    clip: f32,
    /// The table's rows are float32 at 4-byte aligned addresses: updated in place, as `[f32]`.
    direct: bool,
    /// The same for every state table.
    direct_state: bool,
    g: Vec<f32>,
    w: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

/// Whether a table's rows are float32 at 4-byte aligned addresses (every row is, then: a row is
/// `dim * 4` bytes).
fn f32_aligned(t: &HostTable) -> bool {
    // SAFETY: `row_ptr(0)` only offsets by 0; the address is inspected, not read.
    let base = unsafe { t.row_ptr(0) };
    t.dtype == DType::F32 && base.cast::<f32>().is_aligned()
}

impl<'a> RowWork<'a> {
    fn new(
        table: &'a HostTable,
        state: &'a [&'a HostTable],
        grads: &'a [f32],
        consts: Consts,
        inv: f32,
        clip: f32,
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
            direct: f32_aligned(table),
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
    unsafe fn run(&mut self, simd: Simd, groups: &Groups, range: Range<usize>, ahead: usize) {
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
    unsafe fn run_avx512(&mut self, groups: &Groups, range: Range<usize>, ahead: usize) {
        // SAFETY: the caller's contract.
        unsafe { self.run_body(groups, range, ahead) }
    }

    /// [`RowWork::run_body`] compiled for AVX2.
    ///
    /// # Safety
    /// As [`RowWork::update`] for every row of `range`; the CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&mut self, groups: &Groups, range: Range<usize>, ahead: usize) {
        // SAFETY: the caller's contract.
        unsafe { self.run_body(groups, range, ahead) }
    }

    /// The loop over unique rows `range`, each row's data prefetched `ahead` rows before.
    ///
    /// # Safety
    /// As [`RowWork::update`], for every row of `range`.
    #[inline(always)]
    unsafe fn run_body(&mut self, groups: &Groups, range: Range<usize>, ahead: usize) {
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
    fn prefetch(&self, groups: &Groups, j: usize) {
        let dim = self.table.dim;
        let r = groups.row(j);
        let first = groups.order[groups.starts[j] as usize] as usize;
        prefetch(
            self.grads.as_ptr().wrapping_add(first * dim).cast(),
            dim * 4,
        );
        // SAFETY: only addresses are computed (wrapping), never read: `row_ptr(0)`/`scale_ptr(0)`
        // offset by 0.
        let (values, scales) = unsafe { (self.table.row_ptr(0), self.table.scale_ptr(0)) };
        let (rb, sb) = (self.table.row_bytes(), self.table.scale_bytes());
        prefetch(values.wrapping_add(r * rb), rb);
        if sb > 0 {
            prefetch_line(scales.wrapping_add(r * sb));
        }
        for s in self.state {
            // SAFETY: as above, an address only.
            let p = unsafe { s.row_ptr(0) };
            prefetch(p.wrapping_add(r * s.row_bytes()), s.row_bytes());
        }
    }

    /// Sums unique row `j`'s gradient rows, updates the row and its state rows, writes them back.
    /// Float32 rows at aligned addresses are updated in place; others go through scratch rows
    /// (converted from and to the table's dtype; FP8 rows re-quantized with new block scales).
    ///
    /// # Safety
    /// `groups.row(j) < table.rows` (and the states' rows), its positions index rows of
    /// `grads`, and no other thread reads or writes this row of the table or of the states
    /// during the call; the table and the states are writable.
    #[inline(always)]
    unsafe fn update(&mut self, groups: &Groups, j: usize) {
        let dim = self.table.dim;
        let r = groups.row(j);
        let grads = self.grads;
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
        // its scale bytes) lie inside the table, which is writable; no other thread touches
        // them during the call, so these are the only references to them.
        let (values, scales) = unsafe {
            (
                std::slice::from_raw_parts_mut(t.row_ptr(r).cast_mut(), rb),
                if sb > 0 {
                    std::slice::from_raw_parts_mut(t.scale_ptr(r).cast_mut(), sb)
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
unsafe fn state_row<'b>(
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

/// `w -= lr * g`.
#[inline(always)]
fn sgd(w: &mut [f32], g: &[f32], lr: f32) {
    for (w, &g) in w.iter_mut().zip(g) {
        *w -= lr * g;
    }
}

/// `acc += mean(g * g)`, `w -= lr * g / (sqrt(acc) + eps)`; returns the new `acc`. The sum of
/// squares runs in 8 float32 lanes, added pairwise at the end (a fixed order).
#[inline(always)]
fn adagrad(w: &mut [f32], g: &[f32], acc: f32, lr: f32, eps: f32, dim: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = g.chunks_exact(8);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += x * x;
        }
    }
    for (l, &x) in lanes.iter_mut().zip(chunks.remainder()) {
        *l += x * x;
    }
    let sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    let acc = acc + sum / dim;
    let denom = acc.sqrt() + eps;
    for (w, &g) in w.iter_mut().zip(g) {
        *w -= lr * g / denom;
    }
    acc
}

/// torch's `sparse_adam` on one coalesced row, in its float32 operations and order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn adam(
    w: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    omb1: f32,
    omb2: f32,
    eps: f32,
    neg_step_size: f32,
) {
    for (((w, m), v), &g) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
        let (old_m, old_v) = (*m, *v);
        // exp_avg_update_values = grad_values.sub(old_exp_avg_values).mul_(1 - beta1)
        let upd1 = (g - old_m) * omb1;
        // exp_avg_sq_update_values = grad_values.pow(2).sub_(old_exp_avg_sq_values).mul_(1 - beta2)
        let upd2 = (g * g - old_v) * omb2;
        // exp_avg.add_(...), exp_avg_sq.add_(...)
        *m = old_m + upd1;
        *v = old_v + upd2;
        // numer = exp_avg_update_values.add_(old_exp_avg_values)
        let numer = upd1 + old_m;
        // denom = exp_avg_sq_update_values.add_(old_exp_avg_sq_values).sqrt_().add_(eps)
        let denom = (upd2 + old_v).sqrt() + eps;
        // param.add_(-step_size * numer.div_(denom))
        *w += (numer / denom) * neg_step_size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::{f32_to_row, quantize_row, row_to_f32};

    /// A table over `mem` (bytes of `rows` rows), and the memory it lives in.
    fn table_of(
        mem: &mut [u8],
        scales: &mut [u8],
        rows: usize,
        dim: usize,
        dt: DType,
    ) -> HostTable {
        assert_eq!(mem.len(), rows * dim * dt.size());
        // SAFETY: `mem` and `scales` hold the table's bytes and outlive the table (each test
        // drops the table first).
        unsafe {
            HostTable::from_raw(
                mem.as_mut_ptr(),
                if scales.is_empty() {
                    std::ptr::null_mut()
                } else {
                    scales.as_mut_ptr()
                },
                rows,
                dim,
                dt,
                true,
            )
        }
        .unwrap()
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// Deterministic pseudo-random floats in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The straightforward reference: coalesce in position order, then update each row in
    /// float32 from the (dequantized) values, element by element.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        w: &mut [Vec<f32>],
        m: &mut [Vec<f32>],
        v: &mut [Vec<f32>],
        acc: &mut [f32],
        ids: &[i64],
        grads: &[f32],
        opt: &Optimizer,
        step: u64,
    ) {
        let dim = w[0].len();
        let mut sums: std::collections::BTreeMap<usize, Vec<f32>> = Default::default();
        for (i, &id) in ids.iter().enumerate() {
            let g = &grads[i * dim..][..dim];
            match sums.get_mut(&(id as usize)) {
                Some(s) => s.iter_mut().zip(g).for_each(|(a, b)| *a += b),
                None => {
                    sums.insert(id as usize, g.to_vec());
                }
            }
        }
        for (r, g) in sums {
            match *opt {
                Optimizer::Sgd { lr } => {
                    for k in 0..dim {
                        w[r][k] -= lr as f32 * g[k];
                    }
                }
                Optimizer::RowwiseAdagrad { lr, eps } => {
                    let mut lanes = [0f32; 8];
                    for k in 0..dim {
                        lanes[k % 8] += g[k] * g[k];
                    }
                    let sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
                    acc[r] += sum / dim as f32;
                    let denom = acc[r].sqrt() + eps as f32;
                    for k in 0..dim {
                        w[r][k] -= lr as f32 * g[k] / denom;
                    }
                }
                Optimizer::Adam {
                    lr,
                    beta1,
                    beta2,
                    eps,
                } => {
                    let bc1 = 1.0 - beta1.powf(step as f64);
                    let bc2 = 1.0 - beta2.powf(step as f64);
                    let step_size = (lr * bc2.sqrt() / bc1) as f32;
                    for k in 0..dim {
                        m[r][k] = m[r][k] * 1.0 + (g[k] - m[r][k]) * (1.0 - beta1) as f32;
                        v[r][k] += (g[k] * g[k] - v[r][k]) * (1.0 - beta2) as f32;
                        let denom = v[r][k].sqrt() + eps as f32;
                        w[r][k] -= step_size * (m[r][k] / denom);
                    }
                }
            }
        }
    }

    const OPTS: [Optimizer; 3] = [
        Optimizer::Sgd { lr: 0.1 },
        Optimizer::RowwiseAdagrad {
            lr: 0.05,
            eps: 1e-8,
        },
        Optimizer::Adam {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
    ];

    /// How a check runs: the fallback sort, a forced code path, tables at odd addresses (so
    /// float32 rows go through the scratch rows instead of being updated in place).
    #[derive(Clone, Copy, Default)]
    struct How {
        comparison_sort: bool,
        simd: Option<Simd>,
        misaligned: bool,
        /// With the finiteness check (every gradient finite: the same results).
        check_finite: bool,
    }

    /// The code paths this CPU can run.
    fn simds() -> Vec<Simd> {
        let mut all = vec![Simd::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            if crate::cpu::avx2() {
                all.push(Simd::Avx2);
            }
            if crate::cpu::avx512() {
                all.push(Simd::Avx512);
            }
        }
        all
    }

    /// `len` zero bytes at an address that is 4-byte aligned, or 1 past one when `misaligned`.
    fn placed(buf: &mut Vec<u8>, len: usize, misaligned: bool) -> &mut [u8] {
        *buf = vec![0u8; len + 8];
        let base = buf.as_ptr() as usize;
        let off = (4 - base % 4) % 4 + usize::from(misaligned);
        &mut buf[off..off + len]
    }

    /// Runs 4 steps of `opt` over a small table of `dt` with repeated ids, against the reference
    /// updating float32 rows then rounding/quantizing them.
    fn check(dt: DType, opt: Optimizer, how: How) {
        let (rows, dim) = (37, 64);
        let init = noise(rows * dim, 3);
        // The table's bytes, and the reference's view of it (the rounded values).
        let mut mem_buf = Vec::new();
        let mem = placed(&mut mem_buf, rows * dim * dt.size(), how.misaligned);
        let mut scales = vec![
            0u8;
            if dt == DType::F8E4M3 {
                rows * dim / 32
            } else {
                0
            }
        ];
        let sb = scales.len() / rows;
        for r in 0..rows {
            let src = &init[r * dim..][..dim];
            let dst = &mut mem[r * dim * dt.size()..][..dim * dt.size()];
            if dt == DType::F8E4M3 {
                quantize_row(src, dst, &mut scales[r * sb..][..sb]);
            } else {
                f32_to_row(dt, src, dst);
            }
        }
        let read = |mem: &[u8], scales: &[u8], r: usize| {
            let mut out = vec![0f32; dim];
            let s = if sb > 0 {
                &scales[r * sb..][..sb]
            } else {
                &[][..]
            };
            row_to_f32(
                dt,
                &mem[r * dim * dt.size()..][..dim * dt.size()],
                s,
                &mut out,
            );
            out
        };
        let mut want_w: Vec<Vec<f32>> = (0..rows).map(|r| read(mem, &scales, r)).collect();
        let mut want_m = vec![vec![0f32; dim]; rows];
        let mut want_v = vec![vec![0f32; dim]; rows];
        let mut want_acc = vec![0f32; rows];
        let cols = if matches!(opt, Optimizer::RowwiseAdagrad { .. }) {
            1
        } else {
            dim
        };
        let nstate = opt.kind().state_tables().len();
        let mut state_bufs: Vec<Vec<u8>> = vec![Vec::new(); nstate];
        let mut state_mem: Vec<&mut [u8]> = state_bufs
            .iter_mut()
            .map(|b| placed(b, rows * cols * 4, how.misaligned))
            .collect();
        for step in 1..=4u64 {
            let ids: Vec<i64> = (0..50)
                .map(|i| ((i * 7 + step as usize * 3) % 11 + (i % 3) * 13) as i64)
                .collect();
            let grads = noise(ids.len() * dim, step + 10);
            {
                let mut t = table_of(mem, &mut scales, rows, dim, dt);
                let mut st: Vec<HostTable> = state_mem
                    .iter_mut()
                    .map(|m| table_of(m, &mut [], rows, cols, DType::F32))
                    .collect();
                let mut refs: Vec<&mut HostTable> = st.iter_mut().collect();
                let unique = sparse_step_with(
                    &mut t,
                    &ids,
                    &grads,
                    &opt,
                    &mut refs,
                    step,
                    &StepOptions {
                        check_finite: how.check_finite,
                        ..StepOptions::default()
                    },
                    how.comparison_sort,
                    how.simd,
                )
                .unwrap();
                let StepOutcome::Updated { rows: unique, .. } = unique else {
                    panic!("{unique:?}")
                };
                let mut distinct = ids.clone();
                distinct.sort();
                distinct.dedup();
                assert_eq!(unique, distinct.len());
            }
            reference(
                &mut want_w,
                &mut want_m,
                &mut want_v,
                &mut want_acc,
                &ids,
                &grads,
                &opt,
                step,
            );
            // The table's rows are the rounded/quantized reference rows; the reference goes on
            // from the rounded values (as the table does).
            for r in 0..rows {
                let mut bytes = vec![0u8; dim * dt.size()];
                let mut sc = vec![0u8; sb];
                if dt == DType::F8E4M3 {
                    quantize_row(&want_w[r], &mut bytes, &mut sc);
                } else {
                    f32_to_row(dt, &want_w[r], &mut bytes);
                }
                assert_eq!(
                    &mem[r * dim * dt.size()..][..dim * dt.size()],
                    &bytes[..],
                    "{dt:?} {opt:?} step {step} row {r}"
                );
                assert_eq!(&scales[r * sb..][..sb], &sc[..]);
                want_w[r] = read(mem, &scales, r);
            }
            match opt {
                Optimizer::Sgd { .. } => {}
                Optimizer::RowwiseAdagrad { .. } => {
                    assert_eq!(f32s(state_mem[0]), want_acc, "{step}");
                }
                Optimizer::Adam { .. } => {
                    assert_eq!(f32s(state_mem[0]), want_m.concat(), "{step}");
                    assert_eq!(f32s(state_mem[1]), want_v.concat(), "{step}");
                }
            }
        }
    }

    #[test]
    fn each_optimizer_matches_the_reference_on_f32_tables() {
        for opt in OPTS {
            for simd in simds() {
                for misaligned in [false, true] {
                    for check_finite in [false, true] {
                        let how = How {
                            simd: Some(simd),
                            misaligned,
                            check_finite,
                            ..How::default()
                        };
                        check(DType::F32, opt, how);
                    }
                }
            }
            let how = How {
                comparison_sort: true,
                ..How::default()
            };
            check(DType::F32, opt, how);
        }
    }

    #[test]
    fn low_precision_tables_round_the_f32_update() {
        for dt in [DType::BF16, DType::F16, DType::F8E4M3] {
            for opt in OPTS {
                for simd in simds() {
                    let how = How {
                        simd: Some(simd),
                        ..How::default()
                    };
                    check(dt, opt, how);
                }
            }
        }
    }

    #[test]
    fn untouched_rows_stay_and_results_do_not_depend_on_threads() {
        let (rows, dim) = (5000, 32);
        let init = noise(rows * dim, 9);
        let ids: Vec<i64> = (0..20_000).map(|i| ((i * 7919) % 4001) as i64).collect();
        let grads = noise(ids.len() * dim, 4);
        let run = |threads: usize| {
            let mut mem = f32_bytes(&init);
            let mut m = vec![0u8; rows * dim * 4];
            let mut v = vec![0u8; rows * dim * 4];
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut t = table_of(&mut mem, &mut [], rows, dim, DType::F32);
                let mut sm = table_of(&mut m, &mut [], rows, dim, DType::F32);
                let mut sv = table_of(&mut v, &mut [], rows, dim, DType::F32);
                sparse_step(&mut t, &ids, &grads, &OPTS[2], &mut [&mut sm, &mut sv], 1).unwrap()
            });
            (mem, m, v)
        };
        let one = run(1);
        assert_eq!(one, run(3));
        let w = f32s(&one.0);
        for r in 4001..rows {
            assert_eq!(&w[r * dim..][..dim], &init[r * dim..][..dim]);
        }
        assert_ne!(&w[..dim], &init[..dim]);
    }

    #[test]
    fn errors_change_nothing() {
        let (rows, dim) = (8, 32);
        let mut mem = f32_bytes(&noise(rows * dim, 1));
        let before = mem.clone();
        let mut m = vec![0u8; rows * dim * 4];
        let mut v = vec![0u8; rows * dim * 4];
        let mut acc = vec![0u8; rows * 4];
        let mut acc2 = vec![0u8; rows * 4];
        let grads = vec![0.5f32; 3 * dim];
        let adam = OPTS[2];
        {
            let ro_table = |mem: &mut [u8]| {
                // SAFETY: `mem` holds the table and outlives it.
                unsafe {
                    HostTable::from_raw(
                        mem.as_mut_ptr(),
                        std::ptr::null_mut(),
                        rows,
                        dim,
                        DType::F32,
                        false,
                    )
                }
                .unwrap()
            };
            let mut ro = ro_table(&mut mem);
            let err = sparse_step(&mut ro, &[1, 2, 3], &grads, &OPTS[0], &mut [], 1).unwrap_err();
            match &err {
                EngramError::ReadOnly(msg) => assert!(
                    msg.contains("opened read-only") && msg.contains("writable=True"),
                    "{msg}"
                ),
                other => panic!("{other:?}"),
            }
            drop(ro);
            let mut t = table_of(&mut mem, &mut [], rows, dim, DType::F32);
            let err = sparse_step(&mut t, &[1, 8, 3], &grads, &OPTS[0], &mut [], 1).unwrap_err();
            assert_eq!(
                err,
                EngramError::IndexOutOfRange {
                    value: 8,
                    index: 1,
                    rows
                }
            );
            let err = sparse_step(&mut t, &[1, 2, -5], &grads, &OPTS[0], &mut [], 1).unwrap_err();
            assert_eq!(
                err,
                EngramError::IndexOutOfRange {
                    value: -5,
                    index: 2,
                    rows
                }
            );
            // The fallback sort reports the same.
            let err = sparse_step_with(
                &mut t,
                &[1, 2, -5],
                &grads,
                &OPTS[0],
                &mut [],
                1,
                &StepOptions::default(),
                true,
                None,
            )
            .unwrap_err();
            assert!(matches!(
                err,
                EngramError::IndexOutOfRange {
                    value: -5,
                    index: 2,
                    ..
                }
            ));
            let err = sparse_step(&mut t, &[1, 2], &grads, &OPTS[0], &mut [], 1)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("[2, 32] = 64 values") && err.contains("got 96"),
                "{err}"
            );
            // State: count, shape, dtype, overlap.
            let err = sparse_step(&mut t, &[1, 2, 3], &grads, &adam, &mut [], 1)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("needs 2 state tables") && err.contains("got 0"),
                "{err}"
            );
            let mut a = table_of(&mut acc, &mut [], rows, 1, DType::F32);
            let mut a2 = table_of(&mut acc2, &mut [], rows, 1, DType::F32);
            let err = sparse_step(&mut t, &[1, 2, 3], &grads, &adam, &mut [&mut a, &mut a2], 1)
                .unwrap_err()
                .to_string();
            assert!(err.contains("state table 0 is float32 [8, 1]"), "{err}");
            let err = sparse_step(
                &mut t,
                &[1, 2, 3],
                &grads,
                &Optimizer::RowwiseAdagrad { lr: 0.1, eps: 0.0 },
                &mut [],
                1,
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("float32 [rows, 1]"), "{err}");
            let mut sm = table_of(&mut m, &mut [], rows, dim, DType::F32);
            let mut alias = {
                // SAFETY: the same memory as `sm`: refused before anything is written.
                unsafe {
                    HostTable::from_raw(
                        sm.row_ptr(0).cast_mut(),
                        std::ptr::null_mut(),
                        rows,
                        dim,
                        DType::F32,
                        true,
                    )
                }
                .unwrap()
            };
            let err = sparse_step(
                &mut t,
                &[1, 2, 3],
                &grads,
                &adam,
                &mut [&mut sm, &mut alias],
                1,
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("state tables 0 and 1 share memory"), "{err}");
            let mut self_alias = {
                // SAFETY: the table's own memory: refused before anything is written.
                unsafe {
                    HostTable::from_raw(
                        t.row_ptr(0).cast_mut(),
                        std::ptr::null_mut(),
                        rows,
                        dim,
                        DType::F32,
                        true,
                    )
                }
                .unwrap()
            };
            let err = sparse_step(
                &mut t,
                &[1, 2, 3],
                &grads,
                &adam,
                &mut [&mut self_alias, &mut sm],
                1,
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("shares memory with the table"), "{err}");
            let mut sv = table_of(&mut v, &mut [], rows, dim, DType::F32);
            let err = sparse_step(
                &mut t,
                &[1, 2, 3],
                &grads,
                &adam,
                &mut [&mut sm, &mut sv],
                0,
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("step = 0"), "{err}");
            let bad = Optimizer::Adam {
                lr: 0.1,
                beta1: 1.0,
                beta2: 0.9,
                eps: 1e-8,
            };
            let err = sparse_step(&mut t, &[1, 2, 3], &grads, &bad, &mut [&mut sm, &mut sv], 1)
                .unwrap_err()
                .to_string();
            assert!(err.contains("betas[0] must be in [0, 1), got 1"), "{err}");
            let err = sparse_step(
                &mut t,
                &[1],
                &grads[..dim],
                &Optimizer::Sgd { lr: f64::NAN },
                &mut [],
                1,
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("lr must be a finite number >= 0, got nan"),
                "{err}"
            );
            // A read-only state.
            let mut ro_state = ro_table(&mut v);
            let err = sparse_step(
                &mut t,
                &[1, 2, 3],
                &grads,
                &adam,
                &mut [&mut sm, &mut ro_state],
                1,
            )
            .unwrap_err();
            assert!(
                matches!(err, EngramError::ReadOnly(ref m) if m.contains("state table 1")),
                "{err:?}"
            );
            // Gradients inside the table's memory.
            let mut fmem = vec![0f32; rows * dim];
            // SAFETY: `fmem` holds the table and outlives it.
            let mut ft = unsafe {
                HostTable::from_raw(
                    fmem.as_mut_ptr().cast(),
                    std::ptr::null_mut(),
                    rows,
                    dim,
                    DType::F32,
                    true,
                )
            }
            .unwrap();
            // SAFETY: the table's first row, only read (by the check that refuses it).
            let inside = unsafe { std::slice::from_raw_parts(fmem.as_ptr(), dim) };
            let err = sparse_step(&mut ft, &[1], inside, &OPTS[0], &mut [], 1)
                .unwrap_err()
                .to_string();
            assert!(err.contains("grads share memory"), "{err}");
            // Empty steps touch nothing.
            assert_eq!(
                sparse_step(&mut t, &[], &[], &OPTS[0], &mut [], 1).unwrap(),
                0
            );
        }
        assert_eq!(mem, before);
        assert!(m.iter().chain(&v).chain(&acc).all(|&b| b == 0));
    }

    /// One checked step of `opt` on a float32 table of `rows` x `dim` (initial values `init`,
    /// zero state): the outcome, the table's bytes and the state's bytes.
    #[allow(clippy::too_many_arguments)]
    fn checked_step(
        init: &[f32],
        rows: usize,
        dim: usize,
        ids: &[i64],
        grads: &[f32],
        opt: &Optimizer,
        opts: &StepOptions,
        simd: Simd,
    ) -> (Result<StepOutcome>, Vec<u8>, Vec<Vec<u8>>) {
        let mut mem = f32_bytes(init);
        let cols = if matches!(opt, Optimizer::RowwiseAdagrad { .. }) {
            1
        } else {
            dim
        };
        let mut bufs: Vec<Vec<u8>> =
            vec![vec![0u8; rows * cols * 4]; opt.kind().state_tables().len()];
        let out = {
            let mut t = table_of(&mut mem, &mut [], rows, dim, DType::F32);
            let mut st: Vec<HostTable> = bufs
                .iter_mut()
                .map(|b| table_of(b, &mut [], rows, cols, DType::F32))
                .collect();
            let mut refs: Vec<&mut HostTable> = st.iter_mut().collect();
            sparse_step_with(
                &mut t,
                ids,
                grads,
                opt,
                &mut refs,
                1,
                opts,
                false,
                Some(simd),
            )
        };
        (out, mem, bufs)
    }

    #[test]
    fn a_non_finite_gradient_writes_nothing() {
        let (rows, dim) = (64, 40);
        let init = noise(rows * dim, 3);
        let ids: Vec<i64> = (0..300).map(|i| ((i * 13) % 50) as i64).collect();
        let check = StepOptions {
            check_finite: true,
            ..StepOptions::default()
        };
        let clip = StepOptions {
            max_grad_norm: Some(0.5),
            ..check
        };
        for opt in OPTS {
            for simd in simds() {
                for opts in [check, clip] {
                    for (pos, k, bad) in [
                        (0usize, 0usize, f32::NAN),
                        (299, 39, f32::INFINITY),
                        (150, 17, f32::NEG_INFINITY),
                        (77, 5, -f32::NAN),
                    ] {
                        let mut grads = noise(ids.len() * dim, 5);
                        grads[pos * dim + k] = bad;
                        let (out, mem, st) =
                            checked_step(&init, rows, dim, &ids, &grads, &opt, &opts, simd);
                        match out.unwrap() {
                            StepOutcome::NonFinite {
                                position,
                                row,
                                value,
                            } => {
                                assert_eq!((position, row), (pos, ids[pos] as usize), "{opt:?}");
                                assert!(!value.is_finite());
                            }
                            other => panic!("{other:?}"),
                        }
                        assert_eq!(mem, f32_bytes(&init), "{opt:?} {simd:?}");
                        assert!(st.iter().flatten().all(|&b| b == 0));
                    }
                    // Finite values whose sum overflows: found by the exact pass.
                    let mut grads = noise(ids.len() * dim, 5);
                    grads[13 * dim + 2] = f32::MAX;
                    grads[63 * dim + 2] = f32::MAX; // ids 13 and 63 are both row 13 * 13 % 50
                    assert_eq!(ids[13], ids[63]);
                    let (out, mem, _) =
                        checked_step(&init, rows, dim, &ids, &grads, &opt, &opts, simd);
                    assert_eq!(
                        out.unwrap(),
                        StepOutcome::NonFinite {
                            position: 13,
                            row: ids[13] as usize,
                            value: f32::INFINITY
                        }
                    );
                    assert_eq!(mem, f32_bytes(&init));
                }
                // Without the check, the old behaviour (the NaN is written).
                let mut grads = noise(ids.len() * dim, 5);
                grads[3] = f32::NAN;
                let (out, mem, _) = checked_step(
                    &init,
                    rows,
                    dim,
                    &ids,
                    &grads,
                    &opt,
                    &StepOptions::default(),
                    simd,
                );
                assert!(matches!(
                    out.unwrap(),
                    StepOutcome::Updated { rows: 50, .. }
                ));
                assert!(f32s(&mem)[ids[0] as usize * dim + 3].is_nan());
            }
        }
    }

    #[test]
    fn scaling_and_clipping_match_the_reference() {
        let (rows, dim) = (300, 24);
        let init = noise(rows * dim, 8);
        let ids: Vec<i64> = (0..900).map(|i| ((i * 7 + i / 5) % 257) as i64).collect();
        let grads: Vec<f32> = noise(ids.len() * dim, 6)
            .iter()
            .map(|x| x * 512.0)
            .collect();
        for opt in OPTS {
            for (scale, max) in [
                (1.0 / 512.0, None),
                (1.0 / 512.0, Some(0.75)),
                (1.0, Some(3.0)),
                (0.25, Some(1e9)),
            ] {
                // The reference: sums in position order, times the scale, the norm in f64 and
                // torch's clip coefficient.
                let mut sums: std::collections::BTreeMap<i64, Vec<f32>> = Default::default();
                for (i, &id) in ids.iter().enumerate() {
                    let g = &grads[i * dim..][..dim];
                    match sums.get_mut(&id) {
                        Some(s) => s.iter_mut().zip(g).for_each(|(a, b)| *a += b),
                        None => {
                            sums.insert(id, g.to_vec());
                        }
                    }
                }
                let inv = scale as f32;
                for v in sums.values_mut() {
                    if inv != 1.0 {
                        v.iter_mut().for_each(|x| *x *= inv);
                    }
                }
                let norm = sums
                    .values()
                    .flatten()
                    .map(|&x| x as f64 * x as f64)
                    .sum::<f64>()
                    .sqrt();
                let coef = max.map_or(1.0, |m: f64| m / (norm + 1e-6));
                if coef < 1.0 {
                    for v in sums.values_mut() {
                        v.iter_mut().for_each(|x| *x *= coef as f32);
                    }
                }
                let uids: Vec<i64> = sums.keys().copied().collect();
                let ugrads: Vec<f32> = sums.values().flatten().copied().collect();
                let opts = StepOptions {
                    check_finite: true,
                    grad_scale: scale,
                    max_grad_norm: max,
                };
                for simd in simds() {
                    let (out, mem, st) =
                        checked_step(&init, rows, dim, &ids, &grads, &opt, &opts, simd);
                    let (want_out, want_mem, want_st) = checked_step(
                        &init,
                        rows,
                        dim,
                        &uids,
                        &ugrads,
                        &opt,
                        &StepOptions::default(),
                        Simd::Baseline,
                    );
                    match (out.unwrap(), want_out.unwrap()) {
                        (
                            StepOutcome::Updated { rows: a, grad_norm },
                            StepOutcome::Updated { rows: b, .. },
                        ) => {
                            assert_eq!(a, b);
                            assert_eq!(grad_norm.is_some(), max.is_some());
                            if let Some(n) = grad_norm {
                                assert!((n - norm).abs() <= 1e-9 * norm, "{n} {norm}");
                            }
                        }
                        other => panic!("{other:?}"),
                    }
                    assert_eq!(mem, want_mem, "{opt:?} {simd:?} {scale} {max:?}");
                    assert_eq!(st, want_st);
                }
            }
        }
        // Bad options are refused before anything is read.
        for (scale, max) in [
            (0.0, None),
            (f64::NAN, None),
            (1e300, None),
            (1.0, Some(0.0)),
            (1.0, Some(f64::INFINITY)),
        ] {
            let opts = StepOptions {
                check_finite: true,
                grad_scale: scale,
                max_grad_norm: max,
            };
            let (out, mem, _) = checked_step(
                &init,
                rows,
                dim,
                &ids,
                &grads,
                &OPTS[0],
                &opts,
                Simd::Baseline,
            );
            let err = out.unwrap_err().to_string();
            assert!(err.contains("is invalid"), "{err}");
            assert_eq!(mem, f32_bytes(&init));
        }
    }

    #[test]
    fn radix_sort_is_stable_by_id() {
        for (n, rows) in [
            (1usize, 1usize),
            (2, 1),
            (1000, 3),
            (70_000, 1 << 20),
            (5000, 10_000_000),
        ] {
            let ids: Vec<i64> = noise(n, 77)
                .iter()
                .map(|x| ((x.abs() * rows as f32) as usize).min(rows - 1) as i64)
                .collect();
            let a = Groups::new(&ids, rows, false).unwrap();
            let b = Groups::new(&ids, rows, true).unwrap();
            assert_eq!(
                (&a.order, &a.starts, &a.rows),
                (&b.order, &b.starts, &b.rows)
            );
            for j in 0..a.len() {
                let p = a.positions(j);
                assert!(p.windows(2).all(|w| w[0] < w[1]));
                assert!(p.iter().all(|&i| ids[i as usize] as usize == a.row(j)));
            }
            assert_eq!(a.starts.len(), a.rows.len() + 1);
            let rows_sorted: Vec<usize> = (0..a.len()).map(|j| a.row(j)).collect();
            assert!(rows_sorted.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
