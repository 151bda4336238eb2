//! How close batch-1 decoding's linear layers come to the memory's bandwidth: a plain
//! streaming read of as many bytes as a GPT-2-124M model's weights (the ceiling), against one
//! decode step's linear layers (`matvec::forward_packed` for the 48 (in, out) weights and
//! the tied LM head, packed the same way), GB/s each, back to back; the layers once
//! on ordinary `Vec`s, once on [`HugePageBuf`]s (2 MiB pages, what the server uses).
//!
//!     cargo run --release -p ferrite-inference --example bench_stream -- [threads] [rounds] [f32|f16]
//!
//! With `f16` the weights are stored as halves (`--dtype f16`), so a step reads half the
//! bytes; the GB/s shown are of the bytes read.

use std::time::Instant;

use ferrite_kernels::cpu::matvec::{self, Weight};
use ferrite_kernels::cpu::{f16, HugePageBuf};
use ferrite_kernels::{Backend, CpuBackend};

const C: usize = 768;
const LAYERS: usize = 12;
const VOCAB: usize = 50304;

fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<usize> = raw.iter().filter_map(|s| s.parse().ok()).collect();
    let threads = args.first().copied().unwrap_or(2);
    let rounds = args.get(1).copied().unwrap_or(5);
    if raw.iter().any(|a| a == "f16") {
        run::<f16>(threads, rounds);
    } else {
        run::<f32>(threads, rounds);
    }
}

fn run<W: Weight>(threads: usize, rounds: usize) {
    let be = CpuBackend::new(threads).unwrap();
    let size = std::mem::size_of::<W>();

    let shapes = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)];
    let layers: Vec<Vec<Vec<W>>> = (0..LAYERS)
        .map(|l| {
            shapes
                .iter()
                .map(|&(c, oc)| {
                    let w: Vec<f32> =
                        (0..c * oc).map(|i| (((i + l) % 13) as f32 - 6.0) * 0.01).collect();
                    let mut packed = vec![W::default(); c * oc];
                    matvec::pack_in_out(&mut packed, &w, c, oc);
                    packed
                })
                .collect()
        })
        .collect();
    let head: Vec<W> =
        (0..VOCAB * C).map(|i| W::from_f32(((i % 11) as f32 - 5.0) * 0.01)).collect();
    let linear_bytes: usize = LAYERS * shapes.iter().map(|(c, oc)| c * oc * size).sum::<usize>();
    let head_bytes = head.len() * size;
    let total = linear_bytes + head_bytes;
    let flat: Vec<f32> = vec![1.0; total / 4];
    let hlayers: Vec<Vec<HugePageBuf<W>>> =
        layers.iter().map(|l| l.iter().map(|w| HugePageBuf::from_slice(w)).collect()).collect();
    let hhead = HugePageBuf::from_slice(&head);
    let x: Vec<f32> = (0..4 * C).map(|i| (i % 7) as f32 * 0.1).collect();
    let mut out = vec![0.0f32; VOCAB];

    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    let huge_kb = rollup.lines().find(|l| l.starts_with("AnonHugePages")).unwrap_or("?");
    println!(
        "{} (memory on 2 MiB pages)",
        huge_kb.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    println!(
        "{threads} threads, {:.0} MB of {} weights per decode step ({:.0} MB LM head)",
        total as f64 / 1e6,
        std::any::type_name::<W>(),
        head_bytes as f64 / 1e6
    );
    let plain: Vec<Vec<&[W]>> = layers.iter().map(|l| l.iter().map(|w| &w[..]).collect()).collect();
    let huge: Vec<Vec<&[W]>> = hlayers.iter().map(|l| l.iter().map(|w| &w[..]).collect()).collect();
    for _ in 0..rounds {
        let t0 = Instant::now();
        let s: f32 = std::thread::scope(|sc| {
            let parts: Vec<_> = flat
                .chunks(flat.len().div_ceil(threads))
                .map(|part| sc.spawn(move || sum(part)))
                .collect();
            parts.into_iter().map(|h| h.join().unwrap()).sum()
        });
        let read = t0.elapsed().as_secs_f64();
        std::hint::black_box(s);

        // Seconds of the linear layers, then of the LM head.
        let mut time = |layers: &[Vec<&[W]>], head: &[W]| {
            let t0 = Instant::now();
            be.run(|| {
                for layer in layers {
                    for (w, &(c, oc)) in layer.iter().zip(&shapes) {
                        matvec::forward_packed(&mut out, &x[..c], w, None, 1, c, oc);
                    }
                }
            });
            let lin = t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            be.run(|| matvec::forward_packed(&mut out, &x[..C], head, None, 1, C, VOCAB));
            std::hint::black_box(&out);
            (lin, t0.elapsed().as_secs_f64())
        };
        let (lin, hd) = time(&plain, &head);
        let (hlin, hhd) = time(&huge, &hhead);
        let gbs = |bytes: usize, s: f64| bytes as f64 / s / 1e9;
        println!(
            "streaming read {:5.1} GB/s | linear layers {:5.1} GB/s | LM head {:5.1} GB/s | step {:5.1} ms = {:5.1} tok/s ceiling {:5.1}",
            gbs(total, read),
            gbs(linear_bytes, lin),
            gbs(head_bytes, hd),
            (lin + hd) * 1e3,
            1.0 / (lin + hd),
            1.0 / read,
        );
        println!(
            "  2 MiB pages: linear layers {:5.1} GB/s | LM head {:5.1} GB/s | {:5.1} tok/s",
            gbs(linear_bytes, hlin),
            gbs(head_bytes, hhd),
            1.0 / (hlin + hhd)
        );
    }
}

/// A sum with independent partial sums, which the compiler vectorises.
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; 64];
    for chunk in xs.chunks_exact(64) {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    acc.iter().sum()
}
