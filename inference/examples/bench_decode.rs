//! The decode benchmark of `ferrite bench decode` without the CLI: batch 1, N concurrent
//! streams and time to first token on a GPT-2-124M-shaped model (random weights). Prints the
//! table, then one JSON line.
//!
//!     cargo run --release -p ferrite-inference --example bench_decode -- [threads] [streams] [reps]

use ferrite_inference::bench::{self, DecodeBench};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg =
        |i: usize, default: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    let b = DecodeBench {
        threads: arg(1, 2),
        streams: arg(2, 8),
        reps: arg(3, 1),
        ..DecodeBench::default()
    };
    let report = bench::run(&b).expect("benchmark");
    println!("{}", report.table());
    println!("{}", report.json());
}
