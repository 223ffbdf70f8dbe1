//! The optimizer kinds, their hyperparameters and the one check of them, and a step's options
//! and outcome.

use crate::error::{EngramError, Result};

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
pub(super) fn py_float(v: f64) -> String {
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
    pub(super) fn validate(&self, step: u64) -> Result<()> {
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
