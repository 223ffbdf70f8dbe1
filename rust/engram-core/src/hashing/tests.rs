use super::*;
use crate::primes::layer_primes;
use proptest::prelude::*;

/// The SPEC written literally: Python-style floor modulo on i128, no shortcuts (the DEAD rule's
/// reference with nothing blocked).
fn reference(spec: &LayerSpec, n: usize, h: usize, pad: i64, row: &[i64]) -> Vec<u64> {
    reference_blocked(spec, n, h, pad, row, &vec![false; row.len()])
}

fn specs(sizes: &[u64], n_head: usize, vocab: u64, seed: u64, layers: usize) -> Vec<LayerSpec> {
    let bound = (i64::MAX as u64 / vocab / 2).max(1);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    layer_primes(sizes, n_head, layers)
        .unwrap()
        .into_iter()
        .map(|orders| LayerSpec {
            multipliers: (0..=sizes.len())
                .map(|_| (2 * (next() % bound) + 1) as i64)
                .collect(),
            primes: orders.into_iter().flatten().collect(),
        })
        .collect()
}

fn run<O: OutElem + Into<i64>>(
    hasher: &NgramHasher,
    ids: &[i64],
    bounds: &[usize],
    flat: bool,
    backend: Backend,
) -> Result<Vec<Vec<i64>>> {
    let cols = hasher.cols();
    let layers: Vec<usize> = (0..hasher.num_layers()).collect();
    let mut bufs: Vec<Vec<O>> = layers
        .iter()
        .map(|_| vec![O::default(); ids.len() * cols])
        .collect();
    let mut outs: Vec<&mut [O]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    let req = HashRequest {
        flat,
        backend,
        ..HashRequest::new(ids, bounds, &layers)
    };
    hasher.hash_segments(&req, &mut outs)?;
    Ok(bufs
        .into_iter()
        .map(|b| b.into_iter().map(Into::into).collect())
        .collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn fast_paths_match_reference(
        // 2..=4 have specialised AVX-512 kernels, larger orders the generic one.
        n in 2usize..9,
        h in prop::sample::select(vec![1usize, 3, 8, 16]),
        base in prop::sample::select(vec![2u64, 50, 9000, 646_400, 16_000_000]),
        vocab in 1u64..200_000,
        seed in any::<u64>(),
        rows in prop::collection::vec(prop::collection::vec(any::<u64>(), 0..40), 1..4),
        flat in any::<bool>(),
    ) {
        let specs = specs(&vec![base; n - 1], h, vocab, seed, 2);
        let pad = (seed % vocab) as i64;
        let hasher = NgramHasher::new(n, h, vocab, pad, specs.clone()).unwrap();
        let rows: Vec<Vec<i64>> =
            rows.iter().map(|r| r.iter().map(|&v| (v % vocab) as i64).collect()).collect();
        let ids: Vec<i64> = rows.concat();
        let mut bounds = vec![0];
        for r in &rows {
            bounds.push(bounds.last().unwrap() + r.len());
        }
        let auto = run::<i64>(&hasher, &ids, &bounds, flat, Backend::Auto).unwrap();
        let scalar = run::<i64>(&hasher, &ids, &bounds, flat, Backend::Scalar).unwrap();
        prop_assert_eq!(&auto, &scalar);
        for (l, spec) in specs.iter().enumerate() {
            let mut expected = Vec::new();
            for r in &rows {
                expected.extend(reference(spec, n, h, pad, r));
            }
            let offsets = hasher.offsets(l);
            let expected: Vec<i64> = expected
                .iter()
                .enumerate()
                .map(|(i, &v)| (v + if flat { offsets[i % hasher.cols()] } else { 0 }) as i64)
                .collect();
            prop_assert_eq!(&auto[l], &expected);
        }
        if hasher.max_value(0, flat) <= i32::MAX as u64 && hasher.max_value(1, flat) <= i32::MAX as u64 {
            let narrow = run::<i32>(&hasher, &ids, &bounds, flat, Backend::Auto).unwrap();
            prop_assert_eq!(&narrow, &auto);
        }
    }

    #[test]
    fn extreme_mixes_reduce_exactly(
        vocab in 2u64..8,
        base in prop::sample::select(vec![16_384u64, 16_385, 646_400, 16_000_000, 1 << 40]),
        slack in prop::collection::vec(0u64..1000, 4),
        ids in prop::collection::vec(0u64..8, 1..200),
    ) {
        // Multipliers at the top of their range push mixes towards 2**63, where f64 rounds.
        let bound = i64::MAX as u64 / vocab;
        let multipliers: Vec<i64> = slack.iter().map(|&s| (bound - s) as i64).collect();
        let primes = layer_primes(&[base; 3], 8, 1).unwrap().remove(0).concat();
        let spec = LayerSpec { multipliers, primes };
        let hasher = NgramHasher::new(4, 8, vocab, 0, vec![spec.clone()]).unwrap();
        let ids: Vec<i64> = ids.iter().map(|&v| (v % vocab) as i64).collect();
        let auto = run::<i64>(&hasher, &ids, &[0, ids.len()], false, Backend::Auto).unwrap();
        let expected: Vec<i64> =
            reference(&spec, 4, 8, 0, &ids).into_iter().map(|v| v as i64).collect();
        prop_assert_eq!(&auto[0], &expected);
    }

    #[test]
    fn history_continues_a_sequence(
        row in prop::collection::vec(0i64..99_092, 1..3000),
        split in 0usize..3000,
    ) {
        let specs = specs(&[16_000_000; 3], 8, 99_092, 7, 1);
        let hasher = NgramHasher::new(4, 8, 99_092, 2, specs).unwrap();
        let split = split.min(row.len());
        let cols = hasher.cols();
        let whole = run::<i64>(&hasher, &row, &[0, row.len()], false, Backend::Auto).unwrap();
        let mut history = vec![2i64; 3];
        history.extend_from_slice(&row[..split]);
        let history = history[history.len() - 3..].to_vec();
        let tail = &row[split..];
        let mut out = vec![0i64; tail.len() * cols];
        let bounds = [0, tail.len()];
        let req = HashRequest { history: Some(&history), ..HashRequest::new(tail, &bounds, &[0]) };
        hasher.hash_segments(&req, &mut [&mut out[..]]).unwrap();
        prop_assert_eq!(&out[..], &whole[0][split * cols..]);
    }
}

/// A 64-byte aligned `&mut [O]` of `n` values inside `storage` (a `Vec` is only 8-aligned).
fn aligned<O: OutElem>(storage: &mut Vec<O>, n: usize) -> &mut [O] {
    storage.resize(n + 64, O::default());
    let skip = storage.as_ptr().align_offset(64);
    &mut storage[skip..skip + n]
}

#[test]
fn streaming_stores_match_the_scalar_path() {
    // Outputs of 8 MiB or more, 64-byte aligned, take the streaming-store path; every order
    // with a specialised kernel, int64 and int32, plain and flat.
    if !simd_available() {
        eprintln!("skipped: no AVX-512 (or ENGRAM_RS_FORCE_SCALAR set), nothing to compare");
        return;
    }
    for n in 2..=5 {
        let vocab = 99_092;
        let specs = specs(&vec![646_400; n - 1], 8, vocab, n as u64, 2);
        let hasher = NgramHasher::new(n, 8, vocab, 2, specs).unwrap();
        let cols = hasher.cols();
        let tokens = (STREAM_MIN_BYTES / 4 / cols).max(CHUNK * 3 + 17);
        let ids: Vec<i64> = (0..tokens as i64)
            .map(|i| i * 7919 % vocab as i64)
            .collect();
        let bounds = [0, 1000, tokens / 2, tokens];
        let layers = [0usize, 1];
        for flat in [false, true] {
            let req = HashRequest {
                flat,
                ..HashRequest::new(&ids[..], &bounds[..], &layers[..])
            };
            let (mut a, mut b) = (Vec::<i64>::new(), Vec::<i64>::new());
            let mut fast = [
                aligned(&mut a, tokens * cols),
                aligned(&mut b, tokens * cols),
            ];
            hasher.hash_segments(&req, &mut fast).unwrap();
            let scalar = run::<i64>(&hasher, &ids, &bounds, flat, Backend::Scalar).unwrap();
            assert!(
                fast[0][..] == scalar[0][..] && fast[1][..] == scalar[1][..],
                "n={n}"
            );
            let (mut c, mut d) = (Vec::<i32>::new(), Vec::<i32>::new());
            let mut narrow = [
                aligned(&mut c, tokens * cols),
                aligned(&mut d, tokens * cols),
            ];
            hasher.hash_segments(&req, &mut narrow).unwrap();
            let widened: Vec<i64> = narrow[1].iter().map(|&v| v as i64).collect();
            assert!(widened == scalar[1], "int32 n={n}");
        }
    }
}

#[test]
fn golden_vectors_from_the_config_alone() {
    // The core alone (no Python, no numpy) reproduces the independent implementation's ids:
    // multipliers, primes and hashes from the config, every case of both presets.
    let golden: serde_json::Value =
        serde_json::from_str(include_str!("../../../../tests/data/hash_vectors.json")).unwrap();
    let nums = |v: &serde_json::Value| -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    for preset in ["demo", "deepseek-v4.1-flash"] {
        let g = &golden["presets"][preset];
        let c = &g["config"];
        let config = HashConfig {
            engram_vocab_size: nums(&c["engram_vocab_size"]),
            max_ngram_size: c["max_ngram_size"].as_u64().unwrap() as usize,
            n_head_per_ngram: c["n_head_per_ngram"].as_u64().unwrap() as usize,
            layer_ids: nums(&c["layer_ids"]),
            seed: c["seed"].as_u64().unwrap(),
        };
        let vocab = c["compressed_vocab_size"].as_u64().unwrap();
        let pad = c["pad_id"].as_i64().unwrap();
        let hasher = NgramHasher::from_config(&config, vocab, pad, &mut || Ok(())).unwrap();
        let layers: Vec<usize> = (0..config.layer_ids.len()).collect();
        for case in g["cases"].as_array().unwrap() {
            let rows = case["input"].as_array().unwrap();
            let ids: Vec<i64> = rows.iter().flat_map(&nums).map(|v| v as i64).collect();
            let t = rows[0].as_array().unwrap().len();
            let bounds: Vec<usize> = (0..=rows.len()).map(|r| r * t).collect();
            for backend in [Backend::Auto, Backend::Scalar] {
                let req = HashRequest {
                    backend,
                    ..HashRequest::new(&ids[..], &bounds[..], &layers[..])
                };
                let mut bufs = vec![vec![0i64; ids.len() * hasher.cols()]; layers.len()];
                let mut outs: Vec<&mut [i64]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
                hasher.hash_segments(&req, &mut outs).unwrap();
                for (l, layer_id) in config.layer_ids.iter().enumerate() {
                    let want: Vec<i64> = case["expected"][layer_id.to_string()]
                        .as_array()
                        .unwrap()
                        .iter()
                        .flat_map(|row| row.as_array().unwrap())
                        .flat_map(&nums)
                        .map(|v| v as i64)
                        .collect();
                    assert_eq!(bufs[l], want, "{preset} layer {layer_id} {backend:?}");
                }
            }
        }
    }
}

#[test]
fn out_of_range_ids_name_the_first_one() {
    let hasher = NgramHasher::new(3, 8, 1000, 2, specs(&[646_400; 2], 8, 1000, 1, 1)).unwrap();
    let mut ids = vec![5i64; 10_000];
    ids[7000] = 1000;
    ids[9000] = -1;
    let err = run::<i64>(&hasher, &ids, &[0, 10_000], false, Backend::Auto).unwrap_err();
    assert_eq!(
        err,
        EngramError::IdOutOfRange {
            value: 1000,
            index: 7000,
            vocab: 1000,
            raw: false,
        }
    );
    let ids = vec![u64::MAX; 3];
    let mut out = vec![0i64; 3 * 16];
    let err = hasher
        .hash_segments(&HashRequest::new(&ids, &[0, 3], &[0]), &mut [&mut out[..]])
        .unwrap_err();
    assert_eq!(
        err,
        EngramError::IdOutOfRange {
            value: u64::MAX as i128,
            index: 0,
            vocab: 1000,
            raw: false,
        }
    );
}

#[test]
fn raw_ids_go_through_the_lookup_table() {
    let mut hasher = NgramHasher::new(3, 8, 1000, 2, specs(&[646_400; 2], 8, 1000, 3, 1)).unwrap();
    let raw: Vec<u32> = (0..5000).map(|i| (i * 7919) % 1500).collect();
    let lookup: Vec<i64> = (0..1500).map(|i| (i * 31) % 1000).collect();
    let mapped: Vec<i64> = raw.iter().map(|&r| lookup[r as usize]).collect();
    let bounds = [0, 1234, 1234, 5000];
    let req = HashRequest {
        raw: true,
        ..HashRequest::new(&raw[..], &bounds, &[0])
    };
    let mut out = vec![0i64; 5000 * 16];
    let err = hasher.hash_segments(&req, &mut [&mut out[..]]).unwrap_err();
    assert!(err.to_string().contains("lookup table"), "{err}");
    assert!(
        hasher.set_lookup(vec![0, 1000]).is_err(),
        "entries must be compressed ids"
    );
    hasher.set_lookup(lookup).unwrap();
    hasher.hash_segments(&req, &mut [&mut out[..]]).unwrap();
    let expected = run::<i64>(&hasher, &mapped, &bounds, false, Backend::Auto).unwrap();
    assert_eq!(out, expected[0]);
    let mut bad = raw.clone();
    bad[3000] = 1500;
    let req = HashRequest {
        raw: true,
        ..HashRequest::new(&bad[..], &bounds, &[0])
    };
    let err = hasher.hash_segments(&req, &mut [&mut out[..]]).unwrap_err();
    assert_eq!(
        err,
        EngramError::IdOutOfRange {
            value: 1500,
            index: 3000,
            vocab: 1500,
            raw: true
        }
    );
}

#[test]
fn int32_output_is_refused_when_ids_do_not_fit() {
    // 24 primes above 2e8 sum past 2**31: flat ids need int64, per-head ids fit int32.
    let hasher =
        NgramHasher::new(4, 8, 99_092, 2, specs(&[200_000_000; 3], 8, 99_092, 1, 1)).unwrap();
    let mut out = vec![0i32; 16 * 24];
    let req = HashRequest::new(&[1i64; 16], &[0, 16], &[0]);
    let flat = HashRequest { flat: true, ..req };
    let err = hasher
        .hash_segments(&flat, &mut [&mut out[..]])
        .unwrap_err();
    assert!(err.to_string().contains("use int64 output"), "{err}");
    hasher.hash_segments(&req, &mut [&mut out[..]]).unwrap();
}

#[test]
fn bad_bounds_and_config_are_rejected() {
    let specs = specs(&[100; 2], 2, 50, 1, 1);
    let hasher = NgramHasher::new(3, 2, 50, 2, specs.clone()).unwrap();
    let mut out = [0i64; 4 * 4];
    for bounds in [&[0usize, 3][..], &[1, 4], &[0, 3, 2, 4]] {
        let req = HashRequest::new(&[1i64; 4], bounds, &[0]);
        assert!(hasher.hash_segments(&req, &mut [&mut out[..]]).is_err());
    }
    assert!(NgramHasher::new(1, 2, 50, 2, specs.clone()).is_err());
    assert!(NgramHasher::new(3, 2, 50, 50, specs.clone()).is_err());
    assert!(NgramHasher::new(3, 2, 0, 0, specs.clone()).is_err());
    let mut overflowing = specs[0].clone();
    overflowing.multipliers[1] = i64::MAX;
    assert!(NgramHasher::new(3, 2, 50, 2, vec![overflowing]).is_err());
}

#[test]
fn config_rules_live_in_validate() {
    let good = HashConfig {
        engram_vocab_size: vec![646_400, 646_400],
        max_ngram_size: 3,
        n_head_per_ngram: 8,
        layer_ids: vec![1, 15],
        seed: 0,
    };
    assert_eq!(good.validate(), Ok(()));
    let field = |c: HashConfig| match c.validate() {
        Err(EngramError::Config { field, reason, .. }) => format!("{field}: {reason}"),
        other => panic!("{other:?}"),
    };
    let with = |f: &dyn Fn(&mut HashConfig)| {
        let mut c = good.clone();
        f(&mut c);
        field(c)
    };
    assert!(with(&|c| c.max_ngram_size = 1).starts_with("max_ngram_size"));
    assert!(with(&|c| c.n_head_per_ngram = 0).starts_with("n_head_per_ngram"));
    assert!(with(&|c| c.engram_vocab_size = vec![9]).contains("needs max_ngram_size - 1 = 2"));
    assert!(with(&|c| c.engram_vocab_size[1] = 0).contains("entry 1 (n-gram order 3)"));
    assert!(with(&|c| c.layer_ids.clear()).contains("at least one layer"));
    assert!(with(&|c| c.layer_ids = vec![3, 3]).contains("distinct (3 repeats)"));
    assert!(with(&|c| c.seed = i64::MAX as u64).starts_with("seed"));
    assert!(with(&|c| c.layer_ids = vec![u64::MAX]).starts_with("seed"));
    // from_config refuses the same configs before any prime search.
    let mut bad = good.clone();
    bad.layer_ids = vec![2, 2];
    assert!(NgramHasher::from_config(&bad, 1000, 2, &mut || Ok(())).is_err());
}

/// The DEAD rule (SPEC 8.3) written literally: walking back from `t`, shift `k` reads the pad
/// once it leaves the row or any of positions `t - k ..= t` is blocked.
fn reference_blocked(
    spec: &LayerSpec,
    n: usize,
    h: usize,
    pad: i64,
    row: &[i64],
    blocked: &[bool],
) -> Vec<u64> {
    let mut out = Vec::new();
    for t in 0..row.len() {
        let shift = |k: usize| {
            if t < k || blocked[t - k..=t].iter().any(|&b| b) {
                pad as i128
            } else {
                row[t - k] as i128
            }
        };
        for order in 2..=n {
            let mut mix = shift(0) * spec.multipliers[0] as i128;
            for k in 1..order {
                mix ^= shift(k) * spec.multipliers[k] as i128;
            }
            for j in 0..h {
                out.push(mix.rem_euclid(spec.primes[(order - 2) * h + j] as i128) as u64);
            }
        }
    }
    out
}

/// Hashes `ids` cut by `bounds` with a blocked mask (or a dead id) into one output per layer.
fn run_blocked(
    hasher: &NgramHasher,
    ids: &[i64],
    bounds: &[usize],
    blocked: Option<&[u8]>,
    dead_id: Option<u64>,
    backend: Backend,
) -> Result<Vec<Vec<i64>>> {
    let layers: Vec<usize> = (0..hasher.num_layers()).collect();
    let mut bufs = vec![vec![0i64; ids.len() * hasher.cols()]; layers.len()];
    let mut outs: Vec<&mut [i64]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    let req = HashRequest {
        blocked,
        dead_id,
        backend,
        ..HashRequest::new(ids, bounds, &layers)
    };
    hasher.hash_segments(&req, &mut outs)?;
    Ok(bufs)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn blocked_positions_follow_the_rule_on_both_paths(
        n in 2usize..7,
        h in prop::sample::select(vec![1usize, 8, 16]),
        lengths in prop::collection::vec(0usize..3000, 1..4),
        density in prop::sample::select(vec![0.0f64, 0.002, 0.05, 0.5, 1.0]),
        seed in any::<u64>(),
    ) {
        let vocab = 129_280;
        let specs = specs(&vec![646_400; n - 1], h, vocab, seed, 2);
        let pad = (seed % vocab) as i64;
        let hasher = NgramHasher::new(n, h, vocab, pad, specs.clone()).unwrap();
        let mut state = seed | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let total: usize = lengths.iter().sum();
        let ids: Vec<i64> = (0..total).map(|_| (next() % vocab) as i64).collect();
        let mut mask: Vec<bool> =
            (0..total).map(|_| (next() % 1_000_000) as f64 / 1e6 < density).collect();
        let mut bounds = vec![0];
        for &l in &lengths {
            bounds.push(bounds.last().unwrap() + l);
        }
        if seed % 3 == 0 {
            // The first position of each sequence, and both sides of a chunk edge.
            for &b in &bounds[..lengths.len()] {
                if b < total {
                    mask[b] = true;
                }
            }
            for e in [CHUNK - 1, CHUNK, 2 * CHUNK] {
                if e < total {
                    mask[e] = true;
                }
            }
        }
        let flags: Vec<u8> = mask.iter().map(|&b| b as u8).collect();
        let auto = run_blocked(&hasher, &ids, &bounds, Some(&flags), None, Backend::Auto).unwrap();
        let scalar =
            run_blocked(&hasher, &ids, &bounds, Some(&flags), None, Backend::Scalar).unwrap();
        prop_assert_eq!(&auto, &scalar);
        for (l, spec) in specs.iter().enumerate() {
            let mut expected = Vec::new();
            for w in bounds.windows(2) {
                expected.extend(reference_blocked(spec, n, h, pad, &ids[w[0]..w[1]], &mask[w[0]..w[1]]));
            }
            let expected: Vec<i64> = expected.into_iter().map(|v| v as i64).collect();
            prop_assert_eq!(&auto[l], &expected);
        }
        // The same positions marked by a dead id (a value no open position holds).
        let dead = vocab + 7;
        let marked: Vec<i64> =
            ids.iter().zip(&mask).map(|(&v, &b)| if b { dead as i64 } else { v }).collect();
        let by_id = run_blocked(&hasher, &marked, &bounds, None, Some(dead), Backend::Auto).unwrap();
        prop_assert_eq!(&by_id, &auto);
        if !mask.contains(&true) {
            let plain = run::<i64>(&hasher, &ids, &bounds, false, Backend::Auto).unwrap();
            prop_assert_eq!(&plain, &auto);
        }
    }

    #[test]
    fn decode_in_pieces_with_blocked_positions_equals_the_whole(
        n in 2usize..6,
        length in 1usize..300,
        cuts in prop::collection::vec(0usize..300, 0..6),
        blocked_at in prop::collection::vec(0usize..300, 0..8),
        seed in any::<u64>(),
    ) {
        let vocab = 99_092;
        let specs = specs(&vec![646_400; n - 1], 8, vocab, seed, 1);
        let hasher = NgramHasher::new(n, 8, vocab, 2, specs).unwrap();
        let cols = hasher.cols();
        let ids: Vec<i64> = (0..length as i64).map(|i| (i * 7919 + (seed % 97) as i64) % vocab as i64).collect();
        let mut flags = vec![0u8; length];
        for &b in &blocked_at {
            if b < length {
                flags[b] = 1;
            }
        }
        let whole = run_blocked(&hasher, &ids, &[0, length], Some(&flags), None, Backend::Auto).unwrap();
        let mut points: Vec<usize> = cuts.into_iter().filter(|&c| c < length).collect();
        points.extend([0, length]);
        points.sort_unstable();
        points.dedup();
        let mut history = vec![2i64; n - 1];
        for w in points.windows(2) {
            let (a, b) = (w[0], w[1]);
            let mut out = vec![0i64; (b - a) * cols];
            let piece_bounds = [0, b - a];
            let req = HashRequest {
                blocked: Some(&flags[a..b]),
                ..HashRequest::new(&ids[a..b], &piece_bounds, &[0])
            };
            hasher.hash_step(&req, &mut history, &mut [&mut out[..]]).unwrap();
            prop_assert_eq!(&out[..], &whole[0][a * cols..b * cols], "piece {}..{}", a, b);
        }
    }
}

#[test]
fn blocked_ids_are_never_read_and_bad_masks_are_refused() {
    let hasher = NgramHasher::new(3, 8, 1000, 2, specs(&[646_400; 2], 8, 1000, 5, 1)).unwrap();
    let mut ids = vec![5i64; 100];
    ids[10] = -1; // blocked: its id is not an id
    ids[60] = 1000; // open: out of range
    let mut flags = vec![0u8; 100];
    flags[10] = 1;
    let err = run_blocked(&hasher, &ids, &[0, 100], Some(&flags), None, Backend::Auto).unwrap_err();
    assert_eq!(
        err,
        EngramError::IdOutOfRange {
            value: 1000,
            index: 60,
            vocab: 1000,
            raw: false,
        }
    );
    flags[60] = 255; // any nonzero flag blocks
    run_blocked(&hasher, &ids, &[0, 100], Some(&flags), None, Backend::Auto).unwrap();
    let err = run_blocked(
        &hasher,
        &ids,
        &[0, 100],
        Some(&flags[..99]),
        None,
        Backend::Auto,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("holds 99 flags, expected one per id (100)"),
        "{err}"
    );
}
