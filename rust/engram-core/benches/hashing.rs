//! Criterion benches of the hashing kernels (scalar Barrett against the AVX-512 path).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engram_core::hashing::{Backend, HashRequest, LayerSpec, NgramHasher, OutElem};
use engram_core::primes::layer_primes;

fn demo_hasher() -> NgramHasher {
    let layers = layer_primes(&[646_400, 646_400], 8, 2)
        .unwrap()
        .into_iter()
        .map(|orders| LayerSpec {
            multipliers: vec![76_993_395_940_407, 4_862_694_818_241, 36_129_212_583_461],
            primes: orders.into_iter().flatten().collect(),
        })
        .collect();
    NgramHasher::new(3, 8, 98_627, 2, layers).unwrap()
}

fn bench_out<O: OutElem>(c: &mut Criterion, name: &str) {
    let hasher = demo_hasher();
    let (b, t) = (16, 8192);
    let ids: Vec<i64> = (0..b * t).map(|i| (i as i64 * 7919) % 98_627).collect();
    let bounds: Vec<usize> = (0..=b).map(|r| r * t).collect();
    let mut bufs = vec![vec![O::default(); ids.len() * hasher.cols()]; 2];
    let mut group = c.benchmark_group(format!("hash_demo_{name}"));
    group.throughput(Throughput::Elements(ids.len() as u64));
    for backend in [Backend::Scalar, Backend::Auto] {
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{backend:?}")),
            &backend,
            |bench, &backend| {
                bench.iter(|| {
                    let mut outs: Vec<&mut [O]> =
                        bufs.iter_mut().map(|v| v.as_mut_slice()).collect();
                    let req = HashRequest {
                        backend,
                        ..HashRequest::new(&ids, &bounds, &[0, 1])
                    };
                    hasher.hash_segments(&req, &mut outs).unwrap();
                })
            },
        );
    }
    group.finish();
}

fn hashing(c: &mut Criterion) {
    bench_out::<i64>(c, "int64");
    bench_out::<i32>(c, "int32");
}

criterion_group!(benches, hashing);
criterion_main!(benches);
