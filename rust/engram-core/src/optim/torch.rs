//! The rules torch applies, exactly: the per-step constants rounded to float32 where torch
//! rounds them, and the SGD, row-wise Adagrad and SparseAdam row updates.

use super::*;

/// The per-element constants of one step, rounded to float32 where torch rounds them.
#[derive(Clone, Copy)]
pub(super) enum Consts {
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
    pub(super) fn new(opt: &Optimizer, step: u64, dim: usize) -> Self {
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

/// `w -= lr * g`.
#[inline(always)]
pub(super) fn sgd(w: &mut [f32], g: &[f32], lr: f32) {
    for (w, &g) in w.iter_mut().zip(g) {
        *w -= lr * g;
    }
}

/// `acc += mean(g * g)`, `w -= lr * g / (sqrt(acc) + eps)`; returns the new `acc`. The sum of
/// squares runs in 8 float32 lanes, added pairwise at the end (a fixed order).
#[inline(always)]
pub(super) fn adagrad(w: &mut [f32], g: &[f32], acc: f32, lr: f32, eps: f32, dim: f32) -> f32 {
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
pub(super) fn adam(
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
