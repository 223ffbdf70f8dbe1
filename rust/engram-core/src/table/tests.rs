use super::file::mem_available;
use super::*;

/// A fresh directory for one test.
fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("engram-table-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn create_with_a_reserved_name_leaves_the_existing_file() {
    let d = dir("reserved-name");
    let path = d.join("t.safetensors");
    drop(HostTable::create(&path, 4, 8, DType::F32, Init::Zeros, "weight", None).unwrap());
    let before = std::fs::read(&path).unwrap();
    for name in ["__metadata__", ""] {
        let Err(err) = HostTable::create(&path, 4, 8, DType::F32, Init::Zeros, name, None) else {
            panic!("{name:?} was accepted");
        };
        assert!(err.to_string().contains("cannot name a table"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
    let _ = std::fs::remove_dir_all(&d);
}

/// Row `r`'s value and scale bytes.
fn row(t: &HostTable, r: usize) -> (Vec<u8>, Vec<u8>) {
    assert!(r < t.rows);
    // SAFETY: r < rows; the scales pointer is only read for FP8 tables.
    unsafe {
        let v = std::slice::from_raw_parts(t.row_ptr(r), t.row_bytes()).to_vec();
        let s = if t.scale_bytes() > 0 {
            std::slice::from_raw_parts(t.scale_ptr(r), t.scale_bytes()).to_vec()
        } else {
            Vec::new()
        };
        (v, s)
    }
}

fn scales_name(dt: DType) -> Option<&'static str> {
    (dt == DType::F8E4M3).then_some("weight_scale")
}

const DTYPES: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::F8E4M3];

#[test]
fn create_open_round_trips_per_dtype_and_mode() {
    let d = dir("roundtrip");
    for dt in DTYPES {
        let path = d.join(format!("{}.safetensors", dt.name()));
        let init = Init::Normal { std: 0.02, seed: 7 };
        let t = HostTable::create(&path, 50, 64, dt, init, "weight", None).unwrap();
        assert_eq!((t.rows, t.dim, t.dtype, t.mode), (50, 64, dt, Mode::Mmap));
        assert!(t.writable());
        let rows: Vec<_> = (0..50).map(|r| row(&t, r)).collect();
        assert!(rows.iter().any(|(v, _)| v.iter().any(|&b| b != 0)));
        drop(t);
        for mode in [Mode::Mmap, Mode::Resident] {
            let r = HostTable::open(&path, None, scales_name(dt), mode, false).unwrap();
            assert_eq!((r.mode, r.writable()), (mode, false));
            for (i, expected) in rows.iter().enumerate() {
                assert_eq!(&row(&r, i), expected, "{dt:?} {mode:?} row {i}");
            }
        }
        // The same seed gives the same table.
        let again = d.join("again.safetensors");
        let t2 = HostTable::create(&again, 50, 64, dt, init, "weight", None).unwrap();
        assert_eq!(row(&t2, 49), rows[49]);
    }
    let names: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn write_rows_flush_and_reopen() {
    let d = dir("write");
    for dt in DTYPES {
        for mode in [Mode::Mmap, Mode::Resident] {
            let path = d.join("w.safetensors");
            HostTable::create(&path, 20, 32, dt, Init::Zeros, "weight", None).unwrap();
            let mut w = HostTable::open(&path, None, scales_name(dt), mode, true).unwrap();
            let (rb, sb) = (w.row_bytes(), w.scale_bytes());
            let values: Vec<u8> = (0..2 * rb).map(|i| (i % 97) as u8 + 1).collect();
            let scales: Vec<u8> = (0..2 * sb).map(|i| 120 + i as u8).collect();
            w.write_rows(&[3, 17], &values, &scales).unwrap();
            w.flush().unwrap();
            drop(w);
            let r = HostTable::open(&path, None, scales_name(dt), Mode::Mmap, false).unwrap();
            assert_eq!(row(&r, 3), (values[..rb].to_vec(), scales[..sb].to_vec()));
            assert_eq!(row(&r, 17), (values[rb..].to_vec(), scales[sb..].to_vec()));
            assert!(row(&r, 4).0.iter().all(|&b| b == 0), "{dt:?} {mode:?}");
        }
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn bad_writes_change_nothing() {
    let d = dir("badwrite");
    let path = d.join("t.safetensors");
    HostTable::create(&path, 4, 32, DType::F8E4M3, Init::Zeros, "weight", None).unwrap();
    let mut ro =
        HostTable::open(&path, None, scales_name(DType::F8E4M3), Mode::Mmap, false).unwrap();
    let err = ro.write_rows(&[0], &[1; 32], &[1]).unwrap_err();
    assert!(matches!(err, EngramError::ReadOnly(_)), "{err:?}");
    drop(ro);
    let mut w = HostTable::open(&path, None, scales_name(DType::F8E4M3), Mode::Mmap, true).unwrap();
    let err = w.write_rows(&[0], &[1; 32], &[]).unwrap_err().to_string();
    assert!(
        err.contains("1 UE8M0 scale bytes per row") && err.contains("got 0 scale bytes"),
        "{err}"
    );
    let err = w
        .write_rows(&[0, 1], &[1; 32], &[1, 1])
        .unwrap_err()
        .to_string();
    assert!(err.contains("got 32 value bytes"), "{err}");
    let err = w.write_rows(&[1, 4], &[1; 64], &[1, 1]).unwrap_err();
    assert_eq!(
        err,
        EngramError::IndexOutOfRange {
            value: 4,
            index: 1,
            rows: 4
        }
    );
    assert!(row(&w, 1).0.iter().all(|&b| b == 0), "nothing written");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn overlapping_sources_are_read_before_any_write() {
    // The numpy rule for a[[1, 2, 3]] = a[0:3]: rows 1..4 become the old rows 0..3.
    let mut mem: Vec<f32> = (0..40).map(|i| i as f32).collect();
    let expected: Vec<f32> = [&mem[..4], &mem[..12], &mem[16..]].concat();
    let base = mem.as_mut_ptr().cast::<u8>();
    // SAFETY: `mem` holds 10 x 4 f32 and outlives the table.
    let mut t = unsafe { HostTable::from_raw(base, std::ptr::null_mut(), 10, 4, DType::F32, true) }
        .unwrap();
    // SAFETY: the first 3 rows of `mem`, which the table also covers.
    let src = unsafe { std::slice::from_raw_parts(base.cast_const(), 48) };
    assert!(t.overlaps(src.as_ptr(), src.len()));
    assert!(!t.overlaps(expected.as_ptr().cast(), 16));
    t.write_rows(&[1, 2, 3], src, &[]).unwrap();
    drop(t);
    assert_eq!(mem, expected);
}

#[test]
fn sizes_are_checked_values_scales_and_all() {
    // Values fit in 64 bits, values + scales do not (issue: a segfault at create).
    let rows = 558_992_244_657_865_201usize;
    let err = table_bytes(DType::F8E4M3, rows, 32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("too large") && err.contains("values and scales"),
        "{err}"
    );
    let d = dir("sizes");
    let err = HostTable::create(
        &d.join("x"),
        rows,
        32,
        DType::F8E4M3,
        Init::Zeros,
        "w",
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("too large"), "{err}");
    assert!(table_bytes(DType::F32, usize::MAX / 4, 2).is_err());
    assert!(table_bytes(DType::F32, isize::MAX as usize / 4 + 1, 1).is_err());
    assert_eq!(table_bytes(DType::F8E4M3, 3, 64).unwrap(), (192, 6));
    let err = table_bytes(DType::F8E4M3, 3, 48).unwrap_err().to_string();
    assert!(
        err.contains("multiple of 32") && err.contains("dim=48"),
        "{err}"
    );
    assert!(table_bytes(DType::BF16, 3, 0).is_err());
    // SAFETY: rows * dim overflows, so the shape is refused before any pointer is used.
    let wrapped = unsafe {
        HostTable::from_raw(
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            1 << 62,
            8,
            DType::F16,
            false,
        )
    };
    assert!(wrapped.is_err());
    assert!(
        std::fs::read_dir(&d).unwrap().next().is_none(),
        "no file left"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn corrupt_headers_are_refused_at_open() {
    let d = dir("corrupt");
    let good = d.join("good.safetensors");
    HostTable::create(&good, 4, 32, DType::F8E4M3, Init::Zeros, "weight", None).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let text = String::from_utf8_lossy(&bytes[8..]).into_owned();
    // Scales that overlap the values: same length, so the header size is unchanged.
    let overlap = text.replace("\"data_offsets\":[128,132]", "\"data_offsets\":[124,128]");
    assert_ne!(overlap, text);
    let p = d.join("overlap.safetensors");
    std::fs::write(&p, [&bytes[..8], overlap.as_bytes()].concat()).unwrap();
    let err = HostTable::open(&p, None, Some("weight_scale"), Mode::Mmap, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("overlap"), "{err}");
    // Truncated data.
    let p = d.join("short.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
    for mode in [Mode::Mmap, Mode::Resident] {
        let err = HostTable::open(&p, None, Some("weight_scale"), mode, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated"), "{err}");
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn locks_exclude_writers_from_readers_and_each_other() {
    let d = dir("locks");
    let path = d.join("t.safetensors");
    let w = HostTable::create(&path, 4, 8, DType::F32, Init::Zeros, "weight", None).unwrap();
    let err = HostTable::open(&path, None, None, Mode::Mmap, false).unwrap_err();
    assert!(
        err.to_string().contains("a writable table") && err.to_string().contains("close"),
        "{err}"
    );
    drop(w);
    let r1 = HostTable::open(&path, None, None, Mode::Mmap, false).unwrap();
    let r2 = HostTable::open(&path, None, None, Mode::Resident, false).unwrap();
    let err = HostTable::open(&path, None, None, Mode::Resident, true).unwrap_err();
    assert!(err.to_string().contains("cannot open it writable"), "{err}");
    drop((r1, r2));
    HostTable::open(&path, None, None, Mode::Mmap, true).unwrap();
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn resident_flush_writes_the_file_it_opened() {
    let d = dir("flush");
    let path = d.join("t.safetensors");
    HostTable::create(&path, 4, 8, DType::F32, Init::Zeros, "weight", None).unwrap();
    let mut w = HostTable::open(&path, None, None, Mode::Resident, true).unwrap();
    let old_inode = File::open(&path).unwrap();
    // Another writer replaces the path by rename while the table is open.
    let other = d.join("other.safetensors");
    HostTable::create(&other, 4, 8, DType::F32, Init::Zeros, "weight", None).unwrap();
    let replacement = std::fs::read(&other).unwrap();
    std::fs::rename(&other, &path).unwrap();
    w.write_rows(&[2], &[9u8; 32], &[]).unwrap();
    w.flush().unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        replacement,
        "the new file is untouched"
    );
    let at = w.file.as_ref().unwrap().values.0 + 2 * 32;
    let mut got = [0u8; 32];
    old_inode.read_exact_at(&mut got, at as u64).unwrap();
    assert_eq!(got, [9u8; 32], "the rows went to the file the table opened");
    drop(w);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn concurrent_creates_of_one_path_both_succeed() {
    let d = dir("concurrent");
    let path = d.join("t.safetensors");
    std::thread::scope(|s| {
        let jobs: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| HostTable::create(&path, 300, 16, DType::BF16, Init::Zeros, "w", None))
            })
            .collect();
        for j in jobs {
            j.join().unwrap().unwrap();
        }
    });
    let names: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["t.safetensors"]);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn create_in_a_missing_directory_says_so() {
    let d = dir("missing");
    let err = HostTable::create(
        &d.join("nope/t.safetensors"),
        4,
        8,
        DType::F32,
        Init::Zeros,
        "weight",
        None,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("directory") && msg.contains("does not exist") && msg.contains("create it"),
        "{msg}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn resident_open_larger_than_memory_is_refused() {
    let Some(avail) = mem_available() else {
        return; // no /proc/meminfo: nothing to compare against
    };
    let d = dir("huge");
    let path = d.join("huge.safetensors");
    let rows = (avail / 4096 + 1) as usize * 2;
    let (header, _) =
        safetensors::build_header(&[("w", "F32", vec![rows, 1024])], &serde_json::Map::new())
            .unwrap();
    let f = File::create(&path).unwrap();
    f.write_all_at(&header, 0).unwrap();
    f.set_len((header.len() + rows * 4096) as u64).unwrap(); // sparse
    drop(f);
    let err = HostTable::open(&path, None, None, Mode::Resident, false).unwrap_err();
    match &err {
        EngramError::OutOfMemory { hint, .. } => {
            assert!(hint.contains("mode=\"mmap\""), "{hint}")
        }
        other => panic!("{other:?}"),
    }
    let t = HostTable::open(&path, None, None, Mode::Mmap, false).unwrap();
    assert_eq!(t.rows, rows);
    drop(t);
    std::fs::remove_dir_all(&d).unwrap();
}
