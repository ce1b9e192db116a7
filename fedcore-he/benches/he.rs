//! CKKS costs at the default parameters (degree 8192, [60, 40, 40, 60],
//! scale 2^40) for the DenseNet-121 head (14,350 values = 4 ciphertexts at
//! one value per slot, 2 at two per slot: the `_2perslot` rows) and
//! per ciphertext (4096 values, TenSEAL's benchmark size), plus upload sizes;
//! the sum sent back rounded (`to_bytes`) and unrounded (`_unrounded` rows).
//!
//! `cargo bench -p fedcore-he --bench he`; numbers in docs/benchmarks.md.
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fedcore_he::{CkksContext, CkksParams, EncryptedVector, Form, SlotPacking};

const HEAD: usize = 1024 * 14 + 14;

fn values(n: usize, seed: u64) -> Vec<f64> {
    // A cheap deterministic spread over [-1, 1].
    (0..n)
        .map(|i| (((i as u64 + 1) * 2_654_435_761 + seed) % 20_001) as f64 / 10_000.0 - 1.0)
        .collect()
}

fn report_sizes(h: &CkksContext<fedcore_he::Secret>) {
    let v = values(HEAD, 1);
    let compact = h.encrypt_compact(&v).expect("compact").len();
    let deflated = fedcore_he::fuzzing::encrypt_compact_deflated(h, &v)
        .expect("deflated")
        .len();
    let unseeded = h
        .encrypt(&v)
        .expect("encrypt")
        .to_bytes()
        .expect("bytes")
        .len();
    let public = h
        .public()
        .encrypt_public(&v)
        .expect("public")
        .to_bytes()
        .expect("bytes")
        .len();
    let sum = h
        .public()
        .weighted_sum(&[&h.encrypt(&v).expect("e")], &[1.0])
        .expect("sum");
    let unrounded = |s: &EncryptedVector| {
        fedcore_he::fuzzing::to_unrounded_bytes(s)
            .expect("bytes")
            .len()
    };
    let (sum_rounded, sum_packed, sum_deflated) = (
        sum.to_bytes().expect("bytes").len(),
        unrounded(&sum),
        fedcore_he::fuzzing::to_deflated_bytes(&sum)
            .expect("bytes")
            .len(),
    );
    let two = h.clone().with_slot_packing(SlotPacking::Complex);
    let compact2 = two.encrypt_compact(&v).expect("compact").len();
    let sum2 = two
        .public()
        .weighted_sum(&[&two.encrypt(&v).expect("e")], &[1.0])
        .expect("sum");
    let (sum2_rounded, sum2_packed) = (sum2.to_bytes().expect("bytes").len(), unrounded(&sum2));
    let per = |b: usize| b as f64 / HEAD as f64;
    eprintln!(
        "two values per slot (SlotPacking::Complex, CkksSum's default): compact upload {compact2} B = {:.1} B/value; \
         the sum sent back: rounded {sum2_rounded} B = {:.2} B/value, unrounded {sum2_packed} B = {:.1} B/value",
        per(compact2),
        per(sum2_rounded),
        per(sum2_packed)
    );
    eprintln!(
        "upload of the {HEAD}-value head: compact (seeded, lowest level, packed) {compact} B = {:.1} B/value; \
         the same deflated (format 1, before 0.2) {deflated} B = {:.1} B/value; \
         unseeded symmetric at the same level {unseeded} B; public-key at the same level {public} B; \
         the sum sent back: rounded {sum_rounded} B = {:.1} B/value, unrounded (packed) {sum_packed} B = {:.1} B/value, \
         deflated {sum_deflated} B = {:.1} B/value",
        per(compact),
        per(deflated),
        per(sum_rounded),
        per(sum_packed),
        per(sum_deflated)
    );
}

fn bench(c: &mut Criterion) {
    let params = CkksParams::default();
    let mut g = c.benchmark_group("ckks");
    g.sample_size(20);
    g.bench_function("keygen", |b| {
        b.iter(|| CkksContext::generate(black_box(params.clone())).expect("keygen"))
    });
    let h = CkksContext::generate(params).expect("keygen");
    let s = h.public();
    report_sizes(&h);

    // Per ciphertext: 4096 values, as in TenSEAL's benchmarks.
    let one = values(4096, 2);
    let a = h.encrypt(&one).expect("encrypt");
    let sum_a = s.weighted_sum(&[&a], &[0.5]).expect("sum");
    g.bench_function("encode+encrypt_symmetric/4096", |b| {
        b.iter(|| h.encrypt(black_box(&one)).expect("encrypt"))
    });
    g.bench_function("encode+encrypt_public/4096", |b| {
        b.iter(|| s.encrypt_public(black_box(&one)).expect("encrypt"))
    });
    g.bench_function("add/4096", |b| {
        b.iter(|| s.add(black_box(&sum_a), black_box(&sum_a)).expect("add"))
    });
    g.bench_function("encode+multiply_plain/4096", |b| {
        b.iter(|| s.weighted_sum(&[black_box(&a)], &[0.25]).expect("mul"))
    });
    g.bench_function("decrypt+decode/4096", |b| {
        b.iter(|| h.decrypt(black_box(&sum_a)).expect("decrypt"))
    });

    // The head, one value per slot (what the encrypted median needs) and
    // two (what `CkksSum` seals by default), side by side.
    let head = values(HEAD, 3);
    g.bench_function("encrypt_compact_deflated/head", |b| {
        b.iter(|| fedcore_he::fuzzing::encrypt_compact_deflated(&h, black_box(&head)).expect("e"))
    });
    let deflated = fedcore_he::fuzzing::encrypt_compact_deflated(&h, &head).expect("e");
    g.bench_function("load_upload_deflated/head", |b| {
        b.iter(|| s.load(black_box(&deflated), Form::Fresh).expect("load"))
    });
    for (tag, packing) in [("", SlotPacking::Real), ("_2perslot", SlotPacking::Complex)] {
        let h = h.clone().with_slot_packing(packing);
        let s = h.public();
        g.bench_function(format!("encrypt_compact{tag}/head"), |b| {
            b.iter(|| h.encrypt_compact(black_box(&head)).expect("encrypt"))
        });
        let upload = h.encrypt_compact(&head).expect("encrypt");
        g.bench_function(format!("load_upload{tag}/head"), |b| {
            b.iter(|| s.load(black_box(&upload), Form::Fresh).expect("load"))
        });
        for n in [3usize, 10] {
            let parts: Vec<EncryptedVector> = (0..n)
                .map(|i| {
                    s.load(
                        &h.encrypt_compact(&values(HEAD, i as u64)).expect("e"),
                        Form::Fresh,
                    )
                    .expect("load")
                })
                .collect();
            let refs: Vec<&EncryptedVector> = parts.iter().collect();
            let w = vec![1.0 / n as f64; n];
            g.bench_with_input(
                BenchmarkId::new(format!("weighted_sum{tag}/head"), n),
                &n,
                |b, _| b.iter(|| s.weighted_sum(black_box(&refs), &w).expect("sum")),
            );
        }
        let head_sum = {
            let p = h.encrypt(&head).expect("e");
            s.weighted_sum(&[&p], &[1.0]).expect("sum")
        };
        g.bench_function(format!("serialize_sum{tag}/head"), |b| {
            b.iter(|| black_box(&head_sum).to_bytes().expect("bytes"))
        });
        g.bench_function(format!("serialize_sum_unrounded{tag}/head"), |b| {
            b.iter(|| fedcore_he::fuzzing::to_unrounded_bytes(black_box(&head_sum)).expect("bytes"))
        });
        let exact = fedcore_he::fuzzing::to_unrounded_bytes(&head_sum).expect("bytes");
        g.bench_function(format!("deserialize_sum_unrounded{tag}/head"), |b| {
            b.iter(|| h.load(black_box(&exact), Form::Sum).expect("load"))
        });
        if packing == SlotPacking::Real {
            g.bench_function("serialize_sum_deflated/head", |b| {
                b.iter(|| {
                    fedcore_he::fuzzing::to_deflated_bytes(black_box(&head_sum)).expect("bytes")
                })
            });
            let deflated = fedcore_he::fuzzing::to_deflated_bytes(&head_sum).expect("bytes");
            g.bench_function("deserialize_sum_deflated/head", |b| {
                b.iter(|| h.load(black_box(&deflated), Form::Sum).expect("load"))
            });
        }
        let bytes = head_sum.to_bytes().expect("bytes");
        g.bench_function(format!("deserialize_sum{tag}/head"), |b| {
            b.iter(|| h.load(black_box(&bytes), Form::Sum).expect("load"))
        });
        g.bench_function(format!("decrypt{tag}/head"), |b| {
            b.iter(|| h.decrypt(black_box(&head_sum)).expect("decrypt"))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
