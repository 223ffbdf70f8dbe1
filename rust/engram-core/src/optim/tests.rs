use super::*;
use crate::dtype::{f32_to_row, quantize_row, row_to_f32};

/// A table over `mem` (bytes of `rows` rows), and the memory it lives in.
fn table_of(mem: &mut [u8], scales: &mut [u8], rows: usize, dim: usize, dt: DType) -> HostTable {
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
pub(crate) fn noise(n: usize, seed: u64) -> Vec<f32> {
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
                msg.contains("opened read-only") && msg.contains("open it writable"),
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
    let mut bufs: Vec<Vec<u8>> = vec![vec![0u8; rows * cols * 4]; opt.kind().state_tables().len()];
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
                let (out, mem, _) = checked_step(&init, rows, dim, &ids, &grads, &opt, &opts, simd);
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
