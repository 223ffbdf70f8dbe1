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
            let t = HostTable::open_tiered(&path, None, None, hot, direct).unwrap();
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
    let t = HostTable::open_tiered(&path, None, None, &[0, 1, 2], Some(false)).unwrap();
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
        HostTable::open_tiered(&path, None, None, hot, None)
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
    let mut t = HostTable::open_tiered(&path, None, None, &[1, 2], None).unwrap();
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
    match HostTable::open_tiered(&path, None, None, &[], Some(true)) {
        Ok(t) => assert!(t.tier_stats().unwrap().direct),
        Err(e) => assert!(e.to_string().contains("O_DIRECT"), "{e}"),
    }
    let _ = std::fs::remove_dir_all(&d);
}
