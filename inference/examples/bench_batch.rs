//! One batched decode step (`BatchDecoder::step`) on a GPT-2-124M-shaped model, by batch
//! size: milliseconds per step and tokens/s, without the serving engine around it.
//!
//!     cargo run --release -p ferrite-inference --example bench_batch -- [threads] [f32|f16] [batches]

use std::time::Instant;

use ferrite_inference::bench::random_gpt2_small;
use ferrite_model::generate::{BatchDecoder, KvCache, StepInput, WeightDtype};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let dtype: WeightDtype = args.get(2).map_or(WeightDtype::F32, |s| s.parse().unwrap());
    let model = random_gpt2_small(7, dtype).unwrap();
    let mut dec = BatchDecoder::new(threads).unwrap();
    let batches: Vec<usize> = match args.get(3) {
        Some(list) => list.split(',').map(|b| b.parse().unwrap()).collect(),
        None => vec![1, 2, 4, 8, 16],
    };
    for batch in batches {
        let mut kvs: Vec<KvCache> = (0..batch).map(|_| KvCache::new(&model.cfg, 256)).collect();
        let prompt: Vec<u32> = (0..64).map(|i| (i * 37 % 50_000) as u32).collect();
        for kv in kvs.iter_mut() {
            let mut seqs = [StepInput { kv, tokens: &prompt, logits: false }];
            dec.step(&model, &mut seqs).unwrap();
        }
        let steps = 100;
        let t0 = Instant::now();
        for s in 0..steps {
            let tok = [(s * 101 % 50_000) as u32];
            let mut seqs: Vec<StepInput<'_>> =
                kvs.iter_mut().map(|kv| StepInput { kv, tokens: &tok, logits: true }).collect();
            std::hint::black_box(dec.step(&model, &mut seqs).unwrap());
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3 / steps as f64;
        println!(
            "{dtype} batch {batch:2}: {ms:6.2} ms/step, {:6.1} tokens/s",
            batch as f64 * 1e3 / ms
        );
    }
}
