use super::*;
use crate::gather::gather;
use crate::table::Init;

/// A fresh directory for one test.
fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("engram-tiered-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const DTYPES: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::F8E4M3];

/// Deterministic pseudo-random ids in `0..rows`, with repeats.
fn ids(n: usize, rows: usize, seed: u64) -> Vec<i64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Skewed towards low rows, as Zipf-like accesses are.
            let r = (x % rows as u64) as usize;
            (if x & 1 == 0 { r / 16 } else { r }) as i64
        })
        .collect()
}

fn gathered(t: &HostTable, idx: &[i64], od: DType, backend: Backend) -> Vec<u8> {
    let mut out = vec![0u8; idx.len() * t.dim * od.size()];
    gather(t, idx, &mut out, od, backend).unwrap();
    out
}

#[test]
fn tiered_gathers_equal_the_mapped_table_for_every_dtype_and_hot_set() {
    let d = dir("equal");
    for dt in DTYPES {
        let path = d.join(format!("{}.safetensors", dt.name()));
        let rows = 3000;
        let init = Init::Normal { std: 0.5, seed: 3 };
        drop(HostTable::create(&path, rows, 64, dt, init, "weight", None).unwrap());
        let mapped = HostTable::open(&path, None, None, Mode::Mmap, false).unwrap();
        let all: Vec<u64> = (0..rows as u64).collect();
        let some: Vec<u64> = (0..rows as u64)
            .filter(|r| r % 7 == 0 || *r < 100)
            .collect();
        for (hot, direct) in [
            (&[][..], Some(false)),
            (&some[..], None),
            (&all[..], Some(false)),
        ] {
            let t = HostTable::open_tiered(&path, None, None, hot, direct, false, 0).unwrap();
            assert_eq!(
                (t.rows, t.dim, t.dtype, t.mode),
                (rows, 64, dt, Mode::Tiered)
            );
            for od in [DType::F32, DType::BF16, DType::F16] {
                for backend in [Backend::Auto, Backend::Scalar] {
                    let idx = ids(5000, rows, 11);
                    assert_eq!(
                        gathered(&t, &idx, od, backend),
                        gathered(&mapped, &idx, od, backend),
                        "{} -> {} with {} hot rows",
                        dt.name(),
                        od.name(),
                        hot.len()
                    );
                }
            }
            let s = t.tier_stats().unwrap();
            assert_eq!(s.hot_rows, hot.len() as u64);
            assert_eq!(s.lookups, 6 * 5000);
            if hot.len() == rows {
                assert_eq!((s.hits, s.misses, s.reads), (s.lookups, 0, 0));
            } else {
                assert!(s.misses > 0 && s.reads > 0 && s.hits < s.lookups);
            }
            // The empty gather, and one row at the table's very end (the last block of the
            // file may be shorter than a block).
            assert!(gathered(&t, &[], DType::F32, Backend::Auto).is_empty());
            let last = [rows as i64 - 1];
            assert_eq!(
                gathered(&t, &last, DType::F32, Backend::Auto),
                gathered(&mapped, &last, DType::F32, Backend::Auto)
            );
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_truncated_file_is_an_io_error_naming_the_offset_not_a_wrong_row() {
    let d = dir("truncated");
    let path = d.join("t.safetensors");
    let rows = 2000;
    drop(HostTable::create(&path, rows, 64, DType::F8E4M3, Init::Zeros, "weight", None).unwrap());
    let t = HostTable::open_tiered(&path, None, None, &[0, 1, 2], Some(false), false, 0).unwrap();
    // Another process (ignoring the advisory lock) cuts the file inside the values.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(8192).unwrap();
    let mut out = vec![0u8; 64 * 4];
    let err = gather(&t, &[1500i64], &mut out, DType::F32, Backend::Auto).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, EngramError::Io { .. }), "{text}");
    assert!(
        text.contains("short read at offset") && text.contains("t.safetensors"),
        "{text}"
    );
    // Hot rows are in memory: they still gather.
    assert!(gather(&t, &[2i64], &mut out, DType::F32, Backend::Auto).is_ok());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_hot_sets_and_whole_table_operations_are_refused() {
    let d = dir("refused");
    let path = d.join("t.safetensors");
    drop(HostTable::create(&path, 100, 32, DType::F32, Init::Zeros, "weight", None).unwrap());
    let err = |hot: &[u64]| {
        HostTable::open_tiered(&path, None, None, hot, None, false, 0)
            .unwrap_err()
            .to_string()
    };
    assert!(
        err(&[5, 3]).contains("strictly increasing"),
        "{}",
        err(&[5, 3])
    );
    assert!(err(&[1, 1]).contains("strictly increasing"));
    assert!(err(&[100]).contains("outside the table's 100 rows"));
    let mut t = HostTable::open_tiered(&path, None, None, &[1, 2], None, false, 0).unwrap();
    assert!(t.raw_rows(0, 1).unwrap_err().to_string().contains("tiered"));
    let e = t
        .write_rows(&[0], &[0u8; 128], &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("tiered"), "{e}");
    let mut out = vec![0u8; 128];
    let e = crate::gather::copy_rows_ceiling(&t, &[0i64], &mut out).unwrap_err();
    assert!(e.to_string().contains("tiered"));
    // An out of range id is the gather's usual error.
    let mut out = vec![0u8; 128];
    let e = gather(&t, &[100i64], &mut out, DType::F32, Backend::Auto).unwrap_err();
    assert!(
        matches!(e, EngramError::IndexOutOfRange { value: 100, .. }),
        "{e}"
    );
    // O_DIRECT insisted on where the file system has it, or refused with its reason.
    match HostTable::open_tiered(&path, None, None, &[], Some(true), false, 0) {
        Ok(t) => assert!(t.tier_stats().unwrap().direct),
        Err(e) => assert!(e.to_string().contains("O_DIRECT"), "{e}"),
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// Float32 zeros of `rows x dim` and a table over them (an optimizer's state).
fn zeros(rows: usize, dim: usize) -> (Vec<f32>, HostTable) {
    let mut mem = vec![0f32; rows * dim];
    // SAFETY: `mem` holds the table's bytes; a Vec's heap buffer does not move when the Vec
    // is returned, and every test drops the table before the memory.
    let t = unsafe {
        HostTable::from_raw(
            mem.as_mut_ptr().cast(),
            std::ptr::null_mut(),
            rows,
            dim,
            DType::F32,
            true,
        )
    }
    .unwrap();
    (mem, t)
}

/// The bytes of the table's tensors (everything after the header).
fn data(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + n..].to_vec()
}

fn optimizers() -> [Optimizer; 3] {
    [
        Optimizer::Sgd { lr: 0.05 },
        Optimizer::RowwiseAdagrad { lr: 0.1, eps: 1e-8 },
        Optimizer::Adam {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
    ]
}

fn state_for(opt: &Optimizer, rows: usize, dim: usize) -> Vec<(Vec<f32>, HostTable)> {
    opt.kind()
        .state_tables()
        .iter()
        .map(|s| zeros(rows, s.width.unwrap_or(dim)))
        .collect()
}

use crate::optim::tests::noise;
use crate::optim::{sparse_step, Optimizer};

#[test]
fn a_tiered_table_trained_then_flushed_is_the_resident_training_bit_for_bit() {
    let d = dir("train");
    let (rows, dim) = (3000, 64);
    for dt in DTYPES {
        for opt in optimizers() {
            let a = d.join(format!("{}-resident.safetensors", dt.name()));
            let b = d.join(format!("{}-tiered.safetensors", dt.name()));
            let init = Init::Normal { std: 0.5, seed: 7 };
            drop(HostTable::create(&a, rows, dim, dt, init, "weight", None).unwrap());
            std::fs::copy(&a, &b).unwrap();
            let mut res = HostTable::open(&a, None, None, Mode::Resident, true).unwrap();
            let hot: Vec<u64> = (0..rows as u64).filter(|r| r % 7 == 0 || *r < 50).collect();
            // A store of a few rows: most steps write back before they start.
            let budget = 40 * (res.row_bytes() + res.scale_bytes());
            let mut tie =
                HostTable::open_tiered(&b, None, None, &hot, Some(false), true, budget).unwrap();
            let (mut s1, mut s2) = (state_for(&opt, rows, dim), state_for(&opt, rows, dim));
            let all: Vec<i64> = (0..rows as i64).collect();
            for step in 1..=6u64 {
                let idx = ids(300, rows, step);
                let g = noise(idx.len() * dim, step);
                let mut st1: Vec<&mut HostTable> = s1.iter_mut().map(|s| &mut s.1).collect();
                let mut st2: Vec<&mut HostTable> = s2.iter_mut().map(|s| &mut s.1).collect();
                let n1 = sparse_step(&mut res, &idx, &g, &opt, &mut st1, step).unwrap();
                let n2 = sparse_step(&mut tie, &idx, &g, &opt, &mut st2, step).unwrap();
                assert_eq!(n1, n2);
                // Every row reads back as trained: hot, held in the store, or on disk.
                assert_eq!(
                    gathered(&res, &all, DType::F32, Backend::Auto),
                    gathered(&tie, &all, DType::F32, Backend::Auto),
                    "{} {} step {step}",
                    dt.name(),
                    opt.name()
                );
                if step == 3 {
                    tie.flush().unwrap();
                }
            }
            for (x, y) in s1.iter().zip(&s2) {
                assert_eq!(x.0, y.0, "optimizer state, {} {}", dt.name(), opt.name());
            }
            let st = tie.tier_stats().unwrap();
            assert!(st.flushes >= 2, "{st:?}");
            assert!(st.dirty_rows + st.dirty_hot_rows > 0, "{st:?}");
            res.flush().unwrap();
            tie.flush().unwrap();
            let st = tie.tier_stats().unwrap();
            assert_eq!(
                (st.dirty_rows, st.dirty_hot_rows, st.dirty_bytes),
                (0, 0, 0)
            );
            drop((res, tie));
            assert!(
                data(&a) == data(&b),
                "{} {}: the flushed files differ",
                dt.name(),
                opt.name()
            );
            assert!(!journal_path(&b).exists());
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_flush_killed_after_its_journal_is_finished_by_the_next_writable_open() {
    let d = dir("journal");
    let (rows, dim) = (500, 32);
    let path = d.join("t.safetensors");
    let twin = d.join("twin.safetensors");
    let init = Init::Normal { std: 0.5, seed: 3 };
    drop(HostTable::create(&path, rows, dim, DType::F8E4M3, init, "weight", None).unwrap());
    std::fs::copy(&path, &twin).unwrap();
    let before = data(&path);
    let opt = Optimizer::Sgd { lr: 0.5 };
    let idx: Vec<i64> = (0..rows as i64).step_by(3).collect();
    let g = noise(idx.len() * dim, 1);
    // The same step on a twin, flushed normally: what the table must become.
    let mut t = HostTable::open_tiered(&twin, None, None, &[0, 9], None, true, 1 << 20).unwrap();
    sparse_step(&mut t, &idx, &g, &opt, &mut [], 1).unwrap();
    drop(t);
    let want = data(&twin);
    assert_ne!(want, before);
    let mut t = HostTable::open_tiered(&path, None, None, &[0, 9], None, true, 1 << 20).unwrap();
    sparse_step(&mut t, &idx, &g, &opt, &mut [], 1).unwrap();
    // The process dies with the journal in place and the table not yet written.
    t.tiered().unwrap().flush_with(true).unwrap();
    t.tiered().unwrap().discard();
    drop(t);
    assert!(journal_path(&path).exists());
    assert_eq!(data(&path), before);
    // A read-only open is refused, naming the journal.
    let e = HostTable::open(&path, None, None, Mode::Mmap, false)
        .map(|_| ())
        .unwrap_err();
    assert!(e.to_string().contains("journal"), "{e}");
    let e = HostTable::open_tiered(&path, None, None, &[], None, false, 0)
        .map(|_| ())
        .unwrap_err();
    assert!(e.to_string().contains("writable=True"), "{e}");
    // A damaged journal is refused and nothing is written.
    let j = journal_path(&path);
    let good = std::fs::read(&j).unwrap();
    let mut bad = good.clone();
    let k = bad.len() - 20;
    bad[k] ^= 1;
    std::fs::write(&j, &bad).unwrap();
    let e = HostTable::open(&path, None, None, Mode::Mmap, true)
        .map(|_| ())
        .unwrap_err();
    assert!(e.to_string().contains("damaged"), "{e}");
    assert_eq!(data(&path), before);
    // The journal whole again: a writable open replays it, and the table is the twin's.
    std::fs::write(&j, &good).unwrap();
    drop(HostTable::open(&path, None, None, Mode::Mmap, true).unwrap());
    assert!(!j.exists());
    assert_eq!(data(&path), want);
    // A journal of another file at the same path (the table created again) is stale: removed,
    // never replayed.
    std::fs::write(&j, &good).unwrap();
    drop(HostTable::create(&path, rows, dim, DType::F8E4M3, init, "weight", None).unwrap());
    assert_eq!(data(&path), before);
    drop(HostTable::open(&path, None, None, Mode::Mmap, false).unwrap());
    drop(HostTable::open(&path, None, None, Mode::Mmap, true).unwrap());
    assert!(!j.exists());
    assert_eq!(data(&path), before);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_read_only_tiered_table_is_not_trained() {
    let d = dir("readonly");
    let path = d.join("t.safetensors");
    drop(HostTable::create(&path, 100, 32, DType::F32, Init::Zeros, "weight", None).unwrap());
    let mut t = HostTable::open_tiered(&path, None, None, &[1], None, false, 0).unwrap();
    let e = sparse_step(
        &mut t,
        &[1, 50],
        &[0.0; 64],
        &Optimizer::Sgd { lr: 1.0 },
        &mut [],
        1,
    )
    .unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}
